"""What every stage works on: the CT, the views, the plausible region, and their caches.

Poses handled here are ``camera_from_ct`` of the reference view (the first X-ray), float64 on
the CPU (MPS has no float64); the projectors move float32 copies to the device and autograd
carries gradients back. Similarities are averaged over the views, each taken over the view's
usable pixels where the CT projects (grown by ``roi_margin``); for a CT that holds only bone,
on image gradients (holds_only_bone).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..geometry import Camera, invert_pose, project_points, transform_points
from ..projector import AIR_THRESHOLD, Projector, occupied_box
from ..similarity import COUNTS_UNSEEN, EDGES_ONLY, get_similarity
from ..volume import BONE_MU_PER_MM, Volume
from .bounds import PoseBounds
from .options import Level, RegistrationOptions
from .views import View

Tensor = torch.Tensor

#: A DRR pixel counts as "the CT projects here" above this fraction of the image's maximum.
SUPPORT_FRACTION = 0.02
#: The CT is still in the field of view while its DRR covers more than this share of the square
#: its footprint spans (footprint_px, at the level's pixels); a CT that fills the detector keeps
#: about the old bar (0.5 % of a canvas padded by half the footprint on each side: 2 %, of the
#: detector alone: 0.5 %).
SHOWS_FRACTION = 0.01
#: The cut ends' shadow is grown by this many pixels before it is left out.
CUT_GROW_PX = 1
#: A similarity window's origin is a multiple of this many pixels of its canvas, so that tiled and
#: pooled similarities (patch NCC's 9 px patches, multiscale's 2 and 4 px pools) see the same tiles
#: as on the whole canvas.
WINDOW_ALIGN_PX = 36
#: Beyond the region grown by the ROI margin, a window keeps this many pixels (derivatives, the
#: mask's erosion, a last partial patch), and when it has to move, this share of its size more,
#: so that a pose that keeps moving the same way does not move it on every iteration.
WINDOW_PAD_PX = 10
WINDOW_SLACK = 0.15
#: A level holds its compared region (options.hold_region) only where the ROI margin is at least this
#: many of its pixels: the similarities erode the region by a pixel and differentiate over another,
#: so a region held over a narrower margin cuts the DRR's own edge before it is re-framed.
MIN_HELD_MARGIN_PX = 4


def resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) image area-averaged to (H', W') = size."""
    if tuple(img.shape[-2:]) == size:
        return img
    return F.adaptive_avg_pool2d(img, size)


def grow(mask: Tensor, radius: int) -> Tensor:
    """(B, 1, H, W) float mask dilated by a square of half-width ``radius`` pixels (eroded for a
    negative radius; the image's border does not erode)."""
    if radius < 0:
        return 1.0 - grow(1.0 - mask, -radius)
    if radius == 0:
        return mask
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def is_cropped(volume: Volume, threshold: float = 0.3) -> bool:
    """Whether the CT was cut out of a larger body: at least four of its six faces hold tissue
    (over ``threshold`` of their voxels denser than air). Where a CT ends inside the body, its DRR
    has an edge the X-ray does not show; a segmented bone, or a body scanned whole in its axial
    field (cut only at its two ends), ends in air."""
    d = volume.data
    faces = (d[0], d[-1], d[:, 0], d[:, -1], d[:, :, 0], d[:, :, -1])
    cut = sum(float((f > AIR_THRESHOLD).float().mean()) > threshold for f in faces)
    return cut >= 4


def holds_only_bone(volume: Volume, distance_mm: float = 10.0, share: float = 0.05) -> bool:
    """Whether the CT holds bone and nothing around it (a segmented bone, a label of a full CT):
    under ``share`` of its non-air voxels lie farther than ``distance_mm`` from a bone voxel
    (denser than 1.5 x water). A body CT holds soft tissue centimetres from any bone (the phantom:
    64 % of its tissue), a segmented bone none (its marrow lies inside it).

    Such a CT's DRR cannot explain the X-ray's intensities: the soft tissue and the other bones
    the X-ray shows add to the bone's projection, and an intensity correlation then prefers
    poses that make the bone cover more of them (on the phantom's vertebrae alone, NCC at 16 and
    32 px peaks tens of millimetres off in depth and degrees off in rotation). Its edges are
    what the X-ray does show: Problem compares image gradients instead."""
    d = volume.data
    tissue = d > AIR_THRESHOLD
    bone = (d > BONE_MU_PER_MM).float()[None, None]
    if not bool(bone.any()):
        return False
    near = bone
    for axis, spacing in zip((2, 1, 0), volume.spacing):  # spacing is (x, y, z); data is (K, J, I)
        r = max(1, round(distance_mm / spacing))
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = 2 * r + 1, r
        near = F.max_pool3d(near, tuple(kernel), stride=1, padding=tuple(pad))  # a box is separable
    away = tissue & (near[0, 0] < 0.5)
    return float(away.sum()) < share * float(tissue.sum())


