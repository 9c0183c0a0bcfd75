"""Similarity windows (Problem.window): a small bone in a large image is rendered and compared only
where it can project, and every similarity gives the same score and pose gradient as on the whole
canvas."""

import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose
from CorrRegLib.projector import Projector
from CorrRegLib.protocols import perturb_pose
from CorrRegLib.register import Level, RegistrationSession, View
from CorrRegLib.register.problem import WINDOW_ALIGN_PX, window_camera
from CorrRegLib.register.refine import pose_from_params
from CorrRegLib.similarity import COUNTS_UNSEEN, get_similarity
from CorrRegLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")

SIMILARITIES = ["ncc", "patch_ncc", "gradient_ncc", "gradient_ncc+ngf", "ngf", "bandpass_ncc",
                "multiscale_gradient_ncc", "gradient_ncc+ngf+bandpass_ncc"]


def bone(n: int = 24, length: int = 40) -> Volume:
    """An L-shaped bone (1 mm voxels) in air: a shaft along k with a foot along i, so that it has
    edges in every direction and nothing is symmetric."""
    data = torch.zeros(length, n, n)
    data[4:length - 4, 8:14, 8:14] = 0.05
    data[4:10, 8:14, 8:20] = 0.05
    data[20:24, 6:16, 6:16] = 0.03
    return Volume(data, (1.0, 1.0, 1.0))


@pytest.fixture
def two_views():  # a new Problem per test: windows are kept between calls
    """The bone in two 192 px views 70 deg apart, off the images' centres, a circular field of view
    in the second: about a tenth of each image is the bone's."""
    ct = bone()
    centre = ct.center_lps()
    world_from_ct = torch.eye(4, dtype=torch.float64)
    views = []
    for k, angle in enumerate((0.0, 70.0)):
        cam = Camera(sdd=1000.0, pixel_spacing=(1.0, 1.0), size=(192, 160), principal_point=(60.0 + 20 * k, 110.0))
        camera_from_world = c_arm_pose(centre, 700.0, primary_deg=180.0 + angle)
        with torch.no_grad():
            image = Projector(ct, cam)(perturb_pose(camera_from_world, centre, [2.0, -1.0, 3.0], [1.5, -1.0, 2.0]).float())[0]
        image = image + 0.02 * torch.linspace(0, 1, cam.width)  # a ramp the CT does not explain
        mask = None
        if k == 1:
            rr, cc = torch.meshgrid(torch.arange(cam.height), torch.arange(cam.width), indexing="ij")
            mask = (rr - 100) ** 2 + (cc - 80) ** 2 < 70 ** 2
        views.append(View(image, cam, camera_from_world, mask, f"view {k + 1}"))
    session = RegistrationSession(ct, initial_pose=world_from_ct, views=views, method="intensity", isocenter=centre)
    return session.problem


def whole_canvas_score(problem, poses, level, name):
    """The similarity as defined: each view's DRR on its whole canvas, compared over the ROI."""
    sim = get_similarity(name)
    total = 0.0
    for v in range(len(problem.views)):
        detector = problem.level_camera(v, level)
        camera, pad = problem.canvas(v, level) if name in COUNTS_UNSEEN else (detector, 0)
        drr = problem.render(poses, v, level, camera)
        fixed, usable = problem.fixed(v, detector, pad)
        region = problem.roi(drr, None, detector.width)
        compared = region if usable is None else region * usable
        total = total + (sim(fixed, drr, compared, region) if name in COUNTS_UNSEEN else sim(fixed, drr, compared))
    return total / len(problem.views)


def scores_and_gradients(problem, poses, level, name, windowed):
    params = torch.zeros(len(poses), 6, dtype=torch.float64, requires_grad=True)
    centre = problem.isocenter.reshape(1, 3).expand(len(poses), 3)
    moved = pose_from_params(poses, centre, params, 100.0)
    if windowed:
        score, _ = problem.similarity(moved, level, name, as_asked=True)
    else:
        score = whole_canvas_score(problem, moved, level, name)
    score.sum().backward()
    return score.detach(), params.grad


