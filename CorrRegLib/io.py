"""Reading and writing CTs, X-rays, cameras, poses and targets (see docs/io.md).

All image I/O goes through SimpleITK, so every format it reads works: NIfTI, NRRD, MetaImage,
a DICOM series folder for CTs; a 2D image file (NRRD/MHA/NIfTI/PNG/TIFF) or a DICOM file for
X-rays. Geometry follows DESIGN.md: CT coordinates are LPS millimetres, poses are
``camera_from_ct`` 4x4 rigid transforms, X-ray arrays are indexed [row, col].

Errors are ``ValueError`` (or ``FileNotFoundError``) whose message names the problem and the fix,
because these functions sit right behind the command line and the Slicer module.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import Camera, c_arm_pose, check_rigid, ras_from_lps
from .volume import Volume, attenuation_to_hu

Tensor = torch.Tensor
PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "HUImage",
    "XRay",
    "read_ct",
    "read_ct_hu",
    "write_ct",
    "read_xray",
    "write_xray",
    "xray_initial_pose",
    "camera_json_path",
    "read_camera_json",
    "write_camera_json",
    "read_pose_json",
    "write_pose_json",
    "read_pose_itk",
    "write_pose_itk",
    "read_targets",
    "write_targets_csv",
    "write_targets_markups",
]

#: Metadata key under which ``write_xray`` stores the camera JSON in NRRD / MetaImage headers.
CAMERA_METADATA_KEY = "corrreg_camera"

_COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".mrk.json", ".camera.json", ".pose.json")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_HEADER_SPACING_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz")


# --------------------------------------------------------------------------------------------
# Small helpers


def _path(path: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def _write_json(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` as indented JSON, creating the parent folder."""
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return p


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _suffix(path: Path) -> str:
    """Lower-case extension, keeping compound ones such as .nii.gz whole."""
    name = path.name.lower()
    for s in _COMPOUND_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _stem(path: Path) -> str:
    """File name without its (possibly compound) extension: x.nii.gz -> x."""
    suf = _suffix(path)
    return path.name[: len(path.name) - len(suf)] if suf else path.name


def _is_dicom_file(path: Path) -> bool:
    if _suffix(path) in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _sitk_error(path: Path, err: Exception, what: str) -> ValueError:
    first = str(err).strip().splitlines()
    detail = next((ln for ln in reversed(first) if "ERROR" in ln or "error" in ln), first[-1] if first else "")
    return ValueError(
        f"cannot read {what} {path}: SimpleITK failed ({detail.strip()}). "
        "Use a format SimpleITK reads (NIfTI, NRRD, MHA, DICOM, PNG, TIFF)."
    )


def _read_info(path: Path, what: str) -> sitk.ImageFileReader:
    """An ImageFileReader on ``path`` with the header read (no pixels yet)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _sitk_error(path, err, what) from None
    return reader


def _execute(reader, path: Path, what: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(path, err, what) from None


def _check_spacing(spacing: Sequence[float], path: Path | str, what: str) -> None:
    bad = [s for s in spacing if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(
            f"{what} {path} has zero, negative or non-finite voxel spacing {tuple(spacing)}; "
            "fix the header (spacing must be positive millimetres), e.g. with SimpleITK's SetSpacing"
        )


def _meta(reader_or_image, key: str) -> str | None:
    if reader_or_image.HasMetaDataKey(key):
        value = reader_or_image.GetMetaData(key).strip()
        return value or None
    return None


def _floats(text: str | None) -> list[float] | None:
    """Parse a DICOM multi-valued decimal string "a\\b" (or spaces / commas) into floats."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.replace("\\", " ").replace(",", " ").split()]
    except ValueError:
        return None
    return vals or None


