"""CorrReg: register an intra-operative X-ray to a pre-operative CT in 3D Slicer.

The module follows Slicer's scripted-module template: ``CorrReg`` (metadata), a
``parameterNodeWrapper`` parameter node bound to ``Resources/UI/CorrReg.ui`` through the widgets'
``SlicerParameterName`` properties, ``CorrRegWidget`` (GUI), ``CorrRegLogic`` and ``CorrRegTest``.

The Logic's work lives in ``CorrRegModuleLib.logic.CorrRegLogicCore`` (no Qt), so that scripts,
the self-test, the GUI and plain pytest all drive the same code. torch and CorrRegLib are never
imported at file scope: the module loads before PyTorch is installed and offers to install it.
"""

import enum
import logging
import os
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CorrRegModuleLib import adapter
from CorrRegModuleLib.logic import METHOD_LABELS, CorrRegLogicCore

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4

    def _(text):
        return text

    def translate(context, text):
        return text


#
# CorrReg
#


class CorrReg(ScriptedLoadableModule):
    """Module metadata (see Slicer's ScriptedLoadableModule)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CorrReg X-ray to CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # torch comes from the PyTorch extension, checked at run time
        self.parent.contributors = ["CorrReg contributors"]
        self.parent.helpText = _("""
Registers an intra-operative X-ray (fluoroscopy) image to a pre-operative CT: finds the rigid pose
of the CT relative to the C-arm so that a simulated radiograph (DRR) of the CT matches the X-ray.
<ul>
<li>Pick the CT and the 2D X-ray, check the camera geometry (read from DICOM tags when present),</li>
<li>choose a starting pose (reference AP view, C-arm angles or a transform) and adjust it with the
sliders while watching the DRR overlay,</li>
<li>click Register. The output transform (matrix to parent = ct_from_camera in RAS) places the
C-arm's camera frame, the X-ray and the DRR around the CT; saved as an ITK file it is
camera_from_ct in LPS.</li>
</ul>
Methods: the correlation-driven network with intensity refinement (hybrid), the network alone,
coarse-to-fine intensity optimisation, or CMA-ES global search.
See <a href="https://github.com/CorrReg/SlicerCorrReg/blob/main/docs/slicer.md">the module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
CorrReg implements the method of: M. Chen, Z. Zhang, S. Gu, Y. Kong,
"Fully Differentiable Correlation-driven 2D/3D Registration for X-ray to CT Image Fusion",
IEEE International Symposium on Biomedical Imaging (ISBI) 2024, arXiv:2402.02498.
Its differentiable projector follows ProST: C. Gao, X. Liu, W. Gu, B. Killeen, M. Armand,
R. Taylor, M. Unberath, "Generalizing Spatial Transformers to Projective Geometry with
Applications to 2D/3D Registration", MICCAI 2020.
Built on the 3D Slicer scripted module template and the PyTorch extension.
""")


#
# Parameter node
#


class RegistrationMethod(enum.Enum):
    Hybrid = "hybrid"
    Network = "network"
    Intensity = "intensity"
    CMAES = "cmaes"

    def label(self):
        return METHOD_LABELS[self.value]


class InitialPoseMode(enum.Enum):
    ReferenceAP = "ap"
    CArmAngles = "carm"
    Transform = "transform"

    def label(self):
        return {
            "ap": _("Reference AP view"),
            "carm": _("C-arm angles"),
            "transform": _("Transform node"),
        }[self.value]


class ComputeDevice(enum.Enum):
    Auto = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("auto"), "cpu": _("CPU"), "cuda": _("CUDA GPU")}[self.value]


@parameterNodeWrapper
class CorrRegParameterNode:
    """Everything the GUI shows; saved with the scene."""

    ctVolume: vtkMRMLScalarVolumeNode
    xrayVolume: vtkMRMLScalarVolumeNode
    invertXray: bool = False
    # camera geometry (0 / -1: take it from the X-ray node, see CorrRegLogicCore.cameraForNode)
    sdd: Annotated[float, WithinRange(0.0, 5000.0)] = 0.0
    pixelSpacingX: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    pixelSpacingY: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    principalPointX: Annotated[float, WithinRange(-1.0, 100000.0)] = -1.0
    principalPointY: Annotated[float, WithinRange(-1.0, 100000.0)] = -1.0
    sod: Annotated[float, WithinRange(0.0, 5000.0)] = 0.0
    # initial pose
    initialPoseMode: InitialPoseMode = InitialPoseMode.ReferenceAP
    primaryAngle: Annotated[float, WithinRange(-180.0, 180.0)] = 0.0
    secondaryAngle: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    initialTransform: vtkMRMLLinearTransformNode
    rotationOffsetX: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    rotationOffsetY: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    rotationOffsetZ: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0
    translationOffsetX: Annotated[float, WithinRange(-150.0, 150.0)] = 0.0
    translationOffsetY: Annotated[float, WithinRange(-150.0, 150.0)] = 0.0
    translationOffsetZ: Annotated[float, WithinRange(-300.0, 300.0)] = 0.0
    # registration
    method: RegistrationMethod = RegistrationMethod.Hybrid
    modelPath: str = ""
    device: ComputeDevice = ComputeDevice.Auto
    iterationsPerTick: Annotated[int, WithinRange(1, 50)] = 2
    # output
    outputTransform: vtkMRMLLinearTransformNode
    drrVolume: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# CorrRegWidget
#


class CorrRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: binds the .ui to the parameter node and steps the registration from a QTimer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._previewTimer = None
        self._previewBase = None  # (key, base pose, isocenter) for the offset sliders
        self._updatingGeometry = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CorrReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CorrRegLogic()

        # Registration steps run from a timer so that the GUI never freezes.
        self._timer = qt.QTimer()
        self._timer.setInterval(1)
        self._timer.connect("timeout()", self.onTimerTick)
        # Slider drags are coalesced: the DRR is redrawn at most every 60 ms.
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(60)
        self._previewTimer.connect("timeout()", self.updatePreview)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.readGeometryButton.connect("clicked(bool)", self.onReadGeometry)
        self.ui.showInitialPoseButton.connect("clicked(bool)", self.onShowInitialPose)
        self.ui.resetOffsetsButton.connect("clicked(bool)", self.onResetOffsets)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.xraySelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onXrayChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        for slider in (self.ui.rotationXSlider, self.ui.rotationYSlider, self.ui.rotationZSlider,
                       self.ui.translationXSlider, self.ui.translationYSlider, self.ui.translationZSlider):
            slider.connect("valueChanged(double)", self.schedulePreview)
        for widget in (self.ui.initialPoseModeComboBox,):
            widget.connect("currentIndexChanged(int)", self.onBasePoseInputChanged)
        for widget in (self.ui.primaryAngleSpinBox, self.ui.secondaryAngleSpinBox, self.ui.sodSpinBox,
                       self.ui.sddSpinBox, self.ui.pixelSpacingXSpinBox, self.ui.pixelSpacingYSpinBox,
                       self.ui.principalPointXSpinBox, self.ui.principalPointYSpinBox):
            widget.connect("valueChanged(double)", self.onBasePoseInputChanged)
        for selector in (self.ui.ctSelector, self.ui.xraySelector, self.ui.initialTransformSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onBasePoseInputChanged)

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.abandon()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # A running registration keeps going (the timer is independent of the module panel).
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # The nodes are about to go: stop without writing into them.
        if self._timer is not None:
            self._timer.stop()
        self.logic.abandon()
        self._previewBase = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node ------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetImageData() is not None and min(node.GetImageData().GetDimensions()) > 1:
                    self._parameterNode.ctVolume = node
                    break

    def setParameterNode(self, inputParameterNode: Optional[CorrRegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self.logic is not None and self.logic.isRunning
        ready = bool(p and p.ctVolume and p.xrayVolume)
        self.ui.registerButton.text = _("Cancel") if running else _("Register")
        self.ui.registerButton.enabled = running or ready
        self.ui.registerButton.toolTip = (
            _("Stop now; the best pose found so far is kept.") if running
            else _("Register the X-ray to the CT.") if ready else _("Select a CT and an X-ray image."))
        self.ui.showInitialPoseButton.enabled = ready and not running
        for section in (self.ui.inputsCollapsibleButton, self.ui.cameraCollapsibleButton,
                        self.ui.initialPoseCollapsibleButton):
            section.enabled = not running
        self.ui.initialTransformSelector.enabled = bool(p and p.initialPoseMode == InitialPoseMode.Transform)
        carm = bool(p and p.initialPoseMode == InitialPoseMode.CArmAngles)
        self.ui.primaryAngleSpinBox.enabled = carm
        self.ui.secondaryAngleSpinBox.enabled = carm

    # ---- camera geometry -------------------------------------------------------------------------
    def onXrayChanged(self, node) -> None:
        if node is not None and not self._updatingGeometry:
            self.fillGeometryFields(node, quiet=True)

    def onReadGeometry(self) -> None:
        if self._parameterNode and self._parameterNode.xrayVolume:
            self.fillGeometryFields(self._parameterNode.xrayVolume, quiet=False)

    def fillGeometryFields(self, xrayNode, quiet=True) -> None:
        """Copy what the X-ray node / its DICOM tags / camera JSON say into the editable fields."""
        p = self._parameterNode
        if p is None:
            return
        try:
            geo = self.logic.cameraGeometryFromNode(xrayNode)
        except Exception as e:
            if not quiet:
                slicer.util.errorDisplay(_("Could not read the X-ray geometry: ") + str(e))
            return
        self._updatingGeometry = True
        try:
            with slicer.util.NodeModify(p.parameterNode):
                if geo.get("sdd"):
                    p.sdd = float(geo["sdd"])
                if geo.get("pixelSpacing"):
                    p.pixelSpacingX, p.pixelSpacingY = (float(v) for v in geo["pixelSpacing"])
                pp = geo.get("principalPoint")
                p.principalPointX, p.principalPointY = (float(pp[0]), float(pp[1])) if pp else (-1.0, -1.0)
                if geo.get("sod"):
                    p.sod = float(geo["sod"])
                if "primaryAngle" in geo or "secondaryAngle" in geo:
                    p.primaryAngle = float(geo.get("primaryAngle", 0.0))
                    p.secondaryAngle = float(geo.get("secondaryAngle", 0.0))
        finally:
            self._updatingGeometry = False
        sources = geo.get("sources", {})
        text = ", ".join(f"{k}: {v}" for k, v in sources.items()) if sources else _("nothing found")
        if not geo.get("sdd"):
            text = _("Source-to-detector distance unknown: enter it. ") + text
        self.ui.geometrySourceLabel.text = text

    def _cameraArguments(self) -> dict:
        p = self._parameterNode
        return dict(
            sdd=p.sdd if p.sdd > 0 else None,
            pixelSpacing=(p.pixelSpacingX, p.pixelSpacingY) if p.pixelSpacingX > 0 and p.pixelSpacingY > 0 else None,
            principalPoint=(p.principalPointX, p.principalPointY) if p.principalPointX >= 0 and p.principalPointY >= 0 else None,
        )

    # ---- initial pose and live preview ----------------------------------------------------------
    def onBasePoseInputChanged(self, *args) -> None:
        self._previewBase = None
        self._updateButtons()

    def onResetOffsets(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        with slicer.util.NodeModify(p.parameterNode):
            p.rotationOffsetX = p.rotationOffsetY = p.rotationOffsetZ = 0.0
            p.translationOffsetX = p.translationOffsetY = p.translationOffsetZ = 0.0
        self._previewBase = None
        self.schedulePreview()

    def schedulePreview(self, *args) -> None:
        if self.logic is not None and not self.logic.isRunning and self._previewTimer is not None:
            self._previewTimer.start()

    def onShowInitialPose(self) -> None:
        if not self._ensureDependencies():
            return
        self._previewBase = None
        self.updatePreview(showErrors=True)

    def _currentInitialPose(self):
        """(camera, initial camera_from_ct) from the GUI: cached base pose + slider offsets."""
        p = self._parameterNode
        ct, xray = p.ctVolume, p.xrayVolume
        camera = self.logic.cameraForNode(xray, **self._cameraArguments())
        mode = p.initialPoseMode.value
        key = (ct.GetID(), xray.GetID(), mode, p.initialTransform.GetID() if p.initialTransform else None,
               p.sod, p.primaryAngle, p.secondaryAngle, camera.sdd, tuple(camera.pixel_spacing),
               tuple(camera.principal_point))
        if self._previewBase is None or self._previewBase[0] != key:
            volume = self.logic.cachedVolume(ct)
            base = self.logic.initialPose(volume, camera, mode, p.initialTransform, p.sod if p.sod > 0 else None,
                                          p.primaryAngle, p.secondaryAngle)
            self._previewBase = (key, base, self.logic.isocenterOf(volume))
        _, base, iso = self._previewBase
        pose = self.logic.initialPose(
            None, camera, basePose=base, isocenter=iso,
            rotationOffsetDeg=(p.rotationOffsetX, p.rotationOffsetY, p.rotationOffsetZ),
            translationOffsetMm=(p.translationOffsetX, p.translationOffsetY, p.translationOffsetZ))
        return camera, pose

    def updatePreview(self, showErrors=False) -> None:
        p = self._parameterNode
        if p is None or not (p.ctVolume and p.xrayVolume) or self.logic.isRunning:
            return
        if self.logic.missingDependencies():
            return
        try:
            camera, pose = self._currentInitialPose()
            nodes = self.logic.preview(p.ctVolume, p.xrayVolume, p.outputTransform, pose, camera, drrNode=p.drrVolume,
                                       sliceCompositeNode=_redSliceCompositeNode(), sliceNode=_redSliceNode(),
                                       opacity=p.opacity)
        except Exception as e:
            self.ui.statusLabel.text = _("Initial pose: ") + str(e)
            if showErrors:
                slicer.util.errorDisplay(str(e))
            return
        self._adoptCreatedNodes(nodes)
        self.ui.statusLabel.text = _("Showing the initial pose")

    def _adoptCreatedNodes(self, nodes) -> None:
        p = self._parameterNode
        if p.outputTransform is None and nodes.get("outputTransform") is not None:
            p.outputTransform = nodes["outputTransform"]
        if p.drrVolume is None and nodes.get("drr") is not None:
            p.drrVolume = nodes["drr"]

    def onOpacityChanged(self, value) -> None:
        self.logic.setOverlayOpacity(value, _redSliceCompositeNode())

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder"))
        if path:
            self._parameterNode.modelPath = path

    # ---- registration ----------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Offer to install missing packages (PyTorchUtils and pip_ensure each ask first)."""
        if not self.logic.missingDependencies():
            return True
        with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
        missing = self.logic.missingDependencies()
        if missing:
            self.ui.statusLabel.text = _("Not installed: ") + ", ".join(missing)
        return not missing

    def onRegisterButton(self) -> None:
        if self.logic.isRunning:
            self._stopRun(cancel=True)
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            camera, pose = self._currentInitialPose()
            run = self.logic.start(
                p.ctVolume, p.xrayVolume, p.outputTransform, method=p.method.value, camera=camera, initialPose=pose,
                device=p.device.value, modelPath=p.modelPath or None, drrNode=p.drrVolume,
                sliceCompositeNode=_redSliceCompositeNode(), sliceNode=_redSliceNode(), opacity=p.opacity,
                invertXray=p.invertXray, iterationsPerStep=p.iterationsPerTick)
            self._adoptCreatedNodes(run.nodes)
            self.ui.progressBar.setValue(0)
            self.ui.resultLabel.text = ""
            self.ui.statusLabel.text = _("Starting ({method} on {device})").format(method=p.method.value, device=run.options.device)
            self._timer.start()
        self._updateButtons()

    def onTimerTick(self) -> None:
        if not self.logic.isRunning:
            self._timer.stop()
            return
        try:
            info = self.logic.step(self._parameterNode.iterationsPerTick if self._parameterNode else None)
        except Exception as e:
            self._timer.stop()
            logging.exception("CorrReg registration failed")
            slicer.util.errorDisplay(_("The registration failed: ") + str(e))
            self.ui.statusLabel.text = _("Failed: ") + str(e)
            self._updateButtons()
            return
        self.ui.progressBar.setValue(int(round(100 * info.progress)))
        self.ui.statusLabel.text = _("{stage}: iteration {it}, loss {loss:.4f}").format(
            stage=info.stage, it=info.iteration, loss=info.loss)
        if info.done:
            self._stopRun(cancel=False)

    def _stopRun(self, cancel: bool) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.logic is None or self.logic.currentRun is None or self.logic.currentRun.finished:
            return
        if cancel:
            self.logic.cancel()
        try:
            self.logic.finish()
            self.ui.resultLabel.text = self.logic.currentRun.summary()
            self.ui.progressBar.setValue(100)
        except Exception as e:
            slicer.util.errorDisplay(_("Could not finish the registration: ") + str(e))
        self._previewBase = None  # a transform-based start must re-read the new pose
        self._updateButtons()


