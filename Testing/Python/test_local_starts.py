"""Local starts (RegistrationOptions.local_starts, ``--local-starts``): the start and others
around it refined together and their basins ranked; a result whose basin barely beats another
(the images do not decide between them) is flagged, and the share of the starts that reached it
is reported."""

import json
import math
from dataclasses import replace

import pytest
import torch

from CorrRegLib.cli import main as corrreg
from CorrRegLib.geometry import Camera, c_arm_pose, euler_to_rotation, geodesic_distance, rotation_about_point, transform_points
from CorrRegLib.io import write_calibration, write_ct, write_world_pose_json, write_xray
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, perturb_pose
from CorrRegLib.register import RegistrationOptions, View, register
from CorrRegLib.register.problem import Problem
from CorrRegLib.register.pipeline import Attempt, Pipeline, candidate_attempts
from CorrRegLib.register.search import BASIN_MM, CandidateRefinement, LocalStarts, TakeCandidate, basins
from CorrRegLib.register.state import RunState
from CorrRegLib.register.verify import Verifier
from CorrRegLib.simulate import simulate_xray
from CorrRegLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")


def two_views(volume, truth, iso, seed=0):
    """Two 64 px views of the paper geometry, 70 deg apart about the CT's long (z) axis."""
    cam = get_protocol("paper", detector_downsample=4).camera
    cfw = [c_arm_pose(iso, 700.0, 180.0, 0.0), c_arm_pose(iso, 700.0, 250.0, 0.0)]
    xrays = [simulate_xray(volume, cam, c @ truth, dose=1e4, blur_mm=0.6, heel=0.1, scatter=0.1, seed=seed + k).image
             for k, c in enumerate(cfw)]
    return cam, cfw, [View(x, cam, c) for x, c in zip(xrays, cfw)]


def tube(n: int = 48, spacing: float = 1.5, inner: float = 6.0, outer: float = 9.0) -> Volume:
    """A bone tube along z (cortex ``inner``-``outer`` mm from its axis, marrow inside, air
    outside, 60 mm long): its projections do not change when it turns about its own axis."""
    idx = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    r = (x ** 2 + y ** 2).sqrt()
    hu = torch.full((n, n, n), -1000.0, dtype=torch.float64)
    inside = z.abs() < 30.0
    hu[inside & (r < inner)] = 300.0
    hu[inside & (r >= inner) & (r < outer)] = 1500.0
    return Volume.from_hu(hu.float(), (spacing,) * 3, origin=(-(n - 1) / 2 * spacing,) * 3)


def test_local_starts_lie_at_the_asked_distance_from_the_start():
    ph = small_phantom(seed=0)
    cam, cfw, views = two_views(ph.volume, torch.eye(4, dtype=torch.float64), ph.volume.bone_center_lps())
    start = cfw[0] @ torch.eye(4, dtype=torch.float64)
    problem = Problem(ph.volume, views, ph.volume.bone_center_lps(), start, torch.device("cpu"), RegistrationOptions())
    state = RunState(start, problem.bounds)
    list(LocalStarts(6, 10.0, 8.0, seed=3).run(problem, state))
    poses = [p for _, p in state.candidates]
    assert state.local_starts == len(poses) == 7 and torch.equal(poses[0], start)
    iso = problem.isocenter.reshape(1, 3)
    for p in poses[1:]:
        assert float(geodesic_distance(p, start)[0]) == pytest.approx(10.0, abs=1e-6)
        moved = transform_points(p, iso) - transform_points(start, iso)
        assert float(moved.norm()) == pytest.approx(8.0, abs=1e-6)
    again = RunState(start, problem.bounds)
    list(LocalStarts(6, 10.0, 8.0, seed=3).run(problem, again))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(state.candidates, again.candidates))  # seeded


