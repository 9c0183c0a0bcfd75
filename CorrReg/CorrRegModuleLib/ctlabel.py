"""One bone of a full CT: the voxels a label map or a segmentation keeps, on the CT's grid.

A CT that holds one bone is registered on its edges, over the region where it projects
(``CorrRegLib.register.problem.holds_only_bone``); ``corrreg register --ct-label`` makes one from
a full CT and a label map, and this does the same from Slicer's nodes. Read on the main thread
(MRML), applied in the worker (``Volume.keep_only``).
"""

from __future__ import annotations

import numpy as np

from . import adapter


def _labelArray(labelNode, ctNode) -> tuple[np.ndarray, tuple]:
    """The label node's voxels (K, J, I); a segmentation's visible segments exported onto the
    CT's grid (a label map node added for the export and removed again)."""
    import slicer

    if labelNode.IsA("vtkMRMLSegmentationNode"):
        scene = labelNode.GetScene()
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        ids = lambda: {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}  # noqa: E731
        before = ids()
        tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            if not logic.ExportVisibleSegmentsToLabelmapNode(labelNode, tmp, ctNode):
                raise ValueError(f"the segmentation '{labelNode.GetName()}' could not be exported onto the CT's grid: "
                                 "show the bone's segment (make it visible) and try again")
            arr = np.array(slicer.util.arrayFromVolume(tmp), copy=True)
        finally:  # the label map and what the export made for it (display, colour table) go again
            for nodeID in ids() - before:
                node = scene.GetNodeByID(nodeID)
                if node is not None:
                    scene.RemoveNode(node)
        return arr, adapter.lpsGeometryFromVolumeNode(ctNode)
    if not labelNode.IsA("vtkMRMLScalarVolumeNode") or labelNode.GetImageData() is None:
        raise ValueError(f"the CT label '{labelNode.GetName()}' must be a label map volume or a segmentation, got "
                         f"{labelNode.GetClassName()}")
    arr = np.asarray(slicer.util.arrayFromVolume(labelNode))
    if arr.ndim != 3 or min(labelNode.GetImageData().GetDimensions()) < 2:
        raise ValueError(f"the CT label '{labelNode.GetName()}' must be a 3D label map (one value per voxel of the "
                         f"CT), got {' x '.join(str(d) for d in labelNode.GetImageData().GetDimensions())} voxels")
    return arr, adapter.lpsGeometryFromVolumeNode(labelNode)


def ctLabelMask(ctNode, labelNode, values=None) -> np.ndarray:
    """bool (K, J, I) on the CT's voxels: where ``labelNode`` (a label map: its non-zero voxels,
    or those holding one of ``values``; a segmentation: its visible segments) keeps the CT.
    A label map on another grid is resampled (nearest neighbour). Both must sit under the same
    parent transform: the label is taken in the CT's own frame."""
    import SimpleITK as sitk
    from CorrRegLib.io.ct import label_on_ct_grid

    if adapter.parentTransformID(labelNode) != adapter.parentTransformID(ctNode):
        raise ValueError(f"the CT label '{labelNode.GetName()}' and the CT '{ctNode.GetName()}' sit under different "
                         "transforms: put them under the same one, or harden the transforms")
    if values is not None and labelNode.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("label values pick labels of a label map; for a segmentation, show only the bone's segment")
    arr, (origin, direction, spacing) = _labelArray(labelNode, ctNode)
    labels = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    labels.SetOrigin(origin)
    labels.SetSpacing(spacing)
    labels.SetDirection([v for row in direction for v in row])
    o, d, s = adapter.lpsGeometryFromVolumeNode(ctNode)
    keep = label_on_ct_grid(labels, ctNode.GetImageData().GetDimensions(), s, o, d, values,
                            f"the CT label '{labelNode.GetName()}'",
                            "check the label (or its values), and that it was drawn on this CT")
    return keep.numpy()
