"""One registration as the scene sees it: the main-thread side of a ``worker.RegistrationEngine``.

``RegistrationRun`` applies the engine's messages to MRML: on ``Ready`` it sets the scene up (X-ray
placed, DRR node, slice view), on ``Progress`` it writes the best pose into the output transform,
on ``LiveDRR`` / ``FinalDRR`` it fills the DRR node, on ``Finished`` it keeps the result. Two ways
to drive it, the same engine either way:

* in the background (the GUI): a ``worker.WorkerThread`` runs the engine; ``poll()``, called from
  a short QTimer, applies what arrived; every call returns within milliseconds;
* synchronously (scripts, ``register``): ``step(n)`` runs n engine steps in the caller's thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import adapter
from .worker import Failed, FinalDRR, Finished, LiveDRR, Progress, Ready, WorkerThread


@dataclass
class RunOptions:
    """What ``start`` resolved, kept on the run for display and for the result line."""

    method: str
    device: str
    camera: object
    initialPose: object  # torch (4, 4) float64; None until the set-up is done
    iterationsPerStep: int = 2
    drrUpdateInterval: float = 0.5
    pipelineNote: str = ""
    xrayNote: str = ""  # what was done to the X-ray: polarity, field of view (xrayimage.preparationNote)


@dataclass
class StepInfo:
    """What the last step(s) did (a StepState plus display bookkeeping)."""

    pose: object
    loss: float
    stage: str
    iteration: int
    done: bool
    progress: float
    transformUpdates: int = 0
    drrUpdates: int = 0


class RegistrationRun:
    """One registration on MRML nodes; made by ``CorrRegLogicCore.start``."""

    def __init__(self, logic, engine, options: RunOptions, sceneArgs: dict, background: bool,
                 progressCallback=None):
        self.logic = logic
        self.engine = engine
        self.options = options
        self.progressCallback = progressCallback
        self.nodes: dict = {}
        self.transformUpdates = 0
        self.drrUpdates = 0
        self.lastState: StepInfo | None = None
        self.result = None
        self.error: BaseException | None = None
        self.startTime = time.perf_counter()
        self.wallTime = None
        self._sceneArgs = sceneArgs
        self._lastPose = None
        self._cancelRequested = False
        # Per view (the reference first, then the other views in order), set on Ready: the worker's
        # polarity and field-of-view decisions and the pixels used (bool (H, W) numpy, None: all).
        self.xrayInfos: list = []
        self.fieldOfViewMasks: list = []
        self._finalDRRsShown = 0  # full-resolution DRRs shown, one per view
        self._abandoned = False
        self._worker = WorkerThread(engine) if background else None
        if background:
            self._worker.start()
        else:
            engine.post = self._apply  # messages are applied as the engine posts them
            engine.setUp()  # raises on bad input, before the scene changes

    # -- state -------------------------------------------------------------------------------
    @property
    def background(self) -> bool:
        return self._worker is not None

    @property
    def stopped(self) -> bool:
        """The registration is over: the final pose is in the output transform (or it failed)."""
        return self.result is not None or self.error is not None or self._abandoned

    @property
    def finished(self) -> bool:
        """Everything is shown, the final DRR included, and the worker is gone."""
        if self._abandoned or self.error is not None:
            return True
        if self.result is None:
            return False
        allShown = self._finalDRRsShown >= 1 + len(self.nodes.get("otherDRRs", ()))
        workerDone = self._worker is not None and not self._worker.alive and self._worker.messages.empty()
        return allShown or "drr" not in self.nodes or workerDone

    @property
    def done(self) -> bool:
        """No more steps to take: stopped, converged or cancelled (then call finish)."""
        return self.stopped or self._cancelRequested or (self._worker is None and self.engine.done)

    @property
    def session(self):
        return self.engine.session

    @property
    def renderer(self):
        return self.engine.renderer

    @property
    def pipelineNote(self) -> str:
        return self.options.pipelineNote

    @property
    def xrayInfo(self) -> dict | None:
        """The reference X-ray's polarity and field-of-view decisions; None until set up."""
        return self.xrayInfos[0] if self.xrayInfos else None

    @property
    def fieldOfViewMask(self):
        """The reference X-ray's pixels used (bool (H, W) numpy); None: all of them, or not set up."""
        return self.fieldOfViewMasks[0] if self.fieldOfViewMasks else None

    @property
    def xrayNote(self) -> str:
        """What was done to the X-ray before registering (polarity, field of view); "" until set up."""
        return self.options.xrayNote

    @property
    def outputTransformNode(self):
        return self.nodes.get("outputTransform") or self._sceneArgs.get("outputTransformNode")

    @property
    def drrNode(self):
        return self.nodes.get("drr")

    # -- driving in the background -----------------------------------------------------------
    def poll(self) -> StepInfo | None:
        """Apply what the worker sent since the last call (main thread). Returns the newest state,
        or None when nothing new arrived. Only the newest pose and DRR are drawn."""
        if self._worker is None or self._abandoned:
            return None
        messages = self._worker.drain()
        newest = {}
        for m in messages:
            if isinstance(m, (Progress, LiveDRR)):
                newest[type(m)] = m  # coalesced: the newest one is drawn below
                continue
            if m is None:
                continue
            if isinstance(m, (Finished, FinalDRR, Failed)):
                for k in (Progress, LiveDRR):
                    if k in newest:
                        self._apply(newest.pop(k))
            self._apply(m)
        for k in (Progress, LiveDRR):
            if k in newest:
                self._apply(newest[k])
        return self.lastState if (newest or messages) else None

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until finished (scripts); True when finished within ``timeout`` seconds."""
        end = None if timeout is None else time.perf_counter() + timeout
        while not self.finished:
            if end is not None and time.perf_counter() > end:
                return False
            time.sleep(interval)
            self.poll()
        return True

    # -- driving synchronously ---------------------------------------------------------------
    def step(self, n: int | None = None) -> StepInfo:
        """Advance up to ``n`` iterations in this thread, then show the best pose so far."""
        if self._worker is not None:
            raise RuntimeError("this registration runs in the background: call poll() instead of step()")
        if self.stopped:
            raise RuntimeError("this registration has already finished")
        if self._cancelRequested:
            raise RuntimeError("this registration was cancelled; call finish()")
        n = self.options.iterationsPerStep if n is None else n
        try:
            for _ in range(max(1, int(n))):
                self.engine.advance()
                if self.engine.done or self._cancelRequested:
                    break
        except Exception as e:
            self.error = e
            raise
        return self.lastState

    def cancel(self) -> None:
        """Stop; the best pose found so far is kept (at the worker's next step boundary)."""
        self._cancelRequested = True
        if self._worker is not None:
            self._worker.cancel()
        else:
            self.engine.cancel()

    def finish(self):
        """End the run (cancelling it if still going), leave the scene at the best pose and
        return the ``RegistrationResult``. In the background this waits for the worker."""
        if self.result is not None and self.finished:
            return self.result
        if self.error is not None:
            raise self.error
        if self._worker is not None:
            if not self.stopped:
                self.cancel()
            self.wait()
            if self.error is not None:
                raise self.error
            return self.result
        self.engine.conclude()
        return self.result

    def abandon(self) -> None:
        """Stop without touching the scene again (the scene is closing, or a new run starts)."""
        self._abandoned = True
        if self._worker is not None and self._worker.alive:
            self._worker.abandon()  # the worker frees the engine's memory as it ends
        else:
            self.engine.cancel()
            self.engine.releaseInBackground()

    def release(self) -> None:
        """Free the session, projectors and CT copy once the run is over (in a helper thread)."""
        if self._worker is not None and self._worker.alive:
            self._worker.abandon()
        else:
            self.engine.releaseInBackground()

    def summary(self) -> str:
        r = self.result
        if r is None:
            st = self.lastState
            return "" if st is None else f"{st.stage}: iteration {st.iteration}, loss {st.loss:.4f}"
        word = "Cancelled" if getattr(r, "cancelled", False) else "Done"
        text = (f"{word} ({self.options.method}): stage {r.stage}, {r.iterations} iterations in "
                f"{r.runtime_s:.1f} s, final loss {r.loss:.4f}")
        evidence = r.evidence or {}
        if evidence.get("local_starts"):
            n = int(evidence["local_starts"])
            text += f"; {round(evidence['agreement'] * n)} of {n} local starts ended here"
            if evidence.get("rank_margin") is not None:
                text += (f", the next basin ({evidence['rival_mm']:.0f} mm away on the bone) leaves "
                         f"{100 * evidence['rank_margin']:.0f} % more of the images unexplained")
        if self.options.xrayNote:
            text += f". {self.options.xrayNote}"
        if r.flagged:
            text += f". Check the result: {r.message}"
        return text

    # -- messages -> MRML (main thread only) -------------------------------------------------
    def _apply(self, m) -> None:
        if self._abandoned:
            return
        if isinstance(m, Ready):
            self.options.initialPose = m.initialPose
            self.options.device = m.device
            self.options.pipelineNote = m.pipelineNote
            self.options.xrayNote = m.xrayNote
            self.xrayInfos, self.fieldOfViewMasks = list(m.xrayInfo or []), list(m.fieldOfViewMasks or [])
            self.nodes = self.logic._setUpScene(**self._sceneArgs)
            self.logic.matchDRRPolarity(self.nodes, self.xrayInfos)
            self._showPose(adapter._toNumpyPose(m.initialPose))
        elif isinstance(m, Progress):
            self._showPose(m.pose)
            info = StepInfo(m.pose, m.loss, m.stage, m.iteration, m.done, m.progress,
                            self.transformUpdates, self.drrUpdates)
            self.lastState = info
            if self.progressCallback is not None and self.progressCallback(info) is False:
                self.cancel()
        elif isinstance(m, LiveDRR):
            self._showDRR(m.image, m.view)
        elif isinstance(m, Finished):
            self.result = m.result
            self.wallTime = time.perf_counter() - self.startTime
            self._showPose(m.pose)
        elif isinstance(m, FinalDRR):
            self._showDRR(m.image, m.view)
            self._finalDRRsShown += 1
        elif isinstance(m, Failed):
            self.error = m.error
            self.errorDetails = m.details
            self.errorDuring = m.during

    def _showPose(self, pose) -> None:
        pose = adapter._toNumpyPose(pose)
        if "outputTransform" not in self.nodes:
            return
        if self._lastPose is None or not np.array_equal(pose, self._lastPose):
            adapter.setTransformNodeFromPose(self.nodes["outputTransform"], pose)
            self.transformUpdates += 1
            self._lastPose = pose
            self.logic._alignSliceView(self.nodes)

    def _showDRR(self, image, view: int = 0) -> None:
        others = self.nodes.get("otherDRRs", ())
        drr = self.nodes.get("drr") if view == 0 else (others[view - 1] if view <= len(others) else None)
        if drr is None or image is None:
            return
        self.logic.showDRRImage(drr, image)
        self.drrUpdates += 1
