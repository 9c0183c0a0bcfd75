"""Summaries of results.csv rows: per method in a cell, per (CT, source) cell, and pooled over cells.

Everything is recomputed from the rows (metrics.summarize, metrics.capture_range). The flag
rates, with success meaning final mTRE < 10 mm:

* ``false_flag_rate`` = successes that the registration flagged / successes ("false flags");
* ``missed_failure_rate`` = failures that it did not flag / failures ("missed failures");

each is None (n/a) where its denominator is 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..geometry import Camera
from ..metrics import capture_range, percentiles, summarize
from .config import METHODS, ct_name
from .results import read_results


def flag_stats(rows: Sequence[dict]) -> dict:
    """Successes (mTRE < 10 mm), failures, false flags and missed failures of some rows."""
    succ = sum(1 for r in rows if r["success_10mm"])
    fail = len(rows) - succ
    false_flags = sum(1 for r in rows if r["success_10mm"] and r["flagged"])
    missed = sum(1 for r in rows if not r["success_10mm"] and not r["flagged"])
    return {"successes_10mm": succ, "failures_10mm": fail, "false_flags": false_flags, "missed_failures": missed,
            "false_flag_rate": false_flags / succ if succ else None,
            "missed_failure_rate": missed / fail if fail else None}


def summarize_rows(rows: Sequence[dict], methods: Sequence[str], n_cases: int) -> dict:
    """Per-method statistics of the rows of cases 0..n_cases-1 (DESIGN.md metrics, flag rates)."""
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
            **flag_stats(rs),
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


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _share(k: int, n: int) -> str:
    """``"1/28 (4%)"``; ``"0/0"`` where there is nothing to count."""
    return f"{k}/{n}" if n == 0 else f"{k}/{n} ({100 * k / n:.0f}%)"


TABLE_HEADER = ("| method | cases | SR 10 mm | SR 2 mm | SR 1 mm | top-50% mTRE | top-75% mTRE | top-95% mTRE "
                "| median | p75 | p95 | median time (s) | false flags | missed failures |")
TABLE_RULE = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def table_row(name: str, s: dict) -> str:
    """One markdown table row (mTRE in mm) of a method's summary; the peer scripts use it too."""
    def pm(k):
        return f"{_fmt(s[f'mtre_{k}_mean'])} +- {_fmt(s[f'mtre_{k}_std'])}"

    flags = ""
    if "false_flags" in s:
        flags = (f" {_share(s['false_flags'], s['successes_10mm'])} |"
                 f" {_share(s['missed_failures'], s['failures_10mm'])} |")
    else:
        flags = " | |"
    return (f"| {name} | {s['cases']} | {100 * s['sr_10mm']:.0f}% | {100 * s['sr_2mm']:.0f}% | {100 * s['sr_1mm']:.0f}% "
            f"| {pm('top50')} | {pm('top75')} | {pm('top95')} | {_fmt(s['mtre_median'])} | {_fmt(s['mtre_p75'])} "
            f"| {_fmt(s['mtre_p95'])} | {_fmt(s['runtime_median_s'], 1)} |{flags}")


def format_table(methods: dict) -> str:
    return "\n".join([TABLE_HEADER, TABLE_RULE] + [table_row(n, s) for n, s in methods.items()])


FLAG_NOTE = ("false flags = successes (final mTRE < 10 mm) that the registration flagged, out of the successes; "
             "missed failures = failures (mTRE >= 10 mm) it did not flag, out of the failures.")


def _camera_text(cam: Camera, factor: float) -> str:
    return (f"{cam.width} x {cam.height} px of {cam.pixel_spacing[0]:.4g} mm (the paper camera's 256 x 256 at 0.798 mm "
            f"downsampled {factor:g}x), sdd {cam.sdd:g} mm")


def source_text(info: dict) -> str:
    """``nanodrr 0.1.7 (torch backend, ...; HU: ...)`` for a source's info dict."""
    extra = [f"{k} {v}" for k, v in info.items() if k not in ("name", "version", "hu_conversion")]
    text = f"{info.get('name')} {info.get('version', '')}".strip()
    if extra:
        text += f" ({'; '.join(extra)})"
    if info.get("hu_conversion"):
        text += f"; HU conversion: {info['hu_conversion']}"
    return text


