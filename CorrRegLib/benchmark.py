"""Accuracy benchmark: every registration method on identical, seeded, simulated cases.

A run fixes a CT, its targets, a protocol (camera, reference view, initial-offset
distribution; see protocols.py and DESIGN.md), a seed and the X-ray simulation. Case ``i``
(ground-truth pose, initial pose, noise seed, and so the simulated X-ray) depends only on
(seed, i), so every method is measured on the same cases, a longer run extends a shorter one,
and an interrupted run resumes exactly.

Outputs in the run folder (docs/benchmark.md describes every field):

* ``run.json``: the run's parameters; a resume with different ones is refused;
* ``results.csv``: one row per (case, method), appended and flushed as each finishes;
* ``summary.json`` / ``summary.md``: per method success rates at 10 / 2 / 1 mm, top-X% mTRE,
  percentiles, median wall time, capture range;
* ``cumulative_mtre.png``, ``capture_range.png``, ``gallery.png``.

The methods are the rows of :data:`METHODS`, the one table that maps a benchmark name to a
``register()`` call.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .geometry import Camera
from .metrics import SUCCESS_THRESHOLDS_MM, capture_range, mpd, mtre, percentiles, rotation_translation_error, summarize
from .protocols import Case, Protocol, get_protocol, make_cases
from .register import RegistrationOptions, register
from .volume import MU_WATER_PER_MM, Volume

Tensor = torch.Tensor

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The methods: benchmark name -> register() call


@dataclass(frozen=True)
class MethodSpec:
    """How a benchmark method calls ``register``: its ``method`` and option overrides."""

    register_method: str
    options: dict = field(default_factory=dict)
    needs_model: bool = False
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    "intensity": MethodSpec("intensity", {}, False, "coarse-to-fine gradient refinement (NCC, then patch NCC)"),
    "cmaes": MethodSpec("cmaes", {}, False, "CMA-ES global search, then the gradient refinement"),
    "cmaes_only": MethodSpec("cmaes", {"refine": False}, False, "CMA-ES global search alone (no refinement)"),
    "network": MethodSpec("network", {}, True, "network-guided descent alone (the learned similarity)"),
    "network_only": MethodSpec("network", {"refine": False}, True, "the same as network (an alias)"),
    "hybrid": MethodSpec("hybrid", {}, True, "network-guided descent, then the intensity refinement"),
    "hybrid_cmaes": MethodSpec("hybrid", {"hybrid_cmaes": True}, True,
                               "network-guided descent, a local CMA-ES search, then the intensity refinement"),
}

#: Simulated X-ray of every case (keyword arguments of simulate.simulate_xray); the noise seed
#: is drawn per case. Realistic degradations, so no method gets an exact-model advantage.
DEFAULT_XRAY = {"dose": 1e4, "blur_mm": 0.6, "gamma": 1.0, "heel": 0.1, "scatter": 0.1}

#: Where a registration starts: the protocol's perturbed pose, or the ground truth itself
#: ("truth": a sanity check; every method should then stay at mTRE ~ 0).
STARTS = ("initial", "truth")

CSV_FIELDS = (
    "case", "method", "initial_mtre_mm", "final_mtre_mm", "initial_mpd_mm", "final_mpd_mm",
    "initial_rotation_error_deg", "initial_translation_error_mm", "rotation_error_deg", "translation_error_mm",
    "success_10mm", "success_2mm", "success_1mm", "iterations", "wall_time_s", "registration_time_s",
    "flagged", "message", "noise_seed", "final_pose",
)


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"intensity,cmaes"`` (or a list) -> validated, de-duplicated method names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    if not names:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def parse_labels(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"29-46"``, ``"1,3,5-7"`` or a list of ints -> a tuple of label values."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or lo < 0:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--target-labels: cannot read {part!r}; use values and ranges like 29-46 or 1,3,5-7") from None
    if not out:
        raise ValueError("--target-labels is empty")
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# Configuration and set-up (all input checks happen here, before any registration)


@dataclass
class BenchmarkConfig:
    protocol: str = "moderate"
    cases: int = 20
    seed: int = 0
    methods: tuple[str, ...] = ("intensity",)
    detector_downsample: float = 2.0  # 2: 128 x 128 pixels of 1.596 mm for the paper camera
    ct: str | None = None  # None or "phantom": the built-in spine phantom
    targets: str | None = None  # markups JSON, CSV, label map; None: see prepare()
    target_labels: tuple[int, ...] | None = None
    model: str | None = None
    device: str = "auto"
    start: str = "initial"
    xray: dict = field(default_factory=lambda: dict(DEFAULT_XRAY))
    phantom_spacing_mm: float = 2.5
    n_bone_targets: int = 20
    ct_is_hu: bool = True


@dataclass
class BenchmarkSetup:
    config: BenchmarkConfig
    protocol: Protocol
    volume: Volume
    targets: Tensor  # (N, 3) LPS mm
    target_names: list[str]
    targets_description: str
    ct_description: str
    isocenter: Tensor
    device: torch.device
    model_dir: str | None
    fingerprint: dict


def _is_phantom(ct: str | None) -> bool:
    return ct is None or str(ct).lower() == "phantom"


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def _volume_hash(volume: Volume) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(volume.data.detach().cpu().float().numpy()).tobytes())
    h.update(json.dumps([volume.spacing, volume.origin, volume.direction]).encode())
    return h.hexdigest()[:16]


def check_targets_inside(volume: Volume, points: Tensor, what: str = "targets") -> None:
    """Raise if any target lies outside the CT's extent (voxel borders)."""
    m = volume.index_from_lps()
    ijk = points.double() @ m[:3, :3].T + m[:3, 3]
    size = torch.tensor(volume.shape_ijk, dtype=torch.float64)
    outside = ((ijk < -0.5 - 1e-6) | (ijk > size - 0.5 + 1e-6)).any(dim=1)
    if bool(outside.any()):
        k = int(outside.nonzero()[0, 0])
        corners = volume.corners_lps()
        lo, hi = corners.min(0).values, corners.max(0).values
        raise ValueError(
            f"{int(outside.sum())} of {len(points)} {what} lie outside the CT's extent (LPS x {lo[0]:.1f}..{hi[0]:.1f}, "
            f"y {lo[1]:.1f}..{hi[1]:.1f}, z {lo[2]:.1f}..{hi[2]:.1f} mm), e.g. point {k} at "
            f"({', '.join(f'{v:.1f}' for v in points[k].tolist())}); targets must be LPS mm in the CT's frame "
            "(a RAS file needs r,a,s columns or a markups coordinateSystem)"
        )


