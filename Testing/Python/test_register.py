"""Registration on the phantom: accuracy, the session API, guards and bad input."""

import math

import pytest
import torch

from CorrRegLib.geometry import reference_ap_pose
from CorrRegLib.metrics import mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession, register
from CorrRegLib.simulate import simulate_xray


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(seed=0)


@pytest.fixture(scope="module")
def setup(phantom):
    """The moderate protocol on a 128 x 128 detector (1.6 mm pixels, the paper's field of view):
    depth is seen only through magnification, and coarser pixels cannot resolve it to 1 mm."""
    protocol = get_protocol("moderate", detector_downsample=2)
    iso = phantom.volume.bone_center_lps()
    return protocol, iso


def xray_for(phantom, camera, pose, seed):
    return simulate_xray(phantom.volume, camera, pose, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=seed).image


def test_intensity_recovers_moderate_offsets(phantom, setup):
    """DESIGN's moderate protocol: sub-millimetre mTRE in at least 9 of 10 seeded cases."""
    protocol, iso = setup
    cam = protocol.camera
    errors, initial = [], []
    for case in make_cases(protocol, iso, 10, seed=2024):
        res = register(phantom.volume, xray_for(phantom, cam, case.true_pose, case.index), cam, case.initial_pose,
                       method="intensity")
        initial.append(float(mtre(case.initial_pose, case.true_pose, phantom.landmarks)))
        errors.append(float(mtre(res.pose, case.true_pose, phantom.landmarks)))
        assert not res.flagged, res.message
    assert sum(e < 1.0 for e in errors) >= 9, list(zip(initial, errors))
    assert sum(initial) / len(initial) > 5.0  # the cases were not trivially close to begin with


def test_cmaes_recovers_a_paper_case_that_gradient_refinement_misses(phantom):
    protocol = get_protocol("paper", detector_downsample=4)
    iso = phantom.volume.bone_center_lps()
    case = make_cases(protocol, iso, PAPER_CASE + 1, seed=0)[PAPER_CASE]
    xray = simulate_xray(phantom.volume, protocol.camera, case.true_pose, seed=case.index).image
    initial = float(mtre(case.initial_pose, case.true_pose, phantom.landmarks))
    plain = register(phantom.volume, xray, protocol.camera, case.initial_pose, method="intensity")
    searched = register(phantom.volume, xray, protocol.camera, case.initial_pose, method="cmaes")
    plain_err = float(mtre(plain.pose, case.true_pose, phantom.landmarks))
    searched_err = float(mtre(searched.pose, case.true_pose, phantom.landmarks))
    assert initial > 20.0
    assert plain_err > 10.0, plain_err
    assert searched_err < 2.0, searched_err
    assert any(h["stage"] == "cmaes" for h in searched.history)


# The paper-protocol case (seed 0) used above, found by running both methods over the first
# twenty cases at 64 px: it starts 62.5 mm off; intensity ends 34.6 mm off, CMA-ES +
# refinement 0.9 mm, with 1 or 2 threads alike. (Intensity misses 2 of those 20 cases.)
PAPER_CASE = 12


def test_session_steps_cancels_and_keeps_the_best_pose(phantom, setup):
    protocol, iso = setup
    cam = protocol.camera
    case = make_cases(protocol, iso, 1, seed=7)[0]
    session = RegistrationSession(phantom.volume, xray_for(phantom, cam, case.true_pose, 0), cam, case.initial_pose,
                                  method="intensity")
    first = session.step(3)
    assert first.iteration == 3 and not first.done
    assert 0 < first.progress < 1
    second = session.step(5)
    assert second.iteration == 8
    assert second.loss <= first.loss
    session.cancel()
    final = session.step(1)
    assert final.done and final.stage == "cancelled"
    res = session.result()
    assert res.cancelled and res.iterations == 8
    assert torch.isfinite(res.pose).all()
    assert torch.allclose(res.pose, second.pose)
    # the kept pose is the lowest-loss pose seen so far: no worse than the start (iteration 1
    # evaluates the initial pose itself)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 8 and res.loss == min(losses) <= losses[0]
    # stepping a finished session changes nothing
    assert session.step(10).iteration == 8


