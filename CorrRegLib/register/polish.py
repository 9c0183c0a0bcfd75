"""Polish: L-BFGS to convergence at the finest level, for a CT that holds only bone.

Adam at a fixed step (refine.LevelRefiner) stops where its step and patience run out. Along a
direction the images barely constrain, such as the roll of a long bone about its own shaft, that
is wherever the path happened to be: on the wrist's radius, ten biplane starts around one pose
ended -4.7 to +3.4 deg apart about the shaft. The score there is smooth but nearly flat, which is
what a quasi-Newton method with a line search resolves and a first-order one does not.

The stage scores ``options.bone_only_polish`` (off by default; "bandpass_ncc" for the wrist, an
intensity similarity taken as named, not replaced by the bone-only edge similarity): on the radius
its optimum is a peak where the edge similarity keeps rising along the roll. Being an intensity
similarity it is also pulled by what the CT does not hold (the phantom's vertebrae moved 2 mm off
their truth), which is why it is not a default (docs/registration.md, "Polish"). The compared
region is held where the CT projects at the round's start pose, so the function L-BFGS sees does
not change under it. Poses are parametrised as in refine.py (mm of arc and mm about the isocenter).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from ..geometry import transform_points
from .options import Level
from .refine import pose_from_params
from .state import RegistrationCancelled, RunState

Tensor = torch.Tensor

#: The region a round holds is framed at its start pose, and where the optimum lies depends on it
#: (on the wrist, 256 px results polished again by a problem of their own, region and grid framed
#: there, moved by up to 1.3 deg in roll). So the polish repeats, framing the region again at each
#: round's result, until a round moves the pose by less than ROUND_TOLERANCE_MM (mm of arc or mm),
#: at most POLISH_ROUNDS times: the result is then a pose that is optimal in its own region,
#: whatever the path to it.
POLISH_ROUNDS = 5
ROUND_TOLERANCE_MM = 0.05
#: Why one view is not polished: it fixes neither the bone's depth nor its roll, and the polish's
#: intensity similarity then runs along them. On the wrist each view alone ended a median 17 and
#: 20.5 mm off the biplane pose across the view and 118 and 166 mm in depth polished, against 4.9
#: and 6.1 mm, 23.6 and 13.4 mm without (docs/real-data.md).
ONE_VIEW = "no polish: one view leaves the bone's depth and roll open, and the polish moved single-view results " \
           "tens of mm along them on the wrist; give two or more views"


class Polish:
    """L-BFGS (strong Wolfe line search) on one pose at ``finest`` (the refinement's finest level)
    rendered ``detector_px`` pixels across the CT (None: the level's own), scoring
    ``options.bone_only_polish``; only for a CT that holds only bone (Problem.bone_only), seen in
    two or more views (ONE_VIEW), and only when that option names a similarity. Skipped where
    ``previous_px`` (the polish before it) gives the same detectors, as on an X-ray too small for
    ``detector_px``. Records every pose it scores
    (the line search's trials too; the state keeps the best plausible one) and yields after each
    round's optimisation, which runs in one call of the optimiser."""

    def __init__(self, finest: Level, detector_px: int | None = None, previous_px: int | None = None) -> None:
        self.level = replace(finest, detector_px=detector_px or finest.detector_px, max_iterations=0)
        self.previous_px = previous_px
        self.name = f"polish {self.level.detector_px} px"

    def _applies(self, problem) -> bool:
        o = problem.options
        if not (problem.bone_only and o.bone_only_polish is not None and o.polish_iterations > 0):
            return False
        if len(problem.views) < 2:  # see ONE_VIEW
            return False
        # the same downsampling factors give the same detectors (Problem.level_camera)
        return self.previous_px is None or any(
            problem.steady_downsample(v, self.level.detector_px) != problem.steady_downsample(v, self.previous_px)
            for v in range(len(problem.views)))

    def planned(self, problem) -> int:
        return POLISH_ROUNDS * (1 + 2 * problem.options.polish_iterations) if self._applies(problem) else 0

    def polish_level(self, problem) -> Level:
        """The level the polish scores: ``options.bone_only_polish`` on detectors whose pixel grid
        does not depend on the start (Problem.steady_downsample). Rendered on the grid the start's
        footprint gives, the optimum moved with it: ten wrist runs ended 4.1 - 6.0 deg apart in
        roll, polished again on one grid 5.3 - 5.5."""
        factors = tuple(problem.steady_downsample(v, self.level.detector_px) for v in range(len(problem.views)))
        return replace(self.level, similarity=problem.options.bone_only_polish, downsample=factors)

    def run(self, problem, state: RunState) -> Iterator[None]:
        if not self._applies(problem):
            return
        for _ in range(POLISH_ROUNDS):
            moved = yield from self._round(problem, state)
            if moved < ROUND_TOLERANCE_MM:
                return

    def _round(self, problem, state: RunState) -> Iterator[None]:
        """One L-BFGS run from the best pose so far, the region held where the CT projects there;
        returns how far the best pose it found moved (the largest parameter, mm of arc or mm)."""
        o = problem.options
        level = self.polish_level(problem)
        base = state.stage_start(self.name)[None]  # losses of another region are not comparable
        centre = transform_points(base, problem.isocenter.reshape(1, 1, 3))[:, 0]
        region = base.clone() if problem.holds_region(level) else None
        params = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
        # one call runs the whole optimisation: L-BFGS's memory and line search stay consistent
        # (stepping it one iteration per call stalled on the wrist, 0.5424 against 0.5390)
        opt = torch.optim.LBFGS([params], lr=1.0, max_iter=o.polish_iterations, max_eval=2 * o.polish_iterations,
                                history_size=10, line_search_fn="strong_wolfe")

        def loss_at(p: Tensor) -> tuple[Tensor, Tensor, bool]:
            poses = pose_from_params(base, centre, p, o.rotation_scale_mm)
            score, shows = problem.similarity(poses, level, level.similarity, as_asked=True, region_poses=region)
            return 1.0 - score.sum(), poses, bool(shows[0])

        # L-BFGS's first step is the gradient scaled to an L1 norm of one when the gradient is
        # larger than that: the loss is scaled so that it is (at the first evaluation, the round's
        # start), making the first step 1 mm (of arc or translation) in all, whatever the
        # similarity's scale; later steps are scale-free.
        scale: list[float] = []
        best = [math.inf, torch.zeros(6, dtype=torch.float64)]

        def closure() -> Tensor:
            if problem.should_stop():
                raise RegistrationCancelled
            opt.zero_grad()
            loss, poses, shows = loss_at(params)
            if not scale:
                grad, = torch.autograd.grad(loss, params, retain_graph=True)
                scale.append(1.0 / max(float(grad.abs().sum()), 1e-12))
            (loss * scale[0]).backward()
            value = float(loss.detach())
            if shows and math.isfinite(value):
                state.record(value, poses[0].detach())  # kept only if plausible and best
                if value < best[0]:
                    best[:] = [value, params.detach()[0].clone()]
            if not torch.isfinite(params.grad).all():  # a step the line search must refuse
                params.grad.zero_()
                return torch.tensor(math.inf, dtype=torch.float64)
            return loss.detach() * scale[0]

        opt.step(closure)
        yield
        return float(best[1].abs().max())