def _as_numpy(x: Any, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# CT


class HUImage(NamedTuple):
    """A CT in Hounsfield units with its ITK geometry: ``Volume.from_hu(*image)`` works."""

    hu: Tensor  # (K, J, I) float32
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    def to_volume(self) -> Volume:
        """Attenuation volume (1/mm) via volume.hu_to_attenuation."""
        return Volume.from_hu(self.hu, self.spacing, self.origin, self.direction)


def _dicom_series_files(folder: Path, containing: Path | None = None) -> list[str]:
    """File names of the DICOM series in ``folder`` (the one holding ``containing`` if given,
    otherwise the largest), sorted by slice position."""
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        ids = ()
    series = {sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    if containing is not None:
        target = os.path.realpath(containing)
        for files in series.values():
            if any(os.path.realpath(f) == target for f in files):
                return files
        return []
    best = max(series, key=lambda k: len(series[k]))
    if len(series) > 1:
        others = ", ".join(f"{k} ({len(v)} files)" for k, v in series.items() if k != best)
        warnings.warn(
            f"{folder} holds {len(series)} DICOM series; reading the largest, {best} ({len(series[best])} files), "
            f"and ignoring {others}. Put the wanted series in its own folder to choose another.",
            stacklevel=3,
        )
    return series[best]


def _read_ct_image(path: PathLike) -> tuple[sitk.Image, Path]:
    """The CT as a float32 3D SimpleITK image, after the checks every CT must pass."""
    p = _path(path)
    _require_exists(p, "CT file or DICOM folder")
    if p.is_dir():
        files = _dicom_series_files(p)
        if not files:
            raise ValueError(
                f"no DICOM series found in folder {p}; pass a folder of DICOM CT slices, "
                "or a CT file (NIfTI .nii/.nii.gz, NRRD, MHA)"
            )
        img = _read_series(files, p)
    else:
        reader = _read_info(p, "CT")
        size = reader.GetSize()
        dim = reader.GetDimension()
        if dim == 3 and size[2] == 1 and _is_dicom_file(p):
            # One slice of a DICOM series: read the whole series it belongs to.
            files = _dicom_series_files(p.parent, containing=p)
            if len(files) > 1:
                return _check_ct_image(_read_series(files, p), p), p
        _check_ct_header(reader, p)
        img = _execute(reader, p, "CT")
        if img.GetDimension() == 4:
            img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return _check_ct_image(img, p), p


def _read_series(files: list[str], where: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(where, err, "DICOM series") from None


def _check_ct_header(reader: sitk.ImageFileReader, p: Path) -> None:
    size = tuple(reader.GetSize())
    dim = reader.GetDimension()
    if any(s == 0 for s in size):
        raise ValueError(f"the CT {p} is empty (size {size}); it has no voxels")
    if dim == 2 or (dim == 3 and 1 in size):
        raise ValueError(
            f"{p} is a 2D image (size {size}), not a CT volume; if it is the X-ray, pass it as the X-ray"
        )
    if dim == 4 and size[3] != 1:
        raise ValueError(
            f"{p} is a 4D image (size {size}, e.g. a time series); extract one 3D volume and pass that as the CT"
        )
    if dim not in (3, 4):
        raise ValueError(f"{p} has {dim} dimensions; a CT must be a 3D volume")
    ncomp = reader.GetNumberOfComponents()
    if ncomp != 1:
        raise ValueError(
            f"{p} has {ncomp} values per voxel (an RGB or vector image); a CT must hold one HU value per voxel"
        )
    _check_spacing(reader.GetSpacing()[:3], p, "the CT")


def _check_ct_image(img: sitk.Image, p: Path) -> sitk.Image:
    size = img.GetSize()
    if img.GetDimension() != 3 or 1 in size:
        raise ValueError(f"{p} is a 2D image (size {size}), not a CT volume; if it is the X-ray, pass it as the X-ray")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{p} has several values per voxel (an RGB or vector image); a CT must be scalar")
    _check_spacing(img.GetSpacing(), p, "the CT")
    return sitk.Cast(img, sitk.sitkFloat32)


def _geometry(img: sitk.Image) -> tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, ...], ...]]:
    d = img.GetDirection()
    direction = tuple(tuple(float(v) for v in d[3 * r : 3 * r + 3]) for r in range(3))
    return tuple(float(s) for s in img.GetSpacing()), tuple(float(o) for o in img.GetOrigin()), direction


def read_ct_hu(path: PathLike) -> HUImage:
    """The CT's voxel values (as stored, normally HU) as a float32 (K, J, I) tensor + geometry.

    Accepts NIfTI/NRRD/MHA files, a DICOM series folder, or one file of a DICOM series.
    Origin, spacing and direction are kept exactly as SimpleITK reads them (oblique included).
    """
    img, p = _read_ct_image(path)
    arr = sitk.GetArrayFromImage(img)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"the CT {p} contains {bad} NaN or Inf voxels; replace them (e.g. with -1000 HU for air) and save again"
        )
    spacing, origin, direction = _geometry(img)
    return HUImage(torch.from_numpy(np.ascontiguousarray(arr)), spacing, origin, direction)


def read_ct(path: PathLike, hu: bool = True) -> Volume:
    """Read a CT into a ``Volume`` of linear attenuation (1/mm) with its exact LPS geometry.

    ``hu=True`` (default): the file holds Hounsfield units, converted by volume.hu_to_attenuation.
    ``hu=False``: the file already holds attenuation in 1/mm and is used as is.
    """
    img = read_ct_hu(path)
    lo, hi = float(img.hu.min()), float(img.hu.max())
    if hu and lo >= 0.0 and hi < 5.0:
        warnings.warn(
            f"the CT values lie in [{lo:.3g}, {hi:.3g}], which looks like attenuation (1/mm) rather than HU; "
            "pass hu=False if the file already holds attenuation",
            stacklevel=2,
        )
    if not hu and hi > 50.0:
        warnings.warn(
            f"hu=False but the CT values reach {hi:.4g}, which looks like HU, not attenuation in 1/mm",
            stacklevel=2,
        )
    if hu:
        return img.to_volume()
    return Volume(img.hu, img.spacing, img.origin, img.direction)


