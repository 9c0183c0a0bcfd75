"""The bone-only polish (register/polish.py): L-BFGS on band-pass NCC at the finest level, the
region framed again until the pose stops moving, on a pixel grid that does not depend on the start."""

import json
import math
from dataclasses import replace

import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose, geodesic_distance, transform_points
from CorrRegLib.projector import Projector
from CorrRegLib.protocols import perturb_pose
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession, View
from CorrRegLib.register.pipeline import finishing
from CorrRegLib.register.polish import Polish
from CorrRegLib.register.state import RunState
from CorrRegLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")


def bone() -> Volume:
    """An L-shaped bone (1 mm voxels) in air with an inner block: nothing about it is symmetric."""
    data = torch.zeros(40, 24, 24)
    data[4:36, 8:14, 8:14] = 0.05
    data[4:10, 8:14, 8:20] = 0.05
    data[20:24, 6:16, 6:16] = 0.03
    return Volume(data, (1.0, 1.0, 1.0))


def session(initial_pose, pixel_mm: float = 1.0, size: int = 160, **options) -> RegistrationSession:
    """The bone in two views 70 deg apart, X-rays rendered at the identity pose (world_from_ct)
    with a ramp the CT does not explain."""
    ct = bone()
    centre = ct.center_lps()
    views = []
    for k, angle in enumerate((0.0, 70.0)):
        cam = Camera(sdd=1000.0, pixel_spacing=(pixel_mm, pixel_mm), size=(size, size))
        camera_from_world = c_arm_pose(centre, 700.0, primary_deg=180.0 + angle)
        with torch.no_grad():
            image = Projector(ct, cam)(camera_from_world.float())[0]
        views.append(View(image + 0.02 * torch.linspace(0, 1, cam.width), cam, camera_from_world, None, f"view {k + 1}"))
    return RegistrationSession(ct, initial_pose=initial_pose, views=views, method="intensity", isocenter=centre,
                               options=RegistrationOptions(**({"bone_only": True, "bone_only_polish": "bandpass_ncc"} | options)))


def polish(start: torch.Tensor, **options) -> tuple[torch.Tensor, RunState]:
    """world_from_ct after the polish from ``start`` (0.5 mm pixels: the bone about 120 px
    across; at 1 mm pixels it is too coarse to pin a rotation to a tenth of a degree), and the
    run's state."""
    problem = session(start, pixel_mm=0.5, size=320, **options).problem
    state = RunState(problem.initial_pose, problem.bounds)
    for stage in finishing(problem.options, problem.options.levels)[1:]:  # the polish stages alone
        for _ in stage.run(problem, state):
            pass
    return problem.world_pose(state.best_pose), state


def test_the_polish_brings_two_starts_to_one_pose_at_the_truth():
    centre = bone().center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    starts = [perturb_pose(truth, centre, [1.5, -1.0, 1.0], [0.8, -0.6, 0.5]),
              perturb_pose(truth, centre, [-1.0, 1.5, -1.2], [-0.5, 0.7, -0.8])]
    results = []
    for start in starts:
        pose, state = polish(start)
        assert any(h["stage"].startswith("polish") for h in state.history)
        results.append(pose)
    corners = torch.tensor([[i, j, k, 1.0] for i in (8, 20) for j in (6, 16) for k in (4, 36)], dtype=torch.float64)
    points = (corners @ bone().lps_from_index().T)[:, :3]  # the bone's extremities, LPS mm

    def error_mm(pose):
        return float((transform_points(pose, points) - points).norm(dim=1).mean())

    for start, pose in zip(starts, results):
        assert error_mm(start) > 1.0  # 2 deg and 1 mm off
        assert error_mm(pose) < 0.05 and float(geodesic_distance(pose, truth)[0]) < 0.2
    assert float(geodesic_distance(results[0], results[1])[0]) < 0.1  # one pose, not two


def test_the_polish_is_off_by_default():
    assert RegistrationOptions().bone_only_polish is None  # biased on the phantom: docs/registration.md


def test_a_width_the_xray_is_too_small_for_is_skipped():
    problem = session(torch.eye(4, dtype=torch.float64)).problem  # 160 px views, the bone ~60 px across
    stages = finishing(problem.options, problem.options.levels)
    assert [type(s).__name__ for s in stages] == ["GradientRefinement", "Polish", "Polish"]
    first, second = stages[1], stages[2]
    assert first.planned(problem) > 0
    assert second.planned(problem) == 0 and list(second.run(problem, RunState(problem.initial_pose, problem.bounds))) == []


@pytest.mark.parametrize("changed", [{"bone_only": False}, {"bone_only_polish": None}, {"polish_iterations": 0}])
def test_the_polish_runs_only_for_a_bone_only_ct_and_when_asked(changed):
    s = session(torch.eye(4, dtype=torch.float64))
    problem = s.problem
    problem.options = replace(problem.options, **changed)
    problem.bone_only = problem.options.bone_only
    stage = Polish(problem.options.levels[-1])
    state = RunState(problem.initial_pose, problem.bounds)
    assert stage.planned(problem) == 0 and list(stage.run(problem, state)) == [] and state.history == []


