"""The CorrReg registration logic on an MRML scene, without Qt.

``CorrRegLogicCore`` is the whole Logic of the Slicer module (``CorrReg.CorrRegLogic`` adds only
Slicer's parameter-node plumbing on top of it). It drives a ``CorrRegLib.register.
RegistrationSession`` on MRML nodes:

* ``register(...)`` runs a registration to the end (scripts, the self-test, batch use);
* ``start(...)`` / ``step(n)`` / ``cancel()`` / ``finish()`` is the same run advanced a few
  iterations at a time, which is what the module's GUI does from a ``qt.QTimer``;
* ``preview(...)`` shows a pose (output transform + DRR) without registering, for the initial-pose
  sliders.

Every input is validated before anything in the scene changes: a wrong input raises
``ValueError`` and leaves the scene as it was. The CT node and the X-ray's pixels are never
modified; the X-ray node is *placed* (its geometry set to the detector plane in the camera frame
and its parent set to the output transform), see ``adapter.placeXrayNode``.

torch and CorrRegLib are imported inside the methods, so this file imports in Slicer before
PyTorch is installed.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import slicer
from slicer.util import arrayFromVolume, arrayFromVTKMatrix, updateVolumeFromArray, vtkMatrixFromArray

from . import adapter

#: Registration methods, as RegistrationSession names them (GUI order).
METHODS = ("hybrid", "network", "intensity", "cmaes")
METHOD_LABELS = {
    "hybrid": "Hybrid (network + intensity refinement)",
    "network": "Network (learned correlation similarity)",
    "intensity": "Intensity (coarse-to-fine gradient)",
    "cmaes": "CMA-ES (global search + refinement)",
}
#: How the starting pose is chosen.
INITIAL_POSE_MODES = ("ap", "carm", "transform")
#: sod / sdd of the paper's C-arm (700 / 1011.7 mm), used when the source-to-isocenter distance
#: is not known.
DEFAULT_SOD_FRACTION = 700.0 / 1011.7
#: Python packages CorrRegLib needs besides what Slicer bundles (numpy, SimpleITK).
REQUIRED_PACKAGES = ("torch", "roma", "cma", "safetensors", "tqdm")
PIP_REQUIREMENTS = {"roma": "roma>=1.4", "cma": "cma>=3.3", "safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}

DRR_XRAY_ID_ATTRIBUTE = "CorrReg.XrayNodeID"
#: The module's requirements file (the same list as PIP_REQUIREMENTS).
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt")


def _nodesOfClass(scene, className):
    n = scene.GetNumberOfNodesByClass(className)
    return [scene.GetNthNodeByClass(i, className) for i in range(n)]


@dataclass
class RunOptions:
    """What ``start`` resolved, kept on the run for display and for the result line."""

    method: str
    device: str
    camera: object
    initialPose: object  # torch (4, 4) float64
    iterationsPerStep: int = 2
    drrUpdateInterval: float = 0.5


@dataclass
class StepInfo:
    """What one ``step`` did (a StepState plus display bookkeeping)."""

    pose: object
    loss: float
    stage: str
    iteration: int
    done: bool
    progress: float
    transformUpdates: int = 0
    drrUpdates: int = 0


class DRRRenderer:
    """DRRs of one CT for one camera: a fast low-resolution projector for live display and the
    full-resolution one for the final image. Always returns the camera's full (H, W)."""

    def __init__(self, volume, camera, device="cpu", livePixels: int = 128 * 128, maxVoxels: int = 8_000_000):
        from CorrRegLib.projector import Projector

        self.camera = camera
        self.device = device
        vol = volume
        while vol.data.numel() > maxVoxels and min(vol.data.shape) > 8:
            vol = vol.downsample(2)
        self._volume = vol
        factor = max(1.0, math.sqrt(camera.width * camera.height / float(livePixels)))
        self._live = Projector(vol, camera.downsample(factor) if factor > 1 else camera).to(device)
        self._full = self._live if factor <= 1 else None

    def render(self, pose, full: bool = False) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from CorrRegLib.projector import Projector

        proj = self._live
        if full:
            if self._full is None:
                self._full = Projector(self._volume, self.camera).to(self.device)
            proj = self._full
        with torch.no_grad():
            img = proj(torch.as_tensor(pose, dtype=torch.float64).to(self.device).float())
            size = (self.camera.height, self.camera.width)
            if tuple(img.shape[-2:]) != size:
                img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        return img[0].detach().cpu().numpy().astype(np.float32)


