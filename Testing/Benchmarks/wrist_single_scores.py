"""Each wrist view alone: does the image itself prefer the single-view result to the biplane pose?

    python Testing/Benchmarks/wrist_single_scores.py --ct radius.nrrd --part 0/2 --out D

Registers each view alone from ``--n`` starts (seed 0, 10 deg / 10 mm around
docs/results/wrist/polished_pose.json, local starts 8) and scores the result and the biplane pose
in that view on the ranking (band-pass NCC), refinement (finest level) and verification
similarities; writes the rows to D/part-I.json (docs/results/wrist/single_views_truth_scores.json,
docs/registration.md "One view").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing" / "Benchmarks"))

from CorrRegLib.io import read_world_pose_json  # noqa: E402
from CorrRegLib.register import RegistrationOptions  # noqa: E402
from CorrRegLib.register.verify import Verifier  # noqa: E402
from wrist_register import DATA, alone, errors_in_view, load_case, starts  # noqa: E402


def scores(session, poses: torch.Tensor, options: RegistrationOptions) -> dict:
    """Each of ``poses`` scored in the session's view as the pipeline ranks, refines and verifies."""
    verifier = Verifier(options.verify_level, None)
    fine, _ = session.problem.similarity(poses, options.levels[-1])
    return {"rank": verifier.scores(session.problem, poses, options.local_start_ranking).tolist(),
            "fine": fine.detach().double().tolist(), "verify": verifier.scores(session.problem, poses).tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct", required=True, help="the radius converted by corrreg convert-ct (docs/real-data.md)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", required=True, help="folder for part-I.json")
    ap.add_argument("--n", type=int, default=10, help="starts per view")
    ap.add_argument("--part", default="0/1", metavar="I/N",
                    help="run only the starts k with k %% N == I (one process per core)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    vol, centre, views = load_case(a)
    pose, _ = read_world_pose_json(ROOT / "docs" / "results" / "wrist" / "polished_pose.json")
    options = RegistrationOptions(local_starts=8)
    part, n_parts = (int(x) for x in a.part.split("/"))
    rows = []
    for vi, view in enumerate(views):
        for k, start in enumerate(starts(pose, centre, a.n, 10.0, 10.0, 0)):
            if k % n_parts != part:
                continue
            session = alone(vol, view, start, centre, options)
            res = session.run()
            # [result, biplane pose] on each similarity
            both = scores(session, torch.stack([res.pose, view.camera_from_world @ pose]), options)
            rows.append({"view": vi + 1, "start": k, "flagged": res.flagged, **errors_in_view(res.pose, view, pose, centre),
                         **{f"{name}_res_truth": pair for name, pair in both.items()}, "evidence": res.evidence,
                         "pose": res.pose.tolist()})
            print(json.dumps({key: v for key, v in rows[-1].items() if key != "pose"}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"part-{part}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
