"""Differentiable, batched image similarities (higher is more similar, 1 is a perfect match).

Every function takes a fixed image and moving images as (B, 1, H, W) tensors (the fixed one may
have batch 1 and is broadcast) and an optional mask (1, 1, H, W) or (B, 1, H, W) of pixels to
use (collimation, a region of interest). They return (B,) similarities in [-1, 1].
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .simulate import gaussian_blur

Tensor = torch.Tensor
EPS = 1e-8


def _masked_ncc(x: Tensor, y: Tensor, w: Tensor, dims: Sequence[int]) -> Tensor:
    """Weighted Pearson correlation of x and y over ``dims`` with weights w (broadcastable)."""
    wsum = w.sum(dims, keepdim=True).clamp(min=EPS)
    mx = (w * x).sum(dims, keepdim=True) / wsum
    my = (w * y).sum(dims, keepdim=True) / wsum
    xc, yc = x - mx, y - my
    cov = (w * xc * yc).sum(dims)
    vx = (w * xc * xc).sum(dims)
    vy = (w * yc * yc).sum(dims)
    return cov / (vx * vy + EPS).sqrt()


def _weights(like: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(like[:1])
    return mask.to(like.dtype)


def ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global normalised cross-correlation."""
    fixed, moving = torch.broadcast_tensors(fixed, moving)
    return _masked_ncc(fixed, moving, _weights(moving, mask), dims=(1, 2, 3))


