"""Realistic X-ray synthesis: noise, blur, contrast, collimation, heel, determinism, geometry."""

from __future__ import annotations

import math

import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose, project_points, reference_ap_pose
from CorrRegLib.phantom import small_phantom
from CorrRegLib.projector import Projector
from CorrRegLib.simulate import (
    collimation_mask,
    degrade,
    gaussian_blur,
    heel_profile,
    random_degradation,
    simulate_xray,
)

SOD = 700.0


@pytest.fixture(scope="module")
def ph():
    return small_phantom(seed=0)


@pytest.fixture(scope="module")
def cam():
    # 64 x 80 pixels of 2.4 mm at sdd 1000 mm: about 108 x 134 mm at the isocenter.
    return Camera(1000.0, (2.4, 2.4), (64, 80))


@pytest.fixture(scope="module")
def ap(ph):
    return reference_ap_pose(ph.volume.center_lps(), SOD)


@pytest.fixture(scope="module")
def proj(ph, cam):
    return Projector(ph.volume, cam, samples_per_voxel=2.0)


@pytest.fixture(scope="module")
def drr(proj, ap):
    with torch.no_grad():
        return proj(ap.float())  # (1, H, W)


def _hf_energy(img: torch.Tensor) -> float:
    lap = img[1:-1, 1:-1] * 4 - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
    return float((lap**2).mean())


def test_seed_makes_it_reproducible(proj, ap):
    a = simulate_xray(proj, pose=ap, seed=1)
    b = simulate_xray(proj, pose=ap, seed=1)
    c = simulate_xray(proj, pose=ap, seed=2)
    assert a.image.shape == (80, 64) and a.image.dtype == torch.float32
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    assert float((a.image - c.image).abs().mean()) > 1e-3
    assert torch.equal(a.line_integral, c.line_integral)  # the noise-free part is shared
    assert 0.0 <= float(a.image.min()) and float(a.image.max()) <= 1.0
    assert a.params["dose"] == 1e4 and a.params["seed"] == 1


def test_raw_equals_the_projector_output(ph, cam, ap, drr):
    raw = simulate_xray(ph.volume, cam, ap, raw=True)  # builds its own projector at 2 samples/voxel
    assert raw.image.shape == (80, 64)
    assert torch.allclose(raw.image, drr[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(raw.image, raw.line_integral)
    assert bool(raw.mask.all())
    # A phantom object is accepted as the source too.
    again = simulate_xray(ph, cam, ap, raw=True)
    assert torch.allclose(again.image, raw.image)


def test_higher_dose_means_lower_noise(drr):
    stds = []
    for dose in (1e3, 1e4, 1e5):
        log_img, _ = degrade(drr[0], (2.4, 2.4), dose=dose, blur_mm=0.0, normalize=False, seed=0)
        stds.append(float((log_img - drr[0]).std()))
    assert stds[0] > stds[1] > stds[2] > 0
    # Poisson statistics: a tenfold dose lowers the noise by about sqrt(10).
    for hi, lo in zip(stds[:-1], stds[1:]):
        assert 2.3 < hi / lo < 4.3
    noiseless, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False)
    assert torch.allclose(noiseless, drr[0], atol=1e-4)


def test_blur_removes_high_frequencies(drr):
    sharp, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False)
    soft, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=3.0, normalize=False)
    assert _hf_energy(soft) < 0.5 * _hf_energy(sharp)
    noisy_sharp, _ = degrade(drr[0], (2.4, 2.4), dose=1e4, blur_mm=0.0, normalize=False, seed=0)
    noisy_soft, _ = degrade(drr[0], (2.4, 2.4), dose=1e4, blur_mm=3.0, normalize=False, seed=0)
    assert _hf_energy(noisy_soft) < 0.3 * _hf_energy(noisy_sharp)
    # The blur is in mm: finer pixels need more pixels of blur for the same effect.
    impulse = torch.zeros(41, 41)
    impulse[20, 20] = 1.0
    b1 = gaussian_blur(impulse, (1.0, 1.0))
    b2 = gaussian_blur(impulse, (2.0, 1.0))
    assert math.isclose(float(b1.sum()), 1.0, rel_tol=1e-5)
    var_u = float((b2.sum(0) * (torch.arange(41.0) - 20) ** 2).sum())
    var_v = float((b2.sum(1) * (torch.arange(41.0) - 20) ** 2).sum())
    assert abs(var_u - 4.0) < 0.1 and abs(var_v - 1.0) < 0.1


