"""The benchmark engine and `corrreg benchmark`: files that agree, resume, sanity, bad inputs.

Tiny set-up: the phantom at 4 mm voxels, the paper camera downsampled 8x (32 x 32 pixels), two
or three cases, one cheap method with a short schedule.
"""

import csv
import json
import math
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# Several CTs, X-ray sources, flag rates (issue 10)

from CorrRegLib.benchmark import (  # noqa: E402
    SourceCT,
    cells_from_args,
    default_sources_file,
    flag_stats,
    generate_cases,
    get_source,
    load_cell,
    load_sources_file,
    method_model_dir,
    prepare,
    read_manifest,
    summarize_cells,
    summarize_rows,
)


def _row(case, success, flagged, method="m"):
    mt = 1.0 if success else 30.0
    return {"case": case, "method": method, "initial_mtre_mm": 20.0, "final_mtre_mm": mt, "final_mpd_mm": mt,
            "rotation_error_deg": 1.0, "translation_error_mm": 1.0, "wall_time_s": 1.0 + case, "flagged": flagged,
            "success_10mm": success, "success_2mm": success, "success_1mm": success}


def test_flag_rates_are_shares_of_successes_and_of_failures():
    rows = [_row(0, True, True), _row(1, True, False), _row(2, False, True), _row(3, False, False),
            _row(4, False, False)]
    f = flag_stats(rows)
    assert (f["successes_10mm"], f["failures_10mm"], f["false_flags"], f["missed_failures"]) == (2, 3, 1, 2)
    assert f["false_flag_rate"] == pytest.approx(1 / 2) and f["missed_failure_rate"] == pytest.approx(2 / 3)
    s = summarize_rows(rows, ["m"], 5)["m"]
    assert s["false_flag_rate"] == pytest.approx(0.5) and s["flagged"] == 2
    from CorrRegLib.benchmark import table_row

    line = table_row("m", s)
    assert line.endswith("| 1/2 (50%) | 2/3 (67%) |")
    # no successes (or no failures): the rate is undefined, not 0
    none = flag_stats([_row(0, False, True)])
    assert none["false_flag_rate"] is None and none["missed_failure_rate"] == 0.0
    assert flag_stats([_row(0, True, False)])["missed_failure_rate"] is None


def test_auto_row_gets_only_an_explicit_model(tmp_path, phantom):
    from CorrRegLib.model import build_model
    from CorrRegLib.train import save_model

    spec = METHODS["auto"]
    assert spec.register_method == "auto" and not spec.needs_model and spec.optional_model
    setup = prepare(config(methods=("auto", "intensity")))
    assert method_model_dir(setup, "auto") is None and method_model_dir(setup, "intensity") is None
    net = build_model("compact", input_size=32)
    same = save_model(net, tmp_path / "model_same", camera=get_protocol("moderate").camera.downsample(4))
    setup = prepare(config(methods=("auto", "intensity"), model=str(same)))
    assert method_model_dir(setup, "auto") == str(same) and method_model_dir(setup, "intensity") is None
    assert setup.fingerprint["model"] == str(same.resolve())
    # a model for another C-arm is refused before any work, not silently replaced by the global search
    other = save_model(net, tmp_path / "model_other", camera=Camera(1200.0, (1.0, 1.0), (32, 32)))
    with pytest.raises(ValueError, match="trained for another camera"):
        prepare(config(methods=("auto",), model=str(other)))


SCALED_SOURCE = '''
import torch
from CorrRegLib.benchmark.sources import CorrRegSource, SourceCT
from CorrRegLib.volume import Volume

class Scaled:
    """A test source: CorrReg's projector on its own HU map (bone 1.6x steeper above 0 HU)."""
    name = "scaled"
    def info(self):
        return {"name": "scaled", "version": "9.9", "hu_conversion": "water line, bone slope x1.6"}
    def renderer(self, ct, camera, device):
        mu = 0.02 * (1 + ct.hu.clamp(min=-1000) / 1000)
        mu = torch.where(ct.hu > 0, 0.02 + 1.6 * 0.02 * ct.hu / 1000, mu)
        v = ct.volume
        return CorrRegSource().renderer(SourceCT(ct.hu, Volume(mu, v.spacing, v.origin, v.direction)), camera, device)

SOURCES = {"scaled": Scaled}
'''


