"""The network-guided stage (ProST's schedule) and the trained models it loads.

A model sees the images of one C-arm geometry (docs/network.md): it is used only where its
recorded camera matches the X-ray's, and only on a single view.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from ..geometry import Camera
from .options import Level
from .state import RunState

Tensor = torch.Tensor

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "compact"

NO_MODEL_MESSAGE = (
    "no trained network model is available: train one with `corrreg train` and pass --model DIR, "
    "or use --method auto, intensity or cmaes"
)


def bundled_model_dir() -> Path | None:
    """The compact model shipped with the package, if this installation has one."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "config.json").is_file() else None


def load_network(model_dir, camera: Camera, device: torch.device):
    """(network, the camera it runs at, its directory); refuses a model made for another C-arm."""
    model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
    if model_dir is None:
        raise ValueError(NO_MODEL_MESSAGE)
    from ..train import load_model

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


def check_model_camera(trained: Camera, camera: Camera, model_dir=None) -> None:
    """A network sees images of one C-arm geometry: refuse another sdd or field of view (>5%)."""
    fov = lambda c: (c.width * c.pixel_spacing[0], c.height * c.pixel_spacing[1])  # noqa: E731
    a, b = fov(trained), fov(camera)
    off = max(abs(trained.sdd / camera.sdd - 1), abs(a[0] / b[0] - 1), abs(a[1] / b[1] - 1))
    if off > 0.05:
        raise ValueError(
            f"the network {model_dir or ''} was trained for another camera (sdd {trained.sdd:.0f} mm, field of view "
            f"{a[0]:.0f} x {a[1]:.0f} mm) than this X-ray's (sdd {camera.sdd:.0f} mm, {b[0]:.0f} x {b[1]:.0f} mm); "
            "train a model for this C-arm with `corrreg train`"
        )


class NetworkDescent:
    """Unit steps along the learned similarity's pose gradient, through network and projector."""

    name = "network"

    def __init__(self, network, iterations: int, step_deg: float, step_mm: float, decay: float,
                 patience: int) -> None:
        self.net, self.net_camera, self.model_dir = network
        self.iterations = int(iterations)
        self.step_deg, self.step_mm, self.decay, self.patience = step_deg, step_mm, decay, int(patience)

    def planned(self, problem) -> int:
        return self.iterations

    def run(self, problem, state: RunState) -> Iterator[None]:
        from ..losses import pose_gradient, twist_about_isocenter

        pose = state.stage_start(self.name)
        level = Level(self.net_camera.width, 0, 0.0)
        proj = problem.projector(0, level)
        fixed, fov = problem.fixed(0, proj.camera)
        if fov is not None:  # the network sees only the usable pixels, in both images
            fixed = fixed * fov
            render = lambda p: proj(p) * fov  # noqa: E731
        else:
            render = proj
        iso = problem.isocenter.to(torch.float32)
        step_r, step_t = math.radians(self.step_deg), self.step_mm
        smooth, best_smooth, stale = None, math.inf, 0
        for _ in range(self.iterations):
            pg = pose_gradient(self.net, render, fixed, pose[None].float(), iso)
            score, grad = float(pg.score[0]), pg.grad[0].double().cpu()
            if not (math.isfinite(score) and torch.isfinite(grad).all()):
                state.flag(f"{self.name}: the network score became NaN at iteration {state.iteration}; kept the best pose")
                break
            if not bool((pg.drr > 0).any()):
                state.flag(f"{self.name}: the CT left the field of view at iteration {state.iteration}; kept the best pose")
                break
            state.record(score, pose, self.name)
            yield
            if not bool(problem.bounds.contains(pose[None])[0]):
                break  # walked out of the plausible region: the best pose inside it is kept
            smooth = score if smooth is None else 0.8 * smooth + 0.2 * score
            if smooth < best_smooth - 1e-6:
                best_smooth, stale = smooth, 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
            ur = grad[:3] / grad[:3].norm().clamp_min(1e-12)
            ut = grad[3:] / grad[3:].norm().clamp_min(1e-12)
            delta = -torch.cat([step_r * ur, step_t * ut])
            pose = twist_about_isocenter(pose[None], delta[None], problem.isocenter)[0].detach()
            step_r *= self.decay
            step_t *= self.decay
