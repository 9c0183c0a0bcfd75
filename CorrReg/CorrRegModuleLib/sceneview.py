"""The nodes a registration shows: the X-ray on the detector plane, the DRR volume beside it (linked
by a node reference), and the slice view that shows them as a radiograph."""

from __future__ import annotations

import numpy as np
import slicer
from slicer.util import arrayFromVolume, arrayFromVTKMatrix, updateVolumeFromArray, vtkMatrixFromArray

from . import adapter
from .checks import nodesOfClass

#: Node reference role from a DRR volume to the X-ray it simulates.
DRR_XRAY_REFERENCE_ROLE = "CorrReg.Xray"
#: CorrReg.Role of the fixed transform that places another view's camera (biplane).
VIEW_ROLE = "View"
#: Slicer's grey colour tables: a DRR (bone bright) is shown inverted over a bone-dark X-ray, so
#: that the overlay looks like the X-ray it is compared with.
GREY, INVERTED_GREY = "vtkMRMLColorTableNodeGrey", "vtkMRMLColorTableNodeInvertedGrey"
#: The attribute older versions used for the same link (a node ID, not remapped on scene import).
LEGACY_DRR_XRAY_ID_ATTRIBUTE = "CorrReg.XrayNodeID"
#: Margin around the X-ray when the slice view is fitted to it.
FIT_MARGIN = 1.05


def fieldOfViewFitting(width_mm, height_mm, viewDimensions, margin=FIT_MARGIN):
    """(fov_x, fov_y) that shows a width x height mm image whole, with square pixels in a view
    of ``viewDimensions`` (x, y) pixels, as vtkMRMLSliceLogic::FitSliceToVolume does."""
    fx, fy = width_mm * margin, height_mm * margin
    vx, vy = (max(1, int(d)) for d in viewDimensions[:2])
    if fy / fx > vy / vx:
        fx = fy * vx / vy
    else:
        fy = fx * vy / vx
    return fx, fy