def cut_ends(volume: Volume, depth_mm: float = 5.0, min_area_mm2: float = 10.0) -> Volume | None:
    """The CT's tissue within ``depth_mm`` of every face of its box that cuts through bone (bone
    covers at least ``min_area_mm2`` of the face), as a volume of ones (1/mm) on the CT's grid; None
    when no face does.

    A bone cut by the CT's box (a segmented radius whose shaft runs out of the scan) ends in its DRR
    with an edge that is not anatomy, while the X-ray shows the shaft going on. With
    ``options.exclude_cut_ends`` Problem leaves where that end projects out of Problem.similarity
    and the verification (see Problem.cut_shadow); the grid search's in-plane correlation still
    sees it."""
    d = volume.data
    bone = d > BONE_MU_PER_MM
    tissue = d > AIR_THRESHOLD
    keep = torch.zeros_like(tissue)
    sx, sy, sz = volume.spacing  # data is (K, J, I): z, y, x
    for axis, spacing, pixel_area in ((0, sz, sx * sy), (1, sy, sx * sz), (2, sx, sy * sz)):
        n = d.shape[axis]
        depth = min(n, max(1, round(depth_mm / spacing)))
        for end in (0, n - 1):
            face = bone.select(axis, end)
            if float(face.sum()) * pixel_area < min_area_mm2:
                continue
            band = slice(0, depth) if end == 0 else slice(n - depth, n)
            index = [slice(None)] * 3
            index[axis] = band
            keep[tuple(index)] |= tissue[tuple(index)]
    if not bool(keep.any()):
        return None
    return replace(volume, data=keep.to(d.dtype))


