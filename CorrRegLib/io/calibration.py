"""Calibrated cameras from the files biplane and robotics users have.

One entry point, :func:`read_calibration`, reads

* **CorrReg's camera JSON** (``docs/io.md``): ``sdd_mm`` / ``pixel_spacing_mm`` or
  ``intrinsics_px`` (3 x 3, CorrReg's pixel convention), ``size_px``, and optionally
  ``camera_from_world`` (4 x 4, mm);
* **MayaCam 2.0** ``.txt`` (XMALab's export, read by Autoscoper): image size, a 3 x 3 camera
  matrix, a 3 x 3 rotation and a translation;
* **OpenCV** K / R / t, as ``cv::FileStorage`` YAML (``%YAML:1.0``, ``!!opencv-matrix``) or
  JSON, ROS camera_info YAML included (keys such as ``camera_matrix`` / ``K``, ``rvec`` or
  ``R``, ``tvec`` / ``t``, ``image_width`` / ``image_height``).

Every reader returns the camera in CorrReg's frame (DESIGN.md: origin at the source, +x along
image columns, +y along image rows (row 0 at the top), +z towards the detector, mm) and
``camera_from_world``, the rigid 4 x 4 map from the calibration's world frame (mm) into it.

Conventions of the external formats (established in docs/real-data.md):

* **OpenCV** (and XMALab, which "uses the OpenCV pinhole camera model"): a world point X maps
  to camera coordinates x = R X + t (R, t are world-to-camera), the camera's axes are x right,
  y down, z forward (CorrReg's), and the pixel is (u, v) = (fx x/z + cx, fy y/z + cy) with
  (0, 0) the *centre* of the top-left pixel. CorrReg puts that centre at (0.5, 0.5), so
  cx_corrreg = cx_opencv + 0.5 and cy_corrreg = cy_opencv + 0.5. ``rvec`` is a Rodrigues
  rotation vector (radians) of the same R.
* **MayaCam 2.0** stores exactly the OpenCV quantities, written row by row: ``image size``
  (width, height as Autoscoper's reader uses them; its documentation says "height,width",
  which only matters for non-square images and is resolved against the image when given),
  ``camera matrix`` K, ``rotation`` R and ``translation`` t with x = R X + t. Autoscoper's
  loader (libautoscoper/src/Camera.cpp, ``loadMayaCam2``) shows it: it places the camera at
  -R^T t, takes R's rows as the camera's right / down / forward axes (negating the last two
  for OpenGL's up / backward) and flips cy as (H - 1) - cy, i.e. rows counted from the top
  with pixel centres at integers. The bead triangulation of the wrist data set proves it
  (Testing/Benchmarks/wrist_beads.py).

Lengths in the files are taken as millimetres unless ``unit_mm`` says otherwise (e.g. 1000 for
a calibration in metres).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import roma
import torch

from ..geometry import Camera, check_rigid
from ._common import PathLike, Tensor, _path, _require_exists, _write_json
from ._filestorage import parse_filestorage_yaml

#: Offset from OpenCV's pixel coordinates (pixel centres at integers) to CorrReg's (at + 0.5).
OPENCV_TO_CORRREG_PX = 0.5

_FORMATS = (
    "CorrReg camera JSON (sdd_mm/pixel_spacing_mm or intrinsics_px, size_px, camera_from_world), "
    "MayaCam 2.0 .txt (XMALab/Autoscoper), OpenCV FileStorage YAML/JSON (camera_matrix, R or rvec, t/tvec)"
)


@dataclass(frozen=True)
class Calibration:
    """A calibrated X-ray camera.

    ``camera``: CorrReg's intrinsics (``Camera``, pixel centres at +0.5).
    ``camera_from_world``: float64 (4, 4) rigid map from the calibration's world frame (mm) into
    the camera frame (x along columns, y along rows, z towards the detector), or None when the
    file has no extrinsics. ``source``: "corrreg-json", "mayacam-2.0", "opencv-yaml" or
    "opencv-json". ``distortion``: the lens distortion coefficients the file lists (CorrReg
    models none: the image must already be undistorted), None if absent.
    """

    camera: Camera
    camera_from_world: Tensor | None
    source: str
    path: str | None = None
    distortion: tuple[float, ...] | None = None

    def world_from_camera(self) -> Tensor:
        """The inverse of ``camera_from_world``: the camera's pose in the world (4, 4)."""
        if self.camera_from_world is None:
            raise ValueError(f"the calibration {self.path} has no camera_from_world (extrinsics)")
        from ..geometry import invert_pose

        return invert_pose(self.camera_from_world)

    def source_position_world(self) -> Tensor:
        """The X-ray source (focal spot, the camera's origin) in world coordinates (3,), mm."""
        return self.world_from_camera()[:3, 3]

    def projection_matrix(self) -> Tensor:
        """P = K [R | t] (3, 4), float64: world points (mm) to CorrReg pixel coordinates."""
        if self.camera_from_world is None:
            raise ValueError(f"the calibration {self.path} has no camera_from_world (extrinsics)")
        return self.camera.intrinsics() @ self.camera_from_world[:3, :]


