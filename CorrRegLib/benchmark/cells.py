"""Several CTs in one run: the cells, from repeated ``--ct`` options or a manifest file.

A cell is one CT (with its targets, its patient-specific model and the CT its X-rays are rendered
from) measured with the run's X-ray source. A manifest is a JSON list of objects::

    [{"name": "chest", "ct": "chest/ct.nii.gz", "targets": "chest/mask.nii.gz", "target_labels": "29-46",
      "model": "models/chest", "xray_ct": null},
     {"name": "phantom_3mm", "ct": "phantom", "phantom_spacing_mm": 3}]

``name`` (a folder name: letters, digits, ``._-``) and ``ct`` are required; ``targets``,
``target_labels`` (``"29-46"`` or a list), ``model``, ``xray_ct`` and ``phantom_spacing_mm`` are
optional. Relative paths are relative to the manifest's folder; ``ct`` may be ``phantom``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import ct_name, parse_labels

MANIFEST_KEYS = ("name", "ct", "targets", "target_labels", "model", "xray_ct", "phantom_spacing_mm")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class CellSpec:
    """One CT of a multi-CT run (paths as given, or resolved against a manifest's folder)."""

    name: str
    ct: str  # a CT file or folder, or "phantom"
    targets: str | None = None
    target_labels: tuple[int, ...] | None = None
    model: str | None = None  # patient-specific network for this CT
    xray_ct: str | None = None  # the CT the X-rays are rendered from (None: ``ct`` itself)
    phantom_spacing_mm: float | None = None  # with ct "phantom" (None: the run's)

    def config_overrides(self) -> dict:
        """The BenchmarkConfig fields this cell sets."""
        out = {"name": self.name, "ct": self.ct, "targets": self.targets, "target_labels": self.target_labels,
               "model": self.model, "xray_ct": self.xray_ct}
        if self.phantom_spacing_mm is not None:
            out["phantom_spacing_mm"] = float(self.phantom_spacing_mm)
        return out


def check_names(cells: Sequence[CellSpec]) -> None:
    seen = set()
    for c in cells:
        if not _NAME.match(c.name) or c.name in (".", ".."):
            raise ValueError(f"cell name {c.name!r} must be a folder name (letters, digits, '.', '_', '-')")
        if c.name in seen:
            raise ValueError(f"two CTs are both named {c.name!r}; give each a name of its own")
        seen.add(c.name)


def read_manifest(path: str | Path) -> list[CellSpec]:
    """The cells of a manifest file (module docstring)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {p} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {p} is not valid JSON ({err})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"manifest {p} must be a non-empty JSON list of {{name, ct, targets, ...}} objects")
    base = p.resolve().parent

    def path_of(v):
        if v is None:
            return None
        if str(v).lower() == "phantom":
            return "phantom"
        q = Path(str(v)).expanduser()
        return str(q if q.is_absolute() else base / q)

    cells = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"manifest {p}: entry {k} is not an object")
        unknown = sorted(set(entry) - set(MANIFEST_KEYS))
        if unknown:
            raise ValueError(f"manifest {p}: entry {k} has unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(MANIFEST_KEYS)}")
        if not entry.get("name") or not entry.get("ct"):
            raise ValueError(f"manifest {p}: entry {k} needs a name and a ct")
        spacing = entry.get("phantom_spacing_mm")
        cells.append(CellSpec(
            name=str(entry["name"]), ct=path_of(entry["ct"]), targets=path_of(entry.get("targets")),
            target_labels=parse_labels(entry.get("target_labels")), model=path_of(entry.get("model")),
            xray_ct=path_of(entry.get("xray_ct")), phantom_spacing_mm=None if spacing is None else float(spacing),
        ))
    check_names(cells)
    return cells


def cells_from_args(cts: Sequence[str], targets: Sequence[str] = (), target_labels: Sequence[str] = (),
                    models: Sequence[str] = (), xray_cts: Sequence[str] = (),
                    names: Sequence[str] = ()) -> list[CellSpec]:
    """Cells from repeated command-line options, matched by position.

    ``targets``, ``xray_cts`` and ``names``: none, or one per CT; ``target_labels`` and ``models``:
    none, one for every CT, or one per CT. ``-`` in a slot means "none" for that CT. Names default
    to the CTs' file names (``_2``, ``_3`` ... where two agree)."""
    n = len(cts)

    def spread(values: Sequence[str], option: str, shared: bool) -> list[str | None]:
        vals = list(values or [])
        if not vals:
            return [None] * n
        if len(vals) == 1 and shared:
            vals = vals * n
        if len(vals) != n:
            allowed = "one for all or one per --ct" if shared else "one per --ct"
            raise ValueError(f"{len(vals)} {option} for {n} --ct: give {allowed} ('-' for none)")
        return [None if v == "-" else v for v in vals]

    tg = spread(targets, "--targets", n == 1)
    lb = spread(target_labels, "--target-labels", True)
    md = spread(models, "--model", True)
    xc = spread(xray_cts, "--xray-ct", n == 1)
    given = spread(names, "--name", n == 1)
    chosen: list[str] = []
    for ct, name in zip(cts, given):
        if name is None:
            base = ct_name(ct)
            name, k = base, 2
            while name in chosen or name in given:
                name, k = f"{base}_{k}", k + 1
        chosen.append(name)
    cells = [CellSpec(chosen[i], cts[i], tg[i], parse_labels(lb[i]), md[i], xc[i]) for i in range(n)]
    check_names(cells)
    return cells
