"""Which similarity ranks the wrist's local starts right? Each run's starts after the coarse levels,
scored by several similarities at the ranking level, against a reference pose.

For each of ``--starts`` seeded starts around ``--pose`` (as ``wrist_register.py``), the start
and its ``--local-starts`` neighbours are refined together at the candidate levels (16 and 32
px), exactly as a registration with local starts does before it ranks them. Each refined pose is
then scored by every similarity of ``--similarities`` at ``verify_level`` (64 px across the CT's
footprint), as named (no bone-only substitution), and its centroid distance from ``--reference``
is measured. A similarity ranks a run right when its top pose lies within ``--within`` mm of the
reference. Prints, per similarity, in how many runs it does so, out of the runs that have such a
pose at all; writes every score to ``--out`` (JSON) and, with ``--picture``, a plot (``--plot
A.json B.json --similarities S,T --picture P.png`` draws saved runs together).

    python Testing/Benchmarks/wrist_rank_starts.py --ct radius.nrrd --pose docs/results/wrist/biplane.json \\
        --reference docs/results/wrist/radius_shadow_reference.json --seed 1 --out rank-seed1.json

The reference is a pose judged by eye (docs/real-data.md): the radius on its own shadow in both
views. It tells the radius's basin from the ulna's, 19 mm away; it is not a ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wrist_register import DATA, load_case, starts  # noqa: E402

from CorrRegLib.geometry import transform_points  # noqa: E402
from CorrRegLib.io import read_world_pose_json  # noqa: E402
from CorrRegLib.register import RegistrationOptions, RegistrationSession  # noqa: E402
from CorrRegLib.register.refine import LevelRefiner  # noqa: E402
from CorrRegLib.register.search import LocalStarts  # noqa: E402
from CorrRegLib.register.state import RunState  # noqa: E402
from CorrRegLib.register.verify import Verifier  # noqa: E402


def refined_local_starts(session: RegistrationSession, o: RegistrationOptions) -> torch.Tensor:
    """(N + 1, 4, 4) reference-view poses: the start and its local starts after the candidate levels."""
    problem = session.problem
    state = RunState(problem.initial_pose, problem.bounds)
    list(LocalStarts(o.local_starts, o.local_start_deg, o.local_start_mm, o.seed).run(problem, state))
    poses = torch.stack([p for _, p in state.candidates])
    for level in o.candidate_levels:
        refiner = LevelRefiner(problem, poses, level)
        for _ in refiner.steps():
            pass
        poses = refiner.best_poses
    return poses


def save_picture(path: Path, sets: list[tuple[str, list[dict]]], names: list[str], within: float) -> None:
    """One panel per similarity: each run's poses, score minus the run's best against the distance
    from the reference; the run's pick green (within ``within`` mm) or red; a marker per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (label, runs), marker in zip(sets, "o^sv"):
            for r in runs:
                d, v = np.array(r["distance_mm"]), np.array(r["scores"][name])
                k = int(np.argmax(v))
                ax.scatter(d, v - v.max(), s=12, c="0.6", marker=marker)
                ax.scatter(d[k], 0.0, s=40, c="g" if d[k] < within else "r", marker=marker)
        ax.axvline(within, ls=":", c="k")
        ax.set_xlabel("centroid distance from the reference (mm)")
        ax.set_ylabel("score minus the run's best")
        ax.set_title(name)
    legend = ", ".join(f"{m} {label}" for (label, _), m in zip(sets, "o^sv"))
    fig.suptitle(f"each run's local starts after the coarse levels; the run's pick green (near the reference) or red; {legend}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct")
    ap.add_argument("--pose", help="world_from_ct JSON the starts are drawn around")
    ap.add_argument("--reference", help="world_from_ct JSON that marks the right basin")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--deg", type=float, default=10.0)
    ap.add_argument("--mm", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local-starts", type=int, default=8)
    ap.add_argument("--similarities", default="gradient_ncc+ngf,bandpass_ncc,ncc,gradient_ncc,ngf")
    ap.add_argument("--within", type=float, default=8.0, help="mm from the reference that count as its basin")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON of every run's scores (needed unless --plot)")
    ap.add_argument("--picture", help="PNG of the scores against the distance")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only draw --picture from these --out files")
    a = ap.parse_args()
    names = a.similarities.split(",")
    if a.plot:
        sets = [(Path(f).stem, json.loads(Path(f).read_text())["runs"]) for f in a.plot]
        save_picture(Path(a.picture or "rank.png"), sets, names, a.within)
        return 0
    if not (a.ct and a.pose and a.reference and a.out):
        ap.error("--ct, --pose, --reference and --out are needed (or --plot)")
    vol, centre, views = load_case(a)
    pose, _ = read_world_pose_json(a.pose)
    reference, _ = read_world_pose_json(a.reference)
    o = RegistrationOptions(local_starts=a.local_starts)
    target = transform_points(reference, centre.reshape(1, 3))
    verifier = Verifier(o.verify_level, None)  # ranking needs its scores, not its bar
    runs = []
    for k, start in enumerate(starts(pose, centre, a.starts, a.deg, a.mm, a.seed)):
        t = time.perf_counter()
        session = RegistrationSession(vol, initial_pose=start, views=views, method="intensity", isocenter=centre, options=o)
        poses = refined_local_starts(session, o)
        world = [session.problem.world_pose(p) for p in poses]
        distance = [float((transform_points(w, centre.reshape(1, 3)) - target).norm()) for w in world]
        scores = {n: verifier.scores(session.problem, poses, n).tolist() for n in names}
        runs.append({"start": k, "distance_mm": distance, "scores": scores, "world_from_ct": [w.tolist() for w in world],
                     "seconds": time.perf_counter() - t})
        picks = " ".join(f"{n}: {distance[int(np.argmax(scores[n]))]:.1f} mm" for n in names)
        print(f"start {k}: nearest {min(distance):.1f} mm; picks {picks}", flush=True)
    reached = [r for r in runs if min(r["distance_mm"]) < a.within]
    summary = {n: {"right": sum(r["distance_mm"][int(np.argmax(r["scores"][n]))] < a.within for r in runs),
                   "reached": len(reached), "runs": len(runs)} for n in names}
    for n, s in summary.items():
        print(f"{n}: ranks a pose within {a.within:g} mm of the reference first in {s['right']} of the {s['reached']} "
              f"runs that have one ({s['runs']} runs)")
    Path(a.out).write_text(json.dumps({"seed": a.seed, "within_mm": a.within, "summary": summary, "runs": runs}, indent=1))
    if a.picture:
        save_picture(Path(a.picture), [(f"seed {a.seed}", runs)], names, a.within)
    return 0


if __name__ == "__main__":
    sys.exit(main())