def test_start_at_truth_stays_at_truth(phantom, setup):
    protocol, iso = setup
    cam = protocol.camera
    truth = make_cases(protocol, iso, 1, seed=3)[0].true_pose
    res = register(phantom.volume, xray_for(phantom, cam, truth, 1), cam, truth, method="intensity")
    # the same sub-millimetre criterion as the accuracy test: what is left is depth noise
    assert float(mtre(res.pose, truth, phantom.landmarks)) < 1.0


def test_divergence_returns_the_best_pose_flagged(phantom, setup):
    protocol, iso = setup
    cam = protocol.camera
    case = make_cases(protocol, iso, 1, seed=11)[0]
    wild = RegistrationOptions(levels=(Level(32, 50, 5000.0, "ncc"),), patience=50)
    res = register(phantom.volume, xray_for(phantom, cam, case.true_pose, 2), cam, case.initial_pose, method="intensity",
                   options=wild)
    assert res.flagged and "field of view" in res.message
    assert torch.isfinite(res.pose).all() and math.isfinite(res.loss)
    # the best pose is the best seen, not the last one: no worse than the start
    assert float(mtre(res.pose, case.true_pose, phantom.landmarks)) <= float(mtre(case.initial_pose, case.true_pose, phantom.landmarks)) + 1e-6


def test_collimated_xray_registers_with_its_mask(phantom, setup):
    protocol, iso = setup
    cam = protocol.camera
    case = make_cases(protocol, iso, 1, seed=5)[0]
    sim = simulate_xray(phantom.volume, cam, case.true_pose, collimation=(0.1, 0.05, 0.9, 0.95), seed=3)
    assert not bool(sim.mask.all())
    res = register(phantom.volume, sim.image, cam, case.initial_pose, mask=sim.mask, method="intensity")
    assert float(mtre(res.pose, case.true_pose, phantom.landmarks)) < 1.5


# ---- bad input: a clear ValueError naming the problem ---------------------------------------


@pytest.fixture(scope="module")
def good(phantom, setup):
    protocol, iso = setup
    cam = protocol.camera
    pose = reference_ap_pose(iso, 700.0)
    return phantom.volume, xray_for(phantom, cam, pose, 0), cam, pose


def test_mismatched_geometry(good):
    vol, xray, cam, pose = good
    with pytest.raises(ValueError, match="camera geometry says"):
        RegistrationSession(vol, xray[:, :50], cam, pose)


@pytest.mark.parametrize("kind", ["blank", "saturated", "nan", "3d"])
def test_bad_xrays(good, kind):
    vol, xray, cam, pose = good
    bad = {
        "blank": torch.zeros_like(xray),
        "saturated": torch.where(torch.rand_like(xray) < 0.95, torch.ones_like(xray), xray),
        "nan": torch.where(torch.rand_like(xray) < 0.01, torch.full_like(xray, float("nan")), xray),
        "3d": torch.stack([xray, xray]),
    }[kind]
    msg = {"blank": "blank", "saturated": "saturated", "nan": "NaN", "3d": "2D image"}[kind]
    with pytest.raises(ValueError, match=msg):
        RegistrationSession(vol, bad, cam, pose)


def test_pose_behind_the_source_or_outside_the_field_of_view(good, setup):
    vol, xray, cam, pose = good
    _, iso = setup
    behind = pose.clone()
    behind[2, 3] -= 1400.0  # isocenter at z = -700 mm
    with pytest.raises(ValueError, match="behind the X-ray source"):
        RegistrationSession(vol, xray, cam, behind)
    aside = pose.clone()
    aside[0, 3] += 400.0  # 400 mm sideways: the CT projects off the detector
    with pytest.raises(ValueError, match="field of view"):
        RegistrationSession(vol, xray, cam, aside)
    sheared = pose.clone()
    sheared[0, 1] += 0.3
    with pytest.raises(ValueError, match="not rigid"):
        RegistrationSession(vol, xray, cam, sheared)


def test_unknown_method_and_missing_model(good):
    vol, xray, cam, pose = good
    with pytest.raises(ValueError, match="unknown method"):
        RegistrationSession(vol, xray, cam, pose, method="magic")


def test_empty_mask_rejected(good):
    vol, xray, cam, pose = good
    with pytest.raises(ValueError, match="mask"):
        RegistrationSession(vol, xray, cam, pose, mask=torch.zeros_like(xray, dtype=torch.bool))
