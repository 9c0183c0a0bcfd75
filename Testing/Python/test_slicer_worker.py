"""The module's registration in its worker thread, on a real MRML scene (slicer-core).

The threading contract: the worker (``CorrRegModuleLib.worker``) never calls into MRML/VTK; the
main thread's ``RegistrationRun.poll`` writes everything into the scene. Checked two ways: a
profiler on every thread the run starts records each call into a VTK object or into the MRML
side of the module, and observers on every node record the thread of each event they see.
Also here: cancel, set-up errors, scene close, and the smaller defects of issue 12 (geometry read
once per node, the slice view's aspect, the DRR's node reference, RGB X-rays, the default method).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
MODULE_DIR = Path(__file__).resolve().parents[2] / "CorrReg"
sys.path.insert(0, str(MODULE_DIR))

from vtkmodules.vtkCommonCore import vtkObjectBase  # noqa: E402

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegModuleLib import selftest  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegModuleLib.sceneview import DRR_XRAY_REFERENCE_ROLE, fieldOfViewFitting  # noqa: E402
from CorrRegLib.phantom import make_spine_phantom  # noqa: E402
from CorrRegLib.register import RegistrationOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_DEFAULT = RegistrationOptions()
SHORT = replace(_DEFAULT, patience=1000, levels=tuple(replace(lv, max_iterations=3) for lv in _DEFAULT.levels))
LONG = replace(_DEFAULT, patience=1000, levels=tuple(replace(lv, max_iterations=400) for lv in _DEFAULT.levels))
POSE = dict(initialPoseMode="carm", primaryAngle=0.0, secondaryAngle=0.0,
            rotationOffsetDeg=(3.0, -2.0, 3.0), translationOffsetMm=(6.0, -5.0, 15.0))
MODULE_LIB = str(MODULE_DIR / "CorrRegModuleLib")
MRML_SIDE = tuple(os.path.join(MODULE_LIB, f) for f in ("adapter.py", "sceneview.py", "run.py", "checks.py",
                                                         "xraygeometry.py", "preview.py", "logic.py"))


@pytest.fixture(scope="module")
def phantom():
    torch.manual_seed(0)
    return make_spine_phantom(spacing_mm=4.0)


@pytest.fixture
def case(phantom):
    scene = slicer.vtkMRMLScene()
    c = selftest.buildPhantomCase(scene, size=32, phantom=phantom)
    c["scene"] = scene
    c["composite"] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    c["slice"] = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    return c


def _poll_until(run, condition, timeout=120.0):
    end = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < end, "the worker did not get there in time"
        time.sleep(0.01)
        run.poll()


class ThreadAudit:
    """Records calls into VTK/MRML objects and the module's MRML-side files made off the main thread."""

    def __init__(self):
        self.violations: list[str] = []
        self.threads: set[str] = set()

    def __call__(self, frame, event, arg):
        t = threading.current_thread()
        if t is threading.main_thread():
            return
        self.threads.add(t.name)
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), vtkObjectBase):
            self.violations.append(f"{t.name}: {type(arg.__self__).__name__}.{arg.__name__}")
        elif event == "call":
            path = frame.f_code.co_filename
            if path in MRML_SIDE or f"{os.sep}slicer{os.sep}" in path:
                self.violations.append(f"{t.name}: {frame.f_code.co_name} in {path}")


def _observe_every_node(scene, seen):
    tags = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        tags.append((node, node.AddObserver("AnyEvent", lambda c, e: seen.append(threading.current_thread().name))))
    tags.append((scene, scene.AddObserver("AnyEvent", lambda c, e: seen.append(threading.current_thread().name))))
    return tags


def test_the_worker_never_touches_mrml_and_the_scene_gets_the_result(case):
    scene, ct, xray = case["scene"], case["ct"], case["xray"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    ct_pixels = np.array(slicer.util.arrayFromVolume(ct), copy=True)
    ct_mtime = ct.GetMTime()
    events: list[str] = []
    tags = _observe_every_node(scene, events)
    audit = ThreadAudit()
    logic = CorrRegLogicCore(scene)
    threading.setprofile(audit)
    try:
        run = logic.start(ct, xray, out, method="intensity", options=SHORT, sliceCompositeNode=case["composite"],
                          sliceNode=case["slice"], drrUpdateInterval=0.0, background=True, **POSE)
        assert run.nodes == {} and logic.isRunning  # nothing in the scene before the worker's set-up
        _poll_until(run, lambda: run.finished)
    finally:
        threading.setprofile(None)
        for node, tag in tags:
            node.RemoveObserver(tag)
    assert run.error is None, getattr(run, "errorDetails", "")
    assert "CorrReg registration" in audit.threads
    assert not audit.violations, audit.violations[:10]
    assert events and set(events) == {threading.main_thread().name}
    # The result, the final full-resolution DRR and the scene set-up, all done by poll().
    result = run.result
    assert result.stage == "done" and not logic.isRunning
    np.testing.assert_allclose(A.poseArrayFromTransformNode(out), result.pose.numpy(), atol=1e-12)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.drrNode)[0],
                               run.renderer.render(result.pose, full=True), rtol=1e-6, atol=1e-6)
    assert run.transformUpdates >= 3 and run.drrUpdates >= 2
    assert case["composite"].GetBackgroundVolumeID() == xray.GetID()
    assert A.parentTransformID(xray) == out.GetID()
    # The CT node was only read (through a view, in the worker).
    assert ct.GetMTime() == ct_mtime
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), ct_pixels)