def _redSliceCompositeNode():
    return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")


def _redSliceNode():
    return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")


#
# CorrRegLogic
#


class CorrRegLogic(ScriptedLoadableModuleLogic, CorrRegLogicCore):
    """Registration logic, usable without the GUI, e.g. from the Python console::

        logic = slicer.util.getModuleLogic("CorrReg")  # or CorrReg.CorrRegLogic()
        result = logic.register(ctNode, xrayNode, transformNode, method="intensity")

    Everything is implemented in ``CorrRegModuleLib.logic.CorrRegLogicCore``; this class adds the
    parameter node. ``scene`` defaults to ``slicer.mrmlScene``.
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        CorrRegLogicCore.__init__(self, scene)

    def getParameterNode(self):
        return CorrRegParameterNode(super().getParameterNode())


#
# CorrRegTest
#


class CorrRegTest(ScriptedLoadableModuleTest):
    """Self-test: a phantom CT and a simulated X-ray registered through the Logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CorrReg_adapterRoundTrip()
        self.test_CorrReg_registerPhantom()

    def _needsTorch(self):
        missing = CorrRegLogicCore.missingDependencies()
        if missing:
            self.delayDisplay("Skipping: CorrReg needs " + ", ".join(missing) + " (install the PyTorch extension)")
            self.skipTest("missing " + ", ".join(missing))

    def test_CorrReg_adapterRoundTrip(self):
        self.delayDisplay("Adapter round trip")
        self._needsTorch()
        from CorrRegModuleLib.selftest import checkAdapterRoundTrip

        checkAdapterRoundTrip(slicer.mrmlScene)
        self.delayDisplay("Adapter round trip passed")

    def test_CorrReg_registerPhantom(self):
        self.delayDisplay("Registering a phantom CT to a simulated X-ray")
        self._needsTorch()
        from CorrRegModuleLib.selftest import runSelfTest

        report = runSelfTest(CorrRegLogic(), slicer.mrmlScene, log=self.delayDisplay)
        self.assertLess(report["mTRE"], report["tolerance_mm"], report)
        self.assertLess(report["mTRE"], report["initial_mTRE"], report)
        self.delayDisplay(f"Test passed: mTRE {report['initial_mTRE']:.1f} mm -> {report['mTRE']:.2f} mm")
