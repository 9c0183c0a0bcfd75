"""Wall time of ``corrreg train`` and ``corrreg register`` with one torch thread and with torch's
default (the number of physical cores, or OMP_NUM_THREADS), run as a user runs them.

On a CPU shared with other jobs, several OpenMP threads wait on each other and training can be
ten times slower than with one thread (issue 13); on an idle machine the default may win. This
measures both on the machine at hand: the settings alternate (round robin), so a change in the
machine's load hits both alike, and the medians and their ratio are printed.

    python Testing/Benchmarks/bench_threads.py [--steps 10] [--repeats 3] [--out bench-threads]

Needs nothing beyond the corrreg package (the phantom is built in).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def corrreg(*args: str) -> list[str]:
    return [sys.executable, "-m", "CorrRegLib.cli", *args]


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return seconds


def prepare(out: Path, env: dict) -> dict[str, str]:
    """A phantom CT, a camera, a true and an initial pose, and the simulated X-ray."""
    from CorrRegLib.geometry import Camera, reference_ap_pose
    from CorrRegLib.io import read_ct, write_camera_json, write_pose_json
    from CorrRegLib.protocols import perturb_pose

    run(corrreg("phantom", "--out", str(out / "phantom"), "--spacing", "2.5"), env)
    ct = out / "phantom" / "ct.nrrd"
    iso = read_ct(ct).bone_center_lps()
    truth = perturb_pose(reference_ap_pose(iso, 700.0), iso, [3.0, -4.0, 2.0], [0.0, 0.0, 0.0])
    write_pose_json(truth, out / "truth.json")
    write_pose_json(perturb_pose(truth, iso, [4.0, 3.0, -5.0], [6.0, -8.0, 15.0]), out / "init.json")
    write_camera_json(Camera(1011.7, (1.596, 1.596), (128, 128)), out / "cam.json")
    run(corrreg("simulate", "--ct", str(ct), "--camera", str(out / "cam.json"), "--pose", str(out / "truth.json"),
                "--out", str(out / "xray.nrrd")), env)
    return {"ct": str(ct), "xray": str(out / "xray.nrrd"), "init": str(out / "init.json")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training steps per `corrreg train` run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command and setting (default 3)")
    p.add_argument("--out", default="bench-threads", help="working folder (inputs, models, results.json)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    import torch

    default_threads = torch.get_num_threads()
    files = prepare(out, env)
    commands = {
        "train": lambda threads, i: corrreg(
            "train", "--ct", "phantom", "--out", str(out / f"model-{threads}-{i}"), "--steps", str(args.steps),
            "--batch-size", "4", "--validate-every", "0", "--quiet", "--overwrite", *threads_flag(threads)),
        "register": lambda threads, i: corrreg(
            "register", "--ct", files["ct"], "--xray", files["xray"], "--init", files["init"], "--method", "intensity",
            "--output", str(out / f"pose-{threads}-{i}.json"), "--quiet", *threads_flag(threads)),
    }
    times: dict[str, dict[str, list[float]]] = {c: {"1": [], "default": []} for c in commands}
    for i in range(args.repeats):
        for name, make in commands.items():
            for threads in ("1", "default"):
                seconds = run(make(threads, i), env)
                times[name][threads].append(seconds)
                print(f"{name:8s} threads={threads:7s} run {i + 1}: {seconds:7.1f} s", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{os.cpu_count()} CPUs, torch default {default_threads} threads, load average {load}")
    print("| command | 1 thread (median s) | default (median s) | default / 1 thread |")
    print("|---|---:|---:|---:|")
    summary = {}
    for name, t in times.items():
        one, default = statistics.median(t["1"]), statistics.median(t["default"])
        summary[name] = {"one_thread_s": t["1"], "default_s": t["default"], "median_one_s": one,
                         "median_default_s": default, "ratio_default_over_one": default / one}
        print(f"| {name} ({args.steps} steps) | {one:.1f} | {default:.1f} | {default / one:.2f} |" if name == "train"
              else f"| {name} | {one:.1f} | {default:.1f} | {default / one:.2f} |")
    record = {"cpus": os.cpu_count(), "torch_default_threads": default_threads, "load_average": load,
              "torch": torch.__version__, "python": platform.python_version(), "steps": args.steps,
              "repeats": args.repeats, "results": summary}
    (out / "results.json").write_text(json.dumps(record, indent=2))


def threads_flag(threads: str) -> list[str]:
    return [] if threads == "default" else ["--threads", threads]


if __name__ == "__main__":
    main()
