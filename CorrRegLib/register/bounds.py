"""The plausible region of poses, and the bounded parametrisation the global searches use.

A pose is plausible when the isocenter (the CT's bone centroid, the target region) lies in front
of every source, at a depth within ``(1 +- depth_range)`` times its depth at the initial pose, and
projects inside every detector at least ``detector_margin`` of the detector's size from its edges.
Nothing is said about orientation: any rotation about the isocenter keeps it plausible.

Poses are ``camera_from_ct`` of the *reference* view (the first X-ray); another view's pose is
``view_from_ref @ pose``. The global searches move in a parametrisation that cannot leave the
region: ``x = (rx, ry, rz, u, v, depth)``, a rotation of the initial pose about the isocenter
(extrinsic Euler angles about the camera axes, degrees), the pixel (u, v) where the isocenter
projects in the reference view, and its depth there (mm), with box bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Camera, euler_to_rotation, make_pose, rotation_to_euler, transform_points

Tensor = torch.Tensor


@dataclass(frozen=True)
class ViewLimits:
    """Where the isocenter may lie in one view: depth range (mm) and pixel box (u0, v0, u1, v1)."""

    view_from_ref: Tensor  # (4, 4) float64
    camera: Camera
    depth: tuple[float, float]
    box: tuple[float, float, float, float]


class PoseBounds:
    """The plausible region for an isocenter, around its depth at the initial pose in each view."""

    def __init__(self, isocenter: Tensor, initial_ref_pose: Tensor, views: list[tuple[Tensor, Camera]],
                 depth_range: float, detector_margin: float) -> None:
        self.isocenter = torch.as_tensor(isocenter, dtype=torch.float64).reshape(1, 3)
        self.limits: list[ViewLimits] = []
        for view_from_ref, cam in views:
            d0 = float(transform_points(view_from_ref @ initial_ref_pose, self.isocenter)[0, 2])
            if d0 <= 0:
                raise ValueError(
                    f"at the initial pose the CT lies behind the X-ray source (isocenter depth {d0:.0f} mm); check the "
                    "pose direction (camera_from_ct, not its inverse) and its units")
            mw, mh = detector_margin * cam.width, detector_margin * cam.height
            self.limits.append(ViewLimits(view_from_ref, cam, ((1 - depth_range) * d0, min((1 + depth_range) * d0,
                                                                                          0.98 * cam.sdd)),
                                          (mw, mh, cam.width - mw, cam.height - mh)))

    def isocenter_uvd(self, ref_poses: Tensor, view: int = 0) -> Tensor:
        """(B, 3): pixel u, v and depth (mm) of the isocenter in ``view`` for (B, 4, 4) poses."""
        lim = self.limits[view]
        p = transform_points(lim.view_from_ref.to(ref_poses) @ ref_poses, self.isocenter.to(ref_poses))[:, 0]
        k = lim.camera.intrinsics(p.dtype, p.device)
        z = p[:, 2:3]
        uv = (p[:, :2] / z.clamp_min(1e-9)) * torch.stack([k[0, 0], k[1, 1]]) + torch.stack([k[0, 2], k[1, 2]])
        return torch.cat([uv, z], 1)

    def violation(self, ref_poses: Tensor) -> Tensor:
        """(B,) how far each pose lies outside the region (0 inside): summed over views, depth
        in units of the allowed range, pixels in units of the detector size."""
        ref_poses = ref_poses.detach().double().reshape(-1, 4, 4)
        total = torch.zeros(ref_poses.shape[0], dtype=torch.float64)
        for i, lim in enumerate(self.limits):
            uvd = self.isocenter_uvd(ref_poses, i)
            (d0, d1), (u0, v0, u1, v1) = lim.depth, lim.box
            span = d1 - d0
            total += ((d0 - uvd[:, 2]).clamp_min(0) + (uvd[:, 2] - d1).clamp_min(0)) / span
            behind = uvd[:, 2] <= 0  # projections of points behind the source are meaningless
            du = ((u0 - uvd[:, 0]).clamp_min(0) + (uvd[:, 0] - u1).clamp_min(0)) / lim.camera.width
            dv = ((v0 - uvd[:, 1]).clamp_min(0) + (uvd[:, 1] - v1).clamp_min(0)) / lim.camera.height
            total += torch.where(behind, torch.ones_like(du), du + dv)
        return total

    def contains(self, ref_poses: Tensor) -> Tensor:
        """(B,) bool: inside the plausible region."""
        return self.violation(ref_poses) <= 0

    def describe(self) -> str:
        parts = []
        for i, lim in enumerate(self.limits):
            parts.append(f"view {i + 1}: depth {lim.depth[0]:.0f}-{lim.depth[1]:.0f} mm, isocenter inside pixels "
                         f"{lim.box[0]:.0f}-{lim.box[2]:.0f} x {lim.box[1]:.0f}-{lim.box[3]:.0f}")
        return "; ".join(parts)


class SearchSpace:
    """Bounded coordinates x = (rx, ry, rz [deg], u, v [px], depth [mm]) around a base pose.

    ``pose(x)`` rotates the base pose about the isocenter by the Euler angles (camera axes) and
    moves the isocenter to depth ``depth`` on the ray through pixel (u, v) of the reference view.
    ``lower``/``upper`` bound x to the reference view's plausible box and +-``max_rotation_deg``.
    """

    def __init__(self, base_ref_pose: Tensor, bounds: PoseBounds, max_rotation_deg: float) -> None:
        self.base = base_ref_pose.detach().cpu().double()
        self.bounds = bounds
        lim = bounds.limits[0]
        self.camera = lim.camera
        self.kinv = self.camera.intrinsics_inv(torch.float64)
        self.p0 = transform_points(self.base, bounds.isocenter)[0]  # isocenter in the reference camera
        r = float(max_rotation_deg)
        u0, v0, u1, v1 = lim.box
        self.lower = np.array([-r, -r, -r, u0, v0, lim.depth[0]])
        self.upper = np.array([r, r, r, u1, v1, lim.depth[1]])

    def pose(self, x: Tensor) -> Tensor:
        """(B, 4, 4) reference-view poses for (B, 6) coordinates."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, 6)
        rot = euler_to_rotation(x[:, :3])
        ray = torch.cat([x[:, 3:5], torch.ones_like(x[:, :1])], 1) @ self.kinv.T  # (B, 3) with z = 1
        p_new = ray * x[:, 5:6]
        t = p_new - (rot @ self.p0.reshape(3, 1)).squeeze(-1)
        return make_pose(rot, t) @ self.base

    def coords(self, ref_pose: Tensor) -> Tensor:
        """(B, 6) coordinates of (B, 4, 4) poses (the inverse of :meth:`pose`)."""
        ref_pose = ref_pose.detach().double().reshape(-1, 4, 4)
        rel = ref_pose[:, :3, :3] @ self.base[:3, :3].T
        uvd = self.bounds.isocenter_uvd(ref_pose, 0)
        return torch.cat([rotation_to_euler(rel), uvd], 1)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lower, self.upper)