def bone_voxel_targets(volume: Volume, n: int = 20, seed: int = 0) -> Tensor:
    """A fixed seeded sample of ``n`` voxel centres denser than 1.5 x water attenuation (LPS)."""
    idx = (volume.data > 1.5 * MU_WATER_PER_MM).nonzero()
    if idx.shape[0] == 0:
        raise ValueError("the CT has no bone (no voxel above 1.5 x water attenuation); give --targets")
    rng = np.random.default_rng(seed)
    pick = rng.choice(idx.shape[0], size=min(n, idx.shape[0]), replace=False)
    kji = idx[torch.as_tensor(np.sort(pick))].double().cpu()
    ijk1 = torch.cat([kji.flip(1), torch.ones(len(kji), 1, dtype=torch.float64)], 1)
    return (ijk1 @ volume.lps_from_index().T)[:, :3]


@functools.lru_cache(maxsize=2)
def _phantom(spacing_mm: float):
    from .phantom import make_spine_phantom

    return make_spine_phantom(spacing_mm=spacing_mm, seed=0)  # deterministic: built once per process


def _load_ct(config: BenchmarkConfig):
    """(volume, default targets or None, default targets' names, description)."""
    if _is_phantom(config.ct):
        ph = _phantom(float(config.phantom_spacing_mm))
        desc = f"built-in spine phantom (L1-L5, {config.phantom_spacing_mm:g} mm voxels, seed 0)"
        return ph.volume, ph.landmarks.double().clone(), list(ph.landmark_names), desc
    from .io import read_ct

    p = Path(config.ct)
    if not p.exists():
        raise FileNotFoundError(f"CT {p} does not exist")
    vol = read_ct(p, hu=config.ct_is_hu)
    i, j, k = vol.shape_ijk
    return vol, None, None, f"{p} ({i} x {j} x {k} voxels of {' x '.join(f'{s:.3g}' for s in vol.spacing)} mm)"


