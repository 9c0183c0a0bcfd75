"""Field-of-view masks: which pixels of a real X-ray carry an image of the patient.

Real radiographs are not exposed everywhere: an image intensifier sees a disc (black, or a
constant, outside), collimator shutters leave flat bands or a box, some systems burn a flat
border or text labels into the pixels. Those pixels must not enter a similarity measure.

:func:`detect_fov_mask` finds them automatically; :func:`read_mask` reads a user's mask image.
A mask is a bool (H, W) array indexed [row, col], True where the pixel is usable.

Detection (:func:`detect_fov`) looks for *step* edges between a region at one extreme of the
grey range that touches the image border (the outside of the field) and the exposed image:

1. the image is scaled to [0, 1] (0.1 / 99.9 percentiles) and, if large, shrunk to at most
   ``work_px`` pixels a side (block averages) to find candidates quickly;
2. the pixels near either extreme (within 12 % of the range) connected to the image border form
   the candidate outside; the boundary pixels of that region where the grey level jumps (a
   collimator blade or the intensifier rim is a step; the outline of a body or of air is not,
   because a projected body thins out continuously) are the edge points;
3. a circle is fitted to the edge points (RANSAC, then least squares); failing that, or for the
   points the circle does not explain, axis-aligned lines (collimator blades, flat borders);
4. the shape is refined on the full-resolution image: the edge is put where the grey-level
   profile across it is steepest (sub-pixel), and fitted again;
5. the mask is the inside of the shapes, shrunk by ``margin_px`` (default 2 px + 0.5 % of the
   image size) so the blurred rim stays out, minus small flat burned-in labels.

An image without such edges (an open field) gets an all-True mask. Geometry is reported in
CorrReg's pixel coordinates (the centre of pixel (col c, row r) is (c + 0.5, r + 0.5)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

Tensor = torch.Tensor

#: Fraction of the grey range next to either extreme where the outside of the field may lie.
EXTREME_BAND = 0.12
#: Smallest grey-level jump (fraction of the range, over ~2 px) that counts as a step edge.
MIN_STEP = 0.15


@dataclass
class FovDetection:
    """What :func:`detect_fov` found. ``circle`` is (cx, cy, r) in pixels; ``rectangle`` is the
    exposed box (u0, v0, u1, v1) in pixel coordinates (edges, not centres; image borders where
    no blade was found); ``kind`` is "none", "circle", "rectangle" or "circle+rectangle";
    ``labels_px`` counts the pixels removed as burned-in labels."""

    mask: np.ndarray
    kind: str
    circle: tuple[float, float, float] | None = None
    rectangle: tuple[float, float, float, float] | None = None
    labels_px: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """A JSON-friendly description (for XRay.metadata and reports)."""
        return {
            "kind": self.kind,
            "circle_px": None if self.circle is None else [round(v, 3) for v in self.circle],
            "rectangle_px": None if self.rectangle is None else [round(v, 3) for v in self.rectangle],
            "labels_px": int(self.labels_px),
            "usable_fraction": float(self.mask.mean()),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# small image helpers (numpy; SimpleITK for connected components)


def _as_image(image) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    a = np.squeeze(a).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"an X-ray image must be 2D (H, W), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("the image contains NaN or Inf; fix those pixels first")
    return a


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.1, 99.9])
    if hi - lo <= 0:
        lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def _shrink(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _border_components(region: np.ndarray) -> np.ndarray:
    """The parts of a bool region connected (8-neighbourhood) to the image border."""
    if not region.any():
        return region
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(region.astype(np.uint8)), True))
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    edge = edge[edge > 0]
    return np.isin(lab, edge)


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(a.astype(np.float64)), sigma)
    return sitk.GetArrayFromImage(img)


def _bilinear(a: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample ``a`` at CorrReg pixel coordinates (u, v) (centres at +0.5), edges clamped."""
    x = np.clip(u - 0.5, 0, a.shape[1] - 1.000001)
    y = np.clip(v - 0.5, 0, a.shape[0] - 1.000001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    return (a[y0, x0] * (1 - fx) * (1 - fy) + a[y0, x0 + 1] * fx * (1 - fy)
            + a[y0 + 1, x0] * (1 - fx) * fy + a[y0 + 1, x0 + 1] * fx * fy)


# --------------------------------------------------------------------------------------------
# shape fits


def _fit_circle_lsq(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) circle fit, then a few Gauss-Newton steps on the geometric distance."""
    A = np.stack([u, v, np.ones_like(u)], 1)
    b = -(u * u + v * v)
    (d, e, f), *_ = np.linalg.lstsq(A, b, rcond=None)
    cx, cy = -d / 2, -e / 2
    r = math.sqrt(max(cx * cx + cy * cy - f, 1e-12))
    for _ in range(5):
        du, dv = u - cx, v - cy
        dist = np.hypot(du, dv) + 1e-12
        res = dist - r
        J = np.stack([-du / dist, -dv / dist, -np.ones_like(u)], 1)
        step, *_ = np.linalg.lstsq(J, -res, rcond=None)
        cx, cy, r = cx + step[0], cy + step[1], r + step[2]
    return float(cx), float(cy), float(r)


def _ransac_circle(u: np.ndarray, v: np.ndarray, tol: float, rng: np.random.Generator, trials: int = 300):
    n = len(u)
    if n < 20:
        return None, np.zeros(n, bool)
    best_in = np.zeros(n, bool)
    for _ in range(trials):
        i, j, k = rng.choice(n, 3, replace=False)
        ax, ay, bx, by, cx_, cy_ = u[i], v[i], u[j], v[j], u[k], v[k]
        d = 2 * (ax * (by - cy_) + bx * (cy_ - ay) + cx_ * (ay - by))
        if abs(d) < 1e-9:
            continue
        ux = ((ax * ax + ay * ay) * (by - cy_) + (bx * bx + by * by) * (cy_ - ay) + (cx_ * cx_ + cy_ * cy_) * (ay - by)) / d
        uy = ((ax * ax + ay * ay) * (cx_ - bx) + (bx * bx + by * by) * (ax - cx_) + (cx_ * cx_ + cy_ * cy_) * (bx - ax)) / d
        r = math.hypot(ax - ux, ay - uy)
        inl = np.abs(np.hypot(u - ux, v - uy) - r) < tol
        if inl.sum() > best_in.sum():
            best_in = inl
    if best_in.sum() < 20:
        return None, best_in
    c = _fit_circle_lsq(u[best_in], v[best_in])
    inl = np.abs(np.hypot(u - c[0], v - c[1]) - c[2]) < tol
    return _fit_circle_lsq(u[inl], v[inl]), inl


def _angular_coverage(u, v, cx, cy) -> float:
    """Fraction of the 360 degrees (in 5-degree bins) that the points cover around (cx, cy)."""
    ang = np.degrees(np.arctan2(v - cy, u - cx)) % 360
    return len(np.unique((ang // 5).astype(int))) / 72.0


# --------------------------------------------------------------------------------------------
# edge points


def _edge_points(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step-edge points (u, v) between an extreme region touching the border and the rest, with
    the unit normals (nu, nv) pointing from the outside into the exposed image."""
    h, w = x.shape
    xs = _smooth(x, 1.0)
    gy, gx = np.gradient(xs)
    out_u, out_v, out_nu, out_nv = [], [], [], []
    # a dark outside has the exposed image towards increasing values (+gradient), a bright one
    # towards decreasing values
    for outside, sign in (((xs <= EXTREME_BAND), 1.0), ((xs >= 1.0 - EXTREME_BAND), -1.0)):
        region = _border_components(outside)
        if region.sum() < 0.002 * h * w:
            continue
        # boundary: region pixels with a 4-neighbour outside the region, not on the image border
        inner = region.copy()
        inner[1:, :] &= region[:-1, :]
        inner[:-1, :] &= region[1:, :]
        inner[:, 1:] &= region[:, :-1]
        inner[:, :-1] &= region[:, 1:]
        bnd = region & ~inner
        bnd[0, :] = bnd[-1, :] = bnd[:, 0] = bnd[:, -1] = False
        rr, cc = np.nonzero(bnd)
        if len(rr) == 0:
            continue
        g = np.hypot(gx[rr, cc], gy[rr, cc]) + 1e-12
        nu, nv = sign * gx[rr, cc] / g, sign * gy[rr, cc] / g
        # step strength: grey level 2.5 px inside minus 1 px outside, along the normal
        inside = _bilinear(xs, cc + 0.5 + 2.5 * nu, rr + 0.5 + 2.5 * nv)
        outer = _bilinear(xs, cc + 0.5 - 1.0 * nu, rr + 0.5 - 1.0 * nv)
        keep = sign * (inside - outer) > MIN_STEP
        out_u.append(cc[keep] + 0.5)
        out_v.append(rr[keep] + 0.5)
        out_nu.append(nu[keep])
        out_nv.append(nv[keep])
    if not out_u:
        e = np.zeros(0)
        return e, e, e, e
    return np.concatenate(out_u), np.concatenate(out_v), np.concatenate(out_nu), np.concatenate(out_nv)


def _refine_edges(a: np.ndarray, u: np.ndarray, v: np.ndarray, nu: np.ndarray, nv: np.ndarray, reach: float):
    """Move each edge point along its normal to where the full-resolution profile is steepest."""
    s = np.arange(-reach, reach + 0.25, 0.25)
    pu = u[:, None] + s[None, :] * nu[:, None]
    pv = v[:, None] + s[None, :] * nv[:, None]
    prof = _bilinear(a, pu, pv)
    d = np.gradient(prof, axis=1)
    d = np.abs(d)
    k = np.argmax(d, axis=1)
    # parabolic sub-sample peak
    k1 = np.clip(k, 1, len(s) - 2)
    y0, y1, y2 = d[np.arange(len(k)), k1 - 1], d[np.arange(len(k)), k1], d[np.arange(len(k)), k1 + 1]
    den = y0 - 2 * y1 + y2
    off = np.divide(0.5 * (y0 - y2), den, out=np.zeros_like(den), where=np.abs(den) > 1e-12)
    sk = s[k1] + np.clip(off, -1, 1) * 0.25
    return u + sk * nu, v + sk * nv


def _axis_lines(u, v, nu, nv, h: float, w: float, min_fraction: float = 0.3) -> dict[int, np.ndarray]:
    """Collimator blades / flat borders: axis-aligned lines of edge points, as {side: bool
    selection of the points on it}; sides 0, 1, 2, 3 are the exposed box's left (u0), top (v0),
    right (u1) and bottom (v1) edges. A line must span ``min_fraction`` of its image side."""
    sides: dict[int, np.ndarray] = {}
    for coord, normal, length, lo_side, hi_side in ((u, nu, h, 0, 2), (v, nv, w, 1, 3)):
        for side, sgn in ((lo_side, 1.0), (hi_side, -1.0)):
            pts = (np.abs(normal) > 0.9) & (np.sign(normal) == sgn)
            if pts.sum() < min_fraction * length:
                continue
            hist = np.bincount(np.floor(coord[pts]).astype(int), minlength=int(max(w, h)) + 2)
            c = int(np.argmax(hist[:-1] + hist[1:]))
            near = pts & (np.abs(coord - (c + 1.0)) < 2.0)
            border = 0.0 if side in (0, 1) else (w if side == 2 else h)
            gap = abs(float(np.median(coord[near])) - border) if near.any() else 0.0
            # a blade must span min_fraction of its side and lie at least 1 % of the image size
            # (and 2 px) in from the border: a sliver thinner than that is left to the margin
            if near.sum() >= min_fraction * length and gap >= max(2.0, 0.01 * max(w, h)):
                sides[side] = near
    return sides


# --------------------------------------------------------------------------------------------
# labels


def _label_mask(a: np.ndarray, exposed: np.ndarray) -> np.ndarray:
    """Small flat components (4 px to 1 % of the image) at exactly the image's minimum or maximum
    value whose surroundings differ by more than 30 % of the range (burned-in text, markers drawn
    into the pixels; a saturated bone or air patch blends into its surroundings)."""
    h, w = a.shape
    out = np.zeros_like(exposed)
    rng_ = float(a.max() - a.min()) or 1.0
    for value in (a.min(), a.max()):
        flat = (a == value) & exposed
        if not flat.any():
            continue
        img = sitk.ConnectedComponent(sitk.GetImageFromArray(flat.astype(np.uint8)), True)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(img)
        lab = sitk.GetArrayFromImage(img)
        for l in stats.GetLabels():
            n = stats.GetNumberOfPixels(l)
            if n < 4 or n > 0.01 * h * w:
                continue
            x0, y0, bw, bh = stats.GetBoundingBox(l)
            y1, x1 = min(h, y0 + bh + 3), min(w, x0 + bw + 3)
            y0, x0 = max(0, y0 - 3), max(0, x0 - 3)
            comp = lab[y0:y1, x0:x1] == l
            ring = ~comp & exposed[y0:y1, x0:x1]
            if ring.sum() == 0:
                continue
            if abs(float(np.median(a[y0:y1, x0:x1][ring])) - float(value)) > 0.3 * rng_:
                out[y0:y1, x0:x1] |= comp
    if out.any():
        dil = sitk.BinaryDilate(sitk.GetImageFromArray(out.astype(np.uint8)), [2, 2])
        out = sitk.GetArrayFromImage(dil).astype(bool)
    return out


# --------------------------------------------------------------------------------------------
# public API


def default_margin_px(size: tuple[int, int]) -> float:
    """The default shrink of a detected field (px): 2 px + 0.5 % of the larger image side."""
    return 2.0 + 0.005 * max(size)


def detect_fov(
    image,
    margin_px: float | None = None,
    circle: bool = True,
    rectangle: bool = True,
    labels: bool = True,
    work_px: int = 600,
    seed: int = 0,
) -> FovDetection:
    """Find the exposed field of an X-ray (H, W): an intensifier disc, collimator blades or flat
    borders, and burned-in labels. See the module docstring for the method."""
    a = _as_image(image)
    h, w = a.shape
    margin = default_margin_px((w, h)) if margin_px is None else float(margin_px)
    x = _normalise(a)
    f = max(1, int(math.ceil(max(h, w) / work_px)))
    xw = _shrink(x, f)
    u, v, nu, nv = _edge_points(xw)
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    circ, rect, found_sides = None, None, set()
    if len(u):
        u, v = u * f, v * f  # to full-resolution pixel coordinates (block centres)
        if circle:
            c, inl = _ransac_circle(u, v, tol=1.5 * f + 1.0, rng=rng)
            if c is not None and inl.sum() >= 0.3 * len(u) and _angular_coverage(u[inl], v[inl], c[0], c[1]) >= 0.2:
                # refine on the full-resolution image along the radial direction
                du, dv = u[inl] - c[0], v[inl] - c[1]
                rad = np.hypot(du, dv) + 1e-12
                ru, rv = _refine_edges(x, c[0] + du / rad * c[2], c[1] + dv / rad * c[2], du / rad, dv / rad, 2.0 * f + 2)
                c = _fit_circle_lsq(ru, rv)
                res = np.abs(np.hypot(ru - c[0], rv - c[1]) - c[2])
                keep = res < max(3 * np.median(res), 0.5)
                c = _fit_circle_lsq(ru[keep], rv[keep])
                rms = float(np.sqrt(np.mean((np.hypot(ru[keep] - c[0], rv[keep] - c[1]) - c[2]) ** 2)))
                if rms < 2.0:
                    circ = c
                    notes.append(f"circle from {int(keep.sum())} edge points, rms {rms:.2f} px")
                    u, v, nu, nv = u[~inl], v[~inl], nu[~inl], nv[~inl]
                else:
                    notes.append(f"circle rejected (rms {rms:.2f} px)")
        if rectangle and len(u):
            sides = _axis_lines(u / f, v / f, nu, nv, xw.shape[0], xw.shape[1])
            if sides:
                box = [0.0, 0.0, float(w), float(h)]
                for side, sel in sides.items():
                    n_u, n_v = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[side]
                    ru, rv = _refine_edges(x, u[sel], v[sel], np.full(sel.sum(), n_u), np.full(sel.sum(), n_v), 2.0 * f + 2)
                    box[side] = float(np.median(ru if side in (0, 2) else rv))
                rect, found_sides = tuple(box), set(sides)
                notes.append("exposed box (u0, v0, u1, v1) " + ", ".join(f"{b:.1f}" for b in rect)
                             + f" from blades on sides {sorted(sides)} (0 left, 1 top, 2 right, 3 bottom)")
    mask = np.ones((h, w), bool)
    vv, uu = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    if circ is not None:
        mask &= np.hypot(uu - circ[0], vv - circ[1]) <= circ[2] - margin
    if rect is not None:
        u0, v0, u1, v1 = rect
        m = [margin if side in found_sides else 0.0 for side in range(4)]
        mask &= (uu >= u0 + m[0]) & (vv >= v0 + m[1]) & (uu <= u1 - m[2]) & (vv <= v1 - m[3])
    if circ is not None or rect is not None:
        # the surround itself (at an extreme, touching the border) is never usable, also where the
        # image's true rim departs from the fitted shape (e.g. bent by an undistortion): near the
        # shape's edge (within 4 margins), pixels of the surround region and a margin around them go
        edge_dist = np.full((h, w), np.inf)
        if circ is not None:
            edge_dist = np.minimum(edge_dist, circ[2] - np.hypot(uu - circ[0], vv - circ[1]))
        if rect is not None:
            for side in found_sides:
                d = (uu - rect[0], vv - rect[1], rect[2] - uu, rect[3] - vv)[side]
                edge_dist = np.minimum(edge_dist, np.broadcast_to(d, (h, w)))
        band = edge_dist < 4 * margin + 2
        beyond = edge_dist < 0
        if beyond.sum() >= 16:
            level = float(np.median(x[beyond]))
            tol = max(0.02, 3 * 1.4826 * float(np.median(np.abs(x[beyond] - level))))
            region = _border_components(np.abs(x - level) <= tol)  # pixels like the surround, connected to it
            near = region & band
            if near.any():
                grown = sitk.BinaryDilate(sitk.GetImageFromArray(near.astype(np.uint8)), [int(math.ceil(margin))] * 2)
                mask &= ~(sitk.GetArrayFromImage(grown).astype(bool) & band)
    kind = "+".join(k for k, s in (("circle", circ), ("rectangle", rect)) if s is not None) or "none"
    n_labels = 0
    if labels:
        lab = _label_mask(a, mask)
        n_labels = int((lab & mask).sum())
        if n_labels:
            notes.append(f"{n_labels} px of flat burned-in labels")
        mask &= ~lab
    if not mask.any():
        notes.append("the detected field left no pixel; using the whole image")
        mask[:] = True
        kind = "none"
    return FovDetection(mask, kind, circ, rect, n_labels, notes)


def detect_fov_mask(image, margin_px: float | None = None, **kwargs) -> np.ndarray:
    """bool (H, W) mask of the usable pixels (True) of an X-ray; see :func:`detect_fov`."""
    return detect_fov(image, margin_px=margin_px, **kwargs).mask


def read_mask(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A user's mask image (any 2D format SimpleITK reads: PNG, TIFF, NRRD...) as bool (H, W):
    True where the pixel is non-zero (for RGB, where any channel is). ``size`` (W, H), the
    X-ray's size, is checked."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"mask image not found: {p}")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise ValueError(f"cannot read the mask image {p} ({str(err).strip().splitlines()[-1]})") from None
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = (arr != 0).any(axis=-1)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"the mask {p} must be a 2D image, got shape {arr.shape}")
    m = arr != 0
    if size is not None and (m.shape[1], m.shape[0]) != tuple(size):
        raise ValueError(
            f"the mask {p} is {m.shape[1]} x {m.shape[0]} pixels but the X-ray is {size[0]} x {size[1]}; "
            "draw the mask on the X-ray itself (same size, white = use, black = ignore)"
        )
    if not m.any():
        raise ValueError(f"the mask {p} is all zero: it excludes every pixel (white = use, black = ignore)")
    if m.all():
        pass  # an all-True mask is valid (use everything)
    return m


def mask_from_option(option: str | None, image, size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, dict]:
    """The mask the ``--mask auto|none|FILE`` option asks for, and a description for metadata:
    "auto" detects it (None when nothing is masked), "none" gives None, anything else is a file."""
    if option is None or option == "auto":
        det = detect_fov(image)
        info = {"mask": "auto", **det.summary()}
        return (None if det.mask.all() else det.mask), info
    if option == "none":
        return None, {"mask": "none"}
    m = read_mask(option, size)
    return m, {"mask": str(option), "usable_fraction": float(m.mean())}
