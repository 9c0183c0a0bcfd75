"""Prove the wrist's biplane calibration before any registration: triangulate the beads.

The wrist data set (``/work/shared/data/wrist-biplane``, or ``--data DIR``) has two calibrated
views (MayaCam 2.0) of a wrist with implanted tantalum beads: small, very dense spheres that show
as sharp dark dots in both raw images. If the calibration is read with the right convention,
every bead seen in view 1 lies on the epipolar line of its image in view 2, and the point
triangulated from the two images reprojects onto both to within the detection noise.

Steps:

1. read both images and calibrations (``CorrRegLib.io.read_xray``, ``read_calibration``);
2. detect beads: in the line-integral domain (-log of the raw image, where a bead's contrast
   does not depend on what lies behind it), blobs of the scale-normalised Laplacian of
   Gaussian (sigma 1.5 - 3 px) that are round (Hessian eigenvalue ratio), isolated (no
   structure as strong in the ring around them) and inside the field-of-view mask; sub-pixel
   centres by a background-subtracted intensity centroid;
3. match beads across the views by the epipolar constraint (``CorrRegLib.multiview``);
4. triangulate each match and report its reprojection error in each view (goal: < 1.5 px);
5. for contrast, repeat steps 3-4 with the calibration read in the *other* plausible
   conventions (R, t taken as camera-to-world; image y up, i.e. rows counted from the bottom):
   a wrong convention leaves almost no bead with an epipolar partner;
6. save a picture of the detected (circles) and reprojected (crosses) beads in both views
   (``beads.png``), and one of the field-of-view masks and polarity decisions (``fov_masks.png``).

    python Testing/Benchmarks/wrist_beads.py [--data DIR] [--frame 0002] [--out DIR] [--json]

Other frames and data sets of the same layout work with ``--frame`` / ``--xray1`` etc.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from CorrRegLib.fov_mask import detect_fov_mask
from CorrRegLib.polarity import detect_polarity
from CorrRegLib.geometry import Camera, invert_pose
from CorrRegLib.io import read_xray
from CorrRegLib.io.calibration import Calibration, read_calibration
from CorrRegLib.multiview import (
    epipolar_distances,
    fundamental_matrix,
    match_epipolar,
    projection_matrix,
    reprojection_errors,
    triangulate_points,
)

DEFAULT_DATA = Path("/work/shared/data/wrist-biplane")


# --------------------------------------------------------------------------------------------
# bead detection


def _gauss_kernels(sigma: float, dtype=torch.float64):
    r = int(math.ceil(4 * sigma))
    x = torch.arange(-r, r + 1, dtype=dtype)
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g, -x / sigma**2 * g, (x * x / sigma**4 - 1 / sigma**2) * g


def _sep(img: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    x = img[None, None]
    rx, ry = len(kx) // 2, len(ky) // 2
    x = F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, ry, ry), mode="replicate"), ky.view(1, 1, -1, 1))
    return x[0, 0]


def detect_beads(
    image,
    mask=None,
    bone_dark: bool = True,
    sigmas=(1.5, 2.0, 2.5, 3.0),
    min_response: float = 0.15,
    min_roundness: float = 0.6,
    max_ring_ratio: float = 0.5,
    max_ring_fraction: float = 0.15,
    edge_px: int = 12,
) -> tuple[np.ndarray, np.ndarray]:
    """Small dense blobs (beads) of an X-ray (H, W): pixel centres (N, 2) as (u, v) in CorrReg's
    pixel convention (pixel (c, r) has its centre at (c + 0.5, r + 0.5)), and their strengths.

    ``bone_dark``: the image is a raw transmission image (beads dark), analysed as -log(I / I_max);
    otherwise it is a line-integral image (beads bright) used as is. ``min_response``: the
    scale-normalised Laplacian response (about the bead's contrast in line-integral units);
    ``min_roundness``: smaller / larger Hessian eigenvalue; isolation: at most
    ``max_ring_fraction`` of a ring of 3 - 6 sigma around the bead may respond more than
    ``max_ring_ratio`` times the bead (a neighbouring bead covers little of the ring, the strokes
    of a lead letter or a bone edge much of it); ``edge_px``: distance kept from the mask's edge.
    """
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if bone_dark:
        L = -np.log(np.maximum(a, 1.0) / max(float(a.max()), 1.0))
    else:
        L = a - float(np.median(a))
    Lt = torch.from_numpy(L)
    best = torch.full_like(Lt, -np.inf)
    best_ratio = torch.zeros_like(Lt)
    best_sigma = torch.zeros_like(Lt)
    for s in sigmas:
        g, d1, d2 = _gauss_kernels(s)
        xx, yy, xy = _sep(Lt, d2, g), _sep(Lt, g, d2), _sep(Lt, d1, d1)
        resp = -(xx + yy) * s * s
        tr, det = xx + yy, xx * yy - xy * xy
        disc = torch.sqrt(torch.clamp(tr * tr / 4 - det, min=0))
        l_small, l_large = tr / 2 + disc, tr / 2 - disc  # both negative for a bright blob in L
        ratio = torch.where(l_large < 0, torch.clamp(-l_small, min=0) / (-l_large), torch.zeros_like(tr))
        better = resp > best
        best = torch.where(better, resp, best)
        best_ratio = torch.where(better, ratio, best_ratio)
        best_sigma = torch.where(better, torch.full_like(resp, s), best_sigma)
    resp = best
    field = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    if edge_px > 0:
        import SimpleITK as sitk

        field = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(field.astype(np.uint8)), [edge_px] * 2)).astype(bool)
    peak = (resp == F.max_pool2d(resp[None, None], 9, 1, 4)[0, 0]) & torch.from_numpy(field)
    peak &= (resp > min_response) & (best_ratio > min_roundness)
    rows, cols = torch.nonzero(peak, as_tuple=True)
    h, w = a.shape
    uv, strength = [], []
    for r, c in zip(rows.tolist(), cols.tolist()):
        s = float(best_sigma[r, c])
        # isolation: nothing as strong in the ring 3 - 6 sigma around
        R = int(math.ceil(6 * s))
        r0, r1, c0, c1 = max(0, r - R), min(h, r + R + 1), max(0, c - R), min(w, c + R + 1)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d = np.hypot(yy - r, xx - c)
        ring = (d >= 3 * s) & (d <= 6 * s)
        if float((resp[r0:r1, c0:c1].numpy()[ring] > max_ring_ratio * float(resp[r, c])).mean()) > max_ring_fraction:
            continue
        # sub-pixel centre: centroid of L minus the ring's median, inside 2 sigma
        patch = L[r0:r1, c0:c1]
        bg = float(np.median(patch[ring]))
        wgt = np.clip(patch - bg, 0, None) * (d <= 2.0 * s + 1.0)
        if wgt.sum() <= 0:
            continue
        uv.append(((wgt * xx).sum() / wgt.sum() + 0.5, (wgt * yy).sum() / wgt.sum() + 0.5))
        strength.append(float(resp[r, c]))
    return np.array(uv, dtype=np.float64).reshape(-1, 2), np.array(strength, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# the proof


def _alternative(cal: Calibration, kind: str) -> Calibration:
    """The calibration read in a wrong convention, for contrast."""
    pose = cal.camera_from_world
    cam = cal.camera
    if kind == "R,t as camera-to-world":
        pose = invert_pose(pose)
    elif kind == "image y up (rows from the bottom)":
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))  # y and z flipped: still a rotation
        pose = flip @ pose
        cx, cy = cam.principal_point
        cam = replace(cam, principal_point=(cx, cam.height - cy))
    return Calibration(cam, pose, cal.source + f" ({kind})", cal.path)


def evaluate(cals: list[Calibration], beads: list[np.ndarray], max_epipolar_px: float) -> dict:
    """Match, triangulate and reproject: per-bead figures for one reading of the calibration."""
    P = [projection_matrix(c.camera, c.camera_from_world) for c in cals]
    Fm = fundamental_matrix(P[0], P[1])
    d = epipolar_distances(Fm, torch.from_numpy(beads[0]), torch.from_numpy(beads[1])).numpy()
    nearest = d.min(axis=1) if d.size else np.zeros(0)
    matches = match_epipolar(Fm, torch.from_numpy(beads[0]), torch.from_numpy(beads[1]), max_epipolar_px)
    out = {"matches": len(matches), "nearest_epipolar_px_median": float(np.median(nearest)) if nearest.size else None}
    if not matches:
        out["beads"] = []
        return out
    i1 = [i for i, _ in matches]
    i2 = [j for _, j in matches]
    uv = [torch.from_numpy(beads[0][i1]), torch.from_numpy(beads[1][i2])]
    X = triangulate_points(P, uv)
    err = reprojection_errors(P, uv, X).numpy()
    # depth in each camera (mm from the source): a real bead lies in front of both
    depth = [((X @ c.camera_from_world[:3, :3].T) + c.camera_from_world[:3, 3])[:, 2].numpy() for c in cals]
    out["beads"] = [
        {
            "view1_uv": [round(float(v), 3) for v in beads[0][i]],
            "view2_uv": [round(float(v), 3) for v in beads[1][j]],
            "world_mm": [round(float(v), 3) for v in X[k]],
            "epipolar_px": round(float(d[i, j]), 3),
            # the next-closest candidate of either bead: how far the match is from ambiguity
            "runner_up_epipolar_px": round(float(min(np.delete(d[i], j).min(initial=np.inf),
                                                     np.delete(d[:, j], i).min(initial=np.inf))), 2),
            "reprojection_px": [round(float(err[k, 0]), 3), round(float(err[k, 1]), 3)],
            # another candidate inside the tolerance: two beads on one epipolar line (e.g. a pair at
            # the same height), either assignment fits, so this bead does not count in the proof
            "ambiguous": bool(min(np.delete(d[i], j).min(initial=np.inf), np.delete(d[:, j], i).min(initial=np.inf))
                              < max_epipolar_px),
            "depth_mm": [round(float(depth[0][k]), 1), round(float(depth[1][k]), 1)],
        }
        for k, (i, j) in enumerate(matches)
    ]
    sure = np.array([not b["ambiguous"] for b in out["beads"]], bool)
    out["unambiguous"] = int(sure.sum())
    if sure.any():
        out["max_reprojection_unambiguous_px"] = [float(err[sure, 0].max()), float(err[sure, 1].max())]
    out["max_reprojection_px"] = [float(err[:, 0].max()), float(err[:, 1].max())]
    out["rms_reprojection_px"] = [float(np.sqrt((err[:, 0] ** 2).mean())), float(np.sqrt((err[:, 1] ** 2).mean()))]
    out["_points"] = X
    out["_P"] = P
    return out


def save_picture(path: Path, images, masks, beads, result, crop_margin: int = 60) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 13), gridspec_kw={"height_ratios": [1.0, 1.0]})
    from CorrRegLib.multiview import project

    X = result.get("_points")
    for v in range(2):
        img = images[v]
        for row, zoom in enumerate((False, True)):
            ax = axes[row, v]
            ax.imshow(img, cmap="gray", extent=(0, img.shape[1], img.shape[0], 0))
            if masks[v] is not None and not zoom:
                ax.contour(np.arange(img.shape[1]) + 0.5, np.arange(img.shape[0]) + 0.5, masks[v].astype(float),
                           levels=[0.5], colors="orange", linewidths=0.8)
            ax.plot(beads[v][:, 0], beads[v][:, 1], "o", mfc="none", mec="cyan", ms=9 if zoom else 5, mew=1.0,
                    label="detected")
            if X is not None:
                uvp = project(result["_P"][v], X).numpy()
                ax.plot(uvp[:, 0], uvp[:, 1], "+", color="red", ms=12 if zoom else 6, mew=1.2,
                        label="triangulated, reprojected")
                for k, b in enumerate(result["beads"]):
                    if zoom:
                        ax.annotate(str(k + 1), uvp[k], xytext=(5, -5), textcoords="offset points", color="yellow", fontsize=8)
            if zoom and len(beads[v]):
                pts = beads[v]
                ax.set_xlim(pts[:, 0].min() - crop_margin, pts[:, 0].max() + crop_margin)
                ax.set_ylim(pts[:, 1].max() + crop_margin, pts[:, 1].min() - crop_margin)
            ax.set_title(f"view {v + 1}" + (" (beads, zoomed)" if zoom else ""))
            if row == 0 and v == 0:
                ax.legend(loc="lower left", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    e = result.get("max_reprojection_px", [float("nan")] * 2)
    fig.suptitle(f"{result['matches']} beads matched by the epipolar constraint; worst reprojection "
                 f"{e[0]:.2f} px (view 1), {e[1]:.2f} px (view 2)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=85)
    plt.close(fig)


def save_mask_picture(path: Path, images, masks, polarity, titles) -> None:
    """Each raw image with the masked-out pixels tinted red, and the polarity decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(6.5 * len(images), 7.0), constrained_layout=True)
    for ax, img, m, pol, title in zip(np.atleast_1d(axes), images, masks, polarity, titles):
        g = np.clip(img[::2, ::2] / max(float(img.max()), 1.0), 0, 1)
        rgb = np.stack([g, g, g], -1)
        out = ~m[::2, ::2]
        rgb[out] = 0.45 * rgb[out] + 0.55 * np.array([0.9, 0.1, 0.1])
        ax.imshow(rgb, extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_title(f"{title}\nmask: {m.mean():.1%} usable; polarity: bone {pol['decision']} ({pol['confidence']}), "
                     f"air {pol['air_high_fraction']:.0%} at the bright end", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the wrist-biplane folder (xray/, calibration/)")
    ap.add_argument("--frame", default="0002", help="frame number of the images (default 0002)")
    ap.add_argument("--xray1", type=Path, help="image of view 1 (default: <data>/xray/*cam01*.<frame>.tif)")
    ap.add_argument("--xray2", type=Path, help="image of view 2")
    ap.add_argument("--calib1", type=Path, help="calibration of view 1 (default: <data>/calibration/*cam01*.txt)")
    ap.add_argument("--calib2", type=Path, help="calibration of view 2")
    ap.add_argument("--max-epipolar-px", type=float, default=3.0, help="largest epipolar distance of a match (px)")
    ap.add_argument("--min-response", type=float, default=0.15, help="bead detection threshold (line-integral contrast)")
    ap.add_argument("--out", type=Path, default=Path("wrist-beads"), help="folder for beads.png and beads.json")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    def find(sub: str, pattern: str) -> Path:
        hits = sorted((args.data / sub).glob(pattern))
        if not hits:
            raise SystemExit(f"wrist_beads: no {pattern} in {args.data / sub}; give the file explicitly")
        return hits[0]

    xr_paths = [args.xray1 or find("xray", f"*cam01*.{args.frame}.tif"), args.xray2 or find("xray", f"*cam02*.{args.frame}.tif")]
    cal_paths = [args.calib1 or find("calibration", "*cam01*.txt"), args.calib2 or find("calibration", "*cam02*.txt")]
    t0 = time.perf_counter()
    images, masks, beads, cals, polarities = [], [], [], [], []
    for xp, cp in zip(xr_paths, cal_paths):
        xr = read_xray(xp, require_camera=False)
        cal = read_calibration(cp, image_size=xr.size)
        img = xr.image.numpy().astype(np.float64)
        mask = detect_fov_mask(img)
        uv, _ = detect_beads(img, mask, min_response=args.min_response)
        polarities.append(detect_polarity(img, mask)[1])
        images.append(img)
        masks.append(mask)
        beads.append(uv)
        cals.append(cal)
    result = evaluate(cals, beads, args.max_epipolar_px)
    contrast = {}
    for kind in ("R,t as camera-to-world", "image y up (rows from the bottom)"):
        alt = evaluate([_alternative(c, kind) for c in cals], beads, args.max_epipolar_px)
        contrast[kind] = {"matches": alt["matches"], "nearest_epipolar_px_median": alt["nearest_epipolar_px_median"],
                          "max_reprojection_px": alt.get("max_reprojection_px")}
    args.out.mkdir(parents=True, exist_ok=True)
    save_picture(args.out / "beads.png", images, masks, beads, result)
    save_mask_picture(args.out / "fov_masks.png", images, masks, polarities, [p.name for p in xr_paths])
    report = {
        "xrays": [str(p) for p in xr_paths],
        "calibrations": [str(p) for p in cal_paths],
        "beads_detected": [int(len(b)) for b in beads],
        "matched": result["matches"],
        "max_epipolar_px": args.max_epipolar_px,
        "nearest_epipolar_px_median": result["nearest_epipolar_px_median"],
        "unambiguous": result.get("unambiguous", 0),
        "max_reprojection_unambiguous_px": result.get("max_reprojection_unambiguous_px"),
        "max_reprojection_px": result.get("max_reprojection_px"),
        "rms_reprojection_px": result.get("rms_reprojection_px"),
        "beads": result["beads"],
        "wrong_conventions": contrast,
        "fov_mask_usable_fraction": [round(float(m.mean()), 4) for m in masks],
        "polarity": [{k: v for k, v in p.items() if k != "noise_per_grey_bin"} for p in polarities],
        "picture": str(args.out / "beads.png"),
        "mask_picture": str(args.out / "fov_masks.png"),
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    (args.out / "beads.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = result.get("unambiguous", 0) >= 5 and max(result.get("max_reprojection_unambiguous_px") or [99.0]) < 1.5
    if args.json:
        print(json.dumps(report))
    else:
        print(f"beads detected: view 1 {len(beads[0])}, view 2 {len(beads[1])}; matched by the epipolar constraint "
              f"(< {args.max_epipolar_px:g} px): {result['matches']}")
        print(f"{'bead':>4} {'view1 u':>9} {'v':>8} {'view2 u':>9} {'v':>8} {'epi px':>7} {'next px':>8} {'err1 px':>8} {'err2 px':>8}  world (mm)")
        for k, b in enumerate(result["beads"]):
            print(f"{k + 1:>4} {b['view1_uv'][0]:9.2f} {b['view1_uv'][1]:8.2f} {b['view2_uv'][0]:9.2f} {b['view2_uv'][1]:8.2f} "
                  f"{b['epipolar_px']:7.3f} {b['runner_up_epipolar_px']:8.2f} {b['reprojection_px'][0]:8.3f} {b['reprojection_px'][1]:8.3f}  "
                  f"{b['world_mm']}{'  (ambiguous)' if b['ambiguous'] else ''}")
        if result["beads"]:
            print(f"worst reprojection: {report['max_reprojection_px'][0]:.3f} px (view 1), {report['max_reprojection_px'][1]:.3f} px "
                  f"(view 2); rms {report['rms_reprojection_px'][0]:.3f} / {report['rms_reprojection_px'][1]:.3f} px")
        for kind, c in contrast.items():
            print(f"wrong convention '{kind}': {c['matches']} matches, median nearest epipolar distance "
                  f"{c['nearest_epipolar_px_median']:.1f} px")
        if result.get("unambiguous"):
            e = result["max_reprojection_unambiguous_px"]
            print(f"unambiguous matches (no other candidate within {args.max_epipolar_px:g} px): {result['unambiguous']}, "
                  f"worst reprojection {e[0]:.3f} / {e[1]:.3f} px")
        print(("PASS" if ok else "FAIL") + f": >= 5 unambiguous beads below 1.5 px in both views; picture {args.out / 'beads.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
