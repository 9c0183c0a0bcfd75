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
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CorrRegModuleLib.logic import CorrRegLogicCore
from CorrRegModuleLib.panel import XrayGeometryFiller
from CorrRegModuleLib.xrayimage import OtherView

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
        self.parent.contributors = ["CorrReg Maintainers (CorrReg project)"]
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
Methods: Automatic (the default; works on any C-arm: the network pipeline when a model trained for
this C-arm is given, else a global search and refinement), coarse-to-fine intensity optimisation,
CMA-ES global search, the correlation-driven network alone, or the network with refinement (hybrid).
"Train a model for this CT" trains a patient-specific network in the background and then uses it.
See <a href="https://github.com/CorrReg/SlicerCorrReg/blob/main/docs/slicer.md">the module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
CorrReg implements the method of: M. Chen, Z. Zhang, S. Gu, Z. Ge, Y. Kong,
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
    Auto = "auto"
    Intensity = "intensity"
    CMAES = "cmaes"
    Network = "network"
    Hybrid = "hybrid"

    def label(self):
        return {
            "auto": _("Automatic (any C-arm; the network where a model for it is given)"),
            "intensity": _("Intensity (coarse-to-fine gradient)"),
            "cmaes": _("CMA-ES (global search + refinement)"),
            "network": _("Network (learned correlation similarity)"),
            "hybrid": _("Hybrid (network + intensity refinement)"),
        }[self.value]


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


class XrayPolarity(enum.Enum):
    Auto = "auto"
    Bright = "bright"
    Dark = "dark"

    def label(self):
        return {"auto": _("detected"), "bright": _("bright (a radiograph)"),
                "dark": _("dark (an intensifier's raw image): invert")}[self.value]


class FieldOfView(enum.Enum):
    Detect = "auto"
    WholeImage = "none"
    Mask = "mask"

    def label(self):
        return {"auto": _("detected"), "none": _("the whole image"), "mask": _("a mask:")}[self.value]


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
    # one bone of a full CT: its visible segments are registered (logic.start(ctLabel=...))
    ctSegmentation: vtkMRMLSegmentationNode
    xrayVolume: vtkMRMLScalarVolumeNode
    # the X-ray as it comes (CorrRegModuleLib/xrayimage.py): polarity and the pixels compared
    xrayPolarity: XrayPolarity = XrayPolarity.Auto
    fieldOfView: FieldOfView = FieldOfView.Detect
    fieldOfViewMask: vtkMRMLLabelMapVolumeNode
    # biplane: a second calibrated X-ray of the same moment (both views registered to one pose)
    secondXrayVolume: vtkMRMLScalarVolumeNode
    secondCalibrationPath: str = ""
    # camera geometry (0 / -1: take it from the X-ray node, see CorrRegLogicCore.cameraForNode)
    sdd: Annotated[float, WithinRange(0.0, 5000.0)] = 0.0
    pixelSpacingX: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    pixelSpacingY: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    principalPointX: Annotated[float, WithinRange(-1.0, 100000.0)] = -1.0
    principalPointY: Annotated[float, WithinRange(-1.0, 100000.0)] = -1.0
    sod: Annotated[float, WithinRange(0.0, 5000.0)] = 0.0
    # a calibration file (MayaCam 2.0, OpenCV, CorrReg JSON): the camera, instead of sdd / principal point
    calibrationPath: str = ""
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
    method: RegistrationMethod = RegistrationMethod.Auto
    # Intensity only: more starts around the user's, and a flag when most end elsewhere
    localStarts: Annotated[int, WithinRange(0, 64)] = 0
    # a CT that holds only bone: L-BFGS on band-pass NCC after the refinement (off: biased by the
    # bones the CT does not hold, docs/registration.md "Polish")
    polishBone: bool = False
    modelPath: str = ""
    device: ComputeDevice = ComputeDevice.Auto
    trainingSteps: Annotated[int, WithinRange(10, 100000)] = 600
    # output
    outputTransform: vtkMRMLLinearTransformNode
    drrVolume: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# CorrRegWidget
#


class CorrRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: binds the .ui to the parameter node; the registration runs in a worker thread and a
    short QTimer brings the scene up to date (``CorrRegModuleLib.run.RegistrationRun.poll``)."""

    #: How often the main thread applies what the worker sent (ms); each poll takes milliseconds.
    POLL_INTERVAL_MS = 50

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._trainingTimer = None
        self._previewTimer = None
        self._previewBase = None  # (key, base pose, isocenter) for the offset sliders
        self._geometryFiller = None
        self._adoptedRun = None
        self._uiWidget = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self._uiWidget = slicer.util.loadUI(self.resourcePath("UI/CorrReg.ui"))
        self.layout.addWidget(self._uiWidget)
        self.ui = slicer.util.childWidgetVariables(self._uiWidget)
        self._uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CorrRegLogic()
        self._geometryFiller = XrayGeometryFiller(self.logic)

        # The worker thread computes; this timer writes its results into the scene.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(250)
        self._trainingTimer.connect("timeout()", self.onTrainingTimer)
        # Slider drags are coalesced: the DRR is redrawn at most every 60 ms.
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(60)
        self._previewTimer.connect("timeout()", self.updatePreview)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.readGeometryButton.connect("clicked(bool)", self.onReadGeometry)
        self.ui.showInitialPoseButton.connect("clicked(bool)", self.onShowInitialPose)
        self.ui.resetOffsetsButton.connect("clicked(bool)", self.onResetOffsets)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.calibrationBrowseButton.connect("clicked(bool)", lambda: self.onBrowseCalibration(second=False))
        self.ui.secondCalibrationBrowseButton.connect("clicked(bool)", lambda: self.onBrowseCalibration(second=True))
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        for slider in (self.ui.rotationXSlider, self.ui.rotationYSlider, self.ui.rotationZSlider,
                       self.ui.translationXSlider, self.ui.translationYSlider, self.ui.translationZSlider):
            slider.connect("valueChanged(double)", self.schedulePreview)
        # Everything else reacts to the parameter node (onParameterNodeModified), after the
        # parameterNodeWrapper stored the widget's new value: see CorrRegModuleLib/panel.py.

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.ui.trainingProgressBar.setRange(0, 100)
        self.ui.trainingProgressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for timer in (self._pollTimer, self._trainingTimer, self._previewTimer):
            if timer is not None:
                timer.stop()
        if self.logic is not None:
            self.logic.abandon()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # A running registration keeps going (the worker and the poll timer do not need the panel).
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        # The logic stops the run and frees its memory itself (it observes the scene too).
        for timer in (self._pollTimer, self._trainingTimer, self._previewTimer):
            if timer is not None:
                timer.stop()
        self.logic.abandon()
        self._previewBase = None
        self._adoptedRun = None
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

    def _connectGui(self, p):
        """Bind the .ui's widgets (their SlicerParameterName property) to ``p``; returns the tag.

        ``connectParametersToGui`` returns its tag on every supported Slicer; ``connectGui`` does
        not on 5.8, where ``disconnectGui(None)`` would then leave the connections in place and
        every ``enter()`` would add another set."""
        mapping = {}
        for widget in self._uiWidget.findChildren(qt.QWidget):
            name = widget.property("SlicerParameterName")
            if name:
                mapping[name] = widget
        return p.connectParametersToGui(mapping)

    def setParameterNode(self, inputParameterNode: Optional[CorrRegParameterNode]) -> None:
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._connectGui(self._parameterNode)
            self._geometryFiller.adopt(self._parameterNode)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._updateButtons()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        geo = self._geometryFiller.onParameterNodeModified(p)
        if geo is not None:
            self._showGeometrySources(geo)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        run = self.logic.currentRun if self.logic is not None else None
        running = run is not None and not run.stopped
        cancelling = running and run.done
        training = self.logic is not None and self.logic.currentTraining is not None \
            and not self.logic.currentTraining.finished
        ready = bool(p and p.ctVolume and p.xrayVolume)
        self.ui.registerButton.text = (_("Cancelling...") if cancelling else _("Cancel") if running
                                       else _("Register"))
        self.ui.registerButton.enabled = (running and not cancelling) or (ready and not training)
        self.ui.registerButton.toolTip = (
            _("Stop now; the best pose found so far is kept.") if running
            else _("Register the X-ray to the CT.") if ready else _("Select a CT and an X-ray image."))
        self.ui.showInitialPoseButton.enabled = ready and not running
        for section in (self.ui.inputsCollapsibleButton, self.ui.cameraCollapsibleButton,
                        self.ui.initialPoseCollapsibleButton):
            section.enabled = not running and not training
        # mid-run, what the run uses stays as it started
        for widget in (self.ui.methodComboBox, self.ui.modelPathLineEdit, self.ui.modelBrowseButton,
                       self.ui.deviceComboBox, self.ui.outputTransformSelector, self.ui.drrSelector,
                       self.ui.trainingStepsSpinBox, self.ui.polishCheckBox):
            widget.enabled = not running and not training
        self.ui.trainButton.text = _("Cancel training") if training else _("Train a model for this CT")
        self.ui.trainButton.enabled = training or (ready and not running)
        self.ui.localStartsSpinBox.enabled = bool(p and p.method == RegistrationMethod.Intensity) \
            and not running and not training
        self.ui.initialTransformSelector.enabled = bool(p and p.initialPoseMode == InitialPoseMode.Transform)
        self.ui.fieldOfViewMaskSelector.enabled = bool(p and p.fieldOfView == FieldOfView.Mask)
        carm = bool(p and p.initialPoseMode == InitialPoseMode.CArmAngles)
        self.ui.primaryAngleSpinBox.enabled = carm
        self.ui.secondaryAngleSpinBox.enabled = carm

    # ---- camera geometry -------------------------------------------------------------------------
    def onReadGeometry(self) -> None:
        p = self._parameterNode
        if p and p.xrayVolume:
            try:
                geo = self._geometryFiller.fill(p, p.xrayVolume)
            except Exception as e:
                slicer.util.errorDisplay(_("Could not read the X-ray geometry: ") + str(e))
                return
            self._showGeometrySources(geo)

    def _showGeometrySources(self, geo) -> None:
        sources = geo.get("sources", {})
        text = ", ".join(f"{k}: {v}" for k, v in sources.items()) if sources else _("nothing found")
        if not geo.get("sdd"):
            text = _("Source-to-detector distance unknown: enter it. ") + text
        self.ui.geometrySourceLabel.text = text

    def _cameraArguments(self) -> dict:
        p = self._parameterNode
        pixelSpacing = (p.pixelSpacingX, p.pixelSpacingY) if p.pixelSpacingX > 0 and p.pixelSpacingY > 0 else None
        if p.calibrationPath.strip():  # the calibrated camera, whatever the fields say (only its pixel size)
            return dict(calibration=p.calibrationPath.strip(), pixelSpacing=pixelSpacing)
        return dict(
            sdd=p.sdd if p.sdd > 0 else None,
            pixelSpacing=pixelSpacing,
            principalPoint=(p.principalPointX, p.principalPointY) if p.principalPointX >= 0 and p.principalPointY >= 0 else None,
        )

    def _xrayArguments(self) -> dict:
        """How the inputs are taken, as the logic's start() takes them: the X-ray's polarity and
        field of view, the second X-ray (biplane), the CT's one bone (a segmentation)."""
        p = self._parameterNode
        if p.fieldOfView == FieldOfView.Mask:
            if p.fieldOfViewMask is None:
                raise ValueError(_("Field of view: choose the mask's label map, or 'detected'"))
            fieldOfView = p.fieldOfViewMask
        else:
            fieldOfView = p.fieldOfView.value
        others = []
        if p.secondXrayVolume is not None:  # its field of view: detected, unless the whole image is asked for
            others.append(OtherView(p.secondXrayVolume, p.secondCalibrationPath.strip() or None, p.xrayPolarity.value,
                                    "none" if p.fieldOfView == FieldOfView.WholeImage else "auto"))
        return dict(polarity=p.xrayPolarity.value, fieldOfView=fieldOfView, otherViews=others,
                    ctLabel=p.ctSegmentation)

    def _poseArguments(self) -> dict:
        """The initial pose as the logic's start() takes it (computed in the worker)."""
        p = self._parameterNode
        mode = p.initialPoseMode.value
        return dict(initialPoseMode=mode, initialTransformNode=p.initialTransform if mode == "transform" else None,
                    sod=p.sod if p.sod > 0 else None, primaryAngle=p.primaryAngle, secondaryAngle=p.secondaryAngle,
                    rotationOffsetDeg=(p.rotationOffsetX, p.rotationOffsetY, p.rotationOffsetZ),
                    translationOffsetMm=(p.translationOffsetX, p.translationOffsetY, p.translationOffsetZ))

    # ---- initial pose and live preview ----------------------------------------------------------
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
        self._showBothViewsIfBiplane()
        self.updatePreview(showErrors=True)

    def _showBothViewsIfBiplane(self) -> None:
        """With a second X-ray, a layout that shows the Red and the Yellow slice views (each view's
        X-ray and DRR; CorrRegModuleLib/sceneview.py), unless the current one already does."""
        p = self._parameterNode
        manager = slicer.app.layoutManager()
        if p is None or p.secondXrayVolume is None or manager is None:
            return
        if manager.sliceWidget("Yellow") is None or not manager.sliceWidget("Yellow").isVisible():
            manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)

    def _currentInitialPose(self):
        """(camera, initial camera_from_ct) for the preview: cached base pose + slider offsets."""
        p = self._parameterNode
        ct, xray = p.ctVolume, p.xrayVolume
        camera = self.logic.cameraForNode(xray, **self._cameraArguments())  # the file is read once per node
        args = self._poseArguments()
        label = p.ctSegmentation
        key = (ct.GetID(), xray.GetID(), args["initialPoseMode"], p.initialTransform.GetID() if p.initialTransform else None,
               args["sod"], p.primaryAngle, p.secondaryAngle, camera.sdd, tuple(camera.pixel_spacing),
               tuple(camera.principal_point), None if label is None else (label.GetID(), label.GetMTime()))
        if self._previewBase is None or self._previewBase[0] != key:
            volume = self.logic.cachedVolume(ct, label)  # one bone: the rotations turn about its centroid
            base = self.logic.initialPose(volume, camera, args["initialPoseMode"], p.initialTransform, args["sod"],
                                          p.primaryAngle, p.secondaryAngle)
            self._previewBase = (key, base, self.logic.isocenterOf(volume))
        _, base, iso = self._previewBase
        pose = self.logic.initialPose(None, camera, basePose=base, isocenter=iso,
                                      rotationOffsetDeg=args["rotationOffsetDeg"],
                                      translationOffsetMm=args["translationOffsetMm"])
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
                                       opacity=p.opacity, calibration=self._cameraArguments().get("calibration"),
                                       otherViews=self._xrayArguments()["otherViews"], ctLabel=p.ctSegmentation)
        except Exception as e:
            self.ui.statusLabel.text = _("Initial pose: ") + str(e)
            if showErrors:
                slicer.util.errorDisplay(str(e))
            return
        self._adoptCreatedNodes(nodes)
        self.ui.statusLabel.text = _("Showing the initial pose")

    def _adoptCreatedNodes(self, nodes) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.outputTransform is None and nodes.get("outputTransform") is not None:
            p.outputTransform = nodes["outputTransform"]
        if p.drrVolume is None and nodes.get("drr") is not None:
            p.drrVolume = nodes["drr"]

    def onOpacityChanged(self, value) -> None:
        self.logic.setOverlayOpacity(value, _redSliceCompositeNode())

    def onBrowseCalibration(self, second: bool = False) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Calibration file"), "",
                                              _("Calibrations (*.txt *.yml *.yaml *.json);;All files (*)"))
        if path and second:
            self._parameterNode.secondCalibrationPath = path
        elif path:
            self._parameterNode.calibrationPath = path

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder"))
        if path:
            self._parameterNode.modelPath = path

    # ---- dependencies ----------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Offer to install missing packages (PyTorchUtils and pip_ensure each ask first). No busy
        cursor while they ask; an install error is shown, not raised out of the slot."""
        if not self.logic.missingDependencies():
            return True
        try:
            self.logic.installDependencies(askConfirmation=True)
        except Exception as e:
            logging.exception("CorrReg: installing the dependencies failed")
            slicer.util.errorDisplay(_("Failed to install the dependencies: ") + str(e))
        missing = self.logic.missingDependencies()
        if missing:
            self.ui.statusLabel.text = _("Not installed: ") + ", ".join(missing)
        return not missing

    # ---- registration ----------------------------------------------------------------------------
    def onRegisterButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()  # the worker stops at its next step boundary; the timer shows it
            self.ui.statusLabel.text = _("Cancelling: the best pose so far is kept")
            self._updateButtons()
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            self._showBothViewsIfBiplane()
            self.logic.start(
                p.ctVolume, p.xrayVolume, p.outputTransform, method=p.method.value,
                device=p.device.value, modelPath=p.modelPath or None, drrNode=p.drrVolume,
                sliceCompositeNode=_redSliceCompositeNode(), sliceNode=_redSliceNode(), opacity=p.opacity,
                background=True, **self._cameraArguments(), **self._xrayArguments(),
                localStarts=p.localStarts if p.method == RegistrationMethod.Intensity else 0,
                polish="bandpass_ncc" if p.polishBone else None,
                **self._poseArguments())
        except Exception as e:
            slicer.util.errorDisplay(_("Failed to start the registration: ") + str(e))
            self._updateButtons()
            return
        self._adoptedRun = None
        self.ui.progressBar.setValue(0)
        self.ui.resultLabel.text = ""
        self.ui.statusLabel.text = _("Preparing: reading the CT, setting up the projectors")
        self._pollTimer.start()
        self._updateButtons()

    def onPollTimer(self) -> None:
        run = self.logic.currentRun
        if run is None:
            self._pollTimer.stop()
            self._updateButtons()
            return
        info = run.poll()
        if run.nodes and self._adoptedRun is not run:
            self._adoptCreatedNodes(run.nodes)
            self._adoptedRun = run
        if run.error is not None:
            self._pollTimer.stop()
            logging.error("CorrReg registration failed during %s:\n%s", getattr(run, "errorDuring", "?"),
                          getattr(run, "errorDetails", ""))
            slicer.util.errorDisplay(_("The registration failed: ") + str(run.error))
            self.ui.statusLabel.text = _("Failed: ") + str(run.error)
            self._updateButtons()
            return
        if info is not None and not run.stopped:
            self.ui.progressBar.setValue(int(round(100 * info.progress)))
            self.ui.statusLabel.text = _("{note} - {stage}: iteration {it}, loss {loss:.4f}").format(
                note=run.pipelineNote, stage=info.stage, it=info.iteration, loss=info.loss)
        if run.stopped and run.result is not None:
            self.ui.progressBar.setValue(100)
            self.ui.resultLabel.text = run.summary()
            self.ui.statusLabel.text = (run.pipelineNote + " - " + (_("done") if run.finished
                                        else _("rendering the final DRR")))
            self._previewBase = None  # a transform-based start must re-read the new pose
        if run.finished:
            self._pollTimer.stop()
        self._updateButtons()

    # ---- training a model for this CT ------------------------------------------------------------
    def onTrainButton(self) -> None:
        training = self.logic.currentTraining
        if training is not None and not training.finished:
            training.cancel()
            self.ui.trainingStatusLabel.text = _("Cancelling the training")
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        outDir = self.logic.defaultModelFolder(p.ctVolume)
        if outDir is None:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                         _("Folder for the trained model (the scene is not saved)"))
            if not folder:
                return
            outDir = os.path.join(folder, p.ctVolume.GetName())
        overwrite = os.path.exists(os.path.join(outDir, "model.safetensors"))
        if overwrite and not slicer.util.confirmYesNoDisplay(
                _("{folder} already holds a model. Replace it?").format(folder=outDir)):
            return
        try:
            camera = self.logic.cameraForNode(p.xrayVolume, **self._cameraArguments())
            self.logic.trainModel(p.ctVolume, p.xrayVolume, outDir, steps=p.trainingSteps, device=p.device.value,
                                  camera=camera, overwrite=overwrite)
        except Exception as e:
            slicer.util.errorDisplay(_("Could not start the training: ") + str(e))
            return
        self.ui.trainingProgressBar.setValue(0)
        self.ui.trainingStatusLabel.text = _("Training in a background process: {folder}").format(folder=outDir)
        self._trainingTimer.start()
        self._updateButtons()

    def onTrainingTimer(self) -> None:
        training = self.logic.currentTraining
        if training is None:
            self._trainingTimer.stop()
            self._updateButtons()
            return
        prog = training.poll()
        self.ui.trainingProgressBar.setValue(int(round(100 * prog.fraction)))
        if not prog.finished:
            self.ui.trainingStatusLabel.text = _("{stage}: step {done} of {steps}, loss {loss:.3f}").format(
                stage=prog.stage, done=prog.done, steps=prog.steps, loss=prog.loss)
            return
        self._trainingTimer.stop()
        if prog.stage == "finished":
            p = self._parameterNode
            if p is not None:
                with slicer.util.NodeModify(p.parameterNode):
                    p.modelPath = prog.modelDir
                    p.method = RegistrationMethod.Auto
            self.ui.trainingStatusLabel.text = _("Trained: {folder}. Automatic now uses it.").format(folder=prog.modelDir)
        elif prog.stage == "cancelled":
            self.ui.trainingStatusLabel.text = _("Training cancelled")
        else:
            self.ui.trainingStatusLabel.text = _("Training failed: ") + prog.error
            slicer.util.errorDisplay(_("Training failed: ") + prog.error)
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
        # Reload and Test calls runTest directly, where a skipTest would count as a failure: say
        # why nothing runs instead.
        missing = CorrRegLogicCore.missingDependencies()
        if missing:
            self.delayDisplay("CorrReg self-test not run: it needs " + ", ".join(missing)
                              + " (install the PyTorch extension, then click Register once to install the rest)")
            return
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

        # In the worker thread, as the GUI runs it.
        report = runSelfTest(CorrRegLogic(), slicer.mrmlScene, log=self.delayDisplay, background=True)
        self.assertLess(report["mTRE"], report["tolerance_mm"], report)
        self.assertLess(report["mTRE"], report["initial_mTRE"], report)
        self.delayDisplay(f"Test passed: mTRE {report['initial_mTRE']:.1f} mm -> {report['mTRE']:.2f} mm")
