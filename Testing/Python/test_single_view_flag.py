"""One view of a CT that explains little of the image is flagged (options.min_single_view_edges):
what the CT does not hold can pull the pose along the depth and roll one view leaves loose, and
on the wrist every such result explained its view better than the true pose, so the flag rests on
how much of the image the CT explains, not on anything the view could confirm."""

import pytest
import torch

from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import get_protocol, make_cases
from CorrRegLib.register import RegistrationOptions, View, register
from CorrRegLib.simulate import simulate_xray
from test_local_starts import two_views

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGE = "the CT explains little of it"


def clutter(image: torch.Tensor, strength: float) -> torch.Tensor:
    """``image`` plus sharp bars the CT does not hold (8 px stripes, ``strength`` x the image's range)."""
    bars = ((torch.arange(image.shape[-1]) // 8) % 2).to(image.dtype)  # broadcast over the rows
    return image + strength * float(image.max() - image.min()) * bars


@pytest.fixture(scope="module")
def vertebrae():
    ph = small_phantom(seed=0)
    return ph, ph.volume.keep_only((ph.labels >= 1) & (ph.labels <= 5))


def test_one_view_that_the_ct_explains_is_not_flagged_for_it(vertebrae):
    ph, bone = vertebrae
    cam = get_protocol("paper", detector_downsample=4).camera
    truth = make_cases(get_protocol("paper", detector_downsample=4), ph.volume.bone_center_lps(), 1, seed=0)[0].true_pose
    xray = simulate_xray(ph.volume, cam, truth, dose=1e4, blur_mm=0.6, seed=0).image
    clean = register(bone, xray, cam, truth, method="intensity", isocenter=bone.bone_center_lps())
    assert clean.evidence["gradient_ncc"] > RegistrationOptions().min_single_view_edges
    assert MESSAGE not in clean.message

    busy = register(bone, clutter(xray, 1.5), cam, truth, method="intensity", isocenter=bone.bone_center_lps())
    assert busy.evidence["gradient_ncc"] < RegistrationOptions().min_single_view_edges, busy.evidence
    assert busy.flagged and MESSAGE in busy.message and "second view" in busy.message, busy.message

    off = register(bone, clutter(xray, 1.5), cam, truth, method="intensity", isocenter=bone.bone_center_lps(),
                   options=RegistrationOptions(min_single_view_edges=None))
    assert MESSAGE not in off.message


def test_several_views_are_not_judged_by_it(vertebrae):
    """Two views with the same clutter: each explains as little, but the views' unexplained parts
    differ and fix what one view leaves loose (the wrist's biplane results are right at 0.28-0.33)."""
    ph, bone = vertebrae
    iso = ph.volume.bone_center_lps()
    truth = torch.eye(4, dtype=torch.float64)
    cam, cfw, views = two_views(ph.volume, truth, iso)
    busy = [View(clutter(v.image, 1.5), v.camera, v.camera_from_world) for v in views]
    res = register(bone, initial_pose=truth, views=busy, method="intensity", isocenter=bone.bone_center_lps())
    assert res.evidence["gradient_ncc"] < RegistrationOptions().min_single_view_edges, res.evidence
    assert MESSAGE not in res.message