@pytest.mark.parametrize("name", SIMILARITIES)
@pytest.mark.parametrize("volume_factor", [1, 4])  # 4: a coarse CT spreads beyond its occupied box
def test_a_window_scores_as_the_whole_canvas(two_views, name, volume_factor):
    problem = two_views
    ref = problem.initial_pose
    poses = torch.stack([ref, perturb_pose(ref, problem.isocenter, [3.0, 0.0, -2.0], [4.0, -3.0, 5.0])])
    level = Level(192, 0, 0.0, volume_factor=volume_factor)
    s_win, g_win = scores_and_gradients(problem, poses, level, name, windowed=True)
    s_all, g_all = scores_and_gradients(problem, poses, level, name, windowed=False)
    assert torch.allclose(s_win, s_all, atol=1e-5, rtol=0), (s_win, s_all)
    assert torch.allclose(g_win, g_all, atol=1e-4 * float(g_all.abs().max()), rtol=1e-3), (g_win, g_all)
    assert float(g_all.abs().max()) > 0


def test_the_window_is_small_and_follows_the_bone(two_views):
    problem = two_views
    level = Level(192, 0, 0.0)
    detector = problem.level_camera(0, level)
    canvas, pad = problem.canvas(0, level)
    margin = problem.roi_margin_px(detector.width)
    here = problem.window(problem.initial_pose[None], 0, canvas, margin)
    x0, y0, x1, y1 = here
    assert x0 % WINDOW_ALIGN_PX == 0 and y0 % WINDOW_ALIGN_PX == 0
    assert (x1 - x0) * (y1 - y0) < 0.3 * canvas.width * canvas.height  # a real saving
    assert problem.window(problem.initial_pose[None], 0, canvas, margin) == here  # kept while it fits
    # moved 30 mm sideways: the window moves with the bone, and the score still matches
    moved = perturb_pose(problem.initial_pose, problem.isocenter, [0.0, 0.0, 0.0], [30.0, 0.0, 0.0])
    there = problem.window(moved[None], 0, canvas, margin)
    assert there != here and there[2] > here[2]
    with torch.no_grad():
        drr = problem.render(moved[None], 0, level, canvas)
        inside = problem.render(moved[None], 0, level, window_camera(canvas, there))
    assert torch.allclose(drr[..., there[1]:there[3], there[0]:there[2]], inside, atol=1e-6)
    assert float(drr.sum()) == pytest.approx(float(inside.sum()), rel=1e-6)  # nothing outside the window
    with torch.no_grad():
        s_win, _ = problem.similarity(moved[None], level, "gradient_ncc+ngf", as_asked=True)
        s_all = whole_canvas_score(problem, moved[None], level, "gradient_ncc+ngf")
    assert float(s_win) == pytest.approx(float(s_all), abs=1e-5)


def test_a_bone_that_leaves_the_detector_is_reported(two_views):
    problem = two_views
    level = Level(64, 0, 0.0)
    far = perturb_pose(problem.initial_pose, problem.isocenter, [0.0, 0.0, 0.0], [400.0, 0.0, 0.0])
    with torch.no_grad():
        _, shows = problem.similarity(torch.stack([problem.initial_pose, far]), level, "ncc")
    assert shows.tolist() == [True, False]


# ---- the held region (RegistrationOptions.hold_region) --------------------------------------------

def test_a_region_held_at_the_poses_themselves_scores_as_their_own(two_views):
    problem = two_views
    ref = problem.initial_pose
    poses = torch.stack([ref, perturb_pose(ref, problem.isocenter, [3.0, 0.0, -2.0], [4.0, -3.0, 5.0])])
    level = Level(96, 0, 0.0)
    for name in ("gradient_ncc+ngf", "patch_ncc"):
        own, g_own = scores_and_gradients(problem, poses, level, name, windowed=True)
        params = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
        moved = pose_from_params(poses, problem.isocenter.reshape(1, 3).expand(2, 3), params, 100.0)
        held, _ = problem.similarity(moved, level, name, as_asked=True, region_poses=poses.clone())
        held.sum().backward()
        assert torch.allclose(held.detach(), own, atol=1e-6, rtol=0)
        assert torch.allclose(params.grad, g_own, atol=1e-5 * float(g_own.abs().max()), rtol=1e-4)


