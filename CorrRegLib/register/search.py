"""Global searches that stay in the plausible region: a rotation grid with exhaustive in-plane
matching, the refinement of its candidates, and bounded CMA-ES.

The grid renders the CT on a canvas larger than the detector (by ``grid_shift`` of its width on
every side) at every rotation of ``grid_rotations_deg``^3 and depth of ``grid_depths``, and finds
for each the in-plane position of the isocenter that best matches the X-ray by masked NCC over
all shifts at once (matching.py). The best distinct poses become candidates; they are refined
together at coarse levels and ranked by the verification score, best first, in
``state.candidates``; the pipeline's attempts then take them in turn.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..geometry import Camera, geodesic_distance, random_perturbations
from ..similarity import image_gradients
from .bounds import SearchSpace
from .matching import masked_ncc_map
from .options import Level
from .problem import grow
from .refine import LevelRefiner
from .state import RunState

Tensor = torch.Tensor

#: Poses rendered per batch in the grid (bounds memory; one batch is one recorded iteration).
GRID_BATCH = 48
#: Depths scanned along the reference ray for each candidate when there are several views.
DEPTH_STEPS = 25


def _canvas_camera(cam: Camera, margin_x: int, margin_y: int) -> Camera:
    """``cam``'s detector extended by ``margin`` pixels on every side (same pixels, same source)."""
    cx, cy = cam.principal_point
    return Camera(cam.sdd, cam.pixel_spacing, (cam.width + 2 * margin_x, cam.height + 2 * margin_y),
                  (cx + margin_x, cy + margin_y))


def _ncc_maps(canvas: Tensor, canvas_mask: Tensor, fixed: Tensor, fov: Tensor | None, similarity: str) -> Tensor:
    """(B, oh, ow) NCC over shifts, of intensities ("ncc") or of both image derivatives
    ("gradient_ncc", averaged) as similarity.gradient_ncc compares them."""
    if similarity == "ncc":
        return masked_ncc_map(canvas, canvas_mask, fixed, fov)
    if similarity != "gradient_ncc":
        raise ValueError(f"the grid search compares 'ncc' or 'gradient_ncc', not {similarity!r}")
    cx, cy = image_gradients(canvas[:, None])
    fx, fy = image_gradients(fixed[None, None])
    # derivatives across a mask's border are artefacts: erode both masks by a pixel
    cm = 1.0 - grow(1.0 - canvas_mask[:, None], 1)[:, 0]
    fm = None if fov is None else 1.0 - grow(1.0 - fov[None, None], 1)[0, 0]
    return 0.5 * (masked_ncc_map(cx[:, 0], cm, fx[0, 0], fm) + masked_ncc_map(cy[:, 0], cm, fy[0, 0], fm))


