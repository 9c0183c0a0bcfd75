"""The starting pose of a registration: reference AP view, C-arm angles or a given matrix, plus
the initial-pose sliders' offsets. Pure torch on plain values: the worker thread computes it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: How the starting pose is chosen.
INITIAL_POSE_MODES = ("ap", "carm", "transform")
#: sod / sdd of the paper's C-arm (700 / 1011.7 mm), used when the source-to-isocenter distance
#: is not known.
DEFAULT_SOD_FRACTION = 700.0 / 1011.7


@dataclass(frozen=True)
class PoseSpec:
    """What the GUI or a script asked for; ``basePose`` (camera_from_ct, 4x4) wins over ``mode``."""

    mode: str = "ap"
    basePose: np.ndarray | None = None
    sod: float | None = None
    primaryAngle: float = 0.0
    secondaryAngle: float = 0.0
    rotationOffsetDeg: tuple = (0.0, 0.0, 0.0)
    translationOffsetMm: tuple = (0.0, 0.0, 0.0)


def isocenterOf(volume):
    """LPS point the reference view looks at: the bone centroid (ValueError if no bone)."""
    return volume.bone_center_lps()


def _isFinitePositive(x) -> bool:
    try:
        return x is not None and float(x) > 0 and np.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def basePoseFor(camera, isocenter, mode="ap", sod=None, primaryAngle=0.0, secondaryAngle=0.0):
    """camera_from_ct of the reference AP view ("ap") or of C-arm angles ("carm")."""
    from CorrRegLib.geometry import c_arm_pose

    if mode not in ("ap", "carm", None):
        raise ValueError(f"unknown initial pose mode {mode!r}; choose one of {', '.join(INITIAL_POSE_MODES)}")
    sod = float(sod) if _isFinitePositive(sod) else DEFAULT_SOD_FRACTION * camera.sdd
    if sod >= camera.sdd:
        raise ValueError(f"the source-to-isocenter distance ({sod:g} mm) must be shorter than the "
                         f"source-to-detector distance ({camera.sdd:g} mm)")
    if mode == "carm":
        return c_arm_pose(isocenter, sod, float(primaryAngle or 0.0), float(secondaryAngle or 0.0))
    return c_arm_pose(isocenter, sod, 0.0, 0.0)


def withOffsets(base, isocenter, rotationOffsetDeg=(0.0, 0.0, 0.0), translationOffsetMm=(0.0, 0.0, 0.0)):
    """``base`` moved in the camera frame: a rotation (extrinsic x, y, z Euler angles, degrees)
    about the isocenter, then a translation (mm; x = image right, y = image down, z = depth)."""
    import torch
    from CorrRegLib.geometry import euler_to_rotation, rotation_about_point, transform_points

    base = torch.as_tensor(np.asarray(base, dtype=np.float64) if not hasattr(base, "detach") else base,
                           dtype=torch.float64)
    iso = torch.as_tensor(isocenter, dtype=torch.float64)
    rot = euler_to_rotation(torch.tensor([float(v) for v in rotationOffsetDeg], dtype=torch.float64))
    iso_cam = transform_points(base, iso.reshape(1, 3))[0]
    delta = rotation_about_point(rot, iso_cam, torch.tensor([float(v) for v in translationOffsetMm], dtype=torch.float64))
    return delta @ base


def poseFromSpec(spec: PoseSpec, camera, isocenter):
    """camera_from_ct (torch float64 4x4) that ``spec`` describes."""
    if spec.basePose is not None:
        base = spec.basePose
    else:
        if spec.mode == "transform":
            raise ValueError("initial pose from a transform was asked for but no initial transform node is selected")
        base = basePoseFor(camera, isocenter, spec.mode, spec.sod, spec.primaryAngle, spec.secondaryAngle)
    return withOffsets(base, isocenter, spec.rotationOffsetDeg, spec.translationOffsetMm)
