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
    keep: np.ndarray | None = None  # bool (K, J, I): one bone of the CT (ctlabel.ctLabelMask); None: all of it

    def toVolume(self):
        """A ``CorrRegLib.volume.Volume`` (attenuation), only what ``keep`` keeps: the float copy is
        made here, in the caller's thread."""
        import torch
        from CorrRegLib.volume import Volume

        hu = np.array(self.voxels, dtype=np.float32, copy=True)
        volume = Volume.from_hu(torch.from_numpy(hu), self.spacing, self.origin, self.direction)
        return volume if self.keep is None else volume.keep_only(torch.from_numpy(self.keep))


@dataclass
class ViewJob:
    """One more calibrated X-ray of the same moment (biplane), as plain data."""

    xray: np.ndarray  # (H, W) float32
    camera: object
    cameraFromWorld: np.ndarray  # (4, 4) float64: the calibration's world to this camera (LPS, mm)
    polarity: str = "auto"
    fieldOfView: object = "auto"
    name: str = "X-ray"


@dataclass
class RegistrationJob:
    """One registration as plain data. With ``others`` (biplane) ``cameraFromWorld`` places the
    reference camera (``camera``) in the calibration's world too; the pose the run shows stays
    camera_from_ct of the reference view, the session estimates world_from_ct from all views."""

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
    cameraFromWorld: np.ndarray | None = None
    others: tuple = ()  # ViewJob, one per other view
    name: str = "X-ray"


# ---- messages (worker -> main thread) ----------------------------------------------------------
@dataclass
class Ready:
    initialPose: object  # torch (4, 4) float64
    pipelineNote: str
    device: str
    plannedIterations: int
    xrayNote: str = ""  # what was done to the X-ray(s) (xrayimage.preparationNote)
    xrayInfo: list | None = None  # per view: prepare_image's polarity and field-of-view decisions
    fieldOfViewMasks: list | None = None  # per view: bool (H, W), True = used; None: every pixel


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
    view: int = 0  # 0: the reference X-ray, k: job.others[k - 1]


@dataclass
class Finished:
    result: object  # RegistrationResult
    pose: np.ndarray


@dataclass
class FinalDRR:
    pose: np.ndarray
    image: np.ndarray
    view: int = 0


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
        self.renderers = []  # one per view
        self._fromRef = []  # per view: (4, 4) camera_k_from_camera_0
        self._toRef = None  # the session's world_from_ct -> camera_from_ct of the reference view (biplane)
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
        views = [ViewJob(job.xray, job.camera, job.cameraFromWorld, job.polarity, job.fieldOfView, job.name),
                 *job.others]
        prepared = [prepare_image(v.xray, v.polarity, v.fieldOfView) for v in views]  # (image, mask, inverted, info)
        masks = [mask for _, mask, _, _ in prepared]
        tensor = lambda mask: None if mask is None else torch.from_numpy(mask)  # noqa: E731
        if job.others:
            from CorrRegLib.geometry import invert_pose
            from CorrRegLib.register import View

            cfw = [torch.as_tensor(np.asarray(v.cameraFromWorld), dtype=torch.float64) for v in views]
            regViews = [View(image, v.camera, c, tensor(mask), v.name)
                        for (image, mask, _, _), v, c in zip(prepared, views, cfw)]
            session = RegistrationSession(volume, initial_pose=invert_pose(cfw[0]) @ pose0, method=job.method,
                                          device=dev, model_dir=job.modelDir, views=regViews, **kwargs)
            self._toRef = lambda world, c0=cfw[0].numpy(): c0 @ world
            self._fromRef = [c.numpy() @ np.linalg.inv(cfw[0].numpy()) for c in cfw]
            note = "; ".join(preparationNote(info, inverted, v.name) for (_, _, inverted, info), v in zip(prepared, views))
        else:
            image, mask, inverted, info = prepared[0]
            session = RegistrationSession(volume, image, job.camera, pose0, method=job.method, device=dev,
                                          model_dir=job.modelDir, mask=tensor(mask), **kwargs)
            self._fromRef = [np.eye(4)]
            note = preparationNote(info, inverted)
        self.volume, self.session = volume, session
        self.renderers = [DRRRenderer(volume, v.camera, device=dev) for v in views]
        if self.cancelled:
            session.cancel()
        ready = Ready(pose0, str(getattr(session, "pipeline_note", job.method)), str(dev),
                      int(session.planned_iterations), note, [info for _, _, _, info in prepared], masks)
        self.post(ready)
        start = _pose(pose0)
        self._postDRRs(LiveDRR, start)
        self._lastLive, self._lastLivePose = time.perf_counter(), start
        return ready

    @property
    def renderer(self):
        """The reference view's DRR renderer (None before the set-up and after the release)."""
        return self.renderers[0] if self.renderers else None

    def _refPose(self, pose) -> np.ndarray:
        """A session pose as the run shows it: camera_from_ct of the reference view."""
        p = _pose(pose)
        return p if self._toRef is None else self._toRef(p)

    def _postDRRs(self, kind, pose: np.ndarray, full: bool = False) -> None:
        """A DRR of every view at ``pose`` (camera_from_ct of the reference view)."""
        for k, (renderer, fromRef) in enumerate(zip(self.renderers, self._fromRef)):
            self.post(kind(pose, renderer.render(fromRef @ pose, full=full), k))

    def advance(self) -> Progress:
        """One session step; a live DRR at most every ``liveDRRInterval`` seconds."""
        st = self.session.step(1)
        msg = Progress(self._refPose(st.pose), float(st.loss), str(st.stage), int(st.iteration), bool(st.done),
                       float(st.progress))
        self.post(msg)
        now = time.perf_counter()
        if (not st.done and now - self._lastLive >= self.job.liveDRRInterval
                and (self._lastLivePose is None or not np.array_equal(msg.pose, self._lastLivePose))):
            self._postDRRs(LiveDRR, msg.pose)
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
        finished = Finished(result, self._refPose(result.pose))
        self.post(finished)
        if finalDRR:
            self._postDRRs(FinalDRR, finished.pose, full=True)
        return finished

    def cancel(self) -> None:
        """Thread-safe: the session stops at its next step boundary."""
        self._cancel.set()
        if self.session is not None:
            self.session.cancel()

    def release(self) -> None:
        """Drop the session, the projectors and the CT copy."""
        self.session = self.volume = None
        self.renderers = []

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