class Problem:
    """The registration problem: CT, views, isocenter, options, and cached pyramids/projectors."""

    def __init__(self, volume: Volume, views: list[View], isocenter: Tensor, initial_pose: Tensor,
                 device: torch.device, options: RegistrationOptions) -> None:
        self.volume = volume
        self.views = views
        self.device = device
        self.options = options
        self.isocenter = torch.as_tensor(isocenter, dtype=torch.float64).reshape(3)
        ref_inv = invert_pose(views[0].camera_from_world)
        #: view_from_ref[i] maps the reference camera's frame into view i's.
        self.view_from_ref = [v.camera_from_world @ ref_inv for v in views]
        self.initial_pose = initial_pose
        self.bounds = PoseBounds(self.isocenter, initial_pose, [(t, v.camera) for t, v in zip(self.view_from_ref, views)],
                                 options.depth_range, options.detector_margin)
        self._depth = [float(transform_points(t @ initial_pose, self.isocenter.reshape(1, 3))[0, 2])
                       for t in self.view_from_ref]
        self._footprint: dict[int, float] = {}
        #: set by the session: True once a cancel was asked for; stages check it inside iterations
        self.should_stop = lambda: False
        # a cropped CT is compared inside its projection (its cut edges are not anatomy), a whole
        # one (a bone, a body ending in air) over its projection grown by a margin
        self.roi_sign = -1 if is_cropped(volume) else 1
        #: the CT holds one bone and nothing around it: similarities on image gradients
        self.bone_only = holds_only_bone(volume) if options.bone_only is None else bool(options.bone_only)
        self._pyramid: dict[int, Volume] = {1: volume}
        self._projectors: dict[tuple, Projector] = {}
        #: the ends where the CT's box cuts through bone, left out of the similarities (cut_ends)
        self.cut = cut_ends(volume) if options.exclude_cut_ends else None
        self._cut_pyramid: dict[int, Volume] = {} if self.cut is None else {1: self.cut}
        self._fixed: dict[tuple, tuple[Tensor, Tensor | None]] = {}
        self._occupied = occupied_box(volume.data.detach(), AIR_THRESHOLD)
        self._radius: float | None = None  # steady_downsample's
        self._bone_points: Tensor | None = None
        self._windows: dict[tuple, tuple[int, int, int, int]] = {}
        self._held_regions: dict[tuple, tuple[Tensor, Tensor]] = {}

    # ---- frames --------------------------------------------------------------------------------
    def bone_points(self, count: int = 2000) -> Tensor:
        """(N, 3) LPS mm: about ``count`` of the CT's bone voxels, evenly strided (its non-air
        voxels where it holds no bone; the isocenter where it holds neither). How far they move
        between two poses says how far apart the poses place the bone (a turn about a thin bone's
        own axis moves it little, a slide along it a lot), as a target registration error would."""
        if self._bone_points is None:
            lps = self._voxels_lps(BONE_MU_PER_MM)
            if not len(lps):
                lps = self._voxels_lps(AIR_THRESHOLD)
            self._bone_points = (lps[:: max(1, len(lps) // count)].contiguous() if len(lps)
                                 else self.isocenter.reshape(1, 3).clone())
        return self._bone_points

    def _voxels_lps(self, threshold: float) -> Tensor:
        """(N, 3) LPS mm of every s-th voxel along each axis denser than ``threshold``, s chosen so
        that about 2 million voxels are looked at (a 512^3 CT's would take gigabytes); CPU, float64."""
        data = self.volume.data
        s = max(1, math.ceil((data.numel() / 2e6) ** (1 / 3)))
        index = ((data[::s, ::s, ::s] > threshold).nonzero().cpu() * s).double().flip(1)  # (k, j, i) -> (i, j, k)
        lps = torch.cat([index, torch.ones(len(index), 1, dtype=torch.float64)], 1) @ self.volume.lps_from_index().T
        return lps[:, :3]

    def bone_shift(self, p: Tensor, q: Tensor) -> float:
        """How far apart two reference-view poses place the CT's bone as the views see it (mm): the
        largest over views of the mean displacement of ``bone_points`` across that view's axis, in
        its camera frame. Along a view's axis it sees a move only as magnification, so one view
        leaves depth out (as mPD does) and views far apart measure all three directions."""
        points = self.bone_points()
        a, b = transform_points(p, points), transform_points(q, points)
        return max(float((((t[:3, :3] @ (a - b).T).T)[:, :2]).norm(dim=1).mean()) for t in self.view_from_ref)

    def bone_move(self, p: Tensor, q: Tensor) -> float:
        """How far apart two reference-view poses place the CT's bone (mm): the mean 3D displacement
        of ``bone_points``, depth included. Views far apart see it all (bone_move ~ bone_shift);
        one view sees the part along its axis only as magnification, so poses that differ there
        explain its image alike and the view does not decide between them (search.basins)."""
        points = self.bone_points()
        return float((transform_points(p, points) - transform_points(q, points)).norm(dim=1).mean())

    def world_pose(self, ref_pose: Tensor) -> Tensor:
        """world_from_ct of a reference-view pose (the reference view's camera_from_ct for one view)."""
        return invert_pose(self.views[0].camera_from_world) @ ref_pose

    def ref_pose(self, world_pose: Tensor) -> Tensor:
        return self.views[0].camera_from_world @ world_pose

    def view_poses(self, ref_pose: Tensor) -> list[Tensor]:
        """camera_from_ct of every view."""
        return [t @ ref_pose for t in self.view_from_ref]

    # ---- resolution ----------------------------------------------------------------------------
    def footprint_px(self, view: int) -> float:
        """How many full-resolution pixels the CT's projection spans in ``view`` at the initial pose
        (the larger side of its bounding box, grown by ``roi_margin``, at most the detector's)."""
        if view not in self._footprint:
            cam = self.views[view].camera
            coarse = cam.downsample(max(1.0, max(cam.size) / 96))
            with torch.no_grad():
                drr = Projector(self.pooled_volume(2).to(self.device), coarse)(
                    (self.view_from_ref[view] @ self.initial_pose).float().to(self.device))
            support = (drr > SUPPORT_FRACTION * drr.max().clamp_min(1e-12)).nonzero()
            if support.numel() == 0:
                extent = float(max(cam.size))
            else:
                span = (support.amax(0) - support.amin(0) + 1).double().max()
                extent = float(span) * cam.width / coarse.width * (1 + 2 * self.options.roi_margin)
            self._footprint[view] = min(float(max(cam.size)), extent)
        return self._footprint[view]

    def shows_px(self, view: int, detector: Camera) -> float:
        """How many pixels of ``detector`` (the view at some level) the CT's DRR must cover to count as
        still in the field of view: ``SHOWS_FRACTION`` of the square its footprint spans there. Taken
        from the CT's own size, not the detector's: a carpal bone in a 1760 px intensifier image
        covers under 1 % of it even where it is fully seen."""
        across = self.footprint_px(view) * detector.width / self.views[view].camera.width
        return SHOWS_FRACTION * across * across

    def level_camera(self, view: int, level: Level) -> Camera:
        """The view's detector at ``level``: pixels such that the CT's projection spans about
        ``level.detector_px`` of them (a CT filling the detector: the detector is that wide; one
        bone in a 1760 px image gets the same detail across the bone, not across the image)."""
        cam = self.views[view].camera
        if level.downsample is not None:
            return cam.downsample(max(1.0, float(level.downsample[view])))
        return cam.downsample(max(1.0, self.footprint_px(view) / max(1, level.detector_px)))

    def steady_downsample(self, view: int, detector_px: int) -> float:
        """A downsampling of ``view`` that gives about ``detector_px`` pixels across the CT and does
        not depend on the initial pose's rotation: the CT seen as the sphere around the isocenter
        through its farthest non-air voxel, at the initial depth, the factor rounded to a step of
        2 ** (1 / 4). Runs from different starts then share one pixel grid (see polish.py)."""
        cam = self.views[view].camera
        if self._radius is None:
            lps = self._voxels_lps(AIR_THRESHOLD)  # strided: the radius is short by under s voxels
            self._radius = float((lps - self.isocenter).norm(dim=1).max()) if len(lps) else 0.0
        radius = self._radius
        across = 2 * radius * cam.sdd / self._depth[view] / min(cam.pixel_spacing) * (1 + 2 * self.options.roi_margin)
        factor = min(float(max(cam.size)), across) / max(1, detector_px)
        return max(1.0, 2.0 ** (round(4 * math.log2(max(factor, 1e-9))) / 4))

    def volume_factor(self, view: int, level: Level) -> int:
        if level.volume_factor is not None:
            return int(level.volume_factor)
        cam = self.level_camera(view, level)
        pixel_at_iso = max(cam.pixel_spacing) * self._depth[view] / cam.sdd
        return self.volume.pool_factor(pixel_at_iso, level.voxel_slack)

    def pooled_volume(self, factor: int, cut: bool = False) -> Volume:
        """The CT (``cut``: its cut ends, see cut_ends) average-pooled by ``factor`` (a power of 2)."""
        pyramid = self._cut_pyramid if cut else self._pyramid
        vol = pyramid.get(factor)
        if vol is None:
            vol, f = pyramid[1], 1
            while f < factor:
                f *= 2
                vol = pyramid.get(f) or vol.downsample(2)
                pyramid[f] = vol
        return vol

    def projector(self, view: int, level: Level, camera: Camera | None = None, cut: bool = False) -> Projector:
        """The projector of ``view`` at ``level`` (or on another ``camera``, e.g. a search canvas);
        ``cut``: of the CT's cut ends (cut_ends) instead of the CT."""
        cam = camera or self.level_camera(view, level)
        vf = self.volume_factor(view, level)
        key = (cam, vf, cut)
        if key not in self._projectors:
            self._projectors[key] = Projector(self.pooled_volume(vf, cut).to(self.device), cam,
                                              samples_per_voxel=self.options.samples_per_voxel).to(self.device)
        return self._projectors[key]

    def fixed(self, view: int, camera: Camera, pad: int = 0) -> tuple[Tensor, Tensor | None]:
        """The view's X-ray (1, 1, h, w) and usable-pixel mask (float, or None) at ``camera``'s size;
        ``pad`` > 0: both extended by that many pixels on every side, the X-ray with zeros and the
        mask with unusable pixels (a mask is then always returned)."""
        size = (camera.height, camera.width)
        key = (view, size, pad)
        if key not in self._fixed:
            v = self.views[view]
            img = resize(v.image[None, None].to(self.device), size)
            mask = None
            if v.mask is not None:
                mask = (resize(v.mask[None, None].float().to(self.device), size) > 0.99).float()
            if pad > 0:
                mask = F.pad(torch.ones_like(img) if mask is None else mask, (pad,) * 4)
                img = F.pad(img, (pad,) * 4)
            self._fixed[key] = (img, mask)
        return self._fixed[key]

    def canvas(self, view: int, level: Level) -> tuple[Camera, int]:
        """(camera, pad): the view's detector at ``level`` extended by ``pad`` pixels on every side,
        ``options.unseen_margin`` x the CT's footprint: where a similarity that counts unseen
        structure (similarity.COUNTS_UNSEEN) sees the part of the CT's projection that falls off
        the detector."""
        cam = self.level_camera(view, level)
        scale = cam.width / self.views[view].camera.width
        pad = max(1, round(self.options.unseen_margin * self.footprint_px(view) * scale))
        cx, cy = cam.principal_point
        return replace(cam, size=(cam.width + 2 * pad, cam.height + 2 * pad), principal_point=(cx + pad, cy + pad)), pad

    # ---- rendering and similarity ----------------------------------------------------------------
    def render(self, ref_poses: Tensor, view: int, level: Level, camera: Camera | None = None,
               cut: bool = False) -> Tensor:
        """DRRs (B, 1, h, w) of ``view`` at ``level`` (on ``camera``, default the level's detector) for
        (B, 4, 4) reference poses (differentiable); ``cut``: of the CT's cut ends (cut_ends)."""
        poses = self.view_from_ref[view].to(ref_poses) @ ref_poses
        return self.projector(view, level, camera, cut)(poses.float())

    def cut_shadow(self, ref_poses: Tensor, view: int, level: Level, camera: Camera | None = None) -> Tensor | None:
        """(B, 1, h, w) float: 1 where the CT's cut ends (cut_ends) project in ``view`` at ``level``
        (on ``camera``, as render), else 0; None for a CT that no face of its box cuts through bone."""
        if self.cut is None:
            return None
        with torch.no_grad():
            shadow = self.render(ref_poses.detach(), view, level, camera, cut=True)
        return (shadow > 1e-3 * shadow.amax((2, 3), keepdim=True).clamp_min(1e-12)).to(shadow.dtype)

    def roi_margin_px(self, width: int) -> int:
        """The ROI's margin (``options.roi_margin`` of a detector ``width`` pixels wide), in pixels."""
        return max(1, round(self.options.roi_margin * width))

    def roi(self, drr: Tensor, fov: Tensor | None, width: int | None = None, cut: Tensor | None = None) -> Tensor:
        """(B, 1, h, w) float mask: where the CT projects, grown by ``roi_margin`` x ``width`` (the
        detector's width in the DRR's pixels; default the DRR's width) or shrunk by it for a cropped
        CT (see is_cropped), inside ``fov``, and outside ``cut`` (cut_shadow) grown by CUT_GROW_PX:
        the DRR's cut edge is not compared."""
        d = drr.detach()
        support = (d > SUPPORT_FRACTION * d.amax((2, 3), keepdim=True).clamp_min(1e-12)).to(d.dtype)
        mask = grow(support, self.roi_sign * self.roi_margin_px(width or d.shape[-1]))
        if cut is not None:
            mask = mask * (1.0 - grow(cut, CUT_GROW_PX))
        return mask if fov is None else mask * fov

    def holds_region(self, level: Level) -> bool:
        """Whether ``level``'s refinement holds its compared region (options.hold_region, and an ROI
        margin of at least MIN_HELD_MARGIN_PX in every view)."""
        return self.options.hold_region and all(
            self.roi_margin_px(self.level_camera(v, level).width) >= MIN_HELD_MARGIN_PX for v in range(len(self.views)))

    def region_drift(self, ref_poses: Tensor, region_poses: Tensor, level: Level) -> Tensor:
        """(B,) how far the CT's occupied box (its 8 corners) has moved on the detectors between
        ``region_poses`` and ``ref_poses``, in ROI margins (the largest over corners and views):
        above about a half, a region held since ``region_poses`` no longer frames the DRR."""
        drift = torch.zeros(ref_poses.shape[0], dtype=torch.float64)
        for v in range(len(self.views)):
            cam = self.level_camera(v, level)
            now, _ = self.projected_corners(ref_poses, v, cam)
            then, _ = self.projected_corners(region_poses, v, cam)
            moved = (now - then).norm(dim=-1).amax(-1) / self.roi_margin_px(cam.width)
            drift = torch.maximum(drift, torch.nan_to_num(moved, nan=float("inf")))
        return drift

    def held_region(self, region_poses: Tensor, view: int, level: Level, camera: Camera, width: int) -> Tensor:
        """(B, 1, h, w): the roi of the DRRs at ``region_poses`` on ``camera`` (see similarity),
        computed once while the same tensor is asked for on the same camera."""
        key = (view, camera, self.volume_factor(view, level))
        held = self._held_regions.get(key)
        if held is None or held[0] is not region_poses:
            with torch.no_grad():
                poses = region_poses.to(torch.float64)
                drr = self.render(poses, view, level, camera)
                held = (region_poses, self.roi(drr, None, width, self.cut_shadow(poses, view, level, camera)))
            self._held_regions[key] = held
        return held[1]

    def similarity_name(self, name: str) -> str:
        """The similarity a stage asking for ``name`` gets: one with an intensity term (similarity.
        EDGES_ONLY lists those without) becomes ``options.bone_only_similarity`` for a CT that holds
        only bone (see holds_only_bone)."""
        if self.bone_only and name not in EDGES_ONLY:
            return self.options.bone_only_similarity
        return name

    def occupied_corners(self, volume_factor: int = 1) -> Tensor:
        """(8, 3) LPS corners of the box that holds every non-air voxel, grown by ``volume_factor``
        voxels (a voxel of the CT pooled by that factor, which spreads that far): nothing of the
        CT at that factor projects outside them."""
        (lo, hi), f = self._occupied, float(volume_factor)
        corners = torch.tensor([[a, b, c, 1.0] for a in (lo[0] - f, hi[0] + f) for b in (lo[1] - f, hi[1] + f)
                                for c in (lo[2] - f, hi[2] + f)], dtype=torch.float64)
        return (corners @ self.volume.lps_from_index().T)[:, :3]

    def projected_corners(self, ref_poses: Tensor, view: int, camera: Camera,
                          volume_factor: int = 1) -> tuple[Tensor, Tensor]:
        """((B, 8, 2) pixels on ``camera``, (B, 8) depths in mm) of the occupied box's corners
        (occupied_corners at ``volume_factor``) for (B, 4, 4) reference poses, in ``view``."""
        with torch.no_grad():
            poses = self.view_from_ref[view] @ ref_poses.detach().cpu().double().reshape(-1, 4, 4)
            corners = self.occupied_corners(volume_factor)
            return project_points(camera, poses, corners), transform_points(poses, corners)[..., 2]

    def window(self, ref_poses: Tensor, view: int, camera: Camera, margin_px: int,
               volume_factor: int = 1) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the part of ``camera``'s pixels that a similarity of these (B, 4, 4)
        poses can depend on. Outside the projection of the CT's occupied box (occupied_corners at
        the level's ``volume_factor``), grown by ``margin_px`` (the ROI margin) and WINDOW_PAD_PX,
        the DRR is zero and no pixel is compared, so rendering only the window gives the same score
        and gradients as the whole canvas at a fraction of the cost (the wrist's radius covers a
        tenth of its 1760 px image). The window is kept while the poses stay inside it and moved,
        with WINDOW_SLACK to spare, when not."""
        uv, depth = self.projected_corners(ref_poses, view, camera, volume_factor)
        w, h = camera.width, camera.height
        if bool((depth <= 1e-6).any()) or not bool(torch.isfinite(uv).all()):
            return 0, 0, w, h  # part of the CT behind the source: no bound
        grow_px = margin_px + WINDOW_PAD_PX
        need = (max(0.0, float(uv[..., 0].min()) - grow_px), max(0.0, float(uv[..., 1].min()) - grow_px),
                min(float(w), float(uv[..., 0].max()) + grow_px), min(float(h), float(uv[..., 1].max()) + grow_px))
        if need[2] <= need[0] or need[3] <= need[1]:
            return 0, 0, w, h  # the CT projects off the canvas: the score says so on the whole of it
        key = (view, camera)
        old = self._windows.get(key)
        if old is not None and old[0] <= need[0] and old[1] <= need[1] and old[2] >= need[2] and old[3] >= need[3]:
            return old
        slack = WINDOW_SLACK * max(need[2] - need[0], need[3] - need[1])
        x0 = int(max(0.0, need[0] - slack) // WINDOW_ALIGN_PX) * WINDOW_ALIGN_PX
        y0 = int(max(0.0, need[1] - slack) // WINDOW_ALIGN_PX) * WINDOW_ALIGN_PX
        x1, y1 = min(w, int(need[2] + slack) + 1), min(h, int(need[3] + slack) + 1)
        if old is not None:  # its projectors are not needed any more
            stale = window_camera(camera, old)
            self._projectors = {k: p for k, p in self._projectors.items() if k[0] != stale}
            self._held_regions = {k: r for k, r in self._held_regions.items() if k[1] != stale}
        self._windows[key] = (x0, y0, x1, y1)
        return x0, y0, x1, y1

    def similarity(self, ref_poses: Tensor, level: Level, name: str | None = None,
                   as_asked: bool = False, windowed: bool = True,
                   region_poses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """((B,) similarity averaged over the views, differentiable in the poses; (B,) bool: the CT
        projects onto every view's detector). Each view's DRR is rendered only on its ``window``
        (``windowed=False``: on the whole canvas, the same score at more cost; for benchmarks).
        ``as_asked``: ``name`` even for a bone-only CT (no similarity_name substitution).
        ``region_poses`` (B, 4, 4): take the compared region (roi) where the CT projects at these
        poses instead of at ``ref_poses`` (RegistrationOptions.hold_region); the region is cached
        while the same tensor is passed."""
        asked = name or level.similarity or self.options.similarity
        chosen = asked if as_asked else self.similarity_name(asked)
        sim = get_similarity(chosen)
        # a similarity in COUNTS_UNSEEN sees the whole projection, also where it leaves the detector
        # (rendered on the canvas) or the usable field
        counts_unseen = chosen in COUNTS_UNSEEN
        total, shows = 0.0, None
        # the window must hold the held region's poses as well as the scored ones
        framed = ref_poses if region_poses is None else torch.cat([ref_poses.detach(), region_poses.to(ref_poses)])
        for v in range(len(self.views)):
            detector = self.level_camera(v, level)
            canvas, pad = self.canvas(v, level) if counts_unseen else (detector, 0)
            margin = self.roi_margin_px(detector.width)
            x0, y0, x1, y1 = (self.window(framed, v, canvas, margin, self.volume_factor(v, level)) if windowed
                              else (0, 0, canvas.width, canvas.height))
            camera = window_camera(canvas, (x0, y0, x1, y1))
            drr = self.render(ref_poses, v, level, camera)
            fixed, usable = self.fixed(v, detector, pad)
            fixed = fixed[..., y0:y1, x0:x1]
            usable = None if usable is None else usable[..., y0:y1, x0:x1]
            if region_poses is None:
                region = self.roi(drr, None, detector.width, self.cut_shadow(ref_poses, v, level, camera))
            else:
                region = self.held_region(region_poses, v, level, camera, detector.width)
            compared = region if usable is None else region * usable
            total = total + (sim(fixed, drr, compared, region) if counts_unseen else sim(fixed, drr, compared))
            here = (drr.detach().flatten(1) > 1e-3).double().sum(1).cpu() > self.shows_px(v, detector)
            shows = here if shows is None else shows & here
        return total / len(self.views), shows


def window_camera(camera: Camera, window: tuple[int, int, int, int]) -> Camera:
    """The pixels (x0, y0, x1, y1) of ``camera`` as a camera of their own (the same rays)."""
    x0, y0, x1, y1 = window
    if (x0, y0, x1, y1) == (0, 0, camera.width, camera.height):
        return camera
    cx, cy = camera.principal_point
    return replace(camera, size=(x1 - x0, y1 - y0), principal_point=(cx - x0, cy - y0))
