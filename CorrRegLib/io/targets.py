"""Target points for accuracy: Slicer markups, .fcsv, CSV, and label-map centroids."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..outputs import atomic_path
from ._common import (
    PathLike,
    Tensor,
    _as_numpy,
    _check_spacing,
    _execute,
    _load_json,
    _path,
    _read_info,
    _require_exists,
    _suffix,
    _write_json,
)


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
    for n, m in enumerate(markups, start=1):
        if not isinstance(m, dict):
            raise ValueError(f"{p}: markup {n} is not an object; save the points from Slicer as .mrk.json")
        system = str(m.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise ValueError(f"{p}: unknown coordinateSystem {system!r}; expected LPS or RAS")
        units = m.get("coordinateUnits", "mm")
        if units != "mm":
            raise ValueError(f"{p}: coordinateUnits {units!r} not supported; save the markups in mm")
        flip = -1.0 if system == "RAS" else 1.0
        control = m.get("controlPoints", []) or []
        if not isinstance(control, list):
            raise ValueError(f'{p}: "controlPoints" of markup {n} must be a list of points')
        for i, cp in enumerate(control, start=1):
            if not isinstance(cp, dict):
                raise ValueError(f"{p}: control point {i} of markup {n} is not an object")
            if cp.get("positionStatus", "defined") != "defined" or cp.get("position") is None:
                continue
            label = str(cp.get("label") or cp.get("id") or f"P{len(names) + 1}")
            x, y, z = _xyz(cp["position"], f"{p}: control point {label!r} (markup {n})")
            points.append([flip * x, flip * y, z])
            names.append(label)
    return _targets_result(points, names, p)


def _xyz(values, where: str) -> tuple[float, float, float]:
    """(x, y, z) from a sequence of three numbers, or a ValueError naming ``where``."""
    try:
        if isinstance(values, (str, bytes)) or len(values) != 3:
            raise ValueError
        x, y, z = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{where} has position {values!r}; expected three numbers x, y, z (mm)") from None
    return x, y, z


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
        for n, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if row[0].startswith("#"):
                line = ",".join(row)
                if "CoordinateSystem" in line:
                    value = line.split("=", 1)[-1].strip().upper()
                    ras = value in ("0", "RAS")
                continue
            x, y, z = _xyz(row[1:4], f"{p}: line {n} ({','.join(row)[:60]})")
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
    if suf in (".fcsv", ".csv", ".tsv", ".txt"):
        if p.is_dir():
            raise ValueError(f"{p} is a folder; expected a {suf} file of target points")
        try:
            return _read_fcsv(p) if suf == ".fcsv" else _read_csv_points(p)
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not a text file (not UTF-8); expected {suf} target points") from None
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
    with atomic_path(p) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
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
