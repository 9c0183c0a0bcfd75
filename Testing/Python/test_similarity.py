"""The image similarities (CorrRegLib.similarity): what each rewards, checked on images whose answer
is known by construction."""

import pytest
import torch

from CorrRegLib.phantom import small_phantom
from CorrRegLib.projector import Projector
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.similarity import COUNTS_UNSEEN, EDGES_ONLY, SIMILARITIES, ngf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def drr():
    ph = small_phantom(seed=0)
    protocol = get_protocol("paper", detector_downsample=4)
    pose = make_cases(protocol, ph.volume.bone_center_lps(), 1, seed=2)[0].true_pose
    with torch.no_grad():
        return Projector(ph.volume, protocol.camera)(pose.float())[None]


def test_ngf_rewards_edges_by_direction_not_contrast(drr):
    same = float(ngf(drr, drr))
    assert 0.3 < same < 1.0  # the normalisation keeps every gradient under unit length
    assert float(ngf(3.0 * drr + 1.0, drr)) == pytest.approx(same, rel=1e-4)  # gain and offset do not matter
    assert float(ngf(-drr, drr)) == pytest.approx(same, rel=1e-4)  # nor the edges' sign
    # it falls as the edges part (by chance, directions still agree: 0.35 at 8 px here)
    scores = [float(ngf(drr, torch.roll(drr, shifts=(s, s), dims=(2, 3)))) for s in (1, 2, 4, 8)]
    assert same > scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[3] < 0.75 * same


def test_ngf_counts_the_moving_structure_where_the_fixed_image_is_not_seen(drr):
    """With ``region``, structure of the moving image outside ``mask`` earns nothing: hiding half
    of it (beyond a detector edge, outside the field of view) costs about half the score."""
    h, w = drr.shape[-2:]
    half = torch.zeros(1, 1, h, w)
    half[..., : w // 2] = 1.0
    everywhere = torch.ones(1, 1, h, w)
    full = float(ngf(drr, drr, everywhere))
    seen_half = float(ngf(drr, drr, half))  # the half that is seen matches: as good as the whole
    counted = float(ngf(drr, drr, half, everywhere))
    assert seen_half == pytest.approx(full, rel=0.15)
    assert 0.3 * full < counted < 0.7 * full
    assert "ngf" in COUNTS_UNSEEN and COUNTS_UNSEEN <= set(SIMILARITIES) and EDGES_ONLY <= set(SIMILARITIES)


def test_ngf_is_differentiable(drr):
    moving = drr[..., ::4, ::4].double().clone().requires_grad_(True)
    fixed = torch.roll(moving.detach(), 1, dims=3)
    assert torch.autograd.gradcheck(lambda m: ngf(fixed, m), (moving,), eps=1e-6, atol=1e-5)


def _rods(centres_widths, h=64, w=96, ramp=0.0):
    """(1, 1, h, w) image of vertical rods: (centre column, half-width, density) each, with
    ``ramp`` x a broad left-to-right ramp (the soft tissue a CT of one bone cannot explain)."""
    x = torch.arange(w, dtype=torch.float64) + 0.5
    img = torch.zeros(w, dtype=torch.float64)
    for c, half, density in centres_widths:
        img = img + density * (1.0 - ((x - c) / half).clamp(-1, 1) ** 2).sqrt()  # a cylinder's chord
    img = img + ramp * x / w
    return img.expand(h, w)[None, None].clone()


def test_bandpass_ncc_sees_where_the_mass_lies_not_only_the_edges():
    """The wrist's failure mode: the X-ray shows a wide bone and a narrow one side by side; a wide
    bone's DRR over the dark gap between them, one edge on the narrow bone, still lines edges up.
    Band-pass NCC ranks the DRR on its own shadow first, by a margin, and ignores a soft-tissue ramp
    that moves global NCC."""
    from CorrRegLib.similarity import bandpass_ncc, ncc

    xray = _rods([(30, 10, 1.0), (62, 5, 1.0)])
    right = _rods([(30, 10, 1.0)])
    across_the_gap = _rods([(47, 10, 1.0)])  # its right edge on the narrow bone's left edge
    assert float(bandpass_ncc(xray, right)) > float(bandpass_ncc(xray, across_the_gap)) + 0.2
    ramped = _rods([(30, 10, 1.0), (62, 5, 1.0)], ramp=2.0)
    assert abs(float(bandpass_ncc(ramped, right)) - float(bandpass_ncc(xray, right))) < 0.05
    assert float(ncc(xray, right)) - float(ncc(ramped, right)) > 0.1  # NCC is moved by it


def test_bandpass_ncc_ignores_what_lies_outside_the_mask(drr):
    """Pixels outside the mask (beyond the field of view) neither count nor bleed into the blur."""
    from CorrRegLib.similarity import bandpass_ncc

    h, w = drr.shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1.0
    noisy = drr.clone()
    noisy[mask == 0] = torch.rand(int((mask == 0).sum()), generator=torch.Generator().manual_seed(0)) * drr.max()
    assert float(bandpass_ncc(noisy, drr, mask)) == pytest.approx(float(bandpass_ncc(drr, drr, mask)), abs=1e-5)
    assert float(bandpass_ncc(3.0 * drr + 1.0, drr)) == pytest.approx(1.0, abs=1e-5)  # gain and offset
    moving = drr[..., ::4, ::4].double().clone().requires_grad_(True)
    fixed = torch.roll(moving.detach(), 1, dims=3)
    from CorrRegLib.similarity import bandpass_ncc as band
    assert torch.autograd.gradcheck(lambda m: band(fixed, m), (moving,), eps=1e-6, atol=1e-5)
