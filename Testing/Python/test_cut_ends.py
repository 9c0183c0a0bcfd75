"""A bone cut by the CT's box (problem.cut_ends): found only where a face cuts through bone, and
left out of the comparison when asked (RegistrationOptions.exclude_cut_ends)."""

import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose
from CorrRegLib.projector import Projector
from CorrRegLib.register import Level, RegistrationOptions, RegistrationSession
from CorrRegLib.register.problem import CUT_GROW_PX, cut_ends, grow
from CorrRegLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_thread")

BONE_MU = 0.05  # 1/mm: cortical bone, well above volume.BONE_MU_PER_MM


def rod(length_k: int, first_k: int = 8, last_k: int | None = None, n: int = 32, sleeve: bool = False) -> Volume:
    """A bone rod of radius 5 mm along k (the CT's z, 1 mm voxels) in an n x n x length_k box,
    from slice ``first_k`` to ``last_k`` (default: the last slice, where the box cuts it), with a
    knob on its closed end so that it has an end to be registered by; ``sleeve``: in soft tissue
    (water, radius 14 mm) along the whole box, as an X-ray shows it."""
    k, j, i = torch.meshgrid(torch.arange(length_k), torch.arange(n), torch.arange(n), indexing="ij")
    c = (n - 1) / 2
    r2 = (i - c) ** 2 + (j - c) ** 2
    last = length_k - 1 if last_k is None else last_k
    data = ((r2 <= 25) & (k >= first_k) & (k <= last)).float() * BONE_MU
    data[(r2 <= 49) & (k >= first_k) & (k < first_k + 3)] = BONE_MU  # the knob
    if sleeve:
        data = torch.where((r2 <= 196) & (data == 0), torch.full_like(data, 0.02), data)
    return Volume(data, (1.0, 1.0, 1.0))


def test_only_a_face_that_cuts_through_bone_counts():
    cut = cut_ends(rod(48))
    assert cut is not None
    band = cut.data.sum((1, 2))
    assert bool((band[-5:] > 0).all()) and float(band[:-5].sum()) == 0.0  # 5 mm deep, at the cut face only
    assert torch.equal(cut.data > 0, (rod(48).data > 0) & (cut.data > 0))  # only the CT's tissue
    assert cut_ends(rod(48, last_k=40)) is None  # the rod ends inside the box: nothing is cut
    touching = rod(48, last_k=40)
    touching.data[47, 15:17, 15:17] = BONE_MU  # 4 mm^2 of bone on the face: under 10 mm^2, a touch
    assert cut_ends(touching) is None


@pytest.fixture(scope="module")
def cut_case():
    """The cut rod's CT, and a 64 px X-ray of the rod going on beyond the CT's box (a longer CT
    placed so that the two overlap), seen from the side."""
    ct = rod(48)
    longer = rod(80, sleeve=True)
    cam = Camera(sdd=1000.0, pixel_spacing=(1.5, 1.5), size=(64, 64))
    centre = ct.center_lps()
    pose = c_arm_pose(centre, 700.0)
    with torch.no_grad():
        xray = Projector(longer, cam)(pose.float()).reshape(64, 64)  # same origin: the first 48 slices coincide
    return ct, cam, pose, xray


def test_the_cut_end_is_left_out_only_when_asked(cut_case):
    ct, cam, pose, xray = cut_case
    plain = RegistrationSession(ct, xray, cam, pose, method="intensity").problem
    assert plain.cut is None  # off by default
    problem = RegistrationSession(ct, xray, cam, pose, method="intensity",
                                  options=RegistrationOptions(exclude_cut_ends=True)).problem
    assert problem.cut is not None
    level = Level(64, 0, 0.0, "gradient_ncc")
    detector = problem.level_camera(0, level)
    with torch.no_grad():
        drr = problem.render(pose[None], 0, level)
    shadow = problem.cut_shadow(pose[None], 0, level)
    whole = problem.roi(drr, None, detector.width)
    kept = problem.roi(drr, None, detector.width, shadow)
    left_out = (whole - kept)[0, 0]
    assert float(left_out.sum()) > 0
    assert float((left_out * (1 - grow(shadow, CUT_GROW_PX))[0, 0]).sum()) == 0.0  # only where the cut end projects
    rows = left_out.sum(1).nonzero().flatten()
    support_rows = (drr[0, 0] > 0.02 * drr.max()).sum(1).nonzero().flatten()
    # the rod runs along the image's rows; only the cut end's rows are left out, the knob's end stays
    cut_end_last = bool(rows.float().mean() > support_rows.float().mean())
    end_row = int(support_rows.max()) if cut_end_last else int(support_rows.min())
    other_row = int(support_rows.min()) if cut_end_last else int(support_rows.max())
    assert bool((rows - end_row).abs().min() <= 2) and bool((rows - other_row).abs().min() > 10)
    # the DRR's cut edge has no counterpart in the X-ray: leaving it out raises the score at the truth
    with torch.no_grad():
        with_cut, _ = plain.similarity(pose[None], level, "gradient_ncc", as_asked=True)
        without_cut, _ = problem.similarity(pose[None], level, "gradient_ncc", as_asked=True)
    assert float(without_cut) > float(with_cut) + 0.02, (float(without_cut), float(with_cut))
