"""The benchmark engine and `corrreg benchmark`: files that agree, resume, sanity, bad inputs.

Tiny set-up: the phantom at 4 mm voxels, the paper camera downsampled 8x (32 x 32 pixels), two
or three cases, one cheap method with a short schedule.
"""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CorrRegLib.benchmark import (
    CSV_FIELDS,
    METHODS,
    BenchmarkConfig,
    parse_labels,
    read_results,
    run_benchmark,
)
from CorrRegLib.cli import main
from CorrRegLib.geometry import Camera
from CorrRegLib.metrics import capture_range, mtre, summarize
from CorrRegLib.phantom import make_spine_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import Level, RegistrationOptions

SPACING = 4.0
TINY = RegistrationOptions(levels=(Level(32, 25, 3.0, "ncc"), Level(32, 10, 1.0)), patience=6)


def config(**kw):
    base = dict(protocol="moderate", cases=3, seed=5, methods=("intensity",), detector_downsample=8.0,
                phantom_spacing_mm=SPACING, device="cpu")
    base.update(kw)
    return BenchmarkConfig(**base)


@pytest.fixture(scope="module")
def phantom():
    return make_spine_phantom(spacing_mm=SPACING, seed=0)


class Stop(Exception):
    pass


def read_csv_text(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_run_resume_and_files_agree(tmp_path, phantom):
    out = tmp_path / "run"
    seen = []

    def interrupt(row):
        seen.append((row["case"], row["method"]))
        raise Stop  # an interruption right after the first row was written

    with pytest.raises(Stop):
        run_benchmark(config(), out, options=TINY, progress=False, plots=False, on_row=interrupt)
    first = read_csv_text(out / "results.csv")
    assert first[0] == list(CSV_FIELDS) and len(first) == 2  # header + the one finished row
    assert (out / "run.json").exists() and not (out / "summary.json").exists()

    ran = []
    summary = run_benchmark(config(), out, options=TINY, progress=False, on_row=lambda r: ran.append(r["case"]))
    assert ran == [1, 2]  # case 0 was not redone
    assert summary["rows_run"] == 2 and summary["rows_reused"] == 1
    rows_csv = read_csv_text(out / "results.csv")
    assert rows_csv[:2] == first  # the finished row is kept as written
    rows = read_results(out / "results.csv")
    assert [(r["case"], r["method"]) for r in rows] == [(0, "intensity"), (1, "intensity"), (2, "intensity")]

    # The cases are those of protocols.make_cases (case i depends only on (seed, i)), measured on
    # the phantom's landmarks, and the CSV's errors follow from its stored poses.
    proto = get_protocol("moderate", detector_downsample=8.0)
    assert proto.camera.size == (32, 32)
    iso = phantom.volume.bone_center_lps()
    cases = make_cases(proto, iso, 3, seed=5)
    for r, c in zip(rows, cases):
        assert r["initial_mtre_mm"] == pytest.approx(float(mtre(c.initial_pose, c.true_pose, phantom.landmarks)), rel=1e-9)
        pose = torch.tensor(json.loads(r["final_pose"]), dtype=torch.float64).reshape(4, 4)
        assert r["final_mtre_mm"] == pytest.approx(float(mtre(pose, c.true_pose, phantom.landmarks)), rel=1e-6)
        assert r["success_2mm"] == (r["final_mtre_mm"] < 2.0) and r["success_10mm"] == (r["final_mtre_mm"] < 10.0)
        assert r["iterations"] > 0 and r["wall_time_s"] >= r["registration_time_s"] > 0
    assert max(r["initial_mtre_mm"] for r in rows) > 5.0  # real offsets, not a degenerate start

    # summary.json is recomputed from results.csv; summary.md shows the same numbers.
    js = json.loads((out / "summary.json").read_text())
    assert js == json.loads(json.dumps(summary))
    assert js["protocol"] == "moderate" and js["cases"] == 3 and js["seed"] == 5
    assert "landmarks of the phantom" in js["targets"] and js["n_targets"] == len(phantom.landmarks)
    assert "32 x 32" in js["detector"]
    ini = [r["initial_mtre_mm"] for r in rows]
    fin = [r["final_mtre_mm"] for r in rows]
    expect = summarize(ini, fin)
    got = js["methods"]["intensity"]
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert got["runtime_median_s"] == pytest.approx(float(np.median([r["wall_time_s"] for r in rows])))
    assert got["capture_range_mm"] == capture_range(ini, fin)[1]
    assert js["initial_mtre"]["median"] == pytest.approx(float(np.median(ini)))
    md = (out / "summary.md").read_text()
    assert "| intensity | 3 |" in md and f"{100 * got['sr_10mm']:.0f}%" in md and f"{got['mtre_median']:.2f}" in md
    assert "landmarks of the phantom" in md
    for name in ("cumulative_mtre.png", "capture_range.png", "gallery.png"):
        assert (out / name).stat().st_size > 5_000, name

    # Nothing left to do: a re-run registers nothing and leaves the CSV as it was.
    again = run_benchmark(config(), out, options=TINY, progress=False, plots=False)
    assert again["rows_run"] == 0 and read_csv_text(out / "results.csv") == rows_csv
    # Different case definitions are refused, with the differing parameter named.
    with pytest.raises(ValueError, match="cannot resume.*seed"):
        run_benchmark(config(seed=6), out, options=TINY, progress=False, plots=False)
    with pytest.raises(ValueError, match="cannot resume.*detector_downsample"):
        run_benchmark(config(detector_downsample=4.0), out, options=TINY, progress=False, plots=False)
    assert read_csv_text(out / "results.csv") == rows_csv


def test_cli_start_at_truth_stays_at_truth(tmp_path, capsys):
    """Through the command: from the true pose a registration must stay there (mTRE ~ 0; at
    64 x 64 pixels, as depth drifts by a few mm at 32 x 32); --json prints the summary alone."""
    out = tmp_path / "truth"
    code = main(["benchmark", "--cases", "2", "--seed", "1", "--methods", "intensity", "--start", "truth",
                 "--detector-downsample", "4", "--phantom-spacing", "4", "--out", str(out), "--json", "--quiet", "--no-plots", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1
    s = json.loads(lines[0])
    m = s["methods"]["intensity"]
    for key in ("sr_10mm", "sr_2mm", "sr_1mm", "mtre_top50_mean", "mtre_top50_std", "mtre_median", "runtime_median_s"):
        assert key in m
    assert s["protocol"] == "moderate" and s["cases"] == 2 and s["start"] == "truth"
    rows = read_results(out / "results.csv")
    assert len(rows) == 2
    for r in rows:
        assert r["initial_mtre_mm"] == 0.0
        assert r["final_mtre_mm"] < 1.0, r
    assert m["sr_1mm"] == 1.0


def _write_label_map(path, phantom, labels):
    img = sitk.GetImageFromArray(labels.numpy().astype(np.int16))
    img.SetSpacing(phantom.volume.spacing)
    img.SetOrigin(phantom.volume.origin)
    img.SetDirection([v for row in phantom.volume.direction for v in row])
    sitk.WriteImage(img, str(path))
    return path


def test_label_map_targets(tmp_path, phantom):
    from CorrRegLib.benchmark import prepare

    seg = _write_label_map(tmp_path / "labels.nrrd", phantom, phantom.labels)
    setup = prepare(config(targets=str(seg), target_labels=parse_labels("2-4")))
    assert setup.targets.shape == (3, 3)
    assert setup.targets_description.startswith("centroids of labels 2, 3, 4")
    # The centroid of L2 (label 2) lies near its body-centre landmark.
    l2 = phantom.landmark(f"{phantom.vertebra_names[1]}_body_center")
    assert float((setup.targets[0] - l2).norm()) < 15.0
    default = prepare(config(ct="phantom", targets=None))
    assert "landmarks of the phantom" in default.targets_description


def test_bone_voxel_targets_for_a_ct_file(tmp_path, phantom):
    from CorrRegLib.benchmark import prepare
    from CorrRegLib.io import write_ct

    ct = write_ct(phantom.volume, tmp_path / "ct.nrrd", pixel_type="int16")
    a = prepare(config(ct=str(ct)))
    b = prepare(config(ct=str(ct), seed=9))
    assert a.targets_description.startswith("fixed sample of bone voxels")
    assert a.targets.shape == (20, 3) and torch.equal(a.targets, b.targets)  # fixed, not tied to --seed
    from CorrRegLib.phantom import sample_hu

    assert bool((sample_hu(phantom, a.targets) > 499).all())  # denser than 1.5 x water, i.e. +500 HU


def test_bad_inputs_fail_before_any_work(tmp_path, phantom, capsys):
    from CorrRegLib.model import build_model
    from CorrRegLib.train import save_model

    out = tmp_path / "never"

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match):
            run_benchmark(config(**kw), out, options=TINY, progress=False, plots=False)
        assert not out.exists()  # raised before the run folder, a case or a registration

    # a target outside the CT's extent
    far = tmp_path / "far.csv"
    far.write_text("name,x,y,z\ninside,0,0,0\nfar,0,0,900\n")
    fails("1 of 2 targets lie outside the CT", targets=str(far))
    # an empty label map, and one without the requested labels
    empty = _write_label_map(tmp_path / "empty.nrrd", phantom, torch.zeros_like(phantom.labels))
    fails("empty", targets=str(empty))
    seg = _write_label_map(tmp_path / "labels.nrrd", phantom, phantom.labels)
    fails("none of the labels", targets=str(seg), target_labels=(29, 30))
    # unknown methods; network methods without a model
    fails("unknown method.*sift", methods=("intensity", "sift"))
    from CorrRegLib.register import bundled_model_dir

    if bundled_model_dir() is None:
        fails("need a trained network", methods=("hybrid",))
    else:  # the shipped network stands in for --model (after its camera check)
        from CorrRegLib.benchmark import prepare

        assert prepare(config(methods=("hybrid",))).model_dir == str(bundled_model_dir())
    # a model trained for another camera (a real saved network, config camera sdd 1200 mm)
    net = build_model("compact", input_size=32)
    other = save_model(net, tmp_path / "model_other", camera=Camera(1200.0, (1.0, 1.0), (32, 32)))
    fails("trained for another camera", methods=("network",), model=str(other))
    # the same network recorded with the protocol's camera passes the check (at any detector size)
    from CorrRegLib.benchmark import check_model_camera

    proto = get_protocol("moderate", detector_downsample=8.0)
    same = save_model(net, tmp_path / "model_same", camera=get_protocol("moderate").camera.downsample(4))
    assert check_model_camera(str(same), proto.camera)["camera"]["size_px"] == [64, 64]

    # through the command: exit code 2, the message on stderr, nothing written
    code = main(["benchmark", "--methods", "intensity,foo", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown method(s) foo" in err and not out.exists()
    code = main(["benchmark", "--methods", "network", "--model", str(other), "--out", str(out), "--quiet"])
    assert code == 2 and "trained for another camera" in capsys.readouterr().err and not out.exists()


def test_method_table_and_label_parsing():
    assert METHODS["cmaes_only"].register_method == "cmaes" and METHODS["cmaes_only"].options == {"refine": False}
    assert METHODS["cmaes"].options == {} and not METHODS["intensity"].needs_model and METHODS["hybrid"].needs_model
    assert parse_labels("29-31,40") == (29, 30, 31, 40)
    with pytest.raises(ValueError, match="target-labels"):
        parse_labels("5-3")


def test_diffdrr_peer_skips_cleanly_without_diffdrr(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("diffdrr") is not None:
        pytest.skip("diffdrr is installed here: the peer would run for real")
    script = Path(__file__).resolve().parents[1] / "Benchmarks" / "bench_registration_diffdrr.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "peer")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stdout and "not installed" in r.stderr
    assert not (tmp_path / "peer").exists()
