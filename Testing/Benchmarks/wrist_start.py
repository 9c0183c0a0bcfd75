"""A rough start for the wrist's radius (docs/real-data.md): roll the bone about its own long axis.

    python Testing/Benchmarks/wrist_start.py --ct radius.nrrd --init start_triangulated.json --out start_roll_scan.json

``--init`` is a world_from_ct JSON whose rotation puts the CT's long (z) axis along the images'
vertical and whose translation puts the bone's centroid where it was triangulated from one
clicked point per view. A tubular bone's roll about its long axis is what a click cannot give:
the script rolls the CT in 30 deg steps (both ends up, 24 starts), refines each on both views
with the coarse levels only (16, 32, 64 px), and keeps the one whose result is most consistent
(verified, then highest gradient NCC). Writes the world_from_ct JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CorrRegLib.geometry import euler_to_rotation, rotation_about_point  # noqa: E402
from CorrRegLib.io import read_world_pose_json, write_world_pose_json  # noqa: E402
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession  # noqa: E402
from wrist_register import DATA, load_case  # noqa: E402

COARSE = RegistrationOptions(levels=(Level(16, 100, 6.0, "ncc"), Level(32, 100, 3.0, "ncc"), Level(64, 60, 1.0)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct", required=True)
    ap.add_argument("--init", required=True, help="world_from_ct JSON: long axis vertical, centroid triangulated")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--step", type=float, default=30.0, help="roll step (deg)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    vol, centre, vs = load_case(a)
    init, _ = read_world_pose_json(a.init)
    rows = []
    for flip in (0.0, 180.0):
        roll = 0.0
        while roll < 360.0:
            turn = euler_to_rotation(torch.tensor([flip, 0.0, roll], dtype=torch.float64))  # about the CT's z axis
            t = time.perf_counter()
            res = RegistrationSession(vol, initial_pose=init @ rotation_about_point(turn, centre), views=vs,
                                      method="intensity", options=COARSE, isocenter=centre).run()
            e = res.evidence
            rows.append({"flip_deg": flip, "roll_deg": roll, "verified": bool(e["verified"]),
                         "consistency": e["consistency"], "gradient_ncc": e["gradient_ncc"], "ncc": e.get("ncc"),
                         "seconds": time.perf_counter() - t, "pose": res.pose})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "pose"}), flush=True)
            roll += a.step
    best = max(rows, key=lambda r: (r["verified"], r["gradient_ncc"]))
    write_world_pose_json(best["pose"], a.out, {"note": f"roll scan: flip {best['flip_deg']:g} deg, roll "
                                                        f"{best['roll_deg']:g} deg, then coarse biplane intensity"})
    print("best:", {k: v for k, v in best.items() if k != "pose"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
