"""Training losses of the correlation-driven network: L_appro, L_decomp and their uncertainty
weighting (see docs/network.md).

Pose perturbations are twists ``delta = (omega, v)`` (radians, mm) applied *about the
isocenter* in the camera frame: with c the isocenter's position in the camera frame under the
current pose P, ``pose(delta) = T(c) exp(delta) T(-c) P``. So omega rotates the CT about its
isocenter (about axes parallel to the camera axes) and v translates it in camera millimetres,
and the two parts do not mix at delta = 0 (a twist about the source would move the isocenter by
sod * |omega| ~ 700 mm per radian).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .geometry import invert_pose, make_pose, se3_exp, se3_log, transform_points

Tensor = torch.Tensor

#: Added in quadrature to vector norms when normalising directions: v / sqrt(|v|^2 + eps^2).
DIRECTION_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Pose parametrisation


def _batched(x: Tensor, b: int) -> Tensor:
    return x.expand(b, *x.shape[-1:]) if x.dim() == 1 else x


def isocenter_in_camera(pose: Tensor, isocenter_ct: Tensor) -> Tensor:
    """(B, 3) camera-frame positions of the CT isocenter (LPS mm, (3,) or (B, 3)) under ``pose``."""
    iso = _batched(isocenter_ct.to(pose), pose.shape[0])
    return transform_points(pose, iso[:, None, :])[:, 0]


def twist_about_isocenter(pose: Tensor, delta: Tensor, isocenter_ct: Tensor) -> Tensor:
    """``T(c) exp(delta) T(-c) pose`` for poses (B, 4, 4), twists (B, 6) = (rotation vector rad,
    translation mm) and the isocenter (LPS, (3,) or (B, 3)); c = the isocenter in the camera frame."""
    c = isocenter_in_camera(pose, isocenter_ct).to(delta.dtype)
    eye = torch.eye(3, dtype=delta.dtype, device=delta.device).expand(delta.shape[0], 3, 3)
    to_c = make_pose(eye, c)
    from_c = make_pose(eye, -c)
    return to_c @ se3_exp(delta) @ from_c @ pose.to(delta.dtype)


def geodesic_direction(pose: Tensor, true_pose: Tensor, isocenter_ct: Tensor) -> Tensor:
    """Gradient (B, 6) with respect to delta, at delta = 0, of the squared SE(3) geodesic
    distance ``|| log( C^-1 pose(delta) true^-1 C ) ||^2`` between the perturbed pose and the
    truth, in the isocenter-centred camera frame (C = T(c)). It points *away* from the truth;
    its negative is the direction towards it. Computed in float64 by autograd."""
    device = pose.device
    # on the CPU: float64 everywhere (Apple MPS has no float64), and it is only (B, 6) numbers
    pose = pose.detach().double().cpu()
    true_pose = true_pose.detach().double().cpu()
    iso = torch.as_tensor(isocenter_ct).detach().double().cpu()
    with torch.enable_grad():
        delta = torch.zeros(pose.shape[0], 6, dtype=torch.float64, requires_grad=True)
        c = isocenter_in_camera(pose, iso)
        eye = torch.eye(3, dtype=torch.float64).expand(pose.shape[0], 3, 3)
        to_c, from_c = make_pose(eye, c), make_pose(eye, -c)
        rel = from_c @ twist_about_isocenter(pose, delta, iso) @ invert_pose(true_pose) @ to_c
        dist2 = se3_log(rel).pow(2).sum()
        (grad,) = torch.autograd.grad(dist2, delta)
    return grad.to(device)


def unit_parts(v: Tensor, eps: float = DIRECTION_EPS) -> tuple[Tensor, Tensor]:
    """Rotation part v[:, :3] and translation part v[:, 3:], each scaled to unit length
    (eps-safe: a zero vector stays zero). They are normalised separately because radians and
    millimetres have unrelated scales."""
    r, t = v[:, :3], v[:, 3:]
    return r / torch.sqrt(r.pow(2).sum(-1, keepdim=True) + eps * eps), t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + eps * eps)


# --------------------------------------------------------------------------------------------
# Network-guided pose gradient


class PoseGradient(NamedTuple):
    score: Tensor  # (B,) network score at the current pose (lower = better aligned)
    grad: Tensor  # (B, 6) d score / d delta: (rotation about the isocenter rad, translation mm)
    drr: Tensor  # (B, C, H, W) the DRR rendered at the current pose


def pose_gradient(net, projector, xray: Tensor, pose: Tensor, isocenter_ct: Tensor, create_graph: bool = False) -> PoseGradient:
    """Score of (xray, DRR(pose)) and its gradient with respect to a twist about the isocenter.

    ``projector`` is a ``Projector`` (or any callable poses (B, 4, 4) -> DRRs); ``xray`` is
    (B, 1, H, W), (1, H, W) or (H, W); ``pose`` is (B, 4, 4) or (4, 4) camera_from_ct. Descend
    along ``-grad`` to improve the pose, e.g. ``twist_about_isocenter(pose, -step * unit, iso)``.
    With ``create_graph`` the gradient stays differentiable (L_appro training).
    """
    single = pose.dim() == 2
    poses = pose[None] if single else pose
    dtype = torch.float64 if poses.dtype == torch.float64 else torch.float32
    iso = torch.as_tensor(isocenter_ct).to(device=poses.device, dtype=dtype)
    with torch.enable_grad():
        delta = torch.zeros(poses.shape[0], 6, dtype=dtype, device=poses.device, requires_grad=True)
        moved = twist_about_isocenter(poses.to(dtype), delta, iso)
        drr = projector(moved)
        param = next(net.parameters(), None)
        if param is not None:
            drr_in = drr.to(param.dtype)
            x_in = xray.to(device=param.device, dtype=param.dtype)
        else:
            drr_in, x_in = drr, xray
        score = net(x_in, drr_in)
        (grad,) = torch.autograd.grad(score.sum(), delta, create_graph=create_graph)
    if not create_graph:
        score, grad, drr = score.detach(), grad.detach(), drr.detach()
    return PoseGradient(score, grad, drr)


# --------------------------------------------------------------------------------------------
# L_appro

#: Lever arm (mm) that converts a rotation (rad) into a displacement when choosing the
#: finite-difference step: a point this far from the isocenter moves lever * |omega| mm.
ROTATION_LEVER_MM = 100.0


class _ProjectorJacobianTranspose(torch.autograd.Function):
    """g = J^T u, where J = d DRR / d delta is the projector's pose Jacobian at delta = 0.

    The value (computed exactly by the caller with one first-order backward through the
    projector) is passed in; the backward needs J v for the incoming v = dL/dg (B, 6), a
    Jacobian-vector product, which we take by a central finite difference along v: two extra
    renders. This replaces autograd's second derivative of 3D grid_sample, which dominates the
    cost of a training step on a CPU (about 6x slower than the whole rest of the step)."""

    @staticmethod
    def forward(ctx, u, value, projector, pose, iso, step_mm):
        ctx.projector, ctx.step_mm = projector, step_mm
        ctx.save_for_backward(pose, iso)
        return value.clone()

    @staticmethod
    def backward(ctx, v):
        pose, iso = ctx.saved_tensors
        scale = ROTATION_LEVER_MM * v[:, :3].norm(dim=-1) + v[:, 3:].norm(dim=-1)  # mm per unit of v
        eps = ctx.step_mm / scale.clamp_min(1e-30)
        d = v * eps[:, None]
        with torch.no_grad():
            both = ctx.projector(twist_about_isocenter(torch.cat([pose, pose]), torch.cat([d, -d]), iso))
            plus, minus = both.chunk(2, dim=0)
            jv = (plus - minus) / (2 * eps.view(-1, *[1] * (plus.dim() - 1)))
            jv = torch.where(scale.view(-1, *[1] * (plus.dim() - 1)) > 0, jv, torch.zeros_like(jv))
        return jv.to(v.dtype), None, None, None, None, None


class ApproLoss(NamedTuple):
    loss: Tensor  # scalar: mean over the batch of |u_r - t_r|^2 + |u_t - t_t|^2
    cos_rotation: Tensor  # (B,) cosine between -grad_rot and the direction towards the truth
    cos_translation: Tensor  # (B,)
    score: Tensor  # (B,)
    features: dict | None


def appro_loss(
    net, projector, xray: Tensor, pose: Tensor, true_pose: Tensor, isocenter_ct: Tensor, return_features: bool = False,
    exact: bool | None = None, fd_step_mm: float = 0.05,
) -> ApproLoss:
    """ProST's double-backward loss. The network's score gradient with respect to the pose twist
    (kept in the graph, ``create_graph=True``) should point along the gradient of the geodesic
    distance to the truth: both point *away* from the truth, so descending the score approaches
    it. Rotation and translation parts are made unit vectors separately and compared by their
    squared difference, evaluated as 2 - 2 cos (per part: 0 aligned, 2 orthogonal or vanishing
    gradient, 4 opposite). A part whose target is zero (already at the truth) contributes nothing.

    ``exact=True`` differentiates twice through network *and* projector with autograd.
    ``exact=False`` (the default unless the network has a volume adapter, whose weights change
    the projector's Jacobian) differentiates twice through the network only and takes the
    projector's Jacobian-vector product by a central difference moving points about
    ``fd_step_mm``: the same gradient to about 1e-3 relative, several times faster.
    """
    if exact is None:
        exact = getattr(net, "adapter", None) is not None
    b = pose.shape[0]
    dtype, dev = torch.float32, xray.device
    iso = torch.as_tensor(isocenter_ct).to(device=dev, dtype=dtype)
    base = pose.detach().to(device=dev, dtype=dtype)
    delta = torch.zeros(b, 6, dtype=dtype, device=dev, requires_grad=True)
    drr = projector(twist_about_isocenter(base, delta, iso))
    if exact:
        score, feats = net(xray, drr, return_features=True)
        (grad,) = torch.autograd.grad(score.sum(), delta, create_graph=True)
    else:
        drr_in = drr.detach().requires_grad_(True)
        score, feats = net(xray, drr_in, return_features=True)
        (u,) = torch.autograd.grad(score.sum(), drr_in, create_graph=True)
        (value,) = torch.autograd.grad(drr, delta, grad_outputs=u.detach())
        grad = _ProjectorJacobianTranspose.apply(u, value, projector, base, iso, fd_step_mm)
    target = geodesic_direction(pose, true_pose, iso).to(grad)
    g_r, g_t = unit_parts(grad)
    t_r, t_t = unit_parts(target)
    cos_r, cos_t = (g_r * t_r).sum(-1), (g_t * t_t).sum(-1)
    # |g^ - t^|^2 = 2 - 2 cos for unit vectors. Written as 2 - 2 cos it also holds when the
    # network's gradient vanishes (g^ = 0 scores 2, like a random direction); the literal squared
    # difference would score 1 there and reward a network whose pose gradient collapses.
    has_r = (target[:, :3].norm(dim=-1) > 1e-9).to(grad)  # a part already right is skipped
    has_t = (target[:, 3:].norm(dim=-1) > 1e-9).to(grad)
    per_sample = has_r * (2.0 - 2.0 * cos_r) + has_t * (2.0 - 2.0 * cos_t)
    return ApproLoss(
        per_sample.mean(),
        cos_r.detach(),
        cos_t.detach(),
        score.detach(),
        feats if return_features else None,
    )


# --------------------------------------------------------------------------------------------
# L_decomp


def ncc(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalised cross-correlation (B,) of two (B, ...) tensors over all non-batch dimensions."""
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    num = (a * b).sum(1)
    den = torch.sqrt(a.pow(2).sum(1) * b.pow(2).sum(1) + eps * eps)
    return num / den


def decomposition_loss(features: dict[str, Tensor], offset: float = 1.01) -> Tensor:
    """L_decomp = NCC(Gx, Gm)^2 / (offset + NCC(Lx, Lm)), the batch mean.

    The paper writes NCC_g / (NCC_l + eps); as written it is unbounded below and flips sign
    when NCC_l < -eps (both NCCs lie in [-1, 1]). We use CDDFuse's form: squaring the global
    correlation makes the minimum "uncorrelated" (not "anti-correlated", which is as much
    shared content), and offset 1.01 keeps the denominator in [0.01, 2.01], so the loss is
    finite, non-negative and decreases as the local features of X-ray and DRR correlate.
    """
    cc_g = ncc(features["Gx"], features["Gm"])
    cc_l = ncc(features["Lx"], features["Lm"])
    return (cc_g.pow(2) / (offset + cc_l)).mean()


# --------------------------------------------------------------------------------------------
# Uncertainty weighting


class UncertaintyWeighting(nn.Module):
    """L = L_appro / (2 s1^2) + L_decomp / (2 s2^2) + log s1 + log s2 (Kendall et al.), with
    learnable log-variances z_i = log s_i^2: L = sum_i 0.5 exp(-z_i) L_i + 0.5 z_i.

    The optimum for z_i is log L_i, which runs to -inf as a loss approaches 0 (L_decomp can);
    the log-variances are therefore clamped to [min_log_var, max_log_var] in the forward pass.
    """

    def __init__(self, n: int = 2, min_log_var: float = -6.0, max_log_var: float = 6.0) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(n))
        self.min_log_var = float(min_log_var)
        self.max_log_var = float(max_log_var)

    def forward(self, *losses: Tensor) -> Tensor:
        if len(losses) != self.log_vars.numel():
            raise ValueError(f"expected {self.log_vars.numel()} losses, got {len(losses)}")
        z = self.log_vars.clamp(self.min_log_var, self.max_log_var)
        total = 0.0
        for i, loss in enumerate(losses):
            total = total + 0.5 * torch.exp(-z[i]) * loss + 0.5 * z[i]
        return total

    def weights(self) -> list[float]:
        """Current effective weights 1 / (2 s_i^2)."""
        z = self.log_vars.detach().clamp(self.min_log_var, self.max_log_var)
        return (0.5 * torch.exp(-z)).tolist()