def test_the_polish_grid_does_not_depend_on_the_start_rotation():
    """The polish's detectors come from the CT's extent, not from its footprint at the start: starts
    turned differently get the same pixel grid, in steps of 2 ** (1 / 4)."""
    centre = bone().center_lps()
    factors, footprints = set(), set()
    for deg in (0.0, 10.0, 25.0):
        problem = session(perturb_pose(torch.eye(4, dtype=torch.float64), centre, [deg, deg / 2, 0.0], [0.0, 0.0, 0.0]),
                          pixel_mm=0.25, size=640).problem
        f = tuple(problem.steady_downsample(v, 64) for v in range(2))
        factors.add(f)
        footprints.add(round(problem.footprint_px(0), 3))
        assert all(x > 1 and abs(4 * math.log2(x) - round(4 * math.log2(x))) < 1e-9 for x in f)
        level = Polish(problem.options.levels[-1], 64).polish_level(problem)
        assert level.similarity == "bandpass_ncc" and level.downsample == f
        assert problem.level_camera(0, level) == problem.views[0].camera.downsample(f[0])
    assert len(factors) == 1
    assert len(footprints) > 1  # the footprint the other levels use does change with the start


def test_a_level_with_downsample_factors_uses_them():
    problem = session(torch.eye(4, dtype=torch.float64), pixel_mm=0.5, size=320).problem
    level = Level(64, 0, 0.0, downsample=(2.0, 4.0))
    assert problem.level_camera(0, level).width == 160 and problem.level_camera(1, level).width == 80


def test_the_edges_and_bandpass_similarity_is_the_mean_of_its_parts():
    from CorrRegLib.similarity import COUNTS_UNSEEN, bandpass_ncc, get_similarity, gradient_ncc_ngf

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 48, 48, generator=g)
    moving = torch.roll(fixed, 2, dims=-1) + 0.1 * torch.rand(1, 1, 48, 48, generator=g)
    mask = torch.zeros(1, 1, 48, 48)
    mask[..., 8:40, 8:40] = 1.0
    both = get_similarity("gradient_ncc+ngf+bandpass_ncc")(fixed, moving, mask, mask)
    parts = 0.5 * (gradient_ncc_ngf(fixed, moving, mask, mask) + bandpass_ncc(fixed, moving, mask))
    assert torch.allclose(both, parts)
    assert "gradient_ncc+ngf+bandpass_ncc" in COUNTS_UNSEEN  # its NGF half takes the region
    assert float(get_similarity("gradient_ncc+ngf+bandpass_ncc")(fixed, fixed, mask, mask)) > float(both) + 0.1


def test_command_line_polish(tmp_path):
    """``corrreg register --polish [SIMILARITY]`` reaches the options: the result ends in the polish
    and lies closer to the truth than the start; without the flag it does not end there; an unknown
    similarity is refused before anything runs, the output not written."""
    from CorrRegLib.cli import main as corrreg
    from CorrRegLib.io import write_calibration, write_ct, write_world_pose_json, write_xray

    s = session(torch.eye(4, dtype=torch.float64))
    centre = bone().center_lps()
    start = perturb_pose(torch.eye(4, dtype=torch.float64), centre, [1.5, -1.0, 1.0], [0.8, -0.6, 0.5])
    write_ct(bone(), tmp_path / "bone.nrrd")
    write_world_pose_json(start, tmp_path / "init.json")
    args = ["register", "--ct", str(tmp_path / "bone.nrrd"), "--method", "intensity", "--mask", "none",
            "--polarity", "bright", "--quiet", "--init", str(tmp_path / "init.json")]
    for k, v in enumerate(s.views):
        write_xray(v.image, tmp_path / f"x{k}.nrrd")
        write_calibration(v.camera, tmp_path / f"cam{k}.json", camera_from_world=v.camera_from_world)
        args += ["--xray", str(tmp_path / f"x{k}.nrrd"), "--calibration", str(tmp_path / f"cam{k}.json")]
    assert corrreg(args + ["--output", str(tmp_path / "plain.json")]) == 0
    assert corrreg(args + ["--output", str(tmp_path / "polished.json"), "--polish"]) == 0
    plain, polished = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "polished"))
    assert not any(name.startswith("polish") for name in plain["stages"]) and "no polish" not in polished["message"]
    assert polished["stages"][-1] == "polish 128 px" and polished["iterations"] > plain["iterations"]
    error = float(geodesic_distance(torch.tensor(polished["world_from_ct"], dtype=torch.float64),
                                    torch.eye(4, dtype=torch.float64))[0])
    assert error < float(geodesic_distance(start, torch.eye(4, dtype=torch.float64))[0]) / 4
    assert corrreg(args + ["--output", str(tmp_path / "bad.json"), "--polish", "no_such_similarity"]) == 2
    assert not (tmp_path / "bad.json").exists()


def test_a_ct_of_more_than_bone_is_not_polished_and_says_so():
    s = session(torch.eye(4, dtype=torch.float64), bone_only=False, levels=(Level(16, 2, 6.0, "ncc"),),
                fallback_below=None)
    result = s.run()
    assert "no polish" in result.message and not any(h["stage"].startswith("polish") for h in result.history)
    with pytest.raises(ValueError, match="unknown similarity 'nope'"):
        session(torch.eye(4, dtype=torch.float64), bone_only_polish="nope")


def test_one_view_is_not_polished_and_says_so():
    """One view leaves the bone's depth and roll open, and the polish ran along them on the wrist:
    asked for with one view, it does not run and the result says why; two views are polished."""
    two = session(torch.eye(4, dtype=torch.float64), levels=(Level(16, 2, 6.0, "ncc"),), fallback_below=None)
    assert Polish(two.problem.options.levels[-1]).planned(two.problem) > 0
    one = RegistrationSession(two.volume, initial_pose=torch.eye(4, dtype=torch.float64), views=two.views[:1],
                              method="intensity", isocenter=two.isocenter, options=two.options)
    assert one.problem.bone_only and Polish(one.problem.options.levels[-1]).planned(one.problem) == 0
    result = one.run()
    assert "no polish: one view" in result.message and not any(h["stage"].startswith("polish") for h in result.history)
    assert "no polish" not in two.run().message
