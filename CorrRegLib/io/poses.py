"""Poses: the pose JSON (camera_from_ct, LPS or RAS) and ITK transform files for Slicer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import check_rigid, ras_from_lps
from ..outputs import atomic_path
from ._common import (
    PathLike,
    Tensor,
    _as_numpy,
    _load_json,
    _path,
    _require_exists,
    _write_json,
)


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


def _pose_from_json(d: dict, key: str, p) -> Tensor:
    try:
        t = torch.tensor(d[key], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{p}: {key} must be a 4x4 list of numbers") from None
    if t.shape != (4, 4):
        raise ValueError(f"{p}: {key} must be 4x4, got shape {tuple(t.shape)}")
    frame = str(d.get("frame", "LPS")).upper()
    if frame == "RAS":
        t = ras_from_lps(t)
    elif frame != "LPS":
        raise ValueError(f'{p}: unknown frame {d.get("frame")!r}; use "LPS" (or "RAS")')
    try:
        return check_rigid(t)
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def read_pose_json(path: PathLike) -> Tensor:
    """camera_from_ct (float64 4x4, LPS) from a pose JSON; "frame": "RAS" is converted with
    geometry.ras_from_lps, a missing frame means LPS. Rejects non-rigid matrices."""
    p = _path(path)
    d = _load_json(p, "pose JSON")
    if not isinstance(d, dict) or "camera_from_ct" not in d:
        raise ValueError(f'{p}: a pose JSON needs a "camera_from_ct" 4x4 matrix, e.g. {{"camera_from_ct": [[...]], "frame": "LPS"}}')
    return _pose_from_json(d, "camera_from_ct", p)


def read_world_pose_json(path: PathLike) -> tuple[Tensor, str]:
    """(pose, key): a multi-view pose JSON's ``world_from_ct``, else a ``camera_from_ct`` (the
    caller knows which camera it belongs to); LPS or RAS as :func:`read_pose_json`."""
    p = _path(path)
    d = _load_json(p, "pose JSON")
    for key in ("world_from_ct", "camera_from_ct"):
        if isinstance(d, dict) and key in d:
            return _pose_from_json(d, key, p), key
    raise ValueError(f'{p}: a pose JSON needs a "world_from_ct" (several calibrated views) or "camera_from_ct" 4x4 '
                     'matrix, e.g. {"world_from_ct": [[...]], "frame": "LPS"}')


def write_world_pose_json(pose: Tensor | np.ndarray, path: PathLike, extra: dict | None = None) -> Path:
    """Write ``{"world_from_ct": 4x4, "frame": "LPS", **extra}`` (a multi-view result; ``extra``
    usually holds each view's camera_from_ct under "views")."""
    d = {"world_from_ct": _pose64(pose).tolist(), "frame": "LPS"}
    for k, v in (extra or {}).items():
        if k in d:
            raise ValueError(f"extra key {k!r} would overwrite the pose")
        d[k] = v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v
    return _write_json(d, path)


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
    with atomic_path(p) as tmp:
        sitk.WriteTransform(tx, str(tmp))
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