def test_a_source_from_a_sources_file_renders_the_cases(tmp_path):
    """The same cases (poses, noise seeds) with another renderer's X-rays; the source is part of
    the run's identity, so a folder of one source refuses the other."""
    path = tmp_path / "my_sources.py"
    path.write_text(SCALED_SOURCE)
    ours = prepare(config())
    theirs = prepare(config(xray_source="scaled", xray_sources_file=str(path)))
    assert theirs.fingerprint["xray_source"] == {"name": "scaled", "version": "9.9",
                                                 "hu_conversion": "water line, bone slope x1.6"}
    assert ours.fingerprint["xray_source"]["name"] == "corrreg"
    a, b = list(generate_cases(ours, [0, 1])), list(generate_cases(theirs, [0, 1]))
    for x, y in zip(a, b):
        assert torch.equal(x.true_pose, y.true_pose) and torch.equal(x.start_pose, y.start_pose)
        assert x.noise_seed == y.noise_seed and x.xray.shape == y.xray.shape == (32, 32)
        assert not torch.equal(x.xray, y.xray)
        assert float(torch.corrcoef(torch.stack([x.xray.flatten(), y.xray.flatten()]))[0, 1]) > 0.9
    out = tmp_path / "run"
    s = run_benchmark(config(cases=1, xray_source="scaled", xray_sources_file=str(path), start="truth"), out,
                      options=TINY, progress=False, plots=False)
    assert s["xray_source"]["name"] == "scaled" and "scaled 9.9" in (out / "summary.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["cell"] == {"ct": "phantom", "source": "scaled"}
    with pytest.raises(ValueError, match="cannot resume.*xray_source"):
        run_benchmark(config(cases=1, start="truth"), out, options=TINY, progress=False, plots=False)
    with pytest.raises(ValueError, match="unknown X-ray source 'nope'; choose from corrreg, scaled"):
        get_source("nope", path)
    with pytest.raises(ValueError, match="does not exist"):
        get_source("nanodrr", tmp_path / "absent.py")


def test_missing_renderer_says_to_use_the_benchmark_env(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("nanodrr") is not None:
        pytest.skip("nanodrr is installed here")
    out = tmp_path / "never"
    code = main(["benchmark", "--xray-source", "nanodrr", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs nanodrr" in err and "benchmark environment" in err and not out.exists()


def test_x_rays_from_another_ct_of_the_same_patient(tmp_path, phantom):
    """--xray-ct: the X-rays show the whole patient while the registration sees a crop of it."""
    from CorrRegLib.io import write_ct
    from CorrRegLib.volume import Volume

    full = write_ct(phantom.volume, tmp_path / "full.nrrd", pixel_type="int16")
    v = phantom.volume
    k0, k1 = 10, 40  # a slab of slices (inferior-superior) around the lumbar spine
    origin = (v.lps_from_index() @ torch.tensor([0.0, 0.0, float(k0), 1.0], dtype=torch.float64))[:3]
    crop = write_ct(Volume(v.data[k0:k1], v.spacing, tuple(origin.tolist()), v.direction), tmp_path / "crop.nrrd",
                    pixel_type="int16")
    own = prepare(config(ct=str(crop)))
    from_full = prepare(config(ct=str(crop), xray_ct=str(full)))
    assert own.fingerprint["xray_ct"] is None and from_full.fingerprint["xray_ct"] == str(full.resolve())
    assert own.fingerprint["ct_hash"] == from_full.fingerprint["ct_hash"]
    a, b = next(iter(generate_cases(own, [0]))), next(iter(generate_cases(from_full, [0])))
    assert torch.equal(a.true_pose, b.true_pose)
    # the full CT adds anatomy above and below the slab: rows far from the centre differ most
    diff = (a.xray - b.xray).abs().mean(dim=1)
    assert float(diff[:4].mean()) > 3 * float(diff[14:18].mean())
    far = Volume(v.data, v.spacing, (v.origin[0] + 1000.0, v.origin[1], v.origin[2]), v.direction)
    elsewhere = write_ct(far, tmp_path / "elsewhere.nrrd", pixel_type="int16")
    with pytest.raises(ValueError, match="does not cover the registered CT"):
        prepare(config(ct=str(crop), xray_ct=str(elsewhere)))


def test_cells_from_options_and_manifest(tmp_path):
    cells = cells_from_args(["a/ct.nii.gz", "b/ct.nii.gz", "phantom"], ["a/m.nii.gz", "-", "-"], ["29-46"], [])
    assert [c.name for c in cells] == ["ct", "ct_2", "phantom"]
    assert cells[0].targets == "a/m.nii.gz" and cells[1].targets is None and cells[2].target_labels == tuple(range(29, 47))
    named = cells_from_args(["a/ct.nii.gz", "b/ct.nii.gz"], names=["-", "ct"])
    assert [c.name for c in named] == ["ct_2", "ct"]
    with pytest.raises(ValueError, match="2 --targets for 3 --ct"):
        cells_from_args(["a", "b", "c"], ["t1", "t2"])
    with pytest.raises(ValueError, match="2 --model for 3 --ct: give one for all or one per --ct"):
        cells_from_args(["a", "b", "c"], models=["m1", "m2"])
    m = tmp_path / "set" / "manifest.json"
    m.parent.mkdir()
    m.write_text(json.dumps([{"name": "chest", "ct": "chest/ct.nii.gz", "targets": "chest/mask.nii.gz",
                              "target_labels": "29-31", "model": "/abs/model", "xray_ct": None},
                             {"name": "ph", "ct": "phantom", "phantom_spacing_mm": 4}]))
    a, b = read_manifest(m)
    assert a.ct == str(m.parent / "chest/ct.nii.gz") and a.model == "/abs/model" and a.target_labels == (29, 30, 31)
    assert b.ct == "phantom" and b.config_overrides()["phantom_spacing_mm"] == 4.0
    m.write_text(json.dumps([{"name": "x", "ct": "phantom", "labels": "1"}]))
    with pytest.raises(ValueError, match="unknown key.*labels"):
        read_manifest(m)
    m.write_text(json.dumps([{"name": "x/y", "ct": "phantom"}]))
    with pytest.raises(ValueError, match="folder name"):
        read_manifest(m)


def test_cli_manifest_runs_one_cell_per_ct_and_pools_them(tmp_path, phantom, capsys):
    from CorrRegLib.io import write_ct, write_targets_csv

    write_ct(phantom.volume, tmp_path / "ph.nrrd", pixel_type="int16")
    write_targets_csv(phantom.landmarks[:10], tmp_path / "some.csv", names=phantom.landmark_names[:10])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"name": "builtin", "ct": "phantom", "phantom_spacing_mm": 4},
                                    {"name": "file", "ct": "ph.nrrd", "targets": "some.csv"}]))
    out = tmp_path / "multi"
    argv = ["benchmark", "--manifest", str(manifest), "--cases", "2", "--start", "truth", "--detector-downsample", "8",
            "--out", str(out), "--json", "--quiet", "--no-plots", "--device", "cpu"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    s = json.loads([line for line in captured.out.splitlines() if line.strip()][-1])
    assert [(c["ct"], c["source"]) for c in s["cells"]] == [("builtin", "corrreg"), ("file", "corrreg")]
    for name in ("builtin", "file"):
        assert len(read_results(out / name / "results.csv")) == 2
        assert json.loads((out / name / "run.json").read_text())["cell"]["ct"] == name
    assert "10 points of some.csv" in json.loads((out / "file" / "summary.json").read_text())["targets"]
    p = s["pooled"]["intensity"]
    assert p["cases"] == 4 and p["cells"] == 2 and s["cases_per_cell"] == 2
    rows = read_results(out / "builtin" / "results.csv") + read_results(out / "file" / "results.csv")
    assert p["sr_1mm"] == pytest.approx(np.mean([r["success_1mm"] for r in rows]))
    assert p["runtime_median_s"] == pytest.approx(float(np.median([r["wall_time_s"] for r in rows])))
    md = (out / "summary.md").read_text()
    assert "| builtin | corrreg | intensity | 2 |" in md and "| **pooled** (2 cells) | all | intensity | 4 |" in md
    assert json.loads((out / "summary.json").read_text())["pooled"]["intensity"]["cases"] == 4
    # a second run resumes every cell and registers nothing
    assert main(argv) == 0
    again = json.loads([line for line in capsys.readouterr().out.splitlines() if line.strip()][-1])
    assert again["rows_run"] == 0 and again["rows_reused"] == 4


def test_pooling_refuses_cells_of_different_cases(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seed in ((a, 5), (b, 6)):
        run_benchmark(config(cases=1, seed=seed, start="truth"), d, options=TINY, progress=False, plots=False)
    ca, cb = load_cell(a), load_cell(b)
    with pytest.raises(ValueError, match="cases differ in seed"):
        summarize_cells([ca, cb])
    with pytest.raises(ValueError, match="both CT 'phantom' with source 'corrreg'"):
        summarize_cells([ca, ca])
    one = summarize_cells([ca])
    assert one["cases_per_cell"] == 1 and one["pooled"]["intensity"]["worst_cell"] == "phantom / corrreg"
    with pytest.raises(ValueError, match="1 complete cases"):
        summarize_cells([ca], n_cases=2)


# --------------------------------------------------------------------------------------------
# The independent renderers (Testing/Benchmarks/xray_sources.py; nanodrr and diffdrr run only in
# the benchmark environment and skip elsewhere)


def _source(name):
    import importlib.util

    if name != "corrreg":
        for module in {"nanodrr": ("nanodrr",), "diffdrr": ("diffdrr", "pandas")}[name]:
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{module} is not installed (benchmark environment only)")
    return get_source(name, default_sources_file())


def test_sources_file_imports_without_the_renderers():
    module = load_sources_file(default_sources_file())
    assert set(module.SOURCES) == {"nanodrr", "diffdrr"}


@pytest.mark.parametrize("name", ["corrreg", "nanodrr", "diffdrr"])
def test_source_geometry_blobs_land_where_project_points_says(name):
    """Point-like bright voxels in an oblique CT (rotated direction with a flipped axis, anisotropic
    voxels, off-origin), seen at an oblique C-arm pose by a non-square detector with anisotropic
    pixels and an off-centre principal point: each blob's image centroid lies within 0.15 px of
    geometry.project_points (a flipped axis, a swapped W/H or a half-pixel shift all fail)."""
    from CorrRegLib.geometry import c_arm_pose, euler_to_rotation, project_points
    from CorrRegLib.volume import Volume

    source = _source(name)
    rot = euler_to_rotation(torch.tensor([10.0, -20.0, 15.0], dtype=torch.float64))
    direction = rot @ torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    hu = torch.full((40, 36, 44), -1000.0)  # (K, J, I)
    hu[0, 0, 0], hu[0, 0, 1] = -500.0, 0.0  # a little soft tissue: DiffDRR's map needs an HU range
    blobs = [(20, 18, 22), (14, 22, 28), (26, 12, 15), (17, 15, 18)]
    for k, j, i in blobs:
        hu[k, j, i] = 3000.0
    vol = Volume.from_hu(hu, (2.0, 1.5, 2.5), origin=(-40.0, 25.0, -60.0), direction=direction)
    cam = Camera(900.0, (1.2, 1.0), (96, 72), principal_point=(96 / 2 + 5, 72 / 2 - 3))
    pose = c_arm_pose(vol.center_lps(), 600.0, 30.0, 15.0).double()
    img = source.renderer(SourceCT(hu, vol), cam, torch.device("cpu"))(pose)
    assert img.shape == (72, 96) and img.dtype == torch.float32
    centres = torch.tensor([[i, j, k, 1.0] for k, j, i in blobs], dtype=torch.float64) @ vol.lps_from_index().T
    predicted = project_points(cam, pose, centres[:, :3])
    for (u, v) in predicted.tolist():
        r0, c0 = int(v), int(u)
        near = img[r0 - 6:r0 + 7, c0 - 6:c0 + 7]
        dr, dc = divmod(int(near.argmax()), near.shape[1])
        r, c = r0 - 6 + dr, c0 - 6 + dc
        assert float(img[r, c]) > 0.5 * float(img.max())  # the blob, not the background
        win = img[r - 3:r + 4, c - 3:c + 4].clamp(min=0)
        rr, cc = torch.meshgrid(torch.arange(r - 3, r + 4), torch.arange(c - 3, c + 4), indexing="ij")
        got_u, got_v = float((win * (cc + 0.5)).sum() / win.sum()), float((win * (rr + 0.5)).sum() / win.sum())
        assert math.hypot(got_u - u, got_v - v) < 0.15, (name, (u, v), (got_u, got_v))


@pytest.mark.parametrize("name", ["nanodrr", "diffdrr"])
def test_source_renders_the_phantom_like_ours_but_not_identically(name, phantom):
    """Same pose, same CT: the line integrals correlate almost perfectly (far better than ours at
    another case's pose) but are not equal: each renderer applies its own HU conversion."""
    source = _source(name)
    proto = get_protocol("paper", detector_downsample=4.0)
    cases = make_cases(proto, phantom.volume.bone_center_lps(), 2, seed=0)
    ct = SourceCT(phantom.hu, phantom.volume)
    cpu = torch.device("cpu")
    ours = get_source("corrreg").renderer(ct, proto.camera, cpu)
    theirs = source.renderer(ct, proto.camera, cpu)(cases[0].true_pose)
    assert theirs.shape == (64, 64)

    def ncc(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    same_pose = ncc(theirs, ours(cases[0].true_pose))
    assert 0.98 < same_pose < 0.9995, same_pose
    assert ncc(theirs, ours(cases[1].true_pose)) < 0.96
    assert 0.8 < float(theirs.mean() / ours(cases[0].true_pose).mean()) < 1.25  # attenuation units, not [0, 1]


def test_benchmark_with_an_independent_source(tmp_path):
    """A run whose X-rays come from nanodrr (else DiffDRR): its name and version in the fingerprint."""
    import importlib.util

    name = next((n for n in ("nanodrr", "diffdrr") if importlib.util.find_spec(n) is not None), None)
    if name is None:
        pytest.skip("neither nanodrr nor diffdrr is installed (benchmark environment only)")
    from importlib.metadata import version

    out = tmp_path / name
    s = run_benchmark(config(cases=1, xray_source=name, start="truth"), out, options=TINY, progress=False, plots=False)
    fp = json.loads((out / "run.json").read_text())["fingerprint"]["xray_source"]
    assert fp["name"] == name and fp["version"] == version(name) and "hu_conversion" in fp
    assert s["methods"]["intensity"]["cases"] == 1 and f"{name} {version(name)}" in (out / "summary.md").read_text()


# --------------------------------------------------------------------------------------------
# The developer set and the run script (Testing/Benchmarks)


def _bench_module(name):
    import importlib

    here = str(Path(__file__).resolve().parents[1] / "Benchmarks")
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def test_developer_set_resampling_and_crops_keep_the_patient_frame():
    mds = _bench_module("make_developer_set")
    assert mds.paper_fov_mm() == pytest.approx(256 * 0.798 * 700 / 1011.7)
    k, j, i = np.mgrid[0:20, 0:30, 0:40]
    hu = np.where((i - 20) ** 2 + (j - 15) ** 2 + ((k - 10) * 2.5 / 0.7) ** 2 < 64, 1000.0, -1000.0).astype(np.float32)
    hu[0, 0, 0] = -2048.0  # padding outside the scan: clamped, so it does not bleed into the smoothing
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((0.7, 0.7, 2.5))
    img.SetOrigin((-10.0, 20.0, -30.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    lab = sitk.GetImageFromArray((hu > 0).astype(np.uint8) * 30)
    lab.CopyInformation(img)
    r, rl = mds.resample(img, 3.0, False), mds.resample(lab, 3.0, True)
    assert r.GetSpacing() == (3.0, 3.0, 3.0) and r.GetDirection() == img.GetDirection()
    assert np.allclose(mds.extent_mm(r), [27.0, 21.0, 51.0], atol=1.6)  # same box, whole voxels
    # the voxel grids share their corner (the box's edge)
    def corner(im):
        return np.array(im.GetOrigin()) - np.array(im.GetDirection()).reshape(3, 3) @ (np.array(im.GetSpacing()) / 2)
    assert np.allclose(corner(r), corner(img))
    assert set(np.unique(sitk.GetArrayFromImage(rl))) <= {0, 30}  # nearest neighbour: labels stay labels
    assert sitk.GetArrayFromImage(r).min() >= -1024.0
    # the ball's centre stays where it was (LPS), and its mass is kept by the anti-aliased resampling
    def centroid(im):
        a = sitk.GetArrayFromImage(im) + 1000.0
        kji = np.argwhere(a > -1e9)
        w = a[tuple(kji.T)]
        ijk = (kji[:, ::-1] * w[:, None]).sum(0) / w.sum()
        return np.array(im.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    assert np.allclose(centroid(r), centroid(img), atol=0.3)
    c = mds.crop(img, np.array([20.0, 15.0, 10.0]), 10.0)
    assert c.GetSize() == (14, 14, 4)
    p = c.TransformIndexToPhysicalPoint((3, 4, 2))
    assert sitk.GetArrayFromImage(c)[2, 4, 3] == hu[tuple(img.TransformPhysicalPointToIndex(p))[::-1]]
    big = mds.crop(img, np.array([1.0, 1.0, 1.0]), 1000.0)  # clipped to the image
    assert big.GetSize() == img.GetSize()


def test_run_script_builds_one_job_per_cell_and_source(tmp_path):
    rg = _bench_module("run_generalisation")
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps([
        {"name": "a", "ct": "a.nii.gz", "targets": "a_mask.nii.gz", "target_labels": "29-31", "xray_ct": "full.nii.gz"},
        {"name": "b", "ct": "phantom", "phantom_spacing_mm": 3, "model": "/m/b"}]))
    out = tmp_path / "out"
    import argparse

    args = argparse.Namespace(
        methods="intensity,hybrid", sources="corrreg,nanodrr", out=str(out), models=None, no_train=False,
        train_steps=20, train_lr=2e-3, protocol="paper", cases=3, seed=0, detector_downsample=2.0, threads=1)
    cells = read_manifest(m)
    python = ["py", "-m", "CorrRegLib.cli"]
    models, trains = rg.model_jobs(cells, args, python)
    assert [j.name for j in trains] == ["train_a"] and models == {"a": str(out / "models" / "a"), "b": "/m/b"}
    assert trains[0].argv[:5] == python + ["train", "--ct"] and "--resume" not in trains[0].argv
    jobs = rg.cell_jobs(cells, models, args, python, trains)
    assert [j.name for j in jobs] == ["corrreg_a", "corrreg_b", "nanodrr_a", "nanodrr_b"]
    a = jobs[2].argv
    assert a[a.index("--xray-source") + 1] == "nanodrr" and a[a.index("--out") + 1] == str(out / "nanodrr" / "a")
    assert a[a.index("--xray-ct") + 1] == str(tmp_path / "full.nii.gz") and a[a.index("--target-labels") + 1] == "29,30,31"
    assert a[a.index("--model") + 1] == str(out / "models" / "a") and jobs[2].after == ["train_a"]
    b = jobs[1].argv
    assert b[b.index("--phantom-spacing") + 1] == "3.0" and "--xray-ct" not in b and jobs[1].after == []
    # intensity alone needs no model: nothing to train
    args.methods = "intensity"
    models, trains = rg.model_jobs(cells, args, python)
    assert trains == [] and models == {"a": None, "b": "/m/b"}


def test_run_script_runs_jobs_in_parallel_and_skips_dependants_of_failures(tmp_path):
    rg = _bench_module("run_generalisation")
    stamp = tmp_path / "stamps"
    stamp.mkdir()

    def job(name, code, after=(), cost=0.0):
        script = (f"import time, pathlib; p = pathlib.Path({str(stamp)!r}); (p / '{name}.start').touch(); "
                  f"time.sleep(0.6); (p / '{name}.end').touch(); raise SystemExit({code})")
        return rg.Job(name, [sys.executable, "-c", script], cost=cost, after=list(after))

    jobs = [job("t1", 0, cost=3), job("t2", 1, cost=2), job("c1", 0, ["t1"]), job("c2", 0, ["t2"]), job("x", 0)]
    failed = rg.run_jobs(jobs, 2, 1, tmp_path / "logs")
    assert sorted(failed) == ["c2", "t2"]
    assert not (stamp / "c2.start").exists() and (stamp / "c1.end").exists() and (stamp / "x.end").exists()
    assert (stamp / "c1.start").stat().st_mtime >= (stamp / "t1.end").stat().st_mtime  # after its prerequisite
    # the two largest started together (2 at a time)
    assert abs((stamp / "t1.start").stat().st_mtime - (stamp / "t2.start").stat().st_mtime) < 0.5
    assert (tmp_path / "logs" / "t2.log").read_text().startswith(sys.executable)
