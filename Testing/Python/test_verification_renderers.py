"""Verification transfers across renderers: successes pass and wrong poses are flagged on X-rays from
our simulator and from an independent renderer written here (its own ray sampling, its own HU
mapping, its own noise), so nothing in the verdict depends on which renderer made the X-ray."""

import numpy as np
import pytest
import torch

from CorrRegLib.geometry import Camera, invert_pose
from CorrRegLib.metrics import mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases, perturb_pose
from CorrRegLib.register import RegistrationSession
from CorrRegLib.simulate import simulate_xray
from CorrRegLib.volume import Volume, attenuation_to_hu

pytestmark = pytest.mark.usefixtures("one_thread")


def independent_xray(volume: Volume, camera: Camera, camera_from_ct: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A radiograph that shares only the geometry with CorrReg's projector: nearest-voxel samples
    every 0.5 mm along each ray (numpy), a bilinear HU mapping (water 0.019 / mm, bone at half the
    slope of soft tissue, as tissue-specific calibrations have), Poisson noise at 5000 photons and a
    -log read-out. (H, W) float32, bone bright."""
    hu = attenuation_to_hu(volume.data).double().numpy()
    mu = np.where(hu <= 0, 0.019 * (1 + hu / 1000), 0.019 * (1 + 0.5 * hu / 1000)).clip(min=0)
    ct_from_camera = invert_pose(camera_from_ct.double()).numpy()
    index_from_lps = volume.index_from_lps().numpy()
    corners = volume.corners_lps().double().numpy()
    depth = (np.c_[corners, np.ones(len(corners))] @ camera_from_ct.double().numpy().T)[:, 2]
    t = np.arange(depth.min() - 1, depth.max() + 1, 0.5)  # depths (mm along the principal axis) to sample
    rays = camera.pixel_rays(torch.float64).numpy() / camera.sdd  # (H, W, 3), z = 1
    step = 0.5 * np.linalg.norm(rays, axis=-1)  # path length per sample (mm)
    pts = rays[:, :, None, :] * t[None, None, :, None]  # camera frame
    pts = pts @ ct_from_camera[:3, :3].T + ct_from_camera[:3, 3]
    ijk = np.rint(pts @ index_from_lps[:3, :3].T + index_from_lps[:3, 3]).astype(int)
    shape = mu.shape[::-1]  # (I, J, K)
    inside = np.all((ijk >= 0) & (ijk < shape), axis=-1)
    ijk = np.where(inside[..., None], ijk, 0)
    samples = np.where(inside, mu[ijk[..., 2], ijk[..., 1], ijk[..., 0]], 0.0)
    line = samples.sum(-1) * step
    photons = np.random.default_rng(seed).poisson(5000 * np.exp(-line)).clip(min=1)
    return torch.from_numpy(np.log(5000 / photons)).float()


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(seed=0)


@pytest.fixture(scope="module")
def case(phantom):
    protocol = get_protocol("paper", detector_downsample=4)  # 64 px
    iso = phantom.volume.bone_center_lps()
    return protocol.camera, iso, make_cases(protocol, iso, 1, seed=5)[0]


def test_the_independent_renderer_agrees_with_ours_at_the_same_pose(phantom, case):
    cam, _, c = case
    ours = simulate_xray(phantom.volume, cam, c.true_pose, dose=None, blur_mm=0.0, heel=0.0, scatter=0.0).image
    theirs = independent_xray(phantom.volume, cam, c.true_pose)
    r = float(np.corrcoef(ours.flatten().numpy(), theirs.flatten().numpy())[0, 1])
    assert 0.9 < r < 0.999  # the same anatomy, not the same image


@pytest.mark.parametrize("renderer", ["corrreg", "independent"])
def test_verification_passes_a_success_and_flags_wrong_poses_on_every_renderer(phantom, case, renderer):
    cam, iso, c = case
    if renderer == "corrreg":
        xray = simulate_xray(phantom.volume, cam, c.true_pose, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=1).image
    else:
        xray = independent_xray(phantom.volume, cam, c.true_pose, seed=1)
    start = perturb_pose(c.true_pose, iso, [6.0, -5.0, 4.0], [12.0, -10.0, 30.0])
    s = RegistrationSession(phantom.volume, xray, cam, start, method="auto", isocenter=iso)
    res = s.run()
    error = float(mtre(res.pose, c.true_pose, phantom.landmarks))
    assert error < 2.0 and not res.flagged, (error, res.message, res.evidence)
    for rot, move in (([0.0, 0.0, 0.0], [0.0, 33.0, 0.0]),    # a vertebra off
                      ([20.0, 0.0, 0.0], [0.0, 0.0, 0.0]),    # turned out of plane
                      ([0.0, 0.0, 0.0], [15.0, 0.0, 0.0])):   # beside the spine
        wrong = s.verification(perturb_pose(c.true_pose, iso, rot, move))
        assert not wrong["verified"], (rot, move, wrong)
