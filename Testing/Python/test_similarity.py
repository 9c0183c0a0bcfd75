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