def test_collimation_sets_mask_and_constant_shutters(proj, ap):
    x = simulate_xray(proj, pose=ap, seed=0, collimation=0.5, collimation_value=0.25)
    frac = float(x.mask.float().mean())
    assert 0.2 < frac < 0.3  # half the width times half the height
    assert not bool(x.mask[0, 0]) and bool(x.mask[40, 32])
    outside = x.image[~x.mask]
    assert bool((outside == 0.25).all())
    assert float(x.image[x.mask].std()) > 0.05
    box = simulate_xray(proj, pose=ap, seed=0, collimation=(0.0, 0.25, 1.0, 1.0))
    assert not bool(box.mask[:20].any()) and bool(box.mask[20:].all())
    assert bool((box.image[:20] == 1.0).all())  # default shutter value
    m = torch.zeros(80, 64, dtype=torch.bool)
    m[10:30, 5:50] = True
    own = simulate_xray(proj, pose=ap, seed=0, collimation=m)
    assert torch.equal(own.mask, m)
    open_field = simulate_xray(proj, pose=ap, seed=0)
    assert bool(open_field.mask.all())
    with pytest.raises(ValueError):
        collimation_mask(80, 64, 1.5)


def test_heel_gives_a_monotone_trend_along_its_axis(drr):
    base, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False)
    for axis, dim in (("v", 1), ("u", 0)):
        heeled, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False, heel=0.3, heel_axis=axis)
        trend = (heeled - base).mean(dim=dim)  # along rows for v, along columns for u
        steps = trend[1:] - trend[:-1]
        assert bool((steps < 0).all())  # more photons towards +axis: lower log image
        assert float(trend[0] - trend[-1]) > 0.25
        across = (heeled - base).mean(dim=1 - dim)
        assert float(across.max() - across.min()) < 1e-4  # flat across the axis
    prof = heel_profile(10, 20, -0.2, "u")
    assert prof.shape == (10, 20) and float(prof[0, 0]) > float(prof[0, -1])
    assert math.isclose(float(prof.mean()), 1.0, rel_tol=1e-6)
    # With noise and the window on, the trend survives in the final image.
    a, _ = degrade(drr[0], (2.4, 2.4), dose=1e5, heel=0.5, seed=0)
    b, _ = degrade(drr[0], (2.4, 2.4), dose=1e5, heel=-0.5, seed=0)
    d = (a - b).mean(1)
    assert float(d[:10].mean()) > float(d[-10:].mean())


def test_contrast_controls(drr):
    plain, _ = degrade(drr[0], (2.4, 2.4), dose=1e4, seed=0)
    dark, _ = degrade(drr[0], (2.4, 2.4), dose=1e4, seed=0, gamma=1.4)
    assert float(dark.mean()) < float(plain.mean())
    wide, _ = degrade(drr[0], (2.4, 2.4), dose=1e4, seed=0, window=(0.0, 100.0))
    assert float(wide.min()) == 0.0 and float(wide.max()) == 1.0
    assert float((plain == 1.0).float().mean()) > float((wide == 1.0).float().mean())
    flat, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False)
    scattered, _ = degrade(drr[0], (2.4, 2.4), dose=None, blur_mm=0.0, normalize=False, scatter=0.5)
    assert float(scattered.max() - scattered.min()) < 0.9 * float(flat.max() - flat.min())
    with pytest.raises(ValueError):
        degrade(drr[0], (2.4, 2.4), gamma=0.0)
    with pytest.raises(ValueError):
        degrade(drr[0], (2.4, 2.4), heel=3.0)


