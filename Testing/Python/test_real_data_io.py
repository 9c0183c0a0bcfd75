"""CTs without geometry (multi-page TIFF, side-car, flags, convert-ct) and the per-X-ray flags of
corrreg register (--calibration, --intrinsics, --polarity, --mask)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from CorrRegLib.cli import build_parser, main
from CorrRegLib.cli_realdata import ct_geometry_from_args, read_view
from CorrRegLib.io import read_ct, read_ct_hu, write_xray
from CorrRegLib.io.ct_geometry import CTGeometry, ct_geometry_path, write_ct_geometry

SX, SY, SZ = 0.39625, 0.39625, 0.625


def write_tiff_stack(path, pages: int = 6, rows: int = 9, cols: int = 7) -> np.ndarray:
    """A 16-bit multi-page TIFF written by PIL (not SimpleITK): value = 1000 page + 10 row + col."""
    k, j, i = np.meshgrid(np.arange(pages), np.arange(rows), np.arange(cols), indexing="ij")
    vol = (1000 * k + 10 * j + i + 24).astype(np.uint16)
    frames = [Image.fromarray(vol[p]) for p in range(pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return vol


def test_multipage_tiff_pages_are_k_and_autoscoper_placement(tmp_path):
    vol = write_tiff_stack(tmp_path / "bone.tif")
    with pytest.warns(UserWarning, match="TIFF stack"):
        raw = read_ct_hu(tmp_path / "bone.tif")
    np.testing.assert_array_equal(raw.hu.numpy(), vol)  # (K, J, I) = (pages, rows, columns)
    geom = {"spacing_mm": [SX, SY, SZ], "placement": "autoscoper", "hu_offset": -1024}
    img = read_ct_hu(tmp_path / "bone.tif", geometry=geom)
    np.testing.assert_array_equal(img.hu.numpy(), vol.astype(np.float32) - 1024)
    assert img.spacing == (SX, SY, SZ)
    # voxel (column i, row j, page k) sits at (sx (i + .5), sy (H - j - .5), -sz (k + .5)), H = 9 rows
    v = read_ct(tmp_path / "bone.tif", geometry=geom)
    m = v.lps_from_index()
    for i, j, k in ((0, 0, 0), (6, 8, 5), (3, 2, 4)):
        p = (m @ torch.tensor([i, j, k, 1.0], dtype=torch.float64))[:3]
        assert torch.allclose(p, torch.tensor([SX * (i + 0.5), SY * (9 - j - 0.5), -SZ * (k + 0.5)], dtype=torch.float64))


def test_side_car_flags_and_flips(tmp_path):
    vol = write_tiff_stack(tmp_path / "bone.tif")
    write_ct_geometry(CTGeometry(spacing_mm=(1.0, 2.0, 3.0), origin_mm=(5.0, 6.0, 7.0), hu_offset=-24.0), ct_geometry_path(tmp_path / "bone.tif"))
    assert ct_geometry_path(tmp_path / "bone.tif").name == "bone.geometry.json"
    img = read_ct_hu(tmp_path / "bone.tif")  # the side-car is found and applied
    assert img.spacing == (1.0, 2.0, 3.0) and img.origin == (5.0, 6.0, 7.0)
    np.testing.assert_array_equal(img.hu.numpy(), vol.astype(np.float32) - 24)
    # flags override the side-car field by field; a flip reverses the page order
    args = build_parser().parse_args(["register", "--ct", str(tmp_path / "bone.tif"), "--xray", "x", "--output", "o",
                                      "--ct-spacing", "0.5", "0.5", "0.5", "--ct-flip", "0", "0", "1"])
    img = read_ct_hu(tmp_path / "bone.tif", geometry=ct_geometry_from_args(args))
    assert img.spacing == (0.5, 0.5, 0.5) and img.origin == (5.0, 6.0, 7.0)
    np.testing.assert_array_equal(img.hu.numpy(), vol[::-1].astype(np.float32) - 24)
    with pytest.raises(ValueError, match="orthonormal"):
        CTGeometry(direction=[[1, 0, 0], [0, 2, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="either placement"):
        CTGeometry(placement="autoscoper", origin_mm=(0, 0, 0))
    (tmp_path / "bad.json").write_text(json.dumps({"spacing": [1, 1, 1]}))
    with pytest.raises(ValueError, match="unknown keys"):
        read_ct_hu(tmp_path / "bone.tif", geometry=tmp_path / "bad.json")


def test_convert_ct_writes_geometry_and_never_overwrites_its_input(tmp_path, capsys):
    vol = write_tiff_stack(tmp_path / "bone.tif")
    out = tmp_path / "bone.nrrd"
    rc = main(["convert-ct", str(tmp_path / "bone.tif"), str(out), "--spacing", str(SX), str(SY), str(SZ),
               "--placement", "autoscoper", "--hu-offset", "-1024", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pixel_type"] == "int16" and report["direction"] == [[1, 0, 0], [0, -1, 0], [0, 0, -1]]
    img = sitk.ReadImage(str(out))
    assert img.GetSpacing() == pytest.approx((SX, SY, SZ)) and img.GetDirection() == pytest.approx((1, 0, 0, 0, -1, 0, 0, 0, -1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol.astype(np.int16) - 1024)
    assert read_ct_hu(out).origin == pytest.approx((SX / 2, SY * 8.5, -SZ / 2))
    before = (tmp_path / "bone.tif").read_bytes()
    assert main(["convert-ct", str(tmp_path / "bone.tif"), str(tmp_path / "bone.tif"), "--spacing", "1", "1", "1"]) == 2
    assert (tmp_path / "bone.tif").read_bytes() == before


def _mayacam(path, size=(64, 48)):
    path.write_text(f"image size\n{size[0]},{size[1]}\n\ncamera matrix\n1500,0,31.5\n0,1510,23.5\n0,0,1\n\n"
                    "rotation\n1,0,0\n0,1,0\n0,0,1\n\ntranslation\n0\n0\n800\n")
    return path


def test_register_view_flags(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((48, 64)) * 50 + 100).astype(np.float32)
    img[:, 40:] = 250.0  # bright flat air beside a darker body: bone dark
    write_xray(img, tmp_path / "x.nrrd")
    _mayacam(tmp_path / "cam.txt")
    parse = lambda *a: build_parser().parse_args(["register", "--ct", "c", "--xray", str(tmp_path / "x.nrrd"), "--output", "o", *a])
    view = read_view(parse("--calibration", str(tmp_path / "cam.txt"), "--mask", "none"), tmp_path / "x.nrrd")
    k = view.xray.camera.intrinsics()
    assert torch.equal(k, torch.tensor([[1500, 0, 32.0], [0, 1510, 24.0], [0, 0, 1]], dtype=torch.float64))
    assert view.info["calibration"]["source"] == "mayacam-2.0" and view.mask is None
    assert view.info["polarity"]["decision"] == "dark" and view.xray.metadata["polarity"]["inversion"] == "log"
    pose = torch.eye(4, dtype=torch.float64)
    pose[2, 3] = 50.0
    assert torch.allclose(torch.tensor(view.report(pose)["world_from_ct"], dtype=torch.float64)[2, 3], torch.tensor(-750.0, dtype=torch.float64))
    moved = read_view(parse("--calibration", str(tmp_path / "cam.txt"), "--principal-point", "30", "20", "--mask", "none"),
                      tmp_path / "x.nrrd")
    assert torch.equal(moved.xray.camera.intrinsics(), torch.tensor([[1500, 0, 30.0], [0, 1510, 20.0], [0, 0, 1]], dtype=torch.float64))
    forced = read_view(parse("--calibration", str(tmp_path / "cam.txt"), "--polarity", "bright", "--mask", "none"), tmp_path / "x.nrrd")
    np.testing.assert_array_equal(forced.xray.image.numpy(), img)
    # --intrinsics with a physical pixel size; conflicting flags are refused with the fix
    view = read_view(parse("--intrinsics", "1500", "1510", "32", "24", "--pixel-spacing", "0.2", "0.2", "--polarity", "bright",
                           "--mask", "none"), tmp_path / "x.nrrd")
    assert view.xray.camera.sdd == pytest.approx(300.0) and view.xray.camera.focal_px == (1500.0, 1510.0)
    with pytest.raises(ValueError, match="--sdd conflicts"):
        read_view(parse("--calibration", str(tmp_path / "cam.txt"), "--sdd", "1000"), tmp_path / "x.nrrd")
    _mayacam(tmp_path / "other.txt", size=(128, 128))
    with pytest.raises(ValueError, match="128 x 128"):
        read_view(parse("--calibration", str(tmp_path / "other.txt")), tmp_path / "x.nrrd")
    # a mask file
    m = np.zeros((48, 64), np.uint8)
    m[5:40, 5:60] = 1
    sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / "m.png"))
    view = read_view(parse("--calibration", str(tmp_path / "cam.txt"), "--mask", str(tmp_path / "m.png")), tmp_path / "x.nrrd")
    assert view.mask.sum() == 35 * 55 and view.info["fov_mask"]["mask"] == str(tmp_path / "m.png")