def test_local_starts_agree_where_the_images_decide_the_pose():
    """The phantom's vertebrae alone against two X-rays of the whole body: most local starts end
    at the kept pose, which is right and not flagged."""
    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    truth = perturb_pose(torch.eye(4, dtype=torch.float64), iso, [3.0, -2.0, 4.0], [2.0, -3.0, 1.0])
    _, _, views = two_views(ph.volume, truth, iso)
    bones = ph.volume.keep_only((ph.labels >= 1) & (ph.labels <= 5))
    init = perturb_pose(truth, iso, [2.0, -3.0, 2.0], [2.0, -1.7, 8.0])
    res = register(bones, initial_pose=init, method="intensity", isocenter=bones.bone_center_lps(), views=views,
                   options=RegistrationOptions(local_starts=8))
    moved = (transform_points(res.pose, ph.landmarks) - transform_points(truth, ph.landmarks)).norm(dim=1).mean()
    assert float(moved) < 1.5 and not res.flagged, (float(moved), res.message)
    assert res.evidence["local_starts"] == 9 and res.evidence["agreement"] >= 0.5, res.evidence
    # where another basin was reached, it explains the images clearly worse
    assert res.evidence.get("rank_margin", math.inf) >= RegistrationOptions().min_rank_margin, res.evidence


class GivenStarts:
    """A stage that leaves ``poses`` where LocalStarts leaves its starts (reference camera frame),
    so that a test can choose the basins the refinement starts in."""

    name = "given starts"

    def __init__(self, poses):
        self.poses = poses

    def planned(self, problem):
        return 0

    def run(self, problem, state):
        state.candidates = [(0.0, p) for p in self.poses]
        state.local_starts = len(self.poses)
        return iter(())


def roll(pose, iso, deg):
    """``pose`` turned by ``deg`` about the CT's z axis through ``iso`` (CT frame)."""
    return pose @ rotation_about_point(euler_to_rotation(torch.tensor([0.0, 0.0, deg], dtype=torch.float64)), iso)


def test_bone_shift_measures_poses_on_the_bone_as_the_views_see_it():
    """Basins are told apart by how far the poses place the bone across each view's axis, not by
    their angles: a thin tube turned 20 deg about its own axis moves its bone by at most 2 r sin(10
    deg), the same tube slid 10 mm along its axis (across both views) by 10 mm. A slide along the
    first view's axis is invisible to that view alone (as mPD), and sin(70 deg) of it to the second."""
    vol = tube()
    iso = vol.center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, cfw, views = two_views(vol, truth, iso)
    start = cfw[0] @ truth
    both = Problem(vol, views, iso, start, torch.device("cpu"), RegistrationOptions())
    one = Problem(vol, views[:1], iso, start, torch.device("cpu"), RegistrationOptions())
    points = both.bone_points()
    radius = (points[:, :2] - iso[:2]).norm(dim=1).mean()  # the tube's bone lies around z through iso
    assert 6.0 < float(radius) < 9.0 and len(points) >= 1000
    turned = both.bone_shift(start, cfw[0] @ roll(truth, iso, 20.0))
    assert 0.5 * 2 * float(radius) * math.sin(math.radians(10.0)) < turned <= 2 * float(radius) * math.sin(math.radians(10.0))
    slid = truth.clone()
    slid[2, 3] = 10.0  # along the tube (world z), across both views
    assert both.bone_shift(start, cfw[0] @ slid) == pytest.approx(10.0, rel=1e-9)
    deeper = torch.eye(4, dtype=torch.float64)
    deeper[2, 3] = 10.0  # along the first view's axis (its camera z)
    assert one.bone_shift(start, deeper @ start) == pytest.approx(0.0, abs=1e-9)
    assert both.bone_shift(start, deeper @ start) == pytest.approx(10.0 * math.sin(math.radians(70.0)), rel=1e-6)
    ranked = [(0.9, start), (0.8, cfw[0] @ roll(truth, iso, 20.0)), (0.7, cfw[0] @ slid), (0.6, deeper @ start)]
    assert [s for s, _ in basins(ranked, both.bone_shift, BASIN_MM)] == [0.9, 0.7, 0.6]
    assert [s for s, _ in basins(ranked, one.bone_shift, BASIN_MM)] == [0.9, 0.7]


