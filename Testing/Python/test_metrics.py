"""Accuracy metrics of DESIGN.md against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from CorrRegLib import metrics as m
from CorrRegLib.geometry import Camera, euler_to_rotation, make_pose, reference_ap_pose

TARGETS = torch.tensor([[10.0, 0.0, 0.0], [-10.0, 0.0, 0.0], [0.0, 20.0, 5.0]], dtype=torch.float64)


def shifted(pose, dx=0.0, dy=0.0, dz=0.0):
    out = pose.clone()
    out[:3, 3] += torch.tensor([dx, dy, dz], dtype=torch.float64)
    return out


def test_mtre_of_a_translation_and_a_rotation():
    truth = reference_ap_pose(torch.zeros(3, dtype=torch.float64), 700.0)
    assert float(m.mtre(truth, truth, TARGETS)) == 0.0
    assert float(m.mtre(shifted(truth, 3.0, 4.0), truth, TARGETS)) == pytest.approx(5.0)
    # a 90 degree turn about the camera z axis through the origin moves (10,0,0)-like points by
    # |p| * sqrt(2) in the plane normal to z
    rot = make_pose(euler_to_rotation(torch.tensor([0.0, 0.0, 90.0], dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    est = truth.clone()
    est[:3, :3] = rot[:3, :3] @ truth[:3, :3]
    est[:3, 3] = rot[:3, :3] @ truth[:3, 3]
    cam_pts = TARGETS @ truth[:3, :3].T + truth[:3, 3]
    expected = np.mean([math.hypot(float(p[0]), float(p[1])) * math.sqrt(2) for p in cam_pts])
    assert float(m.mtre(est, truth, TARGETS)) == pytest.approx(expected)
    # batched
    both = torch.stack([truth, shifted(truth, 0, 0, 6.0)])
    assert torch.allclose(m.mtre(both, truth, TARGETS), torch.tensor([0.0, 6.0], dtype=torch.float64))


def test_mpd_sees_in_plane_shifts_magnified_and_depth_barely():
    cam = Camera(1000.0, (1.0, 1.0), (64, 64))
    truth = reference_ap_pose(torch.zeros(3, dtype=torch.float64), 500.0)
    pts = torch.zeros(1, 3, dtype=torch.float64)  # at the isocenter, on the principal ray
    # 2 mm in plane at depth 500 appears as 2 * 1000 / 500 = 4 mm on the detector
    assert float(m.mpd(cam, shifted(truth, 2.0), truth, pts)) == pytest.approx(4.0)
    # a point on the principal ray stays on it whatever its depth
    assert float(m.mpd(cam, shifted(truth, 0, 0, 50.0), truth, pts)) == pytest.approx(0.0, abs=1e-9)


def test_rotation_and_isocenter_translation_errors():
    iso = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    truth = reference_ap_pose(iso, 700.0)
    rot = euler_to_rotation(torch.tensor([0.0, 12.0, 0.0], dtype=torch.float64))
    est = truth.clone()
    est[:3, :3] = rot @ truth[:3, :3]
    est[:3, 3] = rot @ truth[:3, 3]
    est = shifted(est, 1.0, 0.0, 0.0)
    ang, shift = m.rotation_translation_error(est, truth, iso)
    assert float(ang) == pytest.approx(12.0)
    # the isocenter sits at (0, 0, 700) in the camera: a 12 degree turn about y through the source
    # moves it by 2 * 700 * sin(6 deg), then the 1 mm shift along x
    moved = np.array([700 * math.sin(math.radians(12)) + 1.0, 0.0, 700 * math.cos(math.radians(12)) - 700])
    assert float(shift) == pytest.approx(np.linalg.norm(moved))


def test_success_rates_top_fraction_and_percentiles():
    errors = [0.5, 1.5, 3.0, 12.0, 0.9, 1.0, 8.0, 25.0, 0.2, 2.0]
    sr = m.success_rates(errors)
    assert sr == {10.0: 0.8, 2.0: 0.5, 1.0: 0.3}  # strictly below each threshold
    mean50, std50 = m.top_fraction_stats(errors, 0.5)
    best = sorted(errors)[:5]
    assert mean50 == pytest.approx(np.mean(best)) and std50 == pytest.approx(np.std(best))
    assert m.top_fraction_stats(errors, 0.95)[0] == pytest.approx(np.mean(sorted(errors)[:10]))
    p = m.percentiles(errors)
    assert p[50] == pytest.approx(np.percentile(errors, 50))
    assert p[95] == pytest.approx(np.percentile(errors, 95))
    assert math.isnan(m.success_rates([])[2.0])


def test_capture_range_bins_and_threshold():
    initial = [2, 5, 8, 12, 15, 18, 22, 25, 28, 35]
    final = [0.1, 0.3, 0.2, 0.5, 1.0, 0.4, 0.9, 5.0, 0.3, 9.0]
    bins, captured = m.capture_range(initial, final, bin_mm=10.0, success_mm=2.0, required_rate=0.95)
    assert [b["cases"] for b in bins] == [3, 3, 3, 1]
    assert [b["success_rate"] for b in bins] == [1.0, 1.0, pytest.approx(2 / 3), 0.0]
    # every case below 20 mm succeeds; below 30 mm only 8 of 9 do (89% < 95%)
    assert captured == 20.0
    with pytest.raises(ValueError):
        m.capture_range([1, 2], [1])
    # no case starts below 30 mm (paper-protocol runs): empty leading bins do not end the range
    bins, captured = m.capture_range([35, 42, 58, 71], [0.5, 0.4, 0.9, 30.0])
    assert [b["cases"] for b in bins[:3]] == [0, 0, 0]
    assert captured == 70.0  # every case starting below 70 mm succeeds; the one at 71 mm fails


def test_summary_fields():
    s = m.summarize([20.0, 30.0, 40.0, 50.0], [0.5, 1.5, 3.0, 12.0])
    assert s["cases"] == 4
    assert (s["sr_10mm"], s["sr_2mm"], s["sr_1mm"]) == (0.75, 0.5, 0.25)
    assert s["mtre_top50_mean"] == pytest.approx(1.0)
    assert s["initial_mtre_median"] == pytest.approx(35.0)
