"""Registration pipelines: gradient refinement, CMA-ES search, and a steppable session.

The pose is optimised as a small rigid motion applied in the camera frame on top of a base
pose: a rotation about the isocenter's camera position followed by a translation. The six
parameters are all in millimetres (rotation vector times ``rotation_scale_mm``: the arc a point
that far from the isocenter travels), which keeps the problem well conditioned for Adam and
CMA-ES alike. Each stage re-bases on its best pose, so parameters stay small.

``RegistrationSession`` runs the pipeline as a generator that a GUI advances a few iterations
per timer tick (``step``); ``register`` is the one-shot form built on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import pick_device
from .geometry import Camera, check_rigid, rotation_about_point, transform_points
from .projector import Projector
from .similarity import get_similarity
from .volume import Volume

Tensor = torch.Tensor

METHODS = ("auto", "intensity", "cmaes", "network", "hybrid")

#: The method ``corrreg register`` and the Slicer module use unless told otherwise: the network
#: pipeline when a model trained for this C-arm is given, else the global search (docs/registration.md).
DEFAULT_METHOD = "auto"


@dataclass(frozen=True)
class Level:
    """One resolution of the coarse-to-fine schedule.

    ``detector_px`` is the detector width to render at (capped at the X-ray's own width);
    ``volume_factor`` the CT downsampling (None: the largest power of two whose voxels stay no
    bigger than ``voxel_slack`` times the level's pixel footprint at the isocenter).
    """

    detector_px: int
    max_iterations: int
    lr_mm: float
    similarity: str | None = None  # None: RegistrationOptions.similarity
    volume_factor: int | None = None
    voxel_slack: float = 1.25


@dataclass(frozen=True)
class RegistrationOptions:
    # Patch NCC finishes: unlike global NCC its optimum is not biased in depth by scatter or a
    # heel effect (global NCC's is, by 2-3 mm on the phantom; docs/registration.md).
    similarity: str = "patch_ncc"
    # The coarse levels use global NCC: the widest basin, and patch terms are too few there.
    # The 16 px level keeps large in-plane offsets from locking onto a neighbouring vertebra
    # (moderate protocol, 20 phantom cases: 15/20 -> 19/20 below 1 mm; docs/registration.md).
    levels: tuple[Level, ...] = (
        Level(16, 100, 6.0, "ncc"),
        Level(32, 100, 3.0, "ncc"),
        Level(64, 60, 1.0),
        Level(128, 30, 0.3, voxel_slack=1.0),
    )
    rotation_scale_mm: float = 100.0
    patience: int = 15
    # Depth is seen only through magnification: its loss gains are tiny, so stop only when
    # the loss really stalls.
    min_improvement: float = 1e-6
    samples_per_voxel: float = 1.0
    # CMA-ES global search (method "cmaes" and "hybrid"): offsets in degrees and mm.
    cmaes_sigma: tuple[float, ...] = (20.0, 20.0, 20.0, 30.0, 30.0, 60.0)
    cmaes_population: int = 24
    cmaes_generations: int = 60
    cmaes_similarity: str = "ncc"
    cmaes_level: Level = Level(32, 0, 0.0)
    # False: stop after the global search (CMA-ES alone / network alone), no gradient refinement.
    refine: bool = True
    # Network-guided descent (methods "network" and "hybrid"): unit steps along the network's
    # pose gradient, rotation and translation parts normalised separately (as L_appro trains
    # them), shrinking geometrically; stops when the smoothed score stalls.
    network_iterations: int = 120
    network_step_deg: float = 2.0
    network_step_mm: float = 6.0
    network_decay: float = 0.97
    network_patience: int = 20
    # "hybrid" only: a local CMA-ES search between the network and the refinement (the paper
    # follows every learned method with CMA-ES), with these offsets in degrees and mm.
    hybrid_cmaes: bool = False
    hybrid_cmaes_sigma: tuple[float, ...] = (5.0, 5.0, 5.0, 10.0, 10.0, 20.0)
    # "hybrid" only: check the result. Below this global NCC of X-ray and DRR at ``verify_level``
    # the network's proposal is taken to have missed; a global CMA-ES search from the initial pose
    # and the refinement run as a second attempt, and the attempt with the higher NCC is kept
    # (flagged when neither reaches it). Registered poses score >= 0.996 on simulated X-rays of
    # the chest CT and the phantom; failures <= 0.89 on the chest and up to 0.96 on the phantom,
    # whose repeating vertebrae align one level off (docs/registration.md). None: no check.
    fallback_below: float | None = 0.99
    verify_level: Level = Level(64, 0, 0.0, "ncc")
    seed: int = 0


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


class RegistrationCancelled(Exception):
    pass


def _pose_from_params(base: Tensor, centre: Tensor, params: Tensor, rotation_scale_mm: float) -> Tensor:
    """(B, 4, 4) poses from (B, 6) parameters (rotation in mm of arc, translation in mm)."""
    import roma

    rot = roma.rotvec_to_rotmat(params[..., :3] / rotation_scale_mm)
    delta = rotation_about_point(rot, centre.expand(rot.shape[:-2] + (3,)), params[..., 3:])
    return delta @ base


def _resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) image area-averaged to (H', W') = size."""
    if tuple(img.shape[-2:]) == size:
        return img
    return F.adaptive_avg_pool2d(img, size)


class RegistrationSession:
    """A registration that can be advanced step by step, cancelled, and queried.

    Args:
        volume: the CT (attenuation, LPS geometry).
        xray: the fixed image (H, W), dense structures bright (log domain).
        camera: the X-ray's geometry; its size must match the image.
        initial_pose: camera_from_ct starting guess (4, 4).
        method: "intensity" (coarse-to-fine gradient refinement), "cmaes" (CMA-ES then
            refinement), "network" / "hybrid" (the learned similarity, needs a model).
        mask: optional (H, W) bool/float image of pixels to use (collimation, ROI).
        isocenter: LPS point the rotations turn about (default: the CT's bone centroid).
    """

    def __init__(
        self,
        volume: Volume,
        xray: Tensor,
        camera: Camera,
        initial_pose: Tensor,
        method: str = "intensity",
        device: str | torch.device = "auto",
        model_dir=None,
        mask: Tensor | None = None,
        isocenter: Tensor | None = None,
        options: RegistrationOptions | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(camera, Camera):
            raise ValueError(
                f"register needs the X-ray's camera geometry (a CorrRegLib.geometry.Camera), got {type(camera).__name__}; "
                "read_xray(..., require_camera=False) returns camera=None when the geometry is unknown: give it with a "
                "camera JSON or sdd= and pixel_spacing="
            )
        self.method = method
        self.options = options or RegistrationOptions()
        self.device = pick_device(device)
        self.camera = camera
        self.initial_pose = check_rigid(torch.as_tensor(initial_pose, dtype=torch.float64)).detach().cpu().double()
        fixed = _check_xray(xray, camera)
        self._mask = None
        if mask is not None:
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) != tuple(fixed.shape):
                raise ValueError(f"the mask has shape {tuple(mask.shape)} but the X-ray has {tuple(fixed.shape)}")
            if not bool((mask > 0).any()):
                raise ValueError("the mask excludes every pixel")
            self._mask = (mask > 0).float()[None, None].to(self.device)
        self._fixed = fixed[None, None].to(self.device)
        self.volume = volume
        if isocenter is None:
            try:
                isocenter = volume.bone_center_lps()
            except ValueError:
                isocenter = volume.center_lps()
        self.isocenter = torch.as_tensor(isocenter, dtype=torch.float64).reshape(3)
        self._network = None
        self.model_dir = None
        if method == "auto":
            method, self.pipeline_note = _resolve_auto(model_dir, camera, self.device)
            self.method = method
        else:
            self.pipeline_note = method
        if method in ("network", "hybrid"):
            self._network = _load_network(model_dir, camera, self.device)
            self.model_dir = self._network[2]
        self._pyramid: dict[int, Volume] = {1: volume}
        self._projectors: dict[tuple[float, int], Projector] = {}
        self._sod = float(transform_points(self.initial_pose, self.isocenter.reshape(1, 3))[0, 2])
        _check_initial_pose(self, self.initial_pose)
        self._best_pose = self.initial_pose.clone()
        self._best_loss = math.inf
        self._stage = "ready"
        self._attempt = ""  # "fallback " during hybrid's second attempt (stage names, history)
        self._pending_first: tuple | None = None
        self._iteration = 0
        self._history: list[dict] = []
        self._flagged = False
        self._messages: list[str] = []
        self._cancelled = False
        self._done = False
        self._elapsed = 0.0
        self._gen: Iterator[StepState] | None = None
        self._planned = self._planned_iterations()

    # ---- public API ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    @property
    def planned_iterations(self) -> int:
        """Upper bound on the iterations of the whole pipeline (for progress bars)."""
        return self._planned

    def step(self, n: int = 1) -> StepState:
        """Advance up to ``n`` iterations and return the current state."""
        if self._gen is None:
            self._gen = self._pipeline()
        start = time.perf_counter()
        try:
            for _ in range(max(1, int(n))):
                if self._done:
                    break
                if self._cancelled:
                    self._finish()
                    break
                try:
                    next(self._gen)
                except StopIteration:
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
        """Stop at the next step; the best pose so far is kept."""
        self._cancelled = True

    def state(self) -> StepState:
        return StepState(
            pose=self._best_pose.clone(),
            loss=float(self._best_loss),
            stage=self._stage,
            iteration=self._iteration,
            done=self._done,
            progress=1.0 if self._done else min(0.99, self._iteration / max(1, self._planned)),
        )

    def result(self) -> RegistrationResult:
        msg = "; ".join(self._messages) or ("cancelled" if self._cancelled else "converged")
        return RegistrationResult(
            pose=self._best_pose.clone(),
            loss=float(self._best_loss),
            stage=self._stage,
            iterations=self._iteration,
            flagged=self._flagged,
            message=msg,
            history=list(self._history),
            runtime_s=self._elapsed,
            initial_pose=self.initial_pose.clone(),
            cancelled=self._cancelled,
        )

    # ---- machinery ----------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._pending_first is not None:  # cancelled during hybrid's second attempt
            self._keep_better_attempt()
        self._stage = "cancelled" if self._cancelled else "done"
        self._done = True

    def _level_projector(self, level: Level) -> Projector:
        """The projector for a schedule level, resolving its detector and CT resolution."""
        return self._projector(*self._level_factors(level))

    def _level_factors(self, level: Level) -> tuple[float, int]:
        """(detector downsampling, CT downsampling) of a schedule level."""
        factor = max(1.0, self.camera.width / max(1, level.detector_px))
        vf = level.volume_factor
        if vf is None:
            pixel_at_iso = max(self.camera.pixel_spacing) * factor * self._sod / self.camera.sdd
            vf = self.volume.pool_factor(pixel_at_iso, level.voxel_slack)
        return factor, vf

    def _projector(self, detector_factor: float, volume_factor: int) -> Projector:
        key = (float(detector_factor), int(volume_factor))
        if key not in self._projectors:
            vol = self._pyramid.get(volume_factor)
            if vol is None:
                vol = self.volume
                f = 1
                while f < volume_factor:
                    vol = vol.downsample(2)
                    f *= 2
                self._pyramid[volume_factor] = vol
            cam = self.camera.downsample(detector_factor)
            self._projectors[key] = Projector(
                vol.to(self.device), cam, samples_per_voxel=self.options.samples_per_voxel
            ).to(self.device)
        return self._projectors[key]

    def _fixed_at(self, camera: Camera) -> tuple[Tensor, Tensor | None]:
        size = (camera.height, camera.width)
        fixed = _resize(self._fixed, size)
        mask = None if self._mask is None else (_resize(self._mask, size) > 0.99).float()
        return fixed, mask

    def _planned_iterations(self) -> int:
        o = self.options
        total = sum(lv.max_iterations for lv in o.levels) if o.refine else 0
        if self.method in ("cmaes",):
            total += o.cmaes_generations
        if self.method in ("network", "hybrid"):
            total += o.network_iterations
            if self.method == "hybrid" and o.hybrid_cmaes:
                total += o.cmaes_generations
        return total

    def _record(self, loss: float, pose: Tensor, stage: str) -> None:
        self._iteration += 1
        self._history.append({"iteration": self._iteration, "stage": self._attempt + stage, "loss": loss})
        if math.isfinite(loss) and loss < self._best_loss:
            self._best_loss = loss
            self._best_pose = pose.detach().cpu().double().clone()

    def _flag(self, message: str) -> None:
        self._flagged = True
        self._messages.append(message)

    def _pipeline(self) -> Iterator[None]:
        if self.method == "cmaes":
            yield from self._cmaes_stage()
        if self.method in ("network", "hybrid"):
            yield from self._network_stage()
        if self.method == "hybrid" and self.options.hybrid_cmaes:
            yield from self._cmaes_stage(self.options.hybrid_cmaes_sigma)
        if self.method == "network":
            return
        if self.options.refine:
            yield from self._gradient_stages()
            if self.method == "hybrid" and self.options.fallback_below is not None:
                yield from self._fallback_if_unverified()

    def verification_score(self, pose: Tensor) -> float:
        """Global NCC (1 = identical) of the X-ray and the DRR at ``pose``, at ``verify_level``."""
        proj = self._level_projector(self.options.verify_level)
        fixed, mask = self._fixed_at(proj.camera)
        with torch.no_grad():
            drr = proj(torch.as_tensor(pose, dtype=torch.float64).reshape(1, 4, 4).float())
            score = float(get_similarity("ncc")(fixed, drr, mask)[0])
        return score if math.isfinite(score) else -1.0  # a NaN never passes the check

    def _fallback_if_unverified(self) -> Iterator[None]:
        """Second attempt (global CMA-ES from the initial pose, then refinement) when the
        first result's verification score is below ``fallback_below``; keep the better one."""
        o = self.options
        first_score = self.verification_score(self._best_pose)
        if not first_score < o.fallback_below:
            return
        # kept until the second attempt ends, so that a cancel mid-attempt keeps the better one
        self._pending_first = (self._best_pose.clone(), self._best_loss, self._stage, first_score)
        self._best_pose = self.initial_pose.clone()
        self._attempt = "fallback "
        # progress: the second attempt's own bound on top of what has run
        self._planned = self._iteration + o.cmaes_generations + sum(lv.max_iterations for lv in o.levels)
        yield from self._cmaes_stage()
        yield from self._gradient_stages()
        second_score, kept_second = self._keep_better_attempt()
        note = (f"the first attempt scored NCC {first_score:.3f} < {o.fallback_below:g}; a global CMA-ES search from "
                f"the initial pose scored {second_score:.3f}; kept the {'second' if kept_second else 'first'}")
        if max(first_score, second_score) < o.fallback_below:
            self._flag(f"unverified result: {note}; check the overlay")
        else:
            self._messages.append(note)

    def _keep_better_attempt(self) -> tuple[float, bool]:
        """End hybrid's second attempt: restore the first unless the second scores higher.
        Returns (the second attempt's score, whether it was kept)."""
        pose, loss, stage, first_score = self._pending_first
        self._pending_first = None
        second_score = self.verification_score(self._best_pose)
        if second_score > first_score:
            return second_score, True
        self._best_pose, self._best_loss, self._stage = pose, loss, stage
        return second_score, False

    # ---- stages ---------------------------------------------------------------------------------
    def _stage_start(self, stage: str) -> Tensor:
        """Enter a stage: losses are only comparable within one stage, so restart tracking."""
        self._stage = self._attempt + stage
        base = self._best_pose.clone()
        self._best_loss = math.inf
        return base

    def _gradient_stages(self) -> Iterator[None]:
        o = self.options
        for li, level in enumerate(o.levels):
            sim = get_similarity(level.similarity or o.similarity)
            stage = f"intensity level {li + 1}/{len(o.levels)}"
            # Pose maths stays on the CPU in float64 (MPS has no float64); the projector moves
            # each float32 pose to its device and autograd carries the gradient back.
            base = self._stage_start(stage)
            proj = self._level_projector(level)
            fixed, mask = self._fixed_at(proj.camera)
            centre = transform_points(base, self.isocenter.reshape(1, 3))[0]
            params = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([params], lr=level.lr_mm)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, o.patience // 3))
            stale, best_here = 0, math.inf
            for _ in range(level.max_iterations):
                pose = _pose_from_params(base, centre, params, o.rotation_scale_mm)
                drr = proj(pose.float())
                loss_t = 1.0 - sim(fixed, drr, mask)[0]
                loss = float(loss_t.detach())
                empty = not bool((drr.detach() > 0).any())
                if not math.isfinite(loss) or empty:
                    self._flag(f"{stage}: the {'loss became NaN' if not math.isfinite(loss) else 'CT left the field of view'}"
                               " at iteration " f"{self._iteration}; kept the best pose")
                    break
                self._record(loss, pose[0], stage)
                yield
                if loss < best_here - o.min_improvement:
                    best_here, stale = loss, 0
                else:
                    stale += 1
                    if stale >= o.patience:
                        break
                opt.zero_grad()
                loss_t.backward()
                if not torch.isfinite(params.grad).all():
                    self._flag(f"{stage}: non-finite gradient at iteration {self._iteration}; kept the best pose")
                    break
                opt.step()
                sched.step(loss)

    def _cmaes_stage(self, sigma: Sequence[float] | None = None) -> Iterator[None]:
        import cma

        o = self.options
        stage = "cmaes"
        base = self._stage_start(stage)
        proj = self._level_projector(o.cmaes_level)
        fixed, mask = self._fixed_at(proj.camera)
        sim = get_similarity(o.cmaes_similarity)
        centre = transform_points(base, self.isocenter.reshape(1, 3))[0]
        scale = np.array([o.rotation_scale_mm * math.pi / 180.0] * 3 + [1.0] * 3)  # deg -> mm of arc
        es = cma.CMAEvolutionStrategy(
            np.zeros(6), 1.0,
            {"CMA_stds": list(sigma or o.cmaes_sigma), "popsize": o.cmaes_population, "seed": o.seed + 1,
             "maxiter": o.cmaes_generations, "verbose": -9, "tolfun": 1e-5},
        )
        while not es.stop():
            xs = es.ask()
            params = torch.as_tensor(np.asarray(xs) * scale, dtype=torch.float64)
            with torch.no_grad():
                poses = _pose_from_params(base, centre, params, o.rotation_scale_mm)
                drr = proj(poses.float())
                losses = 1.0 - sim(fixed, drr, mask)
                empty = ~(drr.flatten(1) > 0).any(1)
                losses = torch.where(empty | ~torch.isfinite(losses), torch.full_like(losses, 2.0), losses)
            values = losses.double().cpu().numpy()
            es.tell(xs, values.tolist())
            k = int(values.argmin())
            self._record(float(values[k]), poses[k], stage)
            yield

    def _network_stage(self) -> Iterator[None]:
        """Descend the learned similarity through network and projector (ProST's schedule)."""
        from .losses import pose_gradient, twist_about_isocenter

        o = self.options
        net, net_camera, _ = self._network
        stage = "network"
        pose = self._stage_start(stage)  # float64 on the CPU, as in the gradient stages
        proj = self._level_projector(Level(net_camera.width, 0, 0.0))
        fixed, _ = self._fixed_at(proj.camera)
        iso = self.isocenter.to(torch.float32)
        step_r, step_t = math.radians(o.network_step_deg), o.network_step_mm
        smooth, best_smooth, stale = None, math.inf, 0
        for _ in range(o.network_iterations):
            pg = pose_gradient(net, proj, fixed, pose[None].float(), iso)
            score, grad = float(pg.score[0]), pg.grad[0].double()
            if not (math.isfinite(score) and torch.isfinite(grad).all()):
                self._flag(f"{stage}: the network score became NaN at iteration {self._iteration}; kept the best pose")
                break
            if not bool((pg.drr > 0).any()):
                self._flag(f"{stage}: the CT left the field of view at iteration {self._iteration}; kept the best pose")
                break
            self._record(score, pose, stage)
            yield
            smooth = score if smooth is None else 0.8 * smooth + 0.2 * score
            if smooth < best_smooth - 1e-6:
                best_smooth, stale = smooth, 0
            else:
                stale += 1
                if stale >= o.network_patience:
                    break
            ur = grad[:3] / grad[:3].norm().clamp_min(1e-12)
            ut = grad[3:] / grad[3:].norm().clamp_min(1e-12)
            delta = -torch.cat([step_r * ur, step_t * ut])
            pose = twist_about_isocenter(pose[None], delta[None], iso.double())[0].detach()
            step_r *= o.network_decay
            step_t *= o.network_decay


BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "compact"

_NO_MODEL_MESSAGE = (
    "no trained network model is available: train one with `corrreg train` and pass --model DIR, "
    "or use --method intensity or --method cmaes"
)


def bundled_model_dir() -> Path | None:
    """The compact model shipped with the package, if this installation has one."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "config.json").is_file() else None


def _load_network(model_dir, camera: Camera, device: torch.device):
    """(network, the camera it runs at, its directory); refuses a model made for another C-arm."""
    model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
    if model_dir is None:
        raise ValueError(_NO_MODEL_MESSAGE)
    from .train import load_model

    try:
        net, cfg = load_model(model_dir, device)
    except ValueError as err:
        raise ValueError(f"cannot use the network model in {model_dir}: {err}") from None
    if cfg.get("camera") is None:
        raise ValueError(f"{model_dir}: the model's config does not record the camera it was trained for")
    trained = Camera.from_dict(cfg["camera"])
    check_model_camera(trained, camera, model_dir)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, trained, model_dir


def _resolve_auto(model_dir, camera: Camera, device) -> tuple[str, str]:
    """The pipeline of method "auto": (method, a one-line note saying what runs and why)."""
    if model_dir is None:
        return "cmaes", "global search + refinement (no network model given)"
    try:
        _load_network(model_dir, camera, device)
    except ValueError as err:
        return "cmaes", f"global search + refinement (network model not used: {err})"
    return "hybrid", f"network {model_dir} + refinement, verified"


def check_model_camera(trained: Camera, camera: Camera, model_dir=None) -> None:
    """A network sees images of one C-arm geometry: refuse another sdd or field of view (>5%)."""
    fov = lambda c: (c.width * c.pixel_spacing[0], c.height * c.pixel_spacing[1])
    a, b = fov(trained), fov(camera)
    off = max(abs(trained.sdd / camera.sdd - 1), abs(a[0] / b[0] - 1), abs(a[1] / b[1] - 1))
    if off > 0.05:
        raise ValueError(
            f"the network {model_dir or ''} was trained for another camera (sdd {trained.sdd:.0f} mm, field of view "
            f"{a[0]:.0f} x {a[1]:.0f} mm) than this X-ray's (sdd {camera.sdd:.0f} mm, {b[0]:.0f} x {b[1]:.0f} mm); "
            "train a model for this C-arm with `corrreg train`"
        )


def _check_xray(xray: Tensor, camera: Camera) -> Tensor:
    x = torch.as_tensor(xray)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"the X-ray must be a 2D image (H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape) != (camera.height, camera.width):
        raise ValueError(
            f"the X-ray is {x.shape[1]} x {x.shape[0]} pixels but the camera geometry says "
            f"{camera.width} x {camera.height}; the camera must describe this image"
        )
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("the X-ray contains NaN or Inf pixels")
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise ValueError("the X-ray is blank (every pixel has the same value)")
    at_extremes = float(((x <= lo) | (x >= hi)).float().mean())
    if at_extremes > 0.9:
        raise ValueError(f"the X-ray is saturated ({at_extremes:.0%} of pixels sit at the minimum or maximum value)")
    return x


def _check_initial_pose(session: RegistrationSession, pose: Tensor) -> None:
    """Refuse starting poses from which no registration can work."""
    iso_cam = transform_points(pose, session.isocenter.reshape(1, 3))[0]
    if iso_cam[2] <= 0:
        raise ValueError(
            "at the initial pose the CT lies behind the X-ray source (isocenter depth "
            f"{iso_cam[2]:.0f} mm); check the pose direction (camera_from_ct) and its units"
        )
    if iso_cam[2] >= session.camera.sdd:
        raise ValueError(
            f"at the initial pose the CT lies beyond the detector (depth {iso_cam[2]:.0f} mm >= sdd "
            f"{session.camera.sdd:.0f} mm)"
        )
    proj = session._projector(max(1.0, min(session.camera.size) / 32), 2)
    with torch.no_grad():
        drr = proj(pose.to(session.device).float())
    covered = float((drr > 1e-3).float().mean())
    if covered < 0.01:
        raise ValueError(
            "at the initial pose the CT projects outside the X-ray's field of view; start from a pose "
            "that shows the anatomy on the detector (e.g. the reference AP view)"
        )


def register(
    volume: Volume,
    xray: Tensor,
    camera: Camera,
    initial_pose: Tensor,
    method: str = "intensity",
    progress: bool = False,
    **kwargs,
) -> RegistrationResult:
    """Register ``xray`` to ``volume`` from ``initial_pose``; see RegistrationSession."""
    session = RegistrationSession(volume, xray, camera, initial_pose, method=method, **kwargs)
    if not progress:
        return session.run()
    from tqdm.auto import tqdm

    with tqdm(total=session.planned_iterations, desc=f"register ({method})", unit="it", leave=False) as bar:
        def update(st: StepState) -> None:
            bar.n = st.iteration
            bar.set_postfix(stage=st.stage, loss=f"{st.loss:.4f}")
            bar.refresh()

        return session.run(update)
