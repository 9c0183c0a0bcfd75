"""The biplane wrist (docs/real-data.md): register the radius to frame 0002 in both views together
and in each alone, from starts perturbed around a pose, and report how they agree.

    python Testing/Benchmarks/wrist_register.py --ct radius.nrrd --pose biplane.json --out out/wrist

``--ct`` is the radius converted by ``corrreg convert-ct`` (docs/real-data.md); ``--pose`` a
world_from_ct JSON (the output of the biplane ``corrreg register``). For each of ``--starts``
seeded starts (rotation offsets of ``--deg`` and translations of ``--mm`` in random directions
about the bone's centroid) it runs the biplane registration, and reports the spread of the
results (max distance of the bone's voxels from their mean position, max rotation from the mean
pose); then each view alone from the same starts, compared with ``--pose`` as in-plane and
depth errors of the centroid in that view. Each biplane row's ``offset_mm`` is the bone's mean
distance from where ``--pose`` puts it (its error, where that pose is known). Prints a JSON summary and writes it to ``--out``;
``--part I/N`` splits the starts over processes and ``--join`` gathers their parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import roma
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from CorrRegLib.cli_realdata import read_view  # noqa: E402
from CorrRegLib.geometry import geodesic_distance, invert_pose, project_points, random_perturbations, transform_points  # noqa: E402
from CorrRegLib.io import read_ct, read_world_pose_json  # noqa: E402
from CorrRegLib.metrics import mtre  # noqa: E402
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession, View  # noqa: E402
from CorrRegLib.volume import BONE_MU_PER_MM, Volume  # noqa: E402

DATA = Path("/work/shared/data/wrist-biplane")


def views(data: Path) -> list[View]:
    ns = argparse.Namespace(calibration=None, polarity="auto", mask="auto", invert="auto", camera_from_world=None,
                            intrinsics=None, sdd=None, pixel_spacing=None, principal_point=None, camera=None)
    out = []
    for k in (1, 2):
        ns.calibration = data / f"calibration/xr_calib_wrist_cam0{k}.txt"
        v = read_view(ns, data / f"xray/xr_rad_uln_cam0{k}_UND.0002.tif")
        out.append(View(v.xray.image, v.xray.camera, v.camera_from_world, v.mask_tensor, f"view {k}"))
    return out


def load_case(args: argparse.Namespace) -> tuple[Volume, torch.Tensor, list[View]]:
    """(radius CT, its bone centroid (LPS mm), both views) for ``--ct`` / ``--data``, after setting
    ``--threads``: what every wrist script starts from."""
    torch.set_num_threads(args.threads)
    vol = read_ct(args.ct)
    return vol, vol.bone_center_lps(), views(Path(args.data))


def bone_voxels(vol: Volume, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) slice index k, (N, 3) LPS mm) of every ``every``-th bone voxel of ``vol``."""
    kji = (vol.data > BONE_MU_PER_MM).nonzero()[::every]
    ijk1 = torch.cat([kji.flip(1).double(), torch.ones(len(kji), 1, dtype=torch.float64)], 1)
    return kji[:, 0], (ijk1 @ vol.lps_from_index().T)[:, :3]


def cut_fields(vs: list[View], vol: Volume, pose: torch.Tensor, cut: float) -> tuple[list[View], list[float]]:
    """The views with each usable field also ending across the bone (as a shaft runs out of the
    intensifier's disc): a straight edge perpendicular to the bone's projected long axis at
    ``pose``, ``cut`` standard deviations of its projected voxels from their centroid towards the
    shaft end (the CT's last slices), the shaft side masked out. Also returns, per view, the share
    of the bone's projected voxels beyond the edge."""
    k, lps = bone_voxels(vol, 20)
    shaft = k > k.double().median()
    out, hidden = [], []
    for v in vs:
        uv = project_points(v.camera, (v.camera_from_world @ pose)[None], lps)[0]
        c = uv.mean(0)
        d = uv - c
        axis = torch.linalg.svd(d, full_matrices=False).Vh[0]
        if float((d[shaft] @ axis).mean()) < 0:
            axis = -axis
        edge = cut * float((d @ axis).std())
        h, w = v.image.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                                indexing="ij")
        keep = ((xx - c[0]) * axis[0] + (yy - c[1]) * axis[1]) < edge
        out.append(View(v.image, v.camera, v.camera_from_world, keep if v.mask is None else v.mask & keep, v.name))
        hidden.append(float(((d @ axis) >= edge).double().mean()))
    return out, hidden


