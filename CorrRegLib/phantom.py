"""A deterministic procedural lumbar-spine CT (Hounsfield units) with labels and landmarks.

The phantom is the embedded default CT of the demo and the tests. It is built from analytic
shapes (elliptic cylinders, tapered tubes, ellipsoids) whose approximate signed distances are
turned into smooth occupancies about one voxel wide, so the volume has partial-volume edges
instead of staircase aliasing at any spacing from 1 to 4 mm.

Anatomy is defined in the patient's LPS frame (x = patient left, y = posterior, z = superior),
centred on ``center_lps``; the voxel grid samples it, so an oblique ``direction`` gives a
differently oriented grid over the *same* anatomy (as a tilted-gantry acquisition would), and
the landmarks, which are LPS points, do not depend on the grid at all.

Label values (see :data:`LABEL_NAMES` after a build, and docs/phantom_and_simulation.md):

* ``0``: everything that is not bone or disc (air, fat, muscle);
* ``1 .. n``: the vertebrae from top to bottom (with ``n_vertebrae=5``: L1 = 1 ... L5 = 5);
* ``20 + v``: the intervertebral disc below vertebra ``v`` (L1-L2 = 21 ... L4-L5 = 24);
* ``30``: ribs (``ribs=True``); ``40``: sacrum, ``41``: iliac wings (``pelvis=True``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .volume import Volume

Tensor = torch.Tensor

# HU of the tissues.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_MUSCLE = 55.0
HU_GAS = -950.0
HU_DISC = 80.0
HU_CORTICAL = 1100.0
HU_CANCELLOUS = 250.0

DISC_LABEL_BASE = 20
RIB_LABEL = 30
SACRUM_LABEL = 40
ILIUM_LABEL = 41

#: Names of the vertebrae from T1 down to L5; a phantom with n vertebrae uses the last n.
VERTEBRA_SEQUENCE = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))

#: Landmarks placed on every vertebra, as ``<vertebra>_<suffix>``.
VERTEBRA_LANDMARKS = (
    "body_center",
    "spinous_tip",
    "left_pedicle",
    "right_pedicle",
    "left_transverse_tip",
    "right_transverse_tip",
)

# Mean vertebral geometry (mm): body semi-axes (L-R, A-P), half height, disc height.
_BODY_A, _BODY_B, _BODY_H, _DISC_H = 23.0, 16.0, 12.0, 9.0
_PITCH = 2 * _BODY_H + _DISC_H
_SHELL_MM = 2.0  # cortical shell thickness of the vertebral bodies
_POST_SHELL_MM = 1.5  # cortical shell of posterior elements, ribs and pelvis


@dataclass
class SpinePhantom:
    """A built phantom: HU voxels, the attenuation ``Volume``, labels and LPS landmarks."""

    hu: Tensor  # (K, J, I) float32 Hounsfield units
    volume: Volume  # the same voxels as linear attenuation (1/mm), with the LPS geometry
    labels: Tensor  # (K, J, I) int16 label map (values in the module docstring)
    landmarks: Tensor  # (N, 3) float64 LPS mm
    landmark_names: list[str]
    label_names: dict[int, str]
    vertebra_names: list[str]
    params: dict = field(default_factory=dict)

    def landmark(self, name: str) -> Tensor:
        """The LPS position (3,) of a landmark by name."""
        try:
            return self.landmarks[self.landmark_names.index(name)]
        except ValueError:
            raise KeyError(f"no landmark {name!r}; known: {', '.join(self.landmark_names)}") from None

    def landmarks_dict(self) -> dict[str, list[float]]:
        return {n: p.tolist() for n, p in zip(self.landmark_names, self.landmarks)}

    @property
    def bone_mask(self) -> Tensor:
        """Voxels labelled as a vertebra, rib or pelvic bone."""
        lab = self.labels
        return ((lab >= 1) & (lab < DISC_LABEL_BASE)) | (lab == RIB_LABEL) | (lab >= SACRUM_LABEL)


# --------------------------------------------------------------------------------------------
# Approximate signed distances (negative inside), on (M, 3) local coordinates.


def _occ(sd: Tensor, width: float) -> Tensor:
    """Smooth occupancy: 1 inside, 0 outside, a linear ramp ``width`` mm wide at the surface."""
    return (0.5 - sd / width).clamp(0.0, 1.0)


def _combine(d_xy: Tensor, d_z: Tensor) -> Tensor:
    """Signed distance of the intersection of a 2D shape (d_xy) with a slab (d_z)."""
    d = torch.stack([d_xy, d_z], -1)
    return d.amax(-1).clamp(max=0.0) + d.clamp(min=0.0).norm(dim=-1)


def _ellipse_sd(x: Tensor, y: Tensor, a, b) -> Tensor:
    """Gradient-normalised ellipse distance (x/a)^2 + (y/b)^2 = 1; a, b scalars or tensors."""
    r = ((x / a) ** 2 + (y / b) ** 2).sqrt().clamp(min=1e-6)
    g = ((x / a**2) ** 2 + (y / b**2) ** 2).sqrt() / r
    amax = a.amax() if isinstance(a, Tensor) else a
    bmax = b.amax() if isinstance(b, Tensor) else b
    g = g.clamp(min=1.0 / float(max(amax, bmax)))
    return (r - 1.0) / g


def _ellipsoid_sd(q: Tensor, axes: Sequence[float]) -> Tensor:
    ax = torch.tensor(axes, dtype=q.dtype, device=q.device)
    r = (q / ax).norm(dim=-1).clamp(min=1e-6)
    g = (q / ax**2).norm(dim=-1) / r
    return (r - 1.0) / g.clamp(min=1.0 / float(max(axes)))


def _tube_sd(q: Tensor, a, b, ra: float, rb: float, scale=(1.0, 1.0, 1.0)) -> Tensor:
    """Tapered tube around the segment a-b with radius ra..rb, its cross-section stretched by
    ``scale`` along the local axes (a flat plate has one small scale)."""
    a = torch.as_tensor(a, dtype=q.dtype, device=q.device)
    b = torch.as_tensor(b, dtype=q.dtype, device=q.device)
    s = torch.as_tensor(scale, dtype=q.dtype, device=q.device)
    ab = b - a
    t = (((q - a) @ ab) / (ab @ ab)).clamp(0.0, 1.0)
    d = q - (a + t[:, None] * ab)
    r = ra + (rb - ra) * t
    e = (d / s).norm(dim=-1).clamp(min=1e-6)
    g = (d / s**2).norm(dim=-1) / e
    return (e - r) / g.clamp(min=1.0 / float(s.max()))


def _polyline_sd(q: Tensor, pts: Sequence[Sequence[float]], radii: Sequence[float], scale=(1.0, 1.0, 1.0)) -> Tensor:
    sd = None
    for k in range(len(pts) - 1):
        s = _tube_sd(q, pts[k], pts[k + 1], radii[k], radii[k + 1], scale)
        sd = s if sd is None else torch.minimum(sd, s)
    return sd


def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """R = Rz @ Ry @ Rx (radians): local-to-LPS rotation."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