class RegistrationRun:
    """One registration on MRML nodes, advanced by ``step``; made by ``CorrRegLogicCore.start``."""

    def __init__(self, logic, session, nodes: dict, options: RunOptions, renderer: DRRRenderer,
                 progressCallback=None):
        self.logic = logic
        self.session = session
        self.nodes = nodes
        self.options = options
        self.renderer = renderer
        self.progressCallback = progressCallback
        self.transformUpdates = 0
        self.drrUpdates = 0
        self.lastState = None
        self.result = None
        self.error = None
        self._lastPose = None
        self._lastDRRTime = -math.inf
        self._lastDRRPose = None
        self._cancelRequested = False
        self.startTime = time.perf_counter()

    # -- state -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """No more steps to take: finished, failed, converged or cancelled (then call finish)."""
        return self.result is not None or self.error is not None or self.session.done or self._cancelRequested

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def outputTransformNode(self):
        return self.nodes["outputTransform"]

    @property
    def drrNode(self):
        return self.nodes.get("drr")

    # -- driving -------------------------------------------------------------------------------
    def step(self, n: int | None = None) -> StepInfo:
        """Advance up to ``n`` iterations, then show the best pose so far (transform every call,
        DRR at most every ``drrUpdateInterval`` seconds)."""
        if self.finished:
            raise RuntimeError("this registration has already finished")
        if self._cancelRequested:
            raise RuntimeError("this registration was cancelled; call finish()")
        n = self.options.iterationsPerStep if n is None else n
        try:
            st = self.session.step(max(1, int(n)))
        except Exception as e:
            self.error = e
            self._showPose(self._lastPose if self._lastPose is not None else self.options.initialPose, final=True)
            raise
        self.lastState = st
        self._showPose(st.pose, final=False)
        info = StepInfo(st.pose, st.loss, st.stage, st.iteration, st.done, st.progress,
                        self.transformUpdates, self.drrUpdates)
        if self.progressCallback is not None:
            if self.progressCallback(info) is False:
                self.cancel()
        return info

    def cancel(self) -> None:
        """Stop; ``finish`` then keeps the best pose found so far."""
        self._cancelRequested = True
        self.session.cancel()

    def finish(self):
        """End the run (cancelling it if still going) and leave the scene at the best pose.

        Returns the ``RegistrationResult``."""
        if self.result is not None:
            return self.result
        if not self.session.done:
            self.session.cancel()
            self.session.step(1)  # a cancelled session finishes without computing
        result = self.session.result()
        self._showPose(result.pose, final=True)
        self.result = result
        self.wallTime = time.perf_counter() - self.startTime
        return result

    def summary(self) -> str:
        r = self.result
        if r is None:
            st = self.lastState
            return "" if st is None else f"{st.stage}: iteration {st.iteration}, loss {st.loss:.4f}"
        word = "Cancelled" if getattr(r, "cancelled", False) else "Done"
        text = (f"{word} ({self.options.method}): stage {r.stage}, {r.iterations} iterations in "
                f"{r.runtime_s:.1f} s, final loss {r.loss:.4f}")
        if r.flagged:
            text += f". Check the result: {r.message}"
        return text

    # -- display -------------------------------------------------------------------------------
    def _showPose(self, pose, final: bool) -> None:
        pose_np = adapter._toNumpyPose(pose)
        if self._lastPose is None or not np.array_equal(pose_np, self._lastPose):
            adapter.setTransformNodeFromPose(self.outputTransformNode, pose_np)
            self.transformUpdates += 1
            self._lastPose = pose_np
            self.logic._alignSliceView(self.nodes)
        now = time.perf_counter()
        drr = self.nodes.get("drr")
        if drr is None:
            return
        due = now - self._lastDRRTime >= self.options.drrUpdateInterval
        changed = self._lastDRRPose is None or not np.array_equal(pose_np, self._lastDRRPose)
        if final or (due and changed):
            self.logic._updateDRR(drr, self.renderer, pose_np, full=final)
            self.drrUpdates += 1
            self._lastDRRTime = time.perf_counter()
            self._lastDRRPose = pose_np