def test_cancel_in_the_background_keeps_the_best_pose(case):
    scene = case["scene"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    logic = CorrRegLogicCore(scene)
    run = logic.start(case["ct"], case["xray"], out, method="intensity", options=LONG, background=True, **POSE)
    _poll_until(run, lambda: run.lastState is not None and run.lastState.iteration >= 3)
    t0 = time.perf_counter()
    logic.cancel()
    assert run.done and logic.isRunning  # cancelling: stops at the worker's next step boundary
    _poll_until(run, lambda: run.stopped, timeout=30.0)
    latency = time.perf_counter() - t0
    _poll_until(run, lambda: run.finished)
    r = run.result
    assert r.cancelled and 3 <= r.iterations < 1000, (r.iterations, latency)
    np.testing.assert_allclose(A.poseArrayFromTransformNode(out), r.pose.numpy(), atol=1e-12)
    # The DRR shows the kept pose, at full resolution; the worker thread is gone.
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.drrNode)[0], run.renderer.render(r.pose, full=True),
                               rtol=1e-6, atol=1e-6)
    assert not run._worker.alive
    print(f"cancelled after {r.iterations} iterations; stopped {latency * 1000:.0f} ms after the click")


def test_a_bad_input_found_by_the_worker_leaves_the_scene_as_it_was(case):
    scene = case["scene"]
    soft = A.volumeNodeFromArray(scene, np.full((20, 20, 20), 40.0, np.float32), (5.0, 5.0, 5.0), (-50, -50, -50),
                                 name="soft tissue only")
    before = {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}
    logic = CorrRegLogicCore(scene)
    run = logic.start(soft, case["xray"], None, method="intensity", options=SHORT, background=True, **POSE)
    _poll_until(run, lambda: run.finished)
    assert isinstance(run.error, ValueError) and "contains no bone" in str(run.error)
    after = {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}
    assert after == before and not logic.isRunning


def test_closing_the_scene_stops_the_run_and_frees_its_memory(case):
    scene = case["scene"]
    logic = CorrRegLogicCore(scene)
    volume = logic.cachedVolume(case["ct"])
    pose = logic.initialPose(volume, case["camera"], "carm", sod=700.0)
    logic.preview(case["ct"], case["xray"], None, pose, case["camera"])
    assert logic._previewCache and logic._geometryCache is not None
    run = logic.start(case["ct"], case["xray"], None, method="intensity", options=LONG, background=True, **POSE)
    _poll_until(run, lambda: run.lastState is not None)
    scene.Clear(0)  # what File > Close Scene does: StartCloseEvent, then the nodes go
    assert logic.currentRun is None and not logic._previewCache
    assert run._worker.join(30.0), "the worker must end once the scene closes"
    assert run.poll() is None  # an abandoned run writes nothing more


def test_the_xray_file_is_read_once_per_node(tmp_path, monkeypatch):
    import SimpleITK as sitk
    from CorrRegLib import io as crio

    image = sitk.GetImageFromArray((np.random.default_rng(0).random((40, 50)) * 1000).astype(np.uint16))
    image.SetSpacing((0.25, 0.3))
    for tag, value in {"0008|0060": "XA", "0018|1110": "1020.5", "0018|1111": "710"}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    path = tmp_path / "fluoro.dcm"
    writer.SetFileName(str(path))
    writer.Execute(image)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fluoro")
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image).astype(np.float32)[None])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    reads = []
    real = crio.read_xray
    monkeypatch.setattr(crio, "read_xray", lambda *a, **k: reads.append(a) or real(*a, **k))
    logic = CorrRegLogicCore(scene)
    for sdd in (None, 900.0, None, 950.0, None):  # what dragging a pose slider asks for, every 60 ms
        assert logic.cameraForNode(node, sdd=sdd).size == (50, 40)
    assert len(reads) == 1
    assert logic.cameraGeometryFromNode(node)["sdd"] == pytest.approx(1020.5)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: read again
    logic.cameraForNode(node)
    assert len(reads) == 2


