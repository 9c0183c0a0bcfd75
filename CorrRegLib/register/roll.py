"""Roll about a long bone's own axis: a line search where gradient refinement stalls.

A tubular bone's DRR changes least when the bone turns about its long axis, so the refinement's
steps in that direction fall below the similarity's noise and runs stop wherever their path left
them: on the wrist, 10 biplane restarts in the radius's basin ended 0.4-13 deg apart about the
shaft and under 1.2 deg apart about any other axis (docs/real-data.md). This stage scans that one
rotation at the finest level, fits a parabola to the best three samples, and refines from the
best pose again at that level. It runs only for a CT that holds only bone (Problem.bone_only) and
is elongated (long_axis); every pose it keeps is one it scored, so it cannot lose ground.
"""

from __future__ import annotations

import math
from typing import Iterator

import roma
import torch

from ..geometry import rotation_about_point
from ..volume import BONE_MU_PER_MM, Volume
from .options import Level
from .refine import LevelRefiner
from .state import RunState

Tensor = torch.Tensor


def long_axis(volume: Volume, min_elongation: float = 1.5) -> tuple[Tensor, Tensor] | None:
    """(unit axis, centroid), float64 (3,), in the CT's frame (LPS mm): the first principal axis of
    the bone voxels (denser than volume.BONE_MU_PER_MM) and their centroid; None unless the bone's
    spread along that axis is at least ``min_elongation`` x its spread along the second."""
    index = (volume.data > BONE_MU_PER_MM).nonzero()
    if index.shape[0] < 10:
        return None
    index = index[:: max(1, index.shape[0] // 20000)].double().flip(1)  # (k, j, i) -> (i, j, k)
    points = (torch.cat([index, torch.ones(len(index), 1, dtype=torch.float64)], 1) @ volume.lps_from_index().T)[:, :3]
    centroid = points.mean(0)
    _, spread, axes = torch.linalg.svd(points - centroid, full_matrices=False)
    if float(spread[0]) < min_elongation * float(spread[1]):
        return None
    return axes[0], centroid


def rolled(pose: Tensor, axis: Tensor, centroid: Tensor, degrees: Tensor) -> Tensor:
    """(N, 4, 4): ``pose`` (camera_from_ct) with the CT turned by each of ``degrees`` about ``axis``
    through ``centroid`` (both in the CT's frame)."""
    turns = roma.rotvec_to_rotmat(degrees[:, None].double() * math.pi / 180.0 * axis[None])
    return pose[None] @ rotation_about_point(turns, centroid.expand(len(degrees), 3))


class ShaftRollSearch:
    """Samples of the roll about the bone's long axis within +-``span_deg`` every ``step_deg`` at
    ``level``, the parabola's peak through the best three, then ``level`` refined from the best."""

    name = "roll about the long axis"

    def __init__(self, level: Level, span_deg: float, step_deg: float) -> None:
        self.level = level
        self.span_deg, self.step_deg = float(span_deg), float(step_deg)

    def planned(self, problem) -> int:
        if self.step_deg <= 0 or not problem.bone_only:
            return 0
        return 2 * int(self.span_deg // self.step_deg) + 2 + self.level.max_iterations

    def run(self, problem, state: RunState) -> Iterator[None]:
        found = long_axis(problem.volume) if problem.bone_only and self.step_deg > 0 else None
        if found is None:
            return
        axis, centroid = found
        base = state.stage_start(self.name)
        steps = int(self.span_deg // self.step_deg)
        degrees = torch.arange(-steps, steps + 1, dtype=torch.float64) * self.step_deg
        with torch.no_grad():
            scores, _ = problem.similarity(rolled(base, axis, centroid, degrees), self.level)
        s = scores.detach().double().cpu()
        k = min(max(int(s.argmax()), 1), len(s) - 2)
        y0, y1, y2 = (float(v) for v in s[k - 1:k + 2])
        curvature = y0 - 2 * y1 + y2
        peak = float(degrees[k]) + (0.5 * (y0 - y2) / curvature * self.step_deg if curvature < 0 else 0.0)
        tried = torch.cat([degrees, torch.tensor([peak], dtype=torch.float64)])
        poses = rolled(base, axis, centroid, tried)
        with torch.no_grad():
            peak_score, _ = problem.similarity(poses[-1:], self.level)
        for loss, pose in zip((1.0 - torch.cat([s, peak_score.double().cpu()])).tolist(), poses):
            state.record(loss, pose)  # keeps the best plausible one; offset 0 is the base itself
        yield
        refiner = LevelRefiner(problem, state.best_pose[None], self.level)
        for losses in refiner.steps():
            if math.isfinite(float(losses[0])):
                state.record(float(losses[0]), refiner.poses()[0].detach())
                yield
