"""What a benchmark run is: its methods, its configuration, and ``prepare`` (every input check).

A run (one *cell*) fixes a CT, its targets, a protocol (camera, reference view, initial-offset
distribution; protocols.py, DESIGN.md), a seed, the X-ray source and its degradations. ``prepare``
checks all of it and loads the CT, the CT the X-rays are rendered from, the targets, the model and
the source before any case is simulated, and computes the run's fingerprint (its identity).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..geometry import Camera
from ..protocols import Protocol, get_protocol
from ..volume import BONE_MU_PER_MM, Volume, attenuation_to_hu
from .sources import SourceCT, XraySource, get_source

Tensor = torch.Tensor

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# The methods: benchmark name -> register() call


@dataclass(frozen=True)
class MethodSpec:
    """How a benchmark method calls ``register``: its ``method`` and option overrides.

    ``needs_model``: the method cannot run without a network (``--model``, else the bundled one).
    ``optional_model``: the method is given the run's ``--model`` when there is one, and nothing
    otherwise (never the bundled network): ``auto`` decides from that what runs.
    """

    register_method: str
    options: dict = field(default_factory=dict)
    needs_model: bool = False
    description: str = ""
    optional_model: bool = False


METHODS: dict[str, MethodSpec] = {
    "intensity": MethodSpec("intensity", {}, False, "coarse-to-fine gradient refinement (NCC, then patch NCC)"),
    "cmaes": MethodSpec("cmaes", {}, False, "CMA-ES global search, then the gradient refinement"),
    "cmaes_only": MethodSpec("cmaes", {"refine": False}, False, "CMA-ES global search alone (no refinement)"),
    "network": MethodSpec("network", {}, True, "network-guided descent alone (the learned similarity)"),
    "network_only": MethodSpec("network", {"refine": False}, True, "the same as network (an alias)"),
    "hybrid": MethodSpec("hybrid", {}, True, "network-guided descent, then the intensity refinement"),
    "hybrid_cmaes": MethodSpec("hybrid", {"hybrid_cmaes": True}, True,
                               "network-guided descent, a local CMA-ES search, then the intensity refinement"),
    "auto": MethodSpec("auto", {}, False, "the default method (register's 'auto'), with the CT's model when given",
                       optional_model=True),
}

#: Degradations of every case's X-ray (keyword arguments of simulate.degrade); the noise seed is
#: drawn per case. Realistic degradations, so no method gets an exact-model advantage.
DEFAULT_XRAY = {"dose": 1e4, "blur_mm": 0.6, "gamma": 1.0, "heel": 0.1, "scatter": 0.1}

#: Where a registration starts: the protocol's perturbed pose, or the ground truth itself
#: ("truth": a sanity check; every method should then stay at mTRE ~ 0).
STARTS = ("initial", "truth")


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
# Configuration and set-up


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
    #: who renders the X-rays: "corrreg" (built in) or a name of the sources file (sources.py)
    xray_source: str = "corrreg"
    xray_sources_file: str | None = None  # None: the checkout's Testing/Benchmarks/xray_sources.py
    #: the CT the X-rays are rendered from (the "patient"); None: the registered CT itself. It
    #: must share the CT's LPS frame (a crop or a resampling of the same scan, or a finer one).
    xray_ct: str | None = None
    name: str | None = None  # the cell's name in multi-CT summaries (not part of its identity)


@dataclass
class BenchmarkSetup:
    config: BenchmarkConfig
    protocol: Protocol
    volume: Volume  # the registered CT, attenuation (1/mm), on ``device``
    targets: Tensor  # (N, 3) LPS mm
    target_names: list[str]
    targets_description: str
    ct_description: str
    isocenter: Tensor
    device: torch.device
    model_dir: str | None
    fingerprint: dict
    source: XraySource | None = None
    xray_ct: SourceCT | None = None  # what the source renders (HU and CorrReg's attenuation), CPU
    xray_ct_description: str = "the registered CT"


def _is_phantom(ct: str | None) -> bool:
    return ct is None or str(ct).lower() == "phantom"


def ct_name(ct: str | None) -> str:
    """``phantom``, or a CT file's (or DICOM folder's) name without its image suffixes."""
    if _is_phantom(ct):
        return "phantom"
    name = Path(str(ct).rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    idx = (volume.data > BONE_MU_PER_MM).nonzero()
    if idx.shape[0] == 0:
        raise ValueError("the CT has no bone (no voxel above 1.5 x water attenuation); give --targets")
    rng = np.random.default_rng(seed)
    pick = rng.choice(idx.shape[0], size=min(n, idx.shape[0]), replace=False)
    kji = idx[torch.as_tensor(np.sort(pick))].double().cpu()
    ijk1 = torch.cat([kji.flip(1), torch.ones(len(kji), 1, dtype=torch.float64)], 1)
    return (ijk1 @ volume.lps_from_index().T)[:, :3]


@functools.lru_cache(maxsize=2)
def _phantom(spacing_mm: float):
    from ..phantom import make_spine_phantom

    return make_spine_phantom(spacing_mm=spacing_mm, seed=0)  # deterministic: built once per process


def _load_ct(ct: str | None, phantom_spacing_mm: float, is_hu: bool):
    """(SourceCT (HU + attenuation), default targets or None, their names, description)."""
    if _is_phantom(ct):
        ph = _phantom(float(phantom_spacing_mm))
        desc = f"built-in spine phantom (L1-L5, {phantom_spacing_mm:g} mm voxels, seed 0)"
        return SourceCT(ph.hu, ph.volume), ph.landmarks.double().clone(), list(ph.landmark_names), desc
    from ..io import read_ct_hu

    p = Path(ct)
    if not p.exists():
        raise FileNotFoundError(f"CT {p} does not exist")
    img = read_ct_hu(p)
    if is_hu:
        vol = img.to_volume()
        hu = img.hu
    else:  # the file holds attenuation (1/mm): the HU a renderer needs follow from CorrReg's map
        vol = Volume(img.hu, img.spacing, img.origin, img.direction)
        hu = attenuation_to_hu(vol.data)
    i, j, k = vol.shape_ijk
    desc = f"{p} ({i} x {j} x {k} voxels of {' x '.join(f'{s:.3g}' for s in vol.spacing)} mm)"
    return SourceCT(hu, vol), None, None, desc


def _label_map(path: str) -> bool:
    from ..io import _suffix  # the same suffix rules as read_targets

    return _suffix(Path(path)) not in (".mrk.json", ".json", ".fcsv", ".csv", ".tsv", ".txt")


def check_model_camera(model_dir: str, camera: Camera) -> dict:
    """Load a trained network (CorrRegLib.train.load_model) and refuse one trained for another
    camera: its config's camera must have the protocol's sdd, detector extent and principal
    point (a downsampled detector, as the network's input size gives, is the same camera)."""
    try:
        from ..train import load_model
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
        from ..register import bundled_model_dir
    except ImportError:  # pragma: no cover - older register modules
        return None
    d = bundled_model_dir()
    return None if d is None else str(d)


def _check_same_frame(ct: Volume, xray_ct: Volume, path: str) -> None:
    """The X-ray CT must hold the registered CT's anatomy in the same LPS frame: it must cover the
    registered CT's bone centroid (a crop, a resampling or a finer scan of the same patient)."""
    try:
        centre = ct.bone_center_lps()
    except ValueError:
        centre = ct.center_lps()
    try:
        check_targets_inside(xray_ct, centre.reshape(1, 3), "centre of the registered CT")
    except ValueError as err:
        raise ValueError(f"--xray-ct {path} does not cover the registered CT ({err}); it must be the same patient "
                         "in the same LPS frame (a crop or a resampling of one scan)") from None


def prepare(config: BenchmarkConfig) -> BenchmarkSetup:
    """Check every input and load the CT, targets, model and X-ray source; raises ValueError (or
    FileNotFoundError) with a clear message before any case is simulated or registered."""
    from ..device import pick_device

    methods = parse_methods(config.methods)
    config.methods = methods
    if config.start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {config.start!r}")
    if int(config.cases) < 1:
        raise ValueError(f"--cases must be at least 1, got {config.cases}")
    if not config.detector_downsample > 0:
        raise ValueError(f"--detector-downsample must be positive, got {config.detector_downsample}")
    protocol = get_protocol(config.protocol, detector_downsample=float(config.detector_downsample))
    source = get_source(config.xray_source, config.xray_sources_file)  # before the CT: a missing renderer fails fast
    model_dir = config.model
    needs_model = [m for m in methods if METHODS[m].needs_model]
    if needs_model and model_dir is None:
        model_dir = _bundled_model()
        if model_dir is None:
            raise ValueError(
                f"method(s) {', '.join(needs_model)} need a trained network: pass --model MODEL_DIR "
                "(train one with `corrreg train`), or drop them from --methods"
            )
    if needs_model or (config.model is not None and any(METHODS[m].optional_model for m in methods)):
        check_model_camera(model_dir, protocol.camera)
    if config.targets is not None and not Path(config.targets).exists():
        raise FileNotFoundError(f"targets file {config.targets} does not exist")
    if config.target_labels is not None and (config.targets is None or not _label_map(config.targets)):
        raise ValueError("--target-labels needs --targets to be a label map (NIfTI/NRRD/...)")

    ct, default_pts, default_names, ct_desc = _load_ct(config.ct, config.phantom_spacing_mm, config.ct_is_hu)
    volume = ct.volume
    if config.xray_ct is None:
        xray_ct, xray_desc = ct, "the registered CT"
    else:
        xray_ct, _, _, xray_desc = _load_ct(config.xray_ct, config.phantom_spacing_mm, config.ct_is_hu)
        _check_same_frame(volume, xray_ct.volume, config.xray_ct)
    if config.targets is not None:
        from ..io import read_targets

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
        "xray_source": source.info(),
        "xray_ct": None if config.xray_ct is None else (
            "phantom" if _is_phantom(config.xray_ct) else str(Path(config.xray_ct).resolve())),
        "xray_ct_hash": None if config.xray_ct is None else _volume_hash(xray_ct.volume),
        "model": None if model_dir is None else str(Path(model_dir).resolve()),
    }
    return BenchmarkSetup(config, protocol, volume.to(device), pts, list(names), tdesc, ct_desc, iso, device,
                          model_dir, fingerprint, source, xray_ct, xray_desc)
