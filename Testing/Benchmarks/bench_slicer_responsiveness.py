"""How long the Slicer module's registration holds the main (GUI) thread, and how fast Cancel acts.

The module's GUI thread is emulated here on a real MRML scene (slicer-core): a Qt timer is a
loop that calls the Logic the way ``CorrReg.py`` does, and every call on the main thread is a
*slice* during which Slicer could not repaint or take a click. Measured per run:

* ``longest_slice_s``: the longest main-thread call (``start``, a timer tick, the finish);
* ``longest_stall_s``: the longest gap between the end of one main-thread call and the start of
  the next beyond the timer interval (the main thread waiting for the GIL held by the worker);
* ``cancel_latency_s``: from the click on Cancel to the registration being stopped with the
  best pose in the output transform (the GUI is idle again), and ``cancel_to_final_drr_s``: to
  the full-resolution DRR being shown as well.

Two APIs are understood: the worker API (``start(..., background=True)`` then ``run.poll()`` from
a 50 ms timer; this version of the module) and the synchronous one the module had before issue 12
(``start`` then ``step(iterationsPerTick)`` from a 1 ms timer, then ``finish``; it knew no method
"auto", so it runs "cmaes", which "auto" resolved to then), so that the same
script measures both: ``--module-dir`` points at the CorrReg module folder to load, e.g. one
extracted from an older commit with ``git archive <commit> CorrReg | tar -x -C /tmp/old``.

The case: a ``--ct-size``^3 int16 CT (the procedural spine phantom built at 1.25 mm and resampled,
so that building it takes seconds, not minutes) and a ``--detector``^2 simulated X-ray. Each run
is one registration to the end on a short schedule that still visits every stage (CMA-ES, the four
intensity levels, the final DRR), and one cancelled in the finest level (its steps are the
slowest). ``--compare-cli`` times the same small case with the default schedule in the worker and
with ``corrreg register``.

    python Testing/Benchmarks/bench_slicer_responsiveness.py --runs 3 --out out/bench_slicer
    python Testing/Benchmarks/bench_slicer_responsiveness.py --module-dir /tmp/old/CorrReg --out out/bench_slicer_before
    python Testing/Benchmarks/bench_slicer_responsiveness.py --compare-cli --out out/bench_slicer_cli
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_module_lib(module_dir: Path):
    sys.path.insert(0, str(module_dir))
    adapter = importlib.import_module("CorrRegModuleLib.adapter")
    logic = importlib.import_module("CorrRegModuleLib.logic")
    return adapter, logic


def build_case(slicer, adapter, ct_size: int, detector: int, seed: int = 0):
    """A ct_size^3 int16 CT node and a detector^2 simulated X-ray node in a new scene."""
    import torch.nn.functional as F
    from CorrRegLib.geometry import Camera, c_arm_pose
    from CorrRegLib.phantom import make_spine_phantom
    from CorrRegLib.simulate import simulate_xray

    ph = make_spine_phantom(spacing_mm=1.25, size_mm=(160.0, 160.0, 160.0), seed=seed)
    spacing = 160.0 / ct_size
    with torch.no_grad():
        hu = F.interpolate(ph.hu[None, None].float(), size=(ct_size,) * 3, mode="trilinear", align_corners=False)[0, 0]
    hu = hu.round().clamp(-1024, 3071).to(torch.int16).numpy()
    camera = Camera(1011.7, (204.3 / detector,) * 2, (detector, detector))
    truth = c_arm_pose(ph.volume.bone_center_lps(), 700.0, 4.0, -3.0)
    image = simulate_xray(ph.volume, camera, truth, dose=3e4, seed=seed).image.detach().float()
    scene = slicer.vtkMRMLScene()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    origin = np.asarray(ph.volume.origin) + (spacing - 1.25) / 2.0  # same box as the phantom's
    adapter.setVolumeNodeLPSGeometry(ct, origin.tolist(), np.eye(3), (spacing,) * 3)
    slicer.util.updateVolumeFromArray(ct, hu)
    xray = adapter.xrayNodeFromImage(scene, image, camera, "X-ray", sod=700.0)
    return {"scene": scene, "ct": ct, "xray": xray, "camera": camera, "truth": truth, "phantom": ph}


def short_schedule(options_cls, finest_iterations: int = 4):
    """Every stage of the pipeline, each a few iterations long (the finest level ``finest_iterations``)."""
    o = options_cls()
    levels = tuple(replace(lv, max_iterations=4) for lv in o.levels[:-1]) + (
        replace(o.levels[-1], max_iterations=finest_iterations),)
    short = dict(cmaes_generations=6, levels=levels, patience=1000)
    have = set(o.__dataclass_fields__)
    if "candidate_levels" in have:  # the staged pipeline (grid search, candidates, verification)
        short.update(candidate_levels=tuple(replace(lv, max_iterations=4) for lv in o.candidate_levels),
                     grid_rotations_deg=(-25.0, 0.0, 25.0), grid_depths=(1.0,), grid_candidates=2, max_attempts=1)
    return replace(o, **{k: v for k, v in short.items() if k in have})


class MainThread:
    """Times every call made on the (emulated) GUI thread."""

    def __init__(self, interval_s: float):
        self.interval = interval_s
        self.slices: list[tuple[str, float]] = []
        self.stalls: list[float] = []
        self._last_end = None

    def call(self, what, fn, *args, **kwargs):
        t0 = time.perf_counter()
        if self._last_end is not None:
            self.stalls.append(max(0.0, t0 - self._last_end - self.interval))
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            self.slices.append((what, t1 - t0))
            self._last_end = t1

    def idle(self):
        """The event loop waits for the next timer tick (nothing else to do)."""
        time.sleep(self.interval)

    def summary(self) -> dict:
        worst = max(self.slices, key=lambda s: s[1])
        return {"longest_slice_s": worst[1], "longest_slice": worst[0], "slices": len(self.slices),
                "longest_stall_s": max(self.stalls, default=0.0)}


def _common_args(case, options, method="cmaes"):
    return dict(method=method, options=options, sliceCompositeNode=None, sliceNode=None, showInSliceView=False,
                initialPoseMode="carm", primaryAngle=0.0, secondaryAngle=0.0,
                rotationOffsetDeg=(3.0, -2.0, 3.0), translationOffsetMm=(6.0, -5.0, 15.0), sod=700.0)


def _in_finest_level(info, seen: dict, n_levels: int = 0) -> bool:
    """True from the 3rd iteration of the finest intensity (refinement) level on."""
    m = None if info is None else re.search(r"intensity level (\d+)/(\d+)", str(info.stage))
    if m is None or m.group(1) != m.group(2):
        return False
    seen.setdefault("first", info.iteration)
    return info.iteration >= seen["first"] + 2


def run_synchronous(logic, case, options, cancel: bool, iterations_per_tick: int = 2) -> dict:
    """The module before issue 12: a 1 ms QTimer calls step(iterationsPerTick); finish() at the end."""
    main = MainThread(0.001)
    scene = case["scene"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    t_start = time.perf_counter()
    run = main.call("start", logic.start, case["ct"], case["xray"], out, **_common_args(case, options))
    seen, t_click, info = {}, None, None
    n_levels = len(options.levels)
    while not run.done:
        if cancel and t_click is None and _in_finest_level(info, seen, n_levels):
            t_click = time.perf_counter()  # the click arrives as the next tick starts: it waits for it
            info = main.call("tick", logic.step, iterations_per_tick)
            main.call("cancel", lambda: (logic.cancel(), logic.finish()))
            t_stop = time.perf_counter()
            return {**main.summary(), "cancel_latency_s": t_stop - t_click, "cancel_to_final_drr_s": t_stop - t_click,
                    "wall_s": t_stop - t_start}
        main.idle()
        info = main.call("tick", logic.step, iterations_per_tick)
    main.call("finish", logic.finish)
    return {**main.summary(), "wall_s": time.perf_counter() - t_start, "iterations": run.result.iterations}


def run_worker(logic, case, options, cancel: bool) -> dict:
    """This module: start() hands the work to a thread; a 50 ms QTimer calls poll()."""
    main = MainThread(0.05)
    scene = case["scene"]
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    t_start = time.perf_counter()
    run = main.call("start", logic.start, case["ct"], case["xray"], out, background=True,
                    **_common_args(case, options, method="auto"))
    seen, t_click, t_stop, info = {}, None, None, None
    n_levels = len(options.levels)
    while not run.finished:
        main.idle()
        before = (bool(run.nodes), run.stopped, run.finished)
        new = main.call("tick", run.poll)
        after = (bool(run.nodes), run.stopped, run.finished)
        if before != after:  # name the slice by what it applied: scene set-up, result, final DRR
            what = [w for w, b, a in zip(("set-up", "result", "final DRR"), before, after) if a and not b]
            main.slices[-1] = ("tick (" + ", ".join(what) + ")", main.slices[-1][1])
        info = new or info
        if run.error is not None:
            raise run.error
        if cancel and t_click is None and _in_finest_level(info, seen, n_levels):
            t_click = time.perf_counter()
            main.call("cancel", run.cancel)
        if t_click is not None and t_stop is None and run.stopped:
            t_stop = time.perf_counter()
    t_end = time.perf_counter()
    res = {**main.summary(), "wall_s": t_end - t_start, "iterations": run.result.iterations}
    if cancel:
        if t_click is None:
            raise RuntimeError("the run ended before reaching the finest level; raise finest_iterations")
        res.update(cancel_latency_s=t_stop - t_click, cancel_to_final_drr_s=t_end - t_click)
    return res


def measure(args) -> dict:
    import slicer

    adapter, logic_mod = _load_module_lib(Path(args.module_dir))
    from CorrRegLib.register import RegistrationOptions

    t = time.perf_counter()
    case = build_case(slicer, adapter, args.ct_size, args.detector)
    print(f"case built in {time.perf_counter() - t:.1f} s: CT {args.ct_size}^3, X-ray {args.detector}^2", file=sys.stderr)
    logic = logic_mod.CorrRegLogicCore(case["scene"])
    worker_api = "background" in logic.start.__code__.co_varnames
    runner = run_worker if worker_api else run_synchronous
    runs = []
    for i in range(args.runs):
        full = runner(logic, case, short_schedule(RegistrationOptions), cancel=False)
        print(f"run {i + 1} full: {json.dumps(full)}", file=sys.stderr)
        cancelled = runner(logic, case, short_schedule(RegistrationOptions, finest_iterations=40), cancel=True)
        print(f"run {i + 1} cancelled: {json.dumps(cancelled)}", file=sys.stderr)
        runs.append({"full": full, "cancelled": cancelled})

    def stat(key, part=None):
        values = [r[p][key] for r in runs for p in ((part,) if part else ("full", "cancelled")) if key in r[p]]
        return {"median": statistics.median(values), "max": max(values)} if values else None

    return {"api": "worker" if worker_api else "synchronous", "module_dir": str(args.module_dir),
            "ct_size": args.ct_size, "detector": args.detector, "torch_threads": torch.get_num_threads(),
            "longest_slice_s": stat("longest_slice_s"), "longest_stall_s": stat("longest_stall_s"),
            "cancel_latency_s": stat("cancel_latency_s", "cancelled"),
            "cancel_to_final_drr_s": stat("cancel_to_final_drr_s", "cancelled"), "runs": runs}


def compare_cli(args) -> dict:
    """The default schedule on a small case, method "intensity": in the module's worker and with
    ``corrreg register`` (whose --method offers no "auto")."""
    import slicer

    adapter, logic_mod = _load_module_lib(Path(args.module_dir))
    from CorrRegLib.io import write_ct, write_pose_json, write_xray

    case = build_case(slicer, adapter, args.ct_size, args.detector)
    logic = logic_mod.CorrRegLogicCore(case["scene"])
    out = case["scene"].AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    # "intensity": a pipeline the command line offers under the same name (its --method has no "auto")
    kwargs = _common_args(case, None, method="intensity")
    kwargs.pop("options")
    t0 = time.perf_counter()
    run = logic.start(case["ct"], case["xray"], out, background=True, **kwargs)
    while not run.finished:
        time.sleep(0.05)
        run.poll()
        if run.error is not None:
            raise run.error
    worker = {"wall_s": time.perf_counter() - t0, "runtime_s": run.result.runtime_s,
              "iterations": run.result.iterations, "loss": run.result.loss}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        volume = adapter.volumeFromNode(case["ct"])
        write_ct(volume, tmp / "ct.nrrd", pixel_type="int16")
        image = adapter.xrayArrayFromNode(case["xray"])
        write_xray(torch.from_numpy(image), tmp / "xray.nrrd", camera=case["camera"])
        write_pose_json(run.options.initialPose, tmp / "init.json")
        cmd = [sys.executable, "-m", "CorrRegLib.cli", "register", "--ct", str(tmp / "ct.nrrd"), "--xray",
               str(tmp / "xray.nrrd"), "--init", str(tmp / "init.json"), "--method", "intensity", "--output",
               str(tmp / "pose.json"), "--json", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        cli = json.loads(proc.stdout)
    return {"ct_size": args.ct_size, "detector": args.detector, "worker": worker,
            "cli": {"wall_s": wall, "runtime_s": cli["runtime_s"], "iterations": cli["iterations"], "loss": cli["loss"]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module-dir", default=str(ROOT / "CorrReg"), help="the CorrReg module folder to measure")
    p.add_argument("--ct-size", type=int, default=512, help="CT voxels per side")
    p.add_argument("--detector", type=int, default=1024, help="X-ray pixels per side")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compare-cli", action="store_true", help="worker vs corrreg register wall time (default schedule)")
    p.add_argument("--out", help="folder for results.json")
    args = p.parse_args(argv)
    if args.compare_cli and args.ct_size == 512 and args.detector == 1024 and "--ct-size" not in " ".join(sys.argv):
        args.ct_size, args.detector = 128, 256
    res = compare_cli(args) if args.compare_cli else measure(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
