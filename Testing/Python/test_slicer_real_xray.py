"""The module's Logic on X-rays as they come (real MRML scene, slicer-core wheel): bone dark, an
intensifier's disc around the image, a user's mask drawn as a label map, the camera from a
calibration file. Each is applied in the worker; the X-ray node's pixels stay as they were."""

from __future__ import annotations

import sys
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
from CorrRegLib.geometry import Camera, c_arm_pose, project_points  # noqa: E402
from CorrRegLib.phantom import make_spine_phantom  # noqa: E402
from CorrRegLib.simulate import simulate_xray  # noqa: E402
from slicer_cases import OFFSETS, SHORT_OPTIONS as OPTIONS  # noqa: E402

SIZE = 96
PIXEL_MM = 4.2  # 403 mm across the detector: air beside the body inside the disc, as around a limb
DISC = (49.3, 46.8, 40.5)  # cx, cy, r in pixels: the intensifier's field, cut by no border


@pytest.fixture(scope="module")
def phantom():
    torch.manual_seed(0)
    return make_spine_phantom(spacing_mm=2.5)


def _grid():
    v, u = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    return u, v


def _inside_disc() -> np.ndarray:
    u, v = _grid()
    return np.hypot(u - DISC[0], v - DISC[1]) <= DISC[2]


@pytest.fixture
def case(phantom):
    """The phantom with its X-ray as an intensifier gives it: raw transmission (bone dark, air
    bright; quantum noise), air beside the body, black beyond the disc, and two bright labels
    burned into the black surround."""
    scene = slicer.vtkMRMLScene()
    camera = Camera(selftest.PAPER_SDD, (PIXEL_MM, PIXEL_MM), (SIZE, SIZE))  # wider than the body
    truth = c_arm_pose(phantom.volume.bone_center_lps(), selftest.PAPER_SOD, 4.0, -3.0).double()
    log = simulate_xray(phantom.volume, camera, truth, dose=3e4, seed=0, normalize=False).image.numpy()
    raw = 4000.0 * np.exp(-log.astype(np.float64))
    raw[~_inside_disc()] = 0.0
    raw[2:6, 2:20] = raw[88:93, 70:94] = 4095.0
    ct = A.volumeNodeFromArray(scene, phantom.hu, phantom.volume.spacing, phantom.volume.origin,
                               phantom.volume.direction, "phantom CT")
    dark = A.xrayNodeFromImage(scene, torch.from_numpy(raw.astype(np.float32)), camera, "intensifier X-ray",
                               sod=selftest.PAPER_SOD)
    return {"scene": scene, "ct": ct, "dark": dark, "camera": camera, "truePose": truth, "phantom": phantom}


def _mtre(pose, case) -> float:
    return selftest.mTRE(torch.as_tensor(pose), case["truePose"], case["phantom"].landmarks)


def _register(case, **kwargs):
    scene = case["scene"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    logic = CorrRegLogicCore(scene)
    result = logic.register(case["ct"], kwargs.pop("xray", case["dark"]), out, method="intensity", options=OPTIONS,
                            **OFFSETS, **kwargs)
    return logic.currentRun, result


def test_a_bone_dark_intensifier_image_is_inverted_masked_and_registers(case):
    pixels = np.array(slicer.util.arrayFromVolume(case["dark"]), copy=True)
    run, result = _register(case)
    assert "bone dark, inverted (log) (detected" in run.xrayNote, run.xrayNote
    assert "field of view detected (circle" in run.xrayNote, run.xrayNote
    assert run.xrayNote in run.summary()
    # the mask used lies inside the disc (the labels are outside it) and covers most of it
    used = run.fieldOfViewMask
    assert used is not None and not (used & ~_inside_disc()).any()
    assert used[_inside_disc()].mean() > 0.8
    assert run.xrayInfo["polarity"]["decision"] == "dark"
    # the DRR is shown in the X-ray's polarity, so the overlay looks like the X-ray
    assert run.drrNode.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeInvertedGrey"
    err = _mtre(result.pose, case)
    assert err < 2.0 and not result.flagged, (err, result.message)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["dark"]), pixels)  # the node is untouched


def test_the_same_image_taken_as_it_is_stored_does_not_register(case):
    """What the preparation is for: taken bone-bright with every pixel, the dark image misleads."""
    run, result = _register(case, polarity="bright", fieldOfView="none")
    assert "bone bright, used as stored (as asked); every pixel used" in run.xrayNote
    assert run.fieldOfViewMask is None
    assert run.drrNode.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert _mtre(result.pose, case) > 5.0 or result.flagged


