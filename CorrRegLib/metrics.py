"""Accuracy metrics of DESIGN.md, all in mm (angles in degrees)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .geometry import Camera, detector_points_mm, geodesic_distance, transform_points

Tensor = torch.Tensor

SUCCESS_THRESHOLDS_MM = (10.0, 2.0, 1.0)


def mtre(pose_est: Tensor, pose_true: Tensor, targets_ct: Tensor) -> Tensor:
    """Mean target registration error: mean over targets of |T_est p - T_true p| (mm)."""
    d = transform_points(pose_est.double(), targets_ct.double()) - transform_points(pose_true.double(), targets_ct.double())
    return d.norm(dim=-1).mean(-1)


def mpd(camera: Camera, pose_est: Tensor, pose_true: Tensor, targets_ct: Tensor) -> Tensor:
    """Mean projection distance on the detector plane (mm) between targets under both poses."""
    a = detector_points_mm(camera, pose_est.double(), targets_ct.double())
    b = detector_points_mm(camera, pose_true.double(), targets_ct.double())
    return (a - b).norm(dim=-1).mean(-1)


def rotation_translation_error(pose_est: Tensor, pose_true: Tensor, isocenter_ct: Tensor) -> tuple[Tensor, Tensor]:
    """Geodesic rotation error (deg) and the displacement of the isocenter (mm)."""
    angle, _ = geodesic_distance(pose_est.double(), pose_true.double())
    iso = isocenter_ct.double().reshape(1, 3)
    shift = (transform_points(pose_est.double(), iso) - transform_points(pose_true.double(), iso)).norm(dim=-1)[..., 0]
    return angle, shift


def success_rates(errors_mm: Sequence[float], thresholds: Iterable[float] = SUCCESS_THRESHOLDS_MM) -> dict[float, float]:
    """Share of cases with mTRE strictly below each threshold."""
    e = np.asarray(errors_mm, dtype=float)
    if e.size == 0:
        return {t: float("nan") for t in thresholds}
    return {t: float(np.mean(e < t)) for t in thresholds}


def top_fraction_stats(errors_mm: Sequence[float], fraction: float) -> tuple[float, float]:
    """Mean and standard deviation over the best ``fraction`` of cases (the paper's table)."""
    e = np.sort(np.asarray(errors_mm, dtype=float))
    if e.size == 0:
        return float("nan"), float("nan")
    n = max(1, int(math.ceil(fraction * e.size)))
    best = e[:n]
    return float(best.mean()), float(best.std())


def percentiles(errors_mm: Sequence[float], qs: Iterable[float] = (50, 75, 95)) -> dict[float, float]:
    e = np.asarray(errors_mm, dtype=float)
    return {q: float(np.percentile(e, q)) if e.size else float("nan") for q in qs}


def capture_range(
    initial_mm: Sequence[float], final_mm: Sequence[float], bin_mm: float = 10.0,
    success_mm: float = 2.0, required_rate: float = 0.95,
) -> tuple[list[dict], float]:
    """Success rate per initial-mTRE bin, and the capture range.

    The capture range is the largest initial error below which at least ``required_rate`` of
    the cases (cumulatively, over all bins from zero) succeed at ``success_mm``.
    """
    ini = np.asarray(initial_mm, dtype=float)
    fin = np.asarray(final_mm, dtype=float)
    if ini.shape != fin.shape:
        raise ValueError("initial and final errors must have one entry per case")
    bins = []
    if ini.size == 0:
        return bins, 0.0
    top = bin_mm * math.ceil(ini.max() / bin_mm + 1e-12)
    edges = np.arange(0.0, top + bin_mm / 2, bin_mm)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (ini >= lo) & (ini < hi)
        n = int(sel.sum())
        bins.append({"lo_mm": float(lo), "hi_mm": float(hi), "cases": n,
                     "success_rate": float(np.mean(fin[sel] < success_mm)) if n else float("nan")})
    captured = 0.0
    for b in bins:
        sel = ini < b["hi_mm"]
        if not sel.any():
            continue  # no case starts this close: the range extends over empty leading bins
        if np.mean(fin[sel] < success_mm) >= required_rate:
            captured = b["hi_mm"]
        else:
            break
    return bins, captured


def summarize(initial_mm: Sequence[float], final_mm: Sequence[float]) -> dict:
    """The per-method summary used by the benchmark and the closing notes."""
    sr = success_rates(final_mm)
    out = {"cases": len(final_mm), "sr_10mm": sr[10.0], "sr_2mm": sr[2.0], "sr_1mm": sr[1.0]}
    for frac in (0.5, 0.75, 0.95):
        m, s = top_fraction_stats(final_mm, frac)
        out[f"mtre_top{int(frac * 100)}_mean"] = m
        out[f"mtre_top{int(frac * 100)}_std"] = s
    p = percentiles(final_mm)
    out.update({"mtre_median": p[50], "mtre_p75": p[75], "mtre_p95": p[95]})
    out["initial_mtre_median"] = percentiles(initial_mm, (50,))[50]
    return out
