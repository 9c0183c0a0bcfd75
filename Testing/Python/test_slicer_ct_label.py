"""One bone of a full CT in the module's Logic (real MRML scene, slicer-core wheel): a label map
or a segmentation of the CT keeps the bone, registered as ``corrreg register --ct-label`` does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CorrReg"))

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegModuleLib.ctlabel import ctLabelMask  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegLib.phantom import small_phantom  # noqa: E402
from CorrRegLib.protocols import get_protocol, make_cases, perturb_pose  # noqa: E402
from CorrRegLib.register import register  # noqa: E402
from CorrRegLib.simulate import simulate_xray  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
L3 = 3


@pytest.fixture(scope="module")
def ph():
    return small_phantom(seed=0)


@pytest.fixture
def case(ph):
    """The phantom's CT and label map as nodes, and a 64 px X-ray of the whole body."""
    scene = slicer.vtkMRMLScene()
    ct = A.volumeNodeFromArray(scene, ph.hu, ph.volume.spacing, ph.volume.origin, ph.volume.direction, "CT")
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labels, ph.labels.numpy().astype(np.int16))
    A.setVolumeNodeLPSGeometry(labels, ph.volume.origin, ph.volume.direction, ph.volume.spacing)
    protocol = get_protocol("paper", detector_downsample=4)
    truth = make_cases(protocol, ph.volume.bone_center_lps(), 1, seed=2)[0].true_pose
    image = simulate_xray(ph.volume, protocol.camera, truth, dose=1e4, blur_mm=0.6, scatter=0.1, heel=0.1, seed=0).image
    xray = A.xrayNodeFromImage(scene, image, protocol.camera, "X-ray")
    return dict(scene=scene, ct=ct, labels=labels, xray=xray, camera=protocol.camera, truth=truth, image=image)


def test_a_label_map_keeps_the_bones_and_registers_as_the_library_does(ph, case):
    logic = CorrRegLogicCore(case["scene"])
    start = perturb_pose(case["truth"], ph.volume.bone_center_lps(), [2.0, -2.0, 2.0], [4.0, -3.0, 10.0])
    out = case["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode")
    result = logic.register(case["ct"], case["xray"], out, method="intensity", ctLabel=case["labels"],
                            ctLabelValues=[1, 2, 3, 4, 5], initialPose=start.numpy(), fieldOfView="none",
                            polarity="bright")
    bones = logic.ctData(case["ct"]).toVolume().keep_only((ph.labels >= 1) & (ph.labels <= 5))
    same = register(bones, A.xrayArrayFromNode(case["xray"]), case["camera"], start, method="intensity")
    torch.testing.assert_close(result.pose, same.pose, atol=1e-9, rtol=0)
    err = float((result.pose[:3, 3] - case["truth"][:3, 3]).norm())
    assert err < 2.0 or result.flagged, (err, result.message)
    # the CT node itself is untouched: only the registration's copy is restricted
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["ct"]), ph.hu.numpy())


def test_a_segmentation_keeps_its_visible_segments(ph, case):
    scene = case["scene"]
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bones")
    seg.CreateDefaultDisplayNodes()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    assert segmentations.ImportLabelmapToSegmentationNode(case["labels"], seg)
    display = seg.GetDisplayNode()
    segmentation = seg.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    values = {sid: segmentation.GetSegment(sid).GetLabelValue() for sid in ids}
    for sid in ids:
        display.SetSegmentVisibility(sid, values[sid] == L3)
    before = scene.GetNumberOfNodes()
    keep = ctLabelMask(case["ct"], seg)
    assert scene.GetNumberOfNodes() == before  # the export's helper node is gone again
    np.testing.assert_array_equal(keep, (ph.labels == L3).numpy())
    with pytest.raises(ValueError, match="show only the bone's segment"):
        ctLabelMask(case["ct"], seg, [L3])


def test_bad_labels_are_refused_before_the_scene_changes(ph, case):
    scene = case["scene"]
    logic = CorrRegLogicCore(scene)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    other = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "elsewhere")
    slicer.util.updateVolumeFromArray(other, ph.labels.numpy().astype(np.int16))
    other.SetAndObserveTransformNodeID(moved.GetID())
    before = scene.GetNumberOfNodes()
    for label, values, message in ((case["labels"], [99], "holds no voxel with the labels"),
                                   (other, None, "sit under different transforms"),
                                   (case["xray"], None, "must be a 3D label map")):
        with pytest.raises(ValueError, match=message):
            logic.start(case["ct"], case["xray"], method="intensity", ctLabel=label, ctLabelValues=values)
    assert scene.GetNumberOfNodes() == before and logic.currentRun is None


def test_the_preview_shows_only_the_kept_bone(ph, case):
    logic = CorrRegLogicCore(case["scene"])
    out = case["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode")
    whole = logic.preview(case["ct"], case["xray"], out, case["truth"].numpy(), case["camera"])
    full = np.array(slicer.util.arrayFromVolume(whole["drr"]), copy=True)
    one = logic.preview(case["ct"], case["xray"], out, case["truth"].numpy(), case["camera"], ctLabel=case["labels"],
                        ctLabelValues=[L3])
    bone = slicer.util.arrayFromVolume(one["drr"])
    shown = bone > 0.02 * bone.max()
    assert 0 < shown.sum() < 0.3 * (full > 0.02 * full.max()).sum()  # one vertebra's shadow, not the body's