def patch_ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, patch: int = 9) -> Tensor:
    """Local NCC: mean over non-overlapping ``patch`` x ``patch`` windows (robust to
    spatially varying contrast, e.g. a heel effect or soft-tissue that differs from the CT)."""
    fixed, moving = torch.broadcast_tensors(fixed, moving)
    b, c, h, w = moving.shape
    p = max(2, min(patch, h, w))
    hh, ww = (h // p) * p, (w // p) * p
    if hh == 0 or ww == 0:
        return ncc(fixed, moving, mask)

    def tiles(t: Tensor) -> Tensor:
        t = t[..., :hh, :ww].reshape(t.shape[0], c, hh // p, p, ww // p, p)
        return t.permute(0, 1, 2, 4, 3, 5).reshape(t.shape[0], c, -1, p * p)

    wt = tiles(_weights(moving, mask).expand(b, c, h, w))
    x, y = tiles(fixed), tiles(moving)
    local = _masked_ncc(x, y, wt, dims=(3,))  # (B, C, n_patches)
    # Patches that are flat in either image or mostly masked carry no information.
    valid = (wt.mean(3) > 0.5) & (x.std(3) > EPS) & (y.std(3) > EPS)
    valid = valid.to(local.dtype)
    return (local * valid).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1.0)


_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8.0


def image_gradients(img: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel derivatives along columns (x) and rows (y), same size (replicate padding)."""
    k = _SOBEL_X.to(img.dtype).to(img.device)
    kx = k.reshape(1, 1, 3, 3)
    ky = k.T.reshape(1, 1, 3, 3)
    padded = F.pad(img, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx), F.conv2d(padded, ky)


def _derivatives(fixed: Tensor, moving: Tensor, mask: Tensor | None):
    """((fx, fy), (mx, my), mask): Sobel derivatives of both images (broadcast) and the mask eroded
    by one pixel, since derivatives across the mask border are artefacts of collimation, not
    anatomy (None stays None)."""
    fixed, moving = torch.broadcast_tensors(fixed, moving)
    if mask is not None:
        mask = -F.max_pool2d(-mask.to(moving.dtype), 3, stride=1, padding=1)
    return image_gradients(fixed), image_gradients(moving), mask


def _gradient_ncc(f: tuple[Tensor, Tensor], m: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
    return 0.5 * (ncc(f[0], m[0], mask) + ncc(f[1], m[1], mask))


def gradient_ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None) -> Tensor:
    """Gradient correlation: mean of the NCCs of the x and y image derivatives."""
    return _gradient_ncc(*_derivatives(fixed, moving, mask))


def _ngf(f: tuple[Tensor, Tensor], m: tuple[Tensor, Tensor], mask: Tensor | None, region: Tensor | None) -> Tensor:
    (fx, fy), (mx, my) = f, m
    seen = _weights(mx, mask)
    counted = seen if region is None else torch.maximum(region.to(mx.dtype), seen)
    f_mag2, m_mag2 = fx * fx + fy * fy, mx * mx + my * my

    def eps2(mag2: Tensor, w: Tensor) -> Tensor:  # (mean gradient magnitude over w)^2
        w = w.expand_as(mag2)
        mean = (((mag2 + EPS * EPS).sqrt() * w).sum((1, 2, 3), keepdim=True)
                / w.sum((1, 2, 3), keepdim=True).clamp(min=EPS))
        return mean.square().clamp(min=EPS)

    f_norm = (f_mag2 + eps2(f_mag2, seen)).sqrt()
    m_norm2 = m_mag2 + eps2(m_mag2, counted)
    dot = (fx * mx + fy * my) / f_norm
    matched = (seen * dot * dot / m_norm2).sum((1, 2, 3))
    present = (counted * m_mag2 / m_norm2).sum((1, 2, 3))
    return matched / present.clamp(min=EPS)


def ngf(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, region: Tensor | None = None) -> Tensor:
    """Normalised gradient fields: the share of the moving image's edge structure that the fixed
    image shows, in [0, 1].

    Each image's gradient is normalised to n = g / sqrt(|g|^2 + eps^2), eps its mean gradient
    magnitude over the compared pixels, so an edge counts by its direction, not its contrast:
    the body outline against air, or the strong edge of a marker, weigh no more than a bone's
    cortex. The score is sum_mask (n_f . n_m)^2 / sum_region |n_m|^2: where both images have an
    edge of the same orientation it earns up to 1 (the sign is ignored, as in Haber and
    Modersitzki's NGF), an edge of the moving image the fixed one does not show earns nothing, and
    so does one that lies in ``region`` outside ``mask``. ``region`` (default: ``mask``) is where
    the moving image's structure counts: the CT's whole projection, also beyond the detector or
    the field of view, so that a pose cannot hide part of the bone where the X-ray shows nothing.
    """
    f, m, mask = _derivatives(fixed, moving, mask)
    return _ngf(f, m, mask, region)


def gradient_ncc_ngf(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, region: Tensor | None = None) -> Tensor:
    """Mean of gradient NCC over ``mask`` and NGF (with ``region``): gradient NCC's wide, depth-
    sensitive basin, and NGF's penalty on edges the fixed image does not show or cannot see. The
    derivatives are taken once for both."""
    f, m, mask = _derivatives(fixed, moving, mask)
    return 0.5 * (_gradient_ncc(f, m, mask) + _ngf(f, m, mask, region))


def _masked_blur(img: Tensor, sigma_px: float, mask: Tensor | None) -> Tensor:
    """Gaussian blur of ``img`` that averages only over ``mask`` (normalised convolution): pixels
    outside the field of view do not bleed in as dark structure."""
    if mask is None:
        return gaussian_blur(img, (sigma_px, sigma_px))
    m = mask.to(img.dtype).expand_as(img)
    return gaussian_blur(img * m, (sigma_px, sigma_px)) / gaussian_blur(m, (sigma_px, sigma_px)).clamp_min(1e-6)


def bandpass_ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, fine_px: float = 1.0,
                 coarse_px: float = 8.0) -> Tensor:
    """NCC of the images' difference of Gaussians (sigmas ``fine_px`` and ``coarse_px``): intensity
    at the scales between pixel noise and a bone's width. Unlike an edge similarity it keeps where
    the mass is (a bone's DRR over the dark gap between two bones scores low); unlike NCC it drops
    the broad ramp of the soft tissue, which a CT of one bone cannot explain."""
    fixed, moving = torch.broadcast_tensors(fixed, moving)
    band_f = _masked_blur(fixed, fine_px, mask) - _masked_blur(fixed, coarse_px, mask)
    band_m = _masked_blur(moving, fine_px, None) - _masked_blur(moving, coarse_px, None)
    return ncc(band_f, band_m, mask)


#: Similarities of edges alone (no intensity term): what a CT that holds only bone can be compared on.
EDGES_ONLY = frozenset({"gradient_ncc", "multiscale_gradient_ncc", "ngf", "gradient_ncc+ngf"})

#: Similarities that take ``region``: the moving image's structure counts there even where the
#: fixed image is not seen (Problem renders them on a canvas beyond the detector).
COUNTS_UNSEEN = frozenset({"ngf", "gradient_ncc+ngf", "gradient_ncc+ngf+bandpass_ncc"})


def edges_and_bandpass(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, region: Tensor | None = None) -> Tensor:
    """Mean of gradient NCC + NGF (edges, with ``region``) and band-pass NCC (where the mass lies):
    the edges hold what they pin down, the band-pass term decides along what they leave flat. As a
    polish (RegistrationOptions.bone_only_polish) it kept the phantom's vertebrae within 0.5 mm
    but did not pin the wrist radius's roll (docs/registration.md, "Polish")."""
    return 0.5 * (gradient_ncc_ngf(fixed, moving, mask, region) + bandpass_ncc(fixed, moving, mask))


def multiscale(
    fn: Callable[..., Tensor], fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
    scales: Sequence[int] = (1, 2, 4), **kwargs,
) -> Tensor:
    """Average of ``fn`` over images average-pooled by each factor in ``scales``."""
    total = 0.0
    for s in scales:
        f = F.avg_pool2d(fixed, s) if s > 1 else fixed
        m = F.avg_pool2d(moving, s) if s > 1 else moving
        k = None if mask is None else (F.avg_pool2d(mask.to(moving.dtype), s) > 0.99).to(moving.dtype) if s > 1 else mask
        total = total + fn(f, m, k, **kwargs)
    return total / len(scales)


SIMILARITIES: dict[str, Callable[..., Tensor]] = {
    "ncc": ncc,
    "patch_ncc": patch_ncc,
    "gradient_ncc": gradient_ncc,
    "ngf": ngf,
    "gradient_ncc+ngf": gradient_ncc_ngf,
    "bandpass_ncc": bandpass_ncc,
    "gradient_ncc+ngf+bandpass_ncc": edges_and_bandpass,
    "multiscale_ncc": lambda f, m, k=None: multiscale(ncc, f, m, k),
    "multiscale_gradient_ncc": lambda f, m, k=None: multiscale(gradient_ncc, f, m, k),
    # The default for intensity registration: global structure from NCC, edges from the
    # gradient term. Both are needed: NCC alone is blurred by soft tissue, gradient NCC
    # alone has a narrow basin.
    "ncc+gradient_ncc": lambda f, m, k=None: 0.5 * (ncc(f, m, k) + gradient_ncc(f, m, k)),
}


def get_similarity(name: str) -> Callable[..., Tensor]:
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; choose one of {sorted(SIMILARITIES)}") from None
