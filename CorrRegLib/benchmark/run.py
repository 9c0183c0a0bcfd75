"""Running a benchmark: one cell (``run_benchmark``) or several CTs (``run_cells``), resumable.

A cell's folder holds ``run.json`` (its fingerprint: a resume with other case definitions is
refused), ``results.csv`` (appended row by row), ``summary.json`` / ``summary.md`` and the plots.
A multi-CT run puts one cell folder per CT under its folder, and a summary over them beside.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..register import RegistrationOptions
from .cases import generate_cases, run_method
from .cells import CellSpec, check_names
from .config import BenchmarkConfig, prepare
from .plots import save_plots
from .results import _ResultsWriter, read_results
from .summary import build_summary, cell_name, load_cell, summarize_cells, write_cells_summary, write_summary_md


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
    """Run (or resume) one cell into ``out_dir``; returns the summary dict (summary.json).

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
    run_info = {"fingerprint": fingerprint, "cell": {"ct": cell_name(config), "source": setup.source.name},
                "cases": max(n, max((r["case"] + 1 for r in rows), default=0)),
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

        desc = f"benchmark {cell_name(config)}/{setup.source.name} {config.protocol}"
        with tqdm(total=n, initial=n - len(todo), desc=desc, unit="case", file=sys.stderr,
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


def run_cells(
    config: BenchmarkConfig,
    cells: Sequence[CellSpec],
    out_dir: str | Path,
    options: RegistrationOptions | None = None,
    progress: bool = True,
    plots: bool = True,
    command: str | None = None,
) -> dict:
    """Run (or resume) every cell of a multi-CT run: cell ``c`` into ``out_dir/c.name`` with
    ``config`` and the cell's CT, targets, model and X-ray CT; then ``summary.json`` /
    ``summary.md`` in ``out_dir``: each cell and the pooled statistics (summary.summarize_cells).
    Every cell's inputs are checked before the first case runs."""
    cells = list(cells)
    if not cells:
        raise ValueError("no CTs to benchmark")
    check_names(cells)
    configs = [replace(config, **c.config_overrides()) for c in cells]
    for cfg in configs:  # every input check before any work (loads each CT once more; cheap next to a run)
        prepare(replace(cfg))
    out = Path(out_dir)
    per_cell = {}
    for c, cfg in zip(cells, configs):
        per_cell[c.name] = run_benchmark(cfg, out / c.name, options=options, progress=progress, plots=plots,
                                         command=command)
    loaded = [load_cell(out / c.name) for c in cells]
    summary = summarize_cells(loaded, list(config.methods), int(config.cases))
    summary["rows_run"] = sum(s["rows_run"] for s in per_cell.values())
    summary["rows_reused"] = sum(s["rows_reused"] for s in per_cell.values())
    write_cells_summary(out, summary, command=command)
    return summary
