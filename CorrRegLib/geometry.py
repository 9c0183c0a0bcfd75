"""Camera model, rigid poses and frame conventions (see docs/conventions.md).

Frames: CT points are LPS millimetres; the camera frame has its origin at the X-ray source,
+z along the principal ray towards the detector, +x along detector columns, +y along detector
rows. A pose is ``camera_from_ct``: a (..., 4, 4) rigid transform mapping LPS points into the
camera frame. Every function here is batched over leading dimensions and differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import roma
import torch

Tensor = torch.Tensor

#: Euler convention used everywhere in CorrReg: extrinsic rotations about the x, then y, then
#: z axis of the frame the rotation acts in (R = Rz @ Ry @ Rx), angles in degrees.
EULER_CONVENTION = "xyz"

LPS_FROM_RAS = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


@dataclass(frozen=True)
class Camera:
    """Pinhole C-arm geometry: source at the origin, detector plane at z = sdd (mm).

    ``pixel_spacing`` is (dx, dy) in mm at the detector, ``size`` is (W, H) in pixels and
    ``principal_point`` is (cx, cy) in pixels (default: the image centre). Pixel (col c, row r)
    has its centre at u = c + 0.5, v = r + 0.5.

    ``focal_px`` is (fx, fy) in pixels, set when the camera came from an intrinsic matrix
    (:meth:`from_intrinsics`): :meth:`intrinsics` then returns exactly those values, and
    sdd / dx, sdd / dy agree with them to rounding (checked, 1e-9 relative).
    """

    sdd: float
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]
    principal_point: tuple[float, float] | None = None
    focal_px: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sdd) and self.sdd > 0):
            raise ValueError(f"sdd must be a positive distance in mm, got {self.sdd}")
        dx, dy = (float(v) for v in self.pixel_spacing)
        if not (dx > 0 and dy > 0 and math.isfinite(dx) and math.isfinite(dy)):
            raise ValueError(f"pixel spacing must be positive (mm), got {self.pixel_spacing}")
        w, h = (int(v) for v in self.size)
        if w < 1 or h < 1:
            raise ValueError(f"detector size must be at least 1 x 1 pixels, got {self.size}")
        object.__setattr__(self, "pixel_spacing", (dx, dy))
        object.__setattr__(self, "size", (w, h))
        object.__setattr__(self, "sdd", float(self.sdd))
        if self.principal_point is None:
            object.__setattr__(self, "principal_point", (w / 2.0, h / 2.0))
        else:
            cx, cy = (float(v) for v in self.principal_point)
            object.__setattr__(self, "principal_point", (cx, cy))
        if self.focal_px is not None:
            fx, fy = (float(v) for v in self.focal_px)
            for f, name, d in ((fx, "fx", dx), (fy, "fy", dy)):
                if not (math.isfinite(f) and f > 0):
                    raise ValueError(f"the focal length {name} must be a positive number of pixels, got {f}")
                if abs(self.sdd / d - f) > 1e-9 * f:
                    raise ValueError(
                        f"focal_px {name} = {f:.10g} px disagrees with sdd / pixel spacing = {self.sdd / d:.10g} px; "
                        "build the camera with Camera.from_intrinsics (or drop focal_px when changing sdd or spacing)"
                    )
            object.__setattr__(self, "focal_px", (fx, fy))

    @classmethod
    def from_intrinsics(
        cls,
        K,
        size: Sequence[int],
        pixel_spacing: float | Sequence[float] | None = None,
    ) -> "Camera":
        """Camera from a 3 x 3 intrinsic matrix in pixels, K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].

        ``K`` follows CorrReg's pixel convention (the centre of pixel (col c, row r) is at
        (c + 0.5, r + 0.5)), so ``intrinsics()`` returns it exactly; an OpenCV / MayaCam matrix
        (pixel centres at integers) needs cx + 0.5, cy + 0.5 first (``io.read_calibration`` does
        that). fx and fy may differ; skew (K[0, 1]) must be zero. ``size`` is (W, H).

        The projection depends only on fx, fy, cx, cy. The physical scale is set by
        ``pixel_spacing`` (dx, or (dx, dy), mm at the detector): sdd = fx * dx and dy = sdd / fy
        (a given dy more than 1 % away from that is refused). Without it the nominal
        ``NOMINAL_PIXEL_SPACING_MM`` = 1 mm is used, so sdd = fx mm: larger than the true sdd of
        any detector with pixels under 1 mm, so no object is ever placed beyond the detector.
        """
        k = torch.as_tensor(K, dtype=torch.float64).detach().cpu()
        if tuple(k.shape) != (3, 3) or not bool(torch.isfinite(k).all()):
            raise ValueError(f"an intrinsic matrix must be a finite 3 x 3 matrix, got shape {tuple(k.shape)}")
        k = k / k[2, 2] if k[2, 2] != 0 else k
        fx, skew, cx = (float(v) for v in k[0])
        k10, fy, cy = (float(v) for v in k[1])
        if abs(skew) > 1e-9 * max(abs(fx), 1.0):
            raise ValueError(
                f"the intrinsic matrix has a skew K[0, 1] = {skew:.6g}; CorrReg's camera has square-cornered pixels "
                "(skew 0). Recalibrate without skew (OpenCV does by default) or fold it into a rotated image"
            )
        if abs(k10) > 1e-9 * max(abs(fy), 1.0) or float(k[2, 0]) != 0.0 or float(k[2, 1]) != 0.0:
            raise ValueError(f"not an intrinsic matrix (expected [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]): {k.tolist()}")
        if not (fx > 0 and fy > 0):
            raise ValueError(
                f"the focal lengths must be positive pixels, got fx = {fx:g}, fy = {fy:g}; a negative one means a "
                "mirrored image axis: flip the image instead"
            )
        if pixel_spacing is None:
            dx = NOMINAL_PIXEL_SPACING_MM
            dy_given = None
        else:
            ps = [float(v) for v in (pixel_spacing if isinstance(pixel_spacing, (list, tuple)) else [pixel_spacing])]
            if len(ps) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in ps):
                raise ValueError(f"pixel_spacing must be dx or (dx, dy), positive mm, got {pixel_spacing}")
            dx, dy_given = ps[0], (ps[1] if len(ps) == 2 else None)
        sdd = fx * dx
        dy = sdd / fy
        if dy_given is not None and abs(dy_given / dy - 1.0) > 0.01:
            raise ValueError(
                f"pixel spacing ({dx:g}, {dy_given:g}) mm disagrees with the calibrated aspect fx / fy = {fx / fy:.6g} "
                f"(dy would be {dy:.6g} mm); give dx only"
            )
        return cls(sdd=sdd, pixel_spacing=(dx, dy), size=tuple(size), principal_point=(cx, cy), focal_px=(fx, fy))

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def intrinsics(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """K = [[sdd/dx, 0, cx], [0, sdd/dy, cy], [0, 0, 1]] (fx, fy = ``focal_px`` when set)."""
        dx, dy = self.pixel_spacing
        cx, cy = self.principal_point
        fx, fy = self.focal_px if self.focal_px is not None else (self.sdd / dx, self.sdd / dy)
        return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device)

    def intrinsics_inv(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        return torch.linalg.inv(self.intrinsics(torch.float64, device)).to(dtype)

    def pixel_rays(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """(H, W, 3) vectors from the source to each pixel centre on the detector, in mm."""
        dx, dy = self.pixel_spacing
        cx, cy = self.principal_point
        u = torch.arange(self.width, dtype=torch.float64, device=device) + 0.5
        v = torch.arange(self.height, dtype=torch.float64, device=device) + 0.5
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        x = (uu - cx) * dx
        y = (vv - cy) * dy
        z = torch.full_like(x, self.sdd)
        return torch.stack([x, y, z], dim=-1).to(dtype)

    def downsample(self, factor: float) -> "Camera":
        """The same detector seen with pixels ``factor`` times larger (coarse-to-fine levels)."""
        if factor <= 0:
            raise ValueError(f"downsampling factor must be positive, got {factor}")
        w = max(1, int(round(self.width / factor)))
        h = max(1, int(round(self.height / factor)))
        fx, fy = self.width / w, self.height / h
        cx, cy = self.principal_point
        return replace(
            self,
            pixel_spacing=(self.pixel_spacing[0] * fx, self.pixel_spacing[1] * fy),
            size=(w, h),
            principal_point=(cx / fx, cy / fy),
            focal_px=None if self.focal_px is None else (self.focal_px[0] / fx, self.focal_px[1] / fy),
        )

    def to_dict(self) -> dict:
        """The camera JSON of DESIGN.md."""
        return {
            "sdd_mm": self.sdd,
            "pixel_spacing_mm": list(self.pixel_spacing),
            "size_px": list(self.size),
            "principal_point_px": list(self.principal_point),
            **({"intrinsics_px": self.intrinsics().tolist()} if self.focal_px is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        if d.get("intrinsics_px") is not None:
            return cls._from_intrinsics_dict(d)
        missing = [k for k in ("sdd_mm", "pixel_spacing_mm", "size_px") if k not in d]
        if missing:
            raise ValueError(f"camera JSON lacks {missing}; expected keys sdd_mm, pixel_spacing_mm, size_px[, principal_point_px]")
        return cls(
            sdd=float(d["sdd_mm"]),
            pixel_spacing=tuple(d["pixel_spacing_mm"]),
            size=tuple(d["size_px"]),
            principal_point=tuple(d["principal_point_px"]) if d.get("principal_point_px") is not None else None,
        )

    @classmethod
    def _from_intrinsics_dict(cls, d: dict) -> "Camera":
        """Camera JSON with ``intrinsics_px`` (3 x 3, CorrReg pixel convention) and ``size_px``;
        ``pixel_spacing_mm`` optional (sets the physical scale); ``sdd_mm`` and
        ``principal_point_px`` optional and, if given, must agree with the matrix."""
        if d.get("size_px") is None:
            raise ValueError("a camera JSON with intrinsics_px also needs size_px [W, H]")
        ps = d.get("pixel_spacing_mm")
        cam = cls.from_intrinsics(d["intrinsics_px"], tuple(d["size_px"]), ps if ps is None or isinstance(ps, (int, float)) else tuple(ps))
        if d.get("sdd_mm") is not None and abs(float(d["sdd_mm"]) / cam.sdd - 1.0) > 1e-6:
            if ps is None:  # sdd given instead of the pixel size: the scale follows from it
                return cls.from_intrinsics(d["intrinsics_px"], tuple(d["size_px"]), float(d["sdd_mm"]) / cam.focal_px[0])
            raise ValueError(
                f"sdd_mm {float(d['sdd_mm']):g} disagrees with intrinsics_px fx x pixel_spacing_mm dx = {cam.sdd:g} mm"
            )
        pp = d.get("principal_point_px")
        if pp is not None and max(abs(float(a) - b) for a, b in zip(pp, cam.principal_point)) > 1e-6:
            raise ValueError(f"principal_point_px {list(pp)} disagrees with intrinsics_px (cx, cy) = {list(cam.principal_point)}")
        return cam


#: Physical pixel size (mm) assumed by :meth:`Camera.from_intrinsics` when none is known; only
#: fx, fy, cx, cy matter to the projection, so it only sets the nominal sdd (= fx mm).
NOMINAL_PIXEL_SPACING_MM = 1.0


# --------------------------------------------------------------------------------------------
# Rigid transforms


def make_pose(rotation: Tensor, translation: Tensor) -> Tensor:
    """(..., 4, 4) homogeneous matrix from (..., 3, 3) rotation and (..., 3) translation."""
    batch = rotation.shape[:-2]
    top = torch.cat([rotation, translation.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros(*batch, 1, 4, dtype=rotation.dtype, device=rotation.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def invert_pose(pose: Tensor) -> Tensor:
    """Inverse of a rigid (..., 4, 4) transform, using R^T rather than a general inverse."""
    rt = pose[..., :3, :3].transpose(-1, -2)
    return make_pose(rt, -(rt @ pose[..., :3, 3:]).squeeze(-1))


def check_rigid(pose: Tensor, tol: float = 1e-4) -> Tensor:
    """Raise ValueError unless ``pose`` is a finite (..., 4, 4) rigid transform; returns it."""
    if not isinstance(pose, torch.Tensor):
        pose = torch.as_tensor(pose, dtype=torch.float64)
    if pose.shape[-2:] != (4, 4):
        raise ValueError(f"a pose must be a 4x4 matrix, got shape {tuple(pose.shape)}")
    if not torch.isfinite(pose).all():
        raise ValueError("the pose contains NaN or Inf")
    p = pose.detach().double()
    r = p[..., :3, :3]
    eye = torch.eye(3, dtype=torch.float64, device=p.device)
    ortho = (r.transpose(-1, -2) @ r - eye).abs().amax().item()
    det = torch.linalg.det(r)
    last = (p[..., 3, :] - torch.tensor([0, 0, 0, 1.0], dtype=torch.float64, device=p.device)).abs().amax().item()
    if ortho > tol or (det - 1).abs().amax().item() > tol or last > tol:
        raise ValueError(
            "the pose is not rigid: its 3x3 block must be a rotation (orthonormal, det +1) and its last "
            f"row [0, 0, 0, 1] (orthogonality error {ortho:.2g}, det {det.flatten()[0].item():.4g})"
        )
    return pose


def transform_points(pose: Tensor, points: Tensor) -> Tensor:
    """Apply (..., 4, 4) transforms to (..., N, 3) points."""
    return points @ pose[..., :3, :3].transpose(-1, -2) + pose[..., None, :3, 3]


def pose_from_rotvec_translation(rotvec: Tensor, translation: Tensor) -> Tensor:
    """Pose from an axis-angle vector (radians) and a translation (mm)."""
    return make_pose(roma.rotvec_to_rotmat(rotvec), translation)


def rotvec_translation_from_pose(pose: Tensor) -> tuple[Tensor, Tensor]:
    return roma.rotmat_to_rotvec(pose[..., :3, :3]), pose[..., :3, 3]


def euler_to_rotation(angles_deg: Tensor, convention: str = EULER_CONVENTION) -> Tensor:
    """Rotation matrices from Euler angles in degrees (default: extrinsic x, y, z)."""
    return roma.euler_to_rotmat(convention, angles_deg, degrees=True)


def rotation_to_euler(rotation: Tensor, convention: str = EULER_CONVENTION) -> Tensor:
    return torch.stack(roma.rotmat_to_euler(convention, rotation, degrees=True, as_tuple=True), dim=-1)


def _skew(w: Tensor) -> Tensor:
    zero = torch.zeros_like(w[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -w[..., 2], w[..., 1]], -1),
            torch.stack([w[..., 2], zero, -w[..., 0]], -1),
            torch.stack([-w[..., 1], w[..., 0], zero], -1),
        ],
        -2,
    )


def _left_jacobian_coeffs(theta2: Tensor) -> tuple[Tensor, Tensor]:
    """(1 - cos t)/t^2 and (t - sin t)/t^3, with Taylor series near zero (twice differentiable)."""
    small = theta2 < 1e-6
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    a = torch.where(small, 0.5 - theta2 / 24.0, (1 - torch.cos(t)) / t2)
    b = torch.where(small, 1.0 / 6.0 - theta2 / 120.0, (t - torch.sin(t)) / (t2 * t))
    return a, b


def se3_exp(xi: Tensor) -> Tensor:
    """Exponential map: twist (..., 6) = (rotation vector, translational part) -> (..., 4, 4)."""
    w, v = xi[..., :3], xi[..., 3:]
    rot = roma.rotvec_to_rotmat(w)
    a, b = _left_jacobian_coeffs((w * w).sum(-1))
    wx = _skew(w)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    jac = eye + a[..., None, None] * wx + b[..., None, None] * (wx @ wx)
    return make_pose(rot, (jac @ v.unsqueeze(-1)).squeeze(-1))


def se3_log(pose: Tensor) -> Tensor:
    """Logarithm map: (..., 4, 4) -> twist (..., 6) = (rotation vector, translational part)."""
    w = roma.rotmat_to_rotvec(pose[..., :3, :3])
    theta2 = (w * w).sum(-1)
    small = theta2 < 1e-6
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    # V^-1 = I - wx/2 + c wx^2 with c = (1 - t sin t / (2 (1 - cos t))) / t^2
    c = torch.where(small, 1.0 / 12.0 + theta2 / 720.0, (1 - t * torch.sin(t) / (2 * (1 - torch.cos(t)))) / t2)
    wx = _skew(w)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    vinv = eye - 0.5 * wx + c[..., None, None] * (wx @ wx)
    v = (vinv @ pose[..., :3, 3:]).squeeze(-1)
    return torch.cat([w, v], dim=-1)


def geodesic_distance(pose_a: Tensor, pose_b: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation angle (degrees) and translation norm (mm) of pose_a^-1 @ pose_b."""
    rel = invert_pose(pose_a) @ pose_b
    cos = ((rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2] - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)), rel[..., :3, 3].norm(dim=-1)


