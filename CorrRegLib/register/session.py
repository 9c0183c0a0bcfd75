"""The steppable registration session (for GUIs) and the one-shot ``register``.

``RegistrationSession`` checks its inputs, builds the problem (views, plausible region) and the
pipeline of the chosen method, and advances it a few iterations per ``step`` call; ``cancel``
stops at the next step and keeps the best pose; ``result`` reports it. ``register`` runs a
session to the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..device import pick_device
from ..geometry import check_rigid
from ..volume import Volume
from .network import load_network
from .options import RegistrationOptions
from .pipeline import Pipeline, build_attempts
from .polish import ONE_VIEW
from .problem import Problem
from .state import RegistrationCancelled, RunState
from .verify import Verifier
from .views import View

Tensor = torch.Tensor

METHODS = ("auto", "intensity", "cmaes", "network", "hybrid")

#: The method ``corrreg register`` and the Slicer module use unless told otherwise: the network
#: pipeline when a model trained for this C-arm is given, else the global search (docs/registration.md).
DEFAULT_METHOD = "auto"


@dataclass
class StepState:
    pose: Tensor
    loss: float
    stage: str
    iteration: int
    done: bool
    progress: float


@dataclass
class RegistrationResult:
    """The outcome. ``pose`` is camera_from_ct for one view, world_from_ct for several (then
    ``view_poses`` holds each view's camera_from_ct); ``evidence`` is the verification's."""

    pose: Tensor
    loss: float
    stage: str
    iterations: int
    flagged: bool
    message: str
    history: list[dict] = field(default_factory=list)
    runtime_s: float = 0.0
    initial_pose: Tensor | None = None
    cancelled: bool = False
    view_poses: list[Tensor] = field(default_factory=list)
    evidence: dict | None = None
    pipeline: str = ""


def _resolve_method(method: str, model_dir, views: list[View], device) -> tuple[str, object, str]:
    """(pipeline name, loaded network or None, a one-line note saying what runs and why)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("network", "hybrid"):
        if len(views) > 1:
            raise ValueError(f"method {method!r} runs on one X-ray; use --method auto, intensity or cmaes for several views")
        return method, load_network(model_dir, views[0].camera, device), method
    if method != "auto":
        return method, None, method
    if model_dir is None or len(views) > 1:
        why = "several views" if len(views) > 1 else "no network model given"
        return "search", None, f"global search + refinement ({why})"
    try:
        net = load_network(model_dir, views[0].camera, device)
    except ValueError as err:
        return "search", None, f"global search + refinement (network model not used: {err})"
    return "hybrid", net, f"network {model_dir} + refinement, verified; global search when unverified"


class RegistrationSession:
    """A registration that can be advanced step by step, cancelled, and queried.

    Args:
        volume: the CT (attenuation, LPS geometry).
        xray, camera: one fixed image (H, W), dense structures bright (log domain), and its
            geometry; or ``views`` (a list of ``View``) for several calibrated X-rays.
        initial_pose: starting guess (4, 4): camera_from_ct for one X-ray, world_from_ct for views.
        method: "auto" (default: the network where a model for this C-arm is given, else the
            global search), "intensity", "cmaes", "network", "hybrid".
        mask: optional (H, W) bool/float image of usable pixels of ``xray`` (collimation, ROI).
        isocenter: LPS point the rotations turn about (default: the CT's bone centroid).
    """

    def __init__(
        self,
        volume: Volume,
        xray: Tensor | None = None,
        camera=None,
        initial_pose: Tensor | None = None,
        method: str = DEFAULT_METHOD,
        device: str | torch.device = "auto",
        model_dir=None,
        mask: Tensor | None = None,
        isocenter: Tensor | None = None,
        options: RegistrationOptions | None = None,
        views: Sequence[View] | None = None,
    ) -> None:
        if views is None:
            views = [View(xray, camera, None, mask, "X-ray")]
        elif xray is not None or camera is not None or mask is not None:
            raise ValueError("give either xray/camera/mask or views, not both")
        views = list(views)
        if not views:
            raise ValueError("register needs at least one X-ray view")
        if not isinstance(volume, Volume):
            raise ValueError(f"the CT must be a CorrRegLib.volume.Volume (read_ct gives one), got {type(volume).__name__}")
        volume.check_content()  # too small, only air, or flat: nothing to register
        if initial_pose is None:
            raise ValueError("register needs an initial pose (e.g. geometry.reference_ap_pose(iso, sod))")
        self.options = options or RegistrationOptions()
        self.device = pick_device(device)
        self.views = views
        self.camera = views[0].camera
        world_init = check_rigid(torch.as_tensor(initial_pose, dtype=torch.float64)).detach().cpu().double()
        self.initial_pose = world_init
        if isocenter is None:
            try:
                isocenter = volume.bone_center_lps()
            except ValueError:
                isocenter = volume.center_lps()
        self.isocenter = torch.as_tensor(isocenter, dtype=torch.float64).reshape(3)
        self.volume = volume
        ref_init = views[0].camera_from_world @ world_init
        self.method = method
        pipeline_name, network, self.pipeline_note = _resolve_method(method, model_dir, views, self.device)
        self.model_dir = None if network is None else network[2]
        self.problem = Problem(volume, views, self.isocenter, ref_init, self.device, self.options)
        _check_initial_pose(self.problem, ref_init)
        o = self.options
        bar = o.fallback_below
        if bar is not None and self.problem.bone_only and o.bone_only_fallback_below is not None:
            bar = o.bone_only_fallback_below
        self.verifier = None if bar is None else Verifier(o.verify_level, bar)
        self.pipeline = Pipeline(build_attempts(pipeline_name, o, self.verifier, network), self.verifier,
                                 o.min_agreement, o.min_rank_margin, o.min_single_view_edges)
        self._run = RunState(ref_init, self.problem.bounds)
        if o.bone_only_polish is not None and not self.problem.bone_only:
            self._run.messages.append("no polish: it is for a CT that holds only bone (a segmented bone, or "
                                      "--ct-label), and this CT holds more")
        elif o.bone_only_polish is not None and len(views) < 2:
            self._run.messages.append(ONE_VIEW)
        self.problem.should_stop = lambda: self._run.cancelled
        self._planned = self.pipeline.planned_first(self.problem)
        self._done = False
        self._elapsed = 0.0
        self._gen: Iterator[None] | None = None

    # ---- public API ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    @property
    def planned_iterations(self) -> int:
        """Upper bound on the iterations of the pipeline so far planned (for progress bars)."""
        return self._planned

    def _extend_plan(self, n: int) -> None:
        self._planned = self._run.iteration + n

    def step(self, n: int = 1) -> StepState:
        """Advance up to ``n`` iterations and return the current state."""
        if self._gen is None:
            self._gen = self.pipeline.run(self.problem, self._run, self._extend_plan)
        start = time.perf_counter()
        try:
            for _ in range(max(1, int(n))):
                if self._done:
                    break
                if self._run.cancelled:
                    self._finish()
                    break
                try:
                    next(self._gen)
                except (StopIteration, RegistrationCancelled):
                    self._finish()
                    break
        finally:
            self._elapsed += time.perf_counter() - start
        return self.state()

    def run(self, callback: Callable[[StepState], None] | None = None, chunk: int = 5) -> RegistrationResult:
        """Run to the end (or until cancelled), calling ``callback`` after every chunk."""
        while not self._done:
            st = self.step(chunk)
            if callback is not None:
                callback(st)
        return self.result()

    def cancel(self) -> None:
        """Stop as soon as possible (another thread may call it during ``step``: the running
        iteration stops before its backward pass); the best pose so far is kept."""
        self._run.cancelled = True

    def state(self) -> StepState:
        s = self._run
        return StepState(
            pose=self.problem.world_pose(s.best_pose),
            loss=float(s.best_loss),
            stage=s.stage,
            iteration=s.iteration,
            done=self._done,
            progress=1.0 if self._done else min(0.99, s.iteration / max(1, self._planned)),
        )

    def verification(self, pose: Tensor) -> dict | None:
        """The verification evidence (features) of a camera_from_ct / world_from_ct pose."""
        if self.verifier is None:
            return None
        return self.verifier.evidence(self.problem, self.problem.ref_pose(torch.as_tensor(pose, dtype=torch.float64))).as_dict()

    def result(self) -> RegistrationResult:
        s = self._run
        msg = "; ".join(s.messages) or ("cancelled" if s.cancelled else "converged")
        ev = s.evidence
        return RegistrationResult(
            pose=self.problem.world_pose(s.best_pose),
            loss=float(s.best_loss),
            stage=s.stage,
            iterations=s.iteration,
            flagged=s.flagged,
            message=msg,
            history=list(s.history),
            runtime_s=self._elapsed,
            initial_pose=self.initial_pose.clone(),
            cancelled=s.cancelled,
            view_poses=self.problem.view_poses(s.best_pose),
            evidence=None if ev is None else ev.as_dict(),
            pipeline=self.pipeline_note,
        )

    def _finish(self) -> None:
        self.pipeline.conclude(self.problem, self._run)
        self._run.stage = "cancelled" if self._run.cancelled else "done"
        self._done = True


def _check_initial_pose(problem: Problem, ref_pose: Tensor) -> None:
    """Refuse starting poses from which no registration can work (behind: PoseBounds refuses)."""
    for i, (view, t) in enumerate(zip(problem.views, problem.view_from_ref)):
        pose = t @ ref_pose
        depth = float((pose[:3, :3] @ problem.isocenter + pose[:3, 3])[2])
        where = f" in view {i + 1}" if len(problem.views) > 1 else ""
        if depth >= view.camera.sdd:
            raise ValueError(f"at the initial pose the CT lies beyond the detector{where} (depth {depth:.0f} mm >= sdd "
                             f"{view.camera.sdd:.0f} mm)")
        # a fine enough canvas that one small bone in a large image still shows (a radius fills
        # 2 % of a 1760 px intensifier image, less on a 3000 px flat panel)
        cam = view.camera.downsample(max(1.0, min(view.camera.size) / 128))
        from ..projector import Projector

        proj = Projector(problem.pooled_volume(2).to(problem.device), cam)
        with torch.no_grad():
            drr = proj(pose.to(problem.device).float())
        if int((drr > 1e-3).sum()) < 4:
            from ..simulate import why_not_in_view

            raise ValueError(
                f"at the initial pose the CT projects outside the X-ray's field of view{where}: "
                f"{why_not_in_view(problem.volume, view.camera, pose)} Start from a pose that shows the anatomy on "
                "the detector (e.g. the reference AP view).")


def register(
    volume: Volume,
    xray: Tensor | None = None,
    camera=None,
    initial_pose: Tensor | None = None,
    method: str = DEFAULT_METHOD,
    progress: bool = False,
    **kwargs,
) -> RegistrationResult:
    """Register ``xray`` (or ``views=``) to ``volume`` from ``initial_pose``; see RegistrationSession."""
    session = RegistrationSession(volume, xray, camera, initial_pose, method=method, **kwargs)
    if not progress:
        return session.run()
    from tqdm.auto import tqdm

    with tqdm(total=session.planned_iterations, desc=f"register ({method})", unit="it", leave=False) as bar:
        def update(st: StepState) -> None:
            bar.total = max(bar.total, session.planned_iterations)
            bar.n = st.iteration
            bar.set_postfix(stage=st.stage, loss=f"{st.loss:.4f}")
            bar.refresh()

        return session.run(update)
