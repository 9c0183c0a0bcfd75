"""Differentiable DRR rendering, ProST style, in plain PyTorch.

Every detector pixel owns a ray from the source. Each ray is clipped to the box that holds the
volume's non-air voxels, a fixed canonical set of ``n`` sample fractions (k + 0.5) / n is laid
along that segment, the samples are moved into the CT by the pose, read by trilinear
interpolation (``grid_sample``) and summed times the step length. The result is the line integral
of linear attenuation (dimensionless: mm times 1/mm). Gradients reach the pose through the
sample positions and the clipping, and the volume through the interpolation weights; both
support double backward (the network's L_appro training needs it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .geometry import Camera, invert_pose
from .volume import Volume

Tensor = torch.Tensor

#: Voxels at or below this attenuation (1/mm) count as air when clipping rays.
AIR_THRESHOLD = 1e-5


def _occupied_box(data: Tensor, threshold: float) -> tuple[list[float], list[float]]:
    """Index-space (i, j, k) box holding every voxel above ``threshold``, one voxel of margin
    for the trilinear support, clipped to the volume's extent."""
    k, j, i = data.shape
    mask = data > threshold
    if not bool(mask.any()):
        return [-0.5, -0.5, -0.5], [i - 0.5, j - 0.5, k - 0.5]
    lo, hi = [], []
    for axis, n in ((2, i), (1, j), (0, k)):
        other = tuple(a for a in range(3) if a != axis)
        idx = mask.any(dim=other).nonzero().flatten()
        lo.append(max(-0.5, float(idx[0]) - 1.0))
        hi.append(min(n - 0.5, float(idx[-1]) + 1.0))
    return lo, hi