def test_bone_move_counts_depth_that_one_view_does_not_see():
    """Basins are told apart by bone_move, the bone's 3D displacement: the tube 10 mm deeper in
    the one view is 10 mm away though that view sees none of it across its axis (bone_shift 0),
    so it is another basin, not the same result; the 20 deg turn about the tube's axis moves each
    bone point by 2 r sin(10 deg) exactly."""
    vol = tube()
    iso = vol.center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, cfw, views = two_views(vol, truth, iso)
    start = cfw[0] @ truth
    one = Problem(vol, views[:1], iso, start, torch.device("cpu"), RegistrationOptions())
    points = one.bone_points()
    radius = (points[:, :2] - iso[:2]).norm(dim=1).mean()
    deeper = torch.eye(4, dtype=torch.float64)
    deeper[2, 3] = 10.0
    assert one.bone_move(start, deeper @ start) == pytest.approx(10.0, rel=1e-9)
    assert one.bone_shift(start, deeper @ start) == pytest.approx(0.0, abs=1e-9)
    turned = cfw[0] @ roll(truth, iso, 20.0)
    assert one.bone_move(start, turned) == pytest.approx(2 * float(radius) * math.sin(math.radians(10.0)), rel=1e-6)
    ranked = [(0.9, start), (0.8, turned), (0.6, deeper @ start)]
    assert [s for s, _ in basins(ranked, one.bone_move, BASIN_MM)] == [0.9, 0.6]


def test_a_pose_the_images_do_not_decide_is_flagged():
    """A wide tube turned 90 deg about its own axis projects the same: started there and at the
    truth, the two refined basins place the bone 12 mm apart across the views and score alike, so
    the kept one barely beats the other (rank_margin under min_rank_margin) and the result says
    so, though it matches both X-rays. Asked for, min_agreement flags it too (each basin holds 1 of the 2)."""
    vol = tube(inner=11.0, outer=15.0)
    iso = vol.center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, cfw, views = two_views(vol, truth, iso)
    o = RegistrationOptions(min_agreement=0.6)
    start = cfw[0] @ truth
    problem = Problem(vol, views, iso, start, torch.device("cpu"), o)
    verifier = Verifier(o.verify_level, o.bone_only_fallback_below)
    stages = [GivenStarts([start, cfw[0] @ roll(truth, iso, 90.0)]),
              CandidateRefinement(o.candidate_levels, verifier, o.local_start_ranking), TakeCandidate(0)]
    state = RunState(start, problem.bounds)
    list(Pipeline([Attempt("local starts", stages)], verifier, o.min_agreement, o.min_rank_margin)
         .run(problem, state, lambda n: None))
    ev = state.evidence.features
    assert ev["rival_mm"] > 1.5 * BASIN_MM and ev["agreement"] == 0.5, ev
    assert 0.0 <= ev["rank_margin"] < o.min_rank_margin, ev
    assert state.flagged and "do not decide between them" in " ".join(state.messages), state.messages
    assert "1 of 2 local starts reached this pose" in " ".join(state.messages), state.messages


def far_view(volume, truth, iso):
    """One 64 px view with its source 10 m from the isocenter (magnification 2, 1.25 mm pixels
    there): nearly parallel, so the tube 30 mm deeper images 0.3 % smaller, under a pixel."""
    cam = Camera(sdd=20000.0, pixel_spacing=(2.5, 2.5), size=(64, 64))
    cfw = c_arm_pose(iso, 10000.0, 180.0, 0.0)
    xray = simulate_xray(volume, cam, cfw @ truth, dose=1e4, blur_mm=0.6, seed=0).image
    return cfw, View(xray, cam, cfw)


def run_given(problem, o, starts):
    """Local starts' attempts (candidate_attempts) from ``starts`` instead of random ones."""
    verifier = Verifier(o.verify_level, o.bone_only_fallback_below)
    pipeline = Pipeline(candidate_attempts(o, verifier, GivenStarts(starts), "local starts"), verifier,
                        o.min_agreement, o.min_rank_margin)
    state = RunState(problem.initial_pose, problem.bounds)
    list(pipeline.run(problem, state, lambda n: None))
    return pipeline, state


