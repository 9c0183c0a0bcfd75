"""Polarity: bone-dark images are found and inverted, bone-bright ones left alone; DICOM's
MONOCHROME1 and PresentationLUTShape INVERSE are applied once; -log beats a linear inversion
on a raw transmission image."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CorrRegLib import io
from CorrRegLib.geometry import Camera, c_arm_pose, reference_ap_pose
from CorrRegLib.phantom import small_phantom
from CorrRegLib.polarity import detect_polarity, invert_to_bone_bright, to_bone_bright
from CorrRegLib.preprocess import prepare_image
from CorrRegLib.projector import Projector
from CorrRegLib.protocols import PAPER_CAMERA
from CorrRegLib.similarity import gradient_ncc, ncc
from CorrRegLib.simulate import simulate_xray

WIDE = Camera(1011.7, (2.8, 2.8), (128, 128))  # the whole phantom in view, air beside it


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def phantom():
    return small_phantom(seed=0, spacing_mm=4.0)


@pytest.fixture(scope="module")
def images(phantom):
    out = {}
    for name, cam, (prim, sec) in (("narrow", PAPER_CAMERA.downsample(2), (180, 0)), ("wide", WIDE, (150, 10))):
        pose = c_arm_pose(phantom.volume.bone_center_lps(), 700.0, prim, sec)
        img = simulate_xray(phantom.volume, cam, pose, dose=1e4, seed=1).image.numpy().astype(np.float64)
        log = simulate_xray(phantom.volume, cam, pose, dose=1e4, seed=1, normalize=False).image.numpy().astype(np.float64)
        out[name] = {"bright": img, "inverted": 1.0 - img, "raw": np.exp(-log), "pose": pose, "camera": cam}
    return out


def test_simulated_images_and_their_inversions(images):
    # with air in view the air background decides, with high confidence
    w = images["wide"]
    assert detect_polarity(w["bright"]) [0] == "bright" and detect_polarity(w["bright"])[1]["confidence"] == "high"
    d, ev = detect_polarity(w["inverted"])
    assert d == "dark" and ev["confidence"] == "high"
    d, ev = detect_polarity(w["raw"])
    assert d == "dark" and ev["confidence"] == "high", ev
    # collimated to the body (no air): the quantum noise, growing with attenuation, decides
    n = images["narrow"]
    assert detect_polarity(n["bright"])[0] == "bright"
    d, ev = detect_polarity(n["inverted"])
    assert d == "dark" and ev["confidence"] == "medium" and ev["noise_trend"] <= -0.8


def test_the_mask_confines_the_evidence(images):
    # a collimated image: bright shutters must not be mistaken for anything once masked
    img = images["wide"]["bright"].copy()
    mask = np.zeros(img.shape, bool)
    mask[10:118, 15:113] = True
    img[~mask] = 1.0
    assert detect_polarity(img, mask)[0] == "bright"
    with pytest.raises(ValueError, match="shape"):
        detect_polarity(img, mask[:10])


def test_to_bone_bright_modes(images):
    raw = images["wide"]["raw"]
    out, inverted, ev = to_bone_bright(raw)
    assert inverted and ev["decision"] == "dark" and ev["inversion"] == "log"
    np.testing.assert_allclose(out.numpy(), invert_to_bone_bright(raw, transform="log").numpy())
    same, inverted, ev = to_bone_bright(raw, mode="bright")
    assert not inverted and np.array_equal(same.numpy(), raw.astype(np.float32))
    lin, inverted, ev = to_bone_bright(images["narrow"]["inverted"], mode="dark", transform="linear")
    np.testing.assert_allclose(lin.numpy(), images["narrow"]["bright"], atol=1e-6)
    # an inverted log image (noise falling with the grey level) is inverted linearly by "auto"
    assert to_bone_bright(images["narrow"]["inverted"])[2]["inversion"] == "linear"
    with pytest.raises(ValueError, match="polarity"):
        to_bone_bright(raw, mode="up")
    with pytest.raises(ValueError, match="negative"):
        invert_to_bone_bright(raw - 1.0, transform="log")


def test_log_inversion_beats_linear_on_a_raw_transmission_image(phantom):
    cam = PAPER_CAMERA.downsample(2)
    pose = reference_ap_pose(phantom.volume.bone_center_lps(), 700.0)
    drr = Projector(phantom.volume, cam)(pose.float())[0].reshape(1, 1, *cam.size[::-1])
    log = simulate_xray(phantom.volume, cam, pose, dose=1e4, seed=0, scatter=0.1, normalize=False).image
    raw8 = torch.round(torch.exp(-log) / torch.exp(-log).max() * 255)  # an 8-bit raw transmission image
    as_log = invert_to_bone_bright(raw8, transform="log")[None, None]
    as_lin = invert_to_bone_bright(raw8, transform="linear")[None, None]
    ncc_log, ncc_lin = float(ncc(as_log, drr)), float(ncc(as_lin, drr))
    assert ncc_log > 0.99 and ncc_log > ncc_lin + 0.03, (ncc_log, ncc_lin)
    assert float(gradient_ncc(as_log, drr)) > float(gradient_ncc(as_lin, drr)) + 0.1


def test_prepare_image_masks_then_inverts(images):
    raw = images["wide"]["raw"].copy()
    h, w = raw.shape
    vv, uu = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    disc = np.hypot(uu - 64, vv - 64) <= 60
    raw[~disc] = 0.0  # an intensifier's black surround
    bright, mask, inverted, info = prepare_image(raw)
    assert inverted and info["fov_mask"]["kind"] == "circle" and info["polarity"]["decision"] == "dark"
    assert not mask[~disc].any() and float(bright[torch.from_numpy(~mask)].abs().max()) == 0.0


def _dicom(path, arr, tags):
    img = sitk.GetImageFromArray(arr.astype(np.uint16))
    img.SetMetaData("0008|0060", "XA")
    img.SetMetaData("0018|1110", "1000")
    for k, v in tags.items():
        img.SetMetaData(k, v)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(path))
    w.Execute(img)
    return path


def test_dicom_display_hints_are_applied_once(tmp_path, images):
    bright = images["narrow"]["bright"]
    stored_dark = np.round((1.0 - bright) * 4000).astype(np.uint16)  # stored bone dark, displayed inverted
    m2 = _dicom(tmp_path / "m2.dcm", stored_dark, {"0018|1164": "0.8\\0.8"})
    data = m2.read_bytes()
    assert data.count(b"MONOCHROME2") == 1
    (tmp_path / "m1.dcm").write_bytes(data.replace(b"MONOCHROME2", b"MONOCHROME1"))
    xr = io.read_xray(tmp_path / "m1.dcm")
    assert xr.metadata["display_inverted"] and np.corrcoef(xr.image.numpy().ravel(), bright.ravel())[0, 1] > 0.999
    assert detect_polarity(xr.image)[0] == "bright"  # read as displayed: nothing more to invert
    inv = _dicom(tmp_path / "inv.dcm", stored_dark, {"0018|1164": "0.8\\0.8", "2050|0020": "INVERSE"})
    if b"INVERSE" not in inv.read_bytes():
        pytest.skip("this GDCM writer drops PresentationLUTShape")
    xr = io.read_xray(inv)
    assert xr.metadata["presentation_lut_shape"] == "INVERSE" and xr.metadata["display_inverted"]
    assert np.corrcoef(xr.image.numpy().ravel(), bright.ravel())[0, 1] > 0.999
    # the plain MONOCHROME2 file is bone dark as stored, and detected as such
    assert detect_polarity(io.read_xray(m2).image)[0] == "dark"
