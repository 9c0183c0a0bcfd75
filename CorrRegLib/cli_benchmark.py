"""``corrreg benchmark``: every method on identical seeded cases (CorrRegLib.benchmark).

cli.build_parser loads this module when present and calls :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

EPILOG = ("Frames: CT in LPS mm; poses are camera_from_ct. Outputs: results.csv, summary.md, summary.json, run.json "
          "and PNG plots in --out; an interrupted run resumes from results.csv (see docs/benchmark.md).")


def add_parser(sub) -> argparse.ArgumentParser:
    from .benchmark import DEFAULT_XRAY, METHODS, STARTS

    p = sub.add_parser(
        "benchmark", help="measure registration methods on identical seeded simulated cases (mTRE, success rates)",
        description="Simulate N seeded cases (ground-truth pose, realistic X-ray, initial pose) of a CT once and "
                    "register each with every method; write per-case results, a summary and plots. Re-running "
                    "with the same --out resumes and skips finished (case, method) rows.",
        epilog=EPILOG,
    )
    p.add_argument("--ct", default="phantom", help="CT image (NIfTI/NRRD/MHA or DICOM folder, in HU), or 'phantom' "
                                                  "(default) for the built-in spine phantom and its landmarks")
    p.add_argument("--phantom-spacing", type=float, default=2.5, metavar="MM",
                   help="voxel size of the built-in phantom (default 2.5 mm)")
    p.add_argument("--targets", metavar="SEG|MARKUPS|CSV", help="targets for mTRE: a label map (the centroid of each "
                   "label), a Slicer markups JSON or a CSV of LPS points. Default: the phantom's landmarks, else a "
                   "fixed sample of 20 bone voxels")
    p.add_argument("--target-labels", metavar="LABELS", help="with a label map: which labels, e.g. 29-46 or 1,3,5-7")
    p.add_argument("--model", metavar="MODEL_DIR", help="trained network (needed by network, network_only, hybrid)")
    p.add_argument("--protocol", default="moderate", choices=["moderate", "paper"],
                   help="initial-offset distribution and camera (DESIGN.md; default moderate)")
    p.add_argument("--cases", type=int, default=20, help="number of seeded cases (default 20)")
    p.add_argument("--seed", type=int, default=0, help="case i depends only on (seed, i) (default 0)")
    p.add_argument("--methods", default="intensity", help=f"comma-separated, from: {', '.join(METHODS)} "
                   "(default intensity)")
    p.add_argument("--detector-downsample", type=float, default=2.0, metavar="F",
                   help="detector pixels F times larger than the paper camera's 256 x 256 at 0.798 mm, same field "
                        "of view (default 2: 128 x 128 at 1.596 mm)")
    p.add_argument("--start", default="initial", choices=list(STARTS),
                   help="register from the protocol's initial pose (default), or from the ground truth (a sanity "
                        "check: mTRE should stay ~ 0)")
    p.add_argument("--dose", type=float, default=DEFAULT_XRAY["dose"], help="simulated X-ray: photons per pixel")
    p.add_argument("--blur-mm", type=float, default=DEFAULT_XRAY["blur_mm"], help="simulated X-ray: detector blur (mm)")
    p.add_argument("--heel", type=float, default=DEFAULT_XRAY["heel"], help="simulated X-ray: heel effect")
    p.add_argument("--scatter", type=float, default=DEFAULT_XRAY["scatter"], help="simulated X-ray: scatter-to-primary ratio")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumes when it holds a run)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print only the summary JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (torch.set_num_threads); on a shared "
                   "CPU, 1 gives steadier wall times than an oversubscribed default")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="compute device (default: auto picks CUDA, then MPS, then CPU)")
    p.set_defaults(func=cmd_benchmark)
    return p


def cmd_benchmark(args) -> dict:
    from .benchmark import DEFAULT_XRAY, BenchmarkConfig, format_table, parse_labels, parse_methods, run_benchmark

    if args.threads:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    xray = dict(DEFAULT_XRAY, dose=args.dose, blur_mm=args.blur_mm, heel=args.heel, scatter=args.scatter)
    config = BenchmarkConfig(
        protocol=args.protocol, cases=args.cases, seed=args.seed, methods=parse_methods(args.methods),
        detector_downsample=args.detector_downsample, ct=args.ct, targets=args.targets,
        target_labels=parse_labels(args.target_labels), model=args.model, device=args.device, start=args.start,
        xray=xray, phantom_spacing_mm=args.phantom_spacing,
    )
    command = "corrreg " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else None
    summary = run_benchmark(config, args.out, progress=not args.quiet, plots=not args.no_plots, command=command)
    if not args.json:
        print(f"protocol {summary['protocol']}, {summary['cases']} cases, seed {summary['seed']}; "
              f"detector {summary['detector']}")
        print(f"targets: {summary['targets']}")
        print(format_table(summary["methods"]))
        print(f"({summary['rows_run']} registrations run, {summary['rows_reused']} reused)")
        # cli.main prints the returned object as JSON: keep it to the file list here.
        return {"out": str(args.out), "files": summary["files"]}
    return summary