def rotation_about_point(rotation: Tensor, center: Tensor, translation: Tensor | None = None) -> Tensor:
    """Transform x -> R (x - c) + c + t: rotation about ``center`` followed by a translation."""
    t = center - (rotation @ center.unsqueeze(-1)).squeeze(-1)
    if translation is not None:
        t = t + translation
    return make_pose(rotation, t)


def random_perturbations(pose: Tensor, center: Tensor, count: int, deg: float, mm: float, seed: int) -> list[Tensor]:
    """``count`` poses: ``pose`` (4, 4) turned by ``deg`` about a random axis through ``center``
    (a point in the pose's source frame, e.g. the CT's isocenter) and moved ``mm`` in a random
    direction, both in the pose's target frame; seeded (numpy's default_rng)."""
    rng = np.random.default_rng(seed)
    c = transform_points(pose, center.reshape(1, 3).to(pose))[0]
    out = []
    for _ in range(count):
        axis = rng.normal(size=3)
        move = rng.normal(size=3)
        rotvec = torch.tensor(axis / np.linalg.norm(axis) * math.radians(deg), dtype=torch.float64)
        shift = torch.tensor(move / np.linalg.norm(move) * mm, dtype=torch.float64)
        out.append(rotation_about_point(roma.rotvec_to_rotmat(rotvec), c, shift) @ pose)
    return out


