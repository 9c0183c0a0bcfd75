"""Masked normalised cross-correlation of an X-ray against larger DRR canvases, for every shift.

For a canvas C (Hc, Wc) with mask R (where the CT projects) and an X-ray X (H, W) with mask F
(usable pixels), the NCC at offset p (canvas pixel under X-ray pixel (0, 0)) is the Pearson
correlation of X(x) and C(x + p) over the pixels x where F(x) R(x + p) = 1. Every term is a
cross-correlation of an X-ray map with a canvas map, computed for all offsets at once with FFTs
(Padfield, "Masked object registration in the Fourier domain", IEEE TIP 2012).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _xcorr(canvas_hat: Tensor, kernel_hat: Tensor, size: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Valid cross-correlation sum_x K(x) I(x + p) from the FFTs of I (B, Hc, Wc) and K (Hc, Wc)."""
    full = torch.fft.irfft2(canvas_hat * kernel_hat.conj(), s=size)
    return full[..., : out[0], : out[1]]


def masked_ncc_map(canvas: Tensor, canvas_mask: Tensor, xray: Tensor, xray_mask: Tensor | None,
                   min_overlap: float = 0.5) -> Tensor:
    """NCC for every offset: (B, Hc - H + 1, Wc - W + 1) from canvases (B, Hc, Wc) and an X-ray (H, W).

    Offsets where the compared region holds fewer than ``min_overlap`` times the smaller of the
    X-ray's usable area and the canvas mask's area (and never fewer than 16 pixels or 2 % of the
    usable area) score -1: too little to compare.
    """
    b, hc, wc = canvas.shape
    h, w = xray.shape
    size, out = (hc, wc), (hc - h + 1, wc - w + 1)
    dt = torch.float64
    x = xray.to(dt)
    f = torch.ones_like(x) if xray_mask is None else xray_mask.to(dt)
    # standardise the X-ray over its mask (keeps the sums well scaled)
    n_f = f.sum().clamp_min(1.0)
    mean = (x * f).sum() / n_f
    std = (((x - mean) ** 2 * f).sum() / n_f).sqrt().clamp_min(1e-12)
    x = (x - mean) / std * f
    c = canvas.to(dt)
    c = c / c.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
    r = canvas_mask.to(dt)
    pad = lambda k: torch.nn.functional.pad(k, (0, wc - w, 0, hc - h))  # noqa: E731
    k_f, k_x, k_xx = (torch.fft.rfft2(pad(k)) for k in (f, x, x * x))
    i_r, i_rc, i_rcc = (torch.fft.rfft2(m) for m in (r, r * c, r * c * c))
    n = _xcorr(i_r, k_f, size, out)
    s_x = _xcorr(i_r, k_x, size, out)
    s_xx = _xcorr(i_r, k_xx, size, out)
    s_c = _xcorr(i_rc, k_f, size, out)
    s_cc = _xcorr(i_rcc, k_f, size, out)
    s_xc = _xcorr(i_rc, k_x, size, out)
    n_safe = n.clamp_min(1.0)
    cov = s_xc - s_x * s_c / n_safe
    var_x = (s_xx - s_x * s_x / n_safe).clamp_min(0.0)
    var_c = (s_cc - s_c * s_c / n_safe).clamp_min(0.0)
    ncc = cov / (var_x * var_c + 1e-12).sqrt()
    need = (min_overlap * torch.minimum(n_f, r.flatten(1).sum(1))).clamp_min(max(16.0, 0.02 * float(n_f)))[:, None, None]
    enough = (n >= need) & (var_c > 1e-9 * n_safe) & (var_x > 1e-9 * n_safe)
    return torch.where(enough, ncc, torch.full_like(ncc, -1.0)).to(canvas.dtype)
