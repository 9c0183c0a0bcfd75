"""The registration stages alone: masked matching, the plausible region and its bounded
coordinates, the grid search, batched refinement, bounded CMA-ES, verification."""

import math

import numpy as np
import pytest
import torch

from CorrRegLib.geometry import reference_ap_pose, transform_points
from CorrRegLib.metrics import mpd, mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases, perturb_pose
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession, register
from CorrRegLib.register.bounds import SearchSpace
from CorrRegLib.register.matching import masked_ncc_map
from CorrRegLib.register.refine import LevelRefiner
from CorrRegLib.register.search import CmaesSearch, GridSearch
from CorrRegLib.register.state import RunState
from CorrRegLib.simulate import simulate_xray

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(seed=0)


@pytest.fixture(scope="module")
def scene(phantom):
    """A 64 px paper-camera X-ray of the phantom at an AP truth, realistic degradations."""
    protocol = get_protocol("paper", detector_downsample=4)
    cam = protocol.camera
    iso = phantom.volume.bone_center_lps()
    truth = make_cases(protocol, iso, 1, seed=3)[0].true_pose
    xray = simulate_xray(phantom.volume, cam, truth, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=0).image
    return cam, iso, truth, xray


def session(phantom, scene, start, **opts):
    cam, iso, truth, xray = scene
    return RegistrationSession(phantom.volume, xray, cam, start, method="intensity",
                               options=RegistrationOptions(**opts), isocenter=iso)


# ---- matching ------------------------------------------------------------------------------------


def test_masked_ncc_map_equals_the_direct_sum():
    g = torch.Generator().manual_seed(0)
    canvas = torch.rand(2, 20, 24, generator=g)
    canvas_mask = (torch.rand(2, 20, 24, generator=g) > 0.2).float()
    xray = torch.rand(8, 10, generator=g)
    fov = (torch.rand(8, 10, generator=g) > 0.1).float()
    fast = masked_ncc_map(canvas, canvas_mask, xray, fov, min_overlap=0.0)
    for b in range(2):
        for pi in range(0, 13, 4):
            for pj in range(0, 15, 3):
                w = fov * canvas_mask[b, pi:pi + 8, pj:pj + 10]
                c = canvas[b, pi:pi + 8, pj:pj + 10]
                mx, mc = (w * xray).sum() / w.sum(), (w * c).sum() / w.sum()
                r = (w * (xray - mx) * (c - mc)).sum() / ((w * (xray - mx) ** 2).sum() * (w * (c - mc) ** 2).sum()).sqrt()
                assert abs(float(fast[b, pi, pj]) - float(r)) < 1e-5


def test_masked_ncc_map_finds_a_shifted_copy_and_refuses_thin_overlaps():
    g = torch.Generator().manual_seed(1)
    canvas = torch.rand(1, 40, 40, generator=g)
    xray = canvas[0, 7:7 + 16, 13:13 + 16].clone()
    ncc = masked_ncc_map(canvas, torch.ones_like(canvas), xray, None)
    k = int(ncc.flatten().argmax())
    assert divmod(k, ncc.shape[-1]) == (7, 13) and float(ncc.max()) > 0.999
    # a mask that keeps 3 pixels: every offset has too little overlap to compare
    thin = torch.zeros_like(canvas)
    thin[0, 0, :3] = 1
    assert bool((masked_ncc_map(canvas, thin, xray, None) == -1).all())


# ---- the plausible region -------------------------------------------------------------------------


def test_search_coordinates_round_trip_and_stay_plausible(phantom, scene):
    cam, iso, truth, _ = scene
    s = session(phantom, scene, truth)
    space = SearchSpace(truth, s.problem.bounds, 60.0)
    x = space.coords(truth[None])
    assert torch.allclose(space.pose(x), truth[None], atol=1e-9)
    rng = np.random.default_rng(0)
    xs = torch.as_tensor(rng.uniform(space.lower, space.upper, size=(200, 6)))
    assert bool(s.problem.bounds.contains(space.pose(xs)).all())
    # the bounds are the stated ones: depth within 30 % of the start, isocenter inside the detector
    uvd = s.problem.bounds.isocenter_uvd(space.pose(xs))
    d0 = float(transform_points(truth, iso.reshape(1, 3))[0, 2])
    assert float(uvd[:, 2].min()) >= 0.7 * d0 - 1e-6 and float(uvd[:, 2].max()) <= 1.3 * d0 + 1e-6
    assert float(uvd[:, 0].min()) >= 0 and float(uvd[:, 0].max()) <= cam.width


def test_pose_outside_the_region_is_never_kept(phantom, scene):
    cam, iso, truth, _ = scene
    s = session(phantom, scene, truth)
    state = RunState(truth, s.problem.bounds)
    state.stage_start("test")
    far = truth.clone()
    far[0, 3] += 400.0  # 400 mm sideways: the isocenter projects off the detector
    assert not bool(s.problem.bounds.contains(far[None])[0])
    state.record(0.0, far, "test")  # the best loss there is, and still refused
    assert torch.equal(state.best_pose, truth.double())


