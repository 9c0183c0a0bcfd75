"""Training of the correlation-driven network, checkpoints and safe loading (docs/network.md).

One training step: pick a CT, draw ``batch_size`` cases (a ground-truth pose near the AP
reference view and a perturbed pose around it), simulate a realistic X-ray at the true pose
(with domain randomisation), render the DRR at the perturbed pose through the differentiable
projector, and minimise the uncertainty-weighted sum of L_appro and L_decomp.

A model directory holds ``model.safetensors`` (the weights), ``config.json`` (network config,
camera, normalisation, training record, validation figures) and, for ``resume``,
``optimizer.safetensors`` (AdamW moments, step counters and the loss log-variances). Nothing is
ever unpickled: ``load_model`` reads JSON and safetensors only and checks both against each other.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .device import pick_device
from .geometry import Camera, euler_to_rotation, make_pose, reference_ap_pose
from .losses import (
    UncertaintyWeighting,
    appro_loss,
    decomposition_loss,
    geodesic_direction,
    isocenter_in_camera,
    pose_gradient,
    unit_parts,
)
from .model import NORMALISATION, CorrelationNet, NetConfig, network_projector
from .outputs import Output, OutputSet, check_outputs
from .projector import Projector
from .simulate import degrade, random_degradation
from .volume import Volume

Tensor = torch.Tensor

FORMAT = "corrreg-network"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FILES = (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE)

__all__ = [
    "PoseRanges", "TrainResult", "train", "load_model", "save_model", "validate", "pose_gradient",
    "check_model_dir", "check_options",
    "sample_cases", "sample_truths", "sample_offsets", "simulate_training_xray", "degrade_training_xrays",
]


# ============================================================================================
# Pose sampling


@dataclass(frozen=True)
class PoseRanges:
    """Training pose distribution (DESIGN.md's ``paper`` protocol by default).

    The true pose is the AP reference view rotated about the isocenter by Euler angles
    ~ N(0, truth_rotation_sigma_deg). The training pose is the truth rotated about the
    isocenter (camera axes, extrinsic x-y-z) by Euler angles ~ N(0, rotation_sigma_deg) and
    translated in the camera frame by N(0, translation_sigma_mm) (x, y in plane, z depth), each
    draw clipped at ``clip_sigma`` standard deviations. A share ``small_fraction`` of the
    offsets is scaled by ``small_scale`` so the network also sees the near-optimum regime.
    """

    rotation_sigma_deg: float = 20.0
    translation_sigma_mm: tuple[float, float, float] = (30.0, 30.0, 60.0)
    truth_rotation_sigma_deg: float = 5.0
    clip_sigma: float = 2.5
    small_fraction: float = 0.5
    small_scale: float = 0.25
    sod: float = 700.0


def _clipped_normal(gen: torch.Generator, n: int, k: int, clip: float) -> Tensor:
    return torch.randn(n, k, generator=gen, dtype=torch.float64).clamp(-clip, clip)


def _rotate_translate_about(pose: Tensor, iso_ct: Tensor, euler_deg: Tensor, trans_mm: Tensor) -> Tensor:
    """Rotate poses (B, 4, 4) about the isocenter's camera position, then translate (camera frame)."""
    c = isocenter_in_camera(pose, iso_ct)  # (B, 3)
    rot = euler_to_rotation(euler_deg)  # (B, 3, 3)
    t = c - (rot @ c[..., None])[..., 0] + trans_mm
    return make_pose(rot, t) @ pose


def sample_truths(gen: torch.Generator, n: int, iso_ct: Tensor, ranges: PoseRanges = PoseRanges()) -> Tensor:
    """(n, 4, 4) float64 ground-truth poses: the AP reference view rotated about the isocenter."""
    iso = torch.as_tensor(iso_ct, dtype=torch.float64).reshape(3)
    ref = reference_ap_pose(iso, ranges.sod).expand(n, 4, 4)
    euler = _clipped_normal(gen, n, 3, ranges.clip_sigma) * ranges.truth_rotation_sigma_deg
    return _rotate_translate_about(ref, iso, euler, torch.zeros(n, 3, dtype=torch.float64))


def sample_offsets(gen: torch.Generator, truth: Tensor, iso_ct: Tensor, ranges: PoseRanges = PoseRanges(),
                   full_range: bool = False) -> Tensor:
    """Perturbed poses (n, 4, 4) around the ``truth`` poses (n, 4, 4), drawn from ``ranges``
    (``full_range``: no share of small offsets)."""
    n = truth.shape[0]
    iso = torch.as_tensor(iso_ct, dtype=torch.float64).reshape(3)
    scale = torch.ones(n, 1, dtype=torch.float64)
    if not full_range and ranges.small_fraction > 0:
        small = torch.rand(n, 1, generator=gen, dtype=torch.float64) < ranges.small_fraction
        scale = torch.where(small, torch.full_like(scale, ranges.small_scale), scale)
    euler = _clipped_normal(gen, n, 3, ranges.clip_sigma) * ranges.rotation_sigma_deg * scale
    sigma_t = torch.tensor(ranges.translation_sigma_mm, dtype=torch.float64)
    trans = _clipped_normal(gen, n, 3, ranges.clip_sigma) * sigma_t * scale
    return _rotate_translate_about(truth.double(), iso, euler, trans)


def sample_cases(gen: torch.Generator, n: int, iso_ct: Tensor, ranges: PoseRanges = PoseRanges(),
                 full_range: bool = False) -> tuple[Tensor, Tensor]:
    """(true poses, perturbed poses), each (n, 4, 4) float64, drawn from ``ranges``."""
    truth = sample_truths(gen, n, iso_ct, ranges)
    return truth, sample_offsets(gen, truth, iso_ct, ranges, full_range)


# ============================================================================================
# X-ray simulation with domain randomisation


def degrade_training_xrays(line_integrals: Tensor, camera: Camera, gen: torch.Generator) -> Tensor:
    """Realistic X-rays (B, 1, H, W) from noise-free line integrals (B, 1, H, W), each with its
    own domain-randomised degradation (``simulate.random_degradation``: dose, blur, gamma,
    window, heel effect, scatter, collimation) applied by ``simulate.degrade``."""
    imgs = []
    for li in line_integrals:
        params = random_degradation(gen)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        img, _ = degrade(li[0], camera.pixel_spacing, seed=seed, **params)
        imgs.append(img)
    return torch.stack(imgs)[:, None].float()


def simulate_training_xray(volume: Volume, camera: Camera, true_poses: Tensor, gen: torch.Generator,
                           projector: Projector | None = None) -> Tensor:
    """Realistic X-rays (B, 1, H, W) at the true poses: line integrals rendered by ``projector``
    (default: a denser one, 2 samples per voxel, than the DRRs' renderer), then
    :func:`degrade_training_xrays`."""
    proj = projector if projector is not None else Projector(volume, camera, samples_per_voxel=2.0)
    with torch.no_grad():
        li = proj(true_poses.to(device=proj.device, dtype=torch.float32))
    return degrade_training_xrays(li.cpu(), camera, gen)


# ============================================================================================
# Validation: does the network's pose gradient point towards the truth?


@dataclass
class _Held:
    ct: int
    true_pose: Tensor
    pose: Tensor
    xray: Tensor


def _held_out(cts: Sequence[Volume], isos: Sequence[Tensor], camera: Camera, n: int, seed: int, ranges: PoseRanges,
              projectors: Sequence[Projector]) -> list[_Held]:
    gen = torch.Generator().manual_seed(10_000_019 + seed)
    held = []
    for i in range(n):
        ct = i % len(cts)
        truth, pose = sample_cases(gen, 1, isos[ct], ranges, full_range=True)
        xray = simulate_training_xray(cts[ct], camera, truth, gen, projectors[ct])
        held.append(_Held(ct, truth[0], pose[0], xray[0]))
    return held


def validate(net: CorrelationNet, projectors: Sequence, held: Sequence[_Held], isos: Sequence[Tensor],
             batch_size: int = 8) -> dict:
    """Share of held-out cases whose descent direction -grad has a positive cosine with the
    direction towards the truth, for the rotation part, the translation part and both; the mean
    cosines; and L_appro on these cases (without the noise of the training batches)."""
    cos_r, cos_t = [], []
    dev = next(net.parameters()).device
    by_ct: dict[int, list[_Held]] = {}
    for h in held:
        by_ct.setdefault(h.ct, []).append(h)
    for ct, items in by_ct.items():
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            poses = torch.stack([h.pose for h in chunk])  # float64 on the CPU
            truths = torch.stack([h.true_pose for h in chunk])
            xr = torch.stack([h.xray for h in chunk]).to(dev)
            res = pose_gradient(net, projectors[ct], xr, poses.float().to(dev), isos[ct].float().to(dev))
            target = geodesic_direction(poses, truths, isos[ct]).cpu()
            g_r, g_t = unit_parts(res.grad.cpu().double())
            t_r, t_t = unit_parts(target)
            cos_r.append((g_r * t_r).sum(-1))  # grad vs away-from-truth == -grad vs towards-truth
            cos_t.append((g_t * t_t).sum(-1))
    cr, ct_ = torch.cat(cos_r), torch.cat(cos_t)
    return {
        "n": int(cr.numel()),
        "rotation_share": float((cr > 0).double().mean()),
        "translation_share": float((ct_ > 0).double().mean()),
        "both_share": float(((cr > 0) & (ct_ > 0)).double().mean()),
        "mean_cos_rotation": float(cr.mean()),
        "mean_cos_translation": float(ct_.mean()),
        # L_appro on these cases: |u_r - t_r|^2 + |u_t - t_t|^2 = (2 - 2 cos_r) + (2 - 2 cos_t)
        "appro_loss": float((4.0 - 2.0 * cr - 2.0 * ct_).mean()),
    }


# ============================================================================================
# Saving and loading


def _isocenter(volume: Volume, label: Tensor | None) -> Tensor:
    if label is not None:
        mask = torch.as_tensor(label) != 0
        if bool(mask.any()):
            kji = mask.nonzero().double().mean(0)
            idx = torch.tensor([kji[2], kji[1], kji[0], 1.0], dtype=torch.float64)
            return (volume.lps_from_index() @ idx)[:3]
    try:
        return volume.bone_center_lps()
    except ValueError:
        return volume.center_lps()


def _share_like_a_normal_file(path: Path) -> None:
    """safetensors writes 0600 files; give them the usual umask-derived mode so a model
    directory can be shipped or shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(net: CorrelationNet, out_dir: str | Path, camera: Camera | None = None, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``, together and atomically
    (an interrupted save leaves the previous pair); returns the directory."""
    out = Path(out_dir).expanduser()
    with OutputSet() as outputs:
        _stage_model(outputs, net, out, camera, extra)
    return out


def _stage_model(outputs: OutputSet, net: CorrelationNet, out: Path, camera: Camera | None, extra: dict | None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    weights = outputs.path(out / MODEL_FILE, "model weights")
    save_file(state, str(weights), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    _share_like_a_normal_file(weights)
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": net.config.to_dict(),
        "camera": camera.to_dict() if camera is not None else None,
        "intensity_normalisation": NORMALISATION,
        "score_convention": "lower is better aligned (distance-like); descend along -grad",
        "pose_parametrisation": "twist (rotation vector rad, translation mm) about the isocenter in the camera frame: "
                                "pose = T(c) exp(delta) T(-c) pose, c = isocenter in camera coordinates",
        "drr_input": "line integrals of linear attenuation from CorrRegLib.projector",
    }
    if extra:
        cfg.update(extra)
    outputs.path(out / CONFIG_FILE, "model config").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def _read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a CorrReg network directory: {CONFIG_FILE} is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CorrReg network config (expected \"format\": \"{FORMAT}\")")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {cfg.get('format_version')!r}; this CorrReg reads {FORMAT_VERSION}")
    if "model" not in cfg:
        raise ValueError(f"{path} lacks the \"model\" section")
    return cfg


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, refusing anything else (pickles, zips, truncated files)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} is missing")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    n = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or n > path.stat().st_size - 8:
        raise ValueError(f"{path} is not a safetensors file (no JSON header); pickled checkpoints are refused")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and friends
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CorrelationNet, dict]:
    """(network in eval mode, config dict) from a model directory written by ``train``.

    Raises ValueError for anything malformed: a missing or invalid config.json, an unknown
    preset or config key, a weights file that is not safetensors, missing or unexpected tensors,
    tensors whose shapes do not match the config, non-finite weights.
    """
    d = Path(model_dir).expanduser()
    if d.is_file():
        hint = f"; pass its folder {d.parent}" if d.name in (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE) else ""
        raise ValueError(f"{d} is a file, not a model directory: a model is a folder holding {MODEL_FILE} and {CONFIG_FILE}{hint}")
    if not d.is_dir():
        raise ValueError(f"model directory {d} does not exist; train one with `corrreg train --out {d}` or give another folder")
    device = pick_device(device)
    cfg = _read_config(d)
    net_cfg = NetConfig.from_dict(cfg["model"])
    net = CorrelationNet(net_cfg)
    state = _read_safetensors(d / MODEL_FILE)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{d / MODEL_FILE} does not match the {net_cfg.preset!r} config in {CONFIG_FILE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{d / MODEL_FILE}: tensor {k} has shape {tuple(state[k].shape)} but the config needs {tuple(v.shape)}"
            )
        if not state[k].is_floating_point() or not torch.isfinite(state[k]).all():
            raise ValueError(f"{d / MODEL_FILE}: tensor {k} is not a finite floating-point tensor")
    net.load_state_dict({k: state[k].to(v.dtype) for k, v in expected.items()})
    net.eval()
    return net.to(device), cfg


