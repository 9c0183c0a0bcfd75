"""``corrreg register``: one X-ray, or several calibrated X-rays (biplane), to a CT.

One ``--xray`` estimates ``camera_from_ct``. Several, each with its ``--calibration`` (in the
order of the X-rays; the calibration gives the view's camera and ``camera_from_world``),
estimate one ``world_from_ct`` from all views together (summed similarities, one search, one
verification); the output then holds it and each view's ``camera_from_ct``. ``--ct-label`` keeps
one bone (or any label) of the CT, so that its DRR shows only that bone and the similarity is
taken where it projects.

cli.build_parser loads this module and calls :func:`add_parser`.
"""

from __future__ import annotations

import argparse

import torch

from .cli import EPILOG, DEFAULT_SOD_MM, _add_camera_flags, _options, _run_with_progress, add_common_flags, finite_float

#: Per-view flags of cli_realdata.add_view_flags: given once they hold for every X-ray, or once per X-ray.
PER_VIEW = ("calibration", "camera_from_world", "polarity", "invert", "mask")


def add_parser(sub) -> argparse.ArgumentParser:
    from .cli_realdata import add_register_flags

    p = sub.add_parser("register", help="register an X-ray (or several calibrated X-rays) to a CT", epilog=EPILOG)
    p.add_argument("--ct", required=True, help="CT image (NIfTI/NRRD/MHA or DICOM folder), in HU")
    p.add_argument("--ct-label", metavar="LABELMAP", help="keep only this label of the CT (a bone's segmentation, on "
                   "the CT's grid or any other: resampled): its DRR shows only that bone")
    p.add_argument("--ct-label-values", metavar="LABELS", help="with --ct-label: which label values (e.g. 3 or 1,3,5-7; "
                   "default: every non-zero voxel)")
    p.add_argument("--xray", required=True, action="append", help="X-ray image (2D NRRD/MHA/NIfTI/PNG/TIFF or DICOM); "
                   "repeat with one --calibration each for biplane (multi-view) registration")
    p.add_argument("--init", metavar="POSE.json", help="initial pose: camera_from_ct (one X-ray; or world_from_ct when "
                   "its calibration has a pose), or world_from_ct (several; a camera_from_ct there is the first "
                   "view's); default: DICOM positioner angles, else the AP view (one X-ray), or the CT's axes along "
                   "the world's with its bone centroid where the views' principal rays meet (several)")
    p.add_argument("--sod", type=finite_float, help="source-to-isocenter distance for a default initial pose (mm); "
                   "default: the X-ray's DICOM DistanceSourceToPatient, else 700")
    p.add_argument("--method", default="auto", choices=["auto", "intensity", "cmaes", "network", "hybrid"],
                   help="registration pipeline (default auto: the network with --model when it was trained for this "
                        "C-arm, else a global search; every method's result is verified)")
    p.add_argument("--model", metavar="MODEL_DIR", help="trained network (corrreg train) for auto/network/hybrid")
    p.add_argument("--output", required=True, metavar="POSE.json", help="registered pose (JSON, LPS): camera_from_ct, or "
                   "world_from_ct and each view's camera_from_ct for several X-rays")
    p.add_argument("--transform", metavar="T.tfm", help="also write an ITK transform (camera_from_ct, or world_from_ct "
                   "for several X-rays; LPS; Slicer shows its inverse, the camera or world placed in the CT)")
    p.add_argument("--drr", metavar="DRR.nrrd", action="append", help="also write the DRR at the registered pose "
                   "(one per X-ray, in their order)")
    p.add_argument("--overlay", metavar="OVERLAY.png", help="also write DRR edges over the X-ray(s), before and after")
    p.add_argument("--targets", help="targets (markups JSON, CSV, label map) to report mTRE against --truth")
    p.add_argument("--truth", metavar="POSE.json", help="true pose, to report mTRE (evaluation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CMA-ES search and of the local starts")
    p.add_argument("--local-starts", type=int, default=0, metavar="N",
                   help="--method intensity: also refine N starts around --init (10 deg / 10 mm away) together with "
                        "it, keep the best basin they reach, and flag the result when another basin explains the images "
                        "almost as well (the images do not decide between them; real images, e.g. docs/real-data.md); "
                        "default 0: --init alone")
    p.add_argument("--exclude-cut-ends", action="store_true",
                   help="where the CT's box cuts through bone (a segmented shaft that runs out of the scan), leave "
                        "the 5 mm of bone next to the cut out of the comparison: its DRR ends in an edge the X-ray "
                        "does not show (RegistrationOptions.exclude_cut_ends; off by default, docs/registration.md)")
    p.add_argument("--polish", nargs="?", const="bandpass_ncc", metavar="SIMILARITY",
                   help="for a CT that holds only bone (segmented, or --ct-label) in two or more views: after the "
                        "refinement, run L-BFGS to convergence on SIMILARITY (default bandpass_ncc) at 128 and 256 px across the bone, "
                        "which pins a roll that edges leave flat (the wrist's radius: 10 starts within 0.3 deg); "
                        "off by default: an intensity similarity is pulled by the bones the CT does not hold "
                        "(RegistrationOptions.bone_only_polish, docs/registration.md)")
    p.add_argument("--verify", type=finite_float, metavar="K",
                   help="consistency a result needs to count as registered (how the similarity falls around it "
                        "against the DRR's own decorrelation; registered poses score about 1): below it the next "
                        "attempt runs and, if none reaches it, the result is flagged (default 0.75, 0.85 for a CT "
                        "that holds only bone; 0 turns "
                        "verification off)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_camera_flags(p)
    add_common_flags(p)
    add_register_flags(p, per_view=True)  # --calibration, --intrinsics, --polarity, --invert, --mask, --ct-* geometry
    p.set_defaults(func=cmd_register)
    return p


# ------------------------------------------------------------------------------------------------
# inputs


def _per_view(args, n: int) -> list[argparse.Namespace]:
    """One namespace per X-ray, each per-view flag resolved to its value for that view."""
    out = []
    for k in range(n):
        view = dict(vars(args))
        for name in PER_VIEW:
            values = getattr(args, name, None)
            if values is None or not isinstance(values, list):
                continue
            flag = "--" + name.replace("_", "-")
            if len(values) not in (1, n):
                raise ValueError(f"{flag} is given {len(values)} times for {n} X-rays: give it once (for every X-ray) "
                                 "or once per --xray, in the same order")
            view[name] = values[0] if len(values) == 1 else values[k]
        if n > 1 and isinstance(getattr(args, "calibration", None), list) and len(args.calibration) == 1:
            raise ValueError("several X-rays need one --calibration each (their cameras differ), in the order of --xray")
        out.append(argparse.Namespace(**view))
    return out


def _io(args):
    """The outputs and inputs of ``corrreg register`` for outputs.check_outputs."""
    from .cli import _ct_inputs
    from .outputs import Output

    outputs = [Output("--output", args.output, "pose"), Output("--transform", args.transform, "transform"),
               Output("--overlay", args.overlay, "picture")]
    outputs += [Output("--drr", d, "xray") for d in (args.drr or [])]
    masks = [m for m in (getattr(args, "mask", None) or []) if m not in ("auto", "none")]
    inputs = {**_ct_inputs(args), "--ct-label": args.ct_label, "--xray": args.xray, "--camera": args.camera,
              "--init": args.init, "--model": args.model, "--targets": args.targets, "--truth": args.truth,
              "--calibration": getattr(args, "calibration", None),
              "--camera-from-world": getattr(args, "camera_from_world", None), "--mask": masks or None}
    return outputs, inputs


def _volume(args):
    from .cli_realdata import read_ct_from_args

    volume = read_ct_from_args(args)
    if args.ct_label_values and not args.ct_label:
        raise ValueError("--ct-label-values needs --ct-label (the label map to take them from)")
    if args.ct_label:
        from .benchmark import parse_labels
        from .io import read_ct_label

        values = parse_labels(args.ct_label_values) if args.ct_label_values else None
        volume = volume.keep_only(read_ct_label(args.ct_label, volume, values))
    return volume


def initial_pose(args, volume, xray, camera_from_world: torch.Tensor | None = None):
    """One X-ray: --init (camera_from_ct, or world_from_ct when the X-ray's calibration places its
    camera in a world, as a biplane result does), else the X-ray's DICOM positioner angles, else the
    reference AP view; the source-to-isocenter distance is --sod, else DICOM's
    DistanceSourceToPatient, else 700 mm."""
    from .geometry import reference_ap_pose
    from .io import read_world_pose_json, xray_initial_pose

    if args.init:
        pose, key = read_world_pose_json(args.init)
        if key == "world_from_ct":
            if camera_from_world is None:
                raise ValueError(f"--init {args.init} holds a world_from_ct, but {args.xray[0]} has no camera_from_world "
                                 "to place it in its camera: give a --calibration with a pose (MayaCam, OpenCV) or "
                                 "--camera-from-world, or an --init with a camera_from_ct")
            return camera_from_world @ pose, f"--init {args.init} (world_from_ct, in this X-ray's camera)"
        return pose, f"--init {args.init}"
    iso = _isocenter(volume)
    md = xray.metadata
    sod = float(next(v for v in (args.sod, md.get("sod_mm"), DEFAULT_SOD_MM) if v is not None))
    if not 0 < sod < xray.camera.sdd:
        source = "--sod" if args.sod is not None else "the X-ray's DICOM DistanceSourceToPatient (0018,1111)"
        raise ValueError(f"{source} must lie between 0 and the sdd ({xray.camera.sdd:g} mm), got {sod:g} mm: it is the "
                         "distance from the X-ray source to the CT's isocenter")
    if "primary_angle_deg" in md or "secondary_angle_deg" in md:
        return xray_initial_pose(xray, iso, sod=float(sod)), f"DICOM positioner angles (sod {float(sod):g} mm)"
    return reference_ap_pose(iso, float(sod)), f"reference AP view (sod {float(sod):g} mm)"


def _isocenter(volume) -> torch.Tensor:
    try:
        return volume.bone_center_lps()
    except ValueError:  # no bone: the centre of the CT
        return volume.center_lps()


def initial_world_pose(args, volume, cameras_from_world: list[torch.Tensor]):
    """Several X-rays: world_from_ct from --init, else the CT's axes along the world's with its
    bone centroid at the point nearest every view's principal ray (where the cameras look)."""
    from .geometry import invert_pose, make_pose
    from .io import read_world_pose_json

    if args.sod is not None:
        raise ValueError("--sod places a single X-ray's default pose; with several calibrated X-rays the depth comes "
                         "from their calibration: drop --sod (or give --init)")
    if args.init:
        pose, key = read_world_pose_json(args.init)
        if key == "camera_from_ct":  # the first view's
            pose = invert_pose(cameras_from_world[0]) @ pose
        return pose, f"--init {args.init} ({key})"
    a = torch.zeros(3, 3, dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    for cfw in cameras_from_world:
        wfc = invert_pose(cfw)
        source, axis = wfc[:3, 3], wfc[:3, 2]
        proj = torch.eye(3, dtype=torch.float64) - torch.outer(axis, axis)
        a += proj
        b += proj @ source
    meet = torch.linalg.solve(a, b)
    iso = _isocenter(volume)
    return make_pose(torch.eye(3, dtype=torch.float64), meet - iso), "the CT's axes along the world's, its bone " \
        "centroid where the views' principal rays meet"


# ------------------------------------------------------------------------------------------------
# the verb


def cmd_register(args) -> dict:
    from .io import read_pose_json, read_targets, read_world_pose_json
    from .metrics import mtre
    from .outputs import check_outputs
    from .cli_realdata import read_view

    check_outputs(*_io(args))
    if bool(args.targets) != bool(args.truth):
        raise ValueError("--targets and --truth go together (the mTRE needs both the points and the true pose)")
    if args.init and args.sod is not None:
        raise ValueError("--sod sets the distance of the default initial pose; with --init it would be ignored: drop one")
    n = len(args.xray)
    if args.drr and len(args.drr) != n:
        raise ValueError(f"--drr is given {len(args.drr)} times for {n} X-ray(s): give one per --xray, in their order")
    views = [read_view(v, x) for v, x in zip(_per_view(args, n), args.xray)]  # camera, mask, polarity per view
    volume = _volume(args)
    if n == 1:
        init, init_source = initial_pose(args, volume, views[0].xray, views[0].camera_from_world)
    else:
        missing = [args.xray[k] for k, v in enumerate(views) if v.camera_from_world is None]
        if missing:
            raise ValueError(f"biplane registration needs each X-ray's camera_from_world (its calibration's R, t); "
                             f"{', '.join(missing)} has none: give a --calibration with a pose (MayaCam, OpenCV) or "
                             "--camera-from-world per X-ray")
        init, init_source = initial_world_pose(args, volume, [v.camera_from_world for v in views])
    truth = pts = None
    if args.targets:
        pts, _ = read_targets(args.targets)
        truth = read_pose_json(args.truth) if n == 1 else _world_truth(args.truth, views, read_world_pose_json)
    session = _session(args, volume, views, init)
    result = _run_with_progress(session, args.method, quiet=args.quiet)
    out = _write_outputs(args, volume, views, init, init_source, session, result)
    if truth is not None:
        out["initial_mtre_mm"] = float(mtre(init, truth, pts))
        out["final_mtre_mm"] = float(mtre(result.pose, truth, pts))
        out["success_2mm"] = out["final_mtre_mm"] < 2.0
    return out


def _world_truth(path, views, read_world_pose_json):
    from .geometry import invert_pose

    pose, key = read_world_pose_json(path)
    return invert_pose(views[0].camera_from_world) @ pose if key == "camera_from_ct" else pose


def _session(args, volume, views, init):
    from .register import RegistrationSession, View

    if len(views) == 1:
        v = views[0]
        return RegistrationSession(volume, v.xray.image, v.xray.camera, init, mask=v.mask_tensor, method=args.method,
                                   device=args.device, model_dir=args.model, options=_options(args))
    reg_views = [View(v.xray.image, v.xray.camera, v.camera_from_world, v.mask_tensor, name=str(x))
                 for v, x in zip(views, args.xray)]
    return RegistrationSession(volume, initial_pose=init, views=reg_views, method=args.method, device=args.device,
                               model_dir=args.model, options=_options(args))


def _write_outputs(args, volume, views, init, init_source, session, result) -> dict:
    """Write the pose JSON, transform, DRRs and overlay together (all or none), and say what was written."""
    from .io import write_pose_itk, write_pose_json, write_world_pose_json, write_xray
    from .outputs import OutputSet
    from .projector import Projector

    n = len(views)
    extra = {"method": args.method, "pipeline": result.pipeline, "loss": result.loss, "flagged": result.flagged,
             "message": result.message, "iterations": result.iterations, "runtime_s": result.runtime_s,
             "initial_pose_source": init_source, "verification": result.evidence,
             "stages": list(dict.fromkeys(h["stage"] for h in result.history))}  # what ran, in order
    if n == 1:
        extra.update(views[0].report(result.pose))  # polarity, mask, calibration; world_from_ct if calibrated
        out = {"camera_from_ct": result.pose.tolist(), "output": str(args.output), **extra}
    else:
        per_view = []
        for k, (v, pose) in enumerate(zip(views, result.view_poses)):
            info = v.report()
            per_view.append({"xray": str(args.xray[k]), "camera_from_ct": pose.tolist(), **info})
        extra["views"] = per_view
        out = {"world_from_ct": result.pose.tolist(), "output": str(args.output), **extra}
    init_views = [init] if n == 1 else [v.camera_from_world @ init for v in views]
    drrs_before, drrs_after = [], []
    if args.drr or args.overlay:
        for v, before, after in zip(views, init_views, result.view_poses):
            proj = Projector(volume, v.xray.camera)
            with torch.no_grad():
                drrs_after.append(proj(after.float())[0])
                drrs_before.append(proj(before.float())[0])
    with OutputSet() as outputs:  # all outputs appear together, or none does
        if n == 1:
            write_pose_json(result.pose, outputs.path(args.output, "--output"), extra=extra)
        else:
            write_world_pose_json(result.pose, outputs.path(args.output, "--output"), extra=extra)
        if args.transform:
            write_pose_itk(result.pose, outputs.path(args.transform, "--transform"))
            out["transform"] = str(args.transform)
        for k, d in enumerate(args.drr or []):
            write_xray(drrs_after[k], outputs.path(d, "--drr"), camera=views[k].xray.camera)
        if args.drr:
            out["drr"] = [str(d) for d in args.drr] if n > 1 else str(args.drr[0])
        if args.overlay:
            from .visualize import save_overlay

            names = [f"view {k + 1}" for k in range(n)] if n > 1 else None
            save_overlay(outputs.path(args.overlay, "--overlay"), [v.xray.image for v in views], drrs_before,
                         drrs_after, title=f"corrreg register ({args.method}{', biplane' if n > 1 else ''})",
                         names=names, masks=[v.mask for v in views])
            out["overlay"] = str(args.overlay)
    return out
