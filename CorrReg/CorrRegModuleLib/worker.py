"""A registration's work, away from MRML: set-up, stepping, DRRs and cancel.

``RegistrationEngine`` turns a ``RegistrationJob`` (plain arrays and values copied or viewed from
the nodes on the main thread) into messages: ``Ready``, ``Progress``, ``LiveDRR``, ``Finished``,
``FinalDRR``, ``Failed``. ``WorkerThread`` runs an engine in a Python thread (torch releases the
GIL while it computes) and hands the messages to the main thread through a queue; the main thread
(``run.RegistrationRun.poll``, from a short QTimer in the GUI) is the only one that touches MRML
or Qt. Without a thread, ``RegistrationRun`` calls the same engine methods directly (scripts).

Nothing here imports slicer, vtk or qt.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from .poses import PoseSpec, isocenterOf, poseFromSpec
from .rendering import DRRRenderer


@dataclass
class CTData:
    """A CT's voxels (K, J, I, in HU, any dtype; may be a view of the node's memory) and LPS geometry."""

    voxels: np.ndarray
    origin: tuple
    direction: tuple
    spacing: tuple
    name: str = "CT"

    def toVolume(self):
        """A ``CorrRegLib.volume.Volume`` (attenuation): the float copy is made here, in the caller's thread."""
        import torch
        from CorrRegLib.volume import Volume

        hu = np.array(self.voxels, dtype=np.float32, copy=True)
        return Volume.from_hu(torch.from_numpy(hu), self.spacing, self.origin, self.direction)


@dataclass
class RegistrationJob:
    ct: CTData
    xray: np.ndarray  # (H, W) float32
    camera: object
    pose: PoseSpec
    method: str
    device: str = "auto"
    modelDir: str | None = None
    options: object = None
    liveDRRInterval: float = 0.5
    polarity: str = "auto"  # xrayimage.POLARITIES
    fieldOfView: object = "auto"  # "auto", "none" or a bool (H, W) array (xrayimage.fieldOfViewFrom)


# ---- messages (worker -> main thread) ----------------------------------------------------------
@dataclass
class Ready:
    initialPose: object  # torch (4, 4) float64
    pipelineNote: str
    device: str
    plannedIterations: int
    xrayNote: str = ""  # what was done to the X-ray (xrayimage.preparationNote)
    xrayInfo: dict | None = None  # prepare_image's polarity and field-of-view decisions
    fieldOfViewMask: np.ndarray | None = None  # bool (H, W), True = used; None: every pixel


@dataclass
class Progress:
    pose: np.ndarray
    loss: float
    stage: str
    iteration: int
    done: bool
    progress: float


@dataclass
class LiveDRR:
    pose: np.ndarray
    image: np.ndarray


@dataclass
class Finished:
    result: object  # RegistrationResult
    pose: np.ndarray


@dataclass
class FinalDRR:
    pose: np.ndarray
    image: np.ndarray


@dataclass
class Failed:
    error: BaseException
    during: str  # "set-up", "registration" or "final DRR"
    details: str = ""


class BoneMissing(ValueError):
    pass


def _pose(p) -> np.ndarray:
    if hasattr(p, "detach"):
        p = p.detach().cpu().double().numpy()
    return np.asarray(p, dtype=np.float64).reshape(4, 4).copy()