# ============================================================================================
# Optimizer state (safetensors, no pickle)


def _save_optimizer(path: Path, opt: torch.optim.Optimizer, weighting: UncertaintyWeighting, step: int) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {"weighting.log_vars": weighting.log_vars.detach().cpu().contiguous()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(sd["param_groups"])}
    save_file(tensors, str(path), metadata=meta)
    _share_like_a_normal_file(path)


def _load_optimizer(path: Path, opt: torch.optim.Optimizer, weighting: UncertaintyWeighting) -> int:
    from safetensors import safe_open

    tensors = _read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        step = int(meta["step"])
        groups = json.loads(meta["param_groups"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} lacks the optimizer metadata ({e})") from None
    if "weighting.log_vars" not in tensors or tensors["weighting.log_vars"].shape != weighting.log_vars.shape:
        raise ValueError(f"{path} lacks the loss log-variances")
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    current = opt.state_dict()
    if len(groups) != len(current["param_groups"]) or any(
        g.get("params") != c["params"] for g, c in zip(groups, current["param_groups"])
    ):
        raise ValueError(f"{path} was written for a different network (parameter groups differ)")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path} does not fit this network's optimizer: {e}") from None
    with torch.no_grad():
        weighting.log_vars.copy_(tensors["weighting.log_vars"])
    return step


