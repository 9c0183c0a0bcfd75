"""Similarities as rankers, and verification, on the cells of a generalisation run.

    .bench-env/bin/python Testing/Benchmarks/bench_rankers.py --run out/genA --cases 10 --out docs/results/rankers

For every cell (``RUN/SOURCE/NAME`` of ``run_generalisation.py``) and case, the poses compared are
the truth and the *wrong poses the searches found*: every final pose of the cell's
``results.csv`` with mTRE >= 10 mm (any method), plus the truth moved one vertebra (+-33 mm along
the image's vertical), turned 15 deg about each camera axis and moved 60 mm in depth (the
neighbours a search lands in). A similarity ranks the case right when the truth scores above
every wrong pose; the table gives the share of cases and the median margin, per similarity and
level, with the similarity region the registration uses (the CT's projection, grown or, for a
cropped CT, shrunk). The verification part scores the consistency (register/verify.py) of the
truth, of every final pose with mTRE < 10 mm (successes) and of every wrong pose, and counts how
many of each the verification's bars would pass.

Prints markdown tables and writes them (and the raw rows as JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from CorrRegLib.benchmark.config import BenchmarkConfig, prepare  # noqa: E402
from CorrRegLib.benchmark.cases import generate_cases  # noqa: E402
from CorrRegLib.benchmark.results import read_results  # noqa: E402
from CorrRegLib.metrics import mtre  # noqa: E402
from CorrRegLib.protocols import perturb_pose  # noqa: E402
from CorrRegLib.register import Level, RegistrationSession  # noqa: E402

SIMILARITIES = ("ncc", "gradient_ncc", "patch_ncc", "multiscale_ncc", "multiscale_gradient_ncc", "ncc+gradient_ncc")
LEVELS = (32, 64, 128)


def neighbours(truth: torch.Tensor, iso: torch.Tensor) -> list[torch.Tensor]:
    out = [perturb_pose(truth, iso, [0.0, 0.0, 0.0], [0.0, s, 0.0]) for s in (-33.0, 33.0)]
    for axis in range(3):
        for sign in (-1.0, 1.0):
            e = [0.0, 0.0, 0.0]
            e[axis] = 15.0 * sign
            out.append(perturb_pose(truth, iso, e, [0.0, 0.0, 0.0]))
    out += [perturb_pose(truth, iso, [0.0, 0.0, 0.0], [0.0, 0.0, s]) for s in (-60.0, 60.0)]
    return out


def config_of(cell: Path) -> BenchmarkConfig:
    run = json.loads((cell / "run.json").read_text())
    fp = run["fingerprint"]
    cmd = run["command"].split()
    arg = lambda flag: cmd[cmd.index(flag) + 1] if flag in cmd else None  # noqa: E731
    labels = arg("--target-labels")
    return BenchmarkConfig(
        protocol=fp["protocol"], cases=run["cases"], seed=fp["seed"], methods=tuple(run["methods"]),
        detector_downsample=fp["detector_downsample"], ct=None if fp["ct"] == "phantom" else fp["ct"],
        targets=arg("--targets"), target_labels=tuple(int(v) for v in labels.split(",")) if labels else None,
        device="cpu", xray=fp["xray"], xray_source=fp["xray_source"]["name"], xray_ct=fp.get("xray_ct"),
        phantom_spacing_mm=fp.get("phantom_spacing_mm") or 2.5)


def study_cell(cell: Path, cases: int) -> list[dict]:
    setup = prepare(config_of(cell))
    rows = read_results(cell / "results.csv")
    out = []
    for case in generate_cases(setup, range(min(cases, setup.config.cases))):
        found = [r for r in rows if r["case"] == case.index]
        final = [torch.tensor(json.loads(r["final_pose"]), dtype=torch.float64).reshape(4, 4) for r in found]
        err = [float(mtre(p, case.true_pose, setup.targets)) for p in final]
        wrong = [p for p, e in zip(final, err) if e >= 10.0] + neighbours(case.true_pose, setup.isocenter)
        good = [p for p, e in zip(final, err) if e < 10.0]
        session = RegistrationSession(setup.volume, case.xray, setup.protocol.camera, case.start_pose,
                                      method="intensity", isocenter=setup.isocenter)
        poses = torch.stack([case.true_pose] + wrong)
        rank = {}
        with torch.no_grad():
            for px in LEVELS:
                level_kw = {"voxel_slack": 1.0} if px == 128 else {}
                for sim in SIMILARITIES:
                    s, _ = session.problem.similarity(poses, Level(px, 0, 0.0, sim, **level_kw))
                    rank[f"{sim}@{px}"] = float(s[0] - s[1:].max())
        verify = lambda p: session.verification(p)  # noqa: E731
        out.append({"cell": f"{cell.parent.name}/{cell.name}", "case": case.index, "margins": rank,
                    "truth": verify(case.true_pose), "successes": [verify(p) for p in good],
                    "wrong_found": [verify(p) for p, e in zip(final, err) if e >= 10.0]})
        print(out[-1]["cell"], case.index, "verified truth", out[-1]["truth"]["verified"], flush=True)
    return out


def tables(rows: list[dict]) -> str:
    cells = sorted({r["cell"] for r in rows})
    keys = [f"{s}@{px}" for px in LEVELS for s in SIMILARITIES]
    lines = ["| similarity @ px | " + " | ".join(cells) + " | all |", "|---|" + "---:|" * (len(cells) + 1)]
    for k in keys:
        parts = []
        for c in cells + ["all"]:
            m = [r["margins"][k] for r in rows if c in ("all", r["cell"])]
            parts.append(f"{sum(v > 0 for v in m)}/{len(m)} ({np.median(m):+.2f})")
        lines.append(f"| {k} | " + " | ".join(parts) + " |")
    lines += ["", "| cell | truths verified | successes verified | wrong poses found by the searches, refused |",
              "|---|---:|---:|---:|"]
    for c in cells + ["all"]:
        rs = [r for r in rows if c in ("all", r["cell"])]
        t = [r["truth"]["verified"] for r in rs]
        s = [v["verified"] for r in rs for v in r["successes"]]
        w = [not v["verified"] for r in rs for v in r["wrong_found"]]
        lines.append(f"| {c} | {sum(t)}/{len(t)} | {sum(s)}/{len(s)} | {sum(w)}/{len(w)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run_generalisation.py output folder (RUN/SOURCE/NAME cells)")
    ap.add_argument("--cases", type=int, default=10, help="cases per cell (the first N)")
    ap.add_argument("--only", help="comma-separated cell names (CT names)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    only = set(a.only.split(",")) if a.only else None
    cells = sorted(p.parent for p in Path(a.run).glob("*/*/results.csv") if only is None or p.parent.name in only)
    rows = [row for cell in cells for row in study_cell(cell, a.cases)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    text = tables(rows)
    (out / "tables.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
