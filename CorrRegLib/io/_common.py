"""Helpers shared by the readers and writers of CorrRegLib.io: paths, suffixes, SimpleITK
headers and errors, JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..outputs import atomic_path
from ._integrity import check_image_data

Tensor = torch.Tensor
PathLike = Union[str, "os.PathLike[str]"]

#: Metadata key under which ``write_xray`` stores the camera JSON in NRRD / MetaImage headers.
CAMERA_METADATA_KEY = "corrreg_camera"

_COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".mrk.json", ".camera.json", ".pose.json")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_HEADER_SPACING_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz")


def _path(path: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def _write_json(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically, creating the parent folder."""
    p = _path(path)
    with atomic_path(p) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return p


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read the {what} {path}: permission denied; make it readable")


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
    first = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(first) if "ERROR" in ln or "error" in ln), first[-1] if first else "")
    if detail.endswith(":") and first[-1] != detail:  # the reason follows on the last line
        detail = f"{detail} {first[-1]}"
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
    check_image_data(path, reader, what)
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


def _load_json(path: Path, what: str) -> Any:
    _require_exists(path, what)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a {what} file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8); expected a {what}") from None