def _label_map(path: str) -> bool:
    from .io import _suffix  # the same suffix rules as read_targets

    return _suffix(Path(path)) not in (".mrk.json", ".json", ".fcsv", ".csv", ".tsv", ".txt")


def check_model_camera(model_dir: str, camera: Camera) -> dict:
    """Load a trained network (CorrRegLib.train.load_model) and refuse one trained for another
    camera: its config's camera must have the protocol's sdd, detector extent and principal
    point (a downsampled detector, as the network's input size gives, is the same camera)."""
    try:
        from .train import load_model
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ValueError(f"network methods need CorrRegLib.train ({err})") from None
    _, cfg = load_model(model_dir, "cpu")
    cam_d = cfg.get("camera")
    if cam_d is None:
        print(f"corrreg benchmark: warning: {model_dir} does not record the camera it was trained for; "
              "its geometry is not checked", file=sys.stderr)
        return cfg
    cam = Camera.from_dict(cam_d)

    def extent(c: Camera):
        (dx, dy), (cx, cy) = c.pixel_spacing, c.principal_point
        return np.array([c.sdd, c.width * dx, c.height * dy, cx * dx, cy * dy])

    a, b = extent(cam), extent(camera)
    if not np.allclose(a, b, rtol=2e-3, atol=0.05):
        raise ValueError(
            f"the model in {model_dir} was trained for another camera (sdd {cam.sdd:g} mm, detector "
            f"{a[1]:.1f} x {a[2]:.1f} mm, {cam.width} x {cam.height} px) than the protocol's (sdd {camera.sdd:g} mm, "
            f"detector {b[1]:.1f} x {b[2]:.1f} mm, {camera.width} x {camera.height} px); use a model trained "
            "for this camera"
        )
    return cfg


def _bundled_model() -> str | None:
    """The network shipped with the package (register.bundled_model_dir), if any."""
    try:
        from .register import bundled_model_dir
    except ImportError:  # pragma: no cover - older register modules
        return None
    d = bundled_model_dir()
    return None if d is None else str(d)


def prepare(config: BenchmarkConfig) -> BenchmarkSetup:
    """Check every input and load the CT, targets and model; raises ValueError (or
    FileNotFoundError) with a clear message before any case is simulated or registered."""
    from .device import pick_device

    methods = parse_methods(config.methods)
    config.methods = methods
    if config.start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {config.start!r}")
    if int(config.cases) < 1:
        raise ValueError(f"--cases must be at least 1, got {config.cases}")
    if not config.detector_downsample > 0:
        raise ValueError(f"--detector-downsample must be positive, got {config.detector_downsample}")
    protocol = get_protocol(config.protocol, detector_downsample=float(config.detector_downsample))
    model_dir = config.model
    needs_model = [m for m in methods if METHODS[m].needs_model]
    if needs_model and model_dir is None:
        model_dir = _bundled_model()
        if model_dir is None:
            raise ValueError(
                f"method(s) {', '.join(needs_model)} need a trained network: pass --model MODEL_DIR "
                "(train one with `corrreg train`), or drop them from --methods"
            )
    if needs_model:
        check_model_camera(model_dir, protocol.camera)
    if config.targets is not None and not Path(config.targets).exists():
        raise FileNotFoundError(f"targets file {config.targets} does not exist")
    if config.target_labels is not None and (config.targets is None or not _label_map(config.targets)):
        raise ValueError("--target-labels needs --targets to be a label map (NIfTI/NRRD/...)")

    volume, default_pts, default_names, ct_desc = _load_ct(config)
    if config.targets is not None:
        from .io import read_targets

        pts, names = read_targets(config.targets, config.target_labels)
        pts = pts.double()
        if _label_map(config.targets):
            labels = [int(n) if str(n).lstrip("-").isdigit() else n for n in names]
            tdesc = f"centroids of labels {', '.join(str(v) for v in labels)} of {Path(config.targets).name}"
        else:
            tdesc = f"{len(pts)} points of {Path(config.targets).name}"
    elif default_pts is not None:
        pts, names = default_pts, default_names
        tdesc = f"landmarks of the phantom ({len(pts)}: body centre, spinous tip, pedicles, transverse tips of L1-L5)"
    else:
        pts = bone_voxel_targets(volume, config.n_bone_targets, seed=0)
        names = [f"bone{i + 1}" for i in range(len(pts))]
        tdesc = f"fixed sample of bone voxels ({len(pts)} voxels above 1.5 x water attenuation, seed 0)"
    check_targets_inside(volume, pts)
    try:
        iso = volume.bone_center_lps()
    except ValueError:
        iso = volume.center_lps()
    device = pick_device(config.device)
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "protocol": config.protocol,
        "detector_downsample": float(config.detector_downsample),
        "camera": protocol.camera.to_dict(),
        "seed": int(config.seed),
        "start": config.start,
        "ct": "phantom" if _is_phantom(config.ct) else str(Path(config.ct).resolve()),
        "ct_hash": _volume_hash(volume),
        "phantom_spacing_mm": float(config.phantom_spacing_mm) if _is_phantom(config.ct) else None,
        "targets": tdesc,
        "targets_hash": _sha(np.ascontiguousarray(pts.numpy()).tobytes()),
        "xray": {k: config.xray[k] for k in sorted(config.xray)},
        "model": None if model_dir is None else str(Path(model_dir).resolve()),
    }
    return BenchmarkSetup(config, protocol, volume.to(device), pts, list(names), tdesc, ct_desc, iso, device,
                          model_dir, fingerprint)


# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class BenchmarkCase:
    index: int
    true_pose: Tensor
    start_pose: Tensor  # the pose registration starts from (initial, or the truth)
    xray: Tensor  # (H, W) simulated X-ray, CPU
    noise_seed: int
    case: Case


def case_noise_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng([int(seed), int(index), 1]).integers(0, 2**31 - 1))


def generate_cases(setup: BenchmarkSetup, indices: Iterable[int]) -> Iterable[BenchmarkCase]:
    """Simulated cases (lazily, one at a time); case i depends only on (seed, i)."""
    from .projector import Projector
    from .simulate import simulate_xray

    cfg = setup.config
    indices = list(indices)
    if not indices:
        return
    base = make_cases(setup.protocol, setup.isocenter, max(indices) + 1, seed=cfg.seed)
    proj = Projector(setup.volume, setup.protocol.camera, samples_per_voxel=2.0).to(setup.device)
    for i in indices:
        c = base[i]
        ns = case_noise_seed(cfg.seed, i)
        sim = simulate_xray(proj, pose=c.true_pose.to(setup.device), seed=ns, **cfg.xray)
        start = c.true_pose if cfg.start == "truth" else c.initial_pose
        yield BenchmarkCase(i, c.true_pose, start, sim.image.detach().cpu(), ns, c)


def evaluate_pose(setup: BenchmarkSetup, pose: Tensor, truth: Tensor) -> dict:
    pts, cam = setup.targets, setup.protocol.camera
    rot, trans = rotation_translation_error(pose, truth, setup.isocenter)
    return {"mtre": float(mtre(pose, truth, pts)), "mpd": float(mpd(cam, pose, truth, pts)),
            "rot": float(rot), "trans": float(trans)}


def run_method(setup: BenchmarkSetup, case: BenchmarkCase, method: str, options: RegistrationOptions | None = None) -> dict:
    """Register one case with one benchmark method; returns its results.csv row."""
    spec = METHODS[method]
    opts = replace(options or RegistrationOptions(), **spec.options)
    t0 = time.perf_counter()
    try:
        res = register(setup.volume, case.xray.to(setup.device), setup.protocol.camera, case.start_pose,
                       method=spec.register_method, options=opts, model_dir=setup.model_dir, device=setup.device,
                       isocenter=setup.isocenter)
        pose, iterations, flagged, message, reg_time = res.pose, res.iterations, res.flagged, res.message, res.runtime_s
    except ValueError as err:  # e.g. a start pose that shows no anatomy: counted as a failure
        pose, iterations, flagged, message, reg_time = case.start_pose, 0, True, f"error: {err}", 0.0
    wall = time.perf_counter() - t0
    ini = evaluate_pose(setup, case.start_pose, case.true_pose)
    fin = evaluate_pose(setup, pose.detach().cpu().double(), case.true_pose)
    row = {
        "case": case.index, "method": method,
        "initial_mtre_mm": ini["mtre"], "final_mtre_mm": fin["mtre"],
        "initial_mpd_mm": ini["mpd"], "final_mpd_mm": fin["mpd"],
        "initial_rotation_error_deg": ini["rot"], "initial_translation_error_mm": ini["trans"],
        "rotation_error_deg": fin["rot"], "translation_error_mm": fin["trans"],
        "iterations": int(iterations), "wall_time_s": wall, "registration_time_s": float(reg_time),
        "flagged": bool(flagged), "message": str(message).replace("\n", " "), "noise_seed": case.noise_seed,
        "final_pose": json.dumps([round(v, 9) for v in pose.detach().cpu().double().reshape(-1).tolist()]),
    }
    for t in SUCCESS_THRESHOLDS_MM:
        row[f"success_{t:g}mm"] = bool(fin["mtre"] < t)
    return row