class SceneViewMixin:
    """Scene set-up and display; part of ``CorrRegLogicCore``."""

    def _findDRRNode(self, xrayNode):
        """The DRR volume made for ``xrayNode`` (its node reference, or an older scene's attribute)."""
        for node in nodesOfClass(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(adapter.ROLE_ATTRIBUTE) != "DRR":
                continue
            ref = node.GetNodeReference(DRR_XRAY_REFERENCE_ROLE)
            if ref is not None and ref.GetID() == xrayNode.GetID():
                return node
            if ref is None and node.GetAttribute(LEGACY_DRR_XRAY_ID_ATTRIBUTE) == xrayNode.GetID():
                return node
        return None

    def _prepareDRRNode(self, drrNode, xrayNode, outputTransformNode):
        """A DRR volume with exactly the X-ray's geometry, under the output transform."""
        if drrNode is None:
            drrNode = self._findDRRNode(xrayNode)
        if drrNode is None:
            drrNode = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(f"{xrayNode.GetName()} DRR"))
        w, h = adapter.checkXrayNode(xrayNode)
        wasModifying = drrNode.StartModify()
        try:
            drrNode.SetAttribute(adapter.ROLE_ATTRIBUTE, "DRR")
            drrNode.SetNodeReferenceID(DRR_XRAY_REFERENCE_ROLE, xrayNode.GetID())
            if drrNode.GetAttribute(LEGACY_DRR_XRAY_ID_ATTRIBUTE) is not None:
                drrNode.RemoveAttribute(LEGACY_DRR_XRAY_ID_ATTRIBUTE)
            drrNode.SetIJKToRASMatrix(vtkMatrixFromArray(adapter.ijkToRASArray(xrayNode)))
            drrNode.SetSpacing(*xrayNode.GetSpacing())
            drrNode.SetOrigin(*xrayNode.GetOrigin())
            m = vtkMatrixFromArray(np.eye(4))
            xrayNode.GetIJKToRASDirectionMatrix(m)
            drrNode.SetIJKToRASDirectionMatrix(m)
            image = drrNode.GetImageData()
            if image is None or tuple(image.GetDimensions()) != (w, h, 1):
                updateVolumeFromArray(drrNode, np.zeros((1, h, w), dtype=np.float32))
            drrNode.SetAndObserveTransformNodeID(outputTransformNode.GetID())
        finally:
            drrNode.EndModify(wasModifying)
        if drrNode.GetDisplayNode() is None:
            drrNode.CreateDefaultDisplayNodes()
        display = drrNode.GetDisplayNode()
        if display is not None:
            display.AutoWindowLevelOn()
        return drrNode

    @staticmethod
    def showDRRImage(drrNode, img):
        """Write an (H, W) image into the DRR node (in place when the shape matches)."""
        arr = arrayFromVolume(drrNode)
        if arr.shape == (1,) + img.shape and arr.dtype == np.float32:
            arr[0] = img
            slicer.util.arrayFromVolumeModified(drrNode)
        else:
            updateVolumeFromArray(drrNode, img[None])

    def _resolveSliceNodes(self, sliceCompositeNode, sliceNode, showInSliceView):
        if not showInSliceView:
            return None, None
        scene = self.scene
        if sliceCompositeNode is None:
            sliceCompositeNode = scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        if sliceNode is None and sliceCompositeNode is not None:
            layout = sliceCompositeNode.GetLayoutName()
            for node in nodesOfClass(scene, "vtkMRMLSliceNode"):
                if layout and node.GetLayoutName() == layout:
                    sliceNode = node
                    break
        return sliceCompositeNode, sliceNode

    def showInSliceView(self, xrayNode, drrNode, sliceCompositeNode, sliceNode=None, opacity=0.5):
        """X-ray as background, DRR as foreground (``opacity``); align ``sliceNode`` to the X-ray."""
        if sliceCompositeNode is not None:
            wasModifying = sliceCompositeNode.StartModify()
            sliceCompositeNode.SetBackgroundVolumeID(xrayNode.GetID())
            sliceCompositeNode.SetForegroundVolumeID(drrNode.GetID() if drrNode is not None else None)
            sliceCompositeNode.SetForegroundOpacity(float(opacity))
            sliceCompositeNode.EndModify(wasModifying)
        if sliceNode is not None:
            # Fit the field of view once per (view, X-ray); later updates keep the user's zoom.
            fitted = self._previewCache.setdefault("fitted", {})
            self.alignSliceNodeToImage(sliceNode, xrayNode, fit=fitted.get(sliceNode.GetID()) != xrayNode.GetID())
            fitted[sliceNode.GetID()] = xrayNode.GetID()

    def setOverlayOpacity(self, opacity, sliceCompositeNode=None):
        node = sliceCompositeNode
        if node is None and self.currentRun is not None:
            node = self.currentRun.nodes.get("sliceComposite")
        if node is None:
            node = self.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        if node is not None:
            node.SetForegroundOpacity(float(opacity))

    @staticmethod
    def imagePlaneInWorld(imageNode) -> np.ndarray:
        """(4, 4) IJK -> world RAS of an image node, parent transforms included."""
        m = adapter.ijkToRASArray(imageNode)
        parent = imageNode.GetParentTransformNode()
        if parent is not None:
            tw = vtkMatrixFromArray(np.eye(4))
            parent.GetMatrixTransformToWorld(tw)
            m = arrayFromVTKMatrix(tw) @ m
        return m

    def alignSliceNodeToImage(self, sliceNode, imageNode, fit=False):
        """Make the slice view show the image plane as a radiograph: columns to the right, row 0
        at the top, seen from the X-ray source."""
        m = self.imagePlaneInWorld(imageNode)
        w, h, _ = imageNode.GetImageData().GetDimensions()
        x = m[:3, 0] / np.linalg.norm(m[:3, 0])
        y_down = m[:3, 1] / np.linalg.norm(m[:3, 1])
        normal = np.cross(x, -y_down)
        centre = (m @ np.array([(w - 1) / 2.0, (h - 1) / 2.0, 0.0, 1.0]))[:3]
        sliceNode.SetSliceToRASByNTP(*normal, *x, *centre, 0)
        if fit:
            sx, sy, _ = imageNode.GetSpacing()
            fx, fy = fieldOfViewFitting(w * sx, h * sy, sliceNode.GetDimensions())
            sliceNode.SetFieldOfView(fx, fy, sliceNode.GetFieldOfView()[2])
        sliceNode.UpdateMatrices()

    def _alignSliceView(self, nodes):
        sliceNode = nodes.get("slice")
        if sliceNode is not None and nodes.get("xray") is not None:
            self.alignSliceNodeToImage(sliceNode, nodes["xray"])
        for sliceNode, xray in nodes.get("otherSlices", ()):
            self.alignSliceNodeToImage(sliceNode, xray)

    def _viewTransformNode(self, xrayNode, outputTransformNode, cameraFromReference):
        """The fixed transform placing another view's camera relative to the reference camera
        (matrix to parent: reference_from_camera in camera-local RAS), under the output transform;
        reused for the same X-ray (node reference ``CorrReg.Xray``)."""
        node = None
        for candidate in nodesOfClass(self.scene, "vtkMRMLLinearTransformNode"):
            ref = candidate.GetNodeReference(DRR_XRAY_REFERENCE_ROLE)
            if candidate.GetAttribute(adapter.ROLE_ATTRIBUTE) == VIEW_ROLE and ref is not None \
                    and ref.GetID() == xrayNode.GetID():
                node = candidate
                break
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode",
                                                self.scene.GenerateUniqueName(f"{xrayNode.GetName()} camera"))
            node.SetAttribute(adapter.ROLE_ATTRIBUTE, VIEW_ROLE)
            node.SetNodeReferenceID(DRR_XRAY_REFERENCE_ROLE, xrayNode.GetID())
        adapter.setTransformNodeFromPose(node, cameraFromReference)
        node.SetAndObserveTransformNodeID(outputTransformNode.GetID())
        return node

    def _setUpOtherViews(self, nodes, otherViews, createDRR, showInSliceView, opacity):
        """Each other view's X-ray on its detector plane under its camera's fixed transform, its
        DRR beside it, and (when the scene has them) the Yellow, then Green, slice views."""
        nodes["otherXrays"], nodes["otherDRRs"], nodes["viewTransforms"] = [], [], []
        layouts = iter(("Yellow", "Green"))
        for xray, camera, cameraFromReference in otherViews:
            transform = self._viewTransformNode(xray, nodes["outputTransform"], cameraFromReference)
            adapter.placeXrayNode(xray, camera, transform)
            drr = self._prepareDRRNode(None, xray, transform) if createDRR else None
            nodes["otherXrays"].append(xray)
            nodes["viewTransforms"].append(transform)
            if drr is not None:
                nodes["otherDRRs"].append(drr)
            layout = next(layouts, None)
            composite = self.scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{layout}") if layout else None
            if showInSliceView and composite is not None:
                composite, sliceNode = self._resolveSliceNodes(composite, None, True)
                self.showInSliceView(xray, drr, composite, sliceNode, opacity)
                if sliceNode is not None:
                    nodes.setdefault("otherSlices", []).append((sliceNode, xray))

    @staticmethod
    def matchDRRPolarity(nodes, xrayInfos) -> None:
        """Show each view's DRR in its X-ray's polarity: inverted grey where the X-ray is bone dark
        (``xrayInfos``: the worker's decisions per view, reference first), grey otherwise."""
        drrs = [nodes.get("drr"), *nodes.get("otherDRRs", ())]
        for drr, info in zip(drrs, xrayInfos):
            display = None if drr is None else drr.GetDisplayNode()
            if display is not None:
                dark = (info or {}).get("polarity", {}).get("decision") == "dark"
                display.SetAndObserveColorNodeID(INVERTED_GREY if dark else GREY)

    def _setUpScene(self, ctNode, xrayNode, outputTransformNode, camera, drrNode, createDRR,
                    sliceCompositeNode, sliceNode, showInSliceView, opacity, otherViews=()):
        scene = self.scene
        if outputTransformNode is None:
            outputTransformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode",
                                                          scene.GenerateUniqueName(f"{xrayNode.GetName()} camera pose"))
        # The pose is relative to the CT's own frame: the camera transform sits where the CT sits.
        ctParentID = adapter.parentTransformID(ctNode)
        if adapter.parentTransformID(outputTransformNode) != ctParentID:
            outputTransformNode.SetAndObserveTransformNodeID(ctParentID)
        adapter.placeXrayNode(xrayNode, camera, outputTransformNode)
        nodes = {"ct": ctNode, "xray": xrayNode, "outputTransform": outputTransformNode}
        if createDRR or drrNode is not None:
            nodes["drr"] = self._prepareDRRNode(drrNode, xrayNode, outputTransformNode)
        composite, sliceNode = self._resolveSliceNodes(sliceCompositeNode, sliceNode, showInSliceView)
        if composite is not None:
            nodes["sliceComposite"] = composite
        if sliceNode is not None:
            nodes["slice"] = sliceNode
        if composite is not None or sliceNode is not None:
            self.showInSliceView(xrayNode, nodes.get("drr"), composite, sliceNode, opacity)
        if otherViews:
            self._setUpOtherViews(nodes, otherViews, createDRR or drrNode is not None, showInSliceView, opacity)
        return nodes
