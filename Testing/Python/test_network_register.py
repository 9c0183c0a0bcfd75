"""The learned methods (network, hybrid) with the bundled compact model, and model checks."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from CorrRegLib.cli import default_demo_method
from CorrRegLib.geometry import Camera
from CorrRegLib.metrics import mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import (
    RegistrationOptions, RegistrationSession, bundled_model_dir, check_model_camera, register,
)
from CorrRegLib.simulate import simulate_xray

MODEL = bundled_model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="this installation has no bundled model")


@pytest.fixture(scope="module")
def paper_case():
    """Paper-protocol case 1 (seed 0, 128 px): 164 mm off; intensity alone ends 64.5 mm off."""
    ph = small_phantom(seed=0)
    protocol = get_protocol("paper", detector_downsample=2)
    case = make_cases(protocol, ph.volume.bone_center_lps(), 2, seed=0)[1]
    xray = simulate_xray(ph.volume, protocol.camera, case.true_pose, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=1).image
    return ph, protocol.camera, case, xray


def test_hybrid_recovers_what_intensity_misses(paper_case):
    ph, cam, case, xray = paper_case
    err = lambda pose: float(mtre(pose, case.true_pose, ph.landmarks))
    network = register(ph.volume, xray, cam, case.initial_pose, method="network")
    hybrid = register(ph.volume, xray, cam, case.initial_pose, method="hybrid")
    plain = register(ph.volume, xray, cam, case.initial_pose, method="intensity")
    assert err(case.initial_pose) > 100.0
    assert err(plain.pose) > 10.0  # intensity alone is lost this far out (64.5 mm)
    assert err(hybrid.pose) < 2.0  # the network stage brings it into refinement's basin
    # The network alone is a coarse guide, not a registration (it ends tens of mm off here), and
    # verification says so; the share of poses its gradient points right for is measured in test_train.
    assert torch.isfinite(network.pose).all() and network.flagged and err(network.pose) > 10.0
    assert not hybrid.flagged
    stages = {h["stage"] for h in hybrid.history}
    assert "network" in stages and any(s.startswith("intensity") for s in stages)
    assert not any(":" in s for s in stages)  # verified at once: no second attempt
    assert all(h["stage"] == "network" for h in network.history)


def test_hybrid_falls_back_to_the_global_search_when_its_result_is_unverified(paper_case):
    ph, cam, case, xray = paper_case
    err = lambda pose: float(mtre(pose, case.true_pose, ph.landmarks))
    # One network step leaves hybrid where intensity alone ends: a vertebra off (64.5 mm).
    weak = RegistrationOptions(network_iterations=1)
    unchecked = register(ph.volume, xray, cam, case.initial_pose, method="hybrid",
                         options=replace(weak, fallback_below=None))
    assert err(unchecked.pose) > 10.0
    checked = register(ph.volume, xray, cam, case.initial_pose, method="hybrid", options=weak)
    assert err(checked.pose) < 2.0 and not checked.flagged, checked.message
    assert "verified after 2 attempts" in checked.message and "global search" in checked.message
    assert any(h["stage"].startswith("global search: grid search") for h in checked.history)
    assert checked.evidence["verified"] and checked.evidence["consistency"] > 0.9
    # A bar no pose can reach: every attempt is unverified, the most consistent is kept and flagged.
    strict = register(ph.volume, xray, cam, case.initial_pose, method="hybrid",
                      options=replace(weak, fallback_below=1e6, max_attempts=2))
    assert strict.flagged and "unverified result" in strict.message and err(strict.pose) < 2.0


def test_cancel_during_the_fallback_keeps_the_better_attempt(paper_case):
    ph, cam, case, xray = paper_case
    session = RegistrationSession(ph.volume, xray, cam, case.initial_pose, method="hybrid",
                                  options=RegistrationOptions(network_iterations=1))
    while not session.done and not session.state().stage.startswith("global search"):
        session.step()
    assert not session.done
    assert session.state().progress < 0.9  # the bar restarts its remaining share for the second attempt
    first = session.pipeline.done[0][0].score  # the network attempt's consistency: unverified
    session.step(2)  # a few batches of the grid search
    session.cancel()
    res = session.result() if session.done else (session.step(), session.result())[1]
    assert res.cancelled and torch.isfinite(res.pose).all()
    assert res.evidence["consistency"] >= first  # the better of the two attempts is kept


def test_the_demo_uses_the_full_method_when_a_model_ships():
    assert default_demo_method() == "hybrid"


def test_model_for_another_camera_is_refused(tmp_path, paper_case):
    ph, cam, case, xray = paper_case
    other = tmp_path / "model"
    shutil.copytree(MODEL, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["camera"]["sdd_mm"] = 1300.0
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained for another camera"):
        RegistrationSession(ph.volume, xray, cam, case.initial_pose, method="hybrid", model_dir=other)
    # the same field of view at another resolution is fine: the network runs at its own size
    check_model_camera(Camera.from_dict(json.loads((MODEL / "config.json").read_text())["camera"]), cam)


def test_corrupt_bundle_is_refused_with_a_clear_message(tmp_path, paper_case):
    ph, cam, case, xray = paper_case
    bad = tmp_path / "model"
    shutil.copytree(MODEL, bad)
    (bad / "model.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(ValueError, match="network model"):
        RegistrationSession(ph.volume, xray, cam, case.initial_pose, method="network", model_dir=bad)