# --------------------------------------------------------------------------------------------
# results.csv


_INT = {"case", "iterations", "noise_seed"}
_BOOL = {"success_10mm", "success_2mm", "success_1mm", "flagged"}
_STR = {"method", "message", "final_pose"}


def _parse_row(raw: dict) -> dict | None:
    if raw is None or any(raw.get(k) in (None, "") for k in CSV_FIELDS if k != "message"):
        return None
    out = {}
    try:
        for k in CSV_FIELDS:
            v = raw[k]
            if k in _INT:
                out[k] = int(v)
            elif k in _BOOL:
                if v not in ("True", "False"):
                    return None
                out[k] = v == "True"
            elif k in _STR:
                out[k] = v
            else:
                out[k] = float(v)
        json.loads(out["final_pose"])
    except (ValueError, KeyError, TypeError):
        return None
    return out


def read_results(path: str | Path) -> list[dict]:
    """The complete rows of a results.csv (a row cut short by an interruption is dropped)."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if tuple(reader.fieldnames) != CSV_FIELDS:
            raise ValueError(f"{p} has columns {reader.fieldnames}, not those of this CorrReg version; use a new --out")
        rows = [_parse_row(r) for r in reader]
    return [r for r in rows if r is not None]


def _format(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)


class _ResultsWriter:
    def __init__(self, path: Path, rows: list[dict]):
        self.path = path
        # Rewrite the file with the complete rows (drops a line cut short by an interruption).
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: _format(r[k]) for k in CSV_FIELDS})
        os.replace(tmp, path)
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, CSV_FIELDS)

    def append(self, row: dict) -> None:
        self.w.writerow({k: _format(row[k]) for k in CSV_FIELDS})
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------------------------
# Summary


def summarize_rows(rows: Sequence[dict], methods: Sequence[str], n_cases: int) -> dict:
    """Per-method statistics of the rows of cases 0..n_cases-1 (DESIGN.md metrics)."""
    out = {}
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m and r["case"] < n_cases), key=lambda r: r["case"])
        ini = [r["initial_mtre_mm"] for r in rs]
        fin = [r["final_mtre_mm"] for r in rs]
        s = summarize(ini, fin)
        bins, cap = capture_range(ini, fin)
        wall = [r["wall_time_s"] for r in rs]
        s.update({
            "runtime_median_s": float(np.median(wall)) if wall else float("nan"),
            "runtime_mean_s": float(np.mean(wall)) if wall else float("nan"),
            "mpd_median_mm": percentiles([r["final_mpd_mm"] for r in rs], (50,))[50],
            "rotation_error_median_deg": percentiles([r["rotation_error_deg"] for r in rs], (50,))[50],
            "translation_error_median_mm": percentiles([r["translation_error_mm"] for r in rs], (50,))[50],
            "flagged": int(sum(r["flagged"] for r in rs)),
            "capture_range_mm": cap,
            "capture_bins": bins,
            "description": METHODS[m].description if m in METHODS else "",
        })
        out[m] = s
    return out


def _initial_stats(rows: Sequence[dict], n_cases: int) -> dict:
    per_case = {}
    for r in rows:
        if r["case"] < n_cases:
            per_case[r["case"]] = r["initial_mtre_mm"]
    v = list(per_case.values())
    p = percentiles(v)
    return {"cases": len(v), "mean": float(np.mean(v)) if v else float("nan"), "median": p[50], "p75": p[75],
            "p95": p[95], "max": float(np.max(v)) if v else float("nan")}


def _fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


TABLE_HEADER = ("| method | cases | SR 10 mm | SR 2 mm | SR 1 mm | top-50% mTRE | top-75% mTRE | top-95% mTRE "
                "| median | p75 | p95 | median time (s) |")
TABLE_RULE = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def table_row(name: str, s: dict) -> str:
    """One markdown table row (mTRE in mm) of a method's summary; the peer scripts use it too."""
    def pm(k):
        return f"{_fmt(s[f'mtre_{k}_mean'])} +- {_fmt(s[f'mtre_{k}_std'])}"

    return (f"| {name} | {s['cases']} | {100 * s['sr_10mm']:.0f}% | {100 * s['sr_2mm']:.0f}% | {100 * s['sr_1mm']:.0f}% "
            f"| {pm('top50')} | {pm('top75')} | {pm('top95')} | {_fmt(s['mtre_median'])} | {_fmt(s['mtre_p75'])} "
            f"| {_fmt(s['mtre_p95'])} | {_fmt(s['runtime_median_s'], 1)} |")


