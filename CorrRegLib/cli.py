"""The ``corrreg`` command: phantom, simulate, register, demo (and train/benchmark when present).

Every length is in millimetres and every angle in degrees. With ``--json`` a command prints one
JSON object on stdout and nothing else there; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

EPILOG = "Frames: CT in LPS mm; poses are camera_from_ct (see docs/conventions.md)."


def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# helpers shared by subcommands


def _camera_from_args(args):
    """Camera from --camera JSON and/or --sdd/--pixel-spacing/--principal-point flags."""
    from .geometry import Camera
    from .io import read_camera_json

    cam = read_camera_json(args.camera) if getattr(args, "camera", None) else None
    sdd = args.sdd if args.sdd is not None else (cam.sdd if cam else None)
    spacing = tuple(args.pixel_spacing) if args.pixel_spacing is not None else (cam.pixel_spacing if cam else None)
    size = tuple(args.size) if getattr(args, "size", None) is not None else (cam.size if cam else None)
    missing = [flag for flag, v in (("--sdd", sdd), ("--pixel-spacing", spacing), ("--size", size)) if v is None]
    if missing:
        raise ValueError(f"camera geometry is missing ({', '.join(missing)}): give --camera CAM.json or --sdd, "
                         "--pixel-spacing and --size")
    if args.principal_point is not None:
        pp = tuple(args.principal_point)
    else:  # the camera's principal point, unless the flags changed the detector it was measured on
        pp = cam.principal_point if cam is not None and size == cam.size else None
    try:
        return Camera(sdd, spacing, size, pp)
    except ValueError as err:
        raise ValueError(f"invalid camera geometry: {err}") from None


def _add_camera_flags(p: argparse.ArgumentParser, with_size: bool = False) -> None:
    g = p.add_argument_group("camera geometry (flags override --camera and DICOM tags)")
    g.add_argument("--camera", metavar="CAM.json", help="camera JSON: sdd_mm, pixel_spacing_mm [dx, dy], size_px [W, H], principal_point_px")
    g.add_argument("--sdd", type=finite_float, metavar="MM", help="source-to-detector distance (mm)")
    g.add_argument("--pixel-spacing", type=finite_float, nargs=2, metavar=("DX", "DY"), help="detector pixel spacing (mm), columns then rows")
    g.add_argument("--principal-point", type=finite_float, nargs=2, metavar=("CX", "CY"), help="principal point (pixels); default: image centre")
    if with_size:
        g.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="detector size (pixels)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device (default: auto picks CUDA, then MPS, then CPU)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice, the number of physical cores or OMP_NUM_THREADS); "
                        "on a CPU shared with other jobs, 1 is often much faster (Testing/Benchmarks/bench_threads.py)")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """--device and --threads, which every long-running verb takes (cli.main applies --threads)."""
    _add_device(p)
    _add_threads(p)


def finite_float(text: str) -> float:
    """argparse type: a finite number (refuses nan and inf, which float() accepts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------
# subcommands


PHANTOM_FILES = ("ct.nrrd", "labels.nrrd", "landmarks.csv")


def cmd_phantom(args) -> dict:
    from .io import write_ct, write_targets_csv
    from .outputs import Output, OutputSet, check_outputs
    from .phantom import make_spine_phantom

    out = Path(args.out).expanduser()
    check_outputs([Output("--out", out, "folder")] + [Output(f"--out ({n})", out / n) for n in PHANTOM_FILES])
    if not 0.25 <= args.spacing <= 20.0:
        raise ValueError(f"--spacing must lie between 0.25 and 20 mm (the phantom is 160 x 160 x 200 mm), got {args.spacing:g}")
    ph = make_spine_phantom(spacing_mm=args.spacing, seed=args.seed, ribs=args.ribs, pelvis=args.pelvis)
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.GetImageFromArray(ph.labels.numpy().astype(np.int16))
    labels.SetSpacing(ph.volume.spacing)
    labels.SetOrigin(ph.volume.origin)
    labels.SetDirection([v for row in ph.volume.direction for v in row])
    with OutputSet() as outputs:  # the three files appear together
        write_ct(ph.volume, outputs.path(out / "ct.nrrd"), pixel_type="int16")
        sitk.WriteImage(labels, str(outputs.path(out / "labels.nrrd")), True)
        write_targets_csv(ph.landmarks, outputs.path(out / "landmarks.csv"), names=ph.landmark_names)
    return {"ct": str(out / "ct.nrrd"), "labels": str(out / "labels.nrrd"), "landmarks": str(out / "landmarks.csv"),
            "shape_kji": list(ph.hu.shape), "spacing_mm": list(ph.volume.spacing)}


def cmd_simulate(args) -> dict:
    from .device import pick_device
    from .io import camera_json_path, read_pose_json, write_xray
    from .outputs import Output, check_outputs
    from .simulate import simulate_xray

    check_outputs([Output("--out", args.out, "xray")], {**_ct_inputs(args), "--pose": args.pose, "--camera": args.camera})
    device = pick_device(args.device)
    camera = _camera_from_args(args)
    pose = read_pose_json(args.pose)
    from .cli_realdata import read_ct_from_args

    volume = read_ct_from_args(args).to(device)
    sim = simulate_xray(volume, camera, pose.to(device), dose=args.dose, blur_mm=args.blur_mm, gamma=args.gamma,
                        heel=args.heel, scatter=args.scatter, seed=args.seed, raw=args.raw)
    image = sim.line_integral if args.raw else sim.image
    path = write_xray(image.cpu(), args.out, camera=camera)  # the image and its camera JSON, atomically
    return {"xray": str(path), "camera": str(camera_json_path(path)), "raw": bool(args.raw),
            "size_px": list(camera.size), "dose": args.dose, "seed": args.seed}


DEFAULT_SOD_MM = 700.0


def _ct_inputs(args) -> dict:
    """--ct and the CT geometry file that may come with it, as outputs.check_outputs inputs."""
    return {"--ct": args.ct, "--ct-geometry": getattr(args, "ct_geometry", None)}


def _options(args):
    from .register import RegistrationOptions

    kw = {}
    verify = getattr(args, "verify", None)
    if verify is not None:
        if not 0.0 <= verify <= 1.5:
            raise ValueError(f"--verify must lie in [0, 1.5] (0 turns verification off), got {verify}")
        kw["fallback_below"] = kw["bone_only_fallback_below"] = verify if verify > 0 else None
    # build_attempts refuses a negative count or another method than intensity
    return RegistrationOptions(seed=getattr(args, "seed", 0) or 0, local_starts=getattr(args, "local_starts", 0) or 0,
                               exclude_cut_ends=bool(getattr(args, "exclude_cut_ends", False)),
                               bone_only_polish=getattr(args, "polish", None), **kw)


def _run_with_progress(session, label: str, quiet: bool = False):
    from tqdm.auto import tqdm

    with tqdm(total=session.planned_iterations, desc=f"register ({label})", unit="it", file=sys.stderr,
              disable=quiet, leave=False) as bar:
        def update(st):
            bar.n = st.iteration
            bar.set_postfix_str(f"{st.stage}, loss {st.loss:.4f}")
            bar.refresh()

        return session.run(update)


def default_demo_method() -> str:
    """hybrid when a bundled network model ships with the package, else intensity."""
    from .register import bundled_model_dir

    return "hybrid" if bundled_model_dir() is not None else "intensity"


DEMO_FILES = ("registered_pose.json", "true_pose.json", "overlay.png", "convergence.png")


def cmd_demo(args) -> dict:
    from .metrics import mtre
    from .phantom import small_phantom
    from .projector import Projector
    from .protocols import get_protocol, make_cases
    from .register import RegistrationSession
    from .simulate import simulate_xray

    from .outputs import Output, OutputSet, check_outputs

    t0 = time.perf_counter()
    out_dir = Path(args.out).expanduser()
    check_outputs([Output("--out", out_dir, "folder")] + [Output(f"--out ({n})", out_dir / n) for n in DEMO_FILES],
                  {"--model": args.model})
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more (it numbers the seeded case), got {args.seed}")
    method = args.method or default_demo_method()
    _eprint(f"corrreg demo: building the spine phantom, simulating an X-ray, registering with '{method}'")
    ph = small_phantom(seed=0)
    protocol = get_protocol(args.protocol, detector_downsample=2)
    camera = protocol.camera
    iso = ph.volume.bone_center_lps()
    case = make_cases(protocol, iso, args.seed + 1, seed=args.seed)[args.seed]
    sim = simulate_xray(ph.volume, camera, case.true_pose, dose=1e4, blur_mm=0.6, gamma=1.0, heel=0.1,
                        scatter=0.1, seed=args.seed)
    session = RegistrationSession(ph.volume, sim.image, camera, case.initial_pose, method=method,
                                  device=args.device, model_dir=args.model, options=_options(args))
    result = _run_with_progress(session, method, quiet=args.quiet)
    initial = float(mtre(case.initial_pose, case.true_pose, ph.landmarks))
    final = float(mtre(result.pose, case.true_pose, ph.landmarks))
    runtime = time.perf_counter() - t0
    from .io import write_pose_json

    with OutputSet() as outputs:  # the demo's files appear together
        write_pose_json(result.pose, outputs.path(out_dir / "registered_pose.json"), extra={"method": method})
        write_pose_json(case.true_pose, outputs.path(out_dir / "true_pose.json"))
        files = {"pose": str(out_dir / "registered_pose.json"), "true_pose": str(out_dir / "true_pose.json")}
        try:
            from .visualize import save_convergence, save_overlay

            proj = Projector(ph.volume, camera)
            with torch.no_grad():
                before, after = proj(case.initial_pose.float())[0], proj(result.pose.float())[0]
            save_overlay(outputs.path(out_dir / "overlay.png"), sim.image, before, after,
                         title=f"mTRE {initial:.1f} mm -> {final:.2f} mm ({method})")
            save_convergence(outputs.path(out_dir / "convergence.png"), result.history, title=f"corrreg demo ({method})")
            files.update(overlay=str(out_dir / "overlay.png"), convergence=str(out_dir / "convergence.png"))
        except ImportError as err:
            _eprint(f"(no pictures: {err})")
    return {
        "method": method,
        "protocol": args.protocol,
        "seed": args.seed,
        "initial_mtre_mm": initial,
        "final_mtre_mm": final,
        "success_2mm": final < 2.0,
        "flagged": result.flagged,
        "iterations": result.iterations,
        "runtime_s": runtime,
        "registration_s": result.runtime_s,
        "camera_from_ct": result.pose.tolist(),
        "files": files,
    }


def _human(name: str, out: dict) -> str:
    if name == "demo":
        return (
            f"initial mTRE {out['initial_mtre_mm']:.2f} mm -> final mTRE {out['final_mtre_mm']:.2f} mm "
            f"({'success' if out['success_2mm'] else 'FAILED'} at 2 mm) with '{out['method']}' "
            f"in {out['runtime_s']:.1f} s ({out['iterations']} iterations)\n"
            + "\n".join(f"  {k}: {v}" for k, v in out["files"].items())
        )
    return json.dumps(out, indent=2)


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corrreg", description="Correlation-driven 2D/3D X-ray to CT registration.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="register a simulated X-ray of the built-in spine phantom", epilog=EPILOG)
    p.add_argument("--seed", type=int, default=0, help="which seeded case (ground truth, noise, initial offset)")
    p.add_argument("--out", default="corrreg-demo", help="folder for overlay.png, convergence.png and poses")
    p.add_argument("--protocol", default="moderate", choices=["moderate", "paper"], help="initial-offset distribution (DESIGN.md)")
    p.add_argument("--method", choices=["intensity", "cmaes", "network", "hybrid"], help="default: hybrid if a model is bundled, else intensity")
    p.add_argument("--model", metavar="MODEL_DIR", help="trained network (for network/hybrid)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("phantom", help="write the procedural spine phantom (CT in HU, labels, landmarks)", epilog=EPILOG)
    p.add_argument("--out", required=True, help="output folder (ct.nrrd, labels.nrrd, landmarks.csv)")
    p.add_argument("--spacing", type=finite_float, default=2.0, help="voxel size (mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ribs", action="store_true")
    p.add_argument("--pelvis", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("simulate", help="simulate a realistic X-ray of a CT at a pose", epilog=EPILOG)
    p.add_argument("--ct", required=True, help="CT image (NIfTI/NRRD/MHA or DICOM folder), in HU")
    p.add_argument("--pose", required=True, metavar="POSE.json", help="camera_from_ct pose JSON")
    p.add_argument("--out", required=True, metavar="XRAY.nrrd", help="output image; its camera JSON is written beside it")
    p.add_argument("--dose", type=finite_float, default=1e4, help="unattenuated photons per pixel (noise falls as 1/sqrt(dose))")
    p.add_argument("--blur-mm", type=finite_float, default=0.5, help="detector blur, Gaussian sigma at the detector (mm)")
    p.add_argument("--gamma", type=finite_float, default=1.0, help="contrast gamma applied after the log transform")
    p.add_argument("--heel", type=finite_float, default=0.0, help="heel effect: relative intensity change across the detector")
    p.add_argument("--scatter", type=finite_float, default=0.0, help="scatter-to-primary ratio")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--raw", action="store_true", help="write the noiseless line integral of attenuation (mm x 1/mm) instead")
    p.add_argument("--json", action="store_true")
    _add_camera_flags(p, with_size=True)
    add_common_flags(p)
    from .cli_realdata import add_ct_geometry_flags

    add_ct_geometry_flags(p)
    p.set_defaults(func=cmd_simulate)

    from .cli_register import add_parser as add_register_parser

    add_register_parser(sub)

    for extra in ("train", "benchmark", "realdata"):  # cli_realdata: convert-ct
        try:
            mod = __import__(f"CorrRegLib.cli_{extra}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


def _error_message(err: BaseException) -> tuple[str, int]:
    """(message, exit code) for a failure: 2 for bad input or an environment problem (the message
    says what to fix), 1 for anything unexpected (a bug: the message says how to report it)."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err), 2
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return ("out of memory: the CT, the detector or the batch is too large for this machine; use a smaller "
                f"CT (crop or downsample it), fewer pixels or a smaller --batch-size ({err})"), 2
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot access{where}: {err.strerror or err}", 2
    return (f"unexpected {type(err).__name__}: {err}. This is a bug in CorrReg: please report it with the command "
            f"line (set {TRACEBACK_ENV}=1 to see the traceback)"), 1


TRACEBACK_ENV = "CORRREG_TRACEBACK"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _eprint(f"corrreg: warning: {message}")


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if getattr(args, "threads", None) is not None:
            from .device import set_threads

            set_threads(args.threads)
        out = args.func(args)
    except KeyboardInterrupt:
        _eprint(f"corrreg {args.command}: interrupted")
        return 130
    except Exception as err:  # every failure becomes a message and an exit code, never a traceback
        if os.environ.get(TRACEBACK_ENV):
            raise
        message, code = _error_message(err)
        if getattr(args, "json", False):
            print(json.dumps({"error": message}))
        _eprint(f"corrreg {args.command}: error: {message}")
        return code
    finally:
        warnings.showwarning = shown
    if getattr(args, "json", False):
        print(json.dumps(out))
    else:
        print(_human(args.command, out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
