"""Geometry (and HU mapping) for CTs whose file carries none: TIFF stacks, raw exports.

A multi-page TIFF holds voxels but no voxel size, origin or orientation (SimpleITK reports the
TIFF's print resolution, typically 72 dpi = 0.3528 mm, and origin 0), and segmented bone
models are often stored as unsigned integers rather than HU. :class:`CTGeometry` says what the
file does not:

* ``spacing_mm`` (sx, sy, sz) along the voxel index axes i (column), j (row), k (page / slice);
* ``origin_mm`` and ``direction`` (3 x 3, columns = the i, j, k axes in the CT frame), as ITK
  defines them: point = origin + direction @ diag(spacing) @ (i, j, k);
* or ``placement="autoscoper"``: Autoscoper's volume frame (below), computed from the spacing
  and the volume's size, so one side-car fits every bone of a data set;
* ``flip`` (i, j, k): reverse the voxel order along those axes first (Autoscoper's VolumeFlip);
* ``hu_offset`` and ``hu_scale``: HU = stored value * hu_scale + hu_offset.

It comes from a side-car JSON ``<folder>/<stem>.geometry.json`` next to the CT (read by
``read_ct`` when present), an explicit JSON / dict / ``CTGeometry`` (``read_ct(...,
geometry=...)``), or the ``--ct-spacing`` / ``--ct-origin`` / ``--ct-direction`` /
``--ct-placement`` / ``--ct-flip`` / ``--ct-hu-offset`` flags. ``corrreg convert-ct`` writes a
NRRD / NIfTI / MHA file with the geometry in its header.

**Autoscoper's volume frame** (libautoscoper ``VolumeDescription.cpp`` and the ray caster's
texture lookup ``(x, 1 - y, -z)``): for a W x H x D stack (W columns, H rows, D pages) with
voxel size (sx, sy, sz), the centre of voxel (column i, row j, page k) lies at
``(sx (i + 0.5), sy (H - j - 0.5), -sz (k + 0.5))`` mm: x along the columns, y *up* the rows
(row 0 at the top of a page is at the far end), z *against* the page order. In ITK terms:
direction diag(1, -1, -1), origin (sx / 2, sy (H - 1/2), -sz / 2). Autoscoper's tracked poses
(world_from_volume) refer to this frame (before its own pivot shift ``transCenter``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._common import PathLike, _check_spacing, _load_json, _path, _stem, _write_json

PLACEMENTS = ("autoscoper",)

_SIDECAR_FORMAT = (
    '{"spacing_mm": [sx, sy, sz], "origin_mm": [x, y, z], "direction": [[...], [...], [...]], '
    '"placement": "autoscoper", "flip": [false, false, false], "hu_offset": 0, "hu_scale": 1}'
)


@dataclass(frozen=True)
class CTGeometry:
    """What a CT file does not say about itself; every field optional (None: keep the file's)."""

    spacing_mm: tuple[float, float, float] | None = None
    origin_mm: tuple[float, float, float] | None = None
    direction: tuple[tuple[float, float, float], ...] | None = None
    placement: str | None = None
    flip: tuple[bool, bool, bool] = (False, False, False)
    hu_offset: float = 0.0
    hu_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.spacing_mm is not None:
            sp = tuple(float(v) for v in self.spacing_mm)
            if len(sp) != 3:
                raise ValueError(f"spacing_mm must be 3 numbers (sx, sy, sz), got {self.spacing_mm}")
            _check_spacing(sp, "the geometry", "spacing_mm of")
            object.__setattr__(self, "spacing_mm", sp)
        if self.origin_mm is not None:
            org = tuple(float(v) for v in self.origin_mm)
            if len(org) != 3 or not all(math.isfinite(v) for v in org):
                raise ValueError(f"origin_mm must be 3 finite numbers (mm), got {self.origin_mm}")
            object.__setattr__(self, "origin_mm", org)
        if self.direction is not None:
            d = np.asarray(self.direction, dtype=np.float64).reshape(-1)
            if d.size != 9:
                raise ValueError(f"direction must be a 3 x 3 matrix (9 numbers), got {self.direction}")
            d = d.reshape(3, 3)
            if np.abs(d.T @ d - np.eye(3)).max() > 1e-4:
                raise ValueError(f"direction must be orthonormal (its columns are the i, j, k axes), got {d.tolist()}")
            object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in d))
        if self.placement is not None:
            if self.placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
            if self.origin_mm is not None or self.direction is not None:
                raise ValueError("give either placement or origin_mm / direction, not both")
        flip = tuple(bool(v) for v in self.flip)
        if len(flip) != 3:
            raise ValueError(f"flip must be 3 booleans (i, j, k), got {self.flip}")
        object.__setattr__(self, "flip", flip)
        for name in ("hu_offset", "hu_scale"):
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
            object.__setattr__(self, name, v)
        if self.hu_scale == 0:
            raise ValueError("hu_scale must not be 0")

    def is_empty(self) -> bool:
        return self == CTGeometry()

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["flip"] = list(self.flip)
        return {k: (list(map(list, v)) if k == "direction" else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "CT geometry") -> "CTGeometry":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a CT geometry must be a JSON object, format {_SIDECAR_FORMAT}")
        known = {"spacing_mm", "origin_mm", "direction", "placement", "flip", "hu_offset", "hu_scale"}
        unknown = sorted(set(d) - known - {"comment", "source"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; format {_SIDECAR_FORMAT}")
        try:
            return cls(**{k: d[k] for k in known if k in d and d[k] is not None})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}; format {_SIDECAR_FORMAT}") from None

    def merged(self, other: "CTGeometry | None") -> "CTGeometry":
        """This geometry with the fields ``other`` sets (flags over a side-car)."""
        if other is None:
            return self
        base = CTGeometry()
        d = {f: getattr(self, f) for f in asdict(self)}
        for f in asdict(other):
            if getattr(other, f) != getattr(base, f):
                d[f] = getattr(other, f)
        if other.placement is not None:
            d["origin_mm"] = d["direction"] = None
        elif other.origin_mm is not None or other.direction is not None:
            d["placement"] = None
        return CTGeometry(**d)


def ct_geometry_path(ct_path: PathLike) -> Path:
    """The side-car of a CT: ``<folder>/<stem>.geometry.json`` (x.nii.gz -> x.geometry.json)."""
    p = _path(ct_path)
    return p.parent / f"{_stem(p)}.geometry.json"


def read_ct_geometry(path: PathLike) -> CTGeometry:
    p = _path(path)
    return CTGeometry.from_dict(_load_json(p, "CT geometry JSON"), str(p))


def write_ct_geometry(geometry: CTGeometry, path: PathLike) -> Path:
    return _write_json(geometry.to_dict(), path)


def as_ct_geometry(geometry: Any) -> CTGeometry | None:
    """A ``CTGeometry`` from one, a dict, or a JSON path; None stays None."""
    if geometry is None or isinstance(geometry, CTGeometry):
        return geometry
    if isinstance(geometry, dict):
        return CTGeometry.from_dict(geometry)
    return read_ct_geometry(geometry)


def autoscoper_placement(size_ijk: Sequence[int], spacing: Sequence[float]):
    """(origin, direction) of Autoscoper's volume frame for a volume of ``size_ijk`` voxels
    (columns, rows, pages) and ``spacing`` mm; see the module docstring."""
    _, h, _ = (int(v) for v in size_ijk)
    sx, sy, sz = (float(v) for v in spacing)
    origin = (0.5 * sx, sy * (h - 0.5), -0.5 * sz)
    direction = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0))
    return origin, direction


