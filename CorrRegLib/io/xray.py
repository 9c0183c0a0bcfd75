"""X-ray images: 2D files and DICOM, with the C-arm geometry from tags, side-cars or arguments."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import Camera, c_arm_pose
from ..outputs import atomic_path
from ._common import (
    _DICOM_SUFFIXES,
    _HEADER_SPACING_SUFFIXES,
    CAMERA_METADATA_KEY,
    PathLike,
    Tensor,
    _as_numpy,
    _execute,
    _floats,
    _is_dicom_file,
    _load_json,
    _meta,
    _path,
    _read_info,
    _require_exists,
    _suffix,
)
from .camera import (
    _CAMERA_FORMAT,
    _camera_fields_from_dict,
    camera_json_path,
    write_camera_json,
)


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
    lut_shape = _meta(reader, "2050|0020")  # PresentationLUTShape: IDENTITY or INVERSE
    if lut_shape:
        info["presentation_lut_shape"] = lut_shape
    return fields, info


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
        mono1 = info.get("photometric_interpretation", "").upper() == "MONOCHROME1"
        if mono1 and not _sitk_inverts_monochrome1():
            arr = (hi + lo) - arr
        # PresentationLUTShape INVERSE: displayed inverted. With MONOCHROME1 it restates that
        # inversion (DICOM's DX rule), so the pixels are inverted once, never twice.
        if info.get("presentation_lut_shape", "").upper() == "INVERSE" and not mono1:
            arr = (hi + lo) - arr
        if mono1 or info.get("presentation_lut_shape", "").upper() == "INVERSE":
            metadata["display_inverted"] = True
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
                **({"focal_px": (camera.focal_px, "camera argument")} if camera.focal_px is not None else {}),
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
    # exact focal lengths (a camera given by its intrinsic matrix) only while sdd and the pixel
    # spacing still come from that same source; a flag overriding either re-derives them
    focal = merged.pop("focal_px", None)
    if focal is not None and not (merged.get("sdd", (0, None))[1] == merged.get("pixel_spacing", (0, None))[1] == focal[1]):
        focal = None
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
            cam = Camera(sdd=merged["sdd"][0], pixel_spacing=tuple(merged["pixel_spacing"][0]), size=(w, h), principal_point=pp,
                         focal_px=None if focal is None else focal[0])
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
    with atomic_path(p) as tmp:  # the image and its side-car move into place together
        if suf in _DICOM_SUFFIXES:
            img.SetMetaData("0008|0060", "XA")
            if camera is not None:
                img.SetMetaData("0018|1110", f"{camera.sdd:.10g}"[:16])
                # GDCM writes the image spacing as ImagerPixelSpacing (row spacing first) for XA.
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(tmp))
            writer.Execute(img)
        else:
            sitk.WriteImage(img, str(tmp))
        if camera is not None:
            write_camera_json(camera, camera_json_path(tmp))
    return p
