"""A small bone in a wide field of view (a carpal bone in a 1760 px intensifier image): its DRR
covers a fraction of a percent of the detector even where it is fully seen, so "the CT left the
field of view" must be judged from the CT's own footprint, not from the detector's area (which
stopped every refinement of a 20 mm piece of the wrist's radius at its first iteration)."""

import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose, invert_pose
from CorrRegLib.metrics import mtre
from CorrRegLib.phantom import small_phantom
from CorrRegLib.protocols import perturb_pose
from CorrRegLib.register import RegistrationOptions, View, register
from CorrRegLib.register.problem import Problem
from CorrRegLib.simulate import simulate_xray

pytestmark = pytest.mark.usefixtures("one_thread")

#: 960 px of 1.1 mm at 1012 mm: a field about 730 mm wide at the isocenter, where one vertebra
#: (some 60 x 40 mm with its processes, 80 px across) covers under 0.5 % of it
WIDE = Camera(1011.7, (1.1, 1.1), (960, 960))


@pytest.fixture(scope="module")
def one_vertebra():
    ph = small_phantom(seed=0)
    bone = ph.volume.keep_only(ph.labels == 3)
    iso = bone.bone_center_lps()
    camera_from_ct = c_arm_pose(iso, 700.0, 180.0, 0.0)
    return ph, bone, iso, camera_from_ct


def test_a_small_bone_fully_seen_is_in_the_field_of_view_and_one_moved_off_it_is_not(one_vertebra):
    ph, bone, iso, camera_from_ct = one_vertebra
    xray = simulate_xray(ph.volume, WIDE, camera_from_ct, dose=1e4, blur_mm=0.6, seed=0).image
    problem = Problem(bone, [View(xray, WIDE, torch.eye(4, dtype=torch.float64))], iso, camera_from_ct,
                      torch.device("cpu"), RegistrationOptions())
    away = camera_from_ct.clone()
    away[0, 3] += 900.0  # 900 mm sideways at 700 mm from the source: off the 1229 mm detector
    levels = RegistrationOptions().levels
    for level in levels:
        with torch.no_grad():
            _, shows = problem.similarity(torch.stack([camera_from_ct, away]), level)
        assert shows.tolist() == [True, False], level
    with torch.no_grad():  # the finest level: the bone in full detail covers a fraction of a percent
        covered = float((problem.render(camera_from_ct[None], 0, levels[-1]) > 1e-3).double().mean())
    assert covered < 0.005, f"the case is not small: {covered:.4f} of the detector"


def test_a_small_bone_in_wide_views_registers(one_vertebra):
    """Both views 70 deg apart, the X-rays of the whole phantom: the neighbouring vertebrae, which
    the CT does not hold, are in the image as a carpal bone's neighbours are."""
    ph, bone, iso, camera_from_ct = one_vertebra
    world_from_ct = torch.eye(4, dtype=torch.float64)
    cfw = [c_arm_pose(iso, 700.0, 180.0, 0.0), c_arm_pose(iso, 700.0, 250.0, 0.0)]
    views = [View(simulate_xray(ph.volume, WIDE, c, dose=1e4, blur_mm=0.6, seed=k).image, WIDE, c)
             for k, c in enumerate(cfw)]
    start = invert_pose(cfw[0]) @ perturb_pose(cfw[0], iso, (3.0, -2.0, 3.0), (3.0, -3.0, 4.0))
    targets = Problem(bone, views, iso, cfw[0] @ start, torch.device("cpu"), RegistrationOptions()).bone_points()
    res = register(bone, initial_pose=start, views=views, method="intensity", isocenter=iso)
    assert "left the field of view" not in res.message, res.message
    assert float(mtre(start, world_from_ct, targets)) > 4.0
    assert float(mtre(res.pose, world_from_ct, targets)) < 1.0, res.message
    assert not res.flagged, res.message
