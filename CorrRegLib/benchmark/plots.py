"""Plots of one cell: cumulative_mtre.png, capture_range.png, gallery.png (needs matplotlib)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..metrics import SUCCESS_THRESHOLDS_MM, capture_range
from ..volume import BONE_MU_PER_MM
from .cases import generate_cases
from .config import BenchmarkSetup


def save_plots(out: Path, setup: BenchmarkSetup, rows: list[dict], methods: Sequence[str], n_cases: int) -> list[str]:
    """cumulative_mtre.png, capture_range.png, gallery.png (needs matplotlib)."""
    from ..visualize import _pyplot, overlay_rgb, save_figure

    plt = _pyplot()
    files = []
    rows = [r for r in rows if r["case"] < n_cases]
    by_m = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["case"]) for m in methods}
    by_m = {m: rs for m, rs in by_m.items() if rs}
    if not by_m:
        return files
    # cumulative mTRE
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    allv = [r["final_mtre_mm"] for r in rows] + [r["initial_mtre_mm"] for r in rows]
    lo = max(1e-3, min(v for v in allv if v > 0) * 0.8) if any(v > 0 for v in allv) else 1e-3
    hi = max(allv) * 1.2 if allv else 100.0
    for m, rs in by_m.items():
        v = np.sort([r["final_mtre_mm"] for r in rs])
        y = np.arange(1, len(v) + 1) / len(v)
        ax.step(np.concatenate([[lo], np.maximum(v, lo)]), np.concatenate([[0], y]), where="post", label=m)
    iv = np.sort(list({r["case"]: r["initial_mtre_mm"] for r in rows}.values()))
    ax.step(np.concatenate([[lo], np.maximum(iv, lo)]), np.concatenate([[0], np.arange(1, len(iv) + 1) / len(iv)]),
            where="post", color="grey", ls="--", label="initial")
    for t in SUCCESS_THRESHOLDS_MM:
        ax.axvline(t, color="k", lw=0.6, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mTRE (mm)")
    ax.set_ylabel("fraction of cases with mTRE <= x")
    ax.set_title(f"protocol {setup.config.protocol}, {n_cases} cases", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "cumulative_mtre.png")
    files.append("cumulative_mtre.png")
    # capture range
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    width = 10.0 / (len(by_m) + 1)
    for k, (m, rs) in enumerate(by_m.items()):
        bins, cap = capture_range([r["initial_mtre_mm"] for r in rs], [r["final_mtre_mm"] for r in rs])
        x = [b["lo_mm"] + width * (k + 0.5) for b in bins]
        y = [b["success_rate"] if b["cases"] else 0.0 for b in bins]
        ax.bar(x, y, width=width, align="edge", label=f"{m} (capture range {cap:g} mm)")
    ax.set_xlabel("initial mTRE (mm), 10 mm bins")
    ax.set_ylabel("success rate (final mTRE < 2 mm)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, out / "capture_range.png")
    files.append("capture_range.png")
    # gallery: best, median, worst case of each method (DRR edges at the final pose on the X-ray)
    from ..projector import Projector

    picks = {}
    for m, rs in by_m.items():
        o = sorted(rs, key=lambda r: r["final_mtre_mm"])
        picks[m] = [("best", o[0]), ("median", o[len(o) // 2]), ("worst", o[-1])]
    needed = sorted({r["case"] for ps in picks.values() for _, r in ps})
    xrays = {c.index: c.xray for c in generate_cases(setup, needed)}
    # Edges of a bone-only DRR: the full DRR's strongest edges are the CT box's borders.
    vol = setup.volume
    bone = replace(vol, data=torch.where(vol.data > BONE_MU_PER_MM, vol.data, torch.zeros_like(vol.data)))
    cam = setup.protocol.camera
    proj = Projector(bone, cam).to(setup.device)
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3.1 * len(picks)), dpi=100, squeeze=False)
    for row_axes, (m, ps) in zip(axes, picks.items()):
        for ax, (label, r) in zip(row_axes, ps):
            pose = torch.tensor(json.loads(r["final_pose"]), dtype=torch.float64).reshape(4, 4)
            with torch.no_grad():
                drr = proj(pose.float().to(setup.device)).reshape(cam.height, cam.width).cpu()
            ax.imshow(overlay_rgb(xrays[r["case"]], drr), interpolation="nearest")
            ax.set_title(f"{m}: {label}, case {r['case']}\nmTRE {r['initial_mtre_mm']:.1f} -> {r['final_mtre_mm']:.2f} mm",
                         fontsize=8)
            ax.axis("off")
    fig.suptitle("edges of the bone DRR (red) at the registered pose on the simulated X-ray", fontsize=9)
    save_figure(fig, out / "gallery.png")
    files.append("gallery.png")
    return files
