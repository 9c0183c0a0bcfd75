"""What the similarity windows (Problem.window) save: one bone in a large image, scored and
differentiated on the window around its projection against the whole canvas, in the same run.

    python Testing/Benchmarks/bench_similarity_window.py                       # the phantom's L3, 1024 px
    python Testing/Benchmarks/bench_similarity_window.py --wrist radius.nrrd   # the wrist, both 1760 px views

For each refinement level of the default schedule it times ``--repeats`` forward + backward
passes of ``Problem.similarity`` for a batch of ``--batch`` poses (the local starts' batch) with
and without the window, checks that both give the same scores, and prints the medians and their
ratio. The CPU is shared and noisy: read the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CorrRegLib.geometry import Camera, c_arm_pose  # noqa: E402
from CorrRegLib.phantom import small_phantom  # noqa: E402
from CorrRegLib.protocols import perturb_pose  # noqa: E402
from CorrRegLib.register import RegistrationOptions, RegistrationSession, View  # noqa: E402
from CorrRegLib.register.refine import pose_from_params  # noqa: E402
from CorrRegLib.simulate import simulate_xray  # noqa: E402


def phantom_case():
    """The phantom's L3 alone, against a 1024 px X-ray of the whole phantom (0.3 mm pixels)."""
    ph = small_phantom(seed=0)
    bone = ph.volume.keep_only(ph.labels == 3)
    centre = bone.bone_center_lps()
    cam = Camera(sdd=1000.0, pixel_spacing=(0.3, 0.3), size=(1024, 1024))
    pose = c_arm_pose(ph.volume.bone_center_lps(), 700.0)
    xray = simulate_xray(ph.volume, cam, pose, dose=1e4, seed=0).image
    return bone, centre, pose, [View(xray, cam)]


def wrist_case(ct: str):
    from wrist_register import DATA, load_case
    from CorrRegLib.io import read_world_pose_json

    ns = argparse.Namespace(ct=ct, data=str(DATA), threads=torch.get_num_threads())
    vol, centre, views = load_case(ns)
    pose, _ = read_world_pose_json(Path(__file__).resolve().parents[2] / "docs/results/wrist/best_pose.json")
    return vol, centre, pose, views


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wrist", metavar="CT", help="the wrist's radius (corrreg convert-ct, docs/real-data.md)")
    ap.add_argument("--batch", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    vol, centre, pose, views = wrist_case(a.wrist) if a.wrist else phantom_case()
    problem = RegistrationSession(vol, initial_pose=pose, views=views, method="intensity", isocenter=centre).problem
    ref = problem.ref_pose(pose)
    g = torch.Generator().manual_seed(0)
    poses = torch.stack([perturb_pose(ref, centre, (torch.randn(3, generator=g) * 2).tolist(),
                                      (torch.randn(3, generator=g) * 2).tolist()) for _ in range(a.batch)])
    rows = []
    for level in RegistrationOptions().levels:
        times, scores = {}, {}
        for windowed in (True, False):
            t = []
            for _ in range(a.repeats + 1):  # the first call builds the projectors: not timed
                params = torch.zeros(a.batch, 6, dtype=torch.float64, requires_grad=True)
                start = time.perf_counter()
                score, _ = problem.similarity(pose_from_params(poses, problem.isocenter.expand(a.batch, 3), params, 100.0),
                                              level, windowed=windowed)
                score.sum().backward()
                t.append(time.perf_counter() - start)
            times[windowed], scores[windowed] = statistics.median(t[1:]), score.detach()
        rows.append({"level_px": level.detector_px, "window_s": times[True], "whole_canvas_s": times[False],
                     "ratio": times[False] / times[True],
                     "max_score_difference": float((scores[True] - scores[False]).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    total = sum(r["whole_canvas_s"] for r in rows) / sum(r["window_s"] for r in rows)
    print(f"{'wrist' if a.wrist else 'phantom L3'}: forward + backward of {a.batch} poses, median of {a.repeats}; "
          f"whole canvas / window over all levels = {total:.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