def starts(pose: torch.Tensor, centre: torch.Tensor, n: int, deg: float, mm: float, seed: int) -> list[torch.Tensor]:
    """world_from_ct starts: ``pose`` turned by ``deg`` about a random axis through the bone's
    centroid and moved by ``mm`` in a random direction (world frame)."""
    return random_perturbations(pose, centre, n, deg, mm, seed)


def spread(poses: list[torch.Tensor], points: torch.Tensor) -> tuple[float, float]:
    """(max over poses of the mean distance of ``points`` from their mean position (mm), max
    rotation from the first pose (deg))."""
    moved = torch.stack([transform_points(p, points) for p in poses])  # (P, N, 3)
    mean = moved.mean(0)
    dist = float((moved - mean).norm(dim=-1).mean(1).max())
    rot = max(float(geodesic_distance(poses[0], p)[0]) for p in poses)
    return dist, rot


def rotation_from_mean(poses: list[torch.Tensor]) -> float:
    """The largest rotation (deg) of any pose from their mean rotation (the rotation nearest the
    mean of the matrices): how far each result is from the one pose they agree on."""
    stack = torch.stack(poses)
    mean = torch.eye(4, dtype=torch.float64)
    mean[:3, :3] = roma.special_procrustes(stack[:, :3, :3].mean(0))
    return max(float(geodesic_distance(mean, p)[0]) for p in stack)


def alone(vol: Volume, view: View, world_start: torch.Tensor, centre: torch.Tensor, options: RegistrationOptions,
          method: str = "intensity") -> RegistrationSession:
    """A session registering ``view`` alone from the world_from_ct ``world_start`` (placed in its camera)."""
    return RegistrationSession(vol, view.image, view.camera, view.camera_from_world @ world_start, mask=view.mask,
                               method=method, isocenter=centre, options=options)


def errors_in_view(camera_from_ct: torch.Tensor, view: View, world_pose: torch.Tensor, centre: torch.Tensor) -> dict:
    """A single-view result against ``world_pose`` in that view: the bone centroid's in-plane and
    depth error (mm, its camera frame) and the rotation between them (deg)."""
    err = (transform_points(camera_from_ct, centre.reshape(1, 3))[0]
           - transform_points(view.camera_from_world @ world_pose, centre.reshape(1, 3))[0])
    rot = float(geodesic_distance(invert_pose(view.camera_from_world) @ camera_from_ct, world_pose)[0])
    return {"in_plane_mm": float(err[:2].norm()), "depth_mm": float(err[2].abs()), "rotation_deg": rot}