# --------------------------------------------------------------------------------------------
# helpers


def _matrix(value: Any, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
    """A numeric array of ``shape`` from nested lists, a flat list, or an OpenCV matrix node."""
    if isinstance(value, dict) and "data" in value:  # FileStorage JSON or a ROS {rows, cols, data} node
        value = value["data"]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} is not numeric ({str(value)[:80]})") from None
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{where}: {what} must have {int(np.prod(shape))} values {shape}, got {arr.size}")
    arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: {what} contains NaN or Inf")
    return arr


def _rigid(rotation: np.ndarray, translation: np.ndarray, where: str, what: str) -> Tensor:
    r = torch.as_tensor(rotation, dtype=torch.float64)
    det = float(torch.linalg.det(r))
    if det < 0:
        raise ValueError(
            f"{where}: the {what} rotation has determinant {det:.4f} < 0 (a mirror, not a rotation); "
            "the calibration's world frame or image axes are flipped"
        )
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = r
    pose[:3, 3] = torch.as_tensor(translation, dtype=torch.float64).reshape(3)
    try:
        return check_rigid(pose, tol=1e-5)
    except ValueError as err:
        raise ValueError(f"{where}: the {what} is not a rigid transform ({err})") from None


def _camera_from_opencv_k(k_cv: np.ndarray, size: tuple[int, int], pixel_spacing, where: str) -> Camera:
    k = np.array(k_cv, dtype=np.float64)
    k[0, 2] += OPENCV_TO_CORRREG_PX
    k[1, 2] += OPENCV_TO_CORRREG_PX
    try:
        return Camera.from_intrinsics(k, size, pixel_spacing)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _resolve_size(file_size: tuple[int, int] | None, image_size, where: str, order_note: str = "") -> tuple[int, int]:
    if image_size is not None:
        w, h = (int(v) for v in image_size)
        if file_size is None or tuple(file_size) == (w, h):
            return w, h
        if tuple(file_size) == (h, w):
            warnings.warn(
                f"{where} gives the image size as {file_size[0]},{file_size[1]}; the image is {w} x {h}, so the file "
                f"lists height first{order_note}; reading it that way",
                stacklevel=4,
            )
            return w, h
        raise ValueError(
            f"{where} describes a {file_size[0]} x {file_size[1]} image but the X-ray is {w} x {h} pixels; "
            "this calibration belongs to another camera or image size (was the image cropped or binned?)"
        )
    if file_size is None:
        raise ValueError(f"{where} does not give the image size; pass image_size=(W, H) (the X-ray's size)")
    return int(file_size[0]), int(file_size[1])


def with_pixel_spacing(camera: Camera, pixel_spacing: float | Sequence[float]) -> Camera:
    """The same projection (K unchanged) with a known physical pixel size (mm) at the detector."""
    return Camera.from_intrinsics(camera.intrinsics(), camera.size, pixel_spacing)


# --------------------------------------------------------------------------------------------
# MayaCam 2.0


def _read_mayacam2(text: str, where: str, image_size, pixel_spacing, unit_mm: float) -> Calibration:
    sections: dict[str, list[list[float]]] = {}
    current = None
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        key = line.lower()
        if key in ("image size", "camera matrix", "rotation", "translation"):
            current = key
            sections[current] = []
            continue
        if current is None:
            raise ValueError(f"{where}: line {no} ({line[:40]!r}) comes before the 'image size' header of MayaCam 2.0")
        try:
            sections[current].append([float(v) for v in line.replace(",", " ").split()])
        except ValueError:
            raise ValueError(f"{where}: line {no} ({line[:40]!r}) under '{current}' is not numbers") from None
    expect = {"image size": (2,), "camera matrix": (3, 3), "rotation": (3, 3), "translation": (3,)}
    missing = [k for k in expect if k not in sections]
    if missing:
        raise ValueError(f"{where}: a MayaCam 2.0 file needs the sections {list(expect)}; missing {missing}")
    vals = {k: _matrix([v for row in sections[k] for v in row], shape, f"'{k}'", where) for k, shape in expect.items()}
    a, b = vals["image size"]
    if a != int(a) or b != int(b) or a < 1 or b < 1:
        raise ValueError(f"{where}: 'image size' must be two positive integers, got {a:g},{b:g}")
    size = _resolve_size((int(a), int(b)), image_size, where, " (as Autoscoper's documentation writes it)")
    camera = _camera_from_opencv_k(vals["camera matrix"], size, pixel_spacing, where)
    pose = _rigid(vals["rotation"], vals["translation"] * unit_mm, where, "MayaCam rotation/translation")
    return Calibration(camera, pose, "mayacam-2.0", where)


