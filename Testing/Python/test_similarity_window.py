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
                "multiscale_gradient_ncc"]


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