# --------------------------------------------------------------------------------------------
# Reference views and frame conversions


def reference_ap_pose(isocenter_lps: Sequence[float] | Tensor, sod: float, dtype=torch.float64) -> Tensor:
    """AP view: camera x = L, y = inferior, z = posterior; isocenter on the principal ray at sod.

    Returns camera_from_ct (4, 4).
    """
    iso = torch.as_tensor(isocenter_lps, dtype=dtype).reshape(3)
    # Rows of R are the camera axes expressed in LPS.
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=dtype)
    t = torch.tensor([0.0, 0.0, float(sod)], dtype=dtype) - rot @ iso
    return make_pose(rot, t)


def c_arm_pose(
    isocenter_lps: Sequence[float] | Tensor, sod: float, primary_deg: float = 180.0, secondary_deg: float = 0.0,
    dtype=torch.float64,
) -> Tensor:
    """camera_from_ct for a C-arm at DICOM positioner angles, isocenter at depth ``sod``.

    As DICOM (PositionerPrimaryAngle / PositionerSecondaryAngle) defines them, the angles give the
    detector's position about the patient: primary 0 deg = detector in front of the chest, +90
    = at the patient's left (LAO), -90 = right (RAO); secondary + towards the head (CRA), -
    towards the feet (CAU). The camera z axis points from the isocenter to the detector, y is
    the patient's inferior direction made orthogonal to z, x = y cross z. DESIGN.md's reference
    AP view (beam anterior to posterior) is primary = 180, secondary = 0, the default.
    """
    iso = torch.as_tensor(isocenter_lps, dtype=dtype).reshape(3)
    p, s = math.radians(primary_deg), math.radians(secondary_deg)
    z = torch.tensor([math.sin(p) * math.cos(s), -math.cos(p) * math.cos(s), math.sin(s)], dtype=dtype)
    down = torch.tensor([0.0, 0.0, -1.0], dtype=dtype)
    if abs(float(down @ z)) > 0.999:  # looking along the body axis: use anterior as "down"
        down = torch.tensor([0.0, -1.0, 0.0], dtype=dtype)
    y = down - (down @ z) * z
    y = y / y.norm()
    x = torch.linalg.cross(y, z)
    rot = torch.stack([x, y, z])
    return make_pose(rot, torch.tensor([0.0, 0.0, float(sod)], dtype=dtype) - rot @ iso)


def ras_from_lps(m: Tensor) -> Tensor:
    """Convert a (..., 4, 4) transform between LPS frames into the same transform between RAS
    frames (or vice versa: the conversion is its own inverse)."""
    flip = LPS_FROM_RAS.to(dtype=m.dtype, device=m.device)
    return flip @ m @ flip


def lps_to_ras_points(points: Tensor) -> Tensor:
    return points * torch.tensor([-1.0, -1.0, 1.0], dtype=points.dtype, device=points.device)


ras_to_lps_points = lps_to_ras_points


def project_points(camera: Camera, pose: Tensor, points_ct: Tensor) -> Tensor:
    """Pixel coordinates (u, v) of (..., N, 3) LPS points under camera_from_ct ``pose``."""
    pc = transform_points(pose, points_ct)
    k = camera.intrinsics(pc.dtype, pc.device)
    uvw = pc @ k.T
    return uvw[..., :2] / uvw[..., 2:3]


def detector_points_mm(camera: Camera, pose: Tensor, points_ct: Tensor) -> Tensor:
    """Projections of LPS points on the detector plane, in mm relative to the principal point."""
    pc = transform_points(pose, points_ct)
    return camera.sdd * pc[..., :2] / pc[..., 2:3]
