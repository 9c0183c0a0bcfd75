"""Showing a pose without registering (the initial-pose sliders), with the CT conversion and the
preview projector cached between calls and dropped when the scene closes."""

from __future__ import annotations

from . import adapter
from .rendering import DRRRenderer


class PreviewMixin:
    """The preview and its caches; part of ``CorrRegLogicCore``."""

    def cachedVolume(self, ctNode):
        """``volumeFromNode(ctNode)``, reused while the node's voxels and geometry are unchanged."""
        key = self._volumeKey(ctNode)
        cached = self._previewCache.get("volume")
        if cached is None or cached[0] != key:
            adapter.checkCTNode(ctNode)
            cached = (key, adapter.volumeFromNode(ctNode))
            self._previewCache["volume"] = cached
        return cached[1]

    @staticmethod
    def _volumeKey(ctNode):
        image = ctNode.GetImageData()
        return (ctNode.GetID(), None if image is None else image.GetMTime(),
                tuple(adapter.ijkToRASArray(ctNode).flatten().tolist()))

    def preview(self, ctNode, xrayNode, outputTransformNode, pose, camera, drrNode=None,
                sliceCompositeNode=None, sliceNode=None, showInSliceView=True, opacity=0.5, device="cpu"):
        """Show ``pose`` without registering: place the X-ray, write the transform, render a
        quick DRR. Validates like ``start``; returns the nodes dict."""
        self.requireDependencies()
        self._checkInputs(ctNode, xrayNode)
        self._checkOutputTransform(outputTransformNode, ctNode, xrayNode, drrNode)
        key = (self._volumeKey(ctNode), tuple(camera.size),
               camera.sdd, tuple(camera.pixel_spacing), tuple(camera.principal_point), str(device))
        cached = self._previewCache.get("renderer")
        if cached is None or cached[0] != key:
            volume = self.cachedVolume(ctNode)
            self.requireBone(volume, ctNode.GetName())
            self._previewCache["renderer"] = (key, DRRRenderer(volume, camera, device=device, livePixels=96 * 96))
        renderer = self._previewCache["renderer"][1]
        nodes = self._setUpScene(ctNode, xrayNode, outputTransformNode, camera, drrNode, True,
                                 sliceCompositeNode, sliceNode, showInSliceView, opacity)
        adapter.setTransformNodeFromPose(nodes["outputTransform"], pose)
        self._alignSliceView(nodes)
        self.showDRRImage(nodes["drr"], renderer.render(adapter._toNumpyPose(pose)))
        return nodes

    def requireBone(self, volume, name):
        """The isocenter (bone centroid); ValueError when the CT holds no bone."""
        from .worker import BoneMissing

        try:
            return self.isocenterOf(volume)
        except ValueError:
            raise BoneMissing(
                f"the CT '{name}' contains no bone (no voxel denser than about 500 HU); CorrReg registers "
                "on bony anatomy. Check that the volume is a CT in Hounsfield units") from None

    def releaseMemory(self) -> None:
        """Forget the cached CT, the preview projector and the X-ray geometry (the scene closes)."""
        self._previewCache.clear()
        self.__dict__.get("_geometryCache", {}).clear()
