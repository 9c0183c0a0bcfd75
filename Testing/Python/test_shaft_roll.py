"""The roll search about a long bone's axis (register/roll.py): it finds a roll the start is off
by, keeps what refinement found when there is nothing to gain, and skips a CT that is not one
long bone."""

import math

import pytest
import roma
import torch

from CorrRegLib.geometry import invert_pose
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import Level, RegistrationSession
from CorrRegLib.register.roll import ShaftRollSearch, long_axis, rolled
from CorrRegLib.register.state import RunState
from CorrRegLib.simulate import simulate_xray

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spine():
    """The phantom's vertebrae alone (a long, bone-only CT) and a 64 px X-ray of the whole phantom."""
    ph = small_phantom(seed=0)
    bones = ph.volume.keep_only((ph.labels >= 1) & (ph.labels <= 5))
    protocol = get_protocol("paper", detector_downsample=4)
    truth = make_cases(protocol, ph.volume.bone_center_lps(), 1, seed=2)[0].true_pose
    xray = simulate_xray(ph.volume, protocol.camera, truth, dose=1e4, blur_mm=0.6, scatter=0.1, heel=0.1, seed=0)
    return ph, bones, protocol.camera, truth, xray


def roll_about(axis: torch.Tensor, pose: torch.Tensor, truth: torch.Tensor) -> float:
    """The rotation of ``pose`` from ``truth`` about ``axis`` (CT frame), degrees."""
    rel = invert_pose(truth) @ pose
    return float(roma.rotmat_to_rotvec(rel[:3, :3]) @ axis) * 180.0 / math.pi


def run_stage(problem, start, level):
    state = RunState(start, problem.bounds)
    list(ShaftRollSearch(level, 16.0, 2.0).run(problem, state))
    return state


def test_the_long_axis_is_found_only_for_a_long_bone(spine):
    ph, bones, *_ = spine
    axis, centroid = long_axis(bones)
    assert abs(float(axis[2])) > 0.99  # the spine runs along the CT's z
    assert long_axis(ph.volume.keep_only(ph.labels == 3)) is None  # one vertebra is not long


def test_a_start_rolled_about_the_spine_is_turned_back(spine):
    ph, bones, cam, truth, xray = spine
    axis, centroid = long_axis(bones)
    start = rolled(truth, axis, centroid, torch.tensor([10.0]))[0]
    problem = RegistrationSession(bones, xray.image, cam, start, method="intensity").problem
    assert problem.bone_only
    state = run_stage(problem, start, Level(64, 20, 1.0))
    assert abs(roll_about(axis, start, truth)) > 9.9
    assert abs(roll_about(axis, state.best_pose, truth)) < 1.5, roll_about(axis, state.best_pose, truth)


def test_nothing_runs_for_a_body_ct(spine):
    ph, _, cam, truth, xray = spine
    problem = RegistrationSession(ph.volume, xray.image, cam, truth, method="intensity").problem
    state = run_stage(problem, truth, Level(64, 20, 1.0))
    assert state.iteration == 0 and torch.equal(state.best_pose, truth.double())
