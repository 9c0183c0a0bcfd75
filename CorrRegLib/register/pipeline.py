"""Which stages each method runs, and the attempts-until-verified loop that runs them.

A pipeline is a list of attempts, each a list of stages that starts from the initial pose (or
takes a candidate of an earlier global search). After every attempt the result is verified;
the first verified attempt ends the run, otherwise the next one runs, and in the end the
attempt with the best evidence is kept, ``flagged`` when none verified.

| method | attempts |
|---|---|
| intensity | refinement; with ``local_starts``: the start and others around it refined together, then each distinct result in turn |
| cmaes | bounded CMA-ES + refinement |
| network | network descent |
| hybrid | network descent + refinement; then the global search's candidates |
| auto | hybrid with a model for this C-arm, else: the global search's candidates in turn |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .network import NetworkDescent
from .options import RegistrationOptions
from .polish import Polish
from .refine import GradientRefinement
from .search import BASIN_MM, CandidateRefinement, CmaesSearch, GridSearch, LocalStarts, TakeCandidate
from .state import RunState
from .verify import Evidence, Verifier


@dataclass
class Attempt:
    label: str
    stages: list = field(default_factory=list)

    def planned(self, problem) -> int:
        return sum(s.planned(problem) for s in self.stages)

    def available(self, state: RunState) -> bool:
        """Whether the attempt can start (one that begins by taking a candidate needs it to exist)."""
        first = self.stages[0] if self.stages else None
        return getattr(first, "available", lambda _: True)(state)


def finishing(o: RegistrationOptions, levels) -> list:
    """The gradient refinement through ``levels``, then the polish at each of
    ``o.polish_detector_px`` (which runs only for a CT that holds only bone, polish.Polish);
    nothing without levels."""
    if not levels:
        return []
    finest = max(levels, key=lambda lv: lv.detector_px)
    widths = o.polish_detector_px or (finest.detector_px,)
    polish = [Polish(finest, px, widths[k - 1] if k else None) for k, px in enumerate(widths)]
    return [GradientRefinement(levels)] + polish


def candidate_attempts(o: RegistrationOptions, verifier: Verifier | None, search, first_label: str,
                       rank_similarity: str | None = None) -> list[Attempt]:
    """``search`` (a stage that leaves candidates), their refinement together at the candidate
    levels and ranking (a CT of one bone by ``rank_similarity``, default the verifier's score),
    then each candidate refined to the levels finer than those in turn."""
    coarse_px = max(lv.detector_px for lv in o.candidate_levels)
    fine = [lv for lv in o.levels if lv.detector_px > coarse_px] if o.refine else []
    # ranking needs only the verification's scores, not its bar
    stages = [search, CandidateRefinement(o.candidate_levels, verifier or Verifier(o.verify_level, None),
                                             rank_similarity)]
    out = [Attempt(first_label, stages + [TakeCandidate(0)] + finishing(o, fine))]
    for k in range(1, max(1, o.max_attempts)):
        out.append(Attempt(f"candidate {k + 1}", [TakeCandidate(k)] + finishing(o, fine)))
    return out


def global_search_attempts(o: RegistrationOptions, verifier: Verifier, first_label: str = "global search") -> list[Attempt]:
    """Grid search, refinement of its candidates, then each candidate refined to the finest level."""
    grid = GridSearch(o.grid_rotations_deg, o.grid_depths, o.grid_level, o.grid_shift, o.grid_candidates)
    return candidate_attempts(o, verifier, grid, first_label)


def local_start_attempts(o: RegistrationOptions, verifier: Verifier) -> list[Attempt]:
    """The start and ``o.local_starts`` others around it refined together at the candidate levels,
    then each distinct result refined to the finest level in turn."""
    starts = LocalStarts(o.local_starts, o.local_start_deg, o.local_start_mm, o.seed)
    return candidate_attempts(o, verifier, starts, "local starts", o.local_start_ranking)


def build_attempts(method: str, o: RegistrationOptions, verifier: Verifier, network=None) -> list[Attempt]:
    """The attempts of ``method`` ("auto" already resolved to "hybrid" or "search")."""
    refine = finishing(o, o.levels) if o.refine else []
    if o.local_starts < 0:
        raise ValueError(f"local_starts (--local-starts) must be 0 or more, got {o.local_starts}")
    if o.local_starts and method != "intensity":
        asked = "'auto' (its global search)" if method == "search" else repr(method)
        raise ValueError(f"local_starts (--local-starts) refines starts around the initial pose with method "
                         f"'intensity', not {asked}")
    if method == "intensity":
        if o.local_starts > 0:
            return local_start_attempts(o, verifier)
        return [Attempt("intensity", refine)]
    if method == "cmaes":
        cmaes = CmaesSearch(o.cmaes_sigma, o.cmaes_population, o.cmaes_generations, o.cmaes_level,
                            o.cmaes_similarity, o.seed)
        return [Attempt("cmaes", [cmaes] + refine)]
    if method == "search":
        return global_search_attempts(o, verifier)
    descent = NetworkDescent(network, o.network_iterations, o.network_step_deg, o.network_step_mm,
                             o.network_decay, o.network_patience)
    if method == "network":
        return [Attempt("network", [descent])]
    if method == "hybrid":
        stages = [descent]
        if o.hybrid_cmaes:
            stages.append(CmaesSearch(o.hybrid_cmaes_sigma, o.cmaes_population, o.cmaes_generations, o.cmaes_level,
                                      o.cmaes_similarity, o.seed))
        first = Attempt("network", stages + refine)
        if o.fallback_below is None:
            return [first]
        return [first] + global_search_attempts(o, verifier, "global search")[: max(0, o.max_attempts - 1)]
    raise ValueError(f"unknown pipeline {method!r}")


def rival_message(features: dict, n_views: int) -> str:
    """Why a result whose basin barely beats the next is flagged (Pipeline.conclude), naming what
    the images leave open: where the rival lies mostly along the views' axes (one view), its depth."""
    rival, across, margin = features["rival_mm"], features["rival_across_mm"], features["rank_margin"]
    close = f"explains the images almost as well (it leaves {100 * margin:.1f} % more unexplained)"
    if across < BASIN_MM:
        view = "the view" if n_views == 1 else "the views"
        return (f"another pose, {rival:.0f} mm away on the bone but {across:.0f} mm of it across {view} (the rest is "
                f"depth, which {view} see{'s' if n_views == 1 else ''} only as magnification), {close}: the images "
                "do not decide between them, and the overlay cannot show the difference; a second view 60-90 deg "
                "from this one would")
    return (f"another pose, {rival:.0f} mm away on the bone, {close}: the images do not decide between them; "
            "check the overlay, or start closer")


def single_view_message(edges: float, bar: float) -> str:
    """Why a one-view result is flagged when the CT explains little of the image (options.min_single_view_edges)."""
    return (f"one view, and the CT explains little of it (gradient NCC {edges:.2f}, under {bar:g}): what the CT does "
            "not hold (other bones, soft tissue) can pull the pose along the depth and roll that one view leaves "
            "loose, and on real images such results explained their view better than the true pose did, so no "
            "check in this view can confirm it; register with a second view 60-90 deg from this one, calibrated "
            "with it (a second --xray with its --calibration; in Slicer, Second X-ray), or check the pose in another "
            "image")


class Pipeline:
    """Runs attempts until one verifies (see the module docstring)."""

    def __init__(self, attempts: list[Attempt], verifier: Verifier | None, min_agreement: float = 0.0,
                 min_rank_margin: float = 0.0, min_single_view_edges: float | None = None) -> None:
        self.attempts = attempts
        self.verifier = verifier
        self.min_agreement = min_agreement
        self.min_rank_margin = min_rank_margin
        self.min_single_view_edges = min_single_view_edges
        self.done: list[tuple[Evidence, object, float, str, str]] = []  # (evidence, pose, loss, stage, label)
        self.current: Attempt | None = None
        self.concluded = False

    def planned_first(self, problem) -> int:
        return self.attempts[0].planned(problem)

    def run(self, problem, state: RunState, extend_plan) -> Iterator[None]:
        for k, attempt in enumerate(self.attempts):
            if k > 0:
                if not attempt.available(state):
                    break
                state.restart(problem.initial_pose, f"{attempt.label}: ")
                extend_plan(attempt.planned(problem))
            self.current = attempt
            for stage in attempt.stages:
                yield from stage.run(problem, state)
            self.current = None
            if self.verifier is None:
                return
            ev = self._evidence(problem, state)
            self.done.append((ev, state.best_pose.clone(), state.best_loss, state.stage, attempt.label))
            if ev.verified and not self._runoff_due(k, ev):
                break
            if k == 1 and self.done[0][0].verified:  # the runoff's second basin ran: the two decide
                break
        self.conclude(problem, state)

    def _runoff_due(self, k: int, ev: Evidence) -> bool:
        """Whether the first attempt's basin beat the next by under ``min_rank_margin`` at the
        coarse levels, so the next candidate is finished too and the two finished poses decide
        (conclude): a rival that coarse levels leave apart may come back to the same pose (on the
        phantom's one view, a rival 7-10 mm deeper), or stay apart and explain the images as well."""
        margin = ev.features.get("rank_margin")
        return (k == 0 and margin is not None and margin < self.min_rank_margin and len(self.attempts) > 1
                and isinstance(self.attempts[1].stages[0], TakeCandidate))

    def _evidence(self, problem, state: RunState):
        """The verification of the attempt's pose, with the local starts' agreement on it and by
        how much its basin beat the next one."""
        ev = self.verifier.evidence(problem, state.best_pose)
        if state.local_starts and state.taken < len(state.agreement):
            ev.features["agreement"] = state.agreement[state.taken]
            ev.features["local_starts"] = state.local_starts
            if state.taken < len(state.rank_margins):
                margin, rival, across = state.rank_margins[state.taken]
                ev.features.update(rank_margin=margin, rival_mm=rival, rival_across_mm=across)
        return ev

    def _runoff(self, problem, state: RunState):
        """The first two candidates, both finished: the same pose (within BASIN_MM on the bone) ends
        the doubt; apart, the better by the ranking score is kept (the verified one where only one
        is), its margin over the other measured again on the finished poses."""
        first, second = self.done[0], self.done[1]
        apart = problem.bone_move(first[1], second[1])
        if apart < BASIN_MM:
            state.messages.append(f"the next basin, finished too, came back to this pose ({apart:.1f} mm on the bone)")
            for entry in (first, second):
                for key in ("rank_margin", "rival_mm", "rival_across_mm"):
                    entry[0].features.pop(key, None)
            return max((first, second), key=lambda t: t[0].score)
        s1, s2 = (float(x) for x in state.ranking(torch.stack([first[1], second[1]])))
        if first[0].verified != second[0].verified:
            win, lose, sw, sl = (first, second, s1, s2) if first[0].verified else (second, first, s2, s1)
        else:
            win, lose, sw, sl = (first, second, s1, s2) if s1 >= s2 else (second, first, s2, s1)
        win[0].features.update(rank_margin=(1.0 - sl) / max(1.0 - sw, 1e-9) - 1.0, rival_mm=apart,
                               rival_across_mm=problem.bone_shift(win[1], lose[1]))
        state.messages.append(f"the next basin, finished too, stays {apart:.0f} mm away on the bone; kept "
                              f"'{win[4]}'")
        return win

    def conclude(self, problem, state: RunState) -> None:
        """Keep the best attempt (including one cut short by a cancel); say what was checked."""
        if self.verifier is None or self.concluded:
            return
        self.concluded = True
        if self.current is not None:  # cancelled mid-attempt: judge what it reached
            ev = self._evidence(problem, state)
            self.done.append((ev, state.best_pose.clone(), state.best_loss, state.stage, self.current.label))
            self.current = None
        if not self.done:
            return
        best = max(self.done, key=lambda t: t[0].score)
        if (len(self.done) > 1 and best in self.done[:2] and self._runoff_due(0, self.done[0][0])
                and not problem.should_stop()):
            best = self._runoff(problem, state)
        ev, pose, loss, stage, label = best
        state.best_pose, state.best_loss, state.stage = pose.clone(), loss, stage
        state.evidence = ev
        tried = len(self.done)
        agreement, margin = ev.features.get("agreement"), ev.features.get("rank_margin")
        if margin is not None and margin < self.min_rank_margin:
            state.flag(rival_message(ev.features, len(problem.views)))
        if agreement is not None and agreement < self.min_agreement:
            state.flag(f"only {round(agreement * ev.features['local_starts'])} of {ev.features['local_starts']} local "
                       "starts reached this pose: the images leave several poses near the start that a local search "
                       "settles on, so the result depends on the start; check the overlay, or start closer")
        edges = ev.features.get("gradient_ncc")
        if (len(problem.views) == 1 and self.min_single_view_edges is not None and edges is not None
                and edges < self.min_single_view_edges):
            state.flag(single_view_message(edges, self.min_single_view_edges))
        if ev.verified:
            if tried > 1:
                state.messages.append(f"verified after {tried} attempts (kept '{label}': {ev.describe()})")
        else:
            state.flag(f"unverified result: {tried} attempt(s), none verified; kept '{label}' ({ev.describe()}); "
                       "check the overlay")
