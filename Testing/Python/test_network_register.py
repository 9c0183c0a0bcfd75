"""The learned methods (network, hybrid) with the bundled compact model, and model checks."""

import json
import shutil

import pytest
import torch

from CorrRegLib.cli import default_demo_method
from CorrRegLib.geometry import Camera
from CorrRegLib.metrics import mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import RegistrationSession, bundled_model_dir, check_model_camera, register
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
    # The network alone is a coarse guide, not a registration (it ends tens of mm off here);
    # the share of poses its gradient points right for is measured in test_train.
    assert torch.isfinite(network.pose).all() and not network.flagged
    stages = {h["stage"] for h in hybrid.history}
    assert "network" in stages and any(s.startswith("intensity") for s in stages)
    assert all(h["stage"] == "network" for h in network.history)


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