class CorrRegLogicCore:
    """Registration of an X-ray node to a CT node in an MRML scene (see the module docstring).

    ``scene``: the vtkMRMLScene to work in; default ``slicer.mrmlScene`` (inside Slicer).
    """

    def __init__(self, scene=None):
        self._scene = scene
        self.currentRun: RegistrationRun | None = None
        self._previewCache = {}

    # ---- scene ---------------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise ValueError("no MRML scene: pass scene= to the logic (outside Slicer there is no slicer.mrmlScene)")
        return scene

    @scene.setter
    def scene(self, scene):
        self._scene = scene

    # ---- dependencies ----------------------------------------------------------------------------
    @staticmethod
    def missingDependencies() -> list[str]:
        """Required Python packages that cannot be imported here."""
        missing = []
        for name in REQUIRED_PACKAGES:
            try:
                importlib.import_module(name)
            except Exception:  # ImportError, or a broken/partial installation
                missing.append(name)
        return missing

    def requireDependencies(self) -> None:
        """Raise ValueError naming the missing packages and how to get them."""
        missing = self.missingDependencies()
        if not missing:
            return
        how = []
        if "torch" in missing:
            how.append("PyTorch: install the 'PyTorch' extension from the Extensions Manager and let it install "
                       "torch (or run CorrRegLogic().installDependencies())")
        others = [m for m in missing if m != "torch"]
        if others:
            how.append("the others with the module's Register button (it offers to install them) or "
                       f"slicer.util.pip_install('{' '.join(PIP_REQUIREMENTS.get(m, m) for m in others)}')")
        raise ValueError(f"CorrReg needs the Python package(s) {', '.join(missing)}, which are not installed; "
                         + "; ".join(how))

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing (inside Slicer): torch through the PyTorch extension's
        PyTorchUtils logic, the rest with ``slicer.packaging.pip_ensure`` (or pip_install after
        asking). Returns True when everything is importable afterwards."""
        missing = self.missingDependencies()
        if not missing:
            return True
        if "torch" in missing:
            try:
                import PyTorchUtils  # the PyTorch extension's module
            except ImportError:
                raise ValueError("CorrReg needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                 "Manager, restart Slicer and try again") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=askConfirmation) is None:
                return False
        others = [PIP_REQUIREMENTS[m] for m in self.missingDependencies() if m in PIP_REQUIREMENTS]
        if others:
            try:
                import slicer.packaging as packaging
                ensure = packaging.pip_ensure
            except (ImportError, AttributeError):
                packaging = ensure = None
            if ensure is not None:
                requirements = others
                if os.path.exists(REQUIREMENTS_FILE) and hasattr(packaging, "load_requirements"):
                    requirements = packaging.load_requirements(REQUIREMENTS_FILE)
                try:
                    ensure(requirements, prompt_install=askConfirmation, requester="CorrReg")
                except RuntimeError as e:  # the user declined
                    logging.info(f"CorrReg: dependencies not installed ({e})")
                    return False
            else:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        "CorrReg needs these Python packages: " + ", ".join(others) + ". Install them now?",
                        "CorrReg dependencies"):
                    return False
                slicer.util.pip_install(others)
        importlib.invalidate_caches()
        return not self.missingDependencies()

    # ---- camera geometry -----------------------------------------------------------------------
    def cameraGeometryFromNode(self, xrayNode) -> dict:
        """What the scene and the X-ray's file say about its geometry.

        Keys (each only when known): ``sdd``, ``pixelSpacing`` (dx, dy), ``principalPoint``
        (cx, cy), ``sod``, ``primaryAngle``, ``secondaryAngle``, and ``sources`` (where each came
        from). Lowest precedence first: the node's spacing, then the X-ray's file (DICOM tags,
        a side-car ``<stem>.camera.json``, a camera stored in an NRRD header; read with
        ``CorrRegLib.io.read_xray``), then the node's ``CorrReg.Geometry`` attribute.
        """
        geo: dict = {"sources": {}}
        if xrayNode is None:
            return geo
        sx, sy, _ = xrayNode.GetSpacing()
        geo["pixelSpacing"] = (float(sx), float(sy))
        geo["sources"]["pixelSpacing"] = "volume spacing"
        path = self._xrayFilePath(xrayNode)
        if path:
            try:
                from CorrRegLib import io as crio

                xr = crio.read_xray(path, require_camera=False)
                md = xr.metadata
                src = md.get("geometry_sources", {})
                if "sdd" in src:
                    geo["sdd"] = None if xr.camera is None else xr.camera.sdd
                if xr.camera is not None:
                    geo["sdd"] = xr.camera.sdd
                    geo["pixelSpacing"] = tuple(xr.camera.pixel_spacing)
                    if "principal_point" in src:
                        geo["principalPoint"] = tuple(xr.camera.principal_point)
                for key, name in (("sod_mm", "sod"), ("primary_angle_deg", "primaryAngle"),
                                  ("secondary_angle_deg", "secondaryAngle")):
                    if key in md:
                        geo[name] = float(md[key])
                for k, v in src.items():
                    geo["sources"][{"sdd": "sdd", "pixel_spacing": "pixelSpacing",
                                    "principal_point": "principalPoint"}.get(k, k)] = v
                if geo.get("sdd") is None:
                    geo.pop("sdd", None)
            except Exception as e:  # the file is optional information; never fail on it
                logging.info(f"CorrReg: no geometry read from {path}: {e}")
        d = adapter.geometryFromNodeAttribute(xrayNode)
        for key, name in (("sdd_mm", "sdd"), ("pixel_spacing_mm", "pixelSpacing"),
                          ("principal_point_px", "principalPoint"), ("sod_mm", "sod"),
                          ("primary_angle_deg", "primaryAngle"), ("secondary_angle_deg", "secondaryAngle")):
            if d.get(key) is not None:
                v = d[key]
                geo[name] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
                geo["sources"][name] = f"node attribute {adapter.GEOMETRY_ATTRIBUTE}"
        return geo

    @staticmethod
    def _xrayFilePath(xrayNode):
        """The file the X-ray was loaded from: its DICOM instance, else its storage node's file."""
        uids = xrayNode.GetAttribute("DICOM.instanceUIDs")
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            try:
                path = db.fileForInstance(uids.split()[0])
                if path and os.path.exists(path):
                    return path
            except Exception:
                pass
        storage = xrayNode.GetStorageNode() if hasattr(xrayNode, "GetStorageNode") else None
        if storage is not None:
            path = storage.GetFileName()
            if path and os.path.exists(path):
                return path
        return None

    def cameraForNode(self, xrayNode, camera=None, sdd=None, pixelSpacing=None, principalPoint=None):
        """The ``Camera`` of the X-ray: explicit values > ``camera`` > what the node/file say.

        ``camera`` may be a CorrRegLib Camera or a camera JSON dict. Raises ValueError when the
        source-to-detector distance is not known or the geometry does not fit the image.
        """
        from CorrRegLib.geometry import Camera

        w, h = adapter.checkXrayNode(xrayNode)
        if isinstance(camera, dict):
            camera = Camera.from_dict(camera)
        geo = self.cameraGeometryFromNode(xrayNode) if camera is None else {}
        if camera is not None:
            geo.update(sdd=camera.sdd, pixelSpacing=camera.pixel_spacing, principalPoint=camera.principal_point)
            if tuple(camera.size) != (w, h):
                raise ValueError(f"the camera describes a {camera.size[0]} x {camera.size[1]} detector but the X-ray "
                                 f"'{xrayNode.GetName()}' is {w} x {h} pixels")
        if adapter.isFinitePositive(sdd):
            geo["sdd"] = float(sdd)
        if pixelSpacing is not None and all(adapter.isFinitePositive(v) for v in pixelSpacing):
            geo["pixelSpacing"] = tuple(float(v) for v in pixelSpacing)
        if principalPoint is not None and all(v is not None and math.isfinite(float(v)) and float(v) >= 0
                                              for v in principalPoint):
            geo["principalPoint"] = tuple(float(v) for v in principalPoint)
        if not adapter.isFinitePositive(geo.get("sdd")):
            raise ValueError(
                f"the camera geometry of the X-ray '{xrayNode.GetName()}' is missing: the source-to-detector "
                "distance (sdd, mm) is not known. Enter it in the 'Camera geometry' section, pass camera= or "
                "sdd= to the logic, or load the X-ray from DICOM with DistanceSourceToDetector (0018,1110) or with "
                "a <name>.camera.json beside the image")
        try:
            return Camera(sdd=geo["sdd"], pixel_spacing=tuple(geo["pixelSpacing"]), size=(w, h),
                          principal_point=geo.get("principalPoint"))
        except ValueError as e:
            raise ValueError(f"invalid camera geometry for the X-ray '{xrayNode.GetName()}': {e}") from None

    # ---- poses -----------------------------------------------------------------------------------
    @staticmethod
    def isocenterOf(volume):
        """LPS point the reference view looks at: the bone centroid (ValueError if no bone)."""
        return volume.bone_center_lps()

    def initialPose(self, volume, camera, mode: str = "ap", initialTransformNode=None, sod=None,
                    primaryAngle=0.0, secondaryAngle=0.0, rotationOffsetDeg=(0.0, 0.0, 0.0),
                    translationOffsetMm=(0.0, 0.0, 0.0), isocenter=None, basePose=None):
        """camera_from_ct (torch float64 4x4) to start from.

        Base pose: ``basePose`` if given; else ``mode`` "ap" (reference AP view of DESIGN.md),
        "carm" (C-arm angles, DICOM PositionerPrimary/SecondaryAngle) or "transform" (read from
        ``initialTransformNode``). The offsets are then applied in the camera frame: a rotation
        (extrinsic x, y, z Euler angles in degrees) about the isocenter and a translation in mm
        (x = image right, y = image down, z = towards the detector).
        """
        import torch
        from CorrRegLib.geometry import c_arm_pose, euler_to_rotation, rotation_about_point, transform_points

        iso = self.isocenterOf(volume) if isocenter is None else torch.as_tensor(isocenter, dtype=torch.float64)
        if basePose is not None:
            base = torch.as_tensor(adapter._toNumpyPose(basePose))
        elif mode == "transform" or (mode is None and initialTransformNode is not None):
            if initialTransformNode is None:
                raise ValueError("initial pose from a transform was asked for but no initial transform node is selected")
            base = adapter.poseFromTransformNode(initialTransformNode)
        elif mode in ("ap", "carm", None):
            sod = float(sod) if adapter.isFinitePositive(sod) else DEFAULT_SOD_FRACTION * camera.sdd
            if sod >= camera.sdd:
                raise ValueError(f"the source-to-isocenter distance ({sod:g} mm) must be shorter than the "
                                 f"source-to-detector distance ({camera.sdd:g} mm)")
            if mode == "carm":
                base = c_arm_pose(iso, sod, float(primaryAngle or 0.0), float(secondaryAngle or 0.0))
            else:
                base = c_arm_pose(iso, sod, 0.0, 0.0)
        else:
            raise ValueError(f"unknown initial pose mode {mode!r}; choose one of {', '.join(INITIAL_POSE_MODES)}")
        rot = euler_to_rotation(torch.tensor([float(v) for v in rotationOffsetDeg], dtype=torch.float64))
        iso_cam = transform_points(base, iso.reshape(1, 3))[0]
        delta = rotation_about_point(rot, iso_cam, torch.tensor([float(v) for v in translationOffsetMm], dtype=torch.float64))
        return delta @ base

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

    # ---- validation ------------------------------------------------------------------------------
    def _checkOutputTransform(self, outputTransformNode, ctNode, xrayNode, drrNode):
        if outputTransformNode is None:
            return
        if not outputTransformNode.IsA("vtkMRMLLinearTransformNode"):
            raise ValueError(f"the output transform '{outputTransformNode.GetName()}' must be a linear transform node, "
                             f"got {outputTransformNode.GetClassName()}")
        parent = ctNode.GetParentTransformNode()
        while parent is not None:
            if parent is outputTransformNode or parent.GetID() == outputTransformNode.GetID():
                raise ValueError(
                    f"the output transform '{outputTransformNode.GetName()}' is already in use: it is a parent transform "
                    f"of the CT '{ctNode.GetName()}', so the result would move the CT itself. Choose or create another "
                    "transform node")
            parent = parent.GetParentTransformNode()
        allowed = {xrayNode.GetID()}
        if drrNode is not None:
            allowed.add(drrNode.GetID())
        for node in _nodesOfClass(self.scene, "vtkMRMLVolumeNode"):
            if node.GetID() in allowed or node.GetAttribute(adapter.ROLE_ATTRIBUTE):
                continue
            if adapter.parentTransformID(node) == outputTransformNode.GetID():
                raise ValueError(
                    f"the output transform '{outputTransformNode.GetName()}' is already in use: it positions the volume "
                    f"'{node.GetName()}'. Choose or create another transform node")

    def _checkInputs(self, ctNode, xrayNode):
        adapter.checkCTNode(ctNode)
        adapter.checkXrayNode(xrayNode)
        if ctNode.GetID() == xrayNode.GetID():
            raise ValueError("the CT and the X-ray are the same node")
        if ctNode.GetParentTransformNode() is not None and not ctNode.GetParentTransformNode().IsLinear():
            raise ValueError(f"the CT '{ctNode.GetName()}' is under a non-linear transform; harden it first")

    def _volumeWithBone(self, ctNode):
        volume = self.cachedVolume(ctNode)
        try:
            self.isocenterOf(volume)
        except ValueError:
            raise ValueError(
                f"the CT '{ctNode.GetName()}' contains no bone (no voxel denser than about 500 HU); CorrReg registers "
                "on bony anatomy. Check that the volume is a CT in Hounsfield units") from None
        return volume

    # ---- nodes the logic creates --------------------------------------------------------------
    def _findDRRNode(self, xrayNode):
        for node in _nodesOfClass(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(adapter.ROLE_ATTRIBUTE) == "DRR" and node.GetAttribute(DRR_XRAY_ID_ATTRIBUTE) == xrayNode.GetID():
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
            drrNode.SetAttribute(DRR_XRAY_ID_ATTRIBUTE, xrayNode.GetID())
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
    def _updateDRR(drrNode, renderer, pose, full=False):
        img = renderer.render(pose, full=full)
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
            for node in _nodesOfClass(scene, "vtkMRMLSliceNode"):
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
            key = (sliceNode.GetID(), xrayNode.GetID())
            self.alignSliceNodeToImage(sliceNode, xrayNode, fit=self._previewCache.get("fitted") != key)
            self._previewCache["fitted"] = key

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
            sliceNode.SetFieldOfView(w * sx * 1.05, h * sy * 1.05, sliceNode.GetFieldOfView()[2])
        sliceNode.UpdateMatrices()

    def _alignSliceView(self, nodes):
        sliceNode = nodes.get("slice")
        if sliceNode is not None and nodes.get("xray") is not None:
            self.alignSliceNodeToImage(sliceNode, nodes["xray"])

    # ---- the run -------------------------------------------------------------------------------
    def start(self, ctNode, xrayNode, outputTransformNode=None, method="hybrid", camera=None,
              initialTransformNode=None, initialPose=None, initialPoseMode=None,
              rotationOffsetDeg=(0.0, 0.0, 0.0), translationOffsetMm=(0.0, 0.0, 0.0),
              sod=None, primaryAngle=None, secondaryAngle=None, sdd=None, pixelSpacing=None,
              principalPoint=None, device="auto", modelPath=None, drrNode=None, createDRR=True,
              sliceCompositeNode=None, sliceNode=None, showInSliceView=True, opacity=0.5,
              invertXray=False, iterationsPerStep=2, drrUpdateInterval=0.5, progressCallback=None,
              options=None) -> RegistrationRun:
        """Validate everything, then set up the scene and a RegistrationSession; returns the run.

        ``initialPose`` (camera_from_ct, 4x4) wins over ``initialTransformNode``, which wins over
        ``initialPoseMode`` ("ap" default, "carm" with ``primaryAngle``/``secondaryAngle``).
        Nothing in the scene changes if this raises.
        """
        if self.currentRun is not None and not self.currentRun.finished:
            raise ValueError("a registration is already running; cancel or finish it first")
        method = str(method).lower().replace("-", "")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        # 1. everything that can fail, with the scene untouched
        self.requireDependencies()
        self._checkInputs(ctNode, xrayNode)
        cam = self.cameraForNode(xrayNode, camera, sdd, pixelSpacing, principalPoint)
        if initialTransformNode is not None:
            if not initialTransformNode.IsA("vtkMRMLTransformNode") or not initialTransformNode.IsLinear():
                raise ValueError(f"the initial transform '{initialTransformNode.GetName()}' must be a linear transform")
            adapter.poseArrayFromTransformNode(initialTransformNode)  # rigid check
        self._checkOutputTransform(outputTransformNode, ctNode, xrayNode, drrNode)
        volume = self._volumeWithBone(ctNode)
        geo = self.cameraGeometryFromNode(xrayNode)
        if sod is None:
            sod = geo.get("sod")
        if primaryAngle is None:
            primaryAngle = geo.get("primaryAngle", 0.0)
        if secondaryAngle is None:
            secondaryAngle = geo.get("secondaryAngle", 0.0)
        mode = initialPoseMode
        if initialTransformNode is not None and mode is None:
            mode = "transform"
        pose0 = self.initialPose(volume, cam, mode or "ap", initialTransformNode, sod, primaryAngle, secondaryAngle,
                                 rotationOffsetDeg, translationOffsetMm,
                                 basePose=initialPose)
        xrayArray = adapter.xrayArrayFromNode(xrayNode)
        if invertXray:
            xrayArray = (xrayArray.max() + xrayArray.min()) - xrayArray
        import torch
        from CorrRegLib.device import pick_device
        from CorrRegLib.register import RegistrationSession

        dev = pick_device(device)
        modelDir = None
        if modelPath:
            modelPath = os.fspath(modelPath)
            if not os.path.exists(modelPath):
                raise ValueError(f"the model '{modelPath}' does not exist")
            modelDir = modelPath if os.path.isdir(modelPath) else os.path.dirname(modelPath)
        kwargs = {} if options is None else {"options": options}
        session = RegistrationSession(volume, torch.from_numpy(xrayArray), cam, pose0, method=method, device=dev,
                                      model_dir=modelDir, **kwargs)
        renderer = DRRRenderer(volume, cam, device=dev)

        # 2. the scene
        nodes = self._setUpScene(ctNode, xrayNode, outputTransformNode, cam, drrNode, createDRR,
                                 sliceCompositeNode, sliceNode, showInSliceView, opacity)
        run = RegistrationRun(self, session, nodes, RunOptions(method, str(dev), cam, pose0, int(iterationsPerStep),
                                                               float(drrUpdateInterval)), renderer, progressCallback)
        run._showPose(pose0, final=False)
        self.currentRun = run
        return run

    def _setUpScene(self, ctNode, xrayNode, outputTransformNode, camera, drrNode, createDRR,
                    sliceCompositeNode, sliceNode, showInSliceView, opacity):
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
        return nodes

    def step(self, n=None) -> StepInfo:
        """Advance the current run (see ``RegistrationRun.step``)."""
        if self.currentRun is None:
            raise RuntimeError("no registration is running; call start() first")
        return self.currentRun.step(n)

    def cancel(self) -> None:
        if self.currentRun is not None and not self.currentRun.finished:
            self.currentRun.cancel()

    def finish(self):
        """Finish the current run (cancelling it if needed); returns the RegistrationResult."""
        if self.currentRun is None:
            raise RuntimeError("no registration to finish")
        return self.currentRun.finish()

    def abandon(self) -> None:
        """Drop the current run without touching the scene (the scene is closing)."""
        run = self.currentRun
        if run is not None and not run.finished:
            run.session.cancel()
            run.error = RuntimeError("registration abandoned")
        self.currentRun = None

    @property
    def isRunning(self) -> bool:
        return self.currentRun is not None and not self.currentRun.finished

    def register(self, ctNode, xrayNode, outputTransformNode=None, method="hybrid", camera=None,
                 initialTransformNode=None, progressCallback=None, iterationsPerStep=5, **kwargs):
        """Register the X-ray to the CT and write the pose into ``outputTransformNode``.

        The same code path as the GUI (start / step / finish). ``progressCallback(info)`` is
        called after every step with a ``StepInfo``; returning False cancels (the best pose so
        far is kept). Returns the ``CorrRegLib.register.RegistrationResult``.
        """
        run = self.start(ctNode, xrayNode, outputTransformNode, method=method, camera=camera,
                         initialTransformNode=initialTransformNode, progressCallback=progressCallback,
                         iterationsPerStep=iterationsPerStep, **kwargs)
        try:
            while not run.done:
                run.step()
        except BaseException:
            if run.error is None:
                run.finish()  # leave the scene at the best pose found so far
            raise
        return run.finish()

    # ---- preview (initial pose sliders) ---------------------------------------------------------
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
            volume = self._volumeWithBone(ctNode)
            self._previewCache["renderer"] = (key, DRRRenderer(volume, camera, device=device, livePixels=96 * 96))
        renderer = self._previewCache["renderer"][1]
        nodes = self._setUpScene(ctNode, xrayNode, outputTransformNode, camera, drrNode, True,
                                 sliceCompositeNode, sliceNode, showInSliceView, opacity)
        adapter.setTransformNodeFromPose(nodes["outputTransform"], pose)
        self._alignSliceView(nodes)
        self._updateDRR(nodes["drr"], renderer, adapter._toNumpyPose(pose), full=False)
        return nodes
