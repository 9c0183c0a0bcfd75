"""Bad and unusual inputs, tried as a hostile new user would (issue 13): every row runs the
``corrreg`` command (in process) or the Python API on real files and asserts

* the exit code (or the exception type) and a fragment of the message that names the problem,
* that every input file's sha256 is unchanged (nothing overwrites an input),
* that the run left nothing behind: no new or changed file in its output folder, no staging
  (``.corrreg-partial-*``) or probe folder anywhere.

The phantom is small (2.5 mm voxels) and the detector 64 px, so the whole table runs in well
under two minutes on a 2-core machine; almost every row must fail before any real work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CorrRegLib.cli import main
from CorrRegLib.geometry import Camera, invert_pose, reference_ap_pose
from CorrRegLib.io import (
    read_camera_json,
    read_ct,
    read_pose_json,
    read_targets,
    read_xray,
    write_camera_json,
    write_ct,
    write_pose_json,
    write_targets_csv,
    write_xray,
)
from CorrRegLib.outputs import Output, OutputError, OutputSet, check_outputs
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import perturb_pose
from CorrRegLib.register import bundled_model_dir, register
from CorrRegLib.simulate import simulate_xray
from CorrRegLib.train import load_model, train
from CorrRegLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")

CAMERA = Camera(1011.7, (3.192, 3.192), (64, 64))  # the paper camera's field of view at 64 px
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ------------------------------------------------------------------------------------------------
# The input files, written once


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _sitk_write(arr: np.ndarray, path: Path, compress: bool = False, spacing=(2.5, 2.5, 2.5)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: arr.ndim])
    sitk.WriteImage(img, str(path), compress)
    return path


@pytest.fixture(scope="module")
def P(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("inputs")
    ph = small_phantom(seed=0)
    hu16 = ph.hu.numpy().astype(np.int16)
    write_ct(ph.volume, d / "ct.nrrd", pixel_type="int16")
    iso = ph.volume.bone_center_lps()
    truth = perturb_pose(reference_ap_pose(iso, 700.0), iso, [2.0, -3.0, 1.0], [0.0, 0.0, 0.0])
    init = perturb_pose(truth, iso, [3.0, 2.0, -2.0], [4.0, -5.0, 10.0])
    write_pose_json(truth, d / "truth.json")
    write_pose_json(init, d / "init.json")
    write_pose_json(invert_pose(truth), d / "inverse.json")  # ct_from_camera given as camera_from_ct
    behind, outside, beyond = truth.clone(), truth.clone(), truth.clone()
    behind[2, 3] = -700.0
    outside[0, 3] += 600.0
    beyond[2, 3] += 2000.0
    for name, pose in (("behind", behind), ("outside", outside), ("beyond", beyond)):
        write_pose_json(pose, d / f"{name}.json")
    nonrigid = truth.clone()
    nonrigid[0, 0] = 2.0
    (d / "nonrigid.json").write_text(json.dumps({"camera_from_ct": nonrigid.tolist()}))
    nanpose = truth.clone()
    nanpose[0, 3] = float("nan")
    (d / "nanpose.json").write_text(json.dumps({"camera_from_ct": nanpose.tolist()}))
    (d / "nanpp.camera.json").write_text(json.dumps(dict(CAMERA.to_dict(), principal_point_px=[float("nan"), 32])))
    write_camera_json(CAMERA, d / "geom.camera.json")
    write_camera_json(Camera(1011.7, (3.192, 3.192), (64, 64), (5000.0, 5000.0)), d / "farpp.camera.json")
    (d / "negsdd.camera.json").write_text(json.dumps({"sdd_mm": -5, "pixel_spacing_mm": [1, 1], "size_px": [64, 64]}))
    image = simulate_xray(ph.volume, CAMERA, truth, dose=1e4, blur_mm=0.6, seed=0).image
    write_xray(image, d / "xray.nrrd", camera=CAMERA)  # and xray.camera.json beside it
    write_xray(1.0 - image, d / "dark.nrrd", camera=CAMERA)  # bone-dark (inverted) radiograph
    write_xray(image, d / "plain.png")  # no geometry anywhere
    write_xray(image, d / "xray_png.png", camera=CAMERA)
    write_xray(torch.full((64, 64), 0.5), d / "blank.nrrd", camera=CAMERA)
    write_xray(image, d / "xray.jpg", camera=CAMERA)
    _truncate(d / "xray.jpg", d / "trunc_xray.jpg")
    _sitk_write(image.numpy(), d / "xray2d.nii.gz")
    _truncate(d / "xray2d.nii.gz", d / "trunc_xray.nii.gz")
    shutil.copy(d / "plain.png", d / "mask.png")
    shutil.copy(d / "ct.nrrd", d / "ctg.nrrd")
    (d / "ctg.geometry.json").write_text("{}\n")  # never read: the rows using it fail before
    write_targets_csv(ph.landmarks, d / "landmarks.csv")
    shutil.copy(d / "landmarks.csv", d / "landmarks.txt")
    # CTs in every format, and their truncated or corrupt copies
    _sitk_write(hu16, d / "ct.nii.gz")
    _sitk_write(hu16, d / "ct.nii")
    _sitk_write(hu16, d / "ctgz.nrrd", compress=True)
    _sitk_write(hu16, d / "ct.mha")
    _sitk_write(hu16, d / "ctz.mha", compress=True)
    _sitk_write(hu16, d / "ctdet.mhd")
    for src in ("ct.nii.gz", "ct.nii", "ct.nrrd", "ctgz.nrrd", "ct.mha", "ctz.mha"):
        _truncate(d / src, d / f"trunc_{src}")
    data = bytearray((d / "ct.nii.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "corrupt.nii.gz").write_bytes(bytes(data))
    (d / "noraw.mhd").write_text((d / "ctdet.mhd").read_text().replace("ctdet.raw", "gone.raw"))
    (d / "huge.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\n"
                                 "encoding: raw\nendian: little\nspacings: 1 1 1\n\n")
    (d / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                                "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    nii = bytearray((d / "ct.nii").read_bytes())
    nii[42:48] = struct.pack("<hhh", 30000, 30000, 30000)
    (d / "huge.nii.gz").write_bytes(gzip.compress(bytes(nii)))
    write_ct(np.zeros((40, 40, 40), np.float32), d / "constant.nrrd", spacing=(2.5, 2.5, 2.5))
    write_ct(np.full((40, 40, 40), -1000, np.float32), d / "air.nrrd", spacing=(2.5, 2.5, 2.5))
    tiny = np.full((2, 2, 2), -1000, np.float32)
    tiny[0, 0, 0], tiny[1, 1, 1] = 1000, 500
    write_ct(tiny, d / "tiny.nrrd", spacing=(1, 1, 1))
    nan = hu16.astype(np.float32)
    nan[10, 10, 10] = np.nan
    _sitk_write(nan, d / "nan.nrrd")
    (d / "empty.nrrd").write_bytes(b"")
    from test_io import _write_dicom_series

    _write_dicom_series(d / "dicom_gap", hu16[::8, ::2, ::2].astype(np.float32), (5.0, 5.0, 20.0), (0, 0, 0), np.eye(3))
    slice3 = sorted((d / "dicom_gap").iterdir())[3]
    _truncate(slice3, slice3)  # GDCM drops the unreadable slice: the series has a hole
    (d / "nodicom").mkdir()
    (d / "nodicom" / "readme.txt").write_text("not a DICOM series")
    # JSON and targets that are not what they claim
    (d / "garbage.json").write_text("{not json")
    (d / "binary.json").write_bytes(bytes(range(256)))
    (d / "short.mrk.json").write_text(json.dumps({"markups": [{"controlPoints": [{"label": "L1", "position": [1, 2]}]}]}))
    (d / "notdict.mrk.json").write_text(json.dumps({"markups": [1, 2]}))
    (d / "text.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                                 "vtkMRMLMarkupsFiducialNode_0,abc,2,3,0,0,0,1,1,1,0,L1,,\n")
    (d / "shortrow.fcsv").write_text("# CoordinateSystem = LPS\nid0,1\n")
    (d / "text.csv").write_text("x,y,z\n1,2,abc\n")
    (d / "binary.csv").write_bytes(bytes(range(256)))
    # a trained model (a copy of the bundled one), and a pickle dressed as one
    shutil.copytree(bundled_model_dir(), d / "model")
    (d / "pickled").mkdir()
    shutil.copy(d / "model" / "config.json", d / "pickled" / "config.json")
    torch.save({"w": torch.zeros(2)}, d / "pickled" / "model.safetensors")
    return SimpleNamespace(dir=d, volume=ph.volume, truth=truth, image=image)


# ------------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    """One bad input. ``cli``: the argv ({in}: the inputs folder, {out}: this row's empty output
    folder, {ro}: a read-only folder in it, {file}: a regular file in it); ``api``: a call on
    the namespace P (plus ``out``, the output folder). ``expect``: exit code or exception type.
    ``check``: for rows that may succeed, a predicate on (code, stdout, stderr) instead."""

    id: str
    cli: tuple[str, ...] | None = None
    api: Callable[[SimpleNamespace], object] | None = None
    expect: int | type = 2
    match: str = ""
    prepare: Callable[[Path, Path], None] | None = None  # (output folder, inputs folder)
    check: Callable[[int, str, str], bool] | None = None
    read_only: bool = False  # the api row needs P.ro
    marks: tuple = ()


REG = ("register", "--ct", "{in}/ct.nrrd", "--xray", "{in}/xray.nrrd", "--init", "{in}/init.json", "--quiet")
REG_NOINIT = ("register", "--ct", "{in}/ct.nrrd", "--xray", "{in}/xray.nrrd", "--quiet")
SIM = ("simulate", "--ct", "{in}/ct.nrrd", "--camera", "{in}/geom.camera.json", "--pose", "{in}/truth.json")
TRAIN = ("train", "--ct", "{in}/ct.nrrd", "--steps", "2", "--quiet")


def reg(*extra, ct="ct.nrrd", xray="xray.nrrd", init="init.json", output="{out}/pose.json"):
    """corrreg register on the inputs folder's files, writing --output in the row's folder."""
    return ("register", "--ct", f"{{in}}/{ct}", "--xray", f"{{in}}/{xray}", "--init", f"{{in}}/{init}", "--quiet",
            "--output", output, *extra)


def _train_constant(P):
    flat = Volume(torch.full((20, 20, 20), 0.0206), (2.5, 2.5, 2.5))
    return _train(P, cts=[flat])


def _old_file(out: Path, inputs: Path) -> None:
    (out / "pose.json").write_text('{"old": true}\n')


def _air_volume():
    return Volume(torch.zeros(40, 40, 40), (2.5, 2.5, 2.5))


def _staged_then_failed(P):
    """A later output fails after an earlier one was staged: the old file must survive."""
    with OutputSet() as outputs:
        write_pose_json(P.truth, outputs.path(P.out / "pose.json"))
        write_xray(P.image, outputs.path(P.out / "drr.nrrd"), camera=CAMERA)
        raise RuntimeError("later output failed")


def _interrupted_write(P):
    with OutputSet() as outputs:
        write_pose_json(P.truth, outputs.path(P.out / "pose.json"))
        raise KeyboardInterrupt


def _not_silently_wrong(code: int, out: str, err: str) -> bool:
    """A bone-dark X-ray: registered right (mTRE under 2 mm), or flagged, or refused clearly;
    never exit 0 with a wrong, unflagged pose (it was 12.7 -> 156.8 mm)."""
    if code == 0:
        res = json.loads(out.strip().splitlines()[-1])
        return res["flagged"] is True or res["final_mtre_mm"] < 2.0
    return code == 2 and any(w in err for w in ("inverted", "bone-dark", "dark", "polarity"))


def _train(P, **kw):
    args = dict(steps=2, batch_size=2, progress=False, n_validation=2, xray_pool=2)
    args.update(kw)
    out = args.pop("out_dir", P.out / "model")
    return train(args.pop("cts", [P.volume]), CAMERA, out, **args)


CASES = [
    # ---- data loss: an output equal to an input, or inside one -----------------------------------
    Case("register-output-is-ct", REG + ("--output", "{in}/ct.nrrd"), match="is the input --ct"),
    Case("register-output-is-init", REG + ("--output", "{in}/init.json"), match="is the input --init"),
    Case("register-output-is-truth", reg("--targets", "{in}/landmarks.csv", "--truth", "{in}/truth.json",
                                         output="{in}/truth.json"), match="is the input --truth"),
    Case("register-output-is-camera", REG + ("--camera", "{in}/geom.camera.json", "--output", "{in}/geom.camera.json"),
         match="is the input --camera"),
    Case("register-output-is-xray-sidecar", REG + ("--output", "{in}/xray.camera.json"),
         match=r"is the input --xray \(its xray.camera.json\)"),
    Case("register-drr-is-xray", reg("--drr", "{in}/xray.nrrd"), match="is the input --xray"),
    Case("register-drr-sidecar-is-camera", reg("--camera", "{in}/geom.camera.json", "--drr", "{in}/geom.nrrd"),
         match=r"--drr \(its geom.camera.json\) .* is the input --camera"),
    Case("register-overlay-is-xray", reg("--overlay", "{in}/xray_png.png", xray="xray_png.png"),
         match="is the input --xray"),
    Case("register-transform-is-targets", reg("--targets", "{in}/landmarks.txt", "--truth", "{in}/truth.json",
                                              "--transform", "{in}/landmarks.txt"), match="is the input --targets"),
    Case("register-overlay-is-the-mask", reg("--mask", "{in}/mask.png", "--overlay", "{in}/mask.png"),
         match="is the input --mask"),
    Case("register-output-is-calibration", reg("--calibration", "{in}/geom.camera.json", output="{in}/geom.camera.json"),
         match="is the input --calibration"),
    Case("register-output-is-ct-geometry-sidecar", reg(ct="ctg.nrrd", output="{in}/ctg.geometry.json"),
         match=r"is the input --ct \(its ctg.geometry.json\)"),
    Case("register-output-inside-model", REG + ("--method", "hybrid", "--model", "{in}/model",
                                                "--output", "{in}/model/pose.json"),
         match="lies inside the input folder --model"),
    Case("register-output-symlink-to-input", reg(output="{out}/link.json"),
         prepare=lambda out, d: os.symlink(d / "init.json", out / "link.json"), match="is the input --init"),
    Case("register-output-hardlink-to-input", reg("--targets", "{in}/landmarks.csv", "--truth", "{in}/truth.json",
                                                  output="{out}/hard.json"),
         prepare=lambda out, d: os.link(d / "truth.json", out / "hard.json"), match="is the input --truth"),
    Case("register-output-inside-ct-folder", reg(ct="nodicom", output="{in}/nodicom/pose.json"),
         match="lies inside the input folder --ct"),
    Case("register-two-outputs-one-file", REG + ("--output", "{out}/d.camera.json", "--drr", "{out}/d.nrrd"),
         match="name the same file"),
    Case("simulate-out-is-ct", SIM + ("--out", "{in}/ct.nrrd"), match="is the input --ct"),
    Case("simulate-sidecar-is-camera", SIM + ("--out", "{in}/geom.nrrd"), match=r"its geom.camera.json\) .* is the input --camera"),
    Case("simulate-out-is-pose", SIM + ("--out", "{in}/truth.json"), match="is the input --pose"),
    Case("simulate-out-bad-format", SIM + ("--out", "{out}/x.json"), match="must end with .nrrd"),
    Case("train-out-holds-a-model", TRAIN + ("--out", "{in}/model"), match="already holds a trained model"),
    Case("train-out-is-the-ct", TRAIN + ("--out", "{in}/ct.nrrd"), match="is the input --ct"),
    Case("train-out-is-a-file", TRAIN + ("--out", "{file}"), match="is a file, not a folder"),
    Case("demo-out-is-the-model", ("demo", "--quiet", "--model", "{in}/model", "--out", "{in}/model"),
         match="is the input --model"),
    Case("api-train-out-holds-a-model", api=lambda P: _train(P, out_dir=P.dir / "model"), expect=ValueError,
         match="already holds a trained model"),
    Case("api-check-outputs-equal-input", api=lambda P: check_outputs([Output("--output", P.dir / "init.json", "pose")],
                                                                      {"--init": P.dir / "init.json"}),
         expect=OutputError, match="is the input --init"),
    # ---- outputs that cannot be written: checked before any work, nothing left behind ------------
    Case("register-output-read-only", reg(output="{ro}/pose.json"), match="is not writable"),
    Case("register-drr-read-only", reg("--drr", "{ro}/drr.nrrd"), match="is not writable"),
    Case("register-overlay-read-only", reg("--overlay", "{ro}/o.png"), match="is not writable"),
    Case("register-transform-read-only", reg("--transform", "{ro}/t.tfm"), match="is not writable"),
    Case("register-output-below-a-file", reg(output="{file}/pose.json"), match="is a file, not a folder"),
    Case("register-output-is-a-folder", reg(output="{out}"), match="is a folder"),
    Case("register-output-empty", reg(output=""), match="the path is empty"),
    Case("register-output-read-only-file", reg(), prepare=lambda out, d: (_old_file(out, d), os.chmod(out / "pose.json", 0o444)),
         match="read-only", marks=(pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files"),)),
    Case("register-transform-bad-format", reg("--transform", "{out}/t.json"), match="must end with .tfm"),
    Case("register-overlay-bad-format", reg("--overlay", "{out}/o.xyz"), match="must end with .png"),
    Case("register-drr-bad-format", reg("--drr", "{out}/d.xyz"), match="must end with .nrrd"),
    Case("simulate-out-read-only", SIM + ("--out", "{ro}/x.nrrd"), match="is not writable"),
    Case("simulate-out-below-a-file", SIM + ("--out", "{file}/x.nrrd"), match="is a file, not a folder"),
    Case("demo-out-is-a-file", ("demo", "--quiet", "--out", "{file}"), match="is a file, not a folder"),
    Case("demo-out-read-only", ("demo", "--quiet", "--out", "{ro}/demo"), match="is not writable"),
    Case("phantom-out-is-a-file", ("phantom", "--out", "{file}"), match="is a file, not a folder"),
    Case("train-out-read-only", TRAIN + ("--out", "{ro}/m"), match="is not writable"),
    Case("api-write-pose-read-only", api=lambda P: write_pose_json(P.truth, P.ro / "p.json"), expect=OutputError,
         match="is not writable", read_only=True),
    Case("api-write-xray-below-a-file", api=lambda P: write_xray(P.image, P.file / "x.nrrd", camera=CAMERA),
         expect=OutputError, match="is a file, not a folder"),
    Case("api-write-ct-onto-a-folder", api=lambda P: write_ct(P.volume, P.out), expect=OutputError, match="is a folder"),
    Case("api-write-ct-as-png", api=lambda P: write_ct(P.volume, P.out / "ct.png"), expect=OutputError,
         match="SimpleITK failed"),
    Case("api-later-output-fails", api=_staged_then_failed, prepare=_old_file, expect=RuntimeError,
         match="later output failed"),
    Case("api-interrupted-write", api=_interrupted_write, prepare=_old_file, expect=KeyboardInterrupt),
    # ---- training and demo options ------------------------------------------------------------------
    Case("train-batch-size-0", TRAIN + ("--out", "{out}/m", "--batch-size", "0"), match="batch_size"),
    Case("train-steps-0", TRAIN[:-3] + ("--quiet", "--steps", "0", "--out", "{out}/m"), match="steps must be"),
    Case("train-lr-0", TRAIN + ("--out", "{out}/m", "--lr", "0"), match="learning rate"),
    Case("train-lr-nan", TRAIN + ("--out", "{out}/m", "--lr", "nan"), match="finite number"),
    Case("train-phantom-seed-text", ("train", "--ct", "phantom:abc", "--out", "{out}/m", "--quiet"),
         match="seed must be a whole number"),
    Case("train-resume-nothing", TRAIN + ("--out", "{out}/m", "--resume"), match="holds no trained model"),
    Case("train-resume-and-overwrite", TRAIN + ("--out", "{in}/model", "--resume", "--overwrite"), match="not both"),
    Case("train-threads-0", TRAIN + ("--out", "{out}/m", "--threads", "0"), match="threads must be"),
    Case("train-labels-count", TRAIN + ("--out", "{out}/m", "--labels", "{in}/ct.nrrd", "--labels", "{in}/ct.nrrd"),
         match="one --labels per --ct"),
    Case("api-train-batch-size-0", api=lambda P: _train(P, batch_size=0), expect=ValueError, match="batch_size"),
    Case("api-train-constant-ct", api=_train_constant, expect=ValueError, match="no structure"),
    Case("demo-seed-negative", ("demo", "--quiet", "--seed", "-1", "--out", "{out}/demo"), match="--seed must be 0 or more"),
    Case("demo-threads-negative", ("demo", "--quiet", "--threads", "-2", "--out", "{out}/demo"), match="threads must be"),
    Case("phantom-spacing-0", ("phantom", "--out", "{out}/ph", "--spacing", "0"), match="--spacing must lie"),
    Case("phantom-spacing-inf", ("phantom", "--out", "{out}/ph", "--spacing", "inf"), match="finite number"),
    # ---- register options ----------------------------------------------------------------------------
    Case("register-sod-0", REG_NOINIT + ("--sod", "0", "--output", "{out}/p.json"), match="--sod must lie between 0"),
    Case("register-sod-beyond-detector", REG_NOINIT + ("--sod", "5000", "--output", "{out}/p.json"), match="--sod must lie"),
    Case("register-sod-nan", REG_NOINIT + ("--sod", "nan", "--output", "{out}/p.json"), match="finite number"),
    Case("register-sod-with-init", reg("--sod", "600"), match="drop one"),
    Case("register-targets-without-truth", reg("--targets", "{in}/landmarks.csv"), match="go together"),
    Case("register-cuda-missing", reg("--device", "cuda"), match="CUDA", marks=(NO_CUDA,)),
    Case("register-camera-garbage", reg("--camera", "{in}/garbage.json"), match="not valid JSON"),
    Case("register-camera-binary", reg("--camera", "{in}/binary.json"), match="not a text file"),
    Case("register-camera-negative-sdd", reg("--camera", "{in}/negsdd.camera.json"), match="sdd"),
    Case("register-init-nonrigid", reg(init="nonrigid.json"), match="rigid"),
    Case("register-init-is-a-folder", reg(init="model"), match="is a folder"),
    Case("register-pixel-spacing-0", reg("--pixel-spacing", "0", "0"), match="pixel spacing"),
    Case("register-network-model-file", reg("--method", "network", "--model", "{in}/model/model.safetensors"),
         match="is a file, not a model directory"),
    Case("register-pickled-model", reg("--method", "network", "--model", "{in}/pickled"), match="pickled"),
    Case("register-threads-0", reg("--threads", "0"), match="threads must be"),
    Case("api-register-camera-none", api=lambda P: register(P.volume, P.image, None, P.truth), expect=ValueError,
         match="camera geometry"),
    Case("api-load-model-file", api=lambda P: load_model(P.dir / "model" / "model.safetensors"), expect=ValueError,
         match="is a file, not a model directory"),
    Case("api-load-model-missing", api=lambda P: load_model(P.dir / "no-model"), expect=ValueError, match="does not exist"),
    Case("api-load-model-cuda", api=lambda P: load_model(P.dir / "model", device="cuda"), expect=ValueError,
         match="CUDA", marks=(NO_CUDA,)),
    # ---- CT files: truncated, corrupt, oversized, without structure ----------------------------------
    Case("register-ct-truncated-nii-gz", reg(ct="trunc_ct.nii.gz"), match="truncated or corrupt"),
    Case("register-ct-truncated-nii", reg(ct="trunc_ct.nii"), match="truncated"),
    Case("register-ct-truncated-nrrd", reg(ct="trunc_ct.nrrd"), match="truncated"),
    Case("register-ct-truncated-gzip-nrrd", reg(ct="trunc_ctgz.nrrd"), match="truncated"),
    Case("register-ct-truncated-mha", reg(ct="trunc_ct.mha"), match="truncated"),
    Case("register-ct-truncated-zlib-mha", reg(ct="trunc_ctz.mha"), match="truncated"),
    Case("register-ct-corrupt-nii-gz", reg(ct="corrupt.nii.gz"), match="corrupt"),
    Case("register-ct-data-file-missing", reg(ct="noraw.mhd"), match="gone.raw, which is missing"),
    Case("register-ct-huge-header-nrrd", reg(ct="huge.nrrd"), match="100000 x 100000 x 100000 voxels"),
    Case("register-ct-huge-header-mha", reg(ct="huge.mha"), match="header is wrong"),
    Case("register-ct-huge-header-nii-gz", reg(ct="huge.nii.gz"), match="30000 x 30000 x 30000"),
    Case("register-ct-constant", reg(ct="constant.nrrd"), match="has no structure: every voxel is 0 HU"),
    Case("register-ct-all-air", reg(ct="air.nrrd"), match="holds only air"),
    Case("register-ct-2x2x2", reg(ct="tiny.nrrd"), match="only 2 x 2 x 2 voxels"),
    Case("register-ct-is-2d", reg(ct="xray2d.nii.gz"), match="2D image"),
    Case("register-ct-nan", reg(ct="nan.nrrd"), match="NaN"),
    Case("register-ct-empty-file", reg(ct="empty.nrrd"), match="cannot read CT"),
    Case("register-ct-is-json", reg(ct="truth.json"), match="cannot read CT"),
    Case("register-ct-dicom-slice-truncated", reg(ct="dicom_gap"), match="unevenly spaced slices"),
    Case("api-read-ct-dicom-slice-truncated", api=lambda P: read_ct(P.dir / "dicom_gap"), expect=ValueError,
         match="a slice is missing, unreadable"),
    Case("register-ct-folder-without-dicom", reg(ct="nodicom"), match="no DICOM series"),
    Case("register-ct-missing", reg(ct="nothere.nrrd"), match="not found"),
    Case("simulate-ct-truncated", ("simulate", "--ct", "{in}/trunc_ct.nii.gz", "--camera", "{in}/geom.camera.json",
                                   "--pose", "{in}/truth.json", "--out", "{out}/x.nrrd"), match="truncated"),
    Case("train-ct-all-air", ("train", "--ct", "{in}/air.nrrd", "--out", "{out}/m", "--quiet"), match="holds only air"),
    Case("api-read-ct-truncated", api=lambda P: read_ct(P.dir / "trunc_ct.nii.gz"), expect=ValueError, match="truncated"),
    Case("api-read-ct-constant", api=lambda P: read_ct(P.dir / "constant.nrrd"), expect=ValueError, match="no structure"),
    Case("api-read-ct-huge", api=lambda P: read_ct(P.dir / "huge.nrrd"), expect=ValueError, match="header is wrong"),
    # ---- X-ray files -----------------------------------------------------------------------------------
    Case("register-xray-truncated-jpeg", reg(xray="trunc_xray.jpg"), match="truncated"),
    Case("register-xray-truncated-nii-gz", reg(xray="trunc_xray.nii.gz"), match="truncated"),
    Case("register-xray-blank", reg(xray="blank.nrrd"), match="blank"),
    Case("register-xray-is-the-ct", reg(xray="ct.nrrd"), match="3D"),
    Case("register-xray-without-geometry", reg(xray="plain.png"), match="missing source-to-detector distance"),
    Case("api-read-xray-truncated", api=lambda P: read_xray(P.dir / "trunc_xray.jpg", require_camera=False),
         expect=ValueError, match="truncated"),
    Case("register-xray-bone-dark", reg("--json", "--targets", "{in}/landmarks.csv", "--truth", "{in}/truth.json",
                                        xray="dark.nrrd"), check=_not_silently_wrong),
    Case("register-xray-bone-dark-forced-bright", reg("--json", "--targets", "{in}/landmarks.csv", "--truth",
                                                      "{in}/truth.json", "--polarity", "bright", xray="dark.nrrd"),
         check=_not_silently_wrong),
    # ---- simulate: empty renders and camera flags ------------------------------------------------------
    Case("simulate-inverse-pose", SIM[:-1] + ("{in}/inverse.json", "--out", "{out}/x.nrrd"), match="pose looks inverted"),
    Case("simulate-behind-source", SIM[:-1] + ("{in}/behind.json", "--out", "{out}/x.nrrd"),
         match="behind the X-ray source"),
    Case("simulate-out-of-view", SIM[:-1] + ("{in}/outside.json", "--out", "{out}/x.nrrd"),
         match="outside the field of view"),
    Case("simulate-beyond-detector", SIM[:-1] + ("{in}/beyond.json", "--out", "{out}/x.nrrd"),
         match="beyond the detector"),
    Case("simulate-principal-point-far", ("simulate", "--ct", "{in}/ct.nrrd", "--camera", "{in}/farpp.camera.json",
                                          "--pose", "{in}/truth.json", "--out", "{out}/x.nrrd"),
         match=r"principal point \(5000, 5000\) px lies far off"),
    Case("simulate-principal-point-flag-wins", SIM + ("--principal-point", "5000", "5000", "--out", "{out}/x.nrrd"),
         match=r"principal point \(5000, 5000\)"),
    Case("simulate-camera-missing", ("simulate", "--ct", "{in}/ct.nrrd", "--pose", "{in}/truth.json", "--sdd", "1000",
                                     "--out", "{out}/x.nrrd"), match=r"camera geometry is missing \(--pixel-spacing, --size\)"),
    Case("simulate-blur-negative", SIM + ("--blur-mm", "-1", "--out", "{out}/x.nrrd"), match="blur_mm"),
    Case("simulate-pose-nan", SIM[:-1] + ("{in}/nanpose.json", "--out", "{out}/x.nrrd"), match="NaN"),
    Case("simulate-principal-point-nan", ("simulate", "--ct", "{in}/ct.nrrd", "--camera", "{in}/nanpp.camera.json",
                                          "--pose", "{in}/truth.json", "--out", "{out}/x.nrrd"), match="NaN"),
    Case("simulate-dose-0", SIM + ("--dose", "0", "--out", "{out}/x.nrrd"), match="dose"),
    Case("simulate-sdd-nan", SIM + ("--sdd", "nan", "--out", "{out}/x.nrrd"), match="finite number"),
    Case("api-simulate-all-air-volume", api=lambda P: simulate_xray(_air_volume(), CAMERA, P.truth), expect=ValueError,
         match="holds only air"),
    Case("api-simulate-inverse-pose", api=lambda P: simulate_xray(P.volume, CAMERA, invert_pose(P.truth)),
         expect=ValueError, match="pose looks inverted"),
    # ---- poses, cameras, targets -----------------------------------------------------------------------
    Case("api-read-pose-garbage", api=lambda P: read_pose_json(P.dir / "garbage.json"), expect=ValueError,
         match="not valid JSON"),
    Case("api-read-camera-negative-sdd", api=lambda P: read_camera_json(P.dir / "negsdd.camera.json"),
         expect=ValueError, match="sdd must be a positive"),
    Case("register-targets-short-position", reg("--targets", "{in}/short.mrk.json", "--truth", "{in}/truth.json"),
         match=r"control point 'L1'.* expected three numbers"),
    Case("api-targets-markups-not-objects", api=lambda P: read_targets(P.dir / "notdict.mrk.json"), expect=ValueError,
         match="markup 1 is not an object"),
    Case("api-targets-fcsv-text-coordinate", api=lambda P: read_targets(P.dir / "text.fcsv"), expect=ValueError,
         match=r"line 3 .* expected three numbers"),
    Case("api-targets-fcsv-short-row", api=lambda P: read_targets(P.dir / "shortrow.fcsv"), expect=ValueError,
         match="expected three numbers"),
    Case("api-targets-csv-text-coordinate", api=lambda P: read_targets(P.dir / "text.csv"), expect=ValueError,
         match="does not hold three numbers"),
    Case("api-targets-binary", api=lambda P: read_targets(P.dir / "binary.csv"), expect=ValueError,
         match="not a text file"),
]


# ------------------------------------------------------------------------------------------------
# The runner


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return out


def _make_read_only(folder: Path) -> None:
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return
    (folder / "probe").unlink()  # root ignores permissions: make the folder immutable instead
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder here (root without chattr)")


def _undo_read_only(folder: Path) -> None:
    if folder.exists():
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        os.chmod(folder, 0o755)


def _fill(arg: str, paths: dict[str, str]) -> str:
    for key, value in paths.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def test_the_table_is_large_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, P, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "afile.txt").write_text("a regular file\n")
    ro = out / "readonly"
    if case.read_only or any("{ro}" in a for a in case.cli or ()):
        _make_read_only(ro)
    if case.prepare:
        case.prepare(out, P.dir)
    inputs_before, outputs_before = _snapshot(P.dir), _snapshot(out)
    paths = {"in": str(P.dir), "out": str(out), "ro": str(ro), "file": str(out / "afile.txt")}
    try:
        if case.cli is not None:
            try:
                code = main([_fill(a, paths) for a in case.cli])
            except SystemExit as stop:  # argparse refuses the value
                code = stop.code
            captured = capsys.readouterr()
            if case.check is not None:
                assert case.check(code, captured.out, captured.err), captured.err
            else:
                assert code == case.expect, captured.err
                assert re.search(case.match, captured.err), captured.err
                assert "Traceback" not in captured.err
        else:
            ns = SimpleNamespace(**vars(P), out=out, ro=ro, file=out / "afile.txt")
            with pytest.raises(case.expect, match=case.match or None):
                case.api(ns)
    finally:
        _undo_read_only(ro)
    assert _snapshot(P.dir) == inputs_before, "an input file changed"
    if case.check is None:
        assert _snapshot(out) == outputs_before, "the failed run left or changed files"
    leftovers = [p for p in list(P.dir.rglob(".corrreg-*")) + list(out.rglob(".corrreg-*"))]
    assert not leftovers, leftovers


def test_staged_outputs_appear_together_on_commit_only(P, tmp_path):
    """OutputSet: nothing changes before commit (the old file stays, no new folder); commit moves
    every staged file, side-cars and detached data files included, and leaves no staging folder;
    abort removes what was staged and the folders made for it."""
    old = tmp_path / "pose.json"
    old.write_text('{"old": true}\n')
    outputs = OutputSet()
    write_pose_json(P.truth, outputs.path(old))
    write_xray(P.image, outputs.path(tmp_path / "sub" / "drr.mhd"), camera=CAMERA)
    assert old.read_text() == '{"old": true}\n'
    assert not list((tmp_path / "sub").glob("drr*"))
    outputs.commit()
    assert torch.equal(read_pose_json(old), P.truth)
    back = read_xray(tmp_path / "sub" / "drr.mhd")  # header, drr.raw and drr.camera.json moved together
    assert back.camera == CAMERA and torch.equal(back.image, P.image)
    assert not list(tmp_path.rglob(".corrreg-*"))
    outputs = OutputSet()
    write_pose_json(P.truth, outputs.path(tmp_path / "new" / "deeper" / "p.json"))
    outputs.abort()
    assert not (tmp_path / "new").exists() and not list(tmp_path.rglob(".corrreg-*"))


def test_an_interrupted_register_leaves_the_old_outputs(P, tmp_path):
    """SIGINT (Ctrl-C) while `corrreg register` runs: exit 130, the previous pose JSON and DRR are
    untouched, nothing staged is left behind."""
    import signal
    import sys
    import time

    _old_file(tmp_path, P.dir)
    old_drr = write_xray(P.image, tmp_path / "drr.nrrd", camera=CAMERA)
    before = _snapshot(tmp_path)
    cmd = [sys.executable, "-m", "CorrRegLib.cli", "register", "--ct", str(P.dir / "ct.nrrd"), "--xray",
           str(P.dir / "xray.nrrd"), "--init", str(P.dir / "init.json"), "--method", "cmaes", "--threads", "1",
           "--output", str(tmp_path / "pose.json"), "--drr", str(old_drr)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen, deadline = "", time.monotonic() + 120
    while "register (" not in seen and time.monotonic() < deadline:  # the progress bar: registration runs
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _snapshot(tmp_path) == before
    assert not list(tmp_path.rglob(".corrreg-*"))