class RegistrationEngine:
    """Set-up, steps and DRRs of one registration; every result goes to ``post(message)``."""

    def __init__(self, job: RegistrationJob, post=None):
        self.job = job
        self.post = post or (lambda message: None)
        self.session = None
        self.renderer = None
        self.volume = None
        self._cancel = threading.Event()
        self._lastLive = -math.inf
        self._lastLivePose = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def setUp(self) -> Ready:
        """CT conversion, bone check, the X-ray made ready (field of view, polarity), initial pose,
        session and projectors. Raises ValueError on bad input."""
        import torch
        from CorrRegLib.device import pick_device
        from CorrRegLib.preprocess import prepare_image
        from CorrRegLib.register import RegistrationSession

        from .xrayimage import preparationNote

        job = self.job
        volume = job.ct.toVolume()
        try:
            iso = isocenterOf(volume)
        except ValueError:
            raise BoneMissing(
                f"the CT '{job.ct.name}' contains no bone (no voxel denser than about 500 HU); CorrReg registers "
                "on bony anatomy. Check that the volume is a CT in Hounsfield units") from None
        pose0 = poseFromSpec(job.pose, job.camera, iso)
        dev = pick_device(job.device)
        kwargs = {} if job.options is None else {"options": job.options}
        image, mask, inverted, info = prepare_image(job.xray, job.polarity, job.fieldOfView)
        session = RegistrationSession(volume, image, job.camera, pose0, method=job.method, device=dev,
                                      model_dir=job.modelDir, mask=None if mask is None else torch.from_numpy(mask),
                                      **kwargs)
        self.volume, self.session = volume, session
        self.renderer = DRRRenderer(volume, job.camera, device=dev)
        if self.cancelled:
            session.cancel()
        ready = Ready(pose0, str(getattr(session, "pipeline_note", job.method)), str(dev),
                      int(session.planned_iterations), preparationNote(info, inverted), info, mask)
        self.post(ready)
        start = _pose(pose0)
        self.post(LiveDRR(start, self.renderer.render(start)))
        self._lastLive, self._lastLivePose = time.perf_counter(), start
        return ready

    def advance(self) -> Progress:
        """One session step; a live DRR at most every ``liveDRRInterval`` seconds."""
        st = self.session.step(1)
        msg = Progress(_pose(st.pose), float(st.loss), str(st.stage), int(st.iteration), bool(st.done),
                       float(st.progress))
        self.post(msg)
        now = time.perf_counter()
        if (not st.done and now - self._lastLive >= self.job.liveDRRInterval
                and (self._lastLivePose is None or not np.array_equal(msg.pose, self._lastLivePose))):
            self.post(LiveDRR(msg.pose, self.renderer.render(msg.pose)))
            self._lastLive, self._lastLivePose = time.perf_counter(), msg.pose
        return msg

    @property
    def done(self) -> bool:
        return self.session is None or self.session.done

    def conclude(self, finalDRR: bool = True) -> Finished:
        """End the session (cancelled if still going), post its result, then the full DRR."""
        s = self.session
        if not s.done:
            s.cancel()
            s.step(1)  # a cancelled session finishes without computing
        result = s.result()
        finished = Finished(result, _pose(result.pose))
        self.post(finished)
        if finalDRR:
            self.post(FinalDRR(finished.pose, self.renderer.render(finished.pose, full=True)))
        return finished

    def cancel(self) -> None:
        """Thread-safe: the session stops at its next step boundary."""
        self._cancel.set()
        if self.session is not None:
            self.session.cancel()

    def release(self) -> None:
        """Drop the session, the projectors and the CT copy."""
        self.session = self.renderer = self.volume = None

    def releaseInBackground(self) -> None:
        """``release`` in a short-lived thread: freeing a 512^3 CT and its projectors takes a few
        hundred milliseconds, which the main thread must not spend."""
        threading.Thread(target=self.release, name="CorrReg release", daemon=True).start()


class WorkerThread:
    """Runs a ``RegistrationEngine`` from set-up to the final DRR in a daemon thread."""

    def __init__(self, engine: RegistrationEngine):
        self.engine = engine
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        engine.post = self.messages.put
        self._thread = threading.Thread(target=self._run, name="CorrReg registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        e = self.engine
        during = "set-up"
        try:
            e.setUp()
            during = "registration"
            while not e.done and not e.cancelled:
                e.advance()
            during = "final DRR"
            e.conclude(finalDRR=not getattr(self, "abandoned", False))
        except BaseException as err:  # handed to the main thread, which reports it
            if not getattr(self, "abandoned", False):
                self.messages.put(Failed(err, during, traceback.format_exc()))
        finally:
            if getattr(self, "abandoned", False):
                e.release()  # freeing a large CT takes a while: here, not on the main thread
            self.messages.put(None)  # end of stream

    def cancel(self) -> None:
        self.engine.cancel()

    def abandon(self) -> None:
        """Stop without a final DRR (the scene is closing or a new run takes over)."""
        self.abandoned = True
        self.engine.cancel()

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout=None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