def test_invert_xray_forces_the_dark_polarity(case):
    run, result = _register(case, invertXray=True)
    assert run.xrayInfo["polarity"]["mode"] == "dark" and "(as asked)" in run.xrayNote
    assert _mtre(result.pose, case) < 2.0
    logic = CorrRegLogicCore(case["scene"])
    with pytest.raises(ValueError, match="give one of them"):
        logic.start(case["ct"], case["dark"], invertXray=True, polarity="bright", **OFFSETS)
    from CorrRegLib.preprocess import POLARITY_MODES
    from CorrRegModuleLib.xrayimage import POLARITIES

    assert POLARITIES == POLARITY_MODES  # the Logic's copy of the library's modes
    with pytest.raises(ValueError, match="unknown X-ray polarity"):
        logic.start(case["ct"], case["dark"], polarity="negative", **OFFSETS)


def _label_map(scene, mask: np.ndarray, name="field of view"):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, mask.astype(np.uint8)[None])
    return node


def test_a_users_mask_drawn_as_a_label_map_is_the_field_of_view(case):
    u, v = _grid()
    drawn = np.hypot(u - DISC[0], v - DISC[1]) <= DISC[2] - 3  # drawn a little inside the disc
    node = _label_map(case["scene"], drawn)
    run, result = _register(case, fieldOfView=node)
    np.testing.assert_array_equal(run.fieldOfViewMask, drawn)
    assert f"the given mask, {100 * drawn.mean():.0f} % of the image used" in run.xrayNote
    assert _mtre(result.pose, case) < 2.0 and not result.flagged


def test_bad_masks_are_refused_before_the_scene_changes(case):
    scene = case["scene"]
    logic = CorrRegLogicCore(scene)
    wrong = _label_map(scene, np.ones((SIZE, SIZE + 4), bool), "wrong size")
    empty = _label_map(scene, np.zeros((SIZE, SIZE), bool), "empty")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    before = scene.GetNumberOfNodes()
    for mask, message in ((wrong, r"100 x 96 x 1 pixels but the X-ray 'intensifier X-ray' is 96 x 96"),
                          (empty, "all zero"), (segmentation, "export its segment to a label map"),
                          ("circle", "unknown field of view"), (np.ones((4, 4)), "field-of-view mask is")):
        with pytest.raises(ValueError, match=message):
            logic.start(case["ct"], case["dark"], method="intensity", fieldOfView=mask, **OFFSETS)
    assert scene.GetNumberOfNodes() == before and logic.currentRun is None


def _write_mayacam(path, camera, size):
    """The camera as XMALab / Autoscoper write it: OpenCV's K (pixel centres at integers), R, t."""
    k = camera.intrinsics().numpy().copy()
    k[0, 2] -= 0.5
    k[1, 2] -= 0.5
    rows = lambda m: "\n".join(",".join(repr(float(x)) for x in row) for row in m)
    path.write_text(f"image size\n{size[0]},{size[1]}\n\ncamera matrix\n{rows(k)}\n\nrotation\n{rows(np.eye(3))}\n\n"
                    "translation\n0.0\n0.0\n0.0\n")
    return path


def test_the_camera_from_a_calibration_file(case, tmp_path):
    logic = CorrRegLogicCore(case["scene"])
    truth = case["camera"]
    path = _write_mayacam(tmp_path / "cam01.txt", truth, (SIZE, SIZE))
    camera = logic.cameraForNode(case["dark"], calibration=path)
    points = torch.tensor([[10.0, -20.0, 700.0], [-35.5, 12.0, 650.0], [0.0, 0.0, 800.0]], dtype=torch.float64)
    identity = torch.eye(4, dtype=torch.float64)
    np.testing.assert_allclose(project_points(camera, identity, points).numpy(),
                               project_points(truth, identity, points).numpy(), atol=1e-6)
    # the intrinsic matrix fixes the projection; the pixel size is the node's (4.2 mm here) unless
    # given, and the source-to-detector distance is fx times it
    assert camera.sdd == pytest.approx(truth.sdd) and tuple(camera.pixel_spacing) == pytest.approx(truth.pixel_spacing)
    nominal = logic.cameraForNode(case["dark"], calibration=path, pixelSpacing=(1.0, 1.0))
    assert nominal.sdd == pytest.approx(truth.sdd / PIXEL_MM)
    np.testing.assert_allclose(project_points(nominal, identity, points).numpy(),
                               project_points(truth, identity, points).numpy(), atol=1e-6)
    run, result = _register(case, calibration=path)  # the physical pixel size does not matter to the pose
    assert _mtre(result.pose, case) < 2.0
    other = _write_mayacam(tmp_path / "other.txt", truth, (SIZE + 4, SIZE))
    with pytest.raises(ValueError, match="calibration of the X-ray 'intensifier X-ray' cannot be used"):
        logic.cameraForNode(case["dark"], calibration=other)
    with pytest.raises(ValueError, match="not found|does not exist"):
        logic.cameraForNode(case["dark"], calibration=tmp_path / "missing.txt")