def write_ct(
    ct: Volume | HUImage | np.ndarray | Tensor,
    path: PathLike,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[Sequence[float]] | Sequence[float] | None = None,
    pixel_type: str = "float32",
) -> Path:
    """Write a CT in Hounsfield units with its geometry (any format SimpleITK writes by extension).

    ``ct`` is a ``Volume`` (attenuation, converted back to HU; values below air come back as
    -1000), an ``HUImage``, or a (K, J, I) HU array with ``spacing`` (and optionally ``origin``,
    ``direction``). ``pixel_type`` is "float32" (exact) or "int16" (rounded, the usual CT storage).
    Note that NIfTI stores geometry in float32, so only NRRD/MHA keep it to float64.
    """
    if isinstance(ct, Volume):
        hu = attenuation_to_hu(ct.data.detach().float().cpu())
        sp, org, dirn = ct.spacing, ct.origin, ct.direction
    elif isinstance(ct, HUImage):
        hu, sp, org, dirn = ct
    else:
        hu, sp = ct, spacing
        org = origin if origin is not None else (0.0, 0.0, 0.0)
        dirn = direction if direction is not None else np.eye(3)
        if sp is None:
            raise ValueError("write_ct needs the voxel spacing (mm) when given a bare array: write_ct(hu, path, spacing=(sx, sy, sz))")
    arr = _as_numpy(hu, np.float32)
    if arr.ndim != 3:
        raise ValueError(f"a CT must be a 3D (K, J, I) array, got shape {arr.shape}")
    sp = tuple(float(s) for s in sp)
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 values (sx, sy, sz), got {sp}")
    _check_spacing(sp, "array", "the CT")
    dirn = _as_numpy(dirn).reshape(3, 3)
    if pixel_type == "int16":
        arr = np.clip(np.rint(arr), -32768, 32767).astype(np.int16)
    elif pixel_type != "float32":
        raise ValueError(f"pixel_type must be 'float32' or 'int16', got {pixel_type!r}")
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(sp)
    img.SetOrigin(tuple(float(o) for o in org))
    img.SetDirection(tuple(float(v) for v in dirn.flatten()))
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(p))
    return p


# --------------------------------------------------------------------------------------------
# X-ray


@dataclass
class XRay:
    """An X-ray image (H, W) float32 indexed [row, col], with its C-arm geometry if known.

    ``initial_pose`` is a camera_from_ct guess (from DICOM positioner angles and an isocenter),
    ``metadata`` records where each geometry value came from and the raw positioner values.
    """

    image: Tensor
    camera: Camera | None = None
    initial_pose: Tensor | None = None
    source_path: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


def camera_json_path(image_path: PathLike) -> Path:
    """The side-car camera JSON of an image: ``<folder>/<stem>.camera.json``."""
    p = _path(image_path)
    return p.parent / f"{_stem(p)}.camera.json"


def _grey(arr: np.ndarray, ncomp: int, p: Path) -> np.ndarray:
    """Collapse colour channels (last axis) to grey; RGB(A) via Rec. 601 luma, alpha dropped."""
    if ncomp == 1:
        return arr
    if ncomp in (3, 4):
        rgb = arr[..., :3].astype(np.float64)
        return rgb @ np.array([0.299, 0.587, 0.114])
    if ncomp == 2:  # grey + alpha
        return arr[..., 0]
    raise ValueError(f"the X-ray {p} has {ncomp} values per pixel; expected a grey or RGB image")


@functools.lru_cache(maxsize=1)
def _sitk_inverts_monochrome1() -> bool:
    """Whether this SimpleITK/GDCM build already inverts MONOCHROME1 pixels when reading.

    Newer ITK versions do, older ones return the stored values; we test once on a tiny file so
    that MONOCHROME1 images are inverted exactly once whatever the version.
    """
    arr = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    with tempfile.TemporaryDirectory() as d:
        fn = os.path.join(d, "probe.dcm")
        img = sitk.GetImageFromArray(arr)
        img.SetMetaData("0008|0060", "XA")
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(fn)
        w.Execute(img)
        with open(fn, "rb") as f:
            data = f.read()
        if data.count(b"MONOCHROME2") != 1:
            return True
        with open(fn, "wb") as f:
            f.write(data.replace(b"MONOCHROME2", b"MONOCHROME1"))
        out = sitk.GetArrayFromImage(sitk.ReadImage(fn)).reshape(-1).astype(np.int64)
    return bool(out[0] > out[-1])


def _dicom_geometry(reader: sitk.ImageFileReader) -> tuple[dict, dict]:
    """Camera fields and positioner values from DICOM tags (lowest-precedence source)."""
    fields: dict = {}
    info: dict = {}
    sdd = _floats(_meta(reader, "0018|1110"))  # DistanceSourceToDetector
    if sdd:
        fields["sdd"] = (sdd[0], "DICOM DistanceSourceToDetector (0018,1110)")
    imager = _floats(_meta(reader, "0018|1164"))  # ImagerPixelSpacing: row spacing first (dy, dx)
    pixel = _floats(_meta(reader, "0028|0030"))  # PixelSpacing: (dy, dx)
    if imager and len(imager) >= 1:
        dy, dx = (imager[0], imager[1]) if len(imager) > 1 else (imager[0], imager[0])
        fields["pixel_spacing"] = ((dx, dy), "DICOM ImagerPixelSpacing (0018,1164)")
    elif pixel and len(pixel) >= 1:
        dy, dx = (pixel[0], pixel[1]) if len(pixel) > 1 else (pixel[0], pixel[0])
        fields["pixel_spacing"] = ((dx, dy), "DICOM PixelSpacing (0028,0030)")
    origin = _floats(_meta(reader, "0018|7028"))  # DetectorActiveOrigin (row, col offsets, mm)
    if origin:
        info["detector_active_origin_mm"] = origin
    for key, tag in (("primary_angle_deg", "0018|1510"), ("secondary_angle_deg", "0018|1511"), ("sod_mm", "0018|1111")):
        v = _floats(_meta(reader, tag))
        if v:
            info[key] = v[0]
    photometric = _meta(reader, "0028|0004")
    if photometric:
        info["photometric_interpretation"] = photometric
    return fields, info


