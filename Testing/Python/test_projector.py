"""The projector against analytic truth, the camera model, and autograd checks."""


import pytest
import torch

from CorrRegLib.geometry import (
    Camera, euler_to_rotation, make_pose, project_points, reference_ap_pose, transform_points,
)
from CorrRegLib.projector import MultiResolutionProjector, Projector
from CorrRegLib.volume import Volume

MU = 0.02  # 1/mm


def supersampled(n: int, spacing: float, inside, ss: int = 4) -> torch.Tensor:
    """Partial-volume occupancy of a shape on an n^3 grid (voxel centres at index * spacing)."""
    g = (torch.arange(n * ss, dtype=torch.float64) + 0.5) / ss - 0.5
    z, y, x = torch.meshgrid(g * spacing, g * spacing, g * spacing, indexing="ij")
    occ = inside(x, y, z).double()
    return occ.reshape(n, ss, n, ss, n, ss).mean((1, 3, 5)).float()


def unit_rays(camera: Camera) -> torch.Tensor:
    r = camera.pixel_rays(torch.float64).reshape(-1, 3)
    return r / r.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def sphere():
    n, sp, radius = 64, 1.0, 28.0
    c = (n - 1) / 2 * sp
    occ = supersampled(n, sp, lambda x, y, z: (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= radius**2)
    vol = Volume(occ * MU, (sp, sp, sp), origin=(-20.0, 13.0, 7.0))
    return vol, radius


def sphere_chords(camera, pose, centre, radius):
    d = unit_rays(camera)
    c = transform_points(pose, centre[None])[0]
    along = d @ c
    dist2 = (c * c).sum() - along**2
    return (2 * (radius**2 - dist2).clamp(min=0).sqrt()).reshape(camera.height, camera.width)


MODES = ["planes", "rays"]


@pytest.mark.parametrize("mode", MODES)
def test_sphere_drr_equals_mu_times_chord(sphere, mode):
    # Detector pixels no finer than a projected voxel: the reference is the ideal sphere, and
    # finer pixels would only resolve the voxelisation of its rim.
    vol, radius = sphere
    cam = Camera(1000.0, (2.0, 2.0), (48, 48))
    # an oblique view must not matter for a sphere, but exercises every axis of the sampler
    rot = make_pose(euler_to_rotation(torch.tensor([20.0, -35.0, 10.0], dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    pose = reference_ap_pose(torch.zeros(3, dtype=torch.float64), 650.0) @ rot @ make_pose(
        torch.eye(3, dtype=torch.float64), -vol.center_lps())
    drr = Projector(vol, cam, mode=mode)(pose.float())[0].double()
    truth = MU * sphere_chords(cam, pose, vol.center_lps(), radius)
    # Rays clear of the voxelised rim (chord above 0.6 of the diameter) are each within 1%, and
    # within 0.5% on average out to a third of it; the total attenuation is conserved. What is
    # left is the rim's voxelisation (one voxel of blur), which denser sampling cannot change:
    rel = (drr - truth).abs() / truth.clamp(min=1e-12)
    assert float(rel[truth > MU * 1.2 * radius].max()) < 0.01
    assert float(rel[truth > MU * 2 * radius / 3].mean()) < 0.005
    assert float(drr.sum() / truth.sum()) == pytest.approx(1.0, abs=0.002)
    assert float((drr - truth).norm() / truth.norm()) < 0.02
    dense = Projector(vol, cam, samples_per_voxel=4, mode="rays")(pose.float())[0].double()
    assert float((dense - drr).norm() / dense.norm()) < 0.002  # default sampling has converged
    # rays that miss the sphere by more than a voxel diagonal plus the interpolation reach see nothing
    clear = sphere_chords(cam, pose, vol.center_lps(), radius + 2.0) == 0
    assert float(drr[clear].abs().max()) < 1e-6 * float(truth.max())


@pytest.mark.parametrize("mode", MODES)
def test_box_drr_equals_mu_times_chord(mode):
    # an axis-aligned box seen along an axis: every ray through it has the same chord (its depth)
    n, sp = 48, 2.0
    lo, hi = torch.tensor([20.0, 30.0, 24.0]), torch.tensor([70.0, 60.0, 66.0])
    occ = supersampled(n, sp, lambda x, y, z: (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2]))
    vol = Volume(occ * MU, (sp, sp, sp))
    cam = Camera(1000.0, (4.0, 4.0), (32, 32))
    centre = ((lo + hi) / 2).double()
    pose = reference_ap_pose(centre, 700.0)  # beam along +y (posterior): chord = hi_y - lo_y
    drr = Projector(vol, cam, mode=mode)(pose.float())[0].double()
    # exact per-ray chord through the box by the slab method, in double precision
    d = unit_rays(cam)
    from CorrRegLib.geometry import invert_pose
    src = invert_pose(pose)[:3, 3]
    dirs = d @ invert_pose(pose)[:3, :3].T
    t0 = (lo.double() - src) / dirs
    t1 = (hi.double() - src) / dirs
    chord = (torch.maximum(t0, t1).amin(-1) - torch.minimum(t0, t1).amax(-1)).clamp(min=0).reshape(32, 32)
    truth = MU * chord
    inner = truth > 0  # away from the edges every ray has the box's depth, 30 mm
    inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    assert torch.allclose(drr[inner], truth[inner], rtol=0.005)


@pytest.mark.parametrize("mode", MODES)
def test_bead_lands_where_the_camera_model_projects_it(mode):
    # a small bright bead in an obliquely oriented CT appears in the DRR at the pixel that
    # project_points predicts: the projector and the camera model share one convention
    n, sp = 40, 2.0
    direction = euler_to_rotation(torch.tensor([25.0, -10.0, 40.0], dtype=torch.float64))
    ijk = torch.tensor([12.0, 25.0, 17.0], dtype=torch.float64)
    data = torch.zeros(n, n, n)
    data[int(ijk[2]), int(ijk[1]), int(ijk[0])] = 1.0
    vol = Volume(data, (sp, sp, sp), origin=(-30.0, 10.0, 55.0), direction=direction.tolist())
    bead = (vol.lps_from_index() @ torch.cat([ijk, torch.ones(1, dtype=torch.float64)]))[:3]
    cam = Camera(1000.0, (0.5, 0.5), (128, 96), (60.0, 50.0))
    # an oblique view centred near the bead, which must land inside the detector
    rot = euler_to_rotation(torch.tensor([15.0, 30.0, -5.0], dtype=torch.float64))
    pose = reference_ap_pose(torch.zeros(3, dtype=torch.float64), 600.0) @ make_pose(rot, -rot @ (bead + 7.0))
    drr = Projector(vol, cam, samples_per_voxel=1 if mode == "planes" else 4, mode=mode)(pose.float())[0]
    uv = project_points(cam, pose, bead[None])[0]
    v, u = torch.meshgrid(torch.arange(96.0) + 0.5, torch.arange(128.0) + 0.5, indexing="ij")
    w = drr / drr.sum()
    centroid = torch.stack([(w * u).sum(), (w * v).sum()]).double()
    assert 5 < float(uv[0]) < 123 and 5 < float(uv[1]) < 91
    assert float((centroid - uv).norm()) < 0.25, (centroid, uv)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_pose_and_volume_in_float64(mode):
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(6, 5, 7, generator=gen, dtype=torch.float64) * 0.02
    vol = Volume(data, (3.0, 2.0, 2.5))
    cam = Camera(400.0, (6.0, 6.0), (4, 3))
    base = reference_ap_pose(vol.center_lps(), 300.0)
    spv = 1.0 if mode == "planes" else 1.5
    proj = Projector(vol, cam, samples_per_voxel=spv, mode=mode)
    from CorrRegLib.geometry import se3_exp

    xi = torch.tensor([0.05, -0.03, 0.02, 0.4, -0.3, 1.0], dtype=torch.float64, requires_grad=True)
    f_pose = lambda x: proj(se3_exp(x) @ base)
    assert torch.autograd.gradcheck(f_pose, (xi,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f_pose, (xi,), eps=1e-6, atol=1e-4)

    dvox = data.clone().requires_grad_()
    f_vol = lambda d: Projector(Volume(d, vol.spacing), cam, samples_per_voxel=spv, mode=mode)(base)
    assert torch.autograd.gradcheck(f_vol, (dvox,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_batched_poses_and_chunking_agree_with_single_renders(sphere, mode):
    vol, _ = sphere
    cam = Camera(1000.0, (1.6, 1.6), (40, 40))
    base = reference_ap_pose(vol.center_lps(), 700.0)
    poses = torch.stack([base, base.clone(), base.clone()])
    poses[1, 0, 3] += 12.0
    poses[2, :3, :3] = euler_to_rotation(torch.tensor([0.0, 0.0, 15.0], dtype=torch.float64)) @ base[:3, :3]
    # a quarter turn about the CT's S axis makes that pose slice along another voxel axis
    poses = torch.cat([poses, (poses[0] @ make_pose(euler_to_rotation(torch.tensor([0.0, 0.0, 90.0], dtype=torch.float64)),
                                                     torch.zeros(3, dtype=torch.float64)))[None]])
    poses[3, :3, 3] = poses[0, :3, 3] - poses[3, :3, :3] @ vol.center_lps() + poses[0, :3, :3] @ vol.center_lps()
    full = Projector(vol, cam, mode=mode)(poses.float())
    tiny_chunks = Projector(vol, cam, max_points=5000, mode=mode)(poses.float())
    assert full.shape == (4, 1, 40, 40)
    assert torch.allclose(full, tiny_chunks, atol=1e-5)
    for i in range(4):
        assert torch.allclose(full[i], Projector(vol, cam, mode=mode)(poses[i].float()), atol=1e-5)
    # a sphere looks the same from every direction
    assert torch.allclose(full[0], full[3], atol=0.02 * float(full[0].max()))
    # chunked rendering with checkpointing gives the same pose gradient
    p1 = poses.float().clone().requires_grad_()
    p2 = poses.float().clone().requires_grad_()
    Projector(vol, cam, mode=mode)(p1).square().sum().backward()
    Projector(vol, cam, max_points=5000, mode=mode)(p2).square().sum().backward()
    # float32 sums in another order: compare relative to the gradient's scale
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-3, atol=1e-5 * float(p1.grad.abs().max()))


def test_multiresolution_levels_agree(sphere):
    vol, radius = sphere
    cam = Camera(1000.0, (0.8, 0.8), (80, 80))
    pose = reference_ap_pose(vol.center_lps(), 650.0).float()
    mr = MultiResolutionProjector(vol, cam, levels=3)
    imgs = [mr[l](pose) for l in range(3)]
    assert [tuple(i.shape[-2:]) for i in imgs] == [(80, 80), (40, 40), (20, 20)]
    fine_pooled = torch.nn.functional.avg_pool2d(imgs[0][None], 4)[0]
    # the coarse level approximates the area-averaged fine image
    assert float((imgs[2] - fine_pooled).norm() / fine_pooled.norm()) < 0.05


def test_pool_factor_keeps_voxels_within_the_pixel_footprint(sphere):
    vol, radius = sphere  # 64^3 voxels of 1 mm
    assert vol.pool_factor(0.9) == 1  # a 2 mm voxel would be coarser than 1.25 x 0.9 mm
    assert vol.pool_factor(1.6) == 2
    assert vol.pool_factor(3.3) == 4
    assert vol.pool_factor(3.3, slack=2.5) == 8  # 8 voxels per axis remain
    assert vol.pool_factor(1000.0) == 8  # never fewer than 8 voxels per axis
    aniso = Volume(torch.zeros(16, 64, 64), (0.7, 0.7, 2.5))  # chest-CT-like: the finest axis decides
    assert aniso.pool_factor(2.2) == 2
    # a pooled CT renders what the full one renders, seen at that footprint
    cam = Camera(1000.0, (3.2, 3.2), (24, 24))
    pose = reference_ap_pose(vol.center_lps(), 650.0).float()
    f = vol.pool_factor(3.2 * 650.0 / 1000.0)
    assert f == 2
    full, pooled = Projector(vol, cam)(pose), Projector(vol.downsample(f), cam)(pose)
    assert float((full - pooled).norm() / full.norm()) < 0.02


def test_memory_is_bounded_by_chunking():
    # a 256x256 detector over a 64^3 volume with max_points small must still render
    vol = Volume(torch.full((32, 32, 32), MU), (4.0, 4.0, 4.0))
    cam = Camera(1000.0, (1.0, 1.0), (256, 256))
    proj = Projector(vol, cam, max_points=1 << 16)
    img = proj(reference_ap_pose(vol.center_lps(), 700.0).float())
    assert img.shape == (1, 256, 256)
    assert float(img.max()) == pytest.approx(MU * 128.0, rel=0.02)  # 32 voxels of 4 mm


def test_samplers_agree_and_planes_refuse_a_ct_behind_the_source(sphere):
    vol, _ = sphere
    cam = Camera(1000.0, (1.6, 1.6), (40, 40))
    pose = reference_ap_pose(vol.center_lps(), 700.0).float()
    planes = Projector(vol, cam, mode="planes")(pose)
    rays = Projector(vol, cam, mode="rays", samples_per_voxel=2)(pose)
    assert float((planes - rays).norm() / rays.norm()) < 0.01
    # the CT straddling the source: auto falls back to rays, planes says why it cannot
    close = reference_ap_pose(vol.center_lps(), 10.0).float()
    assert torch.isfinite(Projector(vol, cam)(close)).all()
    with pytest.raises(ValueError, match="behind the X-ray source"):
        Projector(vol, cam, mode="planes")(close)
    with pytest.raises(ValueError, match="at most one sample"):
        Projector(vol, cam, mode="planes", samples_per_voxel=2)


def test_bad_poses_shape():
    vol = Volume(torch.full((8, 8, 8), MU), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        Projector(vol, Camera(1000.0, (1, 1), (4, 4)))(torch.eye(3))
