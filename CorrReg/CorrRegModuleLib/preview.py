"""Showing a pose without registering (the initial-pose sliders), with the CT conversion and the
preview projector cached between calls and dropped when the scene closes."""

from __future__ import annotations

from . import adapter
from .ctlabel import ctLabelMask
from .rendering import DRRRenderer


class PreviewMixin:
    """The preview and its caches; part of ``CorrRegLogicCore``."""

    def cachedVolume(self, ctNode, ctLabel=None, ctLabelValues=None):
        """``volumeFromNode(ctNode)`` (only what ``ctLabel`` keeps, see ``start``), reused while
        the nodes' voxels and geometry are unchanged."""
        key = self._volumeKey(ctNode, ctLabel, ctLabelValues)
        cached = self._previewCache.get("volume")
        if cached is None or cached[0] != key:
            adapter.checkCTNode(ctNode)
            volume = adapter.volumeFromNode(ctNode)
            if ctLabel is not None:
                import torch

                volume = volume.keep_only(torch.from_numpy(ctLabelMask(ctNode, ctLabel, ctLabelValues)))
            cached = (key, volume)
            self._previewCache["volume"] = cached
        return cached[1]

    @staticmethod
    def _volumeKey(ctNode, ctLabel=None, ctLabelValues=None):
        image = ctNode.GetImageData()
        label = None if ctLabel is None else (ctLabel.GetID(), ctLabel.GetMTime(),
                                              None if ctLabelValues is None else tuple(ctLabelValues))
        return (ctNode.GetID(), None if image is None else image.GetMTime(),
                tuple(adapter.ijkToRASArray(ctNode).flatten().tolist()), label)

    def preview(self, ctNode, xrayNode, outputTransformNode, pose, camera, drrNode=None,
                sliceCompositeNode=None, sliceNode=None, showInSliceView=True, opacity=0.5, device="cpu",
                calibration=None, otherViews=(), ctLabel=None, ctLabelValues=None):
        """Show ``pose`` without registering: place the X-ray, write the transform, render a
        quick DRR. Validates like ``start``; returns the nodes dict. With ``otherViews``
        (biplane, as ``start`` takes them, with the first X-ray's ``calibration``) each other
        X-ray is placed by the calibrations and gets its DRR too, so a start can be judged in
        every view; ``ctLabel`` shows only the bone it keeps (as ``start``)."""
        self.requireDependencies()
        self._checkInputs(ctNode, xrayNode)
        others = []
        if otherViews:
            _, _, checked = self._checkOtherViews(ctNode, xrayNode, otherViews, "intensity", None, calibration, None,
                                                  None, tuple(camera.pixel_spacing))
            others = [(v.xrayNode, c.camera, fromReference) for v, c, fromReference in checked]
        self._checkOutputTransform(outputTransformNode, ctNode, xrayNode, drrNode, [x for x, _, _ in others])
        label = (ctLabel, ctLabelValues)
        renderer = self._previewRenderer(ctNode, camera, device, label)
        nodes = self._setUpScene(ctNode, xrayNode, outputTransformNode, camera, drrNode, True,
                                 sliceCompositeNode, sliceNode, showInSliceView, opacity, otherViews=others)
        adapter.setTransformNodeFromPose(nodes["outputTransform"], pose)
        self._alignSliceView(nodes)
        pose = adapter._toNumpyPose(pose)
        self.showDRRImage(nodes["drr"], renderer.render(pose))
        for (_, cam, cameraFromReference), drr in zip(others, nodes.get("otherDRRs", ())):
            self.showDRRImage(drr, self._previewRenderer(ctNode, cam, device, label).render(cameraFromReference @ pose))
        return nodes

    def _previewRenderer(self, ctNode, camera, device, label=(None, None)):
        """A quick DRR renderer of the CT (what ``label`` = (ctLabel, values) keeps) for ``camera``,
        cached per camera while the CT is unchanged."""
        key = (self._volumeKey(ctNode, *label), tuple(camera.size), camera.sdd, tuple(camera.pixel_spacing),
               tuple(camera.principal_point), camera.focal_px, str(device))
        renderers = self._previewCache.setdefault("renderers", {})
        if key not in renderers:
            volume = self.cachedVolume(ctNode, *label)
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