def test_a_rival_in_depth_is_finished_too_and_the_result_names_depth():
    """One nearly parallel view of the phantom, started at the truth and 30 mm deeper: the
    ranking leaves the two basins 30 mm apart with scores alike, so the second candidate is
    finished too (the runoff) though the first verified; finished, they stay apart and still
    explain the image alike, and the flag says that the difference is depth, which this view
    cannot show and a second view would. The truth is kept (ranked first)."""
    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    cfw, view = far_view(ph.volume, truth, iso)
    o = replace(RegistrationOptions(), levels=RegistrationOptions().levels[:3], polish_detector_px=())
    start = cfw @ truth
    deeper = torch.eye(4, dtype=torch.float64)
    deeper[2, 3] = 30.0
    problem = Problem(ph.volume, [view], iso, start, torch.device("cpu"), o)
    pipeline, state = run_given(problem, o, [start, deeper @ start])
    assert len(pipeline.done) == 2, state.messages  # the second basin ran though the first verified
    assert pipeline.done[0][0].verified, pipeline.done[0][0].features
    ev = state.evidence.features
    assert ev["rival_mm"] > 20.0 and ev["rival_across_mm"] < BASIN_MM, ev
    assert 0.0 <= ev["rank_margin"] < o.min_rank_margin, ev
    assert problem.bone_move(state.best_pose, start) < 2.0
    said = " ".join(state.messages)
    assert "finished too, stays" in said and state.flagged, state.messages
    assert "the rest is depth" in said and "a second view" in said, state.messages


def test_a_clear_winner_is_not_run_off():
    """The paper's geometry sees 7 mm of depth (magnification): the deeper start's basin leaves
    clearly more unexplained, so the verified first candidate ends the run, unflagged."""
    from CorrRegLib.register.options import Level

    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, cfw, views = two_views(ph.volume, truth, iso)
    o = replace(RegistrationOptions(), levels=RegistrationOptions().levels[:3], polish_detector_px=(),
                candidate_levels=(Level(16, 0, 6.0, "ncc"),))
    start = cfw[0] @ truth
    deeper = torch.eye(4, dtype=torch.float64)
    deeper[2, 3] = 7.0
    problem = Problem(ph.volume, views[:1], iso, start, torch.device("cpu"), o)
    pipeline, state = run_given(problem, o, [start, deeper @ start])
    assert len(pipeline.done) == 1 and not state.flagged, state.messages
    assert state.evidence.features["rank_margin"] > o.min_rank_margin, state.evidence.features


def test_local_starts_are_refused_where_they_do_not_apply():
    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    _, _, views = two_views(ph.volume, torch.eye(4, dtype=torch.float64), iso)
    for method, said in (("cmaes", "not 'cmaes'"), ("auto", "not 'auto'")):
        with pytest.raises(ValueError, match=said):
            register(ph.volume, initial_pose=torch.eye(4, dtype=torch.float64), method=method, isocenter=iso,
                     views=views, options=RegistrationOptions(local_starts=3))
    with pytest.raises(ValueError, match="0 or more"):
        register(ph.volume, initial_pose=torch.eye(4, dtype=torch.float64), method="intensity", isocenter=iso,
                 views=views, options=RegistrationOptions(local_starts=-1))


def test_without_local_starts_nothing_is_said_of_agreement():
    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    _, _, views = two_views(ph.volume, torch.eye(4, dtype=torch.float64), iso)
    o = replace(RegistrationOptions(), levels=RegistrationOptions().levels[:1])
    res = register(ph.volume, initial_pose=torch.eye(4, dtype=torch.float64), method="intensity", isocenter=iso,
                   views=views, options=o)
    assert "agreement" not in res.evidence and "local starts" not in res.message


