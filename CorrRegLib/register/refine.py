"""Gradient refinement: Adam on six parameters per pose, coarse to fine, for one pose or a batch.

The parameters are a small rigid motion on top of a base pose, in the reference camera frame: a
rotation about the isocenter's camera position (rotation vector times ``rotation_scale_mm``,
the arc a point that far from the isocenter travels) followed by a translation, all in mm, so
that Adam sees a well-conditioned problem. Each level re-bases on the best pose of the last.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import roma
import torch

from ..geometry import rotation_about_point, transform_points
from .options import Level
from .state import RegistrationCancelled, RunState

Tensor = torch.Tensor


def pose_from_params(base: Tensor, centre: Tensor, params: Tensor, rotation_scale_mm: float) -> Tensor:
    """(B, 4, 4) poses from (B, 6) parameters (rotation in mm of arc, translation in mm) applied
    about ``centre`` (B, 3) on top of ``base`` (B, 4, 4)."""
    rot = roma.rotvec_to_rotmat(params[..., :3] / rotation_scale_mm)
    return rotation_about_point(rot, centre, params[..., 3:]) @ base


class LevelRefiner:
    """Adam at one level for a batch of starting poses; ``steps()`` yields after each iteration.

    Each pose keeps its own best (plausible) pose and loss; a pose stops on a NaN loss, a
    non-finite gradient, a DRR that shows nothing, or ``patience`` iterations without a gain of
    ``min_improvement``; the level ends when every pose has stopped or after ``max_iterations``.
    """

    def __init__(self, problem, poses: Tensor, level: Level, similarity: str | None = None) -> None:
        self.problem = problem
        self.level = level
        self.similarity = similarity
        self.base = poses.detach().cpu().double().reshape(-1, 4, 4).clone()
        b = self.base.shape[0]
        self.centre = transform_points(self.base, problem.isocenter.reshape(1, 1, 3).expand(b, 1, 3))[:, 0]
        self.params = torch.zeros(b, 6, dtype=torch.float64, requires_grad=True)
        self.best_poses = self.base.clone()
        self.best_losses = torch.full((b,), math.inf, dtype=torch.float64)
        self.failures: list[str | None] = [None] * b
        self.iterations = 0
        #: options.hold_region: the poses whose DRRs frame the compared region (None: each pose's own)
        self.region_poses = self.base.clone() if problem.holds_region(level) else None

    def poses(self) -> Tensor:
        return pose_from_params(self.base, self.centre, self.params, self.problem.options.rotation_scale_mm)

    def steps(self) -> Iterator[Tensor]:
        o = self.problem.options
        b = self.base.shape[0]
        opt = torch.optim.Adam([self.params], lr=self.level.lr_mm)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, o.patience // 3))
        active = torch.ones(b, dtype=torch.bool)
        stale = torch.zeros(b, dtype=torch.long)
        best_here = torch.full((b,), math.inf, dtype=torch.float64)
        for _ in range(self.level.max_iterations):
            if self.problem.should_stop():
                raise RegistrationCancelled
            poses = self.poses()
            self._move_region(poses)
            score, shows = self.problem.similarity(poses, self.level, self.similarity, region_poses=self.region_poses)
            loss_t = 1.0 - score
            loss = loss_t.detach().double().cpu()
            inside = self.problem.bounds.contains(poses.detach())
            for i in range(b):
                if not active[i]:
                    continue
                if not math.isfinite(float(loss[i])):
                    self.failures[i], active[i] = f"the loss became NaN at iteration {self.iterations + 1}", False
                elif not shows[i]:
                    self.failures[i], active[i] = f"the CT left the field of view at iteration {self.iterations + 1}", False
                elif not inside[i]:
                    active[i] = False  # left the plausible region: keep the best pose inside it
                elif loss[i] < self.best_losses[i]:
                    self.best_losses[i] = loss[i]
                    self.best_poses[i] = poses[i].detach().double()
            self.iterations += 1
            yield torch.where(active, loss, torch.full_like(loss, math.inf))
            improved = loss < best_here - o.min_improvement
            best_here = torch.where(improved, loss, best_here)
            stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            active &= stale < o.patience
            if not bool(active.any()):
                break
            if self.problem.should_stop():  # a cancel during the forward pass: skip the backward
                raise RegistrationCancelled
            opt.zero_grad()
            (loss_t * active.to(loss_t)).sum().backward()
            grad = self.params.grad
            bad = ~torch.isfinite(grad).all(1)
            for i in bad.nonzero().flatten().tolist():
                if active[i]:
                    self.failures[i], active[i] = f"non-finite gradient at iteration {self.iterations}", False
            self.params.grad = torch.where(active[:, None] & ~bad[:, None], grad, torch.zeros_like(grad))
            if not bool(active.any()):
                break
            opt.step()
            sched.step(float((loss * active).sum()))

    def _move_region(self, poses: Tensor) -> None:
        """Re-frame the held region on the poses that have moved more than ``region_refresh``
        ROI margins from where it was framed (a new tensor, so the problem's cache renews it)."""
        if self.region_poses is None:
            return
        moved = self.problem.region_drift(poses, self.region_poses, self.level) > self.problem.options.region_refresh
        if bool(moved.any()):
            self.region_poses = torch.where(moved[:, None, None], poses.detach().double(), self.region_poses)


class GradientRefinement:
    """Coarse-to-fine refinement of the best pose so far (one pose), one level after another."""

    def __init__(self, levels: Sequence[Level], name: str = "intensity") -> None:
        self.levels = tuple(levels)
        self.name = name

    def planned(self, problem) -> int:
        return sum(lv.max_iterations for lv in self.levels)

    def run(self, problem, state: RunState) -> Iterator[None]:
        for li, level in enumerate(self.levels):
            stage = f"{self.name} level {li + 1}/{len(self.levels)}"
            base = state.stage_start(stage)
            refiner = LevelRefiner(problem, base[None], level)
            for losses in refiner.steps():
                pose = refiner.poses()[0].detach()
                if math.isfinite(float(losses[0])):
                    state.record(float(losses[0]), pose, stage)
                    yield
            if refiner.failures[0] is not None:
                state.flag(f"{stage}: {refiner.failures[0]}; kept the best pose")
