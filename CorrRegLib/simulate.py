"""Realistic X-ray synthesis from a CT at a known pose (tests, demo, benchmarks, training).

Evaluation X-rays must not be the renderer's own noiseless output (DESIGN.md). This module
renders the line integral of attenuation densely and then degrades it the way an X-ray system
does::

    L          = Projector(volume, camera, samples_per_voxel=2)(pose)     line integral (mm * 1/mm)
    primary    = dose * heel(u, v) * exp(-L)                              expected photons per pixel
    expected   = primary + scatter * G_scatter * primary                  low-frequency scatter
    counts     = Poisson(expected)  (seeded),  clamped to >= 1
    detected   = G_psf * counts                                           detector blur (intensity domain)
    log image  = -log(detected / dose)                                    flat-field by the open-field dose only
    image      = clip((log image - p_lo) / (p_hi - p_lo), 0, 1) ** gamma  robust window (percentiles)
    image[~mask] = collimation_value                                      collimator shutters

Dense structures are bright (log domain). ``dose`` is the mean number of photons a pixel
receives without any object (I0, per pixel of the given camera); noise falls as 1/sqrt(dose).
``blur_mm`` is the standard deviation of the detector's Gaussian point-spread function,
measured on the detector (mm), so it is converted to pixels with ``camera.pixel_spacing``.
The blur acts on detected intensity, before the log, as a scintillator's light spread does.
``heel`` is the relative intensity change across the detector along ``heel_axis`` (a linear
ramp from 1 - heel/2 to 1 + heel/2; positive: brighter beam, so a lower log image, towards
larger u or v). ``scatter`` is the scatter-to-primary ratio, spread with a Gaussian of
``scatter_sigma_mm``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import Camera, invert_pose, transform_points
from .projector import Projector
from .volume import Volume

Tensor = torch.Tensor

#: Defaults of :func:`simulate_xray` (also the values :func:`random_degradation` varies).
DEFAULTS = dict(
    dose=1e4,
    blur_mm=0.5,
    gamma=1.0,
    window=(0.5, 99.5),
    collimation=None,
    collimation_value=1.0,
    heel=0.0,
    heel_axis="v",
    scatter=0.0,
    scatter_sigma_mm=40.0,
)


@dataclass
class SimulatedXRay:
    """A synthetic radiograph. Arrays are (H, W) for one pose, (B, H, W) for a batch."""

    image: Tensor  # float32, degraded log image (normalised to [0, 1] unless normalize=False)
    mask: Tensor  # bool, False where collimated
    line_integral: Tensor  # float32, noise-free line integral of attenuation (dimensionless)
    camera: Camera
    pose: Tensor  # camera_from_ct used (4, 4) or (B, 4, 4)
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Building blocks


def _gaussian_kernel(sigma_px: float, dtype, device) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


def gaussian_blur(img: Tensor, sigma_px: tuple[float, float]) -> Tensor:
    """Separable Gaussian blur of (..., H, W) images; ``sigma_px`` = (sigma along columns u,
    sigma along rows v) in pixels. Borders replicate; a sigma below 0.05 px is a no-op."""
    shape = img.shape
    x = img.reshape(-1, 1, shape[-2], shape[-1])
    su, sv = sigma_px
    if su >= 0.05:
        k = _gaussian_kernel(su, x.dtype, x.device)
        r = k.numel() // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    if sv >= 0.05:
        k = _gaussian_kernel(sv, x.dtype, x.device)
        r = k.numel() // 2
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(shape)


def heel_profile(height: int, width: int, heel: float, axis: str = "v", dtype=torch.float32, device=None) -> Tensor:
    """(H, W) relative beam intensity: a linear ramp from 1 - heel/2 to 1 + heel/2 across the
    detector along ``axis`` ('u': columns, left to right; 'v': rows, top to bottom)."""
    if not -2.0 < heel < 2.0:
        raise ValueError(f"heel must lie in (-2, 2) so the beam stays positive, got {heel}")
    if axis not in ("u", "v"):
        raise ValueError(f"heel_axis must be 'u' (columns) or 'v' (rows), got {axis!r}")
    n = width if axis == "u" else height
    s = (torch.arange(n, dtype=dtype, device=device) + 0.5) / n - 0.5
    ramp = 1.0 + heel * s
    return ramp.expand(height, width) if axis == "u" else ramp[:, None].expand(height, width)


def collimation_mask(height: int, width: int, collimation=None, device=None) -> Tensor:
    """(H, W) bool mask of the exposed field.

    ``collimation`` is None (open field), a float f in (0, 1] (a centred rectangle covering the
    fraction f of the width and of the height), a 4-sequence (u0, v0, u1, v1) of fractions of
    the width and height (the exposed box's left, top, right and bottom edges), or an (H, W)
    bool tensor (used as is).
    """
    if collimation is None:
        return torch.ones(height, width, dtype=torch.bool, device=device)
    if isinstance(collimation, Tensor) and collimation.dim() == 2:
        if tuple(collimation.shape) != (height, width):
            raise ValueError(f"collimation mask must be ({height}, {width}), got {tuple(collimation.shape)}")
        return collimation.to(device=device, dtype=torch.bool)
    if isinstance(collimation, (int, float)):
        f = float(collimation)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"a collimation fraction must lie in (0, 1], got {f}")
        box = (0.5 - f / 2, 0.5 - f / 2, 0.5 + f / 2, 0.5 + f / 2)
    else:
        box = tuple(float(v) for v in collimation)
        if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
            raise ValueError(f"collimation box must be (u0, v0, u1, v1) fractions with 0 <= u0 < u1 <= 1, got {collimation}")
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    mu = (u >= box[0]) & (u <= box[2])
    mv = (v >= box[1]) & (v <= box[3])
    return mv[:, None] & mu[None, :]


def _make_generator(seed, device: torch.device):
    if seed is None:
        return None
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=gen_device).manual_seed(int(seed))


def _poisson(expected: Tensor, generator) -> Tensor:
    if generator is None:
        return torch.poisson(expected)
    if generator.device.type != expected.device.type:
        return torch.poisson(expected.cpu(), generator=generator).to(expected.device)
    return torch.poisson(expected, generator=generator)


def degrade(
    line_integral: Tensor,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    *,
    dose: float | None = DEFAULTS["dose"],
    blur_mm: float = DEFAULTS["blur_mm"],
    gamma: float = DEFAULTS["gamma"],
    window: Sequence[float] = DEFAULTS["window"],
    collimation=DEFAULTS["collimation"],
    collimation_value: float = DEFAULTS["collimation_value"],
    heel: float = DEFAULTS["heel"],
    heel_axis: str = DEFAULTS["heel_axis"],
    scatter: float = DEFAULTS["scatter"],
    scatter_sigma_mm: float = DEFAULTS["scatter_sigma_mm"],
    normalize: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Turn noise-free line integrals (..., H, W) into degraded X-ray images; returns
    (image, mask) with the input's leading shape. See the module docstring for the model.

    ``dose`` None (or inf) gives the noise-free expected counts. ``normalize=False`` returns
    the log image itself (no window, gamma or collimation value; the mask is still returned).
    ``generator`` (a torch.Generator) overrides ``seed``.
    """
    if line_integral.dim() < 2:
        raise ValueError(f"line integrals must be (..., H, W), got shape {tuple(line_integral.shape)}")
    if dose is not None and not (dose > 0):
        raise ValueError(f"dose (photons per pixel) must be positive, got {dose}")
    for name, value in (("blur_mm", blur_mm), ("scatter", scatter), ("scatter_sigma_mm", scatter_sigma_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be positive, got {gamma}")
    lo_pct, hi_pct = (float(w) for w in window)
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"window must be two percentiles 0 <= lo < hi <= 100, got {window}")
    L = line_integral.detach().float()
    h, w = L.shape[-2:]
    dx, dy = (float(s) for s in pixel_spacing)
    dev = L.device
    i0 = 1.0 if dose is None or math.isinf(dose) else float(dose)

    primary = i0 * heel_profile(h, w, heel, heel_axis, device=dev) * torch.exp(-L)
    expected = primary
    if scatter > 0:
        expected = primary + scatter * gaussian_blur(primary, (scatter_sigma_mm / dx, scatter_sigma_mm / dy))
    if dose is None or math.isinf(dose):
        counts = expected
    else:
        gen = generator if generator is not None else _make_generator(seed, dev)
        counts = _poisson(expected, gen).clamp(min=1.0)
    if blur_mm > 0:
        counts = gaussian_blur(counts, (blur_mm / dx, blur_mm / dy))
    log_img = -torch.log(counts / i0)

    mask = collimation_mask(h, w, collimation, device=dev).expand(L.shape)
    if not normalize:
        return log_img, mask
    flat = log_img.reshape(-1, h * w)
    flat_mask = mask.reshape(-1, h * w)
    out = torch.empty_like(flat)
    q = torch.tensor([lo_pct / 100.0, hi_pct / 100.0], device=dev)
    for b in range(flat.shape[0]):
        vals = flat[b][flat_mask[b]]
        if vals.numel() == 0:
            out[b] = collimation_value
            continue
        if vals.numel() > 4_000_000:  # torch.quantile's input limit; a subsample suffices
            vals = vals[:: int(math.ceil(vals.numel() / 4_000_000))]
        lo, hi = torch.quantile(vals, q).tolist()
        if hi - lo < 1e-6:
            hi = lo + 1.0
        x = ((flat[b] - lo) / (hi - lo)).clamp(0.0, 1.0)
        if gamma != 1.0:
            x = x**gamma
        out[b] = torch.where(flat_mask[b], x, torch.full_like(x, float(collimation_value)))
    return out.reshape(L.shape), mask


# --------------------------------------------------------------------------------------------
# Public entry points


def simulate_xray(
    source,
    camera: Camera | None = None,
    pose: Tensor | None = None,
    *,
    dose: float | None = DEFAULTS["dose"],
    blur_mm: float = DEFAULTS["blur_mm"],
    gamma: float = DEFAULTS["gamma"],
    window: Sequence[float] = DEFAULTS["window"],
    collimation=DEFAULTS["collimation"],
    collimation_value: float = DEFAULTS["collimation_value"],
    heel: float = DEFAULTS["heel"],
    heel_axis: str = DEFAULTS["heel_axis"],
    scatter: float = DEFAULTS["scatter"],
    scatter_sigma_mm: float = DEFAULTS["scatter_sigma_mm"],
    normalize: bool = True,
    seed: int | None = None,
    raw: bool = False,
    samples_per_voxel: float = 2.0,
) -> SimulatedXRay:
    """Synthesise the X-ray of a CT seen with ``camera`` at camera_from_ct ``pose``.

    Args:
        source: a ``Volume`` (attenuation, 1/mm), an object with a ``.volume`` (a SpinePhantom),
            or a ``Projector`` (then its camera is used and ``camera`` may be None; its own
            sampling density applies).
        pose: (4, 4) or (B, 4, 4) camera_from_ct (LPS, mm). The images are (H, W) or (B, H, W).
        dose: unattenuated photons per detector pixel (I0); None for no noise.
        blur_mm: detector PSF standard deviation in mm at the detector.
        gamma: exponent applied after the [0, 1] window (> 1 darkens mid-tones).
        window: the percentiles (of the exposed pixels) mapped to 0 and 1.
        collimation: see :func:`collimation_mask`; ``collimation_value`` fills the shutters.
        heel: relative beam intensity change across the detector along ``heel_axis``.
        scatter: scatter-to-primary ratio (0 = none), blurred by ``scatter_sigma_mm``.
        normalize: False returns the unwindowed log image (-log(counts / dose)).
        seed: makes the noise reproducible (the same seed gives the same image on a device).
        raw: return the noise-free line integral itself as ``image`` (no degradation).
        samples_per_voxel: ray sampling density when a projector is built here (denser than
            registration's default of 1, so the renderer used to register differs).
    """
    if pose is None:
        raise ValueError("simulate_xray needs the pose (camera_from_ct, 4x4) to render at")
    if isinstance(source, Projector):
        projector = source
        if camera is not None and camera != projector.camera:
            raise ValueError("camera differs from the projector's camera; pass one or the other")
        camera = projector.camera
    else:
        volume = getattr(source, "volume", source)
        if not isinstance(volume, Volume):
            raise TypeError(f"source must be a Volume, a Projector or have a .volume, got {type(source).__name__}")
        if camera is None:
            raise ValueError("simulate_xray needs a Camera when given a volume")
        projector = Projector(volume, camera, samples_per_voxel=samples_per_voxel).to(volume.data.device)
    pose = torch.as_tensor(pose)
    single = pose.dim() == 2
    with torch.no_grad():
        li = projector(pose.detach().to(device=projector.device, dtype=torch.float32))
    li = li[:, 0] if not single else li[0]
    check_render(li, projector.volume, camera, pose)
    params = dict(
        dose=dose, blur_mm=blur_mm, gamma=gamma, window=tuple(window), collimation=collimation,
        collimation_value=collimation_value, heel=heel, heel_axis=heel_axis, scatter=scatter,
        scatter_sigma_mm=scatter_sigma_mm, normalize=normalize, seed=seed, raw=raw,
        samples_per_voxel=None if isinstance(source, Projector) else samples_per_voxel,
        n_samples_per_ray=projector.n_samples,
        blur_px=(blur_mm / camera.pixel_spacing[0], blur_mm / camera.pixel_spacing[1]),
    )
    if raw:
        mask = torch.ones(li.shape, dtype=torch.bool, device=li.device)
        return SimulatedXRay(li.clone(), mask, li, camera, pose, params)
    img, mask = degrade(
        li, camera.pixel_spacing, dose=dose, blur_mm=blur_mm, gamma=gamma, window=window,
        collimation=collimation, collimation_value=collimation_value, heel=heel, heel_axis=heel_axis,
        scatter=scatter, scatter_sigma_mm=scatter_sigma_mm, normalize=normalize, seed=seed,
    )
    return SimulatedXRay(img, mask.clone(), li, camera, pose, params)


#: Share of the detector that must see the CT before :func:`check_render` stops warning.
MIN_COVERAGE = 0.01


def check_render(line_integral: Tensor, volume: Volume, camera: Camera, pose: Tensor) -> None:
    """Refuse a render that cannot be an X-ray: line integrals (H, W) or (B, H, W) that are zero
    everywhere (the CT is out of view, so the "X-ray" would be noise alone) or not finite, or a
    pose that puts the CT's centre behind the source or beyond the detector. The message names
    the likely cause (an inverted pose, the CT behind the source or beyond the detector, out of
    the field of view, a principal point off the detector). Warns when less than
    ``MIN_COVERAGE`` of the detector sees the CT."""
    li = line_integral.reshape(-1, *line_integral.shape[-2:])
    poses = torch.as_tensor(pose, dtype=torch.float64).detach().cpu().reshape(-1, 4, 4)
    for b in range(li.shape[0]):
        which = f" (pose {b})" if li.shape[0] > 1 else ""
        if not bool(torch.isfinite(li[b]).all()):
            raise ValueError(f"the render{which} holds NaN or Inf values; check the camera and the pose for NaN or Inf")
        depth = _centre_depth(volume, poses[b])
        covered = float((li[b] > 1e-6).float().mean())
        if covered == 0.0 and float(volume.data.max()) <= 0.0:
            volume.check_content()  # only air: say so, not "out of view"
        if covered == 0.0 or not 0.0 < depth < camera.sdd:
            result = "noise alone" if covered == 0.0 else "physically impossible"
            raise ValueError(
                f"the CT is not in view at this pose{which}, so its X-ray would be {result}: "
                + why_not_in_view(volume, camera, poses[b])
            )
        if covered < MIN_COVERAGE:
            warnings.warn(
                f"only {covered:.2%} of the detector sees the CT at this pose{which}; "
                "check the pose (camera_from_ct) and the camera", stacklevel=3
            )


def _centre_depth(volume: Volume, pose: Tensor) -> float:
    return float(transform_points(pose, volume.center_lps().reshape(1, 3))[0, 2])


def _shadow(volume: Volume, camera: Camera, pose: Tensor) -> tuple[float, float, float, float] | None:
    """The (u0, u1, v0, v1) pixel box of the CT's shadow, None unless the CT lies wholly in
    front of the source."""
    pts = transform_points(pose, volume.corners_lps())
    if not bool((pts[:, 2] > 1e-6).all()):
        return None
    dx, dy = camera.pixel_spacing
    cx, cy = camera.principal_point
    u = camera.sdd / dx * pts[:, 0] / pts[:, 2] + cx
    v = camera.sdd / dy * pts[:, 1] / pts[:, 2] + cy
    return float(u.min()), float(u.max()), float(v.min()), float(v.max())


def _in_view(volume: Volume, camera: Camera, pose: Tensor) -> bool:
    box = _shadow(volume, camera, pose)
    return (box is not None and 0.0 < _centre_depth(volume, pose) < camera.sdd
            and box[0] < camera.width and box[1] > 0 and box[2] < camera.height and box[3] > 0)


def why_not_in_view(volume: Volume, camera: Camera, pose: Tensor) -> str:
    """The likely reason why the CT is not in view of ``camera`` at ``pose``, with the fix."""
    w, h = camera.size
    cx, cy = camera.principal_point
    pp = ""
    if not (-w <= cx <= 2 * w and -h <= cy <= 2 * h):
        pp = (f" The principal point ({cx:g}, {cy:g}) px lies far off the {w} x {h} px detector: it is in pixels "
              f"(default: the centre, ({w / 2:g}, {h / 2:g})).")
    if _in_view(volume, camera, invert_pose(pose)):
        return ("the pose looks inverted: its inverse shows the CT. A pose must be camera_from_ct (it maps CT points "
                "into the camera frame); this one is probably ct_from_camera (where the C-arm sits in the CT, as "
                "Slicer's transform node shows it): pass its inverse." + pp)
    depth = _centre_depth(volume, pose)
    if depth <= 0:
        return (f"the CT lies behind the X-ray source (its centre's depth in the camera frame is {depth:.0f} mm; it "
                f"must lie between the source, at 0, and the detector, at sdd = {camera.sdd:g} mm): check the pose's "
                "translation and its direction (camera_from_ct)." + pp)
    if depth >= camera.sdd:
        return (f"the CT lies beyond the detector (its centre's depth is {depth:.0f} mm, the sdd {camera.sdd:g} mm): "
                "check the pose's translation (mm) and the sdd." + pp)
    box = _shadow(volume, camera, pose)
    where = "" if box is None else f" (its shadow spans u {box[0]:.0f} to {box[1]:.0f} px, v {box[2]:.0f} to {box[3]:.0f} px)"
    return (f"the CT lies outside the field of view of the {w} x {h} px detector{where}: check the pose and the "
            "camera (detector size, pixel spacing, principal point)." + pp)


def random_degradation(generator: torch.Generator | int | None = None) -> dict:
    """Domain-randomised degradation parameters for training, as keyword arguments of
    :func:`simulate_xray` / :func:`degrade`:

    dose log-uniform in [1e3, 1e5] photons/pixel; blur_mm uniform in [0.2, 1.2]; gamma
    log-uniform in [0.7, 1.4]; window percentiles lo in [0, 2], hi in [98, 100]; heel uniform in
    [-0.3, 0.3] along a random axis; scatter uniform in [0, 0.3]; collimation with probability
    0.3, a box whose edges sit 3-20 % inside the detector's.
    """
    if generator is None or isinstance(generator, int):
        g = torch.Generator().manual_seed(0 if generator is None else int(generator))
    else:
        g = generator

    def uni(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=g, device=g.device))

    params = dict(
        dose=10 ** uni(3.0, 5.0),
        blur_mm=uni(0.2, 1.2),
        gamma=math.exp(uni(math.log(0.7), math.log(1.4))),
        window=(uni(0.0, 2.0), uni(98.0, 100.0)),
        heel=uni(-0.3, 0.3),
        heel_axis="u" if uni(0, 1) < 0.5 else "v",
        scatter=uni(0.0, 0.3),
        collimation=None,
    )
    if uni(0, 1) < 0.3:
        params["collimation"] = (uni(0.03, 0.2), uni(0.03, 0.2), 1 - uni(0.03, 0.2), 1 - uni(0.03, 0.2))
    return params