# ============================================================================================
# Training


@dataclass
class TrainResult:
    out_dir: Path
    steps: int  # total steps done (including those before a resume)
    seconds: float  # wall time of this call
    history: list[dict] = field(default_factory=list)  # per step: loss terms and cosines
    validation: list[dict] = field(default_factory=list)  # {"step", shares...}
    config: dict = field(default_factory=dict)


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _param_groups(net: CorrelationNet, weighting: UncertaintyWeighting, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.dim() >= 2 and "scale" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay + [weighting.log_vars], "weight_decay": 0.0},
    ]


def check_model_dir(out_dir: str | Path, resume: bool = False, overwrite: bool = False, label: str = "--out",
                    inputs: dict | None = None) -> None:
    """Refuse, before any work, a model folder that training must not or cannot write: one
    that holds a trained model while neither ``resume`` nor ``overwrite`` is set, one with
    nothing to resume, a file, a folder that cannot be written, or one that is (or lies inside)
    one of ``inputs`` (label -> path(s), see :func:`outputs.check_outputs`)."""
    if resume and overwrite:
        raise ValueError("give --resume (resume=True) or --overwrite (overwrite=True), not both")
    out = Path(out_dir).expanduser()
    check_outputs([Output(label, out, "folder")] + [Output(f"{label} ({name})", out / name, "file") for name in MODEL_FILES],
                  inputs)
    present = [name for name in MODEL_FILES if (out / name).exists()]
    if resume and MODEL_FILE not in present:
        raise ValueError(f"cannot resume: {out} holds no trained model ({MODEL_FILE}); drop --resume (resume=True) "
                         "to start training there")
    if present and not resume and not overwrite:
        raise ValueError(
            f"{out} already holds a trained model ({', '.join(present)}); pass --resume (resume=True) to continue "
            "training it, --overwrite (overwrite=True) to replace it, or choose another folder"
        )


