"""Command-line pieces for real data: per-X-ray geometry, polarity and mask; CT geometry flags;
the ``corrreg convert-ct`` verb.

``read_view(args, xray_path, ...)`` reads one X-ray the way ``corrreg register`` does, with its
camera from ``--calibration`` (CorrReg JSON, MayaCam 2.0, OpenCV YAML / JSON) or
``--intrinsics`` / ``--camera`` / the other camera flags, then masks it (``--mask``) and makes it
bone-bright (``--polarity``, ``--invert``). Biplane registration calls it once per view, with
that view's own calibration, polarity and mask.

``read_ct_from_args(args)`` reads ``--ct`` with the ``--ct-*`` geometry flags (a TIFF stack, a
file without geometry, a CT stored as unsigned values).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch

from .cli import finite_float as _float
from .preprocess import INVERSIONS, POLARITY_MODES


# ------------------------------------------------------------------------------------------------
# one X-ray: geometry, polarity, mask


def add_view_flags(p: argparse.ArgumentParser, per_view: bool = False) -> None:
    """--calibration, --intrinsics, --camera-from-world, --polarity, --invert, --mask; with
    ``per_view`` each but --intrinsics may be repeated, once per X-ray (biplane), and is a list."""
    each = {"action": "append", "default": None} if per_view else {}
    rep = " (once, or once per --xray in their order)" if per_view else ""
    g = p.add_argument_group("real X-rays: calibration, polarity, field-of-view mask")
    g.add_argument("--calibration", metavar="FILE", **each,
                   help="the X-ray's calibrated camera: CorrReg camera JSON (sdd_mm/pixel_spacing_mm or intrinsics_px, "
                        "camera_from_world), MayaCam 2.0 .txt (XMALab/Autoscoper) or OpenCV YAML/JSON (K, R|rvec, t|tvec); "
                        "--pixel-spacing then only sets the physical pixel size" + (" (one per --xray)" if per_view else ""))
    g.add_argument("--intrinsics", type=_float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                   help="camera from its intrinsic matrix in pixels (CorrReg pixel centres at +0.5, as --principal-point; "
                        "an OpenCV/MayaCam cx, cy is 0.5 less)")
    g.add_argument("--camera-from-world", metavar="M.json", **each,
                   help="JSON with a 4x4 camera_from_world (mm; world frame of a calibrated room)" + rep)
    g.add_argument("--polarity", choices=POLARITY_MODES, **(each or {"default": "auto"}),
                   help="bone bright or dark in the X-ray; auto detects it (default), dark inverts it" + rep)
    g.add_argument("--invert", choices=INVERSIONS, **(each or {"default": "auto"}),
                   help="how a bone-dark X-ray is inverted: log (-log I/I_air, raw transmission), linear (max - I) or "
                        "auto" + rep)
    g.add_argument("--mask", metavar="auto|none|FILE", **(each or {"default": "auto"}),
                   help="usable pixels: auto detects an intensifier circle, collimator blades and burned-in labels "
                        "(default), none uses every pixel, FILE is a mask image (non-zero = use)" + rep)


@dataclass
class View:
    """One X-ray ready to register: ``xray`` (bone-bright image, camera), ``mask`` (bool (H, W)
    numpy or None), ``calibration`` (``io.calibration.Calibration`` or None) and what was decided."""

    xray: object
    mask: np.ndarray | None
    calibration: object | None
    camera_from_world: torch.Tensor | None
    info: dict = field(default_factory=dict)

    @property
    def mask_tensor(self):
        return None if self.mask is None else torch.from_numpy(self.mask)

    def report(self, camera_from_ct: torch.Tensor | None = None) -> dict:
        """JSON-friendly decisions, and ``world_from_ct`` (4x4) when the view is calibrated."""
        out = dict(self.info)
        if camera_from_ct is not None and self.camera_from_world is not None:
            from .geometry import invert_pose

            out["world_from_ct"] = (invert_pose(self.camera_from_world) @ camera_from_ct.double().cpu()).tolist()
        return out


def _image_size(path) -> tuple[int, int]:
    from .io._common import _path, _read_info, _require_exists

    p = _path(path)
    _require_exists(p, "X-ray image")
    size = [int(s) for s in _read_info(p, "X-ray").GetSize() if int(s) > 1]
    if len(size) != 2:
        raise ValueError(f"{p} is not a 2D image (size {size}); pass the X-ray")
    return size[0], size[1]


def _camera_from_world_file(path) -> torch.Tensor:
    from .geometry import check_rigid
    from .io._common import _load_json, _path

    d = _load_json(_path(path), "camera_from_world JSON")
    m = d.get("camera_from_world") if isinstance(d, dict) else d
    try:
        return check_rigid(torch.as_tensor(m, dtype=torch.float64))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: expected a 4x4 rigid camera_from_world (mm), as a list or under that key ({err})") from None


def _flag(args, name: str, default=None):
    """A view flag's value for one X-ray: repeatable flags (biplane) hold a list, of one value here."""
    value = getattr(args, name, default)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"--{name.replace('_', '-')} is given {len(value)} times for one X-ray")
        value = value[0]
    return default if value is None else value


