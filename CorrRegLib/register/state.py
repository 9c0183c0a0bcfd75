"""A run's mutable state: the best pose so far, the history, flags and messages; the stage protocol.

Losses are comparable only within one stage (each has its own similarity and resolution), so a
stage restarts the tracking from the best pose the previous one left (``stage_start``) and every
pose it records competes only with its own. Poses outside the plausible region are never kept.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

import torch

Tensor = torch.Tensor


class RegistrationCancelled(Exception):
    """Raised inside a stage when a cancel was asked for mid-iteration; the session ends the run
    keeping the best pose recorded before it."""


class RunState:
    """Best-pose tracking of one registration run (reference-view poses, float64, CPU)."""

    def __init__(self, initial_pose: Tensor, bounds) -> None:
        self.initial_pose = initial_pose.detach().cpu().double().clone()
        self.bounds = bounds
        self.best_pose = self.initial_pose.clone()
        self.best_loss = math.inf
        self.stage = "ready"
        self.prefix = ""  # "attempt 2: " during a second attempt (stage names, history)
        self.iteration = 0
        self.history: list[dict] = []
        self.flagged = False
        self.messages: list[str] = []
        self.cancelled = False
        #: ranked (score, pose) starting points left by a global search, best first
        self.candidates: list[tuple[float, Tensor]] = []
        #: per candidate: the share of the refined candidates that ended in its basin
        self.agreement: list[float] = []
        #: per candidate but the last: (how much higher the next one's ranking loss is, relative;
        #: how far apart the two place the bone, mm; how much of that the views see across their axes)
        self.rank_margins: list[tuple[float, float, float]] = []
        #: scores finished poses (B, 4, 4) as the candidates were ranked (set by CandidateRefinement)
        self.ranking = None
        #: how many local starts were refined (0: none ran) and which candidate the attempt took
        self.local_starts = 0
        self.taken = 0
        #: the verification of the kept result (verify.Evidence), when the pipeline verifies
        self.evidence = None
        #: what the grid search's best matches scored, with the X-ray as given and reversed
        self.search_scores: dict[str, float] = {}

    def stage_start(self, stage: str) -> Tensor:
        """Enter a stage; returns its base pose (the best pose so far)."""
        self.stage = self.prefix + stage
        self.best_loss = math.inf
        return self.best_pose.clone()

    def restart(self, pose: Tensor, prefix: str) -> None:
        """Begin another attempt from ``pose`` (stage names and history carry ``prefix``)."""
        self.prefix = prefix
        self.best_pose = pose.detach().cpu().double().clone()
        self.best_loss = math.inf

    def record(self, loss: float, pose: Tensor, stage: str | None = None) -> None:
        """Count one iteration; keep ``pose`` if it is plausible and the stage's best so far."""
        self.iteration += 1
        self.history.append({"iteration": self.iteration, "stage": self.prefix + (stage or self.stage_name), "loss": loss})
        if math.isfinite(loss) and loss < self.best_loss:
            pose = pose.detach().cpu().double().reshape(4, 4)
            if bool(self.bounds.contains(pose[None])[0]):
                self.best_loss = loss
                self.best_pose = pose.clone()

    @property
    def stage_name(self) -> str:
        return self.stage[len(self.prefix):] if self.stage.startswith(self.prefix) else self.stage

    def flag(self, message: str) -> None:
        self.flagged = True
        self.messages.append(message)


class Stage(Protocol):
    """One step of a pipeline: a generator that yields after every iteration it records."""

    name: str

    def planned(self, problem) -> int:
        """Upper bound on the iterations this stage records (for progress bars)."""
        ...

    def run(self, problem, state: RunState) -> Iterator[None]:
        ...
