"""``corrreg benchmark``: every method on identical seeded cases (CorrRegLib.benchmark).

cli.build_parser loads this module when present and calls :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

EPILOG = ("Frames: CT in LPS mm; poses are camera_from_ct. Outputs: results.csv, summary.md, summary.json, run.json "
          "and PNG plots in --out (one CT), or in --out/NAME per CT with a summary over them in --out (several CTs "
          "or --manifest); an interrupted run resumes from results.csv (see docs/benchmark.md).")


def add_parser(sub) -> argparse.ArgumentParser:
    from .cli import add_common_flags

    from .benchmark import DEFAULT_XRAY, METHODS, STARTS

    p = sub.add_parser(
        "benchmark", help="measure registration methods on identical seeded simulated cases (mTRE, success rates)",
        description="Simulate N seeded cases (ground-truth pose, realistic X-ray, initial pose) of a CT once and "
                    "register each with every method; write per-case results, a summary and plots. Re-running "
                    "with the same --out resumes and skips finished (case, method) rows.",
        epilog=EPILOG,
    )
    p.add_argument("--ct", action="append", metavar="CT",
                   help="CT image (NIfTI/NRRD/MHA or DICOM folder, in HU), or 'phantom' (default) for the built-in "
                        "spine phantom and its landmarks. Repeat for several CTs: one cell each, in --out/NAME")
    p.add_argument("--name", action="append", metavar="NAME", help="the CT's name in tables and its cell folder "
                   "(one per --ct; default: the CT file's name)")
    p.add_argument("--manifest", metavar="FILE.json", help="several CTs from a JSON list of {name, ct, targets, "
                   "target_labels, model, xray_ct} objects (docs/benchmark.md); instead of --ct")
    p.add_argument("--phantom-spacing", type=float, default=2.5, metavar="MM",
                   help="voxel size of the built-in phantom (default 2.5 mm)")
    p.add_argument("--targets", action="append", metavar="SEG|MARKUPS|CSV", help="targets for mTRE: a label map (the "
                   "centroid of each label), a Slicer markups JSON or a CSV of LPS points; one per --ct ('-': none). "
                   "Default: the phantom's landmarks, else a fixed sample of 20 bone voxels")
    p.add_argument("--target-labels", action="append", metavar="LABELS",
                   help="with a label map: which labels, e.g. 29-46 or 1,3,5-7 (once for all CTs, or one per --ct)")
    p.add_argument("--model", action="append", metavar="MODEL_DIR",
                   help="trained network: needed by network, network_only, hybrid; given to auto (once for all "
                        "CTs, or one per --ct: a patient-specific model each)")
    p.add_argument("--xray-ct", action="append", metavar="CT", help="render the X-rays from this CT instead (the "
                   "patient: e.g. the full-resolution, uncropped scan of which --ct is a crop or a resampling; same "
                   "LPS frame); one per --ct ('-': the CT itself)")
    p.add_argument("--xray-source", default="corrreg", metavar="NAME",
                   help="who renders the X-rays, each with its own HU conversion: corrreg (built in, the default), or "
                        "a name of the sources file: nanodrr, diffdrr (benchmark environment only)")
    p.add_argument("--xray-sources", metavar="FILE.py", help="the sources file for names that are not built in "
                   "(default: Testing/Benchmarks/xray_sources.py of this checkout)")
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
    add_common_flags(p)  # --device, --threads (on a shared CPU, 1 gives steadier wall times)
    p.set_defaults(func=cmd_benchmark)
    return p


def cmd_benchmark(args) -> dict:
    from dataclasses import replace

    from .benchmark import (DEFAULT_XRAY, BenchmarkConfig, cells_from_args, cells_table, format_table, parse_methods,
                            read_manifest, run_benchmark, run_cells)

    xray = dict(DEFAULT_XRAY, dose=args.dose, blur_mm=args.blur_mm, heel=args.heel, scatter=args.scatter)
    config = BenchmarkConfig(
        protocol=args.protocol, cases=args.cases, seed=args.seed, methods=parse_methods(args.methods),
        detector_downsample=args.detector_downsample, device=args.device, start=args.start, xray=xray,
        phantom_spacing_mm=args.phantom_spacing, xray_source=args.xray_source, xray_sources_file=args.xray_sources,
    )
    if args.manifest and args.ct:
        raise ValueError("give either --manifest or --ct, not both")
    if args.manifest:
        for opt in ("name", "targets", "target_labels", "model", "xray_ct"):
            if getattr(args, opt):
                raise ValueError(f"--{opt.replace('_', '-')} comes from the manifest's entries with --manifest")
        cells = read_manifest(args.manifest)
    else:
        cells = cells_from_args(args.ct or ["phantom"], args.targets, args.target_labels, args.model, args.xray_ct,
                                args.name)
    command = "corrreg " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else None
    if len(cells) > 1 or args.manifest:
        summary = run_cells(config, cells, args.out, progress=not args.quiet, plots=not args.no_plots, command=command)
        if not args.json:
            print(f"protocol {summary['protocol']}, {summary['cases_per_cell']} cases per cell, seed {summary['seed']}; "
                  f"X-ray source {args.xray_source}; {len(cells)} CTs in {args.out}/NAME")
            print(cells_table(summary))
            print(f"({summary['rows_run']} registrations run, {summary['rows_reused']} reused)")
            return {"out": str(args.out), "cells": [c["dir"] for c in summary["cells"]]}
        return summary
    cell = cells[0]
    config = replace(config, **cell.config_overrides())
    summary = run_benchmark(config, args.out, progress=not args.quiet, plots=not args.no_plots, command=command)
    if not args.json:
        print(f"protocol {summary['protocol']}, {summary['cases']} cases, seed {summary['seed']}; "
              f"detector {summary['detector']}")
        print(f"targets: {summary['targets']}; X-ray source: {summary['xray_source']['name']} "
              f"{summary['xray_source'].get('version', '')}")
        print(format_table(summary["methods"]))
        print(f"({summary['rows_run']} registrations run, {summary['rows_reused']} reused)")
        # cli.main prints the returned object as JSON: keep it to the file list here.
        return {"out": str(args.out), "files": summary["files"]}
    return summary
