"""MRML nodes <-> CorrRegLib objects.

This is the only place where Slicer's RAS world meets CorrRegLib's LPS conventions
(see DESIGN.md, "Frames and units"):

* CT: a scalar volume node's IJKToRAS is ``RAS_FROM_LPS @ lps_from_index`` of the
  ``CorrRegLib.volume.Volume``; voxel arrays are (K, J, I) on both sides.
* Pose: the output linear transform node's *matrix to parent* is ``ct_from_camera`` written
  between RAS frames, ``M = F @ inverse(camera_from_ct) @ F`` with ``F = diag(-1, -1, 1, 1)``.
  Nodes placed under that transform are therefore defined in the camera frame "seen as LPS":
  a camera point ``c`` (source at the origin, detector at ``z = sdd``) has local RAS
  coordinates ``F @ c``. Saving the node to an ITK file (.tfm/.h5), which stores the
  resampling ("from parent") transform in LPS, writes ``camera_from_ct`` itself.
* X-ray: a single-slice volume node whose pixel (col i, row j) is image[j, i]. Placed on the
  detector plane under the output transform, pixel (i, j) sits at camera point
  ``((i + 0.5 - cx) dx, (j + 0.5 - cy) dy, sdd)``.

Imports: numpy, MRML classes and ``slicer.util`` array helpers only; CorrRegLib and torch are
imported inside the functions that need them, so that this file loads before PyTorch is
installed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import slicer
from slicer.util import (
    arrayFromTransformMatrix,
    arrayFromVolume,
    arrayFromVTKMatrix,
    updateTransformMatrixFromArray,
    updateVolumeFromArray,
    vtkMatrixFromArray,
)

#: diag(-1, -1, 1, 1): maps LPS to RAS and back (it is its own inverse).
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_FROM_RAS = RAS_FROM_LPS

#: Node attribute holding the X-ray's camera geometry as the camera JSON of DESIGN.md
#: (``sdd_mm``, ``pixel_spacing_mm``, ``size_px``, ``principal_point_px``), optionally with
#: ``sod_mm``, ``primary_angle_deg`` and ``secondary_angle_deg``.
GEOMETRY_ATTRIBUTE = "CorrReg.Geometry"
#: Node attribute that marks nodes created by CorrReg (value: "DRR").
ROLE_ATTRIBUTE = "CorrReg.Role"


# ------------------------------------------------------------------------------------------
# small helpers


def _matrix(node_getter) -> np.ndarray:
    m = vtkMatrixFromArray(np.eye(4))
    node_getter(m)
    return arrayFromVTKMatrix(m)


def ijkToRASArray(volumeNode) -> np.ndarray:
    """The node's IJKToRAS as a (4, 4) float64 array (local frame, parent transforms ignored)."""
    return _matrix(volumeNode.GetIJKToRASMatrix)


def rigidInverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (4, 4) matrix using the transpose of its rotation block."""
    m = np.asarray(m, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def checkRigid(m: np.ndarray, what: str = "transform", tol: float = 1e-4) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"the {what} must be a finite 4x4 matrix")
    r = m[:3, :3]
    if (
        np.abs(r.T @ r - np.eye(3)).max() > tol
        or abs(np.linalg.det(r) - 1.0) > tol
        or np.abs(m[3] - [0, 0, 0, 1]).max() > tol
    ):
        raise ValueError(
            f"the {what} is not rigid (it scales, shears or mirrors); CorrReg estimates rotations "
            "and translations only"
        )
    return m


def parentTransformID(node):
    """ID of the node's parent transform, or None.

    Uses GetParentTransformNode(): vtkMRMLTransformableNode.GetTransformNodeID() bumps the
    node's MTime on its first call after a change, which would make read-only code look like it
    modified an input node.
    """
    parent = node.GetParentTransformNode() if node is not None else None
    return parent.GetID() if parent is not None else None


def _toNumpyPose(pose) -> np.ndarray:
    if hasattr(pose, "detach"):
        pose = pose.detach().cpu().double().numpy()
    return np.asarray(pose, dtype=np.float64).reshape(4, 4)


# ------------------------------------------------------------------------------------------
# CT volume


def lpsGeometryFromVolumeNode(volumeNode):
    """(origin, direction, spacing) of the node in LPS, as ITK/CorrRegLib define them."""
    dirRAS = _matrix(volumeNode.GetIJKToRASDirectionMatrix)[:3, :3]
    direction = LPS_FROM_RAS[:3, :3] @ dirRAS
    origin = LPS_FROM_RAS[:3, :3] @ np.asarray(volumeNode.GetOrigin(), dtype=np.float64)
    spacing = tuple(float(s) for s in volumeNode.GetSpacing())
    return tuple(origin.tolist()), tuple(tuple(row) for row in direction.tolist()), spacing


def setVolumeNodeLPSGeometry(volumeNode, origin, direction, spacing) -> None:
    """Set a node's origin/directions/spacing from LPS (ITK) geometry."""
    dirRAS = RAS_FROM_LPS[:3, :3] @ np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = dirRAS
    volumeNode.SetIJKToRASDirectionMatrix(vtkMatrixFromArray(m))
    volumeNode.SetOrigin(*(RAS_FROM_LPS[:3, :3] @ np.asarray(origin, dtype=np.float64)).tolist())
    volumeNode.SetSpacing(*[float(s) for s in spacing])


