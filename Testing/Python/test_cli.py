"""The corrreg command end to end, through files only."""

import json
import subprocess
import sys

import pytest
import torch

from CorrRegLib.cli import main
from CorrRegLib.geometry import Camera
from CorrRegLib.io import read_pose_itk, read_pose_json, read_targets, write_camera_json, write_pose_json
from CorrRegLib.metrics import mtre
from CorrRegLib.protocols import perturb_pose


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_json_contract(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--json", "--quiet", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1  # one JSON object and nothing else on stdout
    res = json.loads(lines[0])
    for key in ("initial_mtre_mm", "final_mtre_mm", "success_2mm", "runtime_s", "method", "camera_from_ct"):
        assert key in res
    assert res["final_mtre_mm"] < 1.0 < res["initial_mtre_mm"]
    assert res["success_2mm"] is True
    assert (tmp_path / "demo" / "overlay.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "convergence.png").stat().st_size > 5_000
    pose = read_pose_json(tmp_path / "demo" / "registered_pose.json")
    assert torch.allclose(pose, torch.tensor(res["camera_from_ct"], dtype=torch.float64))


def test_simulate_then_register_through_files(tmp_path, capsys):
    d = tmp_path
    code, out, err = run_cli(capsys, "phantom", "--out", str(d / "ph"), "--spacing", "2.5", "--json")
    assert code == 0, err
    files = json.loads(out)
    targets, _ = read_targets(files["landmarks"])
    from CorrRegLib.io import read_ct

    volume = read_ct(files["ct"])
    iso = volume.bone_center_lps()
    cam = Camera(1011.7, (3.192, 3.192), (64, 64))
    write_camera_json(cam, d / "cam.json")
    from CorrRegLib.geometry import reference_ap_pose

    truth = perturb_pose(reference_ap_pose(iso, 700.0), iso, [3.0, -4.0, 2.0], [0.0, 0.0, 0.0])
    init = perturb_pose(truth, iso, [4.0, 3.0, -5.0], [6.0, -8.0, 15.0])
    write_pose_json(truth, d / "truth.json")
    write_pose_json(init, d / "init.json")
    code, out, err = run_cli(capsys, "simulate", "--ct", files["ct"], "--camera", str(d / "cam.json"),
                             "--pose", str(d / "truth.json"), "--out", str(d / "xray.nrrd"), "--seed", "3", "--json")
    assert code == 0, err
    assert (d / "xray.camera.json").exists()
    # register from the files alone: the X-ray carries its camera in the side-car JSON
    code, out, err = run_cli(capsys, "register", "--ct", files["ct"], "--xray", str(d / "xray.nrrd"),
                             "--init", str(d / "init.json"), "--method", "intensity",
                             "--output", str(d / "out.json"), "--transform", str(d / "out.tfm"),
                             "--drr", str(d / "drr.nrrd"), "--overlay", str(d / "overlay.png"),
                             "--targets", files["landmarks"], "--truth", str(d / "truth.json"), "--json", "--quiet")
    assert code == 0, err
    res = json.loads(out)
    assert res["final_mtre_mm"] < 1.0 < res["initial_mtre_mm"]
    pose_json, pose_tfm = read_pose_json(d / "out.json"), read_pose_itk(d / "out.tfm")
    assert torch.equal(pose_json, pose_tfm)
    assert float(mtre(pose_json, truth, targets)) == pytest.approx(res["final_mtre_mm"], abs=1e-9)
    assert (d / "drr.nrrd").exists() and (d / "overlay.png").exists()
    # network without a model: a clear message, exit code 2
    code, out, err = run_cli(capsys, "register", "--ct", files["ct"], "--xray", str(d / "xray.nrrd"),
                             "--method", "network", "--output", str(d / "n.json"), "--model", str(d / "no-such-model"))
    assert code == 2
    assert "model" in err
    assert not (d / "n.json").exists()


def test_register_refuses_a_3d_xray(tmp_path, capsys):
    code, out, err = run_cli(capsys, "phantom", "--out", str(tmp_path), "--spacing", "4", "--json")
    ct = json.loads(out)["ct"]
    code, out, err = run_cli(capsys, "register", "--ct", ct, "--xray", ct, "--sdd", "1000",
                             "--pixel-spacing", "1", "1", "--output", str(tmp_path / "p.json"))
    assert code == 2
    assert "3D" in err and "CT" in err


@pytest.mark.parametrize("sub", ["demo", "simulate", "register", "phantom"])
def test_help_explains_options_with_units(sub):
    res = subprocess.run([sys.executable, "-m", "CorrRegLib.cli", sub, "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "--json" in res.stdout
    if sub in ("simulate", "register"):
        assert "mm" in res.stdout


def test_register_starts_from_the_dicom_positioner_angles(tmp_path):
    """Without --init, a DICOM X-ray's PositionerPrimary/SecondaryAngle and
    DistanceSourceToPatient give the initial pose; --sod overrides the DICOM distance."""
    from test_io import DICOM_TAGS, _write_dicom_xray, _xray_array

    from CorrRegLib.cli import build_parser
    from CorrRegLib.cli_register import initial_pose as _initial_pose
    from CorrRegLib.geometry import c_arm_pose, reference_ap_pose
    from CorrRegLib.io import read_xray
    from CorrRegLib.phantom import make_spine_phantom

    volume = make_spine_phantom(spacing_mm=4.0).volume
    iso = volume.bone_center_lps()
    dicom = read_xray(_write_dicom_xray(tmp_path / "x.dcm", _xray_array(), tags=DICOM_TAGS))
    args = lambda *extra: build_parser().parse_args(["register", "--ct", "c", "--xray", "x", "--output", "o", *extra])
    pose, source = _initial_pose(args(), volume, dicom)
    assert source.startswith("DICOM positioner angles")
    assert torch.allclose(pose, c_arm_pose(iso, 750.0, 30.0, -10.0))
    pose, _ = _initial_pose(args("--sod", "600"), volume, dicom)
    assert torch.allclose(pose, c_arm_pose(iso, 600.0, 30.0, -10.0))
    plain = read_xray(_write_dicom_xray(tmp_path / "p.dcm", _xray_array(), tags={"0018|1110": "1000"}))
    pose, source = _initial_pose(args(), volume, plain)
    assert source.startswith("reference AP view") and torch.allclose(pose, reference_ap_pose(iso, 700.0))


def test_verify_sets_or_disables_verification():
    from CorrRegLib.cli import _options, build_parser
    from CorrRegLib.register import RegistrationOptions

    parse = lambda *a: build_parser().parse_args(["register", "--ct", "c", "--xray", "x", "--output", "o", *a])
    assert _options(parse()).fallback_below == RegistrationOptions().fallback_below  # the library default
    assert _options(parse("--verify", "0.9")).fallback_below == 0.9
    assert _options(parse("--verify", "0")).fallback_below is None
    with pytest.raises(ValueError, match="--verify"):
        _options(parse("--verify", "2"))
    assert parse().method == "auto"
    assert not _options(parse()).exclude_cut_ends  # off, as in the library
    assert _options(parse("--exclude-cut-ends")).exclude_cut_ends
