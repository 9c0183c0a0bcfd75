"""The image as it comes, made ready to register: field-of-view mask, then polarity.

Real X-rays reach CorrReg as they leave the device: a circular intensifier field or collimator
shutters around the exposed area, and often bone dark (raw transmission). :func:`prepare_xray`
finds the usable pixels (``fov_mask``), decides the polarity inside them (``polarity``), turns
the image bone-bright if needed, and records both decisions in ``XRay.metadata``:

* ``metadata["fov_mask"]``: how the mask was obtained (auto: kind, circle / box, share of usable
  pixels; a file; none);
* ``metadata["polarity"]``: the decision, the evidence and the inversion used.

The returned mask (bool (H, W), True = usable, or None when every pixel is usable) is what
``RegistrationSession(..., mask=...)`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .fov_mask import mask_from_option
from .polarity import to_bone_bright

Tensor = torch.Tensor

POLARITY_MODES = ("auto", "bright", "dark")
INVERSIONS = ("auto", "log", "linear")


@dataclass
class PreparedXRay:
    """``xray``: a copy whose ``image`` is bone-bright (float32 (H, W)) and whose metadata says
    what was done; ``mask``: bool (H, W) numpy array of usable pixels, or None (all usable);
    ``inverted``: whether the polarity was flipped."""

    xray: object
    mask: np.ndarray | None
    inverted: bool

    @property
    def mask_tensor(self) -> Tensor | None:
        return None if self.mask is None else torch.from_numpy(self.mask)


def prepare_image(image, polarity: str = "auto", mask: str | np.ndarray | None = "auto", transform: str = "auto"):
    """(bone-bright float32 (H, W) tensor, mask or None, inverted, info) for a bare image.

    ``mask``: "auto" (detect), "none", a path to a mask image, or a bool (H, W) array.
    ``polarity``: "auto", "bright" or "dark"; ``transform``: how a dark image is inverted
    ("auto", "log", "linear"; see ``polarity.to_bone_bright``). Pixels outside the mask are set
    to 0 in the returned image (no signal), so pictures and unmasked measures see air there.
    """
    if polarity not in POLARITY_MODES:
        raise ValueError(f"polarity must be one of {POLARITY_MODES}, got {polarity!r}")
    a = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    a = np.asarray(a, dtype=np.float64)
    h, w = a.shape
    if isinstance(mask, (np.ndarray, Tensor)):
        m = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask) > 0
        if m.shape != (h, w):
            raise ValueError(f"the mask is {m.shape[1]} x {m.shape[0]} but the image is {w} x {h}")
        if not m.any():
            raise ValueError("the mask excludes every pixel")
        mask_info = {"mask": "array", "usable_fraction": float(m.mean())}
        m = None if m.all() else m
    else:
        m, mask_info = mask_from_option(mask, a, (w, h))
    bright, inverted, pol_info = to_bone_bright(a, polarity, m, transform)
    if m is not None:
        bright = torch.where(torch.from_numpy(m), bright, torch.zeros_like(bright))
    return bright, m, inverted, {"fov_mask": mask_info, "polarity": pol_info}


def prepare_xray(xray, polarity: str = "auto", mask: str | np.ndarray | None = "auto", transform: str = "auto") -> PreparedXRay:
    """An ``io.XRay`` made ready to register (see the module docstring and :func:`prepare_image`).
    The input is not modified."""
    bright, m, inverted, info = prepare_image(xray.image, polarity, mask, transform)
    md = dict(xray.metadata)
    md.update(info)
    return PreparedXRay(replace(xray, image=bright, metadata=md), m, inverted)
