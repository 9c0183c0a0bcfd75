"""The procedural spine phantom: determinism, HU, labels, landmarks and grid geometry."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from CorrRegLib.geometry import Camera, reference_ap_pose
from CorrRegLib.phantom import (
    DISC_LABEL_BASE,
    ILIUM_LABEL,
    RIB_LABEL,
    SACRUM_LABEL,
    VERTEBRA_LANDMARKS,
    make_spine_phantom,
    sample_hu,
    small_phantom,
)
from CorrRegLib.projector import Projector
from CorrRegLib.volume import hu_to_attenuation


@pytest.fixture(scope="module")
def ph():
    return small_phantom(seed=0)


def _centroid_lps(phantom, label: int) -> torch.Tensor:
    kji = (phantom.labels == label).nonzero().double().mean(0)
    m = phantom.volume.lps_from_index()
    return m[:3, :3] @ kji.flip(0) + m[:3, 3]


def _voxel_index(phantom, points: torch.Tensor) -> torch.Tensor:
    m = phantom.volume.index_from_lps()
    return (points @ m[:3, :3].T + m[:3, 3]).round().long()


def _rotation(rx_deg: float, rz_deg: float) -> np.ndarray:
    a, b = math.radians(rx_deg), math.radians(rz_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def test_deterministic_for_a_seed_and_different_across_seeds(ph):
    again = small_phantom(seed=0)
    assert torch.equal(ph.hu, again.hu)
    assert torch.equal(ph.labels, again.labels)
    assert torch.equal(ph.landmarks, again.landmarks)
    other = small_phantom(seed=1)
    assert other.hu.shape == ph.hu.shape
    assert (other.hu - ph.hu).abs().max() > 300  # bone moved somewhere
    assert (other.landmarks - ph.landmarks).norm(dim=-1).max() > 1.0
    assert other.landmark_names == ph.landmark_names


def test_geometry_default_grid_is_centred_on_the_origin(ph):
    k, j, i = ph.hu.shape
    assert (i, j, k) == (64, 64, 80)  # 160 x 160 x 200 mm at 2.5 mm
    assert ph.volume.spacing == (2.5, 2.5, 2.5)
    assert torch.allclose(ph.volume.center_lps(), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # The spine's bone centre sits near the middle of the box (slightly posterior: the arches).
    bc = ph.volume.bone_center_lps()
    assert bc[0].abs() < 5 and bc[2].abs() < 10 and -10 < bc[1] < 20


def test_hu_ranges_and_attenuation(ph):
    hu = ph.hu
    assert hu.dtype == torch.float32
    assert float(hu.min()) == -1000.0
    assert float(hu[0, 0, 0]) == -1000.0 and float(hu[-1, -1, -1]) == -1000.0  # air in the corners
    assert float(hu.max()) > 700.0 and float(hu.max()) < 1500.0  # cortical bone
    soft = hu[(ph.labels == 0) & (hu > -500)]
    assert 0.0 < float(soft.median()) < 100.0  # muscle / organs
    assert int(((hu > -130) & (hu < -70)).sum()) > 1000  # a fat layer
    assert int((hu < -800)[ph.labels == 0].sum()) > 0
    # Cancellous bone inside the bodies is between fat-free soft tissue and cortical bone.
    centres = torch.stack([ph.landmark(f"{v}_body_center") for v in ph.vertebra_names])
    canc = sample_hu(ph, centres)
    assert bool(((canc > 150) & (canc < 400)).all())
    assert torch.allclose(ph.volume.data, hu_to_attenuation(hu))


def test_labels_one_per_vertebra_with_plausible_volume_and_centroid(ph):
    assert ph.vertebra_names == ["L1", "L2", "L3", "L4", "L5"]
    present = set(ph.labels.unique().tolist())
    assert present == {0, 1, 2, 3, 4, 5, 21, 22, 23, 24}
    assert ph.label_names[1] == "L1" and ph.label_names[5] == "L5"
    assert ph.label_names[DISC_LABEL_BASE + 3] == "L3-L4 disc"
    voxel_ml = float(np.prod(ph.volume.spacing)) / 1000.0
    prev_z = math.inf
    for v, name in enumerate(ph.vertebra_names, start=1):
        vol_ml = int((ph.labels == v).sum()) * voxel_ml
        assert 15.0 < vol_ml < 80.0, (name, vol_ml)
        c = _centroid_lps(ph, v)
        body = ph.landmark(f"{name}_body_center")
        tip = ph.landmark(f"{name}_spinous_tip")
        assert abs(float(c[0] - body[0])) < 4.0 and abs(float(c[2] - body[2])) < 6.0, (name, c, body)
        # The posterior arch pulls the centroid behind the body centre, not beyond the spinous tip.
        assert float(body[1]) < float(c[1]) < float(tip[1])
        assert float(c[2]) < prev_z  # L1 on top, labels increase downwards
        prev_z = float(c[2])
    for d in range(1, 5):
        vol_ml = int((ph.labels == DISC_LABEL_BASE + d).sum()) * voxel_ml
        assert 3.0 < vol_ml < 30.0
    # Discs lie between their vertebrae.
    zc = [float(_centroid_lps(ph, v)[2]) for v in range(1, 6)]
    for d in range(1, 5):
        z = float(_centroid_lps(ph, DISC_LABEL_BASE + d)[2])
        assert zc[d] < z < zc[d - 1]


def test_landmarks_inside_the_volume_and_in_bone(ph):
    names = ph.landmark_names
    assert len(names) == 5 * len(VERTEBRA_LANDMARKS) == ph.landmarks.shape[0]
    assert ph.landmarks.dtype == torch.float64
    assert "L3_body_center" in names and "L3_spinous_tip" in names and "L5_left_pedicle" in names
    idx = _voxel_index(ph, ph.landmarks)
    k, j, i = ph.hu.shape
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor([i, j, k])).all())
    labels = ph.labels[idx[:, 2], idx[:, 1], idx[:, 0]]
    for name, lab in zip(names, labels.tolist()):
        assert lab == ph.vertebra_names.index(name.split("_")[0]) + 1, (name, lab)
    assert bool((sample_hu(ph, ph.landmarks) > 150).all())


def test_anatomical_orientation_in_lps(ph):
    for v in ph.vertebra_names:
        body, tip = ph.landmark(f"{v}_body_center"), ph.landmark(f"{v}_spinous_tip")
        left, right = ph.landmark(f"{v}_left_pedicle"), ph.landmark(f"{v}_right_pedicle")
        assert tip[1] - body[1] > 40  # spinous process posterior (+y)
        assert tip[2] < body[2]  # ... and pointing inferiorly
        assert left[0] - right[0] > 15  # patient left is +x
        assert ph.landmark(f"{v}_left_transverse_tip")[0] > left[0] + 10
    assert ph.landmark("L1_body_center")[2] - ph.landmark("L5_body_center")[2] > 100  # superior = +z
    # Lordosis: L3 lies anterior of the line through L1 and L5.
    l1, l3, l5 = (ph.landmark(f"L{i}_body_center") for i in (1, 3, 5))
    assert float(l3[1]) < float((l1[1] + l5[1]) / 2) - 2.0


def test_not_mirror_symmetric(ph):
    """Left-right and top-bottom flips must not match, or poses would be ambiguous."""
    bone = (ph.hu > 300).float()
    overlap_lr = float((bone * bone.flip(2)).sum() / bone.sum())
    overlap_si = float((bone * bone.flip(0)).sum() / bone.sum())
    assert overlap_lr < 0.9 and overlap_si < 0.6


def test_spacing_changes_shape_not_physical_extent(ph):
    coarse = make_spine_phantom(spacing_mm=3.2, seed=0)
    aniso = make_spine_phantom(spacing_mm=(2.0, 2.5, 3.0), seed=0)
    assert coarse.hu.shape != ph.hu.shape and aniso.hu.shape not in (ph.hu.shape, coarse.hu.shape)
    for p in (ph, coarse, aniso):
        k, j, i = p.hu.shape
        extent = np.array([i, j, k]) * np.array(p.volume.spacing)
        assert np.all(np.abs(extent - np.array([160.0, 160.0, 200.0])) <= np.array(p.volume.spacing) / 2 + 1e-9)
        assert torch.allclose(p.volume.center_lps(), torch.zeros(3, dtype=torch.float64), atol=1e-9)
        assert torch.equal(p.landmarks, ph.landmarks)
    for v in range(1, 6):
        c0 = _centroid_lps(ph, v)
        for p in (coarse, aniso):
            assert float((_centroid_lps(p, v) - c0).norm()) < max(p.volume.spacing), v


def test_oblique_direction_samples_the_same_anatomy(ph):
    direction = _rotation(12.0, 25.0)
    ob = make_spine_phantom(spacing_mm=2.5, size_mm=(190.0, 190.0, 220.0), seed=0, direction=direction)
    assert np.allclose(np.array(ob.volume.direction), direction)
    assert torch.allclose(ob.volume.center_lps(), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert torch.equal(ob.landmarks, ph.landmarks)  # anatomy is fixed in LPS
    idx = _voxel_index(ob, ob.landmarks)
    labels = ob.labels[idx[:, 2], idx[:, 1], idx[:, 0]]
    assert bool((labels >= 1).all() & (labels <= 5).all())
    assert bool((sample_hu(ob, ob.landmarks) > 150).all())
    # The grid really is oblique: the voxel index of a landmark differs from the axis-aligned one.
    assert (idx - _voxel_index(ph, ph.landmarks)).abs().max() > 3
    for v in range(1, 6):
        assert float((_centroid_lps(ob, v) - _centroid_lps(ph, v)).norm()) < 2.5
    # And the radiograph of either grid is the same picture.
    cam = Camera(1000.0, (3.0, 3.0), (48, 64))
    pose = reference_ap_pose([0.0, 0.0, 0.0], 700.0).float()
    a = Projector(ph.volume, cam)(pose).flatten()
    b = Projector(ob.volume, cam)(pose).flatten()
    ncc = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert ncc > 0.99


def test_center_and_options():
    shifted = make_spine_phantom(spacing_mm=4.0, center_lps=(10.0, -20.0, 300.0), seed=0, gas_pockets=0)
    base = make_spine_phantom(spacing_mm=4.0, seed=0, gas_pockets=0)
    assert torch.allclose(shifted.landmarks - base.landmarks,
                          torch.tensor([10.0, -20.0, 300.0], dtype=torch.float64).expand_as(base.landmarks))
    assert torch.allclose(shifted.volume.center_lps(), torch.tensor([10.0, -20.0, 300.0], dtype=torch.float64))
    assert torch.equal(shifted.hu, base.hu)

    full = make_spine_phantom(spacing_mm=3.0, ribs=True, pelvis=True, seed=0)
    present = set(full.labels.unique().tolist())
    assert {RIB_LABEL, SACRUM_LABEL, ILIUM_LABEL} <= present
    assert full.hu.shape[0] > base.hu.shape[0] * 4.0 / 3.0  # taller box to hold them
    assert {"S1_body_center", "left_ilium_center", "right_rib_angle"} <= set(full.landmark_names)
    assert bool((sample_hu(full, full.landmarks) > 150).all())
    s1 = full.landmark("S1_body_center")
    assert s1[2] < full.landmark("L5_body_center")[2] - 20

    seven = make_spine_phantom(spacing_mm=4.0, n_vertebrae=7, size_mm=(160, 160, 280))
    assert seven.vertebra_names == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    assert set(range(1, 8)) <= set(seven.labels.unique().tolist())
    with pytest.raises(ValueError):
        make_spine_phantom(n_vertebrae=0)
    with pytest.raises(ValueError):
        make_spine_phantom(spacing_mm=-1.0)
    with pytest.raises(KeyError):
        base.landmark("L9_body_center")


def test_noise_option_is_seeded():
    a = make_spine_phantom(spacing_mm=4.0, noise_hu=20.0, seed=3)
    b = make_spine_phantom(spacing_mm=4.0, noise_hu=20.0, seed=3)
    clean = make_spine_phantom(spacing_mm=4.0, seed=3)
    assert torch.equal(a.hu, b.hu)
    assert 15.0 < float((a.hu - clean.hu).std()) < 25.0


def test_build_is_fast():
    # Timed on one thread: the cost of the algorithm, not of OpenMP on an oversubscribed CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_spine_phantom(spacing_mm=4.0)  # warm-up
        t0 = time.perf_counter()
        p = make_spine_phantom(spacing_mm=2.0)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert p.hu.shape == (100, 80, 80)
    assert elapsed < 4.0  # about 0.45 s on one idle core
