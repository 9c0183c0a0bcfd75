"""Reading and writing CTs, X-rays, cameras, poses and targets (see docs/io.md).

All image I/O goes through SimpleITK, so every format it reads works: NIfTI, NRRD, MetaImage,
a DICOM series folder for CTs; a 2D image file (NRRD/MHA/NIfTI/PNG/TIFF) or a DICOM file for
X-rays. Geometry follows DESIGN.md: CT coordinates are LPS millimetres, poses are
``camera_from_ct`` 4x4 rigid transforms, X-ray arrays are indexed [row, col].

Errors are ``ValueError`` (or ``FileNotFoundError``) whose message names the problem and the fix,
because these functions sit right behind the command line and the Slicer module.

One module per kind of file: ``ct`` (and ``ct_geometry`` for CTs without geometry), ``xray``,
``camera`` (camera JSON), ``calibration`` (calibrated cameras: CorrReg JSON, MayaCam 2.0,
OpenCV), ``poses``, ``targets``; the public names are re-exported here.
"""

from ._common import CAMERA_METADATA_KEY, _suffix  # noqa: F401  (used by benchmark and the Slicer module)
from .calibration import Calibration, read_calibration, write_calibration
from .camera import camera_json_path, read_camera_json, write_camera_json
from .ct import HUImage, read_ct, read_ct_hu, read_ct_label, write_ct
from .poses import (read_pose_itk, read_pose_json, read_world_pose_json, write_pose_itk, write_pose_json,
                    write_world_pose_json)
from .targets import read_targets, write_targets_csv, write_targets_markups
from .xray import XRay, read_xray, write_xray, xray_initial_pose

__all__ = [
    "HUImage",
    "XRay",
    "Calibration",
    "read_calibration",
    "write_calibration",
    "read_ct",
    "read_ct_hu",
    "read_ct_label",
    "write_ct",
    "read_xray",
    "write_xray",
    "xray_initial_pose",
    "camera_json_path",
    "read_camera_json",
    "write_camera_json",
    "read_pose_json",
    "write_pose_json",
    "read_world_pose_json",
    "write_world_pose_json",
    "read_pose_itk",
    "write_pose_itk",
    "read_targets",
    "write_targets_csv",
    "write_targets_markups",
]
