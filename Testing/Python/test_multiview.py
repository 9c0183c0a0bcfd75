"""Two calibrated views: projection matrices, epipolar geometry, triangulation, matching."""

import numpy as np
import pytest
import torch

from CorrRegLib.geometry import Camera, c_arm_pose, invert_pose, project_points
from CorrRegLib.multiview import (
    camera_center,
    epipolar_distances,
    fundamental_matrix,
    match_epipolar,
    project,
    projection_matrix,
    reprojection_errors,
    triangulate_points,
)


def two_views():
    """Two cameras ~70 degrees apart looking at the world origin, fx != fy."""
    cams = [Camera.from_intrinsics([[6000.0, 0, 870.0], [0, 6010.0, 880.0], [0, 0, 1]], (1760, 1760)),
            Camera.from_intrinsics([[6300.0, 0, 900.5], [0, 6290.0, 895.0], [0, 0, 1]], (1760, 1760))]
    poses = [c_arm_pose([0.0, 0.0, 0.0], 900.0, 180.0, 0.0), c_arm_pose([5.0, -3.0, 2.0], 1100.0, 110.0, 10.0)]
    return cams, poses


def points(n=12, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).uniform(-40, 40, (n, 3)), dtype=torch.float64)


def test_projection_matrix_matches_the_camera_model():
    cams, poses = two_views()
    X = points()
    for cam, pose in zip(cams, poses):
        P = projection_matrix(cam, pose)
        assert torch.allclose(project(P, X), project_points(cam, pose, X), atol=1e-9)
        assert torch.allclose(camera_center(P), invert_pose(pose)[:3, 3], atol=1e-9)


def test_triangulation_recovers_points_and_reports_reprojection():
    cams, poses = two_views()
    P = [projection_matrix(c, p) for c, p in zip(cams, poses)]
    X = points(20)
    uv = [project(p, X) for p in P]
    assert torch.allclose(triangulate_points(P, uv), X, atol=1e-8)
    # with pixel noise: the refined point reprojects at the noise level and lands near the truth
    gen = torch.Generator().manual_seed(1)
    noisy = [u + 0.3 * torch.randn(u.shape, generator=gen, dtype=torch.float64) for u in uv]
    Xn = triangulate_points(P, noisy)
    err = reprojection_errors(P, noisy, Xn)
    assert err.max() < 1.0 and (Xn - X).norm(dim=1).max() < 0.2
    lin = triangulate_points(P, noisy, refine=False)
    assert reprojection_errors(P, noisy, lin).pow(2).sum() >= err.pow(2).sum() - 1e-9  # refinement never worse
    with pytest.raises(ValueError, match="two views"):
        triangulate_points(P[:1], uv[:1])


def test_epipolar_constraint_and_matching():
    cams, poses = two_views()
    P = [projection_matrix(c, p) for c, p in zip(cams, poses)]
    X = points(10, seed=3)
    uv1, uv2 = project(P[0], X), project(P[1], X)
    F = fundamental_matrix(P[0], P[1])
    d = epipolar_distances(F, uv1, uv2)
    assert d.diagonal().max() < 1e-6
    # view 2's points in another order, plus two spurious detections: matched back exactly
    perm = torch.tensor([3, 0, 7, 1, 9, 2, 8, 4, 6, 5])
    extra = torch.tensor([[100.0, 200.0], [1500.0, 40.0]], dtype=torch.float64)
    uv2p = torch.cat([uv2[perm], extra])
    matches = match_epipolar(F, uv1, uv2p, max_distance_px=1.0)
    expected = sorted((int(perm[k]), k) for k in range(10))
    assert d.masked_fill(torch.eye(10, dtype=torch.bool), 1e9).min() > 1.0  # no two points share a line (1 px) here
    assert matches == expected  # the spurious detections stay unmatched
    # a wrong convention (extrinsics inverted) leaves nothing on its epipolar line
    Fw = fundamental_matrix(projection_matrix(cams[0], invert_pose(poses[0])), projection_matrix(cams[1], invert_pose(poses[1])))
    assert epipolar_distances(Fw, uv1, uv2).diagonal().median() > 20.0


def test_matching_resolves_a_shared_epipolar_line_by_the_total_distance():
    # two points of view 1 on nearly one epipolar line: the one-to-one matching with the smallest
    # total distance is chosen, not each point's nearest candidate
    F = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # lines v2 = v1
    uv1 = torch.tensor([[10.0, 100.0], [30.0, 100.4]], dtype=torch.float64)
    uv2 = torch.tensor([[50.0, 100.3], [70.0, 100.1]], dtype=torch.float64)
    d = epipolar_distances(F, uv1, uv2)
    assert torch.allclose(d, torch.tensor([[0.3, 0.1], [0.1, 0.3]], dtype=torch.float64), atol=1e-9)
    assert match_epipolar(F, uv1, uv2, 1.0) == [(0, 1), (1, 0)]