# --------------------------------------------------------------------------------------------
# OpenCV FileStorage YAML / JSON

_K_KEYS = ("camera_matrix", "cameraMatrix", "K", "intrinsic_matrix", "intrinsics", "intrinsic", "M", "mtx")
_R_KEYS = ("R", "rotation_matrix", "rotation", "Rmat", "rmat")
_RVEC_KEYS = ("rvec", "rvecs", "rotation_vector", "r")
_T_KEYS = ("t", "T", "tvec", "tvecs", "translation", "translation_vector")
_DIST_KEYS = ("distortion_coefficients", "dist_coeffs", "distCoeffs", "D", "distortion", "dist")


def _first(d: dict, keys: Sequence[str]):
    for k in keys:
        if k in d and d[k] is not None:
            return k, d[k]
    return None, None


def _opencv_size(d: dict, where: str) -> tuple[int, int] | None:
    for wk, hk in (("image_width", "image_height"), ("width", "height"), ("imageWidth", "imageHeight")):
        if wk in d and hk in d:
            return int(d[wk]), int(d[hk])
    _, size = _first(d, ("image_size", "imageSize", "size"))
    if size is not None:
        s = _matrix(size, (2,), "image_size", where)
        return int(s[0]), int(s[1])
    return None


def _from_opencv_dict(d: dict, source: str, where: str, image_size, pixel_spacing, unit_mm: float) -> Calibration:
    if "M1" in d and "M2" in d:
        raise ValueError(
            f"{where} holds a stereo pair (M1, M2, R, T from stereoCalibrate); write each camera's K, R, t "
            "(camera_from_world of its own) to a file of its own"
        )
    kkey, kval = _first(d, _K_KEYS)
    if kkey is None:
        raise ValueError(f"{where}: no camera matrix found; expected one of the keys {list(_K_KEYS)} ({_FORMATS})")
    k_cv = _matrix(kval, (3, 3), kkey, where)
    size = _resolve_size(_opencv_size(d, where), image_size, where)
    camera = _camera_from_opencv_k(k_cv, size, pixel_spacing, where)

    rkey, rval = _first(d, _R_KEYS)
    vkey, vval = _first(d, _RVEC_KEYS)
    tkey, tval = _first(d, _T_KEYS)
    if "extrinsic_parameters" in d and rkey is None and vkey is None:
        ext = np.asarray(d["extrinsic_parameters"], dtype=np.float64)
        if ext.ndim != 2 or ext.shape[1] != 6 or ext.shape[0] != 1:
            raise ValueError(
                f"{where}: extrinsic_parameters holds {ext.shape[0] if ext.ndim == 2 else '?'} views (rvec | tvec per "
                "row); keep the row of this X-ray's view only"
            )
        vkey, vval, tkey, tval = "extrinsic_parameters", ext[0, :3], "extrinsic_parameters", ext[0, 3:]
    pose = None
    if (rkey or vkey) and tkey is None or tkey and not (rkey or vkey):
        raise ValueError(f"{where}: the extrinsics need both a rotation ({list(_R_KEYS + _RVEC_KEYS)}) and a translation ({list(_T_KEYS)})")
    if rkey is not None:
        rot = _matrix(rval, (3, 3), rkey, where)
    elif vkey is not None:
        rv = _matrix(vval, (3,), vkey, where)
        rot = roma.rotvec_to_rotmat(torch.as_tensor(rv, dtype=torch.float64)).numpy()
    if tkey is not None:
        pose = _rigid(rot, _matrix(tval, (3,), tkey, where) * unit_mm, where, "OpenCV R/t")

    distortion = None
    dkey, dval = _first(d, _DIST_KEYS)
    if dkey is not None:
        arr = np.asarray(dval["data"] if isinstance(dval, dict) and "data" in dval else dval, dtype=np.float64).reshape(-1)
        distortion = tuple(float(v) for v in arr)
        if np.any(np.abs(arr) > 0):
            warnings.warn(
                f"{where} lists non-zero lens distortion {distortion}; CorrReg models an ideal pinhole, so register "
                "undistorted images (e.g. cv2.undistort with these coefficients)",
                stacklevel=3,
            )
    return Calibration(camera, pose, source, where, distortion)


# --------------------------------------------------------------------------------------------
# CorrReg camera JSON


def _is_corrreg_json(d: dict) -> bool:
    return any(k in d for k in ("sdd_mm", "pixel_spacing_mm", "intrinsics_px", "size_px", "camera_from_world"))


