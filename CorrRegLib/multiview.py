"""Geometry of several calibrated views: projection matrices, epipolar lines, triangulation.

Frames: each view has a ``Camera`` (CorrReg pixel convention: pixel (col c, row r) has its
centre at (c + 0.5, r + 0.5)) and a ``camera_from_world`` (4, 4) rigid map from a shared world
frame (mm) into its camera frame (DESIGN.md: x along columns, y along rows, z towards the
detector). A projection matrix P = K [R | t] (3, 4) maps homogeneous world points to
homogeneous pixels. Points are (N, 3) world mm, pixels (N, 2) as (u, v). Everything is float64.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch

from .geometry import Camera, check_rigid

Tensor = torch.Tensor


def _f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


def projection_matrix(camera: Camera, camera_from_world: Tensor) -> Tensor:
    """P = K [R | t], (3, 4): homogeneous world points (mm) to homogeneous pixels."""
    pose = check_rigid(_f64(camera_from_world))
    return camera.intrinsics() @ pose[:3, :]


def project(P: Tensor, points: Tensor) -> Tensor:
    """Pixels (N, 2) of world points (N, 3) under a projection matrix (3, 4)."""
    P, X = _f64(P), _f64(points).reshape(-1, 3)
    x = X @ P[:, :3].T + P[:, 3]
    return x[:, :2] / x[:, 2:3]


def camera_center(P: Tensor) -> Tensor:
    """The centre of projection (the X-ray source) of P in world coordinates (3,)."""
    P = _f64(P)
    return -torch.linalg.solve(P[:, :3], P[:, 3])


def _skew(v: Tensor) -> Tensor:
    return torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]], dtype=torch.float64)


def fundamental_matrix(P1: Tensor, P2: Tensor) -> Tensor:
    """F (3, 3) with x2^T F x1 = 0 for homogeneous pixels x1 (view 1), x2 (view 2) of one point;
    F x1 is the epipolar line of x1 in view 2. Normalised to unit Frobenius norm."""
    P1, P2 = _f64(P1), _f64(P2)
    c1 = torch.cat([camera_center(P1), torch.ones(1, dtype=torch.float64)])
    e2 = P2 @ c1
    F = _skew(e2) @ P2 @ torch.linalg.pinv(P1)
    return F / F.norm()


def _homogeneous(uv: Tensor) -> Tensor:
    uv = _f64(uv).reshape(-1, 2)
    return torch.cat([uv, torch.ones(len(uv), 1, dtype=torch.float64)], dim=1)


def epipolar_distances(F: Tensor, uv1: Tensor, uv2: Tensor) -> Tensor:
    """(N1, N2) symmetric epipolar distance in pixels: the mean of the distance of uv2[j] to the
    epipolar line of uv1[i] in view 2 and of uv1[i] to the line of uv2[j] in view 1."""
    F = _f64(F)
    x1, x2 = _homogeneous(uv1), _homogeneous(uv2)
    l2 = x1 @ F.T  # (N1, 3) lines in view 2
    l1 = x2 @ F  # (N2, 3) lines in view 1
    num = (l2 @ x2.T).abs()  # |x2^T F x1|, (N1, N2)
    d2 = num / l2[:, :2].norm(dim=1, keepdim=True)
    d1 = num / l1[:, :2].norm(dim=1)[None, :]
    return 0.5 * (d1 + d2)


def triangulate_points(
    projections: Sequence[Tensor], uv: Sequence[Tensor], refine: bool = True, iterations: int = 10
) -> Tensor:
    """World points (N, 3) seen at pixels ``uv[v]`` (N, 2) by the views with projection matrices
    ``projections[v]`` (3, 4), at least two views. Linear (DLT, with pixel coordinates
    normalised for conditioning), then, with ``refine``, Gauss-Newton on the reprojection error
    (the maximum-likelihood point for Gaussian pixel noise)."""
    Ps = [_f64(P) for P in projections]
    uvs = [_f64(u).reshape(-1, 2) for u in uv]
    if len(Ps) < 2 or len(Ps) != len(uvs):
        raise ValueError("triangulation needs at least two views, with one (N, 2) pixel array per projection matrix")
    n = uvs[0].shape[0]
    if any(u.shape[0] != n for u in uvs):
        raise ValueError(f"every view must give the same number of points, got {[u.shape[0] for u in uvs]}")
    # Conditioning: shift and scale each view's pixels (Hartley & Zisserman, 4.4).
    rows = []
    for P, u in zip(Ps, uvs):
        c = u.mean(0) if n > 1 else u[0]
        s = max(float((u - c).norm(dim=1).mean()), 1.0) if n > 1 else 1.0
        T = torch.tensor([[1 / s, 0, -c[0] / s], [0, 1 / s, -c[1] / s], [0, 0, 1]], dtype=torch.float64)
        Pn = T @ P
        un = (u - c) / s
        rows.append(un[:, 0:1] * Pn[2] - Pn[0])
        rows.append(un[:, 1:2] * Pn[2] - Pn[1])
    A = torch.stack(rows, dim=1)  # (N, 2V, 4)
    _, _, vh = torch.linalg.svd(A)
    Xh = vh[:, -1, :]
    X = Xh[:, :3] / Xh[:, 3:4]
    if refine:
        for _ in range(iterations):
            J_rows, r_rows = [], []
            for P, u in zip(Ps, uvs):
                x = X @ P[:, :3].T + P[:, 3]  # (N, 3)
                w = x[:, 2:3]
                proj = x[:, :2] / w
                r_rows.append(proj - u)
                # d(proj)/dX = (P[:2,:3] - proj * P[2,:3]) / w
                J_rows.append((P[None, :2, :3] - proj[:, :, None] * P[None, 2:3, :3]) / w[:, :, None])
            J = torch.cat(J_rows, dim=1)  # (N, 2V, 3)
            r = torch.cat(r_rows, dim=1)  # (N, 2V)
            JtJ = J.transpose(1, 2) @ J
            step = torch.linalg.solve(JtJ + 1e-12 * torch.eye(3, dtype=torch.float64), (J.transpose(1, 2) @ r[..., None]))[..., 0]
            X = X - step
            if float(step.norm(dim=1).max()) < 1e-10:
                break
    return X


def reprojection_errors(projections: Sequence[Tensor], uv: Sequence[Tensor], points: Tensor) -> Tensor:
    """(N, V) distances in pixels between ``uv[v]`` and the projections of ``points`` (N, 3)."""
    return torch.stack([(project(P, points) - _f64(u).reshape(-1, 2)).norm(dim=1) for P, u in zip(projections, uv)], dim=1)


def match_epipolar(F: Tensor, uv1: Tensor, uv2: Tensor, max_distance_px: float) -> list[tuple[int, int]]:
    """Correspondences (i, j) between points uv1 (view 1) and uv2 (view 2) by the epipolar
    constraint: a pair qualifies when its symmetric epipolar distance is below
    ``max_distance_px``; among the qualifying pairs, the one-to-one matching with the most
    pairs and then the smallest total distance is chosen (exactly, per connected group of
    candidates; a group of more than 12 candidate pairs is resolved greedily). Points with no
    candidate stay unmatched. Sorted by i."""
    d = epipolar_distances(F, uv1, uv2)
    cand = [(int(i), int(j)) for i, j in torch.nonzero(d < max_distance_px).tolist()]
    # connected components of the candidate graph
    groups: list[list[tuple[int, int]]] = []
    seen: set[int] = set()
    for k in range(len(cand)):
        if k in seen:
            continue
        stack, comp = [k], []
        seen.add(k)
        while stack:
            a = stack.pop()
            comp.append(cand[a])
            for b in range(len(cand)):
                if b not in seen and (cand[b][0] == cand[a][0] or cand[b][1] == cand[a][1]):
                    seen.add(b)
                    stack.append(b)
        groups.append(comp)
    matches: list[tuple[int, int]] = []
    for comp in groups:
        if len(comp) > 12:
            used_i, used_j = set(), set()
            for i, j in sorted(comp, key=lambda p: float(d[p])):
                if i not in used_i and j not in used_j:
                    matches.append((i, j))
                    used_i.add(i)
                    used_j.add(j)
            continue
        best, best_key = (), (0, 0.0)
        for size in range(len(comp), 0, -1):
            for subset in combinations(comp, size):
                if len({i for i, _ in subset}) == size and len({j for _, j in subset}) == size:
                    cost = sum(float(d[p]) for p in subset)
                    key = (size, -cost)
                    if key > best_key:
                        best, best_key = subset, key
            if best:
                break
        matches.extend(best)
    return sorted(matches)