@pytest.mark.parametrize("view", [(800, 400), (300, 900), (256, 256)])
def test_the_slice_view_fits_the_xray_without_stretching_it(case, view):
    logic = CorrRegLogicCore(case["scene"])
    xray, sliceNode = case["xray"], case["slice"]
    sliceNode.SetDimensions(view[0], view[1], 1)
    A.placeXrayNode(xray, case["camera"], None)
    logic.alignSliceNodeToImage(sliceNode, xray, fit=True)
    fov = sliceNode.GetFieldOfView()
    # square screen pixels: mm per pixel is the same along x and y
    assert fov[0] / view[0] == pytest.approx(fov[1] / view[1], rel=1e-9)
    # the whole X-ray in view, as Slicer's own FitSliceToVolume puts it (ours with a 5% margin)
    w, h = (case["camera"].size[0] * case["camera"].pixel_spacing[0], case["camera"].size[1] * case["camera"].pixel_spacing[1])
    assert fov[0] >= w and fov[1] >= h
    reference = case["scene"].AddNewNodeByClass("vtkMRMLSliceNode")
    reference.SetLayoutName("Reference")
    reference.SetDimensions(view[0], view[1], 1)
    reference.GetSliceToRAS().DeepCopy(sliceNode.GetSliceToRAS())
    reference.UpdateMatrices()
    sliceLogic = slicer.vtkMRMLSliceLogic()
    sliceLogic.SetMRMLScene(case["scene"])
    sliceLogic.SetSliceNode(reference)
    sliceLogic.FitSliceToVolume(xray, view[0], view[1])
    ref = reference.GetFieldOfView()
    assert fov[0] == pytest.approx(1.05 * ref[0], rel=1e-6) and fov[1] == pytest.approx(1.05 * ref[1], rel=1e-6)
    assert fieldOfViewFitting(w, h, view) == pytest.approx((fov[0], fov[1]))


def test_the_drr_stays_linked_to_its_xray_through_a_scene_import(case, tmp_path):
    scene = case["scene"]
    logic = CorrRegLogicCore(scene)
    pose = logic.initialPose(logic.cachedVolume(case["ct"]), case["camera"], "carm", sod=700.0)
    nodes = logic.preview(case["ct"], case["xray"], None, pose, case["camera"])
    drr = nodes["drr"]
    assert drr.GetNodeReference(DRR_XRAY_REFERENCE_ROLE) is case["xray"]
    assert drr.GetAttribute("CorrReg.XrayNodeID") is None  # IDs in attributes are not remapped on import
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    scene.Commit()
    # Import into a scene that already uses the same node IDs: the imported nodes are renamed.
    other = slicer.vtkMRMLScene()
    for _ in range(scene.GetNumberOfNodes()):
        other.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "occupies an ID")
    other.SetURL(str(tmp_path / "scene.mrml"))
    other.Import()
    imported = [n for n in (other.GetNthNode(i) for i in range(other.GetNumberOfNodes()))
                if n.GetAttribute(A.ROLE_ATTRIBUTE) == "DRR"]
    assert len(imported) == 1
    ref = imported[0].GetNodeReference(DRR_XRAY_REFERENCE_ROLE)
    assert ref is not None and ref.GetName() == case["xray"].GetName() and ref.GetID() != case["xray"].GetID()
    assert CorrRegLogicCore(other)._findDRRNode(ref) is imported[0]


def test_an_rgb_xray_registers(case):
    """RGB X-rays (vector volumes, e.g. a PNG) are shown by the selector and accepted by the logic."""
    scene = case["scene"]
    grey = slicer.util.arrayFromVolume(case["xray"])[0]
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB X-ray")
    slicer.util.updateVolumeFromArray(rgb, np.repeat(grey[None, :, :, None], 3, axis=-1).astype(np.float32))
    rgb.SetAttribute(A.GEOMETRY_ATTRIBUTE, case["xray"].GetAttribute(A.GEOMETRY_ATTRIBUTE))
    assert rgb.IsA("vtkMRMLScalarVolumeNode")  # what the selector's nodeTypes names, child types shown
    logic = CorrRegLogicCore(scene)
    result = logic.register(case["ct"], rgb, None, method="intensity", options=SHORT, **POSE)
    assert result.iterations > 0 and np.isfinite(result.loss)


def test_the_default_method_runs_without_a_model_and_says_so(case):
    logic = CorrRegLogicCore(case["scene"])
    run = logic.start(case["ct"], case["xray"], None, options=SHORT, **POSE)  # no method given
    assert run.options.method == "auto"
    note = run.pipelineNote
    assert note and "network" not in note.split("(")[0], note
    assert "no network model" in note, note
    run.cancel()
    assert run.finish().cancelled
