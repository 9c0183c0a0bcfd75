"""Pictures of a registration: DRR edges over the X-ray, and convergence curves.

matplotlib is an optional dependency (``pip install corrreg[plot]``); without it these
functions raise an ImportError that says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'corrreg[plot]'") from err
    return plt


def _normalise(img: Tensor | np.ndarray) -> np.ndarray:
    a = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float64)
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def edge_map(img: Tensor | np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """Boolean map of the strongest edges (Sobel magnitude above a quantile of the pixels that
    have any: a DRR of one bone is flat almost everywhere, and its edges are those of the bone)."""
    from .similarity import image_gradients

    t = torch.as_tensor(np.asarray(_normalise(img)), dtype=torch.float32)[None, None]
    gx, gy = image_gradients(t)
    mag = (gx.square() + gy.square()).sqrt()[0, 0].numpy()
    some = mag[mag > 1e-6 * max(float(mag.max()), 1e-12)]
    return mag > (np.quantile(some, quantile) if some.size else np.inf)


def overlay_rgb(xray, drr, color=(1.0, 0.2, 0.1)) -> np.ndarray:
    """(H, W, 3) image: the X-ray in grey with the DRR's edges painted in ``color``."""
    base = _normalise(xray)
    rgb = np.repeat(base[..., None], 3, axis=-1)
    edges = edge_map(drr)
    rgb[edges] = 0.35 * rgb[edges] + 0.65 * np.asarray(color)
    return rgb


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write and close a figure."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_overlay(path: str | Path, xray, drr_before, drr_after, title: str = "", names: Sequence[str] | None = None,
                 masks: Sequence | None = None) -> Path:
    """PNG of DRR edges over the X-ray before and after registration, side by side; with lists
    (several views) one row per view, named by ``names``. Pixels outside a view's mask (its field
    of view) are darkened."""
    many = isinstance(xray, (list, tuple))
    xrays, befores, afters = (list(v) if many else [v] for v in (xray, drr_before, drr_after))
    masks = list(masks) if masks is not None else [None] * len(xrays)
    plt = _pyplot()
    fig, axes = plt.subplots(len(xrays), 2, figsize=(9, 4.8 * len(xrays)), dpi=110, squeeze=False)
    for row, (x, before, after, mask) in enumerate(zip(xrays, befores, afters, masks)):
        for ax, drr, label in zip(axes[row], (before, after), ("initial pose", "registered pose")):
            rgb = overlay_rgb(x, drr)
            if mask is not None:
                rgb[~np.asarray(mask, dtype=bool)] *= 0.35
            ax.imshow(rgb, interpolation="nearest")
            prefix = f"{names[row]}, " if names else ""
            ax.set_title(f"{prefix}{label}: DRR edges (red) on the X-ray", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_convergence(path: str | Path, history: Sequence[dict], title: str = "") -> Path:
    """Loss against iteration, one colour per stage. Intensity losses (1 - similarity) share a
    log axis; the network's score has its own scale, so it gets its own (right) axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    stages: dict[str, list[tuple[int, float]]] = {}
    for h in history:
        stages.setdefault(h["stage"], []).append((h["iteration"], h["loss"]))
    net_ax = None
    for i, (name, pts) in enumerate(stages.items()):
        it, loss = zip(*pts)
        target = ax
        if name == "network":
            net_ax = net_ax or ax.twinx()
            net_ax.set_ylabel("network score (lower is better)")
            target = net_ax
        target.plot(it, loss, ".-", ms=3, lw=1, label=name, color=f"C{i}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (1 - similarity)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if net_ax is not None:
        extra = net_ax.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
