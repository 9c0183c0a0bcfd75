"""The CorrReg registration logic on an MRML scene, without Qt.

``CorrRegLogicCore`` is the whole Logic of the Slicer module (``CorrReg.CorrRegLogic`` adds only
Slicer's parameter-node plumbing on top of it). It drives a ``CorrRegLib.register.
RegistrationSession`` on MRML nodes:

* ``start(..., background=True)`` / ``poll()`` / ``cancel()``: the GUI's way. The set-up, the
  steps, the DRRs and the cancel run in a worker thread (``worker.py``); ``poll()``, from a short
  timer on the main thread, writes what arrived into the scene;
* ``start(...)`` / ``step(n)`` / ``finish()``: the same run advanced in the caller's thread;
* ``register(...)`` runs a registration to the end (scripts, the self-test, batch use);
* ``preview(...)`` shows a pose (output transform + DRR) without registering;
* ``trainModel(...)`` trains a patient-specific network in a background process (``training.py``).

Every input is validated before anything in the scene changes: a wrong input raises
``ValueError`` (in the background: ``run.error`` holds it) and leaves the scene as it was. The CT
node and the X-ray's pixels are never modified; the X-ray node is *placed* (its geometry set to
the detector plane in the camera frame and its parent set to the output transform).

The jobs live in one file each: ``dependencies`` (packages), ``xraygeometry`` (camera geometry,
calibration files), ``xrayimage`` (polarity, field of view, other views), ``ctlabel`` (one bone of
the CT), ``poses`` (starting pose), ``checks`` (input validation), ``sceneview`` (nodes and slice view),
``preview`` (the sliders' preview and its caches), ``rendering`` (DRRs), ``worker`` (the work off
the main thread), ``run`` (its main-thread side), ``training`` (``corrreg train`` in a process).
torch and CorrRegLib are imported inside functions, so this file imports before PyTorch is installed.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import slicer

from . import adapter
from .checks import ChecksMixin
from .ctlabel import ctLabelMask
from .dependencies import PIP_REQUIREMENTS, REQUIRED_PACKAGES, REQUIREMENTS_FILE, DependenciesMixin  # noqa: F401
from .poses import DEFAULT_SOD_FRACTION, INITIAL_POSE_MODES, PoseSpec, basePoseFor, isocenterOf, withOffsets  # noqa: F401
from .preview import PreviewMixin
from .run import RegistrationRun, RunOptions, StepInfo  # noqa: F401
from .sceneview import DRR_XRAY_REFERENCE_ROLE, SceneViewMixin  # noqa: F401
from .training import TrainingMixin
from .worker import CTData, RegistrationEngine, RegistrationJob, ViewJob
from .xraygeometry import XrayGeometryMixin
from .xrayimage import OtherView, fieldOfViewFrom, polarityFrom

#: Registration methods, as CorrRegLib.register names them (GUI order); "auto" is the default:
#: the network only where a model trained for this C-arm is given, else a global search.
METHODS = ("auto", "intensity", "cmaes", "network", "hybrid")
DEFAULT_METHOD = "auto"


#: The scene-close observers of logics that are gone: (scene, tag), removed by the next logic call
#: on the main thread, the only thread that touches MRML (a logic is collected in whichever thread
#: the garbage collector runs, the registration worker's too, so its finalizer only appends here).
#: Held here, a scene cannot be deleted with the observer still on it.
_PENDING_REMOVALS: list = []


def _removePendingObservers() -> None:
    """Remove the observers left by logics collected in another thread (main thread only)."""
    while _PENDING_REMOVALS and threading.current_thread() is threading.main_thread():
        scene, tag = _PENDING_REMOVALS.pop()
        scene.RemoveObserver(tag)


class CorrRegLogicCore(DependenciesMixin, XrayGeometryMixin, ChecksMixin, SceneViewMixin, PreviewMixin,
                       TrainingMixin):
    """Registration of an X-ray node to a CT node in an MRML scene (see the module docstring).

    ``scene``: the vtkMRMLScene to work in; default ``slicer.mrmlScene`` (inside Slicer).
    """

    def __init__(self, scene=None):
        _removePendingObservers()
        self._scene = None
        self._closeObservation = None
        self.currentRun: RegistrationRun | None = None
        self.currentTraining = None
        self._previewCache = {}
        self._geometryCache = {}
        if scene is not None:
            self.scene = scene

    # ---- scene ---------------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise ValueError("no MRML scene: pass scene= to the logic (outside Slicer there is no slicer.mrmlScene)")
            self.scene = scene
        return self._scene

    @scene.setter
    def scene(self, scene):
        if self._closeObservation is not None:
            self._closeObservation()  # the old scene's observer goes to _PENDING_REMOVALS, removed just below
            self._closeObservation = None
        _removePendingObservers()
        self._scene = scene
        if scene is not None:
            # A weak reference: the scene must not keep the logic alive (nor call into a dead one).
            me = weakref.ref(self)

            def onStartClose(caller, event):
                logic = me()
                if logic is not None:
                    logic._onSceneStartClose()

            tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, onStartClose)
            # Removed after the logic goes, before the scene can go: a scene deleted with a Python
            # observer calls it from its destructor, and inside Python's cycle collection (a run
            # and its logic refer to each other) that call crashed the interpreter.
            self._closeObservation = weakref.finalize(self, _PENDING_REMOVALS.append, (scene, tag))

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        """The nodes are about to go: stop without writing into them and free the memory."""
        self.abandon()
        self.releaseMemory()

    # ---- poses -----------------------------------------------------------------------------------
    @staticmethod
    def isocenterOf(volume):
        """LPS point the reference view looks at: the bone centroid (ValueError if no bone)."""
        return isocenterOf(volume)

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
        iso = self.isocenterOf(volume) if isocenter is None else isocenter
        if basePose is not None:
            base = adapter._toNumpyPose(basePose)
        elif mode == "transform" or (mode is None and initialTransformNode is not None):
            if initialTransformNode is None:
                raise ValueError("initial pose from a transform was asked for but no initial transform node is selected")
            base = adapter.poseArrayFromTransformNode(initialTransformNode)
        else:
            base = basePoseFor(camera, iso, mode, sod, primaryAngle, secondaryAngle)
        return withOffsets(base, iso, rotationOffsetDeg, translationOffsetMm)

    # ---- the run -------------------------------------------------------------------------------
    def start(self, ctNode, xrayNode, outputTransformNode=None, method=DEFAULT_METHOD, camera=None,
              initialTransformNode=None, initialPose=None, initialPoseMode=None,
              rotationOffsetDeg=(0.0, 0.0, 0.0), translationOffsetMm=(0.0, 0.0, 0.0),
              sod=None, primaryAngle=None, secondaryAngle=None, sdd=None, pixelSpacing=None,
              principalPoint=None, device="auto", modelPath=None, drrNode=None, createDRR=True,
              sliceCompositeNode=None, sliceNode=None, showInSliceView=True, opacity=0.5,
              invertXray=False, iterationsPerStep=2, drrUpdateInterval=0.5, progressCallback=None,
              options=None, background=False, localStarts=0, polish=None, polarity="auto",
              fieldOfView="auto", calibration=None, otherViews=(), ctLabel=None,
              ctLabelValues=None) -> RegistrationRun:
        """Validate the inputs, then run the set-up (CT conversion, initial pose, session) and set
        up the scene; returns the run.

        ``background=True`` (the GUI): the set-up and everything after it run in a worker thread and
        this returns at once; call ``run.poll()`` from the main thread to bring the scene up to date
        (the scene is set up when the worker's set-up succeeded; a failure lands in ``run.error``).
        Otherwise the set-up runs here and a bad input raises ValueError.

        ``initialPose`` (camera_from_ct, 4x4) wins over ``initialTransformNode``, which wins over
        ``initialPoseMode`` ("ap" default, "carm" with ``primaryAngle``/``secondaryAngle``).
        ``localStarts`` (method "intensity"): also refine that many starts around the initial pose
        and flag the result when another basin they reach explains the images almost as well
        (RegistrationOptions.local_starts, min_rank_margin; 8 for real X-rays). ``polish`` (a
        similarity's name, "bandpass_ncc" for the GUI's box; None: off): for a CT that holds only
        bone seen in two or more views, L-BFGS to convergence after the refinement
        (RegistrationOptions.bone_only_polish).

        The X-ray as it comes (``xrayimage``; applied in the worker, the node's pixels untouched):
        ``polarity`` "auto" (detected), "bright" or "dark" (inverted; ``invertXray=True`` is the
        same); ``fieldOfView`` "auto" (the intensifier's disc, collimator blades and flat borders
        detected), "none" (every pixel), or a label map node of the X-ray's pixels (non-zero =
        use). Only the pixels inside the field of view are compared, in every stage and in the
        verification. ``calibration``: a calibration file (MayaCam 2.0, OpenCV YAML / JSON or a
        CorrReg camera JSON) for the camera, used when ``camera`` is not given.

        ``otherViews`` (biplane): ``xrayimage.OtherView`` s, more X-rays of the same moment, each
        with a calibration file that places its camera in the same world as ``calibration``'s
        (both with extrinsics: MayaCam, OpenCV R / t). One pose is estimated from all views
        (summed similarities, one search, one verification); the output transform stays the
        reference view's camera pose, each other X-ray is placed under a fixed transform below it
        (its camera relative to the reference's) with its own DRR, and ``run.result.pose`` is
        world_from_ct (``view_poses``: each camera_from_ct).

        ``ctLabel`` (one bone of a full CT, as ``corrreg register --ct-label``): a label map of the
        CT (its non-zero voxels, or ``ctLabelValues``) or a segmentation (its visible segments);
        only those voxels are registered, on their edges, over where they project
        (``ctlabel.ctLabelMask``). Nothing in the scene changes if this raises.
        """
        _removePendingObservers()
        previous = self.currentRun
        if previous is not None and not previous.finished and not previous.stopped:
            raise ValueError("a registration is already running; cancel or finish it first")
        method = str(method).lower().replace("-", "")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        localStarts = self._checkLocalStarts(localStarts, method)
        # 1. the quick checks, with the scene untouched
        self.requireDependencies()
        changes = {"local_starts": localStarts} if localStarts else {}
        if polish is not None:
            changes["bone_only_polish"] = polish  # an unknown name is refused by RegistrationOptions
        if changes:
            from dataclasses import replace

            from CorrRegLib.register import RegistrationOptions
            options = replace(options or RegistrationOptions(), **changes)
        self._checkInputs(ctNode, xrayNode)
        keep = None if ctLabel is None else ctLabelMask(ctNode, ctLabel, ctLabelValues)
        polarity = polarityFrom(polarity, invertXray)
        fieldOfView = fieldOfViewFrom(fieldOfView, xrayNode)
        others, cameraFromWorld = (), None
        if otherViews:
            cam, cameraFromWorld, others = self._checkOtherViews(ctNode, xrayNode, otherViews, method, camera,
                                                                 calibration, sdd, principalPoint, pixelSpacing)
        else:
            cam = self.cameraForNode(xrayNode, camera, sdd, pixelSpacing, principalPoint, calibration=calibration)
        if initialTransformNode is not None:
            if not initialTransformNode.IsA("vtkMRMLTransformNode") or not initialTransformNode.IsLinear():
                raise ValueError(f"the initial transform '{initialTransformNode.GetName()}' must be a linear transform")
            adapter.poseArrayFromTransformNode(initialTransformNode)  # rigid check
        self._checkOutputTransform(outputTransformNode, ctNode, xrayNode, drrNode,
                                   [v.xrayNode for v, _, _ in others])
        modelDir = None
        if modelPath:
            modelPath = os.fspath(modelPath)
            if not os.path.exists(modelPath):
                raise ValueError(f"the model '{modelPath}' does not exist")
            modelDir = modelPath if os.path.isdir(modelPath) else os.path.dirname(modelPath)
        # 2. what the worker needs, as plain data (the CT is a view of the node's voxels, not a copy)
        geo = self.cameraGeometryFromNode(xrayNode)
        mode = initialPoseMode or ("transform" if initialTransformNode is not None else "ap")
        base = None
        if initialPose is not None:
            base = adapter._toNumpyPose(initialPose)
        elif mode == "transform" and initialTransformNode is not None:
            base = adapter.poseArrayFromTransformNode(initialTransformNode)
        if mode not in INITIAL_POSE_MODES:
            raise ValueError(f"unknown initial pose mode {mode!r}; choose one of {', '.join(INITIAL_POSE_MODES)}")
        spec = PoseSpec(mode, base, geo.get("sod") if sod is None else sod,
                        geo.get("primaryAngle", 0.0) if primaryAngle is None else primaryAngle,
                        geo.get("secondaryAngle", 0.0) if secondaryAngle is None else secondaryAngle,
                        tuple(float(v) for v in rotationOffsetDeg), tuple(float(v) for v in translationOffsetMm))
        xrayArray = adapter.xrayArrayFromNode(xrayNode)
        viewJobs = tuple(ViewJob(adapter.xrayArrayFromNode(v.xrayNode), c.camera, c.camera_from_world.numpy(),
                                 v.polarity, v.fieldOfView, v.xrayNode.GetName()) for v, c, _ in others)
        job = RegistrationJob(self.ctData(ctNode, keep), xrayArray, cam, spec, method, str(device), modelDir, options,
                              float(drrUpdateInterval), polarity, fieldOfView, cameraFromWorld, viewJobs,
                              xrayNode.GetName())
        sceneArgs = dict(ctNode=ctNode, xrayNode=xrayNode, outputTransformNode=outputTransformNode, camera=cam,
                         drrNode=drrNode, createDRR=createDRR, sliceCompositeNode=sliceCompositeNode,
                         sliceNode=sliceNode, showInSliceView=showInSliceView, opacity=opacity,
                         otherViews=[(v.xrayNode, c.camera, fromReference) for v, c, fromReference in others])
        options_ = RunOptions(method, str(device), cam, None, int(iterationsPerStep), float(drrUpdateInterval))
        # 3. the set-up (here, or in the worker) and, once it succeeded, the scene
        run = RegistrationRun(self, RegistrationEngine(job), options_, sceneArgs, background, progressCallback)
        if previous is not None:  # its final DRR (if still to come) is not wanted any more
            previous.abandon() if not previous.finished else previous.release()
        self.currentRun = run
        return run

    def _checkOtherViews(self, ctNode, xrayNode, otherViews, method, camera, calibration, sdd, principalPoint,
                         pixelSpacing):
        """(reference camera, its camera_from_world (4, 4) numpy, [(OtherView, Calibration,
        camera_from_reference (4, 4) numpy)]) for a biplane run, every view checked (ValueError
        before the scene changes)."""
        if str(method).lower() in ("network", "hybrid"):
            raise ValueError(f"method {method!r} runs on one X-ray; choose Automatic, Intensity or CMA-ES for "
                             "several views")
        if camera is not None or sdd is not None or principalPoint is not None or not calibration:
            raise ValueError("several views take each camera from its calibration file, which places it in the "
                             "calibration's world: give calibration= for the first X-ray (not camera=, sdd= or "
                             "principalPoint=)")
        ref = self._posedCalibration(xrayNode, calibration, pixelSpacing)
        referenceFromWorld = ref.camera_from_world.numpy()
        seen = {xrayNode.GetID(), ctNode.GetID()}
        out = []
        for v in otherViews:
            if not isinstance(v, OtherView):
                raise ValueError(f"other views are xrayimage.OtherView(xrayNode, calibration), got {type(v).__name__}")
            adapter.checkXrayNode(v.xrayNode)
            if v.xrayNode.GetID() in seen:
                raise ValueError(f"the X-ray '{v.xrayNode.GetName()}' is given twice (or is the CT)")
            seen.add(v.xrayNode.GetID())
            if not v.calibration:
                raise ValueError(f"the X-ray '{v.xrayNode.GetName()}' needs its calibration file")
            cal = self._posedCalibration(v.xrayNode, v.calibration, v.pixelSpacing)
            v = OtherView(v.xrayNode, v.calibration, polarityFrom(v.polarity), fieldOfViewFrom(v.fieldOfView, v.xrayNode),
                          v.pixelSpacing)
            out.append((v, cal, cal.camera_from_world.numpy() @ np.linalg.inv(referenceFromWorld)))
        return ref.camera, referenceFromWorld, out

    def _posedCalibration(self, xrayNode, calibration, pixelSpacing):
        """The X-ray's calibration, refused without the camera's pose (several views need it)."""
        cal = self.calibrationForNode(xrayNode, calibration, pixelSpacing)
        if cal.camera_from_world is None:
            raise ValueError(f"the calibration {calibration} of the X-ray '{xrayNode.GetName()}' has no camera pose "
                             "(rotation and translation): several views need it in every calibration")
        return cal

    @staticmethod
    def _checkLocalStarts(localStarts, method: str) -> int:
        """``localStarts`` as a count, refused with a message for a method that does not take it."""
        if isinstance(localStarts, bool) or not float(localStarts).is_integer() or localStarts < 0:
            raise ValueError(f"local starts must be a whole number, 0 or more; got {localStarts!r}")
        if localStarts and method != "intensity":
            raise ValueError(f"local starts refine starts around the initial pose with the Intensity method, not "
                             f"'{method}': choose Intensity, or set local starts to 0")
        return int(localStarts)

    @staticmethod
    def ctData(ctNode, keep=None) -> CTData:
        """The CT's voxels as a view of the node's memory (no copy) and its LPS geometry; ``keep``
        (bool (K, J, I)) the voxels to register (one bone), None: all of them."""
        adapter.checkCTNode(ctNode)
        origin, direction, spacing = adapter.lpsGeometryFromVolumeNode(ctNode)
        return CTData(slicer.util.arrayFromVolume(ctNode), origin, direction, spacing, ctNode.GetName(), keep)

    def poll(self) -> StepInfo | None:
        """Bring the scene up to date with the background run (main thread; see ``RegistrationRun.poll``)."""
        _removePendingObservers()
        return None if self.currentRun is None else self.currentRun.poll()

    def step(self, n=None) -> StepInfo:
        """Advance the current run in this thread (see ``RegistrationRun.step``)."""
        if self.currentRun is None:
            raise RuntimeError("no registration is running; call start() first")
        return self.currentRun.step(n)

    def cancel(self) -> None:
        if self.currentRun is not None and not self.currentRun.stopped:
            self.currentRun.cancel()

    def finish(self):
        """Finish the current run (cancelling it if needed); returns the RegistrationResult."""
        if self.currentRun is None:
            raise RuntimeError("no registration to finish")
        return self.currentRun.finish()

    def abandon(self) -> None:
        """Drop the current run and training without touching the scene (the scene is closing)."""
        run = self.currentRun
        if run is not None and not run.finished:
            run.abandon()
        self.currentRun = None
        if self.currentTraining is not None:
            self.currentTraining.cancel()
            self.currentTraining = None

    @property
    def isRunning(self) -> bool:
        """A registration is going: not yet stopped (its final DRR may still follow)."""
        return self.currentRun is not None and not self.currentRun.stopped

    def register(self, ctNode, xrayNode, outputTransformNode=None, method=DEFAULT_METHOD, camera=None,
                 initialTransformNode=None, progressCallback=None, iterationsPerStep=5, background=False, **kwargs):
        """Register the X-ray to the CT and write the pose into ``outputTransformNode``.

        The same engine as the GUI. ``progressCallback(info)`` is called after every step with a
        ``StepInfo``; returning False cancels (the best pose so far is kept). ``background=True``
        runs it in the worker thread and waits, polling. Returns the ``RegistrationResult``.
        """
        run = self.start(ctNode, xrayNode, outputTransformNode, method=method, camera=camera,
                         initialTransformNode=initialTransformNode, progressCallback=progressCallback,
                         iterationsPerStep=iterationsPerStep, background=background, **kwargs)
        if background:
            run.wait()
            if run.error is not None:
                raise run.error
            return run.result
        try:
            while not run.done:
                run.step()
        except BaseException:
            if run.error is None:
                run.finish()  # leave the scene at the best pose found so far
            raise
        return run.finish()
