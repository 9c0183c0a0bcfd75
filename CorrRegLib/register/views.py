"""One X-ray as registration sees it: the image, its camera, where that camera sits, its mask.

A single-view registration estimates ``camera_from_ct``; several calibrated views (biplane)
estimate one ``world_from_ct`` from all of them, each view's pose being
``camera_from_world @ world_from_ct``. A lone view's world is its own camera frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Camera, check_rigid

Tensor = torch.Tensor


@dataclass
class View:
    """An X-ray (H, W), dense structures bright (log domain), with its geometry.

    ``camera_from_world``: (4, 4) rigid transform placing this camera in the world frame of a
    multi-view set-up (default: the identity, for a lone view). ``mask``: (H, W) bool, True on
    usable pixels (field of view, collimation, a region of interest); None: all pixels.
    """

    image: Tensor
    camera: Camera
    camera_from_world: Tensor | None = None
    mask: Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.camera, Camera):
            raise ValueError(
                f"register needs the X-ray's camera geometry (a CorrRegLib.geometry.Camera), got "
                f"{type(self.camera).__name__}; read_xray(..., require_camera=False) returns camera=None when the "
                "geometry is unknown: give it with a camera JSON or sdd= and pixel_spacing="
            )
        self.image = check_xray(self.image, self.camera)
        if self.camera_from_world is None:
            self.camera_from_world = torch.eye(4, dtype=torch.float64)
        else:
            cfw = torch.as_tensor(self.camera_from_world, dtype=torch.float64)
            if cfw.shape != (4, 4):
                raise ValueError(f"camera_from_world must be a 4x4 matrix, got shape {tuple(cfw.shape)}")
            try:
                self.camera_from_world = check_rigid(cfw).detach().cpu().double()
            except ValueError as err:
                raise ValueError(f"{self.name or 'the view'}'s camera_from_world: {err}") from None
        if self.mask is not None:
            mask = torch.as_tensor(self.mask)
            if mask.dim() == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if tuple(mask.shape) != tuple(self.image.shape):
                raise ValueError(f"the mask has shape {tuple(mask.shape)} but the X-ray has {tuple(self.image.shape)}")
            mask = mask > 0
            if float(mask.float().mean()) < 0.01:
                raise ValueError("the mask excludes (almost) every pixel of the X-ray; check the mask image")
            self.mask = mask


def check_xray(xray: Tensor, camera: Camera) -> Tensor:
    """The X-ray as a float32 (H, W) tensor, after the checks every fixed image must pass."""
    x = torch.as_tensor(xray)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"the X-ray must be a 2D image (H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape) != (camera.height, camera.width):
        raise ValueError(
            f"the X-ray is {x.shape[1]} x {x.shape[0]} pixels but the camera geometry says "
            f"{camera.width} x {camera.height}; the camera must describe this image"
        )
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("the X-ray contains NaN or Inf pixels")
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise ValueError("the X-ray is blank (every pixel has the same value)")
    at_extremes = float(((x <= lo) | (x >= hi)).float().mean())
    if at_extremes > 0.9:
        raise ValueError(f"the X-ray is saturated ({at_extremes:.0%} of pixels sit at the minimum or maximum value)")
    return x
