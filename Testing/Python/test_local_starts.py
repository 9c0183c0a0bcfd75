"""Local starts (RegistrationOptions.local_starts, ``--local-starts``): the start and others
around it refined together; their agreement on the kept pose is evidence that the result does not
depend on the start, and a result most of them miss is flagged."""

import json
import math
from dataclasses import replace

import pytest
import torch

from CorrRegLib.cli import main as corrreg
from CorrRegLib.geometry import c_arm_pose, geodesic_distance, transform_points
from CorrRegLib.io import write_calibration, write_ct, write_world_pose_json, write_xray
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, perturb_pose
from CorrRegLib.register import RegistrationOptions, View, register
from CorrRegLib.register.problem import Problem
from CorrRegLib.register.search import LocalStarts
from CorrRegLib.register.state import RunState
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


def tube(n: int = 48, spacing: float = 1.5) -> Volume:
    """A bone tube along z (cortex 6-9 mm from its axis, marrow inside, air outside, 60 mm long):
    its projections do not change when it turns about its own axis."""
    idx = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    r = (x ** 2 + y ** 2).sqrt()
    hu = torch.full((n, n, n), -1000.0, dtype=torch.float64)
    inside = z.abs() < 30.0
    hu[inside & (r < 6.0)] = 300.0
    hu[inside & (r >= 6.0) & (r < 9.0)] = 1500.0
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


def test_a_pose_the_images_leave_open_is_flagged_as_depending_on_the_start():
    """A tube turned about its own axis projects the same: the starts keep the turns they were
    given, few end at the kept pose, and the result says so, though it matches both X-rays."""
    vol = tube()
    iso = vol.center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    _, _, views = two_views(vol, truth, iso)
    o = RegistrationOptions(local_starts=8, local_start_deg=40.0, local_start_mm=3.0)
    res = register(vol, initial_pose=truth, method="intensity", isocenter=iso, views=views, options=o)
    assert res.flagged and res.evidence["agreement"] < 0.5, (res.evidence, res.message)
    assert res.evidence["verified"], res.evidence  # the images are matched: verification alone passes it
    assert "local starts reached this pose" in res.message and "depends on the start" in res.message
    # the position along and across the tube is fixed by the images: only the turn about it is open
    moved = transform_points(res.pose, iso.reshape(1, 3)) - transform_points(truth, iso.reshape(1, 3))
    assert float(moved.norm()) < 1.5, float(moved.norm())


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
    from CorrRegLib.register.verify import Verifier

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
