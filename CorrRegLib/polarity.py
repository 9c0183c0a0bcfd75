"""Image polarity: is bone bright (a log / line-integral image, as CorrReg's DRR) or dark (a raw
transmission image, as image intensifiers and raw detector read-outs give)?

CorrReg compares X-rays with DRRs, line integrals of attenuation: dense structures bright,
empty space (air) at zero. A raw transmission image I = I0 exp(-L) is the other way round:
air is the brightest part, bone dark.

**Detection** (:func:`detect_polarity`), inside the field-of-view mask (collimator shutters and
the outside of an intensifier disc lie at an extreme of the grey range too, so mask them first):

1. *Air.* What every radiograph of a body shows and bone never is: the unattenuated
   background beside the body. It lies at the air end of the grey range (bright in a raw image,
   dark in a log image) and holds no structure, only noise. Pixels within 10 % of either end
   of the range (1st - 99th percentiles) whose smoothed gradient (sigma 2 px) is no larger than
   pure noise would give (3 x its median, the noise measured locally) are air candidates;
   connected regions of them that reach the edge of the field, or cover 5 % of it, count.
   The end holding at least 3 % of the field and 3 x the other end's share is air:
   ``confidence "high"``. (A plain gradient threshold does not work: in a raw image the
   thick, dense parts are compressed towards zero and look flatter than the noisy air.)
2. *Noise trend.* Without air (an image collimated to the body), quantum noise decides when
   it is clear: in a log image the noise grows with the grey level (std ~ exp(L / 2)), in a
   log image displayed inverted it falls. A rank correlation of noise with grey level of at
   least +0.8 (or at most -0.8) over 8 grey-level bins gives "bright" (or "dark"),
   ``confidence "medium"``. A raw linear image has rising noise too (std ~ sqrt(I)), so a raw
   image without air reads "bright" here: force it with ``mode="dark"`` (``--polarity dark``).
3. Otherwise the image is taken as stored (bright), ``confidence "low"``.

DICOM hints are applied on reading (``io.read_xray``): MONOCHROME1, or a PresentationLUTShape
of INVERSE, means the stored values display inverted, and the pixels are inverted once so that
they read as displayed. Detection then runs on the displayed image.

**Inversion** (:func:`to_bone_bright`): for a raw transmission image the right inverse is the
logarithm, ``-log(I / I_air)`` with I_air the air level (99.5th percentile inside the mask),
which *is* the line integral up to scatter and detector response; a linear ``max - I`` keeps
the exponential compression of thick parts. On the simulated phantom (128 px, raw 8-bit
transmission quantised from CorrReg's simulator, dose 1e4, scatter 0.1) the NCC with the DRR at
the true pose is 0.998 after ``-log`` against 0.947 after the linear inversion (gradient NCC
0.90 against 0.74; ``Testing/Python/test_polarity.py`` checks the ordering). A log image that
is merely displayed inverted needs the linear inversion: ``transform="auto"`` (the default)
uses it when the noise falls clearly with the grey level (step 2's sign), else ``-log``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .fov_mask import _as_image as _np  # (H, W) float64 numpy of a tensor or array, checked

Tensor = torch.Tensor

#: Share of the grey range (1st - 99th percentiles) at either end where air is looked for.
END_BAND = 0.10
#: Smallest share of the field that the air background must cover to decide.
MIN_AIR = 0.03
#: Rank correlation of noise with grey level that decides when no air is in view.
NOISE_TREND = 0.8


def _mask(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    m = _np(mask) > 0
    if m.shape != shape:
        raise ValueError(f"the mask has shape {m.shape} but the image has {shape}")
    if not m.any():
        raise ValueError("the mask excludes every pixel")
    return m


def _shrink(a: np.ndarray, target: int = 512) -> np.ndarray:
    f = max(1, int(np.ceil(max(a.shape) / target)))
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(a.astype(np.float64)), sigma))


def _erode(m: np.ndarray, r: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(m.astype(np.uint8)), [r, r])).astype(bool)


def _pure_noise_gradient_ratio() -> float:
    """Median |grad(G_2 * n)| / std(n - G_1 * n) for white noise n: the flatness yardstick."""
    n = np.random.default_rng(0).standard_normal((192, 192))
    r = n - _smooth(n, 1.0)
    gy, gx = np.gradient(_smooth(n, 2.0))
    return float(np.median(np.hypot(gx, gy)[16:-16, 16:-16]) / np.sqrt(np.mean(r[16:-16, 16:-16] ** 2)))


_NOISE_RATIO = None


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def noise_trend(x: np.ndarray, field: np.ndarray, bins: int = 8) -> tuple[float, list[float]]:
    """Rank correlation of the local noise level with the grey level over ``bins`` grey-level
    bins of the flatter half of the field, and the per-bin noise (robust std of x - G_1 * x)."""
    r = x - _smooth(x, 1.0)
    mu = _smooth(x, 2.0)
    gy, gx = np.gradient(mu)
    g = np.hypot(gx, gy)
    inner = _erode(field, 3)
    if inner.sum() < 64:
        return 0.0, []
    sel = inner & (g <= np.percentile(g[inner], 50))
    edges = np.quantile(mu[sel], np.linspace(0.02, 0.98, bins + 1))
    noise = []
    for i in range(bins):
        rb = r[sel & (mu >= edges[i]) & (mu < edges[i + 1])]
        noise.append(float(1.4826 * np.median(np.abs(rb - np.median(rb)))) if rb.size else 0.0)
    return _rank_corr(np.arange(bins, dtype=float), np.array(noise)), [round(v, 6) for v in noise]


def detect_polarity(image, mask=None) -> tuple[str, dict]:
    """("bright" | "dark", evidence) for an X-ray (H, W); ``mask`` (bool (H, W), True = usable)
    restricts the analysis to the field of view. "dark" means bone dark (air bright). The
    evidence (JSON-friendly) holds the air shares at each end, the noise trend, the
    ``confidence`` ("high", "medium", "low") and the reason; see the module docstring."""
    global _NOISE_RATIO
    a = _np(image)
    m = _mask(mask, a.shape)
    f = max(1, int(np.ceil(max(a.shape) / 512)))  # work at <= 512 px (block means)
    small = _shrink(a, 512)
    field = (_shrink(m.astype(np.float64), 512) > 0.999) if f > 1 else m
    vals = small[field]
    if vals.size < 64:
        return "bright", {"decision": "bright", "confidence": "low", "reason": "too few pixels inside the mask"}
    lo, hi = np.percentile(vals, [1.0, 99.0])
    if hi - lo <= 0:
        return "bright", {"decision": "bright", "confidence": "low", "reason": "the image is flat inside the mask"}
    x = (small - lo) / (hi - lo)
    if _NOISE_RATIO is None:
        _NOISE_RATIO = _pure_noise_gradient_ratio()
    r = x - _smooth(x, 1.0)
    local_noise = np.sqrt(np.clip(_smooth(r * r, 4.0), 0.0, None))
    gy, gx = np.gradient(_smooth(x, 2.0))
    flat = np.hypot(gx, gy) <= 3.0 * _NOISE_RATIO * local_noise + 5e-4
    inner = _erode(field, 2)
    if inner.sum() < 64:
        inner = field
    n = int(inner.sum())
    low = _air_candidates(inner & flat & (x <= END_BAND), field)
    high = _air_candidates(inner & flat & (x >= 1.0 - END_BAND), field)
    trend, per_bin = noise_trend(x, field)
    ev = {
        "air_low_fraction": round(low / n, 4),
        "air_high_fraction": round(high / n, 4),
        "noise_trend": round(trend, 3),
        "noise_per_grey_bin": per_bin,
        "range": [float(lo), float(hi)],
    }
    if high >= 3 * low and high >= MIN_AIR * n:
        ev.update(decision="dark", confidence="high",
                  reason="air (structureless background) at the bright end: bone dark, a raw transmission image")
        return "dark", ev
    if low >= 3 * high and low >= MIN_AIR * n:
        ev.update(decision="bright", confidence="high", reason="air (structureless background) at the dark end: bone bright")
        return "bright", ev
    if trend <= -NOISE_TREND:
        ev.update(decision="dark", confidence="medium",
                  reason="no air in view; the noise falls with the grey level: a log image displayed inverted, bone dark")
        return "dark", ev
    if trend >= NOISE_TREND:
        ev.update(decision="bright", confidence="medium",
                  reason="no air in view; the noise grows with the grey level: a log image, bone bright "
                         "(a raw linear image looks the same: force --polarity dark if it is one)")
        return "bright", ev
    ev.update(decision="bright", confidence="low",
              reason="no air in view and no clear noise trend; taken as stored, bone bright")
    return "bright", ev


def _air_candidates(candidates: np.ndarray, field: np.ndarray) -> int:
    """Pixels of the candidate regions (8-connected) that reach the edge of the field (air
    surrounds the body and runs out of the field; a bone plateau inside it does not) or that
    are large (5 % of the field: an air region inside a vignetted intensifier disc)."""
    if not candidates.any():
        return 0
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(candidates.astype(np.uint8)), True))
    # the edge of the field: field pixels with a 4-neighbour outside it (or on the image border)
    pad = np.pad(field, 1, constant_values=False)
    edge = field & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    r = max(2, int(round(0.02 * max(field.shape))))  # within 2 % of the image size of that edge
    near = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(edge.astype(np.uint8)), [r, r])).astype(bool)
    touching = set(np.unique(lab[near & (lab > 0)]).tolist())
    counts = np.bincount(lab.ravel())
    large = {int(k) for k in np.nonzero(counts >= 0.05 * field.sum())[0] if k > 0}
    keep = sorted(touching | large)
    return int(counts[keep].sum()) if keep else 0


def invert_to_bone_bright(image, mask=None, transform: str = "log") -> Tensor:
    """A bone-dark image (H, W) turned bone-bright. ``transform="log"``: -log(I / I_air) for
    raw transmission images (I_air = the 99.5th percentile inside ``mask``; values below 1e-3
    I_air are clamped there, so the result lies in [0, log(1000)]); ``"linear"``: I_max - I."""
    a = _np(image)
    m = _mask(mask, a.shape)
    inside = a[m]
    if transform == "log":
        lo = float(inside.min())
        if lo < 0:
            raise ValueError(
                f"a raw transmission image has no negative values (minimum {lo:g}); this image is not raw intensity: "
                "use transform='linear' (polarity 'dark' with --invert linear)"
            )
        air = float(np.percentile(inside, 99.5))
        if air <= 0:
            raise ValueError("the image is zero inside the mask; it cannot be a transmission image")
        out = -np.log(np.clip(a, 1e-3 * air, None) / air)
        out = np.clip(out, 0.0, None)
    elif transform == "linear":
        out = float(inside.max()) - a
    else:
        raise ValueError(f"transform must be 'log' or 'linear', got {transform!r}")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def to_bone_bright(image, mode: str = "auto", mask=None, transform: str = "auto") -> tuple[Tensor, bool, dict]:
    """The image with bone bright, whether it was inverted, and the evidence.

    ``mode``: "auto" (:func:`detect_polarity`), "bright" (use as is) or "dark" (invert).
    ``transform``: how a dark image is inverted: "log" (-log(I / I_air), raw transmission),
    "linear" (max - I, a log image displayed inverted) or "auto" (linear when the noise falls
    clearly with the grey level, else log); see the module docstring.
    Returns (float32 (H, W) tensor, inverted, evidence).
    """
    if transform not in ("auto", "log", "linear"):
        raise ValueError(f"transform must be 'auto', 'log' or 'linear', got {transform!r}")
    if mode not in ("auto", "bright", "dark"):
        raise ValueError(f"polarity must be 'auto', 'bright' or 'dark', got {mode!r}")
    a = _np(image)
    if mode == "auto":
        decided, ev = detect_polarity(a, mask)
        ev = {"mode": "auto", **ev}
    else:
        decided, ev = mode, {"mode": mode, "decision": mode, "reason": f"forced ({mode})"}
    if decided == "bright":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), False, ev
    if transform == "auto":
        trend = ev.get("noise_trend")
        if trend is None:
            m = _mask(mask, a.shape)
            lo, hi = np.percentile(a[m], [1.0, 99.0])
            trend = noise_trend(_shrink((a - lo) / max(hi - lo, 1e-12), 512), _shrink(m.astype(float), 512) > 0.999)[0]
        transform = "linear" if trend <= -NOISE_TREND else "log"
        if transform == "log" and float(a.min()) < 0:
            transform = "linear"
    ev["inversion"] = transform
    return invert_to_bone_bright(a, mask, transform), True, ev