@pytest.mark.parametrize("image", ["noise", "inverted"])
def test_bounded_searches_never_return_a_pose_that_shows_no_anatomy(phantom, scene, image):
    """An X-ray that cannot be registered (noise, or reversed polarity): every method's result
    stays in front of the source with the isocenter on the detector, and is flagged."""
    cam, iso, truth, xray = scene
    bad = torch.rand(xray.shape, generator=torch.Generator().manual_seed(2)) if image == "noise" else 1.0 - xray
    start = perturb_pose(truth, iso, [10.0, -8.0, 5.0], [25.0, -20.0, 40.0])
    quick = RegistrationOptions(cmaes_generations=15, max_attempts=2)
    for method in ("cmaes", "auto"):
        res = register(phantom.volume, bad, cam, start, method=method, options=quick, isocenter=iso)
        uvd = RegistrationSession(phantom.volume, xray, cam, start, method="intensity").problem.bounds.isocenter_uvd(
            res.pose[None])[0]
        assert 0 < float(uvd[2]) < cam.sdd
        assert 0 <= float(uvd[0]) <= cam.width and 0 <= float(uvd[1]) <= cam.height
        assert res.flagged, (method, image, res.message)


# ---- stages alone ------------------------------------------------------------------------------------


def test_grid_search_finds_a_large_in_plane_offset(phantom, scene):
    """60 mm sideways, 40 mm up and 20 deg about the beam: out of any gradient's reach, and
    the grid's best candidate is within 15 mm."""
    cam, iso, truth, _ = scene
    start = perturb_pose(truth, iso, [0.0, 0.0, 20.0], [60.0, -40.0, 0.0])
    s = session(phantom, scene, start)
    state = RunState(start, s.problem.bounds)
    grid = GridSearch((-25.0, 0.0, 25.0), (1.0,), Level(32, 0, 0.0, "gradient_ncc"), 0.5, keep=4)
    for _ in grid.run(s.problem, state):
        pass
    assert len(state.candidates) == 4
    best = state.candidates[0][1]
    assert float(mtre(best, truth, phantom.landmarks)) < 15.0, float(mtre(best, truth, phantom.landmarks))
    assert float(mtre(start, truth, phantom.landmarks)) > 60.0


def test_batched_refinement_improves_every_pose(phantom, scene):
    cam, iso, truth, _ = scene
    # in-plane offsets and turns, which a 32 px level resolves (depth it barely sees)
    starts = torch.stack([perturb_pose(truth, iso, [2.0, -3.0, 4.0], [9.0, 6.0, 0.0]),
                          perturb_pose(truth, iso, [-3.0, 2.0, -4.0], [-8.0, 7.0, 0.0])])
    s = session(phantom, scene, truth)
    refiner = LevelRefiner(s.problem, starts, Level(32, 60, 3.0, "ncc"))
    first = None
    for losses in refiner.steps():
        first = losses.clone() if first is None else first
    assert bool((refiner.best_losses < first).all())
    for k in range(2):  # what a 32 px level sees: the projected error (depth needs finer levels)
        before = mpd(cam, starts[k], truth, phantom.landmarks)
        assert mpd(cam, refiner.best_poses[k], truth, phantom.landmarks) < 0.5 * before


def test_bounded_cmaes_stays_in_its_box(phantom, scene):
    cam, iso, truth, _ = scene
    start = perturb_pose(truth, iso, [15.0, -10.0, 10.0], [30.0, 20.0, 50.0])
    s = session(phantom, scene, start)
    state = RunState(start, s.problem.bounds)
    search = CmaesSearch((30.0, 30.0, 30.0, 200.0, 200.0, 400.0), 12, 8, Level(32, 0, 0.0), "ncc", seed=0)
    poses = []
    record = state.record
    state.record = lambda loss, pose, stage=None: (poses.append(pose.clone()), record(loss, pose, stage))
    for _ in search.run(s.problem, state):
        pass
    assert len(poses) == 8
    assert bool(s.problem.bounds.contains(torch.stack(poses)).all())  # huge sigmas, and still inside


def test_verification_passes_the_truth_and_refuses_a_wrong_pose(phantom, scene):
    cam, iso, truth, _ = scene
    s = RegistrationSession(phantom.volume, scene[3], cam, truth, method="auto", isocenter=iso)
    good = s.verification(truth)
    wrong = s.verification(perturb_pose(truth, iso, [0.0, 0.0, 0.0], [0.0, 33.0, 0.0]))  # a vertebra off
    assert good["verified"] and not wrong["verified"], (good, wrong)
    assert good["score"] > wrong["score"]


def test_a_cancel_during_an_iteration_stops_before_its_backward_pass(phantom, scene):
    """The Slicer worker cancels from the GUI thread while a step runs: the session stops inside
    that iteration (no backward pass, no further iteration) and keeps the best pose."""
    cam, iso, truth, xray = scene
    start = perturb_pose(truth, iso, [3.0, -2.0, 2.0], [8.0, 6.0, 10.0])
    s = session(phantom, scene, start)
    renders = []
    render = s.problem.render

    def counting_render(*args, **kwargs):
        renders.append(1)
        if len(renders) == 5:
            s.cancel()  # as if the GUI thread asked now, during the fifth forward pass
        return render(*args, **kwargs)

    s.problem.render = counting_render
    st = s.step(50)
    res = s.result()
    # the fifth forward pass finishes and counts; its backward pass and a sixth iteration never run
    assert st.done and res.cancelled and st.iteration == 5
    assert all(h["stage"] == "intensity level 1/4" for h in res.history)
    assert torch.isfinite(res.pose).all()
    assert res.loss == min(h["loss"] for h in res.history)  # the best pose of the iterations that ran
