"""results.csv: one row per (case, method), appended and flushed as each finishes.

An interrupted run resumes from it: a row cut short is dropped when the file is read back.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

CSV_FIELDS = (
    "case", "method", "initial_mtre_mm", "final_mtre_mm", "initial_mpd_mm", "final_mpd_mm",
    "initial_rotation_error_deg", "initial_translation_error_mm", "rotation_error_deg", "translation_error_mm",
    "success_10mm", "success_2mm", "success_1mm", "iterations", "wall_time_s", "registration_time_s",
    "flagged", "message", "noise_seed", "final_pose",
)

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