def _from_corrreg_dict(d: dict, where: str, image_size, pixel_spacing) -> Calibration:
    d = dict(d)
    if d.get("size_px") is None and image_size is not None:
        d["size_px"] = [int(v) for v in image_size]
    elif d.get("size_px") is not None and image_size is not None and tuple(d["size_px"]) != tuple(image_size):
        raise ValueError(f"{where} describes a {d['size_px'][0]} x {d['size_px'][1]} image but the X-ray is {image_size[0]} x {image_size[1]}")
    try:
        camera = Camera.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid camera JSON ({err}); expected {_FORMATS}") from None
    if pixel_spacing is not None:
        camera = with_pixel_spacing(camera, pixel_spacing)
    pose = None
    if d.get("camera_from_world") is not None:
        m = _matrix(d["camera_from_world"], (4, 4), "camera_from_world", where)
        pose = _rigid(m[:3, :3], m[:3, 3], where, "camera_from_world")
        if np.abs(m[3] - np.array([0, 0, 0, 1.0])).max() > 1e-9:
            raise ValueError(f"{where}: camera_from_world's last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    return Calibration(camera, pose, "corrreg-json", where)


# --------------------------------------------------------------------------------------------
# entry points


def read_calibration(
    path: PathLike,
    image_size: Sequence[int] | None = None,
    pixel_spacing: float | Sequence[float] | None = None,
    unit_mm: float = 1.0,
) -> Calibration:
    """Read a calibrated camera: CorrReg camera JSON, MayaCam 2.0, or OpenCV YAML / JSON.

    The format is recognised from the content. ``image_size`` (W, H), the X-ray's size, is
    checked against the file (and fills it in when the file has none). ``pixel_spacing`` (mm)
    sets the physical pixel size of a camera given by its intrinsic matrix (otherwise a nominal
    1 mm, see ``Camera.from_intrinsics``; the projection does not depend on it). ``unit_mm``
    converts the file's translations to mm (1000 for metres). See the module docstring for each
    format's convention.
    """
    p = _path(path)
    _require_exists(p, "calibration file")
    where = str(p)
    if not (math.isfinite(unit_mm) and unit_mm > 0):
        raise ValueError(f"unit_mm must be a positive number of mm per file unit, got {unit_mm}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot read the calibration file {p} as text ({err}); expected {_FORMATS}") from None
    head = text.lstrip()
    first = head.splitlines()[0].strip().lower() if head else ""
    if not head:
        raise ValueError(f"the calibration file {p} is empty; expected {_FORMATS}")
    if head.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p} is not valid JSON ({err}); expected {_FORMATS}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a calibration JSON must be an object; expected {_FORMATS}")
        if _is_corrreg_json(d):
            return _from_corrreg_dict(d, where, image_size, pixel_spacing)
        return _from_opencv_dict(d, "opencv-json", where, image_size, pixel_spacing, unit_mm)
    if first == "image size":
        return _read_mayacam2(text, where, image_size, pixel_spacing, unit_mm)
    rows = [ln for ln in head.splitlines() if ln.strip()]
    if len(rows) == 5 and all(len(r.split(",")) == 3 for r in rows):
        raise ValueError(
            f"{p} looks like a MayaCam 1.0 file (5 lines of 3 numbers), which CorrReg does not read; "
            "export MayaCams 2.0 from XMALab instead"
        )
    try:
        d = parse_filestorage_yaml(text)
    except ValueError as err:
        raise ValueError(f"cannot read {p} as a calibration ({err}); expected {_FORMATS}") from None
    if _is_corrreg_json(d):
        return _from_corrreg_dict(d, where, image_size, pixel_spacing)
    return _from_opencv_dict(d, "opencv-yaml", where, image_size, pixel_spacing, unit_mm)


def calibration_to_dict(camera: Camera | Calibration, camera_from_world: Tensor | None = None) -> dict:
    """CorrReg's camera JSON of a camera (with ``intrinsics_px`` when it came from a matrix) and,
    if known, its ``camera_from_world`` (4 x 4, mm)."""
    if isinstance(camera, Calibration):
        camera_from_world = camera.camera_from_world if camera_from_world is None else camera_from_world
        camera = camera.camera
    d = camera.to_dict()
    if camera_from_world is not None:
        m = check_rigid(torch.as_tensor(camera_from_world, dtype=torch.float64))
        d["camera_from_world"] = m.tolist()
    return d


def write_calibration(camera: Camera | Calibration, path: PathLike, camera_from_world: Tensor | None = None) -> Path:
    """Write CorrReg's camera JSON (full float64 precision, so a round trip is exact)."""
    return _write_json(calibration_to_dict(camera, camera_from_world), path)
