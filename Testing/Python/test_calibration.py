"""Cameras from intrinsic matrices and calibration files (MayaCam 2.0, OpenCV YAML / JSON, CorrReg
JSON), each convention pinned by a point projected by hand through K [R | t]."""

import json
import math

import numpy as np
import pytest
import torch

from CorrRegLib.geometry import Camera, NOMINAL_PIXEL_SPACING_MM, project_points
from CorrRegLib.io import read_camera_json, read_xray, write_camera_json, write_xray
from CorrRegLib.io._filestorage import parse_filestorage_yaml
from CorrRegLib.io.calibration import Calibration, read_calibration, write_calibration

# A camera in OpenCV's convention (pixel centres at integers), world-to-camera R, t in mm.
K_CV = np.array([[6167.35342293, 0.0, 803.741292437], [0.0, 6165.63244754, 865.698104164], [0.0, 0.0, 1.0]])
R = np.array(
    [
        [0.792589225007, -0.0592057161733, -0.606874784099],
        [0.0545361218268, 0.998169197702, -0.0261546205154],
        [0.607312219389, -0.0123667267546, 0.794367000982],
    ]
)
T = np.array([-16.6293306327, -77.8355084182, 901.390251307])
SIZE = (1760, 1720)  # W, H: not square, so the order is tested
POINTS = np.array([[12.0, -30.0, 40.0], [-55.5, 20.25, -10.0], [0.0, 0.0, 0.0], [80.0, 95.0, 60.0]])


def by_hand_corrreg_pixels(points: np.ndarray) -> np.ndarray:
    """u = fx x / z + cx (+ 0.5 from OpenCV's integer pixel centres to CorrReg's)."""
    out = []
    for X in points:
        x, y, z = R @ X + T
        out.append([K_CV[0, 0] * x / z + K_CV[0, 2] + 0.5, K_CV[1, 1] * y / z + K_CV[1, 2] + 0.5])
    return np.array(out)


def corrreg_pixels(cal: Calibration, points: np.ndarray) -> np.ndarray:
    return project_points(cal.camera, cal.camera_from_world, torch.as_tensor(points, dtype=torch.float64)).numpy()


def write_mayacam(path, size=SIZE, k=K_CV, r=R, t=T):
    rows = lambda m: "\n".join(",".join(repr(float(v)) for v in row) for row in m)
    path.write_text(
        f"image size\n{size[0]},{size[1]}\n\ncamera matrix\n{rows(k)}\n\nrotation\n{rows(r)}\n\n"
        f"translation\n" + "\n".join(repr(float(v)) for v in t) + "\n"
    )
    return path


def opencv_matrix_yaml(name, m):
    m = np.atleast_2d(m)
    data = ", ".join(repr(float(v)) for v in m.reshape(-1))
    return f"{name}: !!opencv-matrix\n   rows: {m.shape[0]}\n   cols: {m.shape[1]}\n   dt: d\n   data: [ {data} ]\n"


def write_opencv_yaml(path, rotation="R"):
    text = f"%YAML:1.0\n---\nimage_width: {SIZE[0]}\nimage_height: {SIZE[1]}\n" + opencv_matrix_yaml("camera_matrix", K_CV)
    text += opencv_matrix_yaml("distortion_coefficients", np.zeros((5, 1)))
    if rotation == "R":
        text += opencv_matrix_yaml("R", R)
    else:
        import roma

        rv = roma.rotmat_to_rotvec(torch.as_tensor(R)).numpy()
        text += opencv_matrix_yaml("rvec", rv.reshape(3, 1))
    text += opencv_matrix_yaml("tvec", T.reshape(3, 1))
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Camera.from_intrinsics


def test_from_intrinsics_gives_k_back_exactly_and_refuses_skew():
    k = K_CV.copy()
    k[:2, 2] += 0.5
    cam = Camera.from_intrinsics(k, SIZE)
    assert torch.equal(cam.intrinsics(), torch.as_tensor(k))
    assert cam.pixel_spacing[0] == NOMINAL_PIXEL_SPACING_MM and cam.sdd == k[0, 0]
    assert cam.sdd / cam.pixel_spacing[1] == pytest.approx(k[1, 1], rel=1e-12)
    # a known pixel size sets the physical scale only
    cam2 = Camera.from_intrinsics(k, SIZE, pixel_spacing=0.2)
    assert torch.equal(cam2.intrinsics(), torch.as_tensor(k)) and cam2.sdd == pytest.approx(0.2 * k[0, 0])
    with pytest.raises(ValueError, match="aspect"):
        Camera.from_intrinsics(k, SIZE, pixel_spacing=(0.2, 0.3))
    skewed = k.copy()
    skewed[0, 1] = 3.0
    with pytest.raises(ValueError, match="skew"):
        Camera.from_intrinsics(skewed, SIZE)
    with pytest.raises(ValueError, match="positive"):
        Camera.from_intrinsics(np.diag([-1000.0, 1000.0, 1.0]), SIZE)