def test_command_line_local_starts(tmp_path):
    """``--local-starts N`` reaches the options and the output JSON; other methods refuse it."""
    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    truth = perturb_pose(torch.eye(4, dtype=torch.float64), iso, [2.0, -1.0, 1.0], [1.0, -1.0, 2.0])
    cam, cfw, views = two_views(ph.volume, truth, iso)
    write_ct(ph.volume, tmp_path / "ct.nrrd")
    write_world_pose_json(torch.eye(4, dtype=torch.float64), tmp_path / "init.json")
    args = ["register", "--ct", str(tmp_path / "ct.nrrd"), "--mask", "none", "--polarity", "bright", "--quiet",
            "--init", str(tmp_path / "init.json"), "--output", str(tmp_path / "pose.json"), "--local-starts", "4"]
    for k, (v, c) in enumerate(zip(views, cfw)):
        write_xray(v.image, tmp_path / f"x{k}.nrrd")
        write_calibration(cam, tmp_path / f"cam{k}.json", camera_from_world=c)
        args += ["--xray", str(tmp_path / f"x{k}.nrrd"), "--calibration", str(tmp_path / f"cam{k}.json")]
    assert corrreg(args + ["--method", "intensity"]) == 0
    out = json.loads((tmp_path / "pose.json").read_text())
    assert out["verification"]["local_starts"] == 5 and 0.0 < out["verification"]["agreement"] <= 1.0, out["verification"]
    before = (tmp_path / "pose.json").read_text()
    assert corrreg(args + ["--method", "cmaes"]) == 2  # refused with a message, the result untouched
    assert (tmp_path / "pose.json").read_text() == before


def test_local_starts_are_ranked_by_the_asked_similarity_also_for_one_bone():
    """With a CT of bones alone every refinement compares edges, but the basins are ranked by
    ``local_start_ranking`` as named (band-pass NCC by default): the candidates come out in the
    order of that score, which differs from the bone-only similarity's. A whole CT keeps the
    verifier's NCC."""
    from CorrRegLib.register.options import Level
    from CorrRegLib.register.search import CandidateRefinement

    ph = small_phantom(seed=0)
    iso = ph.volume.bone_center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, cfw, views = two_views(ph.volume, truth, iso)
    bones = ph.volume.keep_only((ph.labels >= 1) & (ph.labels <= 5))
    o = RegistrationOptions()
    assert o.local_start_ranking == "bandpass_ncc"
    start = cfw[0] @ perturb_pose(truth, iso, [2.0, -3.0, 2.0], [2.0, -1.7, 8.0])
    problem = Problem(bones, views, bones.bone_center_lps(), start, torch.device("cpu"), o)
    assert problem.bone_only
    verifier = Verifier(o.verify_level, None)
    ranked = {}
    for name in ("bandpass_ncc", None):
        state = RunState(start, problem.bounds)
        list(LocalStarts(6, 20.0, 15.0, seed=1).run(problem, state))
        list(CandidateRefinement((Level(16, 5, 6.0, "ncc"),), verifier, name).run(problem, state))
        scores = [s for s, _ in state.candidates]
        assert scores == sorted(scores, reverse=True)
        poses = torch.stack([p for _, p in state.candidates])
        expected = verifier.scores(problem, poses, name)
        assert torch.allclose(torch.tensor(scores, dtype=torch.float64), expected, atol=1e-6)
        ranked[name] = expected
    # the bone-only similarity (edges) is not what was asked: the two scores differ
    assert not torch.allclose(ranked["bandpass_ncc"][:1], ranked[None][:1], atol=1e-3)
    # a whole CT is ranked by the verifier's NCC, whatever local_start_ranking says
    whole = Problem(ph.volume, views, iso, start, torch.device("cpu"), o)
    assert not whole.bone_only
    state = RunState(start, whole.bounds)
    list(LocalStarts(6, 20.0, 15.0, seed=1).run(whole, state))
    list(CandidateRefinement((Level(16, 5, 6.0, "ncc"),), verifier, "bandpass_ncc").run(whole, state))
    poses = torch.stack([p for _, p in state.candidates])
    assert torch.allclose(torch.tensor([s for s, _ in state.candidates], dtype=torch.float64),
                          verifier.scores(whole, poses), atol=1e-6)
