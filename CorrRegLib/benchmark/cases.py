"""The cases of a run and one registration of a case: ``generate_cases`` and ``run_method``.

Case ``i`` (ground-truth pose, initial pose, noise seed, and so its X-ray) depends only on
(seed, i) and the run's fingerprint, so every method of a run registers the same X-rays from the
same starts, a longer run extends a shorter one, and an interrupted run resumes exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch

from ..metrics import SUCCESS_THRESHOLDS_MM, mpd, mtre, rotation_translation_error
from ..protocols import Case, make_cases
from ..register import RegistrationOptions, register
from .config import METHODS, BenchmarkSetup

Tensor = torch.Tensor


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
    """Simulated cases (lazily, one at a time); case i depends only on (seed, i).

    The X-ray of case i: the run's source renders the X-ray CT at the true pose (the noise-free
    line integral, sources.py), then ``simulate.degrade`` applies the run's degradations with the
    case's noise seed."""
    from ..simulate import degrade
    from .sources import CorrRegSource, SourceCT

    cfg = setup.config
    indices = list(indices)
    if not indices:
        return
    base = make_cases(setup.protocol, setup.isocenter, max(indices) + 1, seed=cfg.seed)
    camera = setup.protocol.camera
    source = setup.source if setup.source is not None else CorrRegSource()
    xray_ct = setup.xray_ct if setup.xray_ct is not None else SourceCT(None, setup.volume)
    render = source.renderer(xray_ct, camera, setup.device)
    for i in indices:
        c = base[i]
        ns = case_noise_seed(cfg.seed, i)
        line_integral = render(c.true_pose)
        if tuple(line_integral.shape) != (camera.height, camera.width):
            raise ValueError(f"X-ray source {source.name} rendered shape {tuple(line_integral.shape)}, "
                             f"not the camera's ({camera.height}, {camera.width})")
        image, _ = degrade(line_integral, camera.pixel_spacing, seed=ns, **cfg.xray)
        start = c.true_pose if cfg.start == "truth" else c.initial_pose
        yield BenchmarkCase(i, c.true_pose, start, image.detach().cpu(), ns, c)


def evaluate_pose(setup: BenchmarkSetup, pose: Tensor, truth: Tensor) -> dict:
    pts, cam = setup.targets, setup.protocol.camera
    rot, trans = rotation_translation_error(pose, truth, setup.isocenter)
    return {"mtre": float(mtre(pose, truth, pts)), "mpd": float(mpd(cam, pose, truth, pts)),
            "rot": float(rot), "trans": float(trans)}


def method_model_dir(setup: BenchmarkSetup, method: str) -> str | None:
    """The network a method is given: the run's (or the bundled) model for network methods, only
    an explicit ``--model`` for ``auto``, none for the others."""
    spec = METHODS[method]
    if spec.needs_model:
        return setup.model_dir
    return setup.config.model if spec.optional_model else None


def run_method(setup: BenchmarkSetup, case: BenchmarkCase, method: str, options: RegistrationOptions | None = None) -> dict:
    """Register one case with one benchmark method; returns its results.csv row."""
    spec = METHODS[method]
    opts = replace(options or RegistrationOptions(), **spec.options)
    t0 = time.perf_counter()
    try:
        res = register(setup.volume, case.xray.to(setup.device), setup.protocol.camera, case.start_pose,
                       method=spec.register_method, options=opts, model_dir=method_model_dir(setup, method),
                       device=setup.device, isocenter=setup.isocenter)
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
