"""Does the local starts' flag tell the wrist's right results from its wrong ones? Reads the runs
that ``wrist_rank_starts.py`` saved (each run's local starts after the coarse levels, world_from_ct,
and their ranking scores) and judges each run as a registration does (search.CandidateRefinement,
pipeline.Pipeline.conclude): basins of poses that place the radius's bone within ``BASIN_MM`` of
each other (Problem.bone_move, depth included), the kept basin's agreement and its margin over
the next (``rank_margin``). It judges the coarse ranking only: where that margin is under
``min_rank_margin`` a registration finishes the next basin too and judges the two finished
poses (the runoff, pipeline.Pipeline._runoff), which only the full runs show
(``wrist_register.py``).

    python Testing/Benchmarks/wrist_rank_starts.py --ct radius.nrrd --pose docs/results/wrist/best_pose.json \\
        --reference docs/results/wrist/polished_pose.json --similarities bandpass_ncc --seed 0 --out rank-seed0.json
    python Testing/Benchmarks/wrist_basins.py --ct radius.nrrd --reference docs/results/wrist/polished_pose.json \\
        rank-seed0.json rank-seed1.json

A run is *right* when its kept pose places the bone within ``--within`` mm of ``--reference`` (the
same measure)
(a registered result, not a ground truth). Prints per run the agreement, the margin and the
distance of the rival, then per file: how many right and wrong runs each rule flags (the margin
rule at ``--min-rank-margin``, default RegistrationOptions'; the previous rule, fewer than half
of the starts within 4 deg and 6 mm at the isocenter), and the median spread of the ranking score
inside the kept basin (relative to its loss), which is how the default margin was chosen (seed 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wrist_register import DATA, load_case  # noqa: E402

from CorrRegLib.geometry import geodesic_distance, transform_points  # noqa: E402
from CorrRegLib.io import read_world_pose_json  # noqa: E402
from CorrRegLib.register import RegistrationOptions  # noqa: E402
from CorrRegLib.register.problem import Problem  # noqa: E402
from CorrRegLib.register.search import BASIN_MM, basins  # noqa: E402


def judge(poses: list[torch.Tensor], scores: list[float], shift: Callable[[torch.Tensor, torch.Tensor], float],
          centre: torch.Tensor) -> dict:
    """One run as the registration judges it (world_from_ct poses, ``shift`` between two of them):
    the kept pose, its agreement, margin and rival, the within-basin spread of the score, and the
    previous rule's agreement."""
    ranked = sorted(zip(scores, poses), key=lambda t: -t[0])
    kept = basins(ranked, shift, BASIN_MM)
    (s0, p0) = kept[0]
    members = [s for s, p in ranked if shift(p, p0) < BASIN_MM]
    iso = centre.reshape(1, 3)

    def old_close(p: torch.Tensor) -> bool:  # the rule before: 4 deg and 6 mm at the isocenter
        moved = (transform_points(p, iso) - transform_points(p0, iso)).norm()
        return float(geodesic_distance(p, p0)[0]) < 4.0 and float(moved) < 6.0

    out = {"kept": p0, "agreement": len(members) / len(poses),
           "old_agreement": sum(old_close(p) for p in poses) / len(poses),
           "spread": (members[0] - members[-1]) / max(1.0 - members[0], 1e-9) if len(members) > 1 else None}
    if len(kept) > 1:
        out["rank_margin"] = (1.0 - kept[1][0]) / max(1.0 - s0, 1e-9) - 1.0
        out["rival_mm"] = shift(p0, kept[1][1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by wrist_rank_starts.py --out")
    ap.add_argument("--ct", required=True)
    ap.add_argument("--reference", required=True, help="world_from_ct JSON of the right result")
    ap.add_argument("--similarity", default="bandpass_ncc", help="the ranking score saved in the runs")
    ap.add_argument("--within", type=float, default=BASIN_MM, help="bone move (mm, Problem.bone_move) from --reference that is right")
    ap.add_argument("--min-rank-margin", type=float, default=RegistrationOptions().min_rank_margin)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    vol, centre, views = load_case(a)
    reference, _ = read_world_pose_json(a.reference)
    # what a registration measures basins with (Problem.bone_move): any start will do
    problem = Problem(vol, views, centre, views[0].camera_from_world @ reference, torch.device("cpu"),
                      RegistrationOptions())

    def shift(p: torch.Tensor, q: torch.Tensor) -> float:
        return problem.bone_move(problem.ref_pose(p), problem.ref_pose(q))

    for path in a.runs:
        runs = json.loads(Path(path).read_text())["runs"]
        counts = {"right": 0, "wrong": 0, "margin_flags_right": 0, "margin_flags_wrong": 0,
                  "old_flags_right": 0, "old_flags_wrong": 0}
        spreads = []
        for r in runs:
            poses = [torch.tensor(w, dtype=torch.float64) for w in r["world_from_ct"]]
            j = judge(poses, r["scores"][a.similarity], shift, centre)
            right = shift(j["kept"], reference) < a.within
            margin = j.get("rank_margin")
            flagged = margin is not None and margin < a.min_rank_margin
            old = j["old_agreement"] < 0.5
            tag = "right" if right else "wrong"
            counts[tag] += 1
            counts[f"margin_flags_{tag}"] += flagged
            counts[f"old_flags_{tag}"] += old
            if j["spread"] is not None:
                spreads.append(j["spread"])
            rival = "no rival" if margin is None else f"margin {margin:.3f}, rival {j['rival_mm']:.1f} mm"
            print(f"{Path(path).stem} start {r['start']}: {tag}, {shift(j['kept'], reference):.1f} mm from "
                  f"the reference; agreement {j['agreement']:.2f} (before: {j['old_agreement']:.2f}); {rival}"
                  f"{'; flagged' if flagged else ''}")
        print(json.dumps({"file": Path(path).stem, **counts, "min_rank_margin": a.min_rank_margin,
                          "median_relative_spread_in_basin": statistics.median(spreads) if spreads else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
