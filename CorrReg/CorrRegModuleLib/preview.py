"""Showing a pose without registering (the initial-pose sliders), with the CT conversion and the
preview projector cached between calls and dropped when the scene closes."""

from __future__ import annotations

import numpy as np

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
                sliceCompositeNode=None, sliceNode=None, showInSliceView=True, opacity=0.5, device="cpu",
                calibration=None, otherViews=()):
        """Show ``pose`` without registering: place the X-ray, write the transform, render a
        quick DRR. Validates like ``start``; returns the nodes dict. With ``otherViews``
        (biplane, as ``start`` takes them, with the first X-ray's ``calibration``) each other
        X-ray is placed by the calibrations and gets its DRR too, so a start can be judged in
        every view."""
        self.requireDependencies()
        self._checkInputs(ctNode, xrayNode)
        others = []
        if otherViews:
            _, cameraFromWorld, checked = self._checkOtherViews(ctNode, xrayNode, otherViews, "intensity", None,
                                                                calibration, None, None, tuple(camera.pixel_spacing))
            others = [(v.xrayNode, c.camera, c.camera_from_world.numpy() @ np.linalg.inv(cameraFromWorld))
                      for v, c in checked]
        self._checkOutputTransform(outputTransformNode, ctNode, xrayNode, drrNode, [x for x, _, _ in others])
        renderer = self._previewRenderer(ctNode, camera, device)
        nodes = self._setUpScene(ctNode, xrayNode, outputTransformNode, camera, drrNode, True,
                                 sliceCompositeNode, sliceNode, showInSliceView, opacity, otherViews=others)
        adapter.setTransformNodeFromPose(nodes["outputTransform"], pose)
        self._alignSliceView(nodes)
        pose = adapter._toNumpyPose(pose)
        self.showDRRImage(nodes["drr"], renderer.render(pose))
        for (_, cam, cameraFromReference), drr in zip(others, nodes.get("otherDRRs", ())):
            self.showDRRImage(drr, self._previewRenderer(ctNode, cam, device).render(cameraFromReference @ pose))
        return nodes

    def _previewRenderer(self, ctNode, camera, device):
        """A quick DRR renderer of the CT for ``camera``, cached per camera while the CT is unchanged."""
        key = (self._volumeKey(ctNode), tuple(camera.size), camera.sdd, tuple(camera.pixel_spacing),
               tuple(camera.principal_point), camera.focal_px, str(device))
        renderers = self._previewCache.setdefault("renderers", {})
        if key not in renderers:
            volume = self.cachedVolume(ctNode)
            self.requireBone(volume, ctNode.GetName())
            for old in [k for k in renderers if k[0] != key[0]]:  # another CT, or its voxels changed
                del renderers[old]
            renderers[key] = DRRRenderer(volume, camera, device=device, livePixels=96 * 96)
        return renderers[key]

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
