"""Differentiable DRR rendering, ProST style, in plain PyTorch.

Every detector pixel owns a ray from the source; the DRR is the line integral of linear
attenuation along it (dimensionless: mm times 1/mm) under the trilinear model of the CT.
Gradients reach the pose through the sample positions and the volume through the interpolation
weights; both support double backward (the network's L_appro training needs it). Two samplers
compute the same integral:

``rays`` (ProST's scheme): each ray is clipped to the box that holds the volume's non-air
voxels, a fixed canonical set of ``n`` sample fractions (k + 0.5) / n is laid along that
segment, the samples are moved into the CT by the pose and read by 3D trilinear interpolation.

``planes`` (Joseph's method, the default up to one sample per voxel): each ray is sampled
where it crosses the voxel-centre planes normal to the axis the beam travels along most. On
such a plane the trilinear interpolant *is* bilinear, so the samples are exact reads of the
same continuous model, taken with 2D ``grid_sample``, whose CPU kernel is vectorised and
several times faster per sample than the 3D one. The step is constant along each ray.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .geometry import Camera, invert_pose
from .volume import Volume

Tensor = torch.Tensor

#: Voxels at or below this attenuation (1/mm) count as air when clipping rays: about -900 HU,
#: so the noise of real CTs' air (-1000 +- 50 HU) does not defeat the clipping.
AIR_THRESHOLD = 0.002

#: For a slicing axis (0 = i, 1 = j, 2 = k): how to permute (K, J, I) voxels into a stack of
#: planes (P, rows, cols), and which index axes the columns and rows are.
_SLICING = {0: ((2, 0, 1), (1, 2)), 1: ((1, 0, 2), (0, 2)), 2: ((0, 1, 2), (0, 1))}


def occupied_box(data: Tensor, threshold: float) -> tuple[list[float], list[float]]:
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
        samples_per_voxel: sample density along each ray, relative to the voxel size. With
            ``rays``, the number of samples is fixed per ray (canonical grid), chosen so that even
            the longest chord through the occupied box is sampled this densely; with ``planes``
            every round(1 / samples_per_voxel)-th voxel plane is read.
        max_points: bound on the sample points in flight at once; rays are processed in chunks
            (with activation checkpointing when gradients are needed) to bound memory.
        mode: ``auto`` (planes up to one sample per voxel, else rays; rays whenever part of the
            CT lies behind the source), ``planes`` or ``rays``.
    """

    def __init__(
        self,
        volume: Volume,
        camera: Camera,
        samples_per_voxel: float = 1.0,
        max_points: int = 1 << 24,
        air_threshold: float = AIR_THRESHOLD,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if samples_per_voxel <= 0:
            raise ValueError(f"samples_per_voxel must be positive, got {samples_per_voxel}")
        if mode not in ("auto", "planes", "rays"):
            raise ValueError(f"mode must be auto, planes or rays, got {mode!r}")
        if mode == "planes" and samples_per_voxel > 1:
            raise ValueError("the planes sampler reads at most one sample per voxel; use mode='rays' for denser sampling")
        self.mode = mode
        self.plane_stride = max(1, round(1.0 / samples_per_voxel)) if samples_per_voxel <= 1 else 1
        self._plane_cache: dict = {}
        self.camera = camera
        self.volume = volume
        self.max_points = int(max_points)
        data = volume.data
        lo, hi = occupied_box(data.detach(), air_threshold)
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
        # LPS corners of the cropped block: if any lies behind the source, planes cannot be used.
        corner_idx = torch.tensor([[a, b, c] for a in (i0 - 0.5, i1 - 0.5) for b in (j0 - 0.5, j1 - 0.5) for c in (k0 - 0.5, k1 - 0.5)],
                                  dtype=torch.float64)
        lps = volume.lps_from_index()
        self.register_buffer("_corners_lps", (corner_idx @ lps[:3, :3].T + lps[:3, 3]).float(), persistent=False)
        self._samples_per_voxel = samples_per_voxel

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
        index_from_camera = self._index_from_lps.to(dtype) @ invert_pose(poses)  # (B, 4, 4)
        if self._use_planes(poses):
            # Group the poses by the axis their principal ray travels along most.
            central = index_from_camera[:, :3, 2].detach()
            axes = central.abs().argmax(-1).tolist()
            img = torch.empty(b, rays.shape[0], dtype=dtype, device=self.device) if len(set(axes)) > 1 else None
            for axis in sorted(set(axes)):
                members = [i for i, a in enumerate(axes) if a == axis]
                part = self._chunked(self._integrate_planes, voxels, index_from_camera[members], rays,
                                     self._plane_count(axis), axis)
                if img is None:
                    img = part
                else:
                    img = img.index_put((torch.tensor(members, device=self.device),), part)
        else:
            img = self._chunked(self._integrate_rays, voxels, index_from_camera, rays, self.n_samples)
        img = img.reshape(b, 1, self.camera.height, self.camera.width)
        return img[0] if single else img

    def _use_planes(self, poses: Tensor) -> bool:
        if self.mode == "rays" or (self.mode == "auto" and self._samples_per_voxel > 1):
            return False
        p = poses.detach()
        depth = self._corners_lps.to(p.dtype) @ p[:, 2, :3].T + p[:, 2, 3]  # (8 corners, B)
        in_front = bool((depth > 0).all())
        if not in_front and self.mode == "planes":
            raise ValueError("part of the CT lies behind the X-ray source; the planes sampler cannot render it (use mode='rays')")
        return in_front

    def _plane_count(self, axis: int) -> int:
        n = self._voxels.shape[2 + _SLICING[axis][0][0]]
        return len(range(self._first_plane(n), n, self.plane_stride))

    def _first_plane(self, n: int) -> int:
        """Centre the kept planes in the block when skipping planes."""
        s = self.plane_stride
        return (n - 1 - s * ((n - 1) // s)) // 2

    def _chunked(self, fn, voxels: Tensor, index_from_camera: Tensor, rays: Tensor, samples_per_ray: int, *extra) -> Tensor:
        """Run ``fn`` over chunks of rays so that at most ``max_points`` samples are in flight."""
        b, n_rays = index_from_camera.shape[0], rays.shape[0]
        chunk = max(1, self.max_points // (samples_per_ray * b))
        need_grad = torch.is_grad_enabled() and (index_from_camera.requires_grad or voxels.requires_grad)
        if chunk >= n_rays:
            return fn(voxels, index_from_camera, rays, *extra)
        outs = []
        for start in range(0, n_rays, chunk):
            r = rays[start : start + chunk]
            if need_grad:
                outs.append(checkpoint(fn, voxels, index_from_camera, r, *extra, use_reentrant=False))
            else:
                outs.append(fn(voxels, index_from_camera, r, *extra))
        return torch.cat(outs, dim=1)

    def _plane_stack(self, voxels: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        """(P, 1, rows, cols) voxel planes normal to ``axis`` and their crop-relative indices."""
        perm = _SLICING[axis][0]
        n = voxels.shape[2 + perm[0]]
        first = self._first_plane(n)
        key = (axis, voxels.dtype, voxels.device)
        if voxels.requires_grad or key not in self._plane_cache:
            stack = voxels[0, 0].permute(*perm)[first :: self.plane_stride].unsqueeze(1).contiguous()
            idx = torch.arange(first, n, self.plane_stride, device=voxels.device, dtype=voxels.dtype)
            if voxels.requires_grad:
                return stack, idx
            self._plane_cache[key] = (stack, idx)
        return self._plane_cache[key]

    def _integrate_planes(self, voxels: Tensor, index_from_camera: Tensor, rays: Tensor, axis: int) -> Tensor:
        """Line integrals (B, R): Joseph's method over the voxel planes normal to ``axis``."""
        dtype = voxels.dtype
        stack, planes = self._plane_stack(voxels, axis)
        col_axis, row_axis = _SLICING[axis][1]
        rows, cols = stack.shape[-2:]
        src = index_from_camera[:, :3, 3] - self._crop_origin.to(dtype)  # source, crop-relative index
        dirs = torch.einsum("bij,rj->bri", index_from_camera[:, :3, :3], rays)  # index units per unit t
        da = dirs[..., axis]
        da = torch.where(da.abs() < 1e-9, torch.full_like(da, 1e-9), da)
        # On plane p the ray is at q = src + (p - src_a) dirs / dirs_a; in grid_sample's
        # align_corners=False coordinates x = (2 q + 1) / size - 1.
        sc, sr = 2.0 / cols, 2.0 / rows
        slope_c, slope_r = dirs[..., col_axis] / da, dirs[..., row_axis] / da
        src_a = src[:, axis, None]
        base = torch.stack([(src[:, col_axis, None] - src_a * slope_c) * sc + (sc / 2 - 1),
                            (src[:, row_axis, None] - src_a * slope_r) * sr + (sr / 2 - 1)], -1)
        slope = torch.stack([slope_c * sc, slope_r * sr], -1)
        b, r = da.shape
        grid = torch.addcmul(base.reshape(1, b * r, 1, 2), slope.reshape(1, b * r, 1, 2), planes[:, None, None, None])
        samples = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        step_mm = self.plane_stride * rays.norm(dim=-1) / da.abs()  # camera frame is metric
        return samples.sum(0).reshape(b, r) * step_mm

    def _integrate_rays(self, voxels: Tensor, index_from_camera: Tensor, rays: Tensor) -> Tensor:
        """Line integrals (B, R) along ``rays`` (R, 3): ProST's canonical grid in each clipped ray."""
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
        # Sample k sits at t_near + (k + 0.5) dt. Build the grid directly in grid_sample's
        # align_corners=False coordinates of the cropped block with one fused multiply-add.
        shape = self._crop_shape.to(dtype)
        src_g = (src - self._crop_origin.to(dtype)) * (2.0 / shape) + (1.0 / shape - 1.0)
        dirs_g = dirs * (2.0 / shape)
        dt = (t_far - t_near) / n
        first = src_g[:, None, :] + (t_near + 0.5 * dt)[..., None] * dirs_g
        k = torch.arange(n, device=dirs.device, dtype=dtype)
        grid = torch.addcmul(first[:, :, None, :], (dt[..., None] * dirs_g)[:, :, None, :], k[None, None, :, None])
        b, r = dt.shape
        samples = F.grid_sample(
            voxels, grid.reshape(1, b * r, n, 1, 3), mode="bilinear", padding_mode="zeros", align_corners=False
        ).reshape(b, r, n)
        return samples.sum(-1) * dt * rays.norm(dim=-1)  # camera frame is metric


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