def test_ap_view_shows_the_spine_in_the_middle(ph, cam, ap, drr):
    img = drr[0]
    h, w = img.shape
    cols = img.mean(0)
    # A bright column along the vertical axis: the spine, centred.
    assert abs(int(cols.argmax()) - w / 2) <= 0.1 * w
    centre = cols[w // 2 - 4 : w // 2 + 4].mean()
    sides = torch.cat([cols[: w // 8], cols[-w // 8 :]]).mean()
    assert float(centre) > 1.15 * float(sides)
    # Vertebrae project onto the central column, L1 on top (camera y = inferior) ...
    names = ph.vertebra_names
    uv = project_points(cam, ap, torch.stack([ph.landmark(f"{v}_body_center") for v in names]))
    assert bool(((uv[:, 0] - w / 2).abs() < 0.1 * w).all())
    assert bool((uv[1:, 1] > uv[:-1, 1]).all())
    # ... and the patient's left pedicle on the image's right (camera x = patient left).
    lp = project_points(cam, ap, ph.landmark("L3_left_pedicle")[None])[0]
    rp = project_points(cam, ap, ph.landmark("L3_right_pedicle")[None])[0]
    assert lp[0] > rp[0] + 3
    # The degraded image keeps that structure.
    sim = simulate_xray(ph.volume, cam, ap, seed=0)
    assert abs(int(sim.image.mean(0).argmax()) - w / 2) <= 0.15 * w


def test_batched_poses(proj, ap, ph):
    lat = c_arm_pose(ph.volume.center_lps(), SOD, 90.0, 0.0)
    poses = torch.stack([ap, lat])
    batch = simulate_xray(proj, pose=poses, seed=3, collimation=0.8)
    assert batch.image.shape == (2, 80, 64) and batch.mask.shape == (2, 80, 64)
    assert batch.line_integral.shape == (2, 80, 64)
    raw = simulate_xray(proj, pose=poses, raw=True)
    single = simulate_xray(proj, pose=lat, raw=True)
    assert torch.allclose(raw.image[1], single.image, atol=1e-5)
    assert not torch.allclose(raw.image[0], raw.image[1])
    again = simulate_xray(proj, pose=poses, seed=3, collimation=0.8)
    assert torch.equal(batch.image, again.image)


def test_random_degradation_is_seeded_and_in_range(proj, ap):
    assert random_degradation(5) == random_degradation(5)
    assert random_degradation(5) != random_degradation(6)
    g = torch.Generator().manual_seed(0)
    draws = [random_degradation(g) for _ in range(60)]
    for p in draws:
        assert 1e3 <= p["dose"] <= 1e5
        assert 0.2 <= p["blur_mm"] <= 1.2
        assert 0.7 <= p["gamma"] <= 1.4
        assert -0.3 <= p["heel"] <= 0.3 and p["heel_axis"] in ("u", "v")
        assert 0.0 <= p["window"][0] <= 2.0 and 98.0 <= p["window"][1] <= 100.0
    n_coll = sum(p["collimation"] is not None for p in draws)
    assert 5 <= n_coll <= 35
    doses = torch.tensor([math.log10(p["dose"]) for p in draws])
    assert float(doses.min()) < 3.5 and float(doses.max()) > 4.5  # spread over the range
    p = next(p for p in draws if p["collimation"] is not None)
    x = simulate_xray(proj, pose=ap, seed=0, **p)
    assert x.image.shape == (80, 64) and not bool(x.mask.all()) and bool(torch.isfinite(x.image).all())


def test_argument_errors(proj, ph, cam):
    with pytest.raises(ValueError):
        simulate_xray(proj)  # no pose
    with pytest.raises(ValueError):
        simulate_xray(ph.volume, None, torch.eye(4, dtype=torch.float64))  # no camera
    with pytest.raises(TypeError):
        simulate_xray("ct.nii", cam, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        simulate_xray(proj, Camera(900.0, (1.0, 1.0), (8, 8)), torch.eye(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_projector_device(ph, cam, ap):
    gpu = Projector(ph.volume.to("cuda"), cam, samples_per_voxel=2.0).to("cuda")
    x = simulate_xray(gpu, pose=ap, seed=0, scatter=0.1, heel=0.1, collimation=0.9)
    assert x.image.device.type == "cuda" and x.mask.device.type == "cuda"
    y = simulate_xray(gpu, pose=ap, seed=0, scatter=0.1, heel=0.1, collimation=0.9)
    assert torch.equal(x.image, y.image)
    cpu = simulate_xray(ph.volume, cam, ap, raw=True)
    assert torch.allclose(x.line_integral.cpu(), cpu.line_integral, atol=1e-3)