def checkCTNode(ctNode) -> tuple[int, int, int]:
    """Raise ValueError unless ``ctNode`` is a 3D scalar volume with voxels; returns (I, J, K)."""
    if ctNode is None:
        raise ValueError("no CT volume selected")
    if not ctNode.IsA("vtkMRMLScalarVolumeNode") or ctNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"the CT must be a scalar volume node, got {ctNode.GetClassName()}")
    image = ctNode.GetImageData()
    if image is None:
        raise ValueError(f"the CT volume '{ctNode.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"the CT volume '{ctNode.GetName()}' has {image.GetNumberOfScalarComponents()} components; a CT has one")
    dims = tuple(int(d) for d in image.GetDimensions())
    if min(dims) < 2:
        raise ValueError(
            f"the CT volume '{ctNode.GetName()}' has dimensions {dims}: it is a single slice, not a 3D CT "
            "(did you pick the X-ray as CT?)"
        )
    return dims


def huArrayFromVolumeNode(ctNode) -> np.ndarray:
    """A float32 copy of the node's voxels (K, J, I), assumed to be Hounsfield units."""
    checkCTNode(ctNode)
    return np.array(arrayFromVolume(ctNode), dtype=np.float32, copy=True)


def volumeFromNode(ctNode, muWater: float | None = None):
    """CT scalar volume node (HU) -> ``CorrRegLib.volume.Volume`` (attenuation 1/mm, LPS)."""
    import torch
    from CorrRegLib.volume import MU_WATER_PER_MM, Volume

    hu = huArrayFromVolumeNode(ctNode)
    origin, direction, spacing = lpsGeometryFromVolumeNode(ctNode)
    return Volume.from_hu(
        torch.from_numpy(hu), spacing, origin, direction, mu_water=MU_WATER_PER_MM if muWater is None else muWater
    )


def volumeNodeFromArray(scene, hu, spacing, origin=(0.0, 0.0, 0.0), direction=None, name="CT", node=None):
    """A scalar volume node holding ``hu`` (K, J, I) with LPS geometry (origin, direction, spacing)."""
    arr = _toNumpyArray(hu).astype(np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a (K, J, I) array, got shape {arr.shape}")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    direction = np.eye(3) if direction is None else direction
    setVolumeNodeLPSGeometry(node, origin, direction, spacing)
    updateVolumeFromArray(node, arr)
    node.CreateDefaultDisplayNodes()
    return node


def volumeNodeFromVolume(scene, volume, name="CT", node=None):
    """``Volume`` (attenuation) -> scalar volume node in HU with the same LPS geometry."""
    from CorrRegLib.volume import attenuation_to_hu

    return volumeNodeFromArray(
        scene, attenuation_to_hu(volume.data.detach().cpu()), volume.spacing, volume.origin, volume.direction, name, node
    )


def _toNumpyArray(a) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


# ------------------------------------------------------------------------------------------
# X-ray


@dataclass
class XrayImage:
    """The pixels of a 2D X-ray node and what the node says about its geometry."""

    image: object  # torch.Tensor (H, W) float32, row 0 = first image row
    pixelSpacing: tuple[float, float]  # (dx, dy) mm, from the node's spacing
    size: tuple[int, int]  # (W, H)
    ijkToRAS: np.ndarray  # (4, 4) of the single-slice node


def checkXrayNode(xrayNode) -> tuple[int, int]:
    """Raise ValueError unless the node is a single-slice (2D) image; returns (W, H)."""
    if xrayNode is None:
        raise ValueError("no X-ray image selected")
    if not xrayNode.IsA("vtkMRMLScalarVolumeNode") and not xrayNode.IsA("vtkMRMLVectorVolumeNode"):
        raise ValueError(f"the X-ray must be an image volume node, got {xrayNode.GetClassName()}")
    if xrayNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{xrayNode.GetName()}' is a label map, not an X-ray image")
    image = xrayNode.GetImageData()
    if image is None:
        raise ValueError(f"the X-ray volume '{xrayNode.GetName()}' has no pixels")
    i, j, k = (int(d) for d in image.GetDimensions())
    if k != 1:
        raise ValueError(
            f"the X-ray must be a single-slice (2D) image, but '{xrayNode.GetName()}' has dimensions "
            f"{i} x {j} x {k} (a 3D volume; did you pick the CT as X-ray?)"
        )
    if i < 2 or j < 2:
        raise ValueError(f"the X-ray '{xrayNode.GetName()}' is only {i} x {j} pixels")
    return i, j


def xrayArrayFromNode(xrayNode) -> np.ndarray:
    """(H, W) float32 copy of the X-ray's pixels (colour images are averaged to grey)."""
    checkXrayNode(xrayNode)
    arr = np.array(arrayFromVolume(xrayNode), dtype=np.float32, copy=True)
    if arr.ndim == 4:  # (1, H, W, C) vector volume, e.g. an RGB PNG
        arr = arr[..., :3].mean(-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return arr[0]


def xrayImageFromNode(xrayNode) -> XrayImage:
    import torch

    w, h = checkXrayNode(xrayNode)
    arr = xrayArrayFromNode(xrayNode)
    sx, sy, _ = xrayNode.GetSpacing()
    return XrayImage(torch.from_numpy(arr), (float(sx), float(sy)), (w, h), ijkToRASArray(xrayNode))


def cameraFromXrayNode(xrayNode, sdd: float, pixelSpacing=None, principalPoint=None):
    """``Camera`` for the node's image size; pixel spacing from the node unless given."""
    from CorrRegLib.geometry import Camera

    w, h = checkXrayNode(xrayNode)
    if pixelSpacing is None:
        sx, sy, _ = xrayNode.GetSpacing()
        pixelSpacing = (sx, sy)
    return Camera(sdd=float(sdd), pixel_spacing=tuple(pixelSpacing), size=(w, h), principal_point=principalPoint)


def detectorIJKToRAS(camera) -> np.ndarray:
    """IJKToRAS that puts a (W, H, 1) image on the detector plane, in camera-local RAS.

    Voxel (i, j, 0) goes to camera point ((i + 0.5 - cx) dx, (j + 0.5 - cy) dy, sdd), written
    with ``F = diag(-1, -1, 1)`` like every LPS frame in Slicer. The slice normal is +z.
    """
    dx, dy = camera.pixel_spacing
    cx, cy = camera.principal_point
    cameraFromIJK = np.array(
        [
            [dx, 0.0, 0.0, (0.5 - cx) * dx],
            [0.0, dy, 0.0, (0.5 - cy) * dy],
            [0.0, 0.0, 1.0, camera.sdd],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return RAS_FROM_LPS @ cameraFromIJK


def setDetectorGeometry(volumeNode, camera) -> None:
    """Give ``volumeNode`` (a W x H x 1 image) the detector-plane geometry of ``camera``."""
    m = detectorIJKToRAS(camera)
    spacing = (camera.pixel_spacing[0], camera.pixel_spacing[1], 1.0)
    direction = np.eye(4)
    direction[:3, :3] = m[:3, :3] / np.asarray(spacing)
    volumeNode.SetIJKToRASDirectionMatrix(vtkMatrixFromArray(direction))
    volumeNode.SetSpacing(*spacing)
    volumeNode.SetOrigin(*m[:3, 3].tolist())


def placeXrayNode(xrayNode, camera, transformNode=None) -> None:
    """Put the X-ray on the detector plane in the camera frame, under ``transformNode``.

    Only the node's geometry and parent transform change; its pixels are left alone.
    """
    w, h = checkXrayNode(xrayNode)
    if (w, h) != tuple(camera.size):
        raise ValueError(f"the camera is {camera.size[0]} x {camera.size[1]} pixels but the X-ray is {w} x {h}")
    wasModifying = xrayNode.StartModify()
    try:
        setDetectorGeometry(xrayNode, camera)
        xrayNode.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode is not None else None)
    finally:
        xrayNode.EndModify(wasModifying)


def cameraGeometryToAttribute(camera, sod=None, primaryAngle=None, secondaryAngle=None) -> str:
    d = dict(camera.to_dict())
    if sod is not None:
        d["sod_mm"] = float(sod)
    if primaryAngle is not None:
        d["primary_angle_deg"] = float(primaryAngle)
    if secondaryAngle is not None:
        d["secondary_angle_deg"] = float(secondaryAngle)
    return json.dumps(d)


def geometryFromNodeAttribute(node) -> dict:
    """The geometry dict stored in the node's ``CorrReg.Geometry`` attribute ({} if none)."""
    if node is None:
        return {}
    text = node.GetAttribute(GEOMETRY_ATTRIBUTE)
    if not text:
        return {}
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the {GEOMETRY_ATTRIBUTE} attribute of '{node.GetName()}' is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def xrayNodeFromImage(scene, image, camera, name="X-ray", transformNode=None, node=None, sod=None,
                      primaryAngle=None, secondaryAngle=None):
    """A single-slice scalar volume holding ``image`` (H, W), on the detector plane of ``camera``.

    The camera geometry is stored in the ``CorrReg.Geometry`` attribute so that the module finds
    it again (as it would find DICOM tags).
    """
    arr = _toNumpyArray(image).astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(f"an X-ray image must be 2D (H, W), got shape {arr.shape}")
    h, w = arr.shape
    if (w, h) != tuple(camera.size):
        raise ValueError(f"the camera is {camera.size[0]} x {camera.size[1]} pixels but the image is {w} x {h}")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateVolumeFromArray(node, arr[None])
    setDetectorGeometry(node, camera)
    node.SetAttribute(GEOMETRY_ATTRIBUTE, cameraGeometryToAttribute(camera, sod, primaryAngle, secondaryAngle))
    node.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode is not None else None)
    node.CreateDefaultDisplayNodes()
    return node


# ------------------------------------------------------------------------------------------
# poses and transform nodes


def transformMatrixFromPose(pose) -> np.ndarray:
    """camera_from_ct (LPS) -> the transform node's matrix to parent (ct_from_camera in RAS)."""
    t = checkRigid(_toNumpyPose(pose), "pose")
    return RAS_FROM_LPS @ rigidInverse(t) @ RAS_FROM_LPS


def poseArrayFromTransformMatrix(matrixToParent) -> np.ndarray:
    """The transform node's matrix to parent -> camera_from_ct (LPS), float64 numpy."""
    m = checkRigid(np.asarray(matrixToParent, dtype=np.float64), "transform")
    return LPS_FROM_RAS @ rigidInverse(m) @ LPS_FROM_RAS


def poseArrayFromTransformNode(transformNode) -> np.ndarray:
    if transformNode is None or not transformNode.IsA("vtkMRMLTransformNode"):
        raise ValueError("a transform node is needed to read a pose from")
    if not transformNode.IsLinear():
        raise ValueError(f"the transform '{transformNode.GetName()}' is not linear")
    return poseArrayFromTransformMatrix(arrayFromTransformMatrix(transformNode))


def poseFromTransformNode(transformNode):
    """camera_from_ct as a (4, 4) float64 torch tensor, read from the node's matrix to parent."""
    import torch

    return torch.from_numpy(poseArrayFromTransformNode(transformNode))


def setTransformNodeFromPose(transformNode, pose) -> None:
    """Write camera_from_ct into the node (matrix to parent = ct_from_camera in RAS)."""
    updateTransformMatrixFromArray(transformNode, transformMatrixFromPose(pose))


def rasPointsFromLPS(points) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return p * np.array([-1.0, -1.0, 1.0])


lpsPointsFromRAS = rasPointsFromLPS


def isFinitePositive(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False