class GridSearch:
    """Rotation grid x depths, exhaustive in-plane matching; leaves raw candidates in the state."""

    name = "grid search"

    def __init__(self, rotations_deg: Sequence[float], depths: Sequence[float], level: Level, shift: float,
                 keep: int) -> None:
        self.rotations = tuple(float(r) for r in rotations_deg)
        self.depths = tuple(float(d) for d in depths)
        self.level = level
        self.shift = float(shift)
        self.keep = int(keep)

    def _grid(self) -> list[tuple[float, float, float, float]]:
        return [(rx, ry, rz, d) for d in self.depths for rx, ry, rz in itertools.product(self.rotations, repeat=3)]

    def planned(self, problem) -> int:
        multi = 4 * self.keep if len(problem.views) > 1 else 0
        return math.ceil(len(self._grid()) / GRID_BATCH) + multi

    def run(self, problem, state: RunState) -> Iterator[None]:
        base = state.stage_start(self.name)
        space = SearchSpace(base, problem.bounds, problem.options.max_rotation_deg)
        cam = problem.level_camera(0, self.level)
        factor = problem.views[0].camera.width / cam.width
        mx, my = round(self.shift * cam.width), round(self.shift * cam.height)
        canvas_cam = _canvas_camera(cam, mx, my)
        proj = problem.projector(0, self.level, canvas_cam)
        fixed, fov = problem.fixed(0, cam)
        x0 = space.coords(base)[0]
        u0, v0, d0 = float(x0[3]), float(x0[4]), float(x0[5])
        (_, _, _, lu, lv, ld), (_, _, _, hu, hv, hd) = space.lower, space.upper
        # Shifts s of the anatomy (level pixels): offset p puts X-ray pixel 0 on canvas pixel p,
        # i.e. the X-ray shows the canvas moved by s = margin - p.
        oh, ow = 2 * my + 1, 2 * mx + 1
        su = (mx - torch.arange(ow, dtype=torch.float64)) * factor
        sv = (my - torch.arange(oh, dtype=torch.float64)) * factor
        u_new, v_new = u0 + su[None, :], v0 + sv[:, None]
        allowed = (u_new >= lu) & (u_new <= hu) & (v_new >= lv) & (v_new <= hv)
        sim = problem.similarity_name(self.level.similarity or "ncc")
        found = []  # (score, x)
        best_inverted = -2.0  # the best match of the X-ray with its polarity reversed (-NCC): evidence
        grid = self._grid()
        for start in range(0, len(grid), GRID_BATCH):
            chunk = grid[start:start + GRID_BATCH]
            x = torch.tensor([[rx, ry, rz, u0, v0, float(np.clip(d * d0, ld, hd))] for rx, ry, rz, d in chunk],
                             dtype=torch.float64)
            poses = space.pose(x)
            with torch.no_grad():
                canvas = proj(poses.float())[:, 0]
                canvas_mask = problem.roi(canvas[:, None], None)[:, 0]
                ncc = _ncc_maps(canvas, canvas_mask, fixed[0, 0], None if fov is None else fov[0, 0], sim)
            ok = allowed.to(ncc.device)[None]
            inverted = torch.where(ok & (ncc > -1.0), -ncc, torch.full_like(ncc, -2.0))
            best_inverted = max(best_inverted, float(inverted.max()))
            ncc = torch.where(ok, ncc, torch.full_like(ncc, -2.0)).cpu().double()
            best, where = ncc.flatten(1).max(1)
            for i in range(len(chunk)):
                k = int(where[i])
                xi = x[i].clone()
                xi[3], xi[4] = u0 + float(su[k % ow]), v0 + float(sv[k // ow])
                found.append((float(best[i]), xi))
            k = int(best.argmax())
            state.record(1.0 - float(best[k]), space.pose(found[start + k][1][None])[0], self.name)
            yield
        found.sort(key=lambda t: -t[0])
        state.search_scores = {"best": found[0][0], "best_inverted": best_inverted}
        poses = space.pose(torch.stack([xi for _, xi in found]))
        ranked = [(s, poses[i]) for i, (s, _) in enumerate(found)]
        if len(problem.views) > 1:  # the reference view fixes direction, not depth: ask the others
            ranked = yield from self._depth_along_the_ray(problem, state, space, found, ranked)
        state.candidates = distinct(ranked, problem.isocenter, self.keep)

    def _depth_along_the_ray(self, problem, state: RunState, space: SearchSpace, found, ranked):
        """Several views: for the best distinct candidates of the reference view, scan the
        isocenter's depth along its ray and score every view together; re-ranked (score, pose)."""
        top = distinct(ranked, problem.isocenter, 4 * self.keep)
        index = {id(p): i for i, (_, p) in enumerate(ranked)}
        lo, hi = space.lower[5], space.upper[5]
        depths = torch.linspace(float(lo), float(hi), DEPTH_STEPS, dtype=torch.float64)
        sim = self.level.similarity or "ncc"
        out = []
        for _, pose in top:
            x = found[index[id(pose)]][1].clone()
            xs = x.repeat(DEPTH_STEPS, 1)
            xs[:, 5] = depths
            poses = space.pose(xs)
            with torch.no_grad():
                score, _ = problem.similarity(poses, self.level, sim)
            score = torch.where(problem.bounds.contains(poses).to(score.device), score, torch.full_like(score, -2.0))
            k = int(score.argmax())
            out.append((float(score[k]), poses[k]))
            state.record(1.0 - float(score[k]), poses[k], self.name)
            yield
        out.sort(key=lambda t: -t[0])
        return out


def _close(p: Tensor, q: Tensor, isocenter: Tensor, min_deg: float, min_mm: float) -> bool:
    """Whether poses ``p`` and ``q`` differ by less than ``min_deg`` of rotation and ``min_mm`` of
    isocenter position."""
    iso = isocenter.reshape(1, 3).double()
    rot, _ = geodesic_distance(p, q)
    move = (p[:3, :3] @ iso.T + p[:3, 3:] - (q[:3, :3] @ iso.T + q[:3, 3:])).norm()
    return float(rot) < min_deg and float(move) < min_mm


def distinct(ranked: list[tuple[float, Tensor]], isocenter: Tensor, keep: int, min_deg: float = 12.0,
             min_mm: float = 15.0) -> list[tuple[float, Tensor]]:
    """The first ``keep`` of a ranked list of (score, pose) that differ from every earlier kept one
    by at least ``min_deg`` of rotation or ``min_mm`` of isocenter position (non-maximum suppression)."""
    kept: list[tuple[float, Tensor]] = []
    for s, p in ranked:
        if not any(_close(p, q, isocenter, min_deg, min_mm) for _, q in kept):
            kept.append((s, p))
            if len(kept) >= keep:
                break
    return kept


#: Refined local starts that place the CT's bone within this distance of each other
#: (Problem.bone_move, mm, depth included) ended in one basin. Measured on the bone, not as angles:
#: on the wrist the starts that reached the radius lay within 4 mm of each other after the coarse
#: levels though turned up to 23 deg about its shaft, which a thin bone barely shows
#: (docs/registration.md). Depth counts: one view barely tells the radius 30 mm deeper from the
#: right pose, and those are different results.
BASIN_MM = 6.0


def basins(ranked: list[tuple[float, Tensor]], distance: Callable[[Tensor, Tensor], float],
           tolerance_mm: float) -> list[tuple[float, Tensor]]:
    """The best pose of each basin of a ranked list of (score, pose): every pose at least
    ``tolerance_mm`` (``distance(p, q)``, e.g. Problem.bone_move) from each earlier kept one
    starts a basin."""
    kept: list[tuple[float, Tensor]] = []
    for s, p in ranked:
        if all(distance(p, q) >= tolerance_mm for _, q in kept):
            kept.append((s, p))
    return kept


class LocalStarts:
    """Candidates around the start: the start itself and ``count`` others, each turned by ``deg``
    about a random axis through the isocenter and moved ``mm`` in a random direction (reference
    camera frame; seeded). CandidateRefinement then refines them together, measures how many end
    in each basin (RunState.agreement) and by how much each basin beats the next
    (RunState.rank_margins)."""

    name = "local starts"

    def __init__(self, count: int, deg: float, mm: float, seed: int) -> None:
        self.count, self.deg, self.mm, self.seed = int(count), float(deg), float(mm), int(seed)

    def planned(self, problem) -> int:
        return 0

    def run(self, problem, state: RunState) -> Iterator[None]:
        base = state.stage_start(self.name)
        poses = [base] + random_perturbations(base, problem.isocenter, self.count, self.deg, self.mm, self.seed)
        inside = problem.bounds.contains(torch.stack(poses))
        state.candidates = [(0.0, p) for p, ok in zip(poses, inside.tolist()) if ok] or [(0.0, base)]
        state.local_starts = len(state.candidates)
        return iter(())


class CandidateRefinement:
    """Refine every candidate together at coarse levels, then rank them by verification score."""

    name = "candidates"

    def __init__(self, levels: Sequence[Level], verifier, rank_similarity: str | None = None) -> None:
        self.levels = tuple(levels)
        self.verifier = verifier
        #: for a CT that holds only bone: None, the verifier's ranking score (the bone-only
        #: similarity); a name, that similarity as named. A whole CT is ranked by the verifier's NCC.
        self.rank_similarity = rank_similarity

    def planned(self, problem) -> int:
        return sum(lv.max_iterations for lv in self.levels)

    def rank(self, problem, poses: Tensor) -> Tensor:
        """(B,) ranking scores of reference-view poses (B, 4, 4), higher better."""
        return self.verifier.scores(problem, poses, self.rank_similarity if problem.bone_only else None)

    def run(self, problem, state: RunState) -> Iterator[None]:
        if not state.candidates:
            return
        poses = torch.stack([p for _, p in state.candidates])
        for li, level in enumerate(self.levels):
            stage = f"{self.name} level {li + 1}/{len(self.levels)}"
            state.stage_start(stage)
            refiner = LevelRefiner(problem, poses, level)
            for losses in refiner.steps():
                k = int(losses.argmin())
                if math.isfinite(float(losses[k])):
                    state.record(float(losses[k]), refiner.poses()[k].detach(), stage)
                    yield
            poses = refiner.best_poses
        scores = self.rank(problem, poses)
        state.ranking = lambda finished: self.rank(problem, finished)  # the runoff's judge (Pipeline)
        order = sorted(range(len(poses)), key=lambda i: -float(scores[i]))
        # candidates that converged into one basin are one candidate: later attempts try others
        state.candidates = basins([(float(scores[i]), poses[i]) for i in order], problem.bone_move, BASIN_MM)
        # the share of the refined poses that ended in each kept candidate's basin
        state.agreement = [sum(problem.bone_move(p, q) < BASIN_MM for p in poses) / len(poses)
                           for _, q in state.candidates]
        # how much more of the images the next basin leaves unexplained (ranking loss 1 - score,
        # relative), how far from this one it places the bone, and how much of that the views
        # see across their axes
        state.rank_margins = [((1.0 - s2) / max(1.0 - s1, 1e-9) - 1.0, problem.bone_move(p1, p2),
                               problem.bone_shift(p1, p2))
                              for (s1, p1), (s2, p2) in zip(state.candidates, state.candidates[1:])]


class TakeCandidate:
    """Start from the k-th ranked candidate (no iterations of its own)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"candidate {k + 1}"

    def planned(self, problem) -> int:
        return 0

    def available(self, state: RunState) -> bool:
        return self.k < len(state.candidates)

    def run(self, problem, state: RunState) -> Iterator[None]:
        state.stage_start(self.name)
        state.best_pose = state.candidates[self.k][1].clone()
        state.taken = self.k
        return iter(())


class CmaesSearch:
    """CMA-ES in the bounded coordinates of bounds.SearchSpace (it cannot leave the region),
    the whole population rendered in one batch at ``level``."""

    name = "cmaes"

    def __init__(self, sigma: Sequence[float], population: int, generations: int, level: Level,
                 similarity: str, seed: int) -> None:
        self.sigma = tuple(float(s) for s in sigma)  # degrees x 3, mm x 3
        self.population = int(population)
        self.generations = int(generations)
        self.level = level
        self.similarity = similarity
        self.seed = int(seed)

    def planned(self, problem) -> int:
        return self.generations

    def run(self, problem, state: RunState) -> Iterator[None]:
        import cma

        base = state.stage_start(self.name)
        space = SearchSpace(base, problem.bounds, problem.options.max_rotation_deg)
        x0 = space.coords(base)[0].numpy()
        fx, fy = problem.views[0].camera.intrinsics()[0, 0].item(), problem.views[0].camera.intrinsics()[1, 1].item()
        depth = max(1e-6, float(x0[5]))
        stds = [*self.sigma[:3], self.sigma[3] * fx / depth, self.sigma[4] * fy / depth, self.sigma[5]]
        # keep the start strictly inside the box (cma refuses a start on its bounds)
        span = space.upper - space.lower
        x0 = np.clip(x0, space.lower + 1e-6 * span, space.upper - 1e-6 * span)
        es = cma.CMAEvolutionStrategy(
            x0.tolist(), 1.0,
            {"CMA_stds": stds, "bounds": [space.lower.tolist(), space.upper.tolist()], "popsize": self.population,
             "seed": self.seed + 1, "maxiter": self.generations, "verbose": -9, "tolfun": 1e-5},
        )
        while not es.stop():
            xs = es.ask()
            poses = space.pose(torch.as_tensor(np.asarray(xs), dtype=torch.float64))
            with torch.no_grad():
                score, shows = problem.similarity(poses, self.level, self.similarity)
                losses = (1.0 - score).double().cpu()
                empty = ~shows
                losses = torch.where(empty | ~torch.isfinite(losses), torch.full_like(losses, 2.0), losses)
            values = losses.numpy()
            es.tell(xs, values.tolist())
            k = int(values.argmin())
            state.record(float(values[k]), poses[k], self.name)
            yield