def apply_ct_geometry(hu: torch.Tensor, spacing, origin, direction, geometry: CTGeometry):
    """(hu, spacing, origin, direction) with ``geometry`` applied: flips, HU mapping, then
    spacing / placement / origin / direction. ``hu`` is (K, J, I)."""
    arr = hu
    dims = [d for d, f in zip((2, 1, 0), geometry.flip) if f]  # flip i -> array axis 2, etc.
    if dims:
        arr = torch.flip(arr, dims)
    if geometry.hu_scale != 1.0 or geometry.hu_offset != 0.0:
        arr = arr.float() * geometry.hu_scale + geometry.hu_offset
    sp = geometry.spacing_mm or tuple(spacing)
    org, dirn = tuple(origin), tuple(tuple(r) for r in direction)
    if geometry.placement == "autoscoper":
        org, dirn = autoscoper_placement((arr.shape[2], arr.shape[1], arr.shape[0]), sp)
    else:
        if geometry.origin_mm is not None:
            org = geometry.origin_mm
        if geometry.direction is not None:
            dirn = geometry.direction
    return arr.contiguous(), tuple(float(v) for v in sp), tuple(float(v) for v in org), dirn


def describe(geometry: CTGeometry) -> str:
    return json.dumps(geometry.to_dict())


def resolve_ct_geometry(ct_path: Path, geometry: Any = None) -> CTGeometry | None:
    """The geometry to apply to the CT at ``ct_path``: ``geometry`` if given (a CTGeometry,
    dict or JSON path; merged over the side-car when both exist), else the side-car
    ``<stem>.geometry.json`` if present, else None. A TIFF stack without either is read with
    a warning: its header has no voxel size."""
    import warnings

    side = ct_geometry_path(ct_path) if not ct_path.is_dir() else None
    base = read_ct_geometry(side) if side is not None and side.exists() else None
    given = as_ct_geometry(geometry)
    geom = base.merged(given) if base is not None else given
    if geom is None and ct_path.suffix.lower() in (".tif", ".tiff"):
        warnings.warn(
            f"the CT {ct_path} is a TIFF stack, which stores no voxel size, origin or orientation (the header's "
            f"spacing is a print resolution); give them with a side-car {ct_geometry_path(ct_path).name}, the "
            "--ct-spacing / --ct-placement flags, or convert it once with corrreg convert-ct",
            stacklevel=4,
        )
    return geom
