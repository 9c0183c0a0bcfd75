"""DRRs for display: a fast low-resolution projector for live updates and the full-resolution one
for the final image. Plain torch; no MRML, so it runs in the registration worker thread."""

from __future__ import annotations

import math

import numpy as np


class DRRRenderer:
    """DRRs of one CT for one camera. Always returns the camera's full (H, W) as float32 numpy."""

    def __init__(self, volume, camera, device="cpu", livePixels: int = 128 * 128, maxVoxels: int = 8_000_000):
        from CorrRegLib.projector import Projector

        self.camera = camera
        self.device = device
        vol = volume
        while vol.data.numel() > maxVoxels and min(vol.data.shape) > 8:
            vol = vol.downsample(2)
        self._volume = vol
        factor = max(1.0, math.sqrt(camera.width * camera.height / float(livePixels)))
        self._live = Projector(vol, camera.downsample(factor) if factor > 1 else camera).to(device)
        self._full = self._live if factor <= 1 else None

    def render(self, pose, full: bool = False) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from CorrRegLib.projector import Projector

        proj = self._live
        if full:
            if self._full is None:
                self._full = Projector(self._volume, self.camera).to(self.device)
            proj = self._full
        with torch.no_grad():
            img = proj(torch.as_tensor(np.asarray(pose), dtype=torch.float64).to(self.device).float())
            size = (self.camera.height, self.camera.width)
            if tuple(img.shape[-2:]) != size:
                img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        return img[0].detach().cpu().numpy().astype(np.float32)
