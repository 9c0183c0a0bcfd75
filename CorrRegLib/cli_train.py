"""``corrreg train``: train the correlation-driven network on one CT (patient-specific) or several."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .cli import add_common_flags, finite_float

    p = sub.add_parser(
        "train",
        help="train the correlation-driven network (patient-specific on one CT, generic on several)",
        epilog="Weights are written as MODEL_DIR/model.safetensors with MODEL_DIR/config.json (and "
               "optimizer.safetensors for --resume); every checkpoint replaces the three together.",
    )
    p.add_argument("--ct", action="append", default=[], help="training CT in HU (repeat for several); 'phantom' or 'phantom:SEED' for the built-in spine phantom")
    p.add_argument("--labels", action="append", default=[], help="label map for each --ct (its bone centroid becomes the isocenter)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output folder for model.safetensors and config.json")
    p.add_argument("--preset", default="compact", choices=["compact", "paper"], help="network size (compact trains on a laptop CPU)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=4, help="pose pairs per step")
    p.add_argument("--lr", type=finite_float, default=1e-3, help="peak learning rate (cosine schedule with warm-up)")
    p.add_argument("--camera", metavar="CAM.json", help="C-arm geometry to train for (default: the paper protocol's camera)")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validations (share of held-out poses whose pose gradient points towards the truth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in MODEL_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the model MODEL_DIR already holds (without "
                   "--resume or --overwrite, a folder holding a model is refused)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-json", action="store_true", help="instead of the progress bar, one JSON object per "
                   "step on stderr: {\"done\", \"steps\", \"loss\", ...} (for GUIs)")
    add_common_flags(p)
    p.set_defaults(func=cmd_train)


def _load_cts(specs, labels):
    from .io import read_ct
    from .phantom import make_spine_phantom

    if not specs:
        raise ValueError("give at least one --ct (a CT file, or 'phantom' for the built-in phantom)")
    if labels and len(labels) != len(specs):
        raise ValueError(f"give one --labels per --ct ({len(specs)} CTs, {len(labels)} label maps)")
    vols, labs = [], []
    for i, spec in enumerate(specs):
        if _is_phantom(spec):
            seed = _phantom_seed(spec, i)
            ph = make_spine_phantom(spacing_mm=2.5, seed=seed)
            vols.append(ph.volume)
            labs.append(ph.labels)
        else:
            vols.append(read_ct(spec))
            labs.append(_read_label_array(labels[i]) if labels else None)
    return vols, labs


def _is_phantom(spec: str) -> bool:
    return spec == "phantom" or spec.startswith("phantom:")


def _phantom_seed(spec: str, default: int) -> int:
    if ":" not in spec:
        return default
    text = spec.split(":", 1)[1]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--ct {spec}: the phantom's seed must be a whole number (phantom:SEED, e.g. phantom:3)") from None


def _read_label_array(path):
    """A label map's voxels (k, j, i) as int64, through CorrRegLib.io's checked reader."""
    import SimpleITK as sitk
    import torch

    from .io._common import _execute, _path, _read_info, _require_exists

    p = _path(path)
    _require_exists(p, "label map")
    image = _execute(_read_info(p, "label map"), p, "label map")
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype("int64"))


def cmd_train(args) -> dict:
    from .device import pick_device
    from .io import read_camera_json
    from .protocols import PAPER_CAMERA
    from .train import check_model_dir, check_options, train

    check_options(steps=args.steps, batch_size=args.batch_size, lr=args.lr, validate_every=args.validate_every)
    inputs = {"--ct": [c for c in args.ct if not _is_phantom(c)], "--labels": args.labels, "--camera": args.camera}
    check_model_dir(args.out, args.resume, args.overwrite, inputs=inputs)
    device = pick_device(args.device)
    # The network sees the camera's field of view downsampled to its preset's input size.
    camera = read_camera_json(args.camera) if args.camera else PAPER_CAMERA
    vols, labs = _load_cts(args.ct, args.labels)
    res = train(vols, camera, args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, device=device, resume=args.resume, labels=labs,
                progress=not (args.quiet or args.progress_json), validate_every=args.validate_every,
                overwrite=args.overwrite, on_step=_print_progress_json if args.progress_json else None)
    return {"model_dir": str(res.out_dir), "device": str(device), "preset": args.preset, "steps": res.steps,
            "train_s": res.seconds, "validation": res.validation[-1] if res.validation else None,
            "validation_before": res.validation[0] if res.validation else None}


def _print_progress_json(record: dict) -> None:
    """One line of JSON per training step on stderr (``--progress-json``)."""
    import json
    import sys

    print(json.dumps({"event": "step", **record}), file=sys.stderr, flush=True)
