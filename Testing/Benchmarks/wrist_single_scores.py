"""Each wrist view alone: does the image itself prefer the single-view result to the biplane pose?

    python Testing/Benchmarks/wrist_single_scores.py --ct radius.nrrd --part 0/2 --out D

Registers each view alone from ``--n`` starts (seed 0, 10 deg / 10 mm around
docs/results/wrist/polished_pose.json, local starts 8) and scores the result and the biplane pose
in that view on the ranking (band-pass NCC), refinement (finest level) and verification
similarities; writes the rows to D/part-I.json (docs/results/wrist/single_views_truth_scores.json,
docs/registration.md "One view").
"""
import sys, json, argparse
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'Testing/Benchmarks'))
import torch
from wrist_register import load_case, starts
from CorrRegLib.io import read_world_pose_json
from CorrRegLib.register import RegistrationOptions, RegistrationSession
from CorrRegLib.register.verify import Verifier
from CorrRegLib.geometry import transform_points, invert_pose, geodesic_distance
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument('--ct', required=True, help="the radius converted by corrreg convert-ct (docs/real-data.md)")
ap.add_argument('--out', required=True, help="folder for part-I.json")
ap.add_argument('--n', type=int, default=10, help="starts per view")
ap.add_argument('--part', default='0/1', metavar='I/N', help="run only the starts k with k %% N == I (one process per core)")
a0 = ap.parse_args()
a = argparse.Namespace(ct=a0.ct, data='/work/shared/data/wrist-biplane', threads=1)
vol, centre, vs = load_case(a)
pose, _ = read_world_pose_json(ROOT / 'docs/results/wrist/polished_pose.json')
opts = RegistrationOptions(local_starts=8)
part, n = map(int, a0.part.split('/'))
rows = []
for vi, v in enumerate(vs):
    truth = v.camera_from_world @ pose
    for k, st in enumerate(starts(pose, centre, a0.n, 10, 10, 0)):
        if k % n != part: continue
        s = RegistrationSession(vol, v.image, v.camera, v.camera_from_world @ st, mask=v.mask, method='intensity', isocenter=centre, options=opts)
        r = s.run()
        P = s.problem
        both = torch.stack([r.pose, truth])
        rank = Verifier(opts.verify_level, None).scores(P, both, 'bandpass_ncc')
        fine, _ = P.similarity(both, opts.levels[-1])
        ver = Verifier(opts.verify_level, None).scores(P, both)
        err = transform_points(r.pose, centre.reshape(1, 3))[0] - transform_points(truth, centre.reshape(1, 3))[0]
        rot = float(geodesic_distance(invert_pose(v.camera_from_world) @ r.pose, pose)[0])
        row = {"view": vi + 1, "start": k, "flagged": r.flagged, "inplane": round(float(err[:2].norm()), 1), "depth": round(float(err[2].abs()), 1), "rot": round(rot, 1),
               "rank_res_truth": [round(float(x), 4) for x in rank], "fine_res_truth": [round(float(x), 4) for x in fine.detach()], "verify_res_truth": [round(float(x), 4) for x in ver],
               "ev": {k2: (round(v2, 3) if isinstance(v2, float) else v2) for k2, v2 in (r.evidence or {}).items()}, "pose": r.pose.tolist()}
        rows.append(row); print(json.dumps({k2: v2 for k2, v2 in row.items() if k2 != 'pose'}), flush=True)
Path(a0.out).mkdir(parents=True, exist_ok=True)
json.dump(rows, open(Path(a0.out) / f'part-{part}.json', 'w'))
