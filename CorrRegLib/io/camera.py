"""Camera geometry files: the camera JSON of DESIGN.md and its side-car naming."""

from __future__ import annotations

from pathlib import Path

from ..geometry import Camera
from ._common import PathLike, _load_json, _path, _stem, _write_json


def camera_json_path(image_path: PathLike) -> Path:
    """The side-car camera JSON of an image: ``<folder>/<stem>.camera.json``."""
    p = _path(image_path)
    return p.parent / f"{_stem(p)}.camera.json"


def _camera_fields_from_dict(d: dict, source: str, where: Path) -> dict:
    """Camera fields present in a (possibly partial) camera JSON dict."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a camera JSON must be an object with keys sdd_mm, pixel_spacing_mm, size_px")
    fields: dict = {}
    if d.get("intrinsics_px") is not None:
        return _intrinsics_fields(d, source, where)
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


def _intrinsics_fields(d: dict, source: str, where: Path) -> dict:
    """Camera fields of a camera JSON that gives ``intrinsics_px`` (3 x 3, CorrReg's pixel
    convention): every field at once, ``focal_px`` included, so K is kept exactly."""
    dd = dict(d)
    dd.setdefault("size_px", [1, 1])  # the size always comes from the image; K fixes the rest
    try:
        cam = Camera.from_dict(dd)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid camera JSON ({err}); intrinsics_px must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]") from None
    fields = {
        "sdd": (cam.sdd, source),
        "pixel_spacing": (cam.pixel_spacing, source),
        "principal_point": (cam.principal_point, source),
        "focal_px": (cam.focal_px, source),
    }
    if d.get("size_px") is not None:
        fields["size"] = (cam.size, source)
    return fields


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
    return _write_json(camera.to_dict(), path)