def format_table(methods: dict) -> str:
    return "\n".join([TABLE_HEADER, TABLE_RULE] + [table_row(n, s) for n, s in methods.items()])


def _camera_text(cam: Camera, factor: float) -> str:
    return (f"{cam.width} x {cam.height} px of {cam.pixel_spacing[0]:.4g} mm (the paper camera's 256 x 256 at 0.798 mm "
            f"downsampled {factor:g}x), sdd {cam.sdd:g} mm")


def write_summary_md(path: Path, summary: dict) -> None:
    s = summary
    ini = s["initial_mtre"]
    lines = [
        f"# CorrReg benchmark: protocol `{s['protocol']}`, {s['cases']} cases, seed {s['seed']}",
        "",
        f"* CT: {s['ct']}",
        f"* targets (mTRE): {s['targets']}",
        f"* detector: {s['detector']}; sod {s['sod_mm']:g} mm",
        f"* X-rays: simulated per case with {', '.join(f'{k}={v:g}' for k, v in s['xray'].items())} and a per-case noise seed",
        f"* start: {'the protocol initial pose' if s['start'] == 'initial' else 'the ground-truth pose (sanity check)'}; "
        f"initial mTRE median {_fmt(ini['median'])} mm, p75 {_fmt(ini['p75'])}, p95 {_fmt(ini['p95'])}, max {_fmt(ini['max'])}",
        f"* command: `{s.get('command', '')}`; device {s.get('device')}, {s.get('torch_threads')} torch threads "
        "(wall times depend on the machine's load)",
        "",
        "mTRE in mm; SR = share of cases with final mTRE below 10 / 2 / 1 mm; top-X% = mean +- std over the X% best "
        "cases; time = wall-clock seconds per registration (median).",
        "",
        format_table(s["methods"]),
        "",
        "Capture range (largest initial mTRE below which >= 95% of cases succeed at 2 mm) and success rate at 2 mm per "
        "initial-mTRE bin:",
        "",
    ]
    for name, m in s["methods"].items():
        bins = ", ".join(f"{b['lo_mm']:.0f}-{b['hi_mm']:.0f} mm: {_fmt(100 * b['success_rate'], 0) if b['cases'] else '-'}"
                         f"{'%' if b['cases'] else ''} ({b['cases']})" for b in m["capture_bins"])
        lines.append(f"* {name}: capture range {m['capture_range_mm']:g} mm; {bins}; flagged {m['flagged']}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Plots


def save_plots(out: Path, setup: BenchmarkSetup, rows: list[dict], methods: Sequence[str], n_cases: int) -> list[str]:
    """cumulative_mtre.png, capture_range.png, gallery.png (needs matplotlib)."""
    from .visualize import _pyplot, overlay_rgb, save_figure

    plt = _pyplot()
    files = []
    rows = [r for r in rows if r["case"] < n_cases]
    by_m = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["case"]) for m in methods}
    by_m = {m: rs for m, rs in by_m.items() if rs}
    if not by_m:
        return files
    # cumulative mTRE
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    allv = [r["final_mtre_mm"] for r in rows] + [r["initial_mtre_mm"] for r in rows]
    lo = max(1e-3, min(v for v in allv if v > 0) * 0.8) if any(v > 0 for v in allv) else 1e-3
    hi = max(allv) * 1.2 if allv else 100.0
    for m, rs in by_m.items():
        v = np.sort([r["final_mtre_mm"] for r in rs])
        y = np.arange(1, len(v) + 1) / len(v)
        ax.step(np.concatenate([[lo], np.maximum(v, lo)]), np.concatenate([[0], y]), where="post", label=m)
    iv = np.sort(list({r["case"]: r["initial_mtre_mm"] for r in rows}.values()))
    ax.step(np.concatenate([[lo], np.maximum(iv, lo)]), np.concatenate([[0], np.arange(1, len(iv) + 1) / len(iv)]),
            where="post", color="grey", ls="--", label="initial")
    for t in SUCCESS_THRESHOLDS_MM:
        ax.axvline(t, color="k", lw=0.6, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mTRE (mm)")
    ax.set_ylabel("fraction of cases with mTRE <= x")
    ax.set_title(f"protocol {setup.config.protocol}, {n_cases} cases", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "cumulative_mtre.png")
    files.append("cumulative_mtre.png")
    # capture range
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    width = 10.0 / (len(by_m) + 1)
    for k, (m, rs) in enumerate(by_m.items()):
        bins, cap = capture_range([r["initial_mtre_mm"] for r in rs], [r["final_mtre_mm"] for r in rs])
        x = [b["lo_mm"] + width * (k + 0.5) for b in bins]
        y = [b["success_rate"] if b["cases"] else 0.0 for b in bins]
        ax.bar(x, y, width=width, align="edge", label=f"{m} (capture range {cap:g} mm)")
    ax.set_xlabel("initial mTRE (mm), 10 mm bins")
    ax.set_ylabel("success rate (final mTRE < 2 mm)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, out / "capture_range.png")
    files.append("capture_range.png")
    # gallery: best, median, worst case of each method (DRR edges at the final pose on the X-ray)
    from .projector import Projector

    picks = {}
    for m, rs in by_m.items():
        o = sorted(rs, key=lambda r: r["final_mtre_mm"])
        picks[m] = [("best", o[0]), ("median", o[len(o) // 2]), ("worst", o[-1])]
    needed = sorted({r["case"] for ps in picks.values() for _, r in ps})
    xrays = {c.index: c.xray for c in generate_cases(setup, needed)}
    # Edges of a bone-only DRR: the full DRR's strongest edges are the CT box's borders.
    vol = setup.volume
    bone = replace(vol, data=torch.where(vol.data > 1.5 * MU_WATER_PER_MM, vol.data, torch.zeros_like(vol.data)))
    cam = setup.protocol.camera
    proj = Projector(bone, cam).to(setup.device)
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3.1 * len(picks)), dpi=100, squeeze=False)
    for row_axes, (m, ps) in zip(axes, picks.items()):
        for ax, (label, r) in zip(row_axes, ps):
            pose = torch.tensor(json.loads(r["final_pose"]), dtype=torch.float64).reshape(4, 4)
            with torch.no_grad():
                drr = proj(pose.float().to(setup.device)).reshape(cam.height, cam.width).cpu()
            ax.imshow(overlay_rgb(xrays[r["case"]], drr), interpolation="nearest")
            ax.set_title(f"{m}: {label}, case {r['case']}\nmTRE {r['initial_mtre_mm']:.1f} -> {r['final_mtre_mm']:.2f} mm",
                         fontsize=8)
            ax.axis("off")
    fig.suptitle("edges of the bone DRR (red) at the registered pose on the simulated X-ray", fontsize=9)
    save_figure(fig, out / "gallery.png")
    files.append("gallery.png")
    return files


# --------------------------------------------------------------------------------------------
# The run


def _check_resume(path: Path, fingerprint: dict) -> None:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}); remove it or use a new --out") from None
    old_fp = old.get("fingerprint", {})
    diff = [k for k in sorted(set(old_fp) | set(fingerprint)) if old_fp.get(k) != fingerprint.get(k)]
    if diff:
        details = "; ".join(f"{k}: {old_fp.get(k)!r} before, {fingerprint.get(k)!r} now" for k in diff)
        raise ValueError(
            f"cannot resume in {path.parent}: the run there has different parameters ({details}). The cases would "
            "not be the same; use a new --out, or repeat the original parameters (--cases and --methods may change)"
        )


def run_benchmark(
    config: BenchmarkConfig,
    out_dir: str | Path,
    options: RegistrationOptions | None = None,
    progress: bool = True,
    plots: bool = True,
    on_row: Callable[[dict], None] | None = None,
    command: str | None = None,
) -> dict:
    """Run (or resume) a benchmark into ``out_dir``; returns the summary dict (summary.json).

    ``options`` are the RegistrationOptions every method starts from (each method's overrides
    in :data:`METHODS` apply on top); they are part of the run's identity. ``on_row`` is called
    with each new results.csv row after it is written.
    """
    setup = prepare(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = options or RegistrationOptions()
    fingerprint = dict(setup.fingerprint, registration_options=repr(opts))
    run_path = out / "run.json"
    csv_path = out / "results.csv"
    if run_path.exists():
        _check_resume(run_path, fingerprint)
    elif csv_path.exists():
        raise ValueError(f"{csv_path} exists without its run.json; use a new --out")
    rows = read_results(csv_path)
    methods = list(config.methods)
    n = int(config.cases)
    run_info = {"fingerprint": fingerprint, "cases": max(n, max((r["case"] + 1 for r in rows), default=0)),
                "methods": sorted(set(methods) | {r["method"] for r in rows}), "command": command,
                "torch": torch.__version__, "device": str(setup.device), "torch_threads": torch.get_num_threads()}
    tmp = run_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run_info, indent=2), encoding="utf-8")
    os.replace(tmp, run_path)

    done = {(r["case"], r["method"]) for r in rows}
    todo = [i for i in range(n) if any((i, m) not in done for m in methods)]
    writer = _ResultsWriter(csv_path, rows)
    ran = 0
    try:
        from tqdm.auto import tqdm

        with tqdm(total=n, initial=n - len(todo), desc=f"benchmark {config.protocol}", unit="case", file=sys.stderr,
                  disable=not progress) as bar:
            for case in generate_cases(setup, todo):
                for m in methods:
                    if (case.index, m) in done:
                        continue
                    row = run_method(setup, case, m, opts)
                    writer.append(row)
                    rows.append(row)
                    done.add((case.index, m))
                    ran += 1
                    bar.set_postfix_str(f"case {case.index} {m}: {row['initial_mtre_mm']:.1f} -> "
                                        f"{row['final_mtre_mm']:.2f} mm")
                    if on_row is not None:
                        on_row(row)
                bar.update(1)
    finally:
        writer.close()
    summary = build_summary(setup, rows, methods, n, command)
    summary["rows_run"] = ran
    summary["rows_reused"] = sum(1 for r in rows if r["case"] < n and r["method"] in methods) - ran
    files = {"results": "results.csv", "summary_md": "summary.md", "summary_json": "summary.json", "run": "run.json"}
    if plots:
        try:
            for f in save_plots(out, setup, rows, methods, n):
                files[Path(f).stem] = f
        except ImportError as err:
            print(f"corrreg benchmark: no plots ({err})", file=sys.stderr)
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_summary_md(out / "summary.md", summary)
    return summary


def build_summary(setup: BenchmarkSetup, rows: list[dict], methods: Sequence[str], n: int, command: str | None = None) -> dict:
    cfg = setup.config
    return {
        "protocol": cfg.protocol,
        "cases": n,
        "seed": int(cfg.seed),
        "start": cfg.start,
        "detector_downsample": float(cfg.detector_downsample),
        "detector": _camera_text(setup.protocol.camera, float(cfg.detector_downsample)),
        "camera": setup.protocol.camera.to_dict(),
        "sod_mm": setup.protocol.sod,
        "ct": setup.ct_description,
        "targets": setup.targets_description,
        "n_targets": int(len(setup.targets)),
        "xray": dict(cfg.xray),
        "isocenter_lps": [float(v) for v in setup.isocenter.tolist()],
        "initial_mtre": _initial_stats(rows, n),
        "device": str(setup.device),
        "torch_threads": torch.get_num_threads(),
        "methods": summarize_rows(rows, methods, n),
        "command": command,
    }
