"""Verification: is a registered pose right? Evidence that does not depend on the renderer.

An absolute similarity does not transfer: at the true pose the NCC of our own simulated X-rays is
0.996-0.998, of nanodrr's 0.993-0.996, of a real radiograph lower still, and a pose a vertebra
off scores 0.97 on the phantom. What transfers is *consistency*: if the X-ray is the DRR at the
pose ``p`` up to an intensity mapping and independent noise (X = a D(p) + N), then moving the pose
by a small ``d`` lowers the similarity exactly as fast as the DRR decorrelates from itself:

    S(X, D(p + d)) ~= S(X, D(p)) * S(D(p), D(p + d))        (for NCC-like S)

whatever ``a`` and the noise are. The ratio of the observed fall to the predicted one, kappa, is
about 1 at a registered pose and far below it at a partial alignment, where the X-ray does not
hold the DRR's fine structure (a vertebra off, a rotated optimum, a reversed polarity).
Measured on gradient NCC at 64 px for 12 moves of 3 mm / 2 deg (docs/registration.md):
registered poses 0.95-1.02 on three renderers; wrong local optima below 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..geometry import euler_to_rotation, rotation_about_point, transform_points
from ..similarity import get_similarity
from .options import Level

Tensor = torch.Tensor


@dataclass
class Evidence:
    """What verification measured at one pose; ``score`` orders attempts (higher is better)."""

    score: float
    verified: bool
    features: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-able: verified, score and the features."""
        return {"verified": self.verified, "score": self.score, **self.features}

    def describe(self) -> str:
        f = self.features
        ncc = f", NCC {f['ncc']:.3f}" if "ncc" in f else ""
        return (f"consistency {f.get('consistency', float('nan')):.2f} (registered poses score about 1), "
                f"gradient NCC {f.get('gradient_ncc', float('nan')):.3f}{ncc}")


def _perturbations(pose: Tensor, isocenter: Tensor, shift_mm: float, turn_deg: float) -> Tensor:
    """(12, 4, 4): ``pose`` moved +-shift_mm along each camera axis and turned +-turn_deg about each
    axis through the isocenter."""
    centre = transform_points(pose, isocenter.reshape(1, 3))[0]
    out = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            t = torch.zeros(3, dtype=torch.float64)
            t[axis] = sign * shift_mm
            out.append(rotation_about_point(torch.eye(3, dtype=torch.float64), centre, t) @ pose)
            e = torch.zeros(3, dtype=torch.float64)
            e[axis] = sign * turn_deg
            out.append(rotation_about_point(euler_to_rotation(e), centre) @ pose)
    return torch.stack(out)


def consistency(problem, pose: Tensor, similarity: str, level: Level, shift_mm: float,
                turn_deg: float) -> tuple[float, float, float, float]:
    """(score S(X, D(pose)), kappa, falls, pixels): kappa is the observed fall of the score over 12
    small moves divided by the fall predicted from the DRR's self-similarity (module docstring),
    falls the share of moves that lower the score, pixels the compared region's size (the
    smallest over views); scores averaged over views. kappa is -inf where the score is not
    positive (nothing to be consistent with)."""
    sim = get_similarity(similarity)
    poses = torch.cat([pose[None], _perturbations(pose, problem.isocenter, shift_mm, turn_deg)])
    s_all, c_all, pixels = 0.0, 0.0, math.inf
    with torch.no_grad():
        for v in range(len(problem.views)):
            drr = problem.render(poses, v, level)
            fixed, fov = problem.fixed(v, problem.level_camera(v, level))
            # one region for every move: the comparison is like for like
            roi = problem.roi(drr[:1], fov, cut=problem.cut_shadow(poses[:1], v, level))
            pixels = min(pixels, float(roi.sum()))
            s_all = s_all + sim(fixed, drr, roi).double().cpu()
            c_all = c_all + sim(drr[:1], drr[1:], roi).double().cpu()
    s, c = s_all / len(problem.views), c_all / len(problem.views)
    s0 = float(s[0])
    falls = float((s[1:] < s0).double().mean())
    if not (math.isfinite(s0) and s0 > 0):
        return s0 if math.isfinite(s0) else -1.0, -math.inf, falls, pixels
    predicted = float((s0 * (1.0 - c)).clamp_min(0).sum())
    observed = float((s0 - s[1:]).sum())
    kappa = observed / max(predicted, 1e-9)
    return s0, kappa if math.isfinite(kappa) else -math.inf, falls, pixels


#: kappa above this is not a registration either: the score falls faster than the DRR itself
#: decorrelates, which only chance does (registered poses score 0.93-1.06).
KAPPA_MAX = 1.5
#: At least this share of the 12 moves must lower the score (registered poses: 11 or 12).
FALLS_MIN = 0.75
#: The score must stand this many standard errors of a chance correlation (1 / sqrt(pixels))
#: above zero: a noise image's consistency is noise.
SIGNIFICANCE = 5.0


class Verifier:
    """Judges a pose by its consistency (gradient NCC at ``level``); ``bar`` None: never refuses.

    Verified: the gradient NCC is significant (SIGNIFICANCE / sqrt(pixels) and at least 0.05),
    ``bar`` <= kappa <= KAPPA_MAX, and at least FALLS_MIN of the moves lower the score.
    """

    def __init__(self, level: Level, bar: float | None, shift_mm: float = 3.0, turn_deg: float = 2.0) -> None:
        self.level = level
        self.bar = bar
        self.shift_mm, self.turn_deg = shift_mm, turn_deg

    def scores(self, problem, poses: Tensor, similarity: str | None = None) -> Tensor:
        """(B,) NCC of X-ray and DRR at ``level`` (the bone-only similarity for a bone-only CT; views
        averaged; -1 where non-finite): ranks candidates. ``similarity``: that one instead, as asked
        also for a bone-only CT."""
        out = []
        with torch.no_grad():
            for start in range(0, poses.shape[0], 32):
                s, _ = problem.similarity(poses[start:start + 32], self.level,
                                          similarity or self.level.similarity or "ncc", as_asked=similarity is not None)
                out.append(s.detach().double().cpu())
        s = torch.cat(out)
        return torch.where(torch.isfinite(s), s, torch.full_like(s, -1.0))

    def evidence(self, problem, pose: Tensor) -> Evidence:
        pose = pose.detach().cpu().double().reshape(4, 4)
        grad, kappa, falls, pixels = consistency(problem, pose, "gradient_ncc", self.level, self.shift_mm,
                                                 self.turn_deg)
        floor = max(0.05, SIGNIFICANCE / math.sqrt(max(pixels, 1.0)))
        features = {"gradient_ncc": grad, "consistency": kappa, "falls": falls, "significance_floor": floor}
        if not problem.bone_only:  # a bone-only CT is ranked on gradient NCC (grad): no intensity NCC to report
            features["ncc"] = float(self.scores(problem, pose[None])[0])
        plausible = grad >= floor and kappa <= KAPPA_MAX and falls >= FALLS_MIN
        verified = self.bar is None or (plausible and kappa >= self.bar)
        # attempts are ranked by consistency, an implausible one below every plausible one
        score = kappa if plausible else min(kappa, 0.0) - 1.0
        return Evidence(score if math.isfinite(score) else -math.inf, verified, features)
