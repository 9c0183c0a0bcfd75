"""Biplane in the module's Logic (real MRML scene, slicer-core wheel): two calibrated X-ray nodes,
one pose from both, the second X-ray placed by its calibration with its own DRR, and the same
pose as CorrRegLib's register() reaches from the same start."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CorrReg"))

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegModuleLib.xrayimage import OtherView  # noqa: E402
from CorrRegLib.geometry import c_arm_pose, invert_pose  # noqa: E402
from CorrRegLib.metrics import mtre  # noqa: E402
from CorrRegLib.phantom import small_phantom  # noqa: E402
from CorrRegLib.preprocess import prepare_image  # noqa: E402
from CorrRegLib.protocols import get_protocol, perturb_pose  # noqa: E402
from CorrRegLib.register import View, register  # noqa: E402
from CorrRegLib.simulate import simulate_xray  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_mayacam(path, camera, camera_from_world):
    """A calibration as XMALab / Autoscoper write it: OpenCV's K (pixel centres at integers) and
    the world-to-camera R, t."""
    k = camera.intrinsics().numpy().copy()
    k[0, 2] -= 0.5
    k[1, 2] -= 0.5
    r, t = camera_from_world[:3, :3].numpy(), camera_from_world[:3, 3].numpy()
    rows = lambda m: "\n".join(",".join(repr(float(x)) for x in row) for row in m)
    path.write_text(f"image size\n{camera.width},{camera.height}\n\ncamera matrix\n{rows(k)}\n\nrotation\n{rows(r)}"
                    "\n\ntranslation\n" + "\n".join(repr(float(x)) for x in t) + "\n")
    return str(path)


@pytest.fixture
def rig(tmp_path):
    """Two cameras 70 deg apart looking at the phantom (the world: the CT's frame at the
    identity), their X-ray nodes and MayaCam files, the truth a small move of the patient."""
    ph = small_phantom(seed=0)
    cam = get_protocol("paper", detector_downsample=4).camera
    iso = ph.volume.bone_center_lps()
    cfw = [c_arm_pose(iso, 700.0, 180.0, 0.0), c_arm_pose(iso, 700.0, 250.0, 0.0)]
    truth = perturb_pose(torch.eye(4, dtype=torch.float64), iso, [3.0, -2.0, 4.0], [2.0, -3.0, 1.0])
    scene = slicer.vtkMRMLScene()
    ct = A.volumeNodeFromArray(scene, ph.hu, ph.volume.spacing, ph.volume.origin, ph.volume.direction, "CT")
    nodes, cals = [], []
    for k, c in enumerate(cfw):
        image = simulate_xray(ph.volume, cam, c @ truth, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=k).image
        nodes.append(A.xrayNodeFromImage(scene, image, cam, f"view {k + 1}"))
        cals.append(_write_mayacam(tmp_path / f"cam{k + 1:02d}.txt", cam, c))
    return dict(ph=ph, cam=cam, iso=iso, cfw=cfw, truth=truth, scene=scene, ct=ct, xrays=nodes, cals=cals)


def test_two_calibrated_views_register_as_the_library_does(rig):
    scene, (x1, x2), cfw, truth = rig["scene"], rig["xrays"], rig["cfw"], rig["truth"]
    start = perturb_pose(truth, rig["iso"], [2.0, -3.0, 2.0], [6.0, -5.0, 25.0])  # world_from_ct; mostly depth
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    pixels = np.array(slicer.util.arrayFromVolume(x2), copy=True)
    logic = CorrRegLogicCore(scene)
    result = logic.register(rig["ct"], x1, out, method="intensity", calibration=rig["cals"][0],
                            otherViews=[OtherView(x2, rig["cals"][1])], initialPose=(cfw[0] @ start).numpy())
    run = logic.currentRun
    # one world pose from both views, near the truth, unflagged; each view's pose is it seen there
    assert float(mtre(result.pose, truth, rig["ph"].landmarks)) < 1.0 and not result.flagged, result.message
    for c, vp in zip(cfw, result.view_poses):
        torch.testing.assert_close(vp, c @ result.pose)
    # the same registration through the library (images made ready as the command line does), on
    # the same voxels and calibrations
    volume = logic.ctData(rig["ct"]).toVolume()
    cals = [logic.calibrationForNode(x, c) for x, c in zip((x1, x2), rig["cals"])]
    views = []
    for x, c in zip((x1, x2), cals):
        image, mask, _, _ = prepare_image(A.xrayArrayFromNode(x))
        views.append(View(image, c.camera, c.camera_from_world, None if mask is None else torch.from_numpy(mask)))
    same = register(volume, initial_pose=invert_pose(cals[0].camera_from_world) @ cfw[0] @ start, method="intensity",
                    views=views)
    torch.testing.assert_close(result.pose, same.pose, atol=1e-9, rtol=0)
    # the output transform is the first camera's pose (as with one view)
    np.testing.assert_allclose(A.poseArrayFromTransformNode(out), (cfw[0] @ result.pose).numpy(), atol=1e-9)
    # the second X-ray sits on its own detector plane, where its calibration puts it relative to the CT
    assert run.nodes["otherXrays"] == [x2]
    view = run.nodes["viewTransforms"][0]
    assert A.parentTransformID(x2) == view.GetID() and A.parentTransformID(view) == out.GetID()
    ct_from_camera2 = invert_pose(cfw[1] @ result.pose).numpy()
    expected = A.RAS_FROM_LPS @ ct_from_camera2 @ A.RAS_FROM_LPS @ A.detectorIJKToRAS(rig["cam"])
    np.testing.assert_allclose(logic.imagePlaneInWorld(x2), expected, atol=1e-6)
    # its DRR beside it shows the CT as that X-ray does
    drr2 = run.nodes["otherDRRs"][0]
    assert A.parentTransformID(drr2) == view.GetID()
    np.testing.assert_array_equal(A.ijkToRASArray(drr2), A.ijkToRASArray(x2))
    a, b = slicer.util.arrayFromVolume(drr2)[0], pixels[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(x2), pixels)  # pixels untouched
    assert "X-ray 'view 1': bone bright" in run.xrayNote and "X-ray 'view 2': bone bright" in run.xrayNote
    assert len(run.fieldOfViewMasks) == 2
    # a second run reuses the view's transform and DRR instead of adding nodes
    before = scene.GetNumberOfNodes()
    logic.register(rig["ct"], x1, out, method="intensity", calibration=rig["cals"][0],
                   otherViews=[OtherView(x2, rig["cals"][1])], initialPose=A.poseArrayFromTransformNode(out))
    assert scene.GetNumberOfNodes() == before


def test_several_views_are_checked_before_the_scene_changes(rig, tmp_path):
    scene, (x1, x2) = rig["scene"], rig["xrays"]
    logic = CorrRegLogicCore(scene)
    nopose = tmp_path / "intrinsics_only.json"
    nopose.write_text('{"intrinsics_px": [[%r, 0, 32], [0, %r, 32], [0, 0, 1]], "size_px": [64, 64]}'
                      % (rig["cam"].intrinsics()[0, 0].item(), rig["cam"].intrinsics()[1, 1].item()))
    other = [OtherView(x2, rig["cals"][1])]
    before = scene.GetNumberOfNodes()
    cases = [
        (dict(calibration=None, otherViews=other), "give calibration= for the first X-ray"),
        (dict(calibration=rig["cals"][0], sdd=1000.0, otherViews=other), "give calibration= for the first X-ray"),
        (dict(calibration=str(nopose), otherViews=other), "has no camera pose"),
        (dict(calibration=rig["cals"][0], otherViews=[OtherView(x2, str(nopose))]), "has no camera pose"),
        (dict(calibration=rig["cals"][0], otherViews=[OtherView(x1, rig["cals"][1])]), "given twice"),
        (dict(calibration=rig["cals"][0], otherViews=[OtherView(x2, None)]), "needs its calibration file"),
        (dict(calibration=rig["cals"][0], otherViews=[(x2, rig["cals"][1])]), "OtherView"),
        (dict(calibration=rig["cals"][0], otherViews=other, method="network"), "runs on one X-ray"),
        (dict(calibration=rig["cals"][0], otherViews=[OtherView(x2, rig["cals"][1], polarity="up")]), "polarity"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("method", "intensity")
        with pytest.raises(ValueError, match=message):
            logic.start(rig["ct"], x1, initialPoseMode="ap", **kwargs)
    assert scene.GetNumberOfNodes() == before and logic.currentRun is None


def test_the_preview_shows_a_start_in_both_views(rig):
    """Nudging a start in Slicer: the second view's DRR follows too, without registering."""
    scene, (x1, x2), cfw, truth = rig["scene"], rig["xrays"], rig["cfw"], rig["truth"]
    logic = CorrRegLogicCore(scene)
    camera = logic.cameraForNode(x1, calibration=rig["cals"][0])
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    nodes = logic.preview(rig["ct"], x1, out, (cfw[0] @ truth).numpy(), camera, calibration=rig["cals"][0],
                          otherViews=[OtherView(x2, rig["cals"][1])])
    drr2 = nodes["otherDRRs"][0]
    assert A.parentTransformID(x2) == nodes["viewTransforms"][0].GetID()
    at_truth = np.corrcoef(slicer.util.arrayFromVolume(drr2)[0].ravel(), slicer.util.arrayFromVolume(x2)[0].ravel())[0, 1]
    along = torch.eye(4, dtype=torch.float64)
    along[:3, 3] = cfw[0][:3, :3].T @ torch.tensor([0.0, 0.0, 40.0], dtype=torch.float64)  # view 1's depth
    moved = along @ truth
    logic.preview(rig["ct"], x1, out, (cfw[0] @ moved).numpy(), camera, calibration=rig["cals"][0],
                  otherViews=[OtherView(x2, rig["cals"][1])])

    def match(drr, xray):
        return np.corrcoef(slicer.util.arrayFromVolume(drr)[0].ravel(), slicer.util.arrayFromVolume(xray)[0].ravel())[0, 1]

    # 40 mm in depth: view 1 hardly changes, view 2 sees it
    assert at_truth > 0.8 and match(nodes["drr"], x1) > 0.8 and match(drr2, x2) < at_truth - 0.1, \
        (at_truth, match(nodes["drr"], x1), match(drr2, x2))
    assert logic.currentRun is None


def test_in_the_background_both_views_get_their_final_drr(rig):
    """The GUI's way (worker thread, poll()): each view's DRR node ends at the final pose's
    full-resolution DRR, and the run counts as finished only once both arrived."""
    scene, (x1, x2), cfw, truth = rig["scene"], rig["xrays"], rig["cfw"], rig["truth"]
    start = perturb_pose(truth, rig["iso"], [2.0, -3.0, 2.0], [6.0, -5.0, 25.0])
    logic = CorrRegLogicCore(scene)
    result = logic.register(rig["ct"], x1, scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"), method="intensity",
                            calibration=rig["cals"][0], otherViews=[OtherView(x2, rig["cals"][1])],
                            initialPose=(cfw[0] @ start).numpy(), background=True)
    run = logic.currentRun
    assert run.finished and run._finalDRRsShown == 2
    from CorrRegModuleLib.rendering import DRRRenderer

    volume = logic.ctData(rig["ct"]).toVolume()
    for drr, c in zip((run.drrNode, run.nodes["otherDRRs"][0]), cfw):
        expected = DRRRenderer(volume, rig["cam"]).render((c @ result.pose).numpy(), full=True)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(drr)[0], expected, rtol=1e-4, atol=1e-4)
