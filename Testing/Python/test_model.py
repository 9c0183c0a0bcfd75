"""The correlation-driven network (model.py) and its losses (losses.py)."""

import json

import pytest
import torch

from CorrRegLib.geometry import Camera, reference_ap_pose
from CorrRegLib.losses import (
    UncertaintyWeighting,
    appro_loss,
    decomposition_loss,
    geodesic_direction,
    isocenter_in_camera,
    ncc,
    pose_gradient,
    twist_about_isocenter,
)
from CorrRegLib.model import (
    FFC,
    AffineCouplingLayer,
    CorrelationNet,
    FourierUnit,
    InvertibleBranch,
    InvertibleConv1x1,
    NetConfig,
    ResidualFFCBlock,
    ShallowFeatureExtractor,
    build_model,
    count_parameters,
    network_projector,
)
from CorrRegLib.phantom import small_phantom
from CorrRegLib.projector import Projector

TINY = dict(input_size=32, stem_channels=4, stage_channels=(8, 8), head_hidden=(16,), head_pool=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _scramble(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every weight away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# --------------------------------------------------------------------------------------------
# Invertible local branch


def test_inn_inverse_float64_to_machine_precision():
    torch.manual_seed(0)
    inn = InvertibleBranch(8, layers=3).double()
    _scramble(inn, 1)
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    y = inn(x)
    assert (y - x).abs().max() > 0.1  # it does transform the input
    assert (inn.inverse(y) - x).abs().max() < 1e-10
    assert (inn(inn.inverse(x)) - x).abs().max() < 1e-10


def test_inn_inverse_float32():
    torch.manual_seed(1)
    inn = InvertibleBranch(16, layers=3)
    _scramble(inn, 2, scale=0.1)
    x = torch.randn(3, 16, 8, 8)
    assert (inn.inverse(inn(x)) - x).abs().max() < 1e-4


def test_invertible_conv_and_coupling_layer_inverses():
    torch.manual_seed(2)
    conv = InvertibleConv1x1(6, seed=3).double()
    _scramble(conv, 4)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert (conv.inverse(conv(x)) - x).abs().max() < 1e-12
    w = conv.weight()
    assert abs(torch.linalg.det(w).item()) > 1e-6
    layer = AffineCouplingLayer(6, seed=5).double()
    _scramble(layer, 6)
    assert (layer.inverse(layer(x)) - x).abs().max() < 1e-10
    with pytest.raises(ValueError, match="even"):
        AffineCouplingLayer(5)


# --------------------------------------------------------------------------------------------
# Global branch and feature extractor


def test_fourier_unit_and_ffc_shapes():
    x = torch.randn(2, 8, 16, 12)
    assert FourierUnit(8, 6)(x).shape == (2, 6, 16, 12)
    assert FFC(8)(x).shape == (2, 8, 16, 12)
    block = ResidualFFCBlock(12)
    assert block(torch.randn(1, 12, 8, 8)).shape == (1, 12, 8, 8)
    with pytest.raises(ValueError, match="even"):
        ResidualFFCBlock(8)(torch.randn(1, 8, 7, 7))


def test_ffc_has_a_global_receptive_field():
    """A change in one corner pixel reaches the far corner in one FFC block (3x3 convs alone
    would reach two pixels)."""
    torch.manual_seed(3)
    block = ResidualFFCBlock(8).double()
    x = torch.randn(1, 8, 16, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0
    diff = (block(x2) - block(x)).abs()
    assert diff[..., 12:, 12:].max() > 1e-6


def test_sfe_shapes_and_global_pool_mixer():
    sfe = ShallowFeatureExtractor(1, 8, (16, 32), blocks=2)
    assert sfe(torch.randn(2, 1, 64, 64)).shape == (2, 32, 16, 16)
    sfe4 = ShallowFeatureExtractor(1, 8, (16, 32, 64, 64), blocks=2)
    assert sfe4(torch.randn(1, 1, 64, 48)).shape == (1, 64, 4, 3)
    assert len([m for m in sfe4.modules() if type(m).__name__ == "PoolformerBlock"]) == 8


# --------------------------------------------------------------------------------------------
# The whole network


def test_network_interface_and_gradients():
    torch.manual_seed(4)
    net = build_model("compact", **TINY)
    x = torch.rand(3, 1, 32, 32)
    m = torch.rand(3, 1, 32, 32, requires_grad=True)
    s = net(x, m)
    assert s.shape == (3,)
    (g,) = torch.autograd.grad(s.sum(), m, create_graph=True)
    assert g.abs().sum() > 0
    # double backward reaches the weights (what L_appro needs)
    g.pow(2).sum().backward()
    assert all(p.grad is not None for p in net.sfe.parameters())
    feats = net.features(x, m)
    assert set(feats) == {"Fx", "Fm", "Gx", "Gm", "Lx", "Lm"}
    assert feats["Gx"].shape == feats["Lm"].shape == (3, 8, 8, 8)


def test_network_is_per_sample_and_intensity_invariant():
    torch.manual_seed(5)
    net = build_model("compact", **TINY).eval()
    x = torch.rand(2, 1, 32, 32)
    m = torch.rand(2, 1, 32, 32)
    s = net(x, m)
    m2 = m.clone()
    m2[1] = torch.rand(1, 32, 32)
    s2 = net(x, m2)
    assert torch.allclose(s[0], s2[0], atol=1e-6)  # no batch statistics leak between samples
    assert not torch.allclose(s[1], s2[1], atol=1e-6)
    # per-image standardisation: affine intensity changes do not matter
    assert torch.allclose(net(3.0 * x + 7.0, 0.5 * m - 2.0), s, atol=1e-4)
    # other sizes are resized to input_size; (H, W) input works for a batch of one
    assert net(torch.rand(40, 40), torch.rand(1, 1, 40, 40)).shape == (1,)


def test_config_json_roundtrip_and_validation():
    cfg = NetConfig.from_preset("compact", combine="learned")
    back = NetConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    net = CorrelationNet(back)
    assert hasattr(net, "combine_weights")
    with pytest.raises(ValueError, match="preset"):
        NetConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown network config keys"):
        NetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        NetConfig(input_size=30)
    with pytest.raises(ValueError, match="list of integers"):
        NetConfig.from_dict({**cfg.to_dict(), "stage_channels": "16,32"})


def test_paper_preset_builds_and_runs():
    torch.manual_seed(6)
    net = build_model("paper")
    cfg = net.config
    assert cfg.stage_channels == (16, 32, 64, 64) and cfg.input_size == 256
    assert cfg.head_inputs == 16384
    assert net.head_global.trunk[0].weight.shape == (8192, 16384)
    assert 170e6 < count_parameters(net.head_global) < 185e6
    with torch.no_grad():
        s = net(torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24))
    assert s.shape == (1,) and torch.isfinite(s).all()


def test_volume_adapter_starts_as_identity_and_renders():
    ph = small_phantom(0, spacing_mm=8.0)
    cam = Camera(1011.7, (0.798, 0.798), (256, 256)).downsample(16)
    iso = ph.volume.bone_center_lps()
    pose = reference_ap_pose(iso, 700.0).float()
    for reduce, ch in (("mean", 1), ("per_channel", 3)):
        net = build_model("compact", adapter=True, adapter_reduce=reduce, input_size=16, stage_channels=(8, 8),
                          head_pool=2)
        proj = network_projector(net, ph.volume, cam)
        drr = proj(pose[None])
        assert drr.shape == (1, ch, 16, 16)
        plain = Projector(ph.volume, cam)(pose[None])
        assert torch.allclose(drr, plain.expand_as(drr), rtol=1e-4, atol=1e-4)  # zero-initialised residual
        s = net(torch.rand(1, 1, 16, 16), drr)
        s.sum().backward()
        assert net.adapter.net[0].weight.grad is None or net.adapter.net[-1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Losses


@pytest.fixture(scope="module")
def scene():
    torch.manual_seed(7)
    ph = small_phantom(0, spacing_mm=5.0)
    cam = Camera(1011.7, (0.798, 0.798), (256, 256)).downsample(8)  # 32 x 32
    proj = Projector(ph.volume, cam)
    iso = ph.volume.bone_center_lps()
    truth = reference_ap_pose(iso, 700.0).expand(2, 4, 4)
    twist = torch.cat([torch.tensor([[0.1, -0.05, 0.08], [-0.04, 0.1, 0.03]]), torch.tensor([[10.0, -6.0, 15.0], [-5.0, 8.0, -20.0]])], 1)
    pose = twist_about_isocenter(truth, twist.double(), iso)
    with torch.no_grad():
        xray = proj(truth.float())
    return proj, iso, truth, pose, xray


def test_geodesic_direction_points_away_from_truth(scene):
    _, iso, truth, pose, _ = scene
    g = geodesic_direction(pose, truth, iso)
    assert g.shape == (2, 6)
    # a small step against the gradient shortens the geodesic distance
    for sign, expect in ((-1, "closer"), (1, "farther")):
        moved = twist_about_isocenter(pose, sign * 1e-3 * g / g.norm(dim=-1, keepdim=True), iso)
        c = isocenter_in_camera(moved, iso)
        d_before = (isocenter_in_camera(pose, iso) - isocenter_in_camera(truth, iso)).norm(dim=-1)
        d_after = (c - isocenter_in_camera(truth, iso)).norm(dim=-1)
        assert ((d_after < d_before) if expect == "closer" else (d_after > d_before)).all()
    # for a pure rotation about the isocenter the rotation part is 2 x the rotation vector
    rv = torch.tensor([[0.2, -0.1, 0.05]], dtype=torch.float64)
    p = twist_about_isocenter(truth[:1], torch.cat([rv, torch.zeros(1, 3, dtype=torch.float64)], 1), iso)
    g1 = geodesic_direction(p, truth[:1], iso)
    assert torch.allclose(g1[:, :3], 2 * rv, atol=1e-9) and g1[:, 3:].abs().max() < 1e-9
    assert geodesic_direction(truth, truth, iso).abs().max() < 1e-12


def test_decomposition_loss_finite_and_differentiable():
    torch.manual_seed(8)
    net = build_model("compact", **TINY)
    score, feats = net(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), return_features=True)
    loss = decomposition_loss(feats)
    assert torch.isfinite(loss) and loss >= 0
    loss.backward()
    for branch in (net.global_xray, net.global_drr, net.local_xray, net.local_drr, net.sfe):
        assert sum(p.grad.abs().sum() for p in branch.parameters() if p.grad is not None) > 0
    # the CDDFuse form stays finite when the local features are perfectly anti-correlated
    a = torch.randn(1, 4, 3, 3)
    bad = decomposition_loss({"Gx": a, "Gm": a, "Lx": a, "Lm": -a})
    assert torch.isfinite(bad) and abs(bad.item() - 1 / 0.01) < 1.0
    assert torch.allclose(ncc(a, 2 * a + 1), torch.ones(1), atol=1e-5)


def test_appro_loss_and_uncertainty_weighting_reach_all_parameters(scene):
    proj, iso, truth, pose, xray = scene
    torch.manual_seed(9)
    net = build_model("compact", **TINY)
    weighting = UncertaintyWeighting(2)
    res = appro_loss(net, proj, xray, pose, truth, iso, return_features=True)
    assert torch.isfinite(res.loss) and 0 <= res.loss.item() <= 8
    assert res.cos_rotation.shape == (2,)
    total = weighting(res.loss, decomposition_loss(res.features))
    total.backward()
    assert weighting.log_vars.grad.abs().min() > 0
    for name in ("sfe", "global_xray", "global_drr", "local_xray", "local_drr", "head_global", "head_local"):
        mod = getattr(net, name)
        assert sum(p.grad.abs().sum() for p in mod.parameters() if p.grad is not None) > 0, name


def test_appro_loss_does_not_reward_a_vanishing_pose_gradient(scene):
    """A network with a constant score (no pose gradient) must score like a random direction
    (2 per part), not better; otherwise training can collapse into it."""
    proj, iso, truth, pose, xray = scene
    torch.manual_seed(12)
    net = build_model("compact", **TINY)
    with torch.no_grad():
        for head in (net.head_global, net.head_local):
            head.value.weight.zero_()
            head.value.bias.zero_()
    res = appro_loss(net, proj, xray, pose, truth, iso)
    assert res.loss.item() == pytest.approx(4.0, abs=1e-6)
    assert res.cos_rotation.abs().max() < 1e-6


def test_appro_loss_finite_difference_jvp_matches_exact_double_backward(scene):
    proj, iso, truth, pose, xray = scene
    torch.manual_seed(10)
    net = build_model("compact", **TINY)
    grads = []
    for exact in (True, False):
        net.zero_grad()
        res = appro_loss(net, proj, xray, pose, truth, iso, exact=exact)
        res.loss.backward()
        grads.append((res.loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])))
    (l_exact, g_exact), (l_fd, g_fd) = grads
    assert l_exact == pytest.approx(l_fd, rel=1e-6)
    cos = (g_exact @ g_fd / (g_exact.norm() * g_fd.norm())).item()
    assert cos > 0.99
    assert ((g_exact - g_fd).norm() / g_exact.norm()).item() < 0.1