# --------------------------------------------------------------------------------------------
# Vertebra model


@dataclass
class _Vertebra:
    name: str
    center: np.ndarray  # LPS (relative to the phantom centre)
    rot: np.ndarray  # local -> LPS
    scale: float
    a: float
    b: float
    h: float
    waist: float
    spinous_tip: np.ndarray  # local
    spinous_r: float
    tp_len: tuple[float, float]  # left, right transverse process lateral extent from the midline
    tp_z: float
    cancellous_hu: float

    def to_lps(self, local: Sequence[float]) -> np.ndarray:
        return self.center + self.rot @ np.asarray(local, dtype=np.float64)

    # Key points of the posterior arch (local mm).
    def pedicle(self, side: int) -> tuple[list[float], list[float]]:
        x = side * 0.58 * self.a
        return [x, 0.55 * self.b, 0.2 * self.h], [x * 1.03, self.b + 12.0, 0.2 * self.h]

    def lamina_root(self, side: int) -> list[float]:
        return [side * 0.6 * self.a, self.b + 12.0, 0.15 * self.h]

    def transverse_tip(self, side: int) -> list[float]:
        length = self.tp_len[0] if side > 0 else self.tp_len[1]
        return [side * length, self.b + 9.0, self.tp_z]

    def landmarks(self) -> dict[str, np.ndarray]:
        p_l, p_r = self.pedicle(+1), self.pedicle(-1)
        tip = np.asarray(self.spinous_tip) - np.array([0.0, 0.55 * self.spinous_r, 0.0])
        tl, tr = np.asarray(self.transverse_tip(+1)), np.asarray(self.transverse_tip(-1))
        inset = lambda p: p - np.sign(p[0]) * np.array([2.0, 0.0, 0.0])  # noqa: E731
        return {
            "body_center": self.to_lps([0.0, 0.0, 0.0]),
            "spinous_tip": self.to_lps(tip),
            "left_pedicle": self.to_lps((np.asarray(p_l[0]) + np.asarray(p_l[1])) / 2),
            "right_pedicle": self.to_lps((np.asarray(p_r[0]) + np.asarray(p_r[1])) / 2),
            "left_transverse_tip": self.to_lps(inset(tl)),
            "right_transverse_tip": self.to_lps(inset(tr)),
        }

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Local box holding the whole vertebra (with margin)."""
        lo = np.array([-max(self.tp_len) - 10, -self.b - 8, -self.h - 22])
        hi = np.array([max(self.tp_len) + 10, self.spinous_tip[1] + 10, self.h + 16])
        return lo, hi

    def body_sd(self, q: Tensor) -> Tensor:
        x, y, z = q.unbind(-1)
        zz = (z / self.h).clamp(-1.0, 1.0)
        s = 1.0 - self.waist * (1.0 - zz**2)  # concave waist, wider endplates
        a = self.a * s
        b = torch.where(y > 0, 0.85 * self.b, self.b) * s  # flatter posterior wall
        return _combine(_ellipse_sd(x, y, a, b), z.abs() - self.h)

    def arch_sd(self, q: Tensor) -> Tensor:
        """Posterior elements: pedicles, laminae, spinous, transverse and articular processes."""
        sd = _tube_sd(q, [0.0, self.b + 20.0, 0.0], self.spinous_tip, 4.5, self.spinous_r, (0.9, 1.0, 2.0))
        for side in (1, -1):
            p0, p1 = self.pedicle(side)
            parts = [
                _tube_sd(q, p0, p1, 4.5, 4.0, (0.8, 1.0, 1.35)),
                # lamina: a plate from the pedicle root to the midline, sloping down
                _tube_sd(q, self.lamina_root(side), [0.0, self.b + 22.0, -0.25 * self.h], 3.2, 3.5, (1.0, 0.8, 2.4)),
                _tube_sd(q, self.lamina_root(side), self.transverse_tip(side), 4.0, 3.0, (1.0, 0.75, 1.3)),
                # superior articular process (up and back) and inferior articular process (down)
                _tube_sd(q, [side * 0.62 * self.a, self.b + 13.0, 0.3 * self.h],
                         [side * 0.68 * self.a, self.b + 17.0, self.h + 7.0], 3.5, 3.2, (0.8, 1.0, 1.0)),
                _tube_sd(q, [side * 0.42 * self.a, self.b + 21.0, -0.2 * self.h],
                         [side * 0.40 * self.a, self.b + 23.0, -self.h - 8.0], 3.5, 3.0, (0.8, 1.0, 1.0)),
            ]
            for p in parts:
                sd = torch.minimum(sd, p)
        return sd


def _vertebra_names(n: int) -> list[str]:
    if not 1 <= n <= len(VERTEBRA_SEQUENCE):
        raise ValueError(f"n_vertebrae must be between 1 and {len(VERTEBRA_SEQUENCE)}, got {n}")
    return list(VERTEBRA_SEQUENCE[-n:])


def _make_vertebrae(n: int, rng: np.random.Generator, lordosis_mm: float) -> list[_Vertebra]:
    names = _vertebra_names(n)
    z_top = (n - 1) / 2 * _PITCH
    zr = max(z_top, _PITCH)
    # Smooth random lateral curve (mild scoliosis) from two low-frequency terms.
    lat_a, lat_b = rng.normal(0.0, 2.0, size=2)
    verts = []
    for v, name in enumerate(names):
        z = z_top - v * _PITCH
        u = z / zr  # -1 .. 1
        # Lordosis: the middle of the lumbar curve lies anterior (-y); the curve's tangent tilts
        # each vertebra about the L-R axis.
        y = -6.0 - lordosis_mm * (1.0 - u**2)
        dy_dz = lordosis_mm * 2.0 * u / zr
        x = lat_a * math.sin(math.pi * u / 2) + lat_b * (1.0 - u**2) + rng.normal(0.0, 0.7)
        dx_dz = lat_a * math.pi / 2 * math.cos(math.pi * u / 2) / zr - lat_b * 2 * u / zr
        rx = -math.atan(dy_dz) + math.radians(rng.normal(0.0, 1.5))
        ry = math.atan(dx_dz) + math.radians(rng.normal(0.0, 1.5))
        rz = math.radians(rng.normal(0.0, 3.0))  # axial rotation
        # Lumbar bodies grow downwards; thoracic ones are smaller.
        level = VERTEBRA_SEQUENCE.index(name)
        grow = 0.94 + 0.025 * (level - 12) if level >= 12 else 0.6 + 0.3 * level / 11
        s = grow * float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
        a = _BODY_A * s * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
        b = _BODY_B * s * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
        h = _BODY_H * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
        tp = 18.0 + 17.0 * (1.0 - abs(level - 14) / 4.0) if level >= 12 else 26.0  # L3 longest
        tp_len = (a * 0.6 + tp * float(rng.uniform(0.85, 1.15)), a * 0.6 + tp * float(rng.uniform(0.85, 1.15)))
        tip = np.array([
            rng.normal(0.0, 0.8),
            b + float(rng.uniform(40.0, 47.0)) * s,
            -float(rng.uniform(15.0, 20.0)),  # posterior-inferior (before the lordotic tilt)
        ])
        verts.append(_Vertebra(
            name=name, center=np.array([x, y, z]), rot=_rot(rx, ry, rz), scale=s, a=a, b=b, h=h,
            waist=float(rng.uniform(0.05, 0.1)), spinous_tip=tip, spinous_r=float(rng.uniform(3.5, 4.5)),
            tp_len=tp_len, tp_z=0.2 * h + float(rng.normal(0.0, 1.0)),
            cancellous_hu=HU_CANCELLOUS + float(rng.normal(0.0, 25.0)),
        ))
    return verts


# --------------------------------------------------------------------------------------------
# Builder


def _grid_geometry(spacing, size_mm, direction, center_lps):
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if not np.all(sp > 0):
        raise ValueError(f"spacing must be positive (mm), got {spacing}")
    size = np.broadcast_to(np.asarray(size_mm, dtype=np.float64), (3,))
    n = np.maximum(2, np.round(size / sp).astype(int))
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise ValueError("direction must be an orthonormal 3x3 matrix")
    c = np.asarray(center_lps, dtype=np.float64).reshape(3)
    origin = c - d @ (sp * (n - 1) / 2.0)
    return sp, n, d, origin


def make_spine_phantom(
    spacing_mm: float | Sequence[float] = 2.0,
    size_mm: Sequence[float] | None = None,
    n_vertebrae: int = 5,
    ribs: bool = False,
    pelvis: bool = False,
    seed: int = 0,
    direction=None,
    center_lps: Sequence[float] = (0.0, 0.0, 0.0),
    lordosis_mm: float = 6.0,
    gas_pockets: int = 3,
    noise_hu: float = 0.0,
    device=None,
) -> SpinePhantom:
    """Build the procedural lumbar-spine CT.

    Args:
        spacing_mm: voxel size (mm), one number or (sx, sy, sz) along the grid's i, j, k axes.
        size_mm: field of view along the grid axes (L-R, A-P, S-I for an identity direction).
            None: 160 x 160 mm and a height that holds the spine (200 mm for five vertebrae),
            plus 20 mm for ``ribs`` and 60 mm for ``pelvis``; the grid is then shifted along
            S-I by half the extra, so the box covers them while the spine's middle stays at
            ``center_lps``. An explicit size is centred on ``center_lps``.
        n_vertebrae: how many vertebrae, top to bottom ending at L5 (5 = L1..L5).
        ribs: add a pair of lower ribs above the top vertebra (label 30).
        pelvis: add a sacrum (label 40) below the bottom vertebra and iliac wings (label 41).
        seed: per-vertebra shape variation, lateral curve, gas pockets and noise.
        direction: 3x3 ITK direction of the voxel grid (columns = i, j, k axes in LPS). The
            anatomy stays in LPS; only the sampling grid turns.
        center_lps: where the phantom's centre (the middle of the spine) lies in LPS.
        lordosis_mm: anterior bulge of the middle of the lumbar curve.
        gas_pockets: number of bowel-gas bubbles in the anterior abdomen.
        noise_hu: standard deviation of white CT noise (HU) added to the voxels (0 = none).
        device: torch device to build on (default CPU).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    centre = np.asarray(center_lps, dtype=np.float64).reshape(3)
    grid_centre = centre.copy()
    if size_mm is None:
        up, down = (20.0 if ribs else 0.0), (60.0 if pelvis else 0.0)
        size_mm = (160.0, 160.0, n_vertebrae * _PITCH + 35.0 + up + down)
        grid_centre[2] += (up - down) / 2
    sp, n, d, origin = _grid_geometry(spacing_mm, size_mm, direction, grid_centre)
    width = float(np.mean(sp))  # antialiasing ramp width (mm)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f32 = dict(dtype=torch.float32, device=dev)

    # LPS coordinates of all voxel centres, relative to the phantom centre: (N, 3), k slowest.
    ii = [torch.arange(m, **f32) * float(s) for m, s in zip(n, sp)]
    kk, jj, ix = torch.meshgrid(ii[2], ii[1], ii[0], indexing="ij")
    idx_mm = torch.stack([ix, jj, kk], -1).reshape(-1, 3)
    dm = torch.tensor(d, **f32)
    p = (idx_mm @ dm.T + torch.tensor(origin - centre, **f32)).reshape(int(n[2]), int(n[1]), int(n[0]), 3)
    del ix, jj, kk, idx_mm
    x, y, z = p.unbind(-1)
    npts = tuple(p.shape[:3])
    # index (i, j, k) of a point relative to the phantom centre: D^T (p + centre - origin) / sp
    idx_from_rel = (d.T / sp[:, None], d.T @ (centre - origin) / sp)

    # ---- soft tissue: skin / fat / muscle, cylinders along S-I --------------------------------
    hu = torch.full(npts, HU_AIR, **f32)

    def paint(sd: Tensor, value: float) -> None:
        o = _occ(sd, width)
        hu.add_(o * (value - hu))

    body_ax, body_ay, body_y0 = 74.0, 64.0, 2.0
    paint(_ellipse_sd(x, y - body_y0, body_ax, body_ay), HU_FAT)
    paint(_ellipse_sd(x, y - body_y0 - 2.0, body_ax - 10.0, body_ay - 11.0), HU_SOFT)
    # Psoas (thickening inferiorly) and paraspinal muscles, each wrapped in a thin fat sheath.
    zn = (z / 100.0).clamp(-1.0, 1.0)
    for side in (1.0, -1.0):
        psoas_a = 9.0 + 4.0 * (0.5 - 0.5 * zn)
        psoas_b = 10.0 + 4.0 * (0.5 - 0.5 * zn)
        px = x - side * (_BODY_A + 7.0 + 0.5 * psoas_a)
        paint(_ellipse_sd(px, y + 4.0, psoas_a + 2.5, psoas_b + 2.5), HU_FAT + 20.0)
        paint(_ellipse_sd(px, y + 4.0, psoas_a, psoas_b), HU_MUSCLE)
        mx = x - side * 24.0
        paint(_ellipse_sd(mx, y - 40.0, 16.5, 15.5), HU_FAT + 20.0)
        paint(_ellipse_sd(mx, y - 40.0, 14.0, 13.0), HU_MUSCLE)
    # Bowel gas in the anterior abdomen, away from the midline.
    for _ in range(int(gas_pockets)):
        gc = np.array([rng.uniform(15.0, 45.0) * rng.choice([-1, 1]), rng.uniform(-45.0, -25.0),
                       rng.uniform(-70.0, 70.0)])
        ga = rng.uniform(5.0, 11.0, size=3)
        paint(_ellipsoid_sd(p - torch.tensor(gc, **f32), ga.tolist()), HU_GAS)

    # ---- bones --------------------------------------------------------------------------------
    verts = _make_vertebrae(n_vertebrae, rng, lordosis_mm)
    big = 1e3
    sd_bone = torch.full(npts, big, **f32)  # union of bone shapes
    sd_core = torch.full(npts, big, **f32)  # union of the same shapes eroded by their shell
    near = torch.zeros(npts, dtype=torch.int16, device=dev)  # label of the nearest bone
    sd_disc = torch.full(npts, big, **f32)
    near_disc = torch.zeros(npts, dtype=torch.int16, device=dev)
    canc_hu = {}

    def add_bone(sel, sd: Tensor, shell: Tensor | float, label: int) -> None:
        cur = sd_bone[sel]
        sd = sd.reshape(cur.shape)
        if isinstance(shell, Tensor):
            shell = shell.reshape(cur.shape)
        closer = sd < cur
        sd_bone[sel] = torch.where(closer, sd, cur)
        near[sel] = torch.where(closer, torch.tensor(label, dtype=torch.int16, device=dev), near[sel])
        sd_core[sel] = torch.minimum(sd_core[sel], sd + shell)

    def local_subset(center, rot, lo, hi):
        """The block of voxels (slices k, j, i) covering a local box, and their local
        coordinates (M, 3), M the block's voxel count (0 when the box misses the grid)."""
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        rel = np.asarray(center, dtype=np.float64) + corners @ np.asarray(rot).T
        ijk = rel @ idx_from_rel[0].T + idx_from_rel[1]
        a0 = np.clip(np.floor(ijk.min(0)).astype(int) - 1, 0, n)
        a1 = np.clip(np.ceil(ijk.max(0)).astype(int) + 2, 0, n)
        sel = (slice(a0[2], a1[2]), slice(a0[1], a1[1]), slice(a0[0], a1[0]))
        r = torch.tensor(rot, **f32)
        q = (p[sel].reshape(-1, 3) - torch.tensor(center, **f32)) @ r  # rows: R^T (p - c)
        return sel, q

    for v, vt in enumerate(verts):
        label = v + 1
        canc_hu[label] = vt.cancellous_hu
        sel, q = local_subset(vt.center, vt.rot, *vt.bounds())
        if q.shape[0] == 0:
            continue
        body = vt.body_sd(q)
        arch = vt.arch_sd(q)
        sd = torch.minimum(body, arch)
        shell = torch.where(body <= arch, torch.full_like(sd, _SHELL_MM), torch.full_like(sd, _POST_SHELL_MM))
        add_bone(sel, sd, shell, label)

    # Discs between consecutive bodies: elliptic cylinders in the mean frame of the two.
    for v in range(len(verts) - 1):
        up, lo_v = verts[v], verts[v + 1]
        c = (up.center + lo_v.center) / 2
        axis = up.center - lo_v.center
        axis /= np.linalg.norm(axis)
        rx = -math.atan2(axis[1], axis[2])
        ry = math.atan2(axis[0], math.hypot(axis[1], axis[2]))
        rot = _rot(rx, ry, 0.5 * (math.atan2(up.rot[1, 0], up.rot[0, 0]) + math.atan2(lo_v.rot[1, 0], lo_v.rot[0, 0])))
        a, b = (up.a + lo_v.a) / 2 * 0.97, (up.b + lo_v.b) / 2 * 0.97
        gap = np.linalg.norm(up.center - lo_v.center) - up.h - lo_v.h
        half = gap / 2 + 2.0  # overlap the endplates; bone is painted over it
        sel, q = local_subset(c, rot, [-a - 6, -b - 6, -half - 6], [a + 6, b + 6, half + 6])
        if q.shape[0] == 0:
            continue
        xq, yq, zq = q.unbind(-1)
        bulge = 1.0 + 0.06 * (1.0 - (zq / half).clamp(-1, 1) ** 2)
        sd = _combine(_ellipse_sd(xq, yq, a * bulge, torch.where(yq > 0, 0.85 * b, b) * bulge), zq.abs() - half)
        cur = sd_disc[sel]
        sd = sd.reshape(cur.shape)
        closer = sd < cur
        sd_disc[sel] = torch.where(closer, sd, cur)
        near_disc[sel] = torch.where(closer, torch.tensor(DISC_LABEL_BASE + v + 1, dtype=torch.int16, device=dev),
                                     near_disc[sel])

    extra_landmarks: dict[str, np.ndarray] = {}
    if ribs:
        top = verts[0]
        zc = top.center[2] + 0.75 * _PITCH
        for side in (1, -1):
            pts = [[side * 26.0, top.center[1] + 24.0, zc], [side * 48.0, top.center[1] + 26.0, zc - 6.0],
                   [side * 62.0, top.center[1] + 8.0, zc - 16.0], [side * 62.0, top.center[1] - 18.0, zc - 28.0],
                   [side * 52.0, top.center[1] - 36.0, zc - 38.0]]
            pts_t = torch.tensor(pts, **f32)
            lo = pts_t.amin(0) - 10.0
            hi = pts_t.amax(0) + 10.0
            sel, q = local_subset(np.zeros(3), np.eye(3), lo.tolist(), hi.tolist())
            if q.shape[0]:
                add_bone(sel, _polyline_sd(q, pts, [5.0, 4.5, 4.0, 4.0, 3.5], (1.0, 1.0, 1.5)), _POST_SHELL_MM, RIB_LABEL)
            extra_landmarks[f"{'left' if side > 0 else 'right'}_rib_angle"] = np.array(pts[2])
        canc_hu[RIB_LABEL] = HU_CANCELLOUS

    if pelvis:
        bot = verts[-1]
        s1 = bot.center + bot.rot @ np.array([0.0, 3.0, -bot.h - _DISC_H - 14.0])
        sacrum_rot = _rot(math.radians(35.0), 0.0, 0.0)  # sacral slope: runs posterior-inferior
        tip = s1 + sacrum_rot @ np.array([0.0, 8.0, -70.0])
        # Sacrum: a wide plate tapering downwards; its top is the S1 body.
        sel, q = local_subset(np.zeros(3), np.eye(3), (np.minimum(s1, tip) - 60).tolist(), (np.maximum(s1, tip) + 60).tolist())
        if q.shape[0]:
            sd = torch.minimum(
                _tube_sd(q, s1, tip, 17.0, 7.0, (2.6, 0.6, 1.0)),
                _combine(_ellipse_sd(*(q - torch.tensor(s1, **f32))[:, :2].unbind(-1), _BODY_A * 1.05, _BODY_B * 1.05),
                         (q[:, 2] - float(s1[2])).abs() - 11.0),
            )
            add_bone(sel, sd, _SHELL_MM, SACRUM_LABEL)
        # Disc L5-S1.
        extra_landmarks["S1_body_center"] = s1
        canc_hu[SACRUM_LABEL] = HU_CANCELLOUS - 20.0
        for side in (1, -1):
            c = np.array([side * 56.0, s1[1] + 10.0, s1[2] - 8.0])
            rot = _rot(math.radians(10.0), 0.0, side * math.radians(-35.0))
            axes = (6.0, 30.0, 38.0)  # thin plate, wide A-P and tall
            sel, q = local_subset(c, rot, [-20, -45, -50], [20, 45, 50])
            if q.shape[0]:
                add_bone(sel, _ellipsoid_sd(q, axes), _POST_SHELL_MM, ILIUM_LABEL)
            extra_landmarks[f"{'left' if side > 0 else 'right'}_ilium_center"] = c
        canc_hu[ILIUM_LABEL] = HU_CANCELLOUS - 40.0

    # Paint discs, then cortical bone, then the cancellous core.
    paint(sd_disc, HU_DISC)
    paint(sd_bone, HU_CORTICAL)
    lut = torch.full((max(canc_hu) + 1,), HU_CANCELLOUS, **f32)
    for k, val in canc_hu.items():
        lut[k] = val
    o = _occ(sd_core, width)
    hu.add_(o * (lut[near.long()] - hu))

    if noise_hu > 0:
        g = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
        hu.add_(torch.randn(npts, generator=g).to(dev) * float(noise_hu))

    labels = torch.where(sd_bone < 0, near, torch.where(sd_disc < 0, near_disc, torch.zeros_like(near)))
    hu = hu.contiguous()
    labels = labels.contiguous()

    names, pts = [], []
    for vt in verts:
        for suffix, pt in vt.landmarks().items():
            names.append(f"{vt.name}_{suffix}")
            pts.append(pt)
    for name, pt in extra_landmarks.items():
        names.append(name)
        pts.append(pt)
    landmarks = torch.tensor(np.stack(pts) + centre, dtype=torch.float64)

    label_names = {v + 1: vt.name for v, vt in enumerate(verts)}
    for v in range(len(verts) - 1):
        label_names[DISC_LABEL_BASE + v + 1] = f"{verts[v].name}-{verts[v + 1].name} disc"
    if ribs:
        label_names[RIB_LABEL] = "ribs"
    if pelvis:
        label_names[SACRUM_LABEL] = "sacrum"
        label_names[ILIUM_LABEL] = "ilium"

    volume = Volume.from_hu(hu, tuple(sp.tolist()), tuple(origin.tolist()), direction=tuple(map(tuple, d.tolist())))
    params = dict(
        spacing_mm=tuple(sp.tolist()), size_mm=tuple(float(s) for s in np.broadcast_to(size_mm, (3,))),
        n_vertebrae=n_vertebrae, ribs=ribs, pelvis=pelvis, seed=seed, center_lps=tuple(centre.tolist()),
        lordosis_mm=lordosis_mm, gas_pockets=gas_pockets, noise_hu=noise_hu,
        build_seconds=time.perf_counter() - t0,
    )
    return SpinePhantom(hu=hu, volume=volume, labels=labels, landmarks=landmarks, landmark_names=names,
                        label_names=label_names, vertebra_names=[vt.name for vt in verts], params=params)