def test_a_held_region_is_the_one_framed_at_its_poses(two_views):
    """A moved pose is compared over the region where the CT projects at the held poses, not at its
    own: the whole-canvas score with the held pose's ROI, and the region is computed once."""
    from dataclasses import replace

    problem = two_views
    noise = torch.Generator().manual_seed(0)  # structure everywhere, so that the region matters
    problem.views = [replace(v, image=v.image + 0.05 * torch.randn(v.image.shape, generator=noise)) for v in problem.views]
    base = problem.initial_pose[None]
    moved = perturb_pose(problem.initial_pose, problem.isocenter, [2.0, 1.0, 0.0], [3.0, 2.0, -4.0])[None]
    level = Level(96, 0, 0.0)
    name = "gradient_ncc"
    with torch.no_grad():
        held, _ = problem.similarity(moved, level, name, as_asked=True, region_poses=base)
        own, _ = problem.similarity(moved, level, name, as_asked=True)
        sim, total = get_similarity(name), 0.0
        for v in range(len(problem.views)):
            detector = problem.level_camera(v, level)
            region = problem.roi(problem.render(base, v, level, detector), None, detector.width)
            fixed, usable = problem.fixed(v, detector)
            compared = region if usable is None else region * usable
            total = total + sim(fixed, problem.render(moved, v, level, detector), compared)
    assert float(held) == pytest.approx(float(total / 2), abs=1e-5)
    assert abs(float(held) - float(own)) > 0.01 * abs(float(own))  # the region matters: not the pose's own
    kept = dict(problem._held_regions)
    with torch.no_grad():
        problem.similarity(moved, level, name, as_asked=True, region_poses=base)
    assert all(problem._held_regions[k][1] is kept[k][1] for k in kept)  # cached, not re-rendered


def test_a_level_holds_its_region_only_over_a_wide_margin(two_views):
    from dataclasses import replace

    from CorrRegLib.register.problem import MIN_HELD_MARGIN_PX

    problem = two_views
    problem.options = replace(problem.options, hold_region=True)
    wide, narrow = Level(96, 0, 0.0), Level(16, 0, 0.0)
    assert problem.roi_margin_px(problem.level_camera(0, wide).width) >= MIN_HELD_MARGIN_PX
    assert problem.holds_region(wide) and not problem.holds_region(narrow)
    problem.options = replace(problem.options, hold_region=False)
    assert not problem.holds_region(wide)


def test_the_refiner_reframes_a_pose_that_moved_a_margin_away(two_views):
    from dataclasses import replace

    from CorrRegLib.register.refine import LevelRefiner

    problem = two_views
    problem.options = replace(problem.options, hold_region=True, region_refresh=0.5)
    level = Level(96, 0, 0.3)
    ref = problem.initial_pose
    refiner = LevelRefiner(problem, torch.stack([ref, ref]), level)
    held = refiner.region_poses
    assert held is not None and torch.equal(held, refiner.base)
    margin_px = problem.roi_margin_px(problem.level_camera(0, level).width)
    px_mm = problem.level_camera(0, level).width / 192  # the level's pixels per full-size pixel (1 mm at sdd)
    magnification = 1000.0 / 700.0
    small = 0.2 * margin_px / (px_mm * magnification)  # mm at the isocenter: a fifth of a margin
    large = 2.0 * margin_px / (px_mm * magnification)  # two margins
    with torch.no_grad():
        refiner.params[0, 3] = small
        refiner.params[1, 3] = large
    poses = refiner.poses().detach()
    drift = problem.region_drift(poses, held, level)
    assert 0.1 < float(drift[0]) < 0.4 and float(drift[1]) > 1.5
    refiner._move_region(poses)
    assert torch.equal(refiner.region_poses[0], held[0])  # still framed where it started
    assert torch.allclose(refiner.region_poses[1], poses[1])  # re-framed where it is now
    assert refiner.region_poses is not held  # a new tensor: the problem's cached region is renewed