def test_uncertainty_weighting_formula():
    w = UncertaintyWeighting(2)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    a, b = torch.tensor(2.0), torch.tensor(3.0)
    s1, s2 = torch.exp(torch.tensor(0.25)), torch.exp(torch.tensor(-0.5))  # s = exp(z / 2)
    expected = a / (2 * s1**2) + b / (2 * s2**2) + torch.log(s1) + torch.log(s2)
    assert torch.allclose(w(a, b), expected)
    with torch.no_grad():
        w.log_vars.fill_(-50.0)  # clamped: a vanishing loss cannot drive the total to -inf
    assert torch.isfinite(w(torch.tensor(0.0), torch.tensor(0.0)))
    assert w(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(-6.0)


def test_pose_gradient_matches_finite_difference(scene):
    proj, iso, truth, pose, xray = scene
    torch.manual_seed(11)
    net = build_model("compact", **TINY).eval()
    res = pose_gradient(net, proj, xray, pose.float(), iso)
    assert res.grad.shape == (2, 6) and res.score.shape == (2,)
    assert res.drr.shape == (2, 1, 32, 32)
    # Trilinear/bilinear interpolation is only C0 at voxel borders, so a finite difference
    # converges to the derivative only for steps far below a voxel: float64 and h = 1e-5 mm.
    net64 = net.double()
    res64 = pose_gradient(net64, proj, xray.double(), pose.double(), iso.double())
    assert torch.allclose(res64.grad.float(), res.grad, rtol=1e-2, atol=1e-3 * res.grad.abs().max().item())
    for k in (0, 3, 5):  # a rotation and two translations
        h = 1e-5
        d = torch.zeros(2, 6, dtype=torch.float64)
        d[:, k] = h
        with torch.no_grad():
            sp = net64(xray.double(), proj(twist_about_isocenter(pose.double(), d, iso.double())))
            sm = net64(xray.double(), proj(twist_about_isocenter(pose.double(), -d, iso.double())))
        fd = (sp - sm) / (2 * h)
        assert torch.allclose(res64.grad[:, k], fd, rtol=1e-3, atol=1e-6 * fd.abs().max().item())