def summarize(rows: list[dict], single: list[dict], points: torch.Tensor, n_views: int) -> dict:
    """The spread of the verified biplane results and the single views' medians."""
    ok = [torch.tensor(r["world_from_ct"], dtype=torch.float64) for r in rows if not r["flagged"]]
    summary = {"starts": len(rows), "verified": len(ok), "median_seconds": float(np.median([r["seconds"] for r in rows])) if rows else None}
    if ok:
        d, r = spread(ok, points)
        summary.update(spread_mm=d, spread_deg=r, biplane_pose=ok[0].tolist())
    if rows:  # flagged or not: do the results depend on the start?
        every = [torch.tensor(r["world_from_ct"], dtype=torch.float64) for r in rows]
        d, r = spread(every, points)
        summary.update(spread_all_mm=d, spread_all_deg=r, rotation_from_mean_all_deg=rotation_from_mean(every))
        offsets = [r["offset_mm"] for r in rows if "offset_mm" in r]
        if offsets:  # from --pose: an error where that pose is known
            summary.update(offset_from_pose_median_mm=float(np.median(offsets)), offset_from_pose_max_mm=max(offsets))
    if single:
        summary["single_view"] = {
            f"view {vi + 1}": {stat: float(np.median([s[stat] for s in single if s["view"] == vi + 1]))
                               for stat in ("in_plane_mm", "depth_mm", "rotation_deg", "seconds")}
            | {"flagged": sum(s["flagged"] for s in single if s["view"] == vi + 1)}
            for vi in range(n_views)}
        summary["single_rows"] = single
    summary["rows"] = rows
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct", required=True)
    ap.add_argument("--pose", required=True, help="world_from_ct JSON to perturb around")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--deg", type=float, default=10.0)
    ap.add_argument("--mm", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="intensity")
    ap.add_argument("--single", action="store_true", help="also register each view alone from the same starts")
    ap.add_argument("--no-biplane", action="store_true", help="with --single: only the views alone")
    ap.add_argument("--fine", type=int, default=0, metavar="PX",
                    help="add a finest level of PX pixels across the bone (patch NCC) and verify at half of it")
    ap.add_argument("--local-starts", type=int, default=0, metavar="N",
                    help="each registration also refines N starts around its own (RegistrationOptions.local_starts)")
    ap.add_argument("--local-start-spread", type=float, nargs=2, default=None, metavar=("DEG", "MM"),
                    help="how far the local starts lie from the start (RegistrationOptions.local_start_deg, _mm)")
    ap.add_argument("--region-follows-pose", action="store_true", help="frame the compared region at every pose "
                    "instead of holding it through each level (RegistrationOptions.hold_region=False, the release before)")
    ap.add_argument("--polish", nargs="?", const="bandpass_ncc", default=None, metavar="SIMILARITY",
                    help="polish the result with L-BFGS on SIMILARITY (default band-pass NCC) at 128 and 256 px "
                         "(RegistrationOptions.bone_only_polish)")
    ap.add_argument("--fov-cut", type=float, default=None, metavar="S",
                    help="end each view's usable field across the bone, S standard deviations of its projection "
                         "from its centroid towards the shaft (at --pose), as a bone running out of the field of view")
    ap.add_argument("--part", default="0/1", metavar="I/N",
                    help="run only the starts k with k %% N == I (one process per core), writing part-I.json")
    ap.add_argument("--join", action="store_true", help="join the part-*.json files in --out into summary.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    vol, centre, vs = load_case(a)
    _, points = bone_voxels(vol, 50)  # bone voxels, as bone_center_lps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.join:
        parts = [json.loads(p.read_text()) for p in sorted(out.glob("part-*.json"))]
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["start"])
        single = sorted((r for p in parts for r in p.get("single_rows", [])), key=lambda r: (r["view"], r["start"]))
        summary = summarize(rows, single, points, len(vs)) | {"perturbation": parts[0]["perturbation"]}
        summary.update({k: parts[0][k] for k in ("fov_cut", "bone_hidden_share_per_view") if k in parts[0]})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "single_rows", "biplane_pose")}, indent=2))
        return 0
    part, n_parts = (int(x) for x in a.part.split("/"))
    options = RegistrationOptions(local_starts=a.local_starts, hold_region=not a.region_follows_pose,
                                  bone_only_polish=a.polish)
    if a.local_start_spread:
        options = replace(options, local_start_deg=a.local_start_spread[0], local_start_mm=a.local_start_spread[1])
    if a.fine:
        options = replace(options, levels=options.levels + (Level(a.fine, 40, 0.15, voxel_slack=1.0),),
                          verify_level=Level(a.fine // 2, 0, 0.0, "ncc"))
    pose, _ = read_world_pose_json(a.pose)
    hidden = None
    if a.fov_cut is not None:
        vs, hidden = cut_fields(vs, vol, pose, a.fov_cut)
        print(json.dumps({"fov_cut": a.fov_cut, "bone_hidden_share_per_view": hidden}), flush=True)
    mine = [(k, s) for k, s in enumerate(starts(pose, centre, a.starts, a.deg, a.mm, a.seed)) if k % n_parts == part]
    rows = []
    for k, start in ([] if a.no_biplane else mine):
        t = time.perf_counter()
        res = RegistrationSession(vol, initial_pose=start, views=vs, method=a.method, isocenter=centre,
                                  options=options).run()
        rows.append({"start": k, "world_from_ct": res.pose.tolist(), "flagged": res.flagged, "seconds": time.perf_counter() - t,
                     "evidence": res.evidence, "message": res.message, "start_offset_mm": float(mtre(start, pose, points)),
                     "offset_mm": float(mtre(res.pose, pose, points))})
        print(json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "world_from_ct"}), flush=True)
    single = []
    if a.single:
        # each view alone, compared with the given pose (pass the biplane result as --pose)
        for vi, v in enumerate(vs):
            for k, start in mine:
                t = time.perf_counter()
                res = alone(vol, v, start, centre, options, a.method).run()
                single.append({"view": vi + 1, "start": k, "flagged": res.flagged,
                               **errors_in_view(res.pose, v, pose, centre), "seconds": time.perf_counter() - t,
                               "message": res.message})
                print(json.dumps(single[-1]), flush=True)
    summary = summarize(rows, single, points, len(vs)) | {"perturbation": f"{a.deg:g} deg, {a.mm:g} mm"}
    if hidden is not None:
        summary.update(fov_cut=a.fov_cut, bone_hidden_share_per_view=hidden)
    name = "summary.json" if n_parts == 1 else f"part-{part}.json"
    (out / name).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "single_rows", "biplane_pose")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
