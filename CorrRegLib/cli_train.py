"""``corrreg train``: train the correlation-driven network on one CT (patient-specific) or several."""

from __future__ import annotations



def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the correlation-driven network (patient-specific on one CT, generic on several)",
        epilog="Weights are written as MODEL_DIR/model.safetensors with MODEL_DIR/config.json.",
    )
    p.add_argument("--ct", action="append", default=[], help="training CT in HU (repeat for several); 'phantom' or 'phantom:SEED' for the built-in spine phantom")
    p.add_argument("--labels", action="append", default=[], help="label map for each --ct (its bone centroid becomes the isocenter)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output folder for model.safetensors and config.json")
    p.add_argument("--preset", default="compact", choices=["compact", "paper"], help="network size (compact trains on a laptop CPU)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=4, help="pose pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule with warm-up)")
    p.add_argument("--camera", metavar="CAM.json", help="C-arm geometry to train for (default: the paper protocol's camera)")
    p.add_argument("--validate-every", type=int, default=100, help="steps between validations (share of held-out poses whose pose gradient points towards the truth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in MODEL_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-json", action="store_true", help="instead of the progress bar, one JSON object per "
                   "step on stderr: {\"done\", \"steps\", \"loss\", ...} (for GUIs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device")
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
        if spec.startswith("phantom"):
            seed = int(spec.split(":", 1)[1]) if ":" in spec else i
            ph = make_spine_phantom(spacing_mm=2.5, seed=seed)
            vols.append(ph.volume)
            labs.append(ph.labels)
        else:
            vols.append(read_ct(spec))
            labs.append(_read_label_array(labels[i]) if labels else None)
    return vols, labs


def _read_label_array(path):
    import SimpleITK as sitk
    import torch

    return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype("int64"))


def cmd_train(args) -> dict:
    from .device import pick_device
    from .io import read_camera_json
    from .protocols import PAPER_CAMERA
    from .train import train

    # The network sees the camera's field of view downsampled to its preset's input size.
    camera = read_camera_json(args.camera) if args.camera else PAPER_CAMERA
    vols, labs = _load_cts(args.ct, args.labels)
    device = pick_device(args.device)
    res = train(vols, camera, args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, device=device, resume=args.resume, labels=labs,
                progress=not (args.quiet or args.progress_json), validate_every=args.validate_every,
                on_step=_print_progress_json if args.progress_json else None)
    return {"model_dir": str(res.out_dir), "device": str(device), "preset": args.preset, "steps": res.steps,
            "train_s": res.seconds, "validation": res.validation[-1] if res.validation else None,
            "validation_before": res.validation[0] if res.validation else None}


def _print_progress_json(record: dict) -> None:
    """One line of JSON per training step on stderr (``--progress-json``)."""
    import json
    import sys

    print(json.dumps({"event": "step", **record}), file=sys.stderr, flush=True)