def check_options(steps: int = 600, batch_size: int = 4, lr: float = 1e-3, validate_every: int = 0,
                  n_validation: int = 32, checkpoint_every: int = 200, xray_pool: int = 128,
                  weight_decay: float = 1e-4, grad_clip: float = 1.0, warmup: int | None = None) -> None:
    """Refuse training options that cannot work (a ValueError naming the option), before any work."""
    def whole(name, value, least):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")

    whole("steps", steps, 1)
    whole("batch_size (--batch-size, pose pairs per step)", batch_size, 1)
    whole("validate_every (--validate-every)", validate_every, 0)
    whole("n_validation", n_validation, 1)
    whole("checkpoint_every", checkpoint_every, 0)
    whole("xray_pool", xray_pool, 1)
    if warmup is not None:
        whole("warmup", warmup, 1)
    for name, value, positive in (("lr (--lr, the learning rate)", lr, True), ("weight_decay", weight_decay, False),
                                  ("grad_clip", grad_clip, True)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def _command_line() -> str:
    """This process's command line, as the user typed it for the ``corrreg`` script."""
    if Path(sys.argv[0]).name == "corrreg":
        return "corrreg " + shlex.join(sys.argv[1:])
    return shlex.join(sys.argv)


def train(
    cts: Sequence[Volume],
    camera: Camera,
    out_dir: str | Path,
    preset: str | NetConfig = "compact",
    steps: int = 600,
    batch_size: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = False,
    labels: Sequence[Tensor | None] | None = None,
    progress: bool = True,
    validate_every: int = 0,
    n_validation: int = 32,
    ranges: PoseRanges = PoseRanges(),
    weight_decay: float = 1e-4,
    grad_clip: float = 1.0,
    warmup: int | None = None,
    samples_per_voxel: float = 1.0,
    voxel_slack: float | None = 1.25,
    checkpoint_every: int = 200,
    use_decomp: bool = True,
    xray_pool: int = 128,
    stop_after: int | None = None,
    overwrite: bool = False,
    on_step=None,
    **config_overrides,
) -> TrainResult:
    """Train (or resume training) a network on ``cts`` seen through ``camera``.

    ``camera`` is downsampled to the network's ``input_size`` when it is larger (same field of
    view); the training camera is recorded in config.json. ``labels`` (optional, one label map
    per CT, same grid) place each CT's isocenter at the centroid of its non-zero labels;
    otherwise it is the centroid of the bone voxels. ``validate_every`` > 0 measures the
    cosine shares on ``n_validation`` held-out cases that often (always before and after).
    Data for step k depends only on (seed, k), so ``resume`` continues the same sequence.
    Each CT is average-pooled as registration pools it for the network's input size
    (:meth:`Volume.pool_factor` with ``voxel_slack``; None keeps full resolution), so a
    512 x 512 CT trains as fast as its detector footprint allows and on the DRRs it will meet.
    A folder that already holds a model is refused unless ``resume`` or ``overwrite`` is set
    (:func:`check_model_dir`); checkpoints replace the folder's files together and atomically.
    ``on_step(record)``, if given, is called after every step with that step's losses and
    ``{"done": steps done, "steps": steps}`` (``corrreg train --progress-json`` prints them).
    """
    t_start = time.perf_counter()
    if not cts:
        raise ValueError("train needs at least one CT volume")
    check_options(steps, batch_size, lr, validate_every, n_validation, checkpoint_every, xray_pool,
                  weight_decay, grad_clip, warmup)
    out = Path(out_dir).expanduser()
    check_model_dir(out, resume, overwrite, label="out_dir")
    device = pick_device(device)
    for i, v in enumerate(cts):
        v.check_content(f"training CT {i + 1}" if len(cts) > 1 else "the training CT")
    torch.manual_seed(seed)
    net_cfg = NetConfig.from_preset(preset, **config_overrides) if isinstance(preset, str) else preset
    if resume:
        net, old = load_model(out, device)
        if net.config != net_cfg:
            raise ValueError(f"cannot resume: {out / CONFIG_FILE} holds a different network config than the one asked for")
        prev = old.get("training", {})
        history_val = list(old.get("validation", []))
    else:
        net = CorrelationNet(net_cfg).to(device)
        prev, history_val = {}, []
    net.train()
    factor = camera.width / net_cfg.input_size
    train_cam = camera.downsample(factor) if factor > 1 else camera
    weighting = UncertaintyWeighting(2).to(device)
    opt = torch.optim.AdamW(_param_groups(net, weighting, weight_decay), lr=lr)
    start = 0
    if resume:
        start = _load_optimizer(out / OPTIMIZER_FILE, opt, weighting)
    warm = warmup if warmup is not None else max(1, steps // 20)

    labels = list(labels) if labels is not None else [None] * len(cts)
    if len(labels) != len(cts):
        raise ValueError(f"got {len(labels)} label maps for {len(cts)} CTs")
    for i, (v, lab) in enumerate(zip(cts, labels)):
        if lab is not None and tuple(torch.as_tensor(lab).shape) != tuple(v.data.shape):
            k, j, i_ = v.data.shape
            raise ValueError(f"label map {i + 1} has shape {tuple(torch.as_tensor(lab).shape)} (k, j, i) but its CT "
                             f"is {i_} x {j} x {k} voxels; a label map must share its CT's grid")
    isos = [_isocenter(v, lab) for v, lab in zip(cts, labels)]  # float64, CPU, on the full grid
    footprint = max(train_cam.pixel_spacing) * ranges.sod / train_cam.sdd  # a network pixel at the isocenter
    pooling = [1 if voxel_slack is None else v.pool_factor(footprint, voxel_slack) for v in cts]
    cts = [v.downsample(f).to(device=device) for v, f in zip(cts, pooling)]
    plain = [Projector(v, train_cam, samples_per_voxel=samples_per_voxel).to(device) for v in cts]
    # X-rays come from a denser renderer than the DRRs (as in evaluation), so the network never
    # sees the training renderer's exact output as its X-ray.
    sim = [Projector(v, train_cam, samples_per_voxel=2.0 * samples_per_voxel).to(device) for v in cts]
    held = _held_out(cts, isos, train_cam, n_validation, seed, ranges, sim)
    # A pool of ground-truth poses and their noise-free line integrals per CT; every step draws
    # from it and applies a fresh random degradation (rendering X-rays anew each step would
    # cost a third of the step).
    pool_gen = torch.Generator().manual_seed(20_000_033 + seed)
    pool_truth, pool_li = [], []
    for i in range(len(cts)):
        truths = sample_truths(pool_gen, max(1, xray_pool), isos[i], ranges)
        with torch.no_grad():
            li = torch.cat([sim[i](truths[j : j + 16].to(device=device, dtype=torch.float32)).cpu()
                            for j in range(0, truths.shape[0], 16)])
        pool_truth.append(truths)
        pool_li.append(li)

    def projector_for(i: int):
        if net.adapter is None:
            return plain[i]
        return network_projector(net, cts[i], train_cam, samples_per_voxel=samples_per_voxel)

    def run_validation(step: int) -> dict:
        net.eval()
        projs = [projector_for(i) for i in range(len(cts))]
        v = validate(net, projs, held, isos, batch_size=max(batch_size, 8))
        net.train()
        v["step"] = step
        return v

    record = {
        "command": _command_line(),
        "arguments": {"preset": net_cfg.preset, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                      "weight_decay": weight_decay, "grad_clip": grad_clip, "warmup": warm,
                      "samples_per_voxel": samples_per_voxel, "voxel_slack": voxel_slack,
                      "ct_pooling": pooling, "n_cts": len(cts), "use_decomp": use_decomp,
                      "n_validation": n_validation,
                      "xray_pool": xray_pool},
        "optimizer": "AdamW (decay on weights of dim >= 2), linear warm-up then cosine to 5% of lr, "
                     f"gradient norm clipped at {grad_clip}",
        "pose_ranges": asdict(ranges),
        "source_camera": camera.to_dict(),
        "torch": torch.__version__,
    }

    validation = history_val
    if start == 0 or not validation:
        validation.append(run_validation(start))
    history: list[dict] = []

    def checkpoint(step: int, seconds: float) -> None:
        rec = dict(record, steps_done=step, seconds=prev.get("seconds", 0.0) + seconds)
        with OutputSet() as outputs:  # weights, config and optimizer state move into place together
            _stage_model(outputs, net, out, train_cam, {"training": rec, "validation": validation})
            _save_optimizer(outputs.path(out / OPTIMIZER_FILE, "optimizer state"), opt, weighting, step)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="training", unit="step", dynamic_ncols=True)
    end = steps if stop_after is None else min(steps, stop_after)
    for step in range(start, end):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        ct = int(torch.randint(0, len(cts), (1,), generator=gen))
        idx = torch.randint(0, pool_truth[ct].shape[0], (batch_size,), generator=gen)
        truth = pool_truth[ct][idx]
        pose = sample_offsets(gen, truth, isos[ct], ranges)
        xray = degrade_training_xrays(pool_li[ct][idx], train_cam, gen).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warm)
        proj = projector_for(ct)
        res = appro_loss(net, proj, xray, pose, truth, isos[ct], return_features=True)
        l_dec = decomposition_loss(res.features) if use_decomp else torch.zeros((), device=device)
        total = weighting(res.loss, l_dec) if use_decomp else res.loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        if not torch.isfinite(total) or not torch.isfinite(gnorm):
            raise FloatingPointError(f"training diverged at step {step}: loss {float(total)}, grad norm {float(gnorm)}")
        opt.step()
        h = {"step": step, "loss": float(total.detach()), "appro": float(res.loss.detach()), "decomp": float(l_dec.detach()),
             "cos_r": float(res.cos_rotation.mean()), "cos_t": float(res.cos_translation.mean()),
             "lr": opt.param_groups[0]["lr"]}
        history.append(h)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(appro=f"{h['appro']:.3f}", decomp=f"{h['decomp']:.3f}", cos_r=f"{h['cos_r']:+.2f}",
                            cos_t=f"{h['cos_t']:+.2f}")
        done = step + 1
        if on_step is not None:
            on_step(dict(h, done=done, steps=end))
        if validate_every and done % validate_every == 0 and done < end:
            validation.append(run_validation(done))
            if bar is not None:
                v = validation[-1]
                bar.write(f"step {done}: pose-gradient cos>0 share rot {v['rotation_share']:.2f} "
                          f"trans {v['translation_share']:.2f} both {v['both_share']:.2f}")
        if checkpoint_every and done % checkpoint_every == 0 and done < end:
            checkpoint(done, time.perf_counter() - t_start)
    if bar is not None:
        bar.close()
    if start < end:
        validation.append(run_validation(end))
    seconds = time.perf_counter() - t_start
    checkpoint(max(end, start), seconds)
    cfg = json.loads((out / CONFIG_FILE).read_text())
    return TrainResult(out, max(end, start), seconds, history, validation, cfg)
