"""Conventions of DESIGN.md pinned by tests: camera model, poses, SE(3) maps, frames."""

import math

import pytest
import torch

from CorrRegLib import geometry as g


def random_pose(seed: int, scale: float = 100.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rv = torch.randn(3, generator=gen, dtype=torch.float64)
    t = torch.randn(3, generator=gen, dtype=torch.float64) * scale
    return g.pose_from_rotvec_translation(rv, t)


def test_intrinsics_match_design_formula():
    cam = g.Camera(1000.0, (0.5, 0.25), (200, 100), (90.0, 40.0))
    k = cam.intrinsics()
    assert torch.allclose(k, torch.tensor([[2000.0, 0, 90], [0, 4000.0, 40], [0, 0, 1]], dtype=torch.float64))
    assert torch.allclose(cam.intrinsics_inv() @ k, torch.eye(3, dtype=torch.float64))
    # default principal point is the image centre
    assert g.Camera(1000.0, (1, 1), (64, 32)).principal_point == (32.0, 16.0)


def test_pixel_rays_hit_their_own_pixel_centres():
    cam = g.Camera(900.0, (0.7, 0.9), (13, 7), (6.1, 3.3))
    rays = cam.pixel_rays(torch.float64)  # (H, W, 3)
    uv = g.project_points(cam, torch.eye(4, dtype=torch.float64), rays.reshape(-1, 3) * 0.37)
    v, u = torch.meshgrid(torch.arange(7.0) + 0.5, torch.arange(13.0) + 0.5, indexing="ij")
    assert torch.allclose(uv.reshape(7, 13, 2), torch.stack([u, v], -1).double(), atol=1e-9)


def test_downsampled_camera_keeps_field_of_view():
    cam = g.Camera(1011.7, (0.798, 0.798), (256, 256))
    c4 = cam.downsample(4)
    assert c4.size == (64, 64)
    assert c4.pixel_spacing[0] == pytest.approx(0.798 * 4)
    assert c4.width * c4.pixel_spacing[0] == pytest.approx(cam.width * cam.pixel_spacing[0])
    # the same 3D point lands at the same physical detector position
    p = torch.tensor([[12.0, -30.0, 650.0]], dtype=torch.float64)
    uv, uv4 = g.project_points(cam, torch.eye(4, dtype=torch.float64), p), g.project_points(c4, torch.eye(4, dtype=torch.float64), p)
    assert torch.allclose(uv / 4, uv4)


@pytest.mark.parametrize("bad", [dict(sdd=0.0), dict(pixel_spacing=(0.0, 1.0)), dict(size=(0, 5))])
def test_camera_rejects_bad_geometry(bad):
    kw = dict(sdd=1000.0, pixel_spacing=(1.0, 1.0), size=(4, 4)) | bad
    with pytest.raises(ValueError):
        g.Camera(**kw)


def test_camera_json_round_trip():
    cam = g.Camera(1011.7, (0.798, 0.8), (256, 200), (127.5, 99.0))
    assert g.Camera.from_dict(cam.to_dict()) == cam
    with pytest.raises(ValueError, match="sdd_mm"):
        g.Camera.from_dict({"size_px": [2, 2]})


def test_se3_exp_log_round_trip_and_small_angles():
    for seed in range(5):
        xi = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(g.se3_log(g.se3_exp(xi)), xi, atol=1e-10)
    tiny = torch.tensor([1e-9, -2e-9, 3e-9, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(g.se3_log(g.se3_exp(tiny)), tiny, atol=1e-12)
    # pure translation twist is a pure translation
    assert torch.allclose(g.se3_exp(torch.tensor([0, 0, 0, 1.0, 2, 3], dtype=torch.float64))[:3, 3],
                          torch.tensor([1.0, 2, 3], dtype=torch.float64))


def test_se3_maps_are_twice_differentiable():
    xi = (torch.randn(6, dtype=torch.float64) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: g.se3_exp(x), (xi,))
    assert torch.autograd.gradgradcheck(lambda x: g.se3_exp(x), (xi,))
    pose = g.se3_exp(torch.tensor([0.2, -0.1, 0.3, 5.0, 1.0, -2.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: g.se3_log(g.se3_exp(x) @ pose), (xi,))


def test_euler_convention_is_extrinsic_xyz():
    angles = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    r = g.euler_to_rotation(angles)
    rx = g.euler_to_rotation(torch.tensor([10.0, 0, 0], dtype=torch.float64))
    ry = g.euler_to_rotation(torch.tensor([0, -20.0, 0], dtype=torch.float64))
    rz = g.euler_to_rotation(torch.tensor([0, 0, 30.0], dtype=torch.float64))
    assert torch.allclose(r, rz @ ry @ rx)
    assert torch.allclose(g.rotation_to_euler(r), angles)
    # +90 deg about x maps y to z (right-handed)
    r90 = g.euler_to_rotation(torch.tensor([90.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(r90 @ torch.tensor([0, 1.0, 0], dtype=torch.float64), torch.tensor([0, 0, 1.0], dtype=torch.float64), atol=1e-12)


def test_invert_pose_and_rigidity_check():
    p = random_pose(3)
    assert torch.allclose(g.invert_pose(p) @ p, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert g.check_rigid(p) is p
    scaled = p.clone()
    scaled[:3, :3] *= 1.1
    with pytest.raises(ValueError, match="not rigid"):
        g.check_rigid(scaled)
    mirrored = p.clone()
    mirrored[:3, 0] *= -1
    with pytest.raises(ValueError, match="not rigid"):
        g.check_rigid(mirrored)
    nan = p.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        g.check_rigid(nan)
    with pytest.raises(ValueError, match="4x4"):
        g.check_rigid(torch.eye(3))


def test_reference_ap_view_axes():
    iso = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    pose = g.reference_ap_pose(iso, 700.0)
    assert torch.allclose(g.transform_points(pose, iso[None])[0], torch.tensor([0, 0, 700.0], dtype=torch.float64))
    # patient left (+x LPS) goes to +x camera (image right), superior (+z) goes up (-y), posterior goes deeper
    d = lambda v: (g.transform_points(pose, (iso + torch.tensor(v, dtype=torch.float64))[None]) - g.transform_points(pose, iso[None]))[0]
    assert torch.allclose(d([1.0, 0, 0]), torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(d([0, 0, 1.0]), torch.tensor([0, -1.0, 0], dtype=torch.float64))
    assert torch.allclose(d([0, 1.0, 0]), torch.tensor([0, 0, 1.0], dtype=torch.float64))
    assert torch.allclose(torch.linalg.det(pose[:3, :3]), torch.tensor(1.0, dtype=torch.float64))


def test_c_arm_angles_follow_dicom():
    iso = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
    # DESIGN's AP reference (beam anterior -> posterior) is DICOM primary angle 180
    assert torch.allclose(g.c_arm_pose(iso, 700.0, 180.0), g.reference_ap_pose(iso, 700.0), atol=1e-12)
    # primary 0: detector in front of the chest, so the beam (camera z) points anterior (-y LPS)
    assert torch.allclose(g.c_arm_pose(iso, 700.0, 0.0)[2, :3], torch.tensor([0, -1.0, 0], dtype=torch.float64), atol=1e-12)
    # LAO 90: detector at the patient's left, the beam travels right to left (+x LPS)
    lao90 = g.c_arm_pose(iso, 700.0, primary_deg=90.0)
    assert torch.allclose(lao90[2, :3], torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(g.transform_points(lao90, iso[None])[0], torch.tensor([0, 0, 700.0], dtype=torch.float64), atol=1e-9)
    # cranial tilt: the detector moves towards the head, the beam gains a superior component
    cran30 = g.c_arm_pose(iso, 700.0, primary_deg=180.0, secondary_deg=30.0)
    assert math.isclose(float(cran30[2, 2]), 0.5, abs_tol=1e-9)
    g.check_rigid(cran30)
    g.check_rigid(g.c_arm_pose(iso, 700.0, 0.0, 90.0))


def test_lps_ras_conversion_is_an_involution():
    p = random_pose(7)
    assert torch.allclose(g.ras_from_lps(g.ras_from_lps(p)), p)
    pts = torch.randn(5, 3, dtype=torch.float64)
    # converting the transform and the points commutes with applying it
    lhs = g.lps_to_ras_points(g.transform_points(p, pts))
    rhs = g.transform_points(g.ras_from_lps(p), g.lps_to_ras_points(pts))
    assert torch.allclose(lhs, rhs)
    assert torch.equal(g.ras_to_lps_points(g.lps_to_ras_points(pts)), pts)


def test_geodesic_distance():
    a = random_pose(1)
    rot = g.make_pose(g.euler_to_rotation(torch.tensor([0, 0, 25.0], dtype=torch.float64)), torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
    ang, trans = g.geodesic_distance(a, a @ rot)
    assert float(ang) == pytest.approx(25.0)
    assert float(trans) == pytest.approx(5.0)