class Projector(torch.nn.Module):
    """Render DRRs of one volume with one camera for a batch of poses.

    Args:
        volume: the CT as linear attenuation (1/mm).
        camera: detector geometry.
        samples_per_voxel: sample density along each ray, relative to the smallest voxel side.
            The number of samples is fixed per ray (canonical grid), chosen so that even the
            longest chord through the occupied box is sampled this densely.
        max_points: bound on the sample points in flight at once; rays are processed in chunks
            (with activation checkpointing when gradients are needed) to bound memory.
    """

    def __init__(
        self,
        volume: Volume,
        camera: Camera,
        samples_per_voxel: float = 1.0,
        max_points: int = 1 << 24,
        air_threshold: float = AIR_THRESHOLD,
    ) -> None:
        super().__init__()
        if samples_per_voxel <= 0:
            raise ValueError(f"samples_per_voxel must be positive, got {samples_per_voxel}")
        self.camera = camera
        self.volume = volume
        self.max_points = int(max_points)
        data = volume.data
        lo, hi = _occupied_box(data.detach(), air_threshold)
        # Crop the voxels to the occupied box (plus the trilinear margin) so caches hold less air.
        i0, j0, k0 = (max(0, math.floor(v + 0.5)) for v in lo)
        i1, j1, k1 = (math.ceil(v + 0.5) for v in hi)
        self.register_buffer("_voxels", data[k0:k1, j0:j1, i0:i1][None, None].contiguous(), persistent=False)
        self._voxels_grad_source = data  # keep autograd link when volume.data requires grad
        self._crop = (k0, j0, i0, k1, j1, i1)
        self.register_buffer("_box_lo", torch.tensor(lo, dtype=torch.float32), persistent=False)
        self.register_buffer("_box_hi", torch.tensor(hi, dtype=torch.float32), persistent=False)
        crop_shape = torch.tensor([i1 - i0, j1 - j0, k1 - k0], dtype=torch.float32)
        self.register_buffer("_crop_origin", torch.tensor([i0, j0, k0], dtype=torch.float32), persistent=False)
        self.register_buffer("_crop_shape", crop_shape, persistent=False)
        box_vox = torch.tensor(hi) - torch.tensor(lo)
        sp = torch.tensor(volume.spacing, dtype=torch.float64)
        diag_mm = float((box_vox.double() * sp).norm())
        self.n_samples = max(2, math.ceil(diag_mm / float(sp.min()) * samples_per_voxel))
        self.register_buffer("_rays", camera.pixel_rays(torch.float32).reshape(-1, 3), persistent=False)
        self.register_buffer("_index_from_lps", volume.index_from_lps(torch.float32), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._rays.device

    def voxels(self) -> Tensor:
        """The cropped (1, 1, K, J, I) voxel tensor, linked to the volume's autograd graph."""
        src = self._voxels_grad_source
        if src.requires_grad:
            k0, j0, i0, k1, j1, i1 = self._crop
            return src[k0:k1, j0:j1, i0:i1][None, None].to(self._rays.device, torch.float32)
        return self._voxels

    def forward(self, poses: Tensor) -> Tensor:
        """DRRs (B, 1, H, W) for camera_from_ct ``poses`` of shape (B, 4, 4) or (4, 4)."""
        single = poses.dim() == 2
        if single:
            poses = poses[None]
        if poses.shape[-2:] != (4, 4):
            raise ValueError(f"poses must have shape (B, 4, 4), got {tuple(poses.shape)}")
        dtype = poses.dtype if poses.dtype == torch.float64 else torch.float32
        poses = poses.to(device=self.device, dtype=dtype)
        voxels = self.voxels().to(dtype)
        b = poses.shape[0]
        rays = self._rays.to(dtype)
        n_rays = rays.shape[0]
        index_from_camera = self._index_from_lps.to(dtype) @ invert_pose(poses)  # (B, 4, 4)
        chunk = max(1, self.max_points // (self.n_samples * b))
        need_grad = torch.is_grad_enabled() and (poses.requires_grad or voxels.requires_grad)
        outs = []
        for start in range(0, n_rays, chunk):
            r = rays[start : start + chunk]
            if need_grad and chunk < n_rays:
                outs.append(checkpoint(self._integrate, voxels, index_from_camera, r, use_reentrant=False))
            else:
                outs.append(self._integrate(voxels, index_from_camera, r))
        img = torch.cat(outs, dim=1).reshape(b, 1, self.camera.height, self.camera.width)
        return img[0] if single else img

    def _integrate(self, voxels: Tensor, index_from_camera: Tensor, rays: Tensor) -> Tensor:
        """Line integrals (B, R) along ``rays`` (R, 3) for each pose's index_from_camera."""
        dtype = voxels.dtype
        rot = index_from_camera[:, :3, :3]
        src = index_from_camera[:, :3, 3]  # source position in voxel index space (B, 3)
        dirs = torch.einsum("bij,rj->bri", rot, rays)  # source-to-pixel vectors in index space
        lo = self._box_lo.to(dtype)
        hi = self._box_hi.to(dtype)
        # Slab test: t = 0 at the source, 1 on the detector.
        safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
        t_lo = (lo - src[:, None, :]) / safe
        t_hi = (hi - src[:, None, :]) / safe
        t_near = torch.minimum(t_lo, t_hi).amax(-1).clamp(min=0.0)
        t_far = torch.maximum(t_lo, t_hi).amin(-1)
        hit = t_far > t_near
        t_near = torch.where(hit, t_near, torch.zeros_like(t_near))
        t_far = torch.where(hit, t_far, torch.zeros_like(t_far))
        n = self.n_samples
        frac = (torch.arange(n, device=dirs.device, dtype=dtype) + 0.5) / n
        t = t_near[..., None] + (t_far - t_near)[..., None] * frac  # (B, R, n)
        pts = src[:, None, None, :] + t[..., None] * dirs[:, :, None, :]  # (B, R, n, 3) index (i, j, k)
        # grid_sample coordinates of the cropped block, align_corners=False.
        grid = (2.0 * (pts - self._crop_origin.to(dtype)) + 1.0) / self._crop_shape.to(dtype) - 1.0
        b, r = t.shape[:2]
        samples = F.grid_sample(
            voxels, grid.reshape(1, b * r, n, 1, 3), mode="bilinear", padding_mode="zeros", align_corners=False
        ).reshape(b, r, n)
        step_mm = (t_far - t_near) * rays.norm(dim=-1) / n  # camera frame is metric
        return samples.sum(-1) * step_mm


def render(volume: Volume, camera: Camera, poses: Tensor, **kwargs) -> Tensor:
    """One-shot DRR rendering; build a ``Projector`` instead when rendering repeatedly."""
    return Projector(volume, camera, **kwargs).to(poses.device)(poses)


class MultiResolutionProjector:
    """Projectors over a volume pyramid and matching downsampled detectors, coarse to fine.

    Level 0 is full resolution; level l halves the voxels l times and divides the detector
    resolution by ``detector_factors[l]``.
    """

    def __init__(self, volume: Volume, camera: Camera, levels: int = 3, detector_factors=None, **kwargs) -> None:
        factors = detector_factors or [2**l for l in range(levels)]
        if len(factors) != levels:
            raise ValueError("detector_factors needs one entry per level")
        vols = volume.pyramid(levels)
        self.levels = [Projector(v, camera.downsample(f), **kwargs) for v, f in zip(vols, factors)]

    def to(self, device) -> "MultiResolutionProjector":
        self.levels = [p.to(device) for p in self.levels]
        return self

    def __getitem__(self, level: int) -> Projector:
        return self.levels[level]

    def __len__(self) -> int:
        return len(self.levels)