def read_view(args, xray_path, calibration=None, polarity: str | None = None, mask=None, invert: str | None = None) -> View:
    """One X-ray with its geometry, mask and polarity from the command-line ``args`` (the flags
    of :func:`add_view_flags` and ``cli._add_camera_flags``); the keyword arguments override the
    flags for this view (biplane: each view's own calibration, polarity, mask)."""
    from .geometry import Camera
    from .io import read_xray
    from .io.calibration import read_calibration
    from .preprocess import prepare_xray

    cal_path = calibration if calibration is not None else _flag(args, "calibration")
    intr = getattr(args, "intrinsics", None)
    sdd, spacing, pp = getattr(args, "sdd", None), getattr(args, "pixel_spacing", None), getattr(args, "principal_point", None)
    camera_json = getattr(args, "camera", None)
    cal, cam_from_world, info = None, None, {}
    if cal_path or intr:
        if cal_path and intr:
            raise ValueError("give the camera once: --calibration or --intrinsics, not both")
        if camera_json or sdd is not None:
            what = "--camera" if camera_json else "--sdd"
            raise ValueError(f"{what} conflicts with {'--calibration' if cal_path else '--intrinsics'}, which fixes the "
                             "focal length; to set the physical pixel size give --pixel-spacing")
        size = _image_size(xray_path)
        if cal_path:
            cal = read_calibration(cal_path, image_size=size, pixel_spacing=tuple(spacing) if spacing else None)
            camera, cam_from_world = cal.camera, cal.camera_from_world
            info["calibration"] = {"path": str(cal_path), "source": cal.source}
        else:
            fx, fy, cx, cy = intr
            camera = Camera.from_intrinsics([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], size, tuple(spacing) if spacing else None)
        if pp is not None:  # --principal-point moves (cx, cy) and keeps fx, fy and the pixel size
            k = camera.intrinsics()
            fx, fy = float(k[0, 0]), float(k[1, 1])
            camera = Camera.from_intrinsics([[fx, 0, pp[0]], [0, fy, pp[1]], [0, 0, 1]], camera.size, camera.pixel_spacing[0])
        xr = read_xray(xray_path, camera=camera)
    else:
        xr = read_xray(xray_path, camera_json=camera_json, sdd=sdd, pixel_spacing=spacing, principal_point=pp)
    cfw = _flag(args, "camera_from_world")
    if cfw:
        if cam_from_world is not None:
            raise ValueError("--camera-from-world conflicts with the calibration's own camera_from_world; give one")
        cam_from_world = _camera_from_world_file(cfw)
    prepared = prepare_xray(
        xr,
        polarity=polarity or _flag(args, "polarity", "auto"),
        mask=mask if mask is not None else _flag(args, "mask", "auto"),
        transform=invert or _flag(args, "invert", "auto"),
    )
    md = prepared.xray.metadata
    info["polarity"] = {k: v for k, v in md["polarity"].items() if k != "noise_per_grey_bin"}
    info["fov_mask"] = md["fov_mask"]
    return View(prepared.xray, prepared.mask, cal, cam_from_world, info)


# ------------------------------------------------------------------------------------------------
# CT geometry flags


