"""The module's Logic on a real MRML scene (slicer-core wheel): the code path the GUI drives.

The GUI's QTimer calls ``logic.step(n)`` between ``logic.start(...)`` and ``logic.finish()``;
these tests call exactly that, on a procedural spine phantom and a degraded simulated X-ray.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
MODULE_DIR = Path(__file__).resolve().parents[2] / "CorrReg"
sys.path.insert(0, str(MODULE_DIR))

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegModuleLib import selftest  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegLib.geometry import geodesic_distance  # noqa: E402
from CorrRegLib.phantom import make_spine_phantom  # noqa: E402
from slicer_cases import OFFSETS, SHORT_OPTIONS as OPTIONS  # noqa: E402

# The default coarse-to-fine schedule, shortened: 96 x 96 px X-rays of the 2.5 mm phantom,
# moderate initial offsets. (A 4 mm, three-vertebra phantom cannot pin depth to 2 mm at any
# detector size: its registrations end 1.4 to 5.6 mm off, all of it depth.)
SIZE = 96


@pytest.fixture(scope="module")
def phantom():
    torch.manual_seed(0)
    return make_spine_phantom(spacing_mm=2.5)


@pytest.fixture
def case(phantom):
    scene = slicer.vtkMRMLScene()
    c = selftest.buildPhantomCase(scene, size=SIZE, phantom=phantom)
    c["scene"] = scene
    c["composite"] = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    c["slice"] = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    return c


def _volume_snapshot(node):
    image = node.GetImageData()
    return {
        "mtime": node.GetMTime(),
        "image_mtime": image.GetMTime(),
        "array": np.array(slicer.util.arrayFromVolume(node), copy=True),
        "ijk_to_ras": A.ijkToRASArray(node),
        "parent": A.parentTransformID(node),
    }


def _scene_state(scene):
    nodes = scene.GetNodes()
    out = {}
    for i in range(nodes.GetNumberOfItems()):
        n = nodes.GetItemAsObject(i)
        out[n.GetID()] = n.GetMTime()
    return out


def _ncc(a, b):
    a = (a - a.mean()) / (a.std() + 1e-12)
    b = (b - b.mean()) / (b.std() + 1e-12)
    return float((a * b).mean())


# --------------------------------------------------------------------------------------------


def test_gui_stepping_registers_and_updates_the_scene_live(case):
    scene, ct, xray = case["scene"], case["ct"], case["xray"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    ct_before = _volume_snapshot(ct)
    xray_pixels = np.array(slicer.util.arrayFromVolume(xray), copy=True)
    modified = []
    out.AddObserver(slicer.vtkMRMLTransformNode.TransformModifiedEvent, lambda *a: modified.append(1))

    logic = CorrRegLogicCore(scene)
    run = logic.start(ct, xray, out, method="intensity", options=OPTIONS, sliceCompositeNode=case["composite"],
                      sliceNode=case["slice"], opacity=0.6, drrUpdateInterval=0.2, **OFFSETS)
    assert logic.isRunning
    drr = run.drrNode
    counts, progress = [], []
    while not run.done:
        info = logic.step(3)  # what the GUI timer does each tick
        counts.append(len(modified))
        progress.append(info.progress)
    result = logic.finish()
    assert not logic.isRunning

    # The transform was rewritten many times while running, not just at the end.
    assert len(set(counts)) >= 5 and counts[-1] >= 5
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert run.drrUpdates >= 3
    # It holds exactly the result's pose, close to the truth.
    pose = torch.from_numpy(A.poseArrayFromTransformNode(out))
    np.testing.assert_allclose(pose.numpy(), result.pose.numpy(), atol=1e-12)
    targets = case["phantom"].landmarks
    initial_err = selftest.mTRE(run.options.initialPose, case["truePose"], targets)
    final_err = selftest.mTRE(pose, case["truePose"], targets)
    rot_err, _ = geodesic_distance(pose, case["truePose"])
    assert initial_err > 10.0
    assert final_err < 2.0, (initial_err, final_err)
    assert float(rot_err) < 1.0
    assert "Done (intensity)" in run.summary()
    print(f"mTRE {initial_err:.1f} -> {final_err:.2f} mm, {result.iterations} iterations, {result.runtime_s:.1f} s")

    # The DRR node has exactly the X-ray's geometry, sits under the transform and matches the X-ray.
    assert drr.GetImageData().GetDimensions() == xray.GetImageData().GetDimensions() == (SIZE, SIZE, 1)
    assert drr.GetSpacing() == xray.GetSpacing()
    np.testing.assert_array_equal(A.ijkToRASArray(drr), A.ijkToRASArray(xray))
    assert A.parentTransformID(drr) == A.parentTransformID(xray) == out.GetID()
    drr_img = slicer.util.arrayFromVolume(drr)[0]
    assert np.isfinite(drr_img).all() and drr_img.max() > 0
    assert _ncc(drr_img, xray_pixels[0]) > 0.8
    # The X-ray sits on the detector plane of the camera.
    np.testing.assert_array_equal(A.ijkToRASArray(xray), A.detectorIJKToRAS(case["camera"]))

    # Slice view: X-ray background, DRR foreground, aligned to the detector plane as a radiograph.
    comp = case["composite"]
    assert comp.GetBackgroundVolumeID() == xray.GetID()
    assert comp.GetForegroundVolumeID() == drr.GetID()
    assert comp.GetForegroundOpacity() == pytest.approx(0.6)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(case["slice"].GetSliceToRAS())
    plane = logic.imagePlaneInWorld(xray)
    cols = plane[:3, 0] / np.linalg.norm(plane[:3, 0])
    rows = plane[:3, 1] / np.linalg.norm(plane[:3, 1])
    np.testing.assert_allclose(slice_to_ras[:3, 0], cols, atol=1e-9)  # image columns to the right
    np.testing.assert_allclose(slice_to_ras[:3, 1], -rows, atol=1e-9)  # row 0 at the top
    centre = plane @ np.array([(SIZE - 1) / 2, (SIZE - 1) / 2, 0.0, 1.0])
    np.testing.assert_allclose(slice_to_ras[:3, 3], centre[:3], atol=1e-6)
    width_mm = SIZE * case["camera"].pixel_spacing[0]
    assert case["slice"].GetFieldOfView()[0] == pytest.approx(1.05 * width_mm)  # the whole X-ray in view

    # Inputs: the CT is untouched, the X-ray's pixels too.
    after = _volume_snapshot(ct)
    assert after["mtime"] == ct_before["mtime"] and after["image_mtime"] == ct_before["image_mtime"]
    np.testing.assert_array_equal(after["array"], ct_before["array"])
    np.testing.assert_array_equal(after["ijk_to_ras"], ct_before["ijk_to_ras"])
    assert after["parent"] == ct_before["parent"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(xray), xray_pixels)


def test_cancel_mid_run_keeps_the_best_pose_and_inputs(case):
    scene, ct, xray = case["scene"], case["ct"], case["xray"]
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "CT placement")
    slicer.util.updateTransformMatrixFromArray(parent, np.array(
        [[1, 0, 0, 5.0], [0, 0, -1, 2.0], [0, 1, 0, -3.0], [0, 0, 0, 1]]))
    ct.SetAndObserveTransformNodeID(parent.GetID())
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    logic = CorrRegLogicCore(scene)
    run = logic.start(ct, xray, out, method="intensity", options=OPTIONS, **OFFSETS)
    ct_before = _volume_snapshot(ct)
    xray_before = _volume_snapshot(xray)  # after placement on the detector plane at start
    for _ in range(4):
        logic.step(2)
    logic.cancel()
    result = logic.finish()

    assert result.cancelled and not logic.isRunning and 1 <= result.iterations <= 12
    pose = A.poseArrayFromTransformNode(out)
    np.testing.assert_allclose(pose, result.pose.numpy(), atol=1e-12)
    stage = [h for h in result.history if h["stage"] == result.history[-1]["stage"]]
    assert result.loss == pytest.approx(min(h["loss"] for h in stage))  # the best of the stage so far
    # The camera transform follows the CT's own parent, so the pose stays relative to the CT frame.
    assert A.parentTransformID(out) == parent.GetID()
    # The DRR shows the kept pose, at full resolution.
    expected = run.renderer.render(pose, full=True)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.drrNode)[0], expected, rtol=1e-6, atol=1e-6)
    # Nothing of the inputs changed while running or cancelling.
    for before, node in ((ct_before, ct), (xray_before, xray)):
        now = _volume_snapshot(node)
        assert (now["mtime"], now["image_mtime"]) == (before["mtime"], before["image_mtime"]), node.GetName()
        np.testing.assert_array_equal(now["array"], before["array"])
        np.testing.assert_array_equal(now["ijk_to_ras"], before["ijk_to_ras"])
        assert now["parent"] == before["parent"]
    # A new run can start afterwards.
    run2 = logic.start(ct, xray, out, method="intensity", options=OPTIONS, initialTransformNode=out)
    np.testing.assert_allclose(run2.options.initialPose.numpy(), pose, atol=1e-12)
    logic.finish()


def test_register_with_a_callback_that_cancels(case):
    scene = case["scene"]
    calls = []

    def progress(info):
        calls.append((info.iteration, info.stage, info.loss))
        return len(calls) < 3

    logic = CorrRegLogicCore(scene)
    result = logic.register(case["ct"], case["xray"], None, method="intensity", progressCallback=progress,
                            options=OPTIONS, iterationsPerStep=2, **OFFSETS)
    assert result.cancelled and len(calls) == 3
    out = logic.currentRun.outputTransformNode  # created because none was given
    assert out is not None and out.GetScene() is scene
    np.testing.assert_allclose(A.poseArrayFromTransformNode(out), result.pose.numpy(), atol=1e-12)


def test_local_starts_run_and_report_how_many_agree(case):
    """The GUI's Local starts box: the start and N others are refined, and the result says how many
    of them ended at it and, where some ended elsewhere, how much worse the next basin explains the
    images (what flags a result the images do not decide on real X-rays)."""
    scene = case["scene"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    logic = CorrRegLogicCore(scene)
    result = logic.register(case["ct"], case["xray"], out, method="intensity", options=OPTIONS, localStarts=2, **OFFSETS)
    assert result.evidence["local_starts"] == 3
    assert 0.0 < result.evidence["agreement"] <= 1.0
    agreed = round(result.evidence["agreement"] * 3)
    summary = logic.currentRun.summary()
    assert f"{agreed} of 3 local starts ended here" in summary
    if "rank_margin" in result.evidence:  # another basin was reached: the summary says how it compared
        assert f"{100 * result.evidence['rank_margin']:.0f} % more of the images unexplained" in summary
    else:
        assert agreed == 3 and "next basin" not in summary
    assert out.GetMatrixTransformToParent() is not None and not np.allclose(A.poseArrayFromTransformNode(out), np.eye(4))


def test_refuses_local_starts_for_other_methods_and_bad_counts(case):
    _assert_refused(case, "with the Intensity method, not 'auto'", method="auto", localStarts=4)
    _assert_refused(case, "whole number", localStarts=-1)
    _assert_refused(case, "whole number", localStarts=2.5)


def test_the_polish_reaches_the_session_and_an_unknown_one_is_refused(case):
    """The GUI's Polish box: the named similarity reaches the options (this whole-body CT is not
    one bone, so the result says it was not polished); an unknown name is refused before anything
    changes."""
    logic = CorrRegLogicCore(case["scene"])
    result = logic.register(case["ct"], case["xray"], None, method="intensity", options=OPTIONS,
                            polish="bandpass_ncc", **OFFSETS)
    assert "no polish" in result.message and not any(h["stage"].startswith("polish") for h in result.history)
    _assert_refused(case, "unknown similarity 'sharpest'", polish="sharpest")


def test_preview_shows_a_pose_without_registering(case):
    scene, ct, xray = case["scene"], case["ct"], case["xray"]
    logic = CorrRegLogicCore(scene)
    volume = logic.cachedVolume(ct)
    pose = logic.initialPose(volume, case["camera"], "carm", sod=700.0, primaryAngle=4.0, secondaryAngle=-3.0)
    np.testing.assert_allclose(pose.numpy(), case["truePose"].numpy(), atol=1e-9)
    nodes = logic.preview(ct, xray, None, pose, case["camera"], sliceCompositeNode=case["composite"])
    np.testing.assert_allclose(A.poseArrayFromTransformNode(nodes["outputTransform"]), pose.numpy(), atol=1e-12)
    drr = slicer.util.arrayFromVolume(nodes["drr"])[0]
    assert _ncc(drr, slicer.util.arrayFromVolume(xray)[0]) > 0.8
    assert case["composite"].GetForegroundVolumeID() == nodes["drr"].GetID()
    # a second preview reuses the nodes
    count = scene.GetNumberOfNodes()
    logic.preview(ct, xray, nodes["outputTransform"], pose, case["camera"], drrNode=nodes["drr"])
    assert scene.GetNumberOfNodes() == count
    assert not logic.isRunning


# --------------------------------------------------------------------------------------------
# bad input: ValueError and the scene exactly as before


def _assert_refused(case, match, **kwargs):
    scene = case["scene"]
    before = _scene_state(scene)
    xray_geometry = A.ijkToRASArray(case["xray"])
    args = dict(ctNode=case["ct"], xrayNode=case["xray"], outputTransformNode=None, method="intensity", options=OPTIONS)
    args.update(kwargs)
    logic = CorrRegLogicCore(scene)
    with pytest.raises(ValueError, match=match):
        logic.start(**args)
    assert _scene_state(scene) == before
    np.testing.assert_array_equal(A.ijkToRASArray(case["xray"]), xray_geometry)
    assert not logic.isRunning


def test_refuses_a_3d_volume_as_xray(case):
    _assert_refused(case, r"single-slice \(2D\)", xrayNode=case["ct"])


def test_refuses_a_ct_without_bone(case):
    scene = case["scene"]
    soft = A.volumeNodeFromArray(scene, np.full((20, 20, 20), 40.0, np.float32), (5.0, 5.0, 5.0), (-50, -50, -50),
                                 name="soft tissue only")
    _assert_refused(case, "contains no bone", ctNode=soft)


def test_refuses_missing_camera_geometry(case):
    xray = case["xray"]
    xray.RemoveAttribute(A.GEOMETRY_ATTRIBUTE)
    _assert_refused(case, "camera geometry .* is missing: the source-to-detector distance")
    _assert_refused(case, "is missing: the source-to-detector distance", sdd=float("nan"))
    _assert_refused(case, "describes a 32 x 32 detector", camera={"sdd_mm": 1000, "pixel_spacing_mm": [1, 1], "size_px": [32, 32]})


def test_refuses_an_output_transform_in_use(case):
    scene, ct = case["scene"], case["ct"]
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "CT placement")
    ct.SetAndObserveTransformNodeID(parent.GetID())
    _assert_refused(case, "already in use: it is a parent transform of the CT", outputTransformNode=parent)
    other = A.volumeNodeFromArray(scene, np.zeros((2, 2, 2), np.float32), (1, 1, 1), name="other volume")
    busy = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "busy")
    other.SetAndObserveTransformNodeID(busy.GetID())
    _assert_refused(case, "already in use: it positions the volume 'other volume'", outputTransformNode=busy)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    _assert_refused(case, "must be a linear transform node", outputTransformNode=grid)


def test_refuses_a_network_method_without_a_model(case, tmp_path):
    _assert_refused(case, "model", method="network", modelPath=str(tmp_path))


def test_refuses_unknown_method_and_missing_model_path(case, tmp_path):
    _assert_refused(case, "unknown method", method="simplex")
    _assert_refused(case, "does not exist", modelPath=str(tmp_path / "nope"))


def test_refuses_when_torch_is_missing():
    """In a fresh interpreter where importing torch fails: a clear ValueError, scene unchanged."""
    code = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r})
import numpy as np, slicer
from CorrRegModuleLib import adapter as A
from CorrRegModuleLib.logic import CorrRegLogicCore
scene = slicer.vtkMRMLScene()
hu = np.full((20, 20, 20), -1000.0, np.float32); hu[5:15, 5:15, 5:15] = 1000.0
ct = A.volumeNodeFromArray(scene, hu, (5.0, 5.0, 5.0), name="CT")
xray = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "X-ray")
slicer.util.updateVolumeFromArray(xray, np.random.rand(1, 32, 32).astype(np.float32))
out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('torch is not installed (blocked by the test)')
sys.meta_path.insert(0, Block())
before = {{scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}}
try:
    CorrRegLogicCore(scene).start(ct, xray, out, method="intensity", sdd=1000.0)
except ValueError as e:
    assert "PyTorch" in str(e) and "torch" in str(e), e
    after = {{scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}}
    assert after == before
    assert 'torch' not in sys.modules
    print("refused:", e)
else:
    raise SystemExit("no error")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "refused: CorrReg needs the Python package(s) torch" in out.stdout, out.stderr


def test_module_self_test_routine(phantom):
    """What CorrRegTest runs inside Slicer (there with the default schedule and a finer phantom)."""
    scene = slicer.vtkMRMLScene()
    # Two levels of 6 iterations; not the 16 px level, whose 6 mm steps lower the loss before
    # they lower the error (depth), which 12 iterations cannot show.
    quick = replace(OPTIONS, levels=tuple(replace(lv, max_iterations=6) for lv in OPTIONS.levels[1:3]))
    report = selftest.runSelfTest(CorrRegLogicCore(scene), scene, size=32, options=quick, phantom=phantom,
                                  log=lambda *a: None)
    # Only the routine's mechanics here (the schedule is cut short); accuracy is tested above.
    assert report["mTRE"] < report["initial_mTRE"] and report["initial_mTRE"] > report["tolerance_mm"], report
    assert report["iterations"] <= 12 and report["result"].stage == "done"
    assert A.parentTransformID(report["case"]["xray"]) == report["transform"].GetID()


def test_camera_geometry_from_the_xray_file(tmp_path):
    """Fields the GUI fills from a DICOM X-ray's tags (file found through its storage node)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((np.random.default_rng(0).random((40, 50)) * 1000).astype(np.uint16))
    image.SetSpacing((0.25, 0.3))
    for tag, value in {"0008|0060": "XA", "0018|1110": "1020.5", "0018|1111": "710", "0018|1510": "15.5",
                       "0018|1511": "-4"}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "fluoro.dcm"))
    writer.Execute(image)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fluoro")
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image).astype(np.float32)[None])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "fluoro.dcm"))
    node.SetAndObserveStorageNodeID(storage.GetID())
    logic = CorrRegLogicCore(scene)
    geo = logic.cameraGeometryFromNode(node)
    assert geo["sdd"] == pytest.approx(1020.5) and geo["sod"] == pytest.approx(710.0)
    assert geo["primaryAngle"] == pytest.approx(15.5) and geo["secondaryAngle"] == pytest.approx(-4.0)
    assert geo["pixelSpacing"] == pytest.approx((0.25, 0.3))
    assert "0018,1110" in geo["sources"]["sdd"]
    camera = logic.cameraForNode(node)
    assert camera.sdd == pytest.approx(1020.5) and camera.size == (50, 40)
    # Explicit values (the GUI fields) win; the node attribute wins over the file.
    assert logic.cameraForNode(node, sdd=900.0).sdd == 900.0
    node.SetAttribute(A.GEOMETRY_ATTRIBUTE, '{"sdd_mm": 1111.0}')
    assert logic.cameraForNode(node).sdd == 1111.0