def _camera_fields_from_dict(d: dict, source: str, where: Path) -> dict:
    """Camera fields present in a (possibly partial) camera JSON dict."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a camera JSON must be an object with keys sdd_mm, pixel_spacing_mm, size_px")
    fields: dict = {}
    try:
        if d.get("sdd_mm") is not None:
            fields["sdd"] = (float(d["sdd_mm"]), source)
        if d.get("pixel_spacing_mm") is not None:
            ps = d["pixel_spacing_mm"]
            ps = (float(ps), float(ps)) if isinstance(ps, (int, float)) else tuple(float(v) for v in ps)
            if len(ps) != 2:
                raise ValueError("pixel_spacing_mm must be [dx, dy]")
            fields["pixel_spacing"] = (ps, source)
        if d.get("principal_point_px") is not None:
            pp = tuple(float(v) for v in d["principal_point_px"])
            if len(pp) != 2:
                raise ValueError("principal_point_px must be [cx, cy]")
            fields["principal_point"] = (pp, source)
        if d.get("size_px") is not None:
            sz = tuple(int(v) for v in d["size_px"])
            if len(sz) != 2:
                raise ValueError("size_px must be [W, H]")
            fields["size"] = (sz, source)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid camera JSON ({err}); format: {_CAMERA_FORMAT}") from None
    return fields


_CAMERA_FORMAT = '{"sdd_mm": 1020, "pixel_spacing_mm": [dx, dy], "size_px": [W, H], "principal_point_px": [cx, cy]}'


def _load_json(path: Path, what: str) -> Any:
    _require_exists(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a {what}") from None


def _read_xray_array(p: Path) -> tuple[np.ndarray, sitk.ImageFileReader, tuple[float, float] | None]:
    """Pixels (H, W) float32 and the header reader; also the header pixel spacing (dx, dy)."""
    reader = _read_info(p, "X-ray")
    size = tuple(reader.GetSize())
    if any(s == 0 for s in size):
        raise ValueError(f"the X-ray {p} is empty (size {size})")
    big = [s for s in size if s > 1]
    if len(big) > 2:
        hint = (
            f" (a DICOM with {size[2]} frames: extract the frame to register)"
            if _is_dicom_file(p)
            else ""
        )
        raise ValueError(f"{p} is a 3D volume (size {size}), not an X-ray; if it is the CT, pass it as the CT{hint}")
    if len(big) < 2:
        raise ValueError(f"the X-ray {p} has size {size}; an X-ray needs at least 2 pixels along rows and columns")
    img = _execute(reader, p, "X-ray")
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)
    if ncomp > 1:
        arr = _grey(arr, ncomp, p)
    spacing = img.GetSpacing()
    keep = [a for a in range(img.GetDimension()) if size[a] > 1]  # ITK axis order (col axis first)
    arr = np.squeeze(arr).astype(np.float32)
    header_spacing = (float(spacing[keep[0]]), float(spacing[keep[1]]))
    return arr, reader, header_spacing


def read_xray(
    path: PathLike,
    camera: Camera | None = None,
    camera_json: PathLike | None = None,
    sdd: float | None = None,
    pixel_spacing: float | Sequence[float] | None = None,
    principal_point: Sequence[float] | None = None,
    isocenter_lps: Sequence[float] | Tensor | None = None,
    require_camera: bool = True,
) -> XRay:
    """Read an X-ray image and its C-arm geometry.

    ``path``: a 2D image (NRRD/MHA/NIfTI/PNG/TIFF; a 3D file with one slice counts as 2D; RGB is
    converted to grey) or a DICOM file (MONOCHROME1 is inverted so dense structures are bright).
    Geometry precedence, highest first: ``sdd`` / ``pixel_spacing`` (dx, dy, or one number) /
    ``principal_point`` (cx, cy pixels) > ``camera`` > ``camera_json`` (default: the side-car
    ``<stem>.camera.json`` if present) > camera stored in an NRRD/MHA header by ``write_xray`` >
    DICOM tags (and NRRD/MHA/NIfTI header spacing). The size always comes from the image.
    With ``isocenter_lps`` and DICOM positioner angles, ``initial_pose`` is filled in.
    """
    p = _path(path)
    _require_exists(p, "X-ray image")
    arr, reader, header_spacing = _read_xray_array(p)
    h, w = arr.shape
    if not np.isfinite(arr).all():
        raise ValueError(f"the X-ray {p} contains NaN or Inf pixels; fix them before registering")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise ValueError(f"the X-ray {p} is blank: every pixel equals {lo:g}; check that the right file was given")

    metadata: dict = {}
    layers: list[dict] = []  # lowest precedence first
    is_dicom = _is_dicom_file(p)
    if is_dicom:
        fields, info = _dicom_geometry(reader)
        metadata.update(info)
        if info.get("photometric_interpretation", "").upper() == "MONOCHROME1" and not _sitk_inverts_monochrome1():
            arr = (hi + lo) - arr
        layers.append(fields)
    else:
        if _suffix(p) in _HEADER_SPACING_SUFFIXES:
            layers.append({"pixel_spacing": (header_spacing, "image header spacing")})
        stored = _meta(reader, CAMERA_METADATA_KEY)
        if stored:
            try:
                d = json.loads(stored)
            except json.JSONDecodeError:
                d = None
            if isinstance(d, dict):
                layers.append(_camera_fields_from_dict(d, f"camera in the header of {p.name}", p))

    if camera_json is None:
        side = camera_json_path(p)
        if side.exists():
            camera_json = side
    if camera_json is not None:
        cj = _path(camera_json)
        layers.append(_camera_fields_from_dict(_load_json(cj, "camera JSON"), f"camera JSON {cj}", cj))
        metadata["camera_json"] = str(cj)
    if camera is not None:
        layers.append(
            {
                "sdd": (camera.sdd, "camera argument"),
                "pixel_spacing": (camera.pixel_spacing, "camera argument"),
                "principal_point": (camera.principal_point, "camera argument"),
                "size": (camera.size, "camera argument"),
            }
        )
    flags: dict = {}
    if sdd is not None:
        flags["sdd"] = (float(sdd), "sdd argument")
    if pixel_spacing is not None:
        ps = np.atleast_1d(_as_numpy(pixel_spacing)).tolist()
        if len(ps) not in (1, 2):
            raise ValueError(f"pixel_spacing must be one number or (dx, dy), got {pixel_spacing}")
        flags["pixel_spacing"] = ((ps[0], ps[-1]), "pixel_spacing argument")
    if principal_point is not None:
        flags["principal_point"] = (tuple(float(v) for v in principal_point), "principal_point argument")
    layers.append(flags)

    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    if "size" in merged and tuple(merged["size"][0]) != (w, h):
        raise ValueError(
            f"the {merged['size'][1]} describes a {merged['size'][0][0]} x {merged['size'][0][1]} detector but "
            f"the image {p} is {w} x {h} pixels; give the camera of this image (the size comes from the image)"
        )
    metadata["geometry_sources"] = {k: v[1] for k, v in merged.items() if k != "size"}

    cam = None
    missing = [name for key, name in (("sdd", "source-to-detector distance (sdd, mm)"), ("pixel_spacing", "detector pixel spacing (mm)")) if key not in merged]
    if missing:
        if require_camera:
            raise ValueError(
                f"the geometry of the X-ray {p} is incomplete: missing {' and '.join(missing)}. Give it with a "
                f"camera JSON (--camera cam.json, or {camera_json_path(p).name} next to the image; format "
                f"{_CAMERA_FORMAT}) or with the --sdd MM and --pixel-spacing DX [DY] flags "
                "(read_xray(..., sdd=..., pixel_spacing=...))."
            )
    else:
        pp = merged.get("principal_point", (None, ""))[0]
        try:
            cam = Camera(sdd=merged["sdd"][0], pixel_spacing=tuple(merged["pixel_spacing"][0]), size=(w, h), principal_point=pp)
        except ValueError as err:
            raise ValueError(f"invalid X-ray geometry for {p} ({metadata['geometry_sources']}): {err}") from None

    xray = XRay(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), cam, None, str(p), metadata)
    if isocenter_lps is not None and "primary_angle_deg" in metadata and "sod_mm" in metadata:
        xray.initial_pose = xray_initial_pose(xray, isocenter_lps)
    return xray


def xray_initial_pose(xray: XRay, isocenter_lps: Sequence[float] | Tensor, sod: float | None = None) -> Tensor:
    """camera_from_ct (float64 4x4) from the DICOM positioner angles of ``xray`` and an isocenter.

    Uses PositionerPrimaryAngle / PositionerSecondaryAngle (degrees, 0 when absent) and
    DistanceSourceToPatient (or ``sod``) with geometry.c_arm_pose; DICOM does not record where the
    isocenter lies in the CT, so the caller supplies it (e.g. the CT's centre).
    """
    md = xray.metadata
    if "primary_angle_deg" not in md and "secondary_angle_deg" not in md:
        raise ValueError(
            f"the X-ray {xray.source_path} has no PositionerPrimaryAngle/PositionerSecondaryAngle tags; "
            "no initial pose can be derived from it"
        )
    sod = md.get("sod_mm") if sod is None else sod
    if sod is None:
        raise ValueError(
            f"the X-ray {xray.source_path} lacks DistanceSourceToPatient (0018,1111); pass sod= (source to isocenter, mm)"
        )
    return c_arm_pose(
        isocenter_lps, float(sod), float(md.get("primary_angle_deg", 0.0)), float(md.get("secondary_angle_deg", 0.0))
    )


def write_xray(image: Tensor | np.ndarray, path: PathLike, camera: Camera | None = None) -> Path:
    """Write an X-ray (H, W) image; with ``camera``, also ``<stem>.camera.json`` beside it.

    NRRD/MHA/NIfTI/TIFF keep float32 values. Pixel spacing is (dx, dy) and the origin is set so
    that physical coordinates are detector millimetres relative to the principal point (the
    camera-frame x, y on the detector plane); NRRD/MHA headers also carry the camera JSON.
    PNG (16-bit), JPEG and BMP (8-bit) and DICOM (16-bit XA with DistanceSourceToDetector and
    ImagerPixelSpacing) store the values rescaled to their integer range.
    """
    arr = _as_numpy(image, np.float32)
    if arr.ndim != 2:
        raise ValueError(f"an X-ray must be a 2D (H, W) array, got shape {arr.shape}")
    h, w = arr.shape
    if camera is not None and tuple(camera.size) != (w, h):
        raise ValueError(f"the camera is {camera.size[0]} x {camera.size[1]} pixels but the image is {w} x {h}")
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suf = _suffix(p)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    scale = (hi - lo) if hi > lo else 1.0
    if suf in (".png",) or suf in _DICOM_SUFFIXES:
        out = np.rint((arr - lo) / scale * 65535.0).astype(np.uint16)
    elif suf in (".jpg", ".jpeg", ".bmp"):
        out = np.rint((arr - lo) / scale * 255.0).astype(np.uint8)
    else:
        out = arr
    img = sitk.GetImageFromArray(out)
    if camera is not None:
        dx, dy = camera.pixel_spacing
        cx, cy = camera.principal_point
        img.SetSpacing((dx, dy))
        img.SetOrigin(((0.5 - cx) * dx, (0.5 - cy) * dy))
        if suf in (".nrrd", ".nhdr", ".mha", ".mhd"):
            img.SetMetaData(CAMERA_METADATA_KEY, json.dumps(camera.to_dict()))
    if suf in _DICOM_SUFFIXES:
        img.SetMetaData("0008|0060", "XA")
        if camera is not None:
            img.SetMetaData("0018|1110", f"{camera.sdd:.10g}"[:16])
            # GDCM writes the image spacing as ImagerPixelSpacing (row spacing first) for XA.
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(p))
        writer.Execute(img)
    else:
        sitk.WriteImage(img, str(p))
    if camera is not None:
        write_camera_json(camera, camera_json_path(p))
    return p


# --------------------------------------------------------------------------------------------
# Camera JSON


def read_camera_json(path: PathLike) -> Camera:
    """Camera from the JSON of DESIGN.md: sdd_mm, pixel_spacing_mm [dx, dy], size_px [W, H],
    principal_point_px [cx, cy] (optional, default the image centre)."""
    p = _path(path)
    d = _load_json(p, "camera JSON")
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a camera JSON must be an object, format {_CAMERA_FORMAT}")
    try:
        return Camera.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{p}: invalid camera JSON ({err}); format {_CAMERA_FORMAT}") from None


def write_camera_json(camera: Camera, path: PathLike) -> Path:
    """Write ``camera.to_dict()`` as indented JSON."""
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(camera.to_dict(), f, indent=2)
        f.write("\n")
    return p


# --------------------------------------------------------------------------------------------
# Poses


def _pose64(pose: Tensor | np.ndarray | Sequence) -> Tensor:
    t = torch.as_tensor(_as_numpy(pose), dtype=torch.float64)
    if t.shape != (4, 4):
        raise ValueError(f"a pose must be one 4x4 matrix, got shape {tuple(t.shape)}")
    return check_rigid(t)


def write_pose_json(
    pose: Tensor | np.ndarray, path: PathLike, extra: dict | None = None, frame: str = "LPS"
) -> Path:
    """Write ``{"camera_from_ct": 4x4, "frame": "LPS", **extra}`` (full float64 precision).

    ``frame="RAS"`` stores geometry.ras_from_lps(pose) instead (both sides flipped, as Slicer does).
    """
    t = _pose64(pose)
    frame = frame.upper()
    if frame == "RAS":
        t = ras_from_lps(t)
    elif frame != "LPS":
        raise ValueError(f"frame must be 'LPS' or 'RAS', got {frame!r}")
    d = {"camera_from_ct": t.tolist(), "frame": frame}
    for k, v in (extra or {}).items():
        if k in d:
            raise ValueError(f"extra key {k!r} would overwrite the pose")
        d[k] = v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v
    return _write_json(d, path)


def read_pose_json(path: PathLike) -> Tensor:
    """camera_from_ct (float64 4x4, LPS) from a pose JSON; "frame": "RAS" is converted with
    geometry.ras_from_lps, a missing frame means LPS. Rejects non-rigid matrices."""
    p = _path(path)
    d = _load_json(p, "pose JSON")
    if not isinstance(d, dict) or "camera_from_ct" not in d:
        raise ValueError(f'{p}: a pose JSON needs a "camera_from_ct" 4x4 matrix, e.g. {{"camera_from_ct": [[...]], "frame": "LPS"}}')
    try:
        t = torch.tensor(d["camera_from_ct"], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{p}: camera_from_ct must be a 4x4 list of numbers") from None
    if t.shape != (4, 4):
        raise ValueError(f"{p}: camera_from_ct must be 4x4, got shape {tuple(t.shape)}")
    frame = str(d.get("frame", "LPS")).upper()
    if frame == "RAS":
        t = ras_from_lps(t)
    elif frame != "LPS":
        raise ValueError(f'{p}: unknown frame {d.get("frame")!r}; use "LPS" (or "RAS")')
    try:
        return check_rigid(t)
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def write_pose_itk(pose: Tensor | np.ndarray, path: PathLike) -> Path:
    """Write camera_from_ct (LPS) as an ITK AffineTransform file (.tfm/.txt/.h5/.mat).

    Slicer loads this file as a transform node whose ToParent matrix is ct_from_camera in RAS,
    i.e. the node places camera-frame geometry (stored as LPS files) in the CT's space.
    """
    t = _pose64(pose).numpy()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in t[:3, :3].flatten()))
    tx.SetTranslation(tuple(float(v) for v in t[:3, 3]))
    tx.SetCenter((0.0, 0.0, 0.0))
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(tx, str(p))
    return p


def _linear_matrix(tx: sitk.Transform, p: Path) -> np.ndarray:
    """4x4 matrix of a linear SimpleITK transform (exact for matrix-offset types)."""
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    if tx.GetDimension() != 3:
        raise ValueError(f"{p} holds a {tx.GetDimension()}D transform; a pose is 3D")
    if not tx.IsLinear():
        raise ValueError(f"{p} holds a non-linear transform ({tx.GetName()}); a pose must be rigid")
    m = np.eye(4)
    exact = not isinstance(tx, sitk.CompositeTransform) and all(
        hasattr(tx, a) for a in ("GetMatrix", "GetCenter", "GetTranslation")
    )
    if exact:
        a = np.array(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
        c = np.array(tx.GetCenter(), dtype=np.float64)
        t = np.array(tx.GetTranslation(), dtype=np.float64)
        m[:3, :3] = a
        m[:3, 3] = t + c - a @ c if c.any() else t
        return m
    # Any other linear transform (composites, translations, generic): probe it with points.
    o = np.array(tx.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.array(tx.TransformPoint(tuple(e)), dtype=np.float64) - o
    m[:3, 3] = o
    return m


def read_pose_itk(path: PathLike) -> Tensor:
    """camera_from_ct (float64 4x4, LPS) from an ITK transform file written by ``write_pose_itk``
    or saved by Slicer (Affine, Euler3D, VersorRigid3D... or a composite of linear transforms)."""
    p = _path(path)
    _require_exists(p, "ITK transform file")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as err:
        raise ValueError(f"cannot read the ITK transform {p}: {str(err).strip().splitlines()[-1]}") from None
    t = torch.from_numpy(_linear_matrix(tx, p))
    try:
        return check_rigid(t)
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


# --------------------------------------------------------------------------------------------
# Targets


def _targets_result(points: list, names: list[str], p: Path) -> tuple[Tensor, list[str]]:
    if not points:
        raise ValueError(f"no target points found in {p}")
    t = torch.tensor(points, dtype=torch.float64).reshape(-1, 3)
    if not torch.isfinite(t).all():
        raise ValueError(f"{p}: some target coordinates are NaN or Inf")
    return t, names


def _read_markups_json(p: Path) -> tuple[Tensor, list[str]]:
    d = _load_json(p, "Slicer markups JSON")
    markups = d.get("markups") if isinstance(d, dict) else None
    if not isinstance(markups, list):
        raise ValueError(f'{p}: not a Slicer markups JSON (no "markups" list); save the points from Slicer as .mrk.json')
    points, names = [], []
    for m in markups:
        system = str(m.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise ValueError(f"{p}: unknown coordinateSystem {system!r}; expected LPS or RAS")
        units = m.get("coordinateUnits", "mm")
        if units != "mm":
            raise ValueError(f"{p}: coordinateUnits {units!r} not supported; save the markups in mm")
        flip = -1.0 if system == "RAS" else 1.0
        for cp in m.get("controlPoints", []) or []:
            if cp.get("positionStatus", "defined") != "defined" or cp.get("position") is None:
                continue
            x, y, z = (float(v) for v in cp["position"])
            points.append([flip * x, flip * y, z])
            names.append(str(cp.get("label") or cp.get("id") or f"P{len(names) + 1}"))
    return _targets_result(points, names, p)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_fcsv(p: Path) -> tuple[Tensor, list[str]]:
    ras = True  # old Slicer files default to RAS
    points, names = [], []
    with open(p, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0].startswith("#"):
                line = ",".join(row)
                if "CoordinateSystem" in line:
                    value = line.split("=", 1)[-1].strip().upper()
                    ras = value in ("0", "RAS")
                continue
            x, y, z = (float(v) for v in row[1:4])
            s = -1.0 if ras else 1.0
            points.append([s * x, s * y, z])
            names.append(row[11] if len(row) > 11 and row[11] else f"P{len(names) + 1}")
    return _targets_result(points, names, p)


def _read_csv_points(p: Path) -> tuple[Tensor, list[str]]:
    with open(p, newline="", encoding="utf-8") as f:
        sample = f.read(4096)
        f.seek(0)
        delim = "\t" if sample.count("\t") > sample.count(",") else ","
        rows = [r for r in csv.reader(f, delimiter=delim) if r and not r[0].lstrip().startswith("#")]
    rows = [[c.strip() for c in r] for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"no target points found in {p}")
    points, names = [], []
    if not all(_is_number(c) for c in rows[0][-3:]):  # a header
        header = [c.lower() for c in rows[0]]
        sign = 1.0
        cols = None
        for triple, s in ((("x", "y", "z"), 1.0), (("l", "p", "s"), 1.0), (("r", "a", "s"), -1.0)):
            if all(c in header for c in triple):
                cols, sign = [header.index(c) for c in triple], s
                break
        if cols is None:
            raise ValueError(f"{p}: the CSV header {rows[0]} needs columns x, y, z (LPS mm), optionally name")
        name_col = next((header.index(c) for c in ("name", "label", "id") if c in header), None)
        body = rows[1:]
    else:
        sign, cols = 1.0, [len(rows[0]) - 3, len(rows[0]) - 2, len(rows[0]) - 1]
        name_col = 0 if len(rows[0]) >= 4 else None
        body = rows
    for n, r in enumerate(body, start=1):
        try:
            x, y, z = (float(r[c]) for c in cols)
        except (ValueError, IndexError):
            raise ValueError(f"{p}: row {n} {r} does not hold three numbers x, y, z") from None
        points.append([sign * x, sign * y, z])
        names.append(r[name_col] if name_col is not None and name_col < len(r) and r[name_col] else f"P{n}")
    return _targets_result(points, names, p)


def _read_label_centroids(p: Path, label_values: Iterable[int] | None) -> tuple[Tensor, list[str]]:
    reader = _read_info(p, "label map")
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() != 3:
        raise ValueError(
            f"{p} is not a 3D scalar label map (dimension {reader.GetDimension()}, "
            f"{reader.GetNumberOfComponents()} components); export the segmentation as one label map"
        )
    _check_spacing(reader.GetSpacing(), p, "the label map")
    img = _execute(reader, p, "label map")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.rint(arr)):
            raise ValueError(f"{p}: label map values must be whole numbers")
    arr = arr.astype(np.int64)
    present = np.unique(arr)
    present = present[present != 0]
    if present.size == 0:
        raise ValueError(f"the label map {p} is empty: it has no nonzero voxels")
    if label_values is not None:
        wanted = [int(v) for v in label_values]
        chosen = [v for v in wanted if v in set(present.tolist())]
        if not chosen:  # labels absent from this CT's field of view are skipped silently
            raise ValueError(f"none of the labels {wanted} occur in {p}; it holds {present.tolist()}")
    else:
        chosen = present.tolist()
    seg_names = {}
    for key in img.GetMetaDataKeys():  # Slicer .seg.nrrd: SegmentN_LabelValue / SegmentN_Name
        if key.startswith("Segment") and key.endswith("_LabelValue"):
            prefix = key[: -len("_LabelValue")]
            try:
                seg_names[int(img.GetMetaData(key))] = img.GetMetaData(prefix + "_Name")
            except (ValueError, RuntimeError):
                pass
    points, names = [], []
    for v in chosen:
        kji = np.argwhere(arr == v).mean(axis=0)
        ijk = (float(kji[2]), float(kji[1]), float(kji[0]))
        points.append(list(img.TransformContinuousIndexToPhysicalPoint(ijk)))
        names.append(seg_names.get(v, str(v)))
    return _targets_result(points, names, p)


def read_targets(path: PathLike, label_values: Iterable[int] | None = None) -> tuple[Tensor, list[str]]:
    """Target points (N, 3) float64 in LPS mm and their names.

    Sources: a Slicer markups JSON (.mrk.json / .json; LPS or RAS, converted), an old Slicer
    .fcsv, a CSV (optional header x,y,z or name,x,y,z; r,a,s columns are converted from RAS;
    without header: x,y,z or name,x,y,z), or a label map image: the centroid of each nonzero label
    (or of ``label_values`` only) in LPS using the image's geometry.
    """
    p = _path(path)
    _require_exists(p, "targets file")
    suf = _suffix(p)
    if suf in (".mrk.json", ".json"):
        return _read_markups_json(p)
    if suf == ".fcsv":
        return _read_fcsv(p)
    if suf in (".csv", ".tsv", ".txt"):
        return _read_csv_points(p)
    return _read_label_centroids(p, label_values)


def _points_names(points: Tensor | np.ndarray, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    pts = _as_numpy(points).reshape(-1, 3)
    names = [f"P{i + 1}" for i in range(len(pts))] if names is None else [str(n) for n in names]
    if len(names) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(names)} names")
    return pts, names


def write_targets_csv(points: Tensor | np.ndarray, path: PathLike, names: Sequence[str] | None = None) -> Path:
    """Write (N, 3) LPS points as CSV with header name,x,y,z (full precision)."""
    pts, names = _points_names(points, names)
    p = _path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "x", "y", "z"])
        for n, (x, y, z) in zip(names, pts.tolist()):
            w.writerow([n, repr(x), repr(y), repr(z)])
    return p


def write_targets_markups(points: Tensor | np.ndarray, path: PathLike, names: Sequence[str] | None = None) -> Path:
    """Write (N, 3) LPS points as a Slicer point-list markups JSON (.mrk.json, LPS)."""
    pts, names = _points_names(points, names)
    d = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "controlPoints": [
                    {"id": str(i + 1), "label": n, "position": list(x), "positionStatus": "defined"}
                    for i, (n, x) in enumerate(zip(names, pts.tolist()))
                ],
            }
        ],
    }
    return _write_json(d, path)