def write_summary_md(path: Path, summary: dict) -> None:
    s = summary
    ini = s["initial_mtre"]
    src = s.get("xray_source") or {"name": "corrreg"}
    lines = [
        f"# CorrReg benchmark: protocol `{s['protocol']}`, {s['cases']} cases, seed {s['seed']}",
        "",
        f"* CT: {s['ct']}",
        f"* targets (mTRE): {s['targets']}",
        f"* detector: {s['detector']}; sod {s['sod_mm']:g} mm",
        f"* X-ray source: {source_text(src)}; rendered from {s.get('xray_ct', 'the registered CT')}",
        f"* X-rays degraded per case with {', '.join(f'{k}={v:g}' for k, v in s['xray'].items())} and a per-case noise seed",
        f"* start: {'the protocol initial pose' if s['start'] == 'initial' else 'the ground-truth pose (sanity check)'}; "
        f"initial mTRE median {_fmt(ini['median'])} mm, p75 {_fmt(ini['p75'])}, p95 {_fmt(ini['p95'])}, max {_fmt(ini['max'])}",
        f"* command: `{s.get('command', '')}`; device {s.get('device')}, {s.get('torch_threads')} torch threads "
        "(wall times depend on the machine's load)",
        "",
        "mTRE in mm; SR = share of cases with final mTRE below 10 / 2 / 1 mm; top-X% = mean +- std over the X% best "
        "cases; time = wall-clock seconds per registration (median); " + FLAG_NOTE,
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


def build_summary(setup, rows: list[dict], methods: Sequence[str], n: int, command: str | None = None) -> dict:
    """summary.json of one cell (a ``BenchmarkSetup`` and its rows)."""
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
        "cell": {"ct": cell_name(cfg), "source": setup.fingerprint.get("xray_source", {}).get("name", "corrreg")},
        "ct": setup.ct_description,
        "targets": setup.targets_description,
        "n_targets": int(len(setup.targets)),
        "xray_source": setup.fingerprint.get("xray_source"),
        "xray_ct": setup.xray_ct_description,
        "xray": dict(cfg.xray),
        "isocenter_lps": [float(v) for v in setup.isocenter.tolist()],
        "initial_mtre": _initial_stats(rows, n),
        "device": str(setup.device),
        "torch_threads": _threads(),
        "methods": summarize_rows(rows, methods, n),
        "command": command,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cell_name(config) -> str:
    """A cell's CT name: ``config.name``, else ``phantom`` or the CT file's name without suffixes."""
    return str(config.name) if config.name else ct_name(config.ct)


# --------------------------------------------------------------------------------------------
# Several cells: per (CT, source) and pooled

#: Fingerprint entries that must agree between cells that are pooled (what a case *is*, apart
#: from its CT and its source).
POOL_KEYS = ("format_version", "protocol", "detector_downsample", "camera", "seed", "start", "xray",
             "registration_options")


def load_cell(folder: str | Path) -> dict:
    """A finished (or partial) cell folder: its name, source, fingerprint and rows."""
    d = Path(folder)
    try:
        run = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{d} is not a benchmark run folder ({err})") from None
    fp = run.get("fingerprint", {})
    src = fp.get("xray_source") or {"name": "corrreg", "version": "unknown"}
    cell = run.get("cell") or {}
    return {"dir": str(d), "ct": cell.get("ct") or d.name, "source": src.get("name", "corrreg"),
            "source_version": src.get("version"), "fingerprint": fp, "rows": read_results(d / "results.csv")}


def find_cells(root: str | Path) -> list[Path]:
    """Every folder below ``root`` (itself included) that holds a run.json and a results.csv."""
    r = Path(root)
    return sorted(p.parent for p in r.rglob("run.json") if (p.parent / "results.csv").exists())


def _complete_cases(rows: Sequence[dict], method: str) -> int:
    """The largest n such that cases 0..n-1 all have a row of ``method``."""
    have = {r["case"] for r in rows if r["method"] == method}
    n = 0
    while n in have:
        n += 1
    return n


def summarize_cells(cells: Sequence[dict], methods: Sequence[str] | None = None, n_cases: int | None = None) -> dict:
    """Per-cell and pooled statistics of loaded cells (``load_cell``).

    ``methods``: default, those with rows in every cell. ``n_cases``: default, the most cases
    0..n-1 that every (cell, method) has finished. Refuses cells whose case definitions differ
    (protocol, detector, seed, start, degradations, registration options) or that repeat a
    (CT, source) pair. The pooled statistics treat every cell's rows as one sample; ``worst_cell``
    and ``sr_10mm_min_cell`` name the cell with the lowest SR(10 mm).
    """
    if not cells:
        raise ValueError("no benchmark cells to summarise")
    ref = cells[0]
    for c in cells[1:]:
        diff = [k for k in POOL_KEYS if c["fingerprint"].get(k) != ref["fingerprint"].get(k)]
        if diff:
            raise ValueError(f"cannot pool {c['dir']} with {ref['dir']}: their cases differ in {', '.join(diff)}")
    seen = {}
    for c in cells:
        key = (c["ct"], c["source"])
        if key in seen:
            raise ValueError(f"cells {seen[key]} and {c['dir']} are both CT {key[0]!r} with source {key[1]!r}")
        seen[key] = c["dir"]
    if methods is None:
        common = set.intersection(*({r["method"] for r in c["rows"]} for c in cells))
        order = list(dict.fromkeys(r["method"] for c in cells for r in c["rows"]))
        methods = [m for m in order if m in common]
    methods = list(methods)
    if not methods:
        raise ValueError("no method has rows in every cell")
    complete = min(_complete_cases(c["rows"], m) for c in cells for m in methods)
    n = complete if n_cases is None else int(n_cases)
    if n < 1 or n > complete:
        raise ValueError(f"every cell has {complete} complete cases of {', '.join(methods)}; cannot summarise {n}")
    out_cells = []
    for c in cells:
        out_cells.append({"ct": c["ct"], "source": c["source"], "source_version": c["source_version"], "dir": c["dir"],
                          "methods": summarize_rows(c["rows"], methods, n)})
    pooled = summarize_rows([r for c in cells for r in c["rows"]], methods, n)
    for m in methods:
        worst = min(out_cells, key=lambda c: c["methods"][m]["sr_10mm"])
        pooled[m]["cells"] = len(cells)
        pooled[m]["sr_10mm_min_cell"] = worst["methods"][m]["sr_10mm"]
        pooled[m]["worst_cell"] = f"{worst['ct']} / {worst['source']}"
        pooled[m]["runtime_median_max_cell_s"] = max(c["methods"][m]["runtime_median_s"] for c in out_cells)
    fp = ref["fingerprint"]
    return {"cases_per_cell": n, "methods": methods, "protocol": fp.get("protocol"),
            "detector_downsample": fp.get("detector_downsample"), "seed": fp.get("seed"), "xray": fp.get("xray"),
            "cells": out_cells, "pooled": pooled}


CELLS_HEADER = ("| CT | source | method | cases | SR 10 mm | SR 2 mm | SR 1 mm | false flags | missed failures "
                "| median mTRE | median time (s) |")
CELLS_RULE = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"


def _cell_row(ct: str, source: str, method: str, s: dict) -> str:
    return (f"| {ct} | {source} | {method} | {s['cases']} | {100 * s['sr_10mm']:.0f}% | {100 * s['sr_2mm']:.0f}% "
            f"| {100 * s['sr_1mm']:.0f}% | {_share(s['false_flags'], s['successes_10mm'])} "
            f"| {_share(s['missed_failures'], s['failures_10mm'])} | {_fmt(s['mtre_median'])} "
            f"| {_fmt(s['runtime_median_s'], 1)} |")


def cells_table(summary: dict) -> str:
    """The generalisation table: one row per (cell, method), then the pooled rows."""
    lines = [CELLS_HEADER, CELLS_RULE]
    for c in summary["cells"]:
        for m in summary["methods"]:
            lines.append(_cell_row(c["ct"], c["source"], m, c["methods"][m]))
    for m in summary["methods"]:
        p = summary["pooled"][m]
        lines.append(_cell_row(f"**pooled** ({p['cells']} cell{'' if p['cells'] == 1 else 's'})", "all", m, p))
    return "\n".join(lines)


def pooled_table(summary: dict) -> str:
    """Per method over all cells: pooled SR, the worst cell's SR(10 mm) and flag rates."""
    lines = ["| method | cells | cases | SR 10 mm | worst cell SR 10 mm | SR 2 mm | SR 1 mm | false flags "
             "| missed failures | median time (s) | slowest cell's median (s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for m in summary["methods"]:
        p = summary["pooled"][m]
        lines.append(f"| {m} | {p['cells']} | {p['cases']} | {100 * p['sr_10mm']:.0f}% "
                     f"| {100 * p['sr_10mm_min_cell']:.0f}% ({p['worst_cell']}) | {100 * p['sr_2mm']:.0f}% "
                     f"| {100 * p['sr_1mm']:.0f}% | {_share(p['false_flags'], p['successes_10mm'])} "
                     f"| {_share(p['missed_failures'], p['failures_10mm'])} | {_fmt(p['runtime_median_s'], 1)} "
                     f"| {_fmt(p['runtime_median_max_cell_s'], 1)} |")
    return "\n".join(lines)


def write_cells_summary(folder: str | Path, summary: dict, title: str = "CorrReg generalisation benchmark",
                        command: str | None = None) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` of several cells into ``folder``."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    js = dict(summary, command=command)
    (d / "summary.json").write_text(json.dumps(js, indent=2), encoding="utf-8")
    deg = ", ".join(f"{k}={v:g}" for k, v in (summary.get("xray") or {}).items())
    lines = [f"# {title}: protocol `{summary['protocol']}`, {summary['cases_per_cell']} cases per cell, "
             f"seed {summary['seed']}", "",
             f"* detector downsampled {summary['detector_downsample']:g}x; X-rays degraded with {deg}",
             f"* command: `{command or ''}`", "",
             "SR = share of cases with final mTRE below 10 / 2 / 1 mm; " + FLAG_NOTE + " Time: median wall-clock "
             "seconds per registration.", "",
             pooled_table(summary), "", cells_table(summary), "", "Cells:", ""]
    lines += [f"* {c['ct']} / {c['source']} {c['source_version'] or ''}: `{c['dir']}`" for c in summary["cells"]]
    (d / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "summary.json", d / "summary.md"
