"""The knobs of every registration stage, in one frozen dataclass (docs/registration.md).

Lengths are millimetres, angles degrees, detector sizes pixels of the level's width.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..similarity import get_similarity


@dataclass(frozen=True)
class Level:
    """One resolution of the coarse-to-fine schedule.

    ``detector_px`` is the detector width to render at (capped at the X-ray's own width);
    ``volume_factor`` the CT downsampling (None: the largest power of two whose voxels stay no
    bigger than ``voxel_slack`` times the level's pixel footprint at the isocenter).
    """

    detector_px: int
    max_iterations: int
    lr_mm: float
    similarity: str | None = None  # None: RegistrationOptions.similarity
    volume_factor: int | None = None
    voxel_slack: float = 1.25
    downsample: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RegistrationOptions:
    # ---- gradient refinement -------------------------------------------------------------------
    # Patch NCC finishes: unlike global NCC its optimum is not biased in depth by scatter or a
    # heel effect (global NCC's is, by 2-3 mm on the phantom; docs/registration.md).
    similarity: str = "patch_ncc"
    # The coarse levels use global NCC: the widest basin, and patch terms are too few there.
    # The 16 px level keeps large in-plane offsets from locking onto a neighbouring vertebra.
    levels: tuple[Level, ...] = (
        Level(16, 100, 6.0, "ncc"),
        Level(32, 100, 3.0, "ncc"),
        Level(64, 60, 1.0),
        Level(128, 30, 0.3, voxel_slack=1.0),
    )
    rotation_scale_mm: float = 100.0
    patience: int = 15
    # Depth is seen only through magnification: its loss gains are tiny, so stop only when
    # the loss really stalls.
    min_improvement: float = 1e-6
    samples_per_voxel: float = 1.0
    # False: stop after the global search (CMA-ES alone / network alone), no gradient refinement.
    refine: bool = True

    # ---- the plausible region (every stage stays inside it) --------------------------------------
    # The isocenter (the CT's bone centroid, or the given one) stays in front of every source at a
    # depth within (1 +- depth_range) x its depth at the initial pose, and projects inside every
    # detector at least ``detector_margin`` x the detector's size from its edges.
    depth_range: float = 0.3
    detector_margin: float = 0.05
    # Search-space limit of the global searches: rotation offsets from the initial pose (degrees,
    # per axis); the protocols' initial guesses are off by N(0, 20 deg) at most (DESIGN.md).
    max_rotation_deg: float = 60.0

    # ---- similarity region ---------------------------------------------------------------------
    # Similarities are taken over the X-ray's usable pixels (its mask) that lie where the CT
    # projects, grown by this margin (a fraction of the detector width): a CT that holds one bone
    # or a crop is compared with the part of the image it can explain, not with the whole image.
    roi_margin: float = 0.06
    # Hold the compared region while a level refines: take it where the CT projects at the level's
    # start (re-framed on a pose only once the CT's box has moved ``region_refresh`` ROI margins on
    # a detector) instead of at every pose; only where the margin spans Problem's MIN_HELD_MARGIN_PX
    # (4 px). A region that follows the pose makes the score jump as pixels enter and leave it, and
    # rewards poses that keep unexplained structure (a neighbouring bone) out of the margin: on the
    # wrist the radius's results spread half as far held (docs/registration.md, "Held region").
    # The verification's scores still take each pose's own region.
    hold_region: bool = True
    region_refresh: float = 0.5
    # A similarity that counts the CT's whole projection (similarity.COUNTS_UNSEEN) renders it on
    # the detector extended by this fraction of the CT's footprint on every side.
    unseen_margin: float = 0.5
    # A CT that holds one bone and nothing around it (segmented, or restricted to a label) cannot
    # explain the X-ray's intensities, only its edges: every similarity is then this one (global
    # NCC on the phantom's vertebrae alone peaks tens of mm off; docs/registration.md). Its NGF
    # half counts the CT's edges beyond the detector as unexplained (gradient NCC alone rewarded
    # pushing the wrist's radius off the detector). None: detected from the CT
    # (problem.holds_only_bone); True / False force it.
    bone_only: bool | None = None
    bone_only_similarity: str = "gradient_ncc+ngf"
    # Off by default. Given a similarity, a CT that holds only bone, seen in two or more views
    # (one view is not: polish.ONE_VIEW), is polished after the finest
    # level (register/polish.py): L-BFGS to convergence on it (taken as named), the region held
    # and framed again until the pose stops moving, at each of ``polish_detector_px`` in turn
    # (pixels across the CT, as Level.detector_px, on a grid that does not depend on the start; a
    # width the X-ray is too small for is skipped), at most ``polish_iterations`` iterations per
    # round. "bandpass_ncc" pins the wrist radius's roll about its shaft, which Adam leaves
    # wherever its path stops: 9 of 10 restarts within 0.03 deg, on a second set 9 of 9 in the
    # basin within 0.04 deg (4.4 deg from the mean without). But it is an intensity similarity and
    # biased by what the CT does not hold: on the phantom's vertebrae in X-rays of the whole
    # phantom it moved two-view results from 0.31 to 2.1 mm mTRE (median of 10), so it is not a
    # default (docs/registration.md, "Polish").
    bone_only_polish: str | None = None
    polish_iterations: int = 60
    polish_detector_px: tuple[int, ...] = (128, 256)
    # Where a face of the CT's box cuts through bone (a segmented shaft that runs out of the scan),
    # leave the DRR's cut end out of the similarities and the verification (problem.cut_ends; not
    # the grid search's in-plane correlation). Off: on the phantom's
    # vertebrae cut through the middle (bench_one_bone.py --cut-at 40 --scale 2.5, 10 cases) it
    # rescued two far starts (5 of 10 within 2 mm against 4) but left the successes less precise
    # (0.25-0.92 mm against 0.24-0.56), and it did not sharpen the wrist (docs/registration.md).
    exclude_cut_ends: bool = False

    # ---- global grid search (methods "auto" and "cmaes" start with it) ---------------------------
    # Rotations: every combination of these offsets (degrees, about the camera axes through the
    # isocenter) at each depth factor; the in-plane position is searched exhaustively for each by
    # masked normalised cross-correlation, over shifts up to ``grid_shift`` x the detector width.
    grid_rotations_deg: tuple[float, ...] = (-50.0, -25.0, 0.0, 25.0, 50.0)
    grid_depths: tuple[float, ...] = (0.85, 1.0, 1.15)
    grid_level: Level = Level(32, 0, 0.0, "gradient_ncc")
    grid_shift: float = 0.5
    grid_candidates: int = 6
    # The candidates are refined together at these levels, then ranked by the verification score.
    candidate_levels: tuple[Level, ...] = (Level(16, 60, 6.0, "ncc"), Level(32, 60, 3.0, "ncc"))

    # ---- local starts (method "intensity" with local_starts > 0) ---------------------------------
    # The initial pose and ``local_starts`` others around it (each turned by ``local_start_deg``
    # about a random axis through the isocenter and moved ``local_start_mm`` in a random direction)
    # are refined together at ``candidate_levels`` and ranked like the global search's candidates.
    # Their basins (search.BASIN_MM: the bone placed within 6 mm, depth included,
    # Problem.bone_move) are ranked. The verification cannot tell right from wrong on a real image
    # (the wrist's radius: wrong optima near the start pass it); the ranking's margin did. Where
    # the next basin leaves less than ``min_rank_margin`` more of the images unexplained (ranking
    # loss 1 - score, relative), it is finished too (the runoff): back at the same pose, the doubt
    # ends; still apart and still that close, the result is flagged, naming depth where that is
    # what the two differ in. 0.03 is the median spread of the scores inside the radius's basin
    # over the wrist's seed-0 runs: a rival that close is not told apart.
    # ``agreement``, the share of the starts that end in the kept basin, is reported; under
    # ``min_agreement`` (off: 0) it flags too, but it does not tell right from wrong: on the wrist
    # right results had 1 to 9 of 9 starts, the wrong one 1 (docs/registration.md, "Local starts").
    local_starts: int = 0
    local_start_deg: float = 10.0
    local_start_mm: float = 10.0
    min_rank_margin: float = 0.03
    min_agreement: float = 0.0
    # One view can be told right from wrong only where the CT explains most of the image: on the
    # wrist's radius all 20 single-view results, 4-50 mm and 27-72 deg off, scored higher in their
    # own view than the biplane pose on the refinement's and the verification's similarities (19 on
    # the ranking's), so nothing measured in that view can flag them. What they share is how little
    # of the image the CT explains there: gradient NCC 0.28-0.37 at the verification level (the
    # phantom's vertebrae alone in X-rays of the whole phantom: 0.71-0.84 on three renderers; a
    # whole CT 0.95-0.97). A one-view result whose gradient NCC is under this is flagged (None: off).
    # 0.5 was chosen on phantom seed 0 and the wrist's view 1 (docs/registration.md, "One view").
    # Several views are not judged by it: their unexplained parts differ, and the wrist's biplane
    # results are right at 0.28-0.33 per view.
    min_single_view_edges: float | None = 0.5
    # What the local starts' basins are ranked by for a CT that holds only bone (at ``verify_level``,
    # 64 px across the CT's footprint; as named, not replaced by ``bone_only_similarity``): band-
    # pass NCC (similarity.bandpass_ncc, 1-8 px there) sees where the bone's mass lies, which edges
    # do not. On the wrist every edge similarity ranked first a pose with the radius across the
    # dark gap to the ulna (docs/real-data.md). None: the verifier's score (the bone-only
    # similarity). A whole CT's basins are ranked by the verifier's NCC, as before.
    local_start_ranking: str | None = "bandpass_ncc"

    # ---- CMA-ES (method "cmaes" after the grid; "hybrid_cmaes") ---------------------------------
    cmaes_sigma: tuple[float, ...] = (20.0, 20.0, 20.0, 30.0, 30.0, 60.0)
    cmaes_population: int = 24
    cmaes_generations: int = 60
    cmaes_similarity: str = "ncc"
    cmaes_level: Level = Level(32, 0, 0.0)

    # ---- network-guided descent (methods "network", "hybrid", "auto" with a model) --------------
    # Unit steps along the network's pose gradient, rotation and translation parts normalised
    # separately (as L_appro trains them), shrinking geometrically; stops when the smoothed score
    # stalls.
    network_iterations: int = 120
    network_step_deg: float = 2.0
    network_step_mm: float = 6.0
    network_decay: float = 0.97
    network_patience: int = 20
    # "hybrid" only: a local CMA-ES search between the network and the refinement (the paper
    # follows every learned method with CMA-ES), with these offsets in degrees and mm.
    hybrid_cmaes: bool = False
    hybrid_cmaes_sigma: tuple[float, ...] = (5.0, 5.0, 5.0, 10.0, 10.0, 20.0)

    # ---- verification (docs/registration.md) -----------------------------------------------------
    # A result counts as registered when its consistency (verify.py: how the similarity falls
    # around it relative to the DRR's own decorrelation, about 1 at a registered pose) reaches
    # this bar; otherwise the next attempt runs (the next grid candidate, or the global search
    # after the network), and the most consistent attempt is kept, flagged when none verifies.
    # None: no check (the paper's ProST-style pipelines).
    fallback_below: float | None = 0.75
    # The bar for a CT that holds only bone (Problem.bone_only; None: ``fallback_below``). Its
    # DRR explains less of the X-ray, and a wrong optimum keeps more consistency: on the phantom's
    # vertebrae alone (one view, 30 runs) registered poses scored 0.86-0.93, wrong ones (the spine
    # turned 15 deg about its axis, a vertebra off) 0.76-0.80 (docs/registration.md).
    bone_only_fallback_below: float | None = 0.85
    verify_level: Level = Level(64, 0, 0.0, "ncc")
    max_attempts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bone_only_polish is not None:  # an unknown name fails here, not after the refinement
            get_similarity(self.bone_only_polish)
