"""MRML <-> CorrRegLib adapter against a real MRML scene (slicer-core wheel, no mocks).

Round trips must be exact, and LPS/RAS must be handled at the boundary only: the checks compare
against Slicer's own matrices (IJKToRAS, transform-to-world, the ITK transform storage node).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CorrReg"))

from CorrRegModuleLib import adapter as A  # noqa: E402
from CorrRegLib.geometry import (  # noqa: E402
    Camera,
    c_arm_pose,
    euler_to_rotation,
    invert_pose,
    project_points,
)
from CorrRegLib.volume import Volume  # noqa: E402

F = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _oblique():
    return euler_to_rotation(torch.tensor([12.0, -25.0, 40.0], dtype=torch.float64)).numpy()


def _vtk_point(matrix_getter, point):
    m = slicer.util.vtkMatrixFromArray(np.eye(4))
    matrix_getter(m)
    return np.array(m.MultiplyPoint([*point, 1.0])[:3])


# --------------------------------------------------------------------------------------------
# CT


def test_ct_node_volume_round_trip_is_exact_with_oblique_direction(scene):
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1000, 2000, (7, 9, 11)).astype(np.float32)
    direction = _oblique()
    node = A.volumeNodeFromArray(scene, hu, (0.6, 0.9, 1.7), (14.5, -33.0, 120.25), direction, "CT")
    vol = A.volumeFromNode(node)
    assert isinstance(vol, Volume)
    assert tuple(vol.data.shape) == hu.shape  # (K, J, I) on both sides
    assert vol.spacing == (0.6, 0.9, 1.7)
    assert vol.origin == (14.5, -33.0, 120.25)
    np.testing.assert_array_equal(np.array(vol.direction), direction)
    # Slicer's IJKToRAS is exactly diag(-1,-1,1) @ lps_from_index.
    np.testing.assert_array_equal(A.ijkToRASArray(node), F @ vol.lps_from_index().numpy())
    # ... and back to a node: geometry bit-identical, HU within float32 rounding.
    again = A.volumeNodeFromVolume(scene, vol, "CT again")
    np.testing.assert_array_equal(A.ijkToRASArray(again), A.ijkToRASArray(node))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(again), hu, atol=2e-3)
    # The CT node itself was only read.
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), hu)


def test_a_known_voxel_lands_at_the_same_ras_point(scene):
    """One dense voxel: its LPS centroid from CorrRegLib, flipped to RAS, is where Slicer puts it."""
    hu = np.full((6, 8, 10), -1000.0, dtype=np.float32)
    i, j, k = 7, 2, 4
    hu[k, j, i] = 1500.0  # arrays are [k, j, i]
    node = A.volumeNodeFromArray(scene, hu, (1.1, 0.8, 2.5), (-40.0, 25.0, 5.0), _oblique(), "one voxel")
    vol = A.volumeFromNode(node)
    lps = vol.bone_center_lps().numpy()
    ras_slicer = _vtk_point(node.GetIJKToRASMatrix, (i, j, k))
    np.testing.assert_allclose(lps * [-1, -1, 1], ras_slicer, atol=1e-9)
    # and Slicer's RASToIJK takes it back to the voxel index
    np.testing.assert_allclose(_vtk_point(node.GetRASToIJKMatrix, ras_slicer), (i, j, k), atol=1e-9)


def test_identity_direction_node_maps_lps_axes_to_ras_flips(scene):
    node = A.volumeNodeFromArray(scene, np.zeros((3, 3, 3), np.float32), (1.0, 1.0, 1.0), (10.0, 20.0, 30.0), None)
    # LPS origin (10, 20, 30) is RAS (-10, -20, 30); +i is patient left = RAS -x.
    assert node.GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))
    np.testing.assert_array_equal(A.ijkToRASArray(node)[:3, :3], np.diag([-1.0, -1.0, 1.0]))


def test_ct_checks(scene):
    flat = A.volumeNodeFromArray(scene, np.zeros((1, 5, 5), np.float32), (1, 1, 1), name="flat")
    with pytest.raises(ValueError, match="single slice"):
        A.checkCTNode(flat)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no voxels"):
        A.checkCTNode(empty)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
    with pytest.raises(ValueError, match="scalar volume"):
        A.checkCTNode(label)


# --------------------------------------------------------------------------------------------
# poses and transform nodes


def test_transform_node_round_trip_and_direction(scene):
    pose = c_arm_pose([5.0, -12.0, 30.0], 700.0, 25.0, -15.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    A.setTransformNodeFromPose(node, pose)
    np.testing.assert_allclose(A.poseArrayFromTransformNode(node), pose.numpy(), atol=1e-12)
    assert A.poseFromTransformNode(node).dtype == torch.float64
    # Matrix to parent = ct_from_camera between RAS frames: a camera point c, written in
    # camera-local RAS (F c), maps to the RAS of the CT point inverse(T) c.
    m = slicer.util.arrayFromTransformMatrix(node)
    c = np.array([30.0, -20.0, 500.0, 1.0])
    ct_lps = invert_pose(pose).numpy() @ c
    np.testing.assert_allclose(m @ (F @ c), F @ ct_lps, atol=1e-9)
    # The X-ray source (camera origin) sits at sod from the isocenter.
    src_ras = m @ np.array([0, 0, 0, 1.0])
    iso_ras = np.array([-5.0, 12.0, 30.0])
    assert np.linalg.norm(src_ras[:3] - iso_ras) == pytest.approx(700.0)


def test_transform_direction_matches_itk_files_through_slicer_storage(scene, tmp_path):
    """Saved by Slicer as an ITK file, the node is camera_from_ct in LPS (CorrRegLib.io reads it),
    and an ITK file written by CorrRegLib.io loads into the same node matrix."""
    from CorrRegLib.io import read_pose_itk, write_pose_itk

    pose = c_arm_pose([1.0, 2.0, 3.0], 650.0, -30.0, 12.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    A.setTransformNodeFromPose(node, pose)
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "pose.h5"))
    assert storage.WriteData(node)
    np.testing.assert_allclose(read_pose_itk(tmp_path / "pose.h5").numpy(), pose.numpy(), atol=1e-10)

    write_pose_itk(pose, tmp_path / "pose.tfm")
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(tmp_path / "pose.tfm"))
    assert reader.ReadData(loaded)
    np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(loaded), A.transformMatrixFromPose(pose), atol=1e-9)


def test_non_rigid_transform_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "scaled")
    slicer.util.updateTransformMatrixFromArray(node, np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="not rigid"):
        A.poseArrayFromTransformNode(node)


# --------------------------------------------------------------------------------------------
# X-ray


def test_xray_node_geometry_and_pixels(scene):
    camera = Camera(1011.7, (0.8, 0.9), (40, 30), principal_point=(18.0, 16.5))
    image = np.random.default_rng(2).random((30, 40)).astype(np.float32)
    node = A.xrayNodeFromImage(scene, image, camera, "X-ray", sod=700.0, primaryAngle=10.0)
    assert node.GetImageData().GetDimensions() == (40, 30, 1)
    assert node.GetSpacing() == pytest.approx((0.8, 0.9, 1.0))
    xi = A.xrayImageFromNode(node)
    np.testing.assert_array_equal(xi.image.numpy(), image)  # [row, col]
    assert xi.pixelSpacing == (0.8, 0.9) and xi.size == (40, 30)
    # pixel (col i, row j) centre sits at camera ((i + .5 - cx) dx, (j + .5 - cy) dy, sdd), in local RAS
    i, j = 5, 21
    expected_cam = np.array([(i + 0.5 - 18.0) * 0.8, (j + 0.5 - 16.5) * 0.9, 1011.7])
    np.testing.assert_allclose(_vtk_point(node.GetIJKToRASMatrix, (i, j, 0)), expected_cam * [-1, -1, 1], atol=1e-9)
    geo = A.geometryFromNodeAttribute(node)
    assert geo["sdd_mm"] == 1011.7 and geo["sod_mm"] == 700.0 and geo["primary_angle_deg"] == 10.0
    assert Camera.from_dict(geo) == camera
    cam2 = A.cameraFromXrayNode(node, sdd=1011.7, principalPoint=(18.0, 16.5))
    assert cam2 == camera


def test_a_ct_point_projects_onto_the_right_xray_pixel_in_slicer_world(scene):
    """End to end through Slicer's transforms: CorrRegLib's projection of an LPS point equals the
    pixel where the ray from the X-ray source through that point meets the placed X-ray node."""
    camera = Camera(1000.0, (1.2, 1.1), (64, 48), principal_point=(30.0, 25.0))
    pose = c_arm_pose([10.0, -5.0, 40.0], 680.0, 18.0, -9.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    A.setTransformNodeFromPose(transform, pose)
    xray = A.xrayNodeFromImage(scene, np.zeros((48, 64), np.float32), camera, transformNode=transform)
    pts_lps = torch.tensor([[10.0, -5.0, 40.0], [40.0, 10.0, 20.0], [-25.0, 30.0, 80.0]], dtype=torch.float64)
    uv = project_points(camera, pose, pts_lps).numpy()
    to_world = slicer.util.vtkMatrixFromArray(np.eye(4))
    transform.GetMatrixTransformToWorld(to_world)
    world_to_local = np.linalg.inv(slicer.util.arrayFromVTKMatrix(to_world))
    ras_to_ijk = np.linalg.inv(A.ijkToRASArray(xray))
    for p, (u, v) in zip(pts_lps.numpy(), uv):
        local = world_to_local @ np.array([-p[0], -p[1], p[2], 1.0])  # Slicer world RAS -> camera-local RAS
        on_detector = local[:3] * (camera.sdd / local[2])  # along the ray from the source (local origin)
        ijk = ras_to_ijk @ np.array([*on_detector, 1.0])
        np.testing.assert_allclose(ijk[:3], (u - 0.5, v - 0.5, 0.0), atol=1e-8)


def test_place_xray_moves_geometry_only(scene):
    camera = Camera(900.0, (0.5, 0.5), (20, 10))
    image = np.arange(200, dtype=np.float32).reshape(10, 20)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded X-ray")
    slicer.util.updateVolumeFromArray(node, image[None])
    node.SetSpacing(0.5, 0.5, 1.0)
    image_mtime = node.GetImageData().GetMTime()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    A.placeXrayNode(node, camera, transform)
    assert A.parentTransformID(node) == transform.GetID()
    np.testing.assert_array_equal(A.ijkToRASArray(node), A.detectorIJKToRAS(camera))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node)[0], image)
    assert node.GetImageData().GetMTime() == image_mtime
    with pytest.raises(ValueError, match="camera is 30 x 10"):
        A.placeXrayNode(node, Camera(900.0, (0.5, 0.5), (30, 10)), transform)


def test_xray_checks(scene):
    vol = A.volumeNodeFromArray(scene, np.zeros((4, 5, 6), np.float32), (1, 1, 1), name="a CT")
    with pytest.raises(ValueError, match=r"single-slice \(2D\).*6 x 5 x 4"):
        A.checkXrayNode(vol)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    arr = np.zeros((1, 4, 5, 3), np.uint8)
    arr[..., 0] = 30
    arr[..., 1] = 60
    arr[..., 2] = 90
    slicer.util.updateVolumeFromArray(rgb, arr)
    np.testing.assert_allclose(A.xrayArrayFromNode(rgb), np.full((4, 5), 60.0))
    with pytest.raises(ValueError, match="no X-ray"):
        A.checkXrayNode(None)