def add_ct_geometry_flags(p: argparse.ArgumentParser, prefix: str = "ct-") -> None:
    """Flags for a CT file without geometry; ``prefix`` "ct-" for verbs with --ct, "" for convert-ct."""
    g = p.add_argument_group("CT geometry, for files without it (TIFF stacks); overrides a <stem>.geometry.json side-car")
    g.add_argument(f"--{prefix}spacing", type=_float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel size (mm) along columns, rows, pages (slices)")
    g.add_argument(f"--{prefix}origin", type=_float, nargs=3, metavar=("X", "Y", "Z"), help="centre of the first voxel (mm, LPS)")
    g.add_argument(f"--{prefix}direction", type=_float, nargs=9, metavar="D",
                   help="3x3 direction, row by row (ITK: its columns are the column, row and page axes)")
    g.add_argument(f"--{prefix}placement", choices=["autoscoper"],
                   help="place the volume as Autoscoper does (x along columns, y up the rows, z against the page order)")
    g.add_argument(f"--{prefix}flip", type=int, nargs=3, metavar=("I", "J", "K"),
                   help="reverse the voxel order along columns, rows, pages first (1 = flip; Autoscoper's VolumeFlip)")
    g.add_argument(f"--{prefix}hu-offset", type=_float, metavar="HU",
                   help="HU = value x scale + offset (e.g. -1024 for 12-bit CT values stored unsigned)")
    g.add_argument(f"--{prefix}hu-scale", type=_float, metavar="S", help="HU scale (default 1)")
    g.add_argument(f"--{prefix}geometry", metavar="GEOMETRY.json",
                   help="a CT geometry JSON (as the side-car <stem>.geometry.json); the flags above override it")


def ct_geometry_from_args(args, prefix: str = "ct_"):
    """The ``CTGeometry`` the flags ask for (over --ct-geometry's file), or None."""
    from .io.ct_geometry import CTGeometry, read_ct_geometry

    get = lambda name: getattr(args, prefix + name, None)
    base = read_ct_geometry(get("geometry")) if get("geometry") else None
    d = {}
    if get("spacing") is not None:
        d["spacing_mm"] = tuple(get("spacing"))
    if get("origin") is not None:
        d["origin_mm"] = tuple(get("origin"))
    if get("direction") is not None:
        d["direction"] = np.asarray(get("direction"), dtype=np.float64).reshape(3, 3).tolist()
    if get("placement") is not None:
        d["placement"] = get("placement")
    if get("flip") is not None:
        if any(v not in (0, 1) for v in get("flip")):
            raise ValueError(f"--{prefix.replace('_', '-')}flip takes three 0/1 values, got {get('flip')}")
        d["flip"] = tuple(bool(v) for v in get("flip"))
    if get("hu_offset") is not None:
        d["hu_offset"] = get("hu_offset")
    if get("hu_scale") is not None:
        d["hu_scale"] = get("hu_scale")
    flags = CTGeometry.from_dict(d, "the CT geometry flags") if d else None
    if base is None:
        return flags
    return base.merged(flags)


def read_ct_from_args(args, path=None, hu: bool = True):
    """``read_ct(--ct)`` with the --ct-* geometry flags."""
    from .io import read_ct

    return read_ct(path if path is not None else args.ct, hu=hu, geometry=ct_geometry_from_args(args))


# ------------------------------------------------------------------------------------------------
# corrreg convert-ct


def cmd_convert_ct(args) -> dict:
    from .io import read_ct_hu, write_ct
    from .io._common import _path

    src, dst = _path(args.input), _path(args.output)
    try:
        from .outputs import Output, check_outputs

        check_outputs([Output("OUT", dst, "image")], {"IN": src})
    except ImportError:  # pragma: no cover - older trees without outputs.py
        pass
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"convert-ct would overwrite its input {src}; write to another file")
    img = read_ct_hu(src, geometry=ct_geometry_from_args(args, prefix=""))
    arr = img.hu
    integral = bool(torch.equal(arr, torch.round(arr))) and float(arr.min()) >= -32768 and float(arr.max()) <= 32767
    pixel_type = args.pixel_type or ("int16" if integral else "float32")
    write_ct(img, dst, pixel_type=pixel_type)
    return {"input": str(src), "output": str(dst), "shape_kji": list(arr.shape), "spacing_mm": list(img.spacing),
            "origin_mm": list(img.origin), "direction": [list(r) for r in img.direction], "pixel_type": pixel_type,
            "hu_range": [float(arr.min()), float(arr.max())]}


def add_parser(sub) -> None:
    """Register ``corrreg convert-ct`` (called by cli.build_parser)."""
    from .cli import EPILOG

    _add_convert_parser(sub, EPILOG)


def _add_convert_parser(sub, epilog: str) -> None:
    p = sub.add_parser(
        "convert-ct",
        help="write a CT (any 3D image SimpleITK reads, a multi-page TIFF included) as NRRD/NIfTI/MHA with its geometry",
        description="Read a CT, give it the geometry and HU mapping its file lacks, and write it as a proper "
                    "NRRD / NIfTI / MHA (never over the input). Example, the Autoscoper wrist radius: "
                    "corrreg convert-ct rad_dcm_cropped.tif radius.nrrd --spacing 0.39625 0.39625 0.625 "
                    "--placement autoscoper --hu-offset -1024",
        epilog=epilog,
    )
    p.add_argument("input", metavar="IN", help="CT: NIfTI/NRRD/MHA, a DICOM folder, a multi-page TIFF, ...")
    p.add_argument("output", metavar="OUT", help="output image (.nrrd, .nii.gz, .mha)")
    p.add_argument("--pixel-type", choices=["int16", "float32"],
                   help="stored type (default: int16 when every HU value is an integer in range, else float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_ct_geometry_flags(p, prefix="")
    p.set_defaults(func=cmd_convert_ct)


def add_register_flags(p: argparse.ArgumentParser, per_view: bool = False) -> None:
    """What ``corrreg register`` adds for real data: the view flags and the CT geometry flags."""
    add_view_flags(p, per_view)
    add_ct_geometry_flags(p)