def test_intrinsics_camera_downsamples_and_round_trips_json(tmp_path):
    cam = Camera.from_intrinsics([[2000.0, 0, 130.0], [0, 2100.0, 90.0], [0, 0, 1]], (256, 200))
    assert Camera.from_dict(cam.to_dict()) == cam
    write_camera_json(cam, tmp_path / "c.json")
    assert read_camera_json(tmp_path / "c.json") == cam
    c2 = cam.downsample(2)
    p = torch.tensor([[10.0, -20.0, 800.0]], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(project_points(c2, eye, p), project_points(cam, eye, p) / 2, atol=1e-9)
    # changing sdd behind the focal lengths' back is refused, not silently inconsistent
    from dataclasses import replace

    with pytest.raises(ValueError, match="focal_px"):
        replace(cam, sdd=cam.sdd * 2)


def test_camera_json_with_intrinsics_px_only(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"intrinsics_px": [[1500, 0, 64.5], [0, 1490, 60], [0, 0, 1]], "size_px": [128, 120]}))
    cam = read_camera_json(tmp_path / "c.json")
    assert torch.equal(cam.intrinsics(), torch.tensor([[1500, 0, 64.5], [0, 1490, 60], [0, 0, 1.0]], dtype=torch.float64))
    (tmp_path / "bad.json").write_text(json.dumps({"intrinsics_px": [[1500, 0, 64.5], [0, 1490, 60], [0, 0, 1]],
                                                   "size_px": [128, 120], "principal_point_px": [10, 10]}))
    with pytest.raises(ValueError, match="principal_point_px"):
        read_camera_json(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------
# conventions of the external formats


def test_mayacam_is_opencv_world_to_camera_with_pixel_centres_at_integers(tmp_path):
    cal = read_calibration(write_mayacam(tmp_path / "cam.txt"))
    assert cal.source == "mayacam-2.0" and cal.camera.size == SIZE
    np.testing.assert_allclose(corrreg_pixels(cal, POINTS), by_hand_corrreg_pixels(POINTS), atol=1e-9)
    # the source sits at -R^T t in the world, as Autoscoper places it
    np.testing.assert_allclose(cal.source_position_world().numpy(), -R.T @ T, atol=1e-9)


def test_mayacam_and_opencv_files_of_one_camera_project_alike(tmp_path):
    maya = read_calibration(write_mayacam(tmp_path / "cam.txt"))
    for rotation in ("R", "rvec"):
        cv = read_calibration(write_opencv_yaml(tmp_path / f"cam_{rotation}.yml", rotation))
        assert cv.source == "opencv-yaml"
        np.testing.assert_allclose(corrreg_pixels(cv, POINTS), corrreg_pixels(maya, POINTS), atol=1e-6)
        np.testing.assert_allclose(corrreg_pixels(cv, POINTS), by_hand_corrreg_pixels(POINTS), atol=1e-6)
    # OpenCV FileStorage JSON, and plain JSON lists with ROS-style keys
    fs_json = {
        "image_width": SIZE[0], "image_height": SIZE[1],
        "camera_matrix": {"type_id": "opencv-matrix", "rows": 3, "cols": 3, "dt": "d", "data": K_CV.reshape(-1).tolist()},
        "R": R.tolist(), "t": T.tolist(),
    }
    (tmp_path / "cam.json").write_text(json.dumps(fs_json))
    cvj = read_calibration(tmp_path / "cam.json")
    assert cvj.source == "opencv-json"
    np.testing.assert_allclose(corrreg_pixels(cvj, POINTS), by_hand_corrreg_pixels(POINTS), atol=1e-6)


def test_calibration_round_trips_through_corrreg_json_exactly(tmp_path):
    maya = read_calibration(write_mayacam(tmp_path / "cam.txt"))
    write_calibration(maya, tmp_path / "cal.json")
    back = read_calibration(tmp_path / "cal.json")
    assert back.source == "corrreg-json" and back.camera == maya.camera
    assert torch.equal(back.camera_from_world, maya.camera_from_world)
    d = json.loads((tmp_path / "cal.json").read_text())
    assert {"sdd_mm", "pixel_spacing_mm", "size_px", "intrinsics_px", "camera_from_world"} <= set(d)
    # the same file serves as an X-ray's camera JSON
    img = np.random.default_rng(0).random((SIZE[1], SIZE[0])).astype(np.float32)
    write_xray(img, tmp_path / "x.nrrd")
    xr = read_xray(tmp_path / "x.nrrd", camera_json=tmp_path / "cal.json")
    assert torch.equal(xr.camera.intrinsics(), maya.camera.intrinsics())


def test_image_size_is_checked_and_order_resolved(tmp_path):
    path = write_mayacam(tmp_path / "cam.txt")
    with pytest.raises(ValueError, match="1760 x 1720"):
        read_calibration(path, image_size=(1024, 1024))
    # Autoscoper's documentation writes "height,width": accepted when the image says so
    swapped = write_mayacam(tmp_path / "swapped.txt", size=(SIZE[1], SIZE[0]))
    with pytest.warns(UserWarning, match="height first"):
        cal = read_calibration(swapped, image_size=SIZE)
    assert cal.camera.size == SIZE


def test_clear_errors_for_bad_calibration_files(tmp_path):
    (tmp_path / "mc1.txt").write_text("-737.5,-514.9,94.3\n89.7,-2.0,-55.2\n3.9,4.1,-632.5\n840.2,839.2,-6325.8\n0.1,1760,1760\n")
    with pytest.raises(ValueError, match="MayaCam 1.0"):
        read_calibration(tmp_path / "mc1.txt")
    (tmp_path / "partial.txt").write_text("image size\n10,10\n\ncamera matrix\n1,0,5\n0,1,5\n0,0,1\n")
    with pytest.raises(ValueError, match="missing"):
        read_calibration(tmp_path / "partial.txt")
    mirrored = R.copy()
    mirrored[2] *= -1
    with pytest.raises(ValueError, match="mirror"):
        read_calibration(write_mayacam(tmp_path / "mirror.txt", r=mirrored))
    (tmp_path / "nok.yml").write_text("%YAML:1.0\nimage_width: 10\nimage_height: 10\n")
    with pytest.raises(ValueError, match="camera matrix"):
        read_calibration(tmp_path / "nok.yml")
    with pytest.raises(FileNotFoundError):
        read_calibration(tmp_path / "absent.txt")


def test_distortion_is_reported_and_metres_converted(tmp_path):
    text = write_opencv_yaml(tmp_path / "c.yml").read_text().replace("data: [ 0.0, 0.0, 0.0, 0.0, 0.0 ]", "data: [ 0.1, 0.0, 0.0, 0.0, 0.0 ]")
    (tmp_path / "d.yml").write_text(text.replace(repr(float(T[2])), repr(float(T[2] / 1000))).replace(
        repr(float(T[0])), repr(float(T[0] / 1000))).replace(repr(float(T[1])), repr(float(T[1] / 1000))))
    with pytest.warns(UserWarning, match="undistorted"):
        cal = read_calibration(tmp_path / "d.yml", unit_mm=1000.0)
    assert cal.distortion[0] == pytest.approx(0.1)
    np.testing.assert_allclose(cal.camera_from_world[:3, 3].numpy(), T, rtol=1e-12)


def test_filestorage_yaml_subset():
    d = parse_filestorage_yaml(
        "%YAML:1.0\n---\nname: \"cam # 1\"  # comment\nn: 3\nm: !!opencv-matrix\n  rows: 2\n  cols: 2\n  dt: d\n"
        "  data: [ 1., 2.,\n     3., 4. ]\nros:\n  camera_matrix:\n    rows: 1\n    data: [1, 2]\nlist:\n  - 1\n  - a: 2\n    b: [3, 4]\n"
    )
    assert d["name"] == "cam # 1" and d["n"] == 3
    np.testing.assert_array_equal(d["m"], [[1, 2], [3, 4]])
    assert d["ros"]["camera_matrix"]["data"] == [1, 2]
    assert d["list"] == [1, {"a": 2, "b": [3, 4]}]
    with pytest.raises(ValueError, match="never closed"):
        parse_filestorage_yaml("a: [1, 2\n")