def small_phantom(seed: int = 0, spacing_mm: float = 2.5, **kwargs) -> SpinePhantom:
    """A quick ~64 x 64 x 80 voxel phantom (2.5 mm) for tests: L1-L5 in a 160 x 160 x 200 mm box."""
    return make_spine_phantom(spacing_mm=spacing_mm, seed=seed, **kwargs)


def sample_hu(phantom_or_volume, points_lps: Tensor, hu: Tensor | None = None) -> Tensor:
    """Trilinearly interpolated voxel values at (N, 3) LPS points, through the grid geometry.

    With a :class:`SpinePhantom` the HU are sampled; with a ``Volume`` its data (or ``hu``, a
    tensor on the same grid) is. Points outside the grid read as the nearest border voxel.
    """
    if isinstance(phantom_or_volume, SpinePhantom):
        vol, data = phantom_or_volume.volume, phantom_or_volume.hu
    else:
        vol = phantom_or_volume
        data = vol.data if hu is None else hu
    m = vol.index_from_lps(torch.float64)
    pts = torch.as_tensor(points_lps, dtype=torch.float64).reshape(-1, 3)
    ijk = pts @ m[:3, :3].T + m[:3, 3]
    k_, j_, i_ = data.shape
    size = torch.tensor([i_, j_, k_], dtype=torch.float64)
    grid = (2.0 * ijk + 1.0) / size - 1.0  # align_corners=False
    out = torch.nn.functional.grid_sample(
        data[None, None].double(), grid.reshape(1, -1, 1, 1, 3).to(data.device), mode="bilinear",
        padding_mode="border", align_corners=False,
    )
    return out.reshape(-1).to(torch.float32)
