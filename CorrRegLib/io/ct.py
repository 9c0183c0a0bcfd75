"""CTs: any 3D image SimpleITK reads (NIfTI, NRRD, MHA, a DICOM series), in HU, with its LPS geometry."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..outputs import atomic_path
from ..volume import Volume, attenuation_to_hu
from .ct_geometry import apply_ct_geometry, resolve_ct_geometry
from ._common import (
    PathLike,
    Tensor,
    _as_numpy,
    _check_spacing,
    _execute,
    _is_dicom_file,
    _path,
    _read_info,
    _require_exists,
    _sitk_error,
)


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
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(where, err, "DICOM series") from None
    _check_slice_positions(reader, img, files, where)
    return img


def _check_slice_positions(reader: sitk.ImageSeriesReader, img: sitk.Image, files: list[str], where: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (a slice missing, unreadable or from
    another scan): ITK would stack them at the first gap's spacing, misplacing the rest."""
    positions = []
    for i in range(len(files)):
        try:
            xyz = [float(v) for v in reader.GetMetaData(i, "0020|0032").replace("\\", " ").split()]
        except (RuntimeError, ValueError):
            return  # no ImagePositionPatient: nothing to check
        if len(xyz) != 3:
            return
        positions.append(xyz)
    if len(positions) < 3:
        return
    normal = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    gaps = np.diff(np.sort(np.array(positions) @ normal))
    median = float(np.median(gaps))
    if median <= 0 or float(np.abs(gaps - median).max()) > max(0.01, 0.1 * median):
        raise ValueError(
            f"the DICOM series in {where} has unevenly spaced slices (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm "
            f"between {len(files)} readable slices): a slice is missing, unreadable (truncated?) or from another scan; "
            "export the series again, or put the slices of one scan in their own folder"
        )


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


def read_ct_hu(path: PathLike, geometry=None) -> HUImage:
    """The CT's voxel values (as stored, normally HU) as a float32 (K, J, I) tensor + geometry.

    Accepts NIfTI/NRRD/MHA files, a DICOM series folder, one file of a DICOM series, or any 3D
    image SimpleITK reads (a multi-page TIFF: pages are k). Origin, spacing and direction are
    kept exactly as SimpleITK reads them (oblique included), unless ``geometry`` (a
    ``ct_geometry.CTGeometry``, dict or JSON path) or a side-car ``<stem>.geometry.json``
    gives them (and a HU mapping), see ``io/ct_geometry.py``.
    """
    img, p = _read_ct_image(path)
    arr = sitk.GetArrayFromImage(img)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"the CT {p} contains {bad} NaN or Inf voxels; replace them (e.g. with -1000 HU for air) and save again"
        )
    spacing, origin, direction = _geometry(img)
    hu = torch.from_numpy(np.ascontiguousarray(arr))
    geom = resolve_ct_geometry(p, geometry)
    if geom is not None:
        hu, spacing, origin, direction = apply_ct_geometry(hu, spacing, origin, direction, geom)
    return HUImage(hu, spacing, origin, direction)


def read_ct(path: PathLike, hu: bool = True, geometry=None) -> Volume:
    """Read a CT into a ``Volume`` of linear attenuation (1/mm) with its exact LPS geometry.

    ``hu=True`` (default): the file holds Hounsfield units, converted by volume.hu_to_attenuation.
    ``hu=False``: the file already holds attenuation in 1/mm and is used as is.
    ``geometry``: spacing / origin / direction / HU mapping the file lacks (see read_ct_hu).
    """
    img = read_ct_hu(path, geometry=geometry)
    volume = img.to_volume() if hu else Volume(img.hu, img.spacing, img.origin, img.direction)
    volume.check_content(f"the CT {_path(path)}")
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
    return volume


def read_ct_label(path: PathLike, volume: Volume, values: Sequence[int] | None = None) -> Tensor:
    """(K, J, I) bool mask on ``volume``'s voxel grid from a label map: its non-zero voxels, or
    those holding one of ``values``. A label map on another grid is resampled onto the CT's
    (nearest neighbour, through both images' LPS geometry), so a segmentation exported from
    Slicer at another resolution works as it is."""
    p = _path(path)
    _require_exists(p, "CT label map")
    reader = _read_info(p, "CT label map")
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() != 3:
        raise ValueError(f"{p} is not a 3D scalar label map; export the bone's segment as a label map")
    return label_on_ct_grid(_execute(reader, p, "CT label map"), volume.shape_ijk, volume.spacing, volume.origin,
                            volume.direction, values, str(p))


def label_on_ct_grid(labels: sitk.Image, shape_ijk: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                     direction: Sequence[Sequence[float]], values: Sequence[int] | None = None,
                     where: str = "the label map", hint: str = "check the label map and --ct-label-values") -> Tensor:
    """(K, J, I) bool mask on a CT's voxel grid (``shape_ijk`` (I, J, K) and LPS ``spacing``,
    ``origin``, ``direction``): the non-zero voxels of a 3D label image (LPS geometry), or those
    holding one of ``values``; resampled (nearest neighbour) when its grid is not the CT's.
    ``where`` names it and ``hint`` says what to do in the error when it keeps nothing."""
    ref = sitk.Image([int(v) for v in shape_ijk], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection([float(v) for row in direction for v in row])
    same = (labels.GetSize() == ref.GetSize() and np.allclose(labels.GetSpacing(), ref.GetSpacing())
            and np.allclose(labels.GetOrigin(), ref.GetOrigin()) and np.allclose(labels.GetDirection(), ref.GetDirection()))
    if not same:
        labels = sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    arr = sitk.GetArrayFromImage(labels)
    keep = np.isin(arr, np.asarray(list(values))) if values is not None else arr != 0
    if not keep.any():
        held = np.unique(arr[arr != 0])[:20].tolist()
        what = f"the labels {list(values)}" if values is not None else "a non-zero label"
        raise ValueError(f"{where} holds no voxel with {what} inside the CT (it holds {held or 'only zeros'}); {hint}")
    return torch.from_numpy(keep)


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
    with atomic_path(p) as tmp:
        sitk.WriteImage(img, str(tmp))
    return p
