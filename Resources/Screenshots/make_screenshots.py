"""Draw the extension's screenshots from a real registration through the module's Logic.

A procedural spine phantom CT and a simulated X-ray (noise, blur, scatter, heel effect) go into an
MRML scene (slicer-core), ``CorrRegLogicCore.register`` runs the default method in its worker
thread exactly as the module's Register button does, and the pictures are drawn from the scene's
nodes afterwards:

* ``CorrReg-overlay.png``: the DRR's edges over the X-ray at the initial and the registered pose
  (``CorrRegLib.visualize``, as the README's figure);
* ``CorrReg-slice-view.png``: what the Red slice view shows, the X-ray as background and the DRR
  as foreground at 50 % opacity, before and after.

    python Resources/Screenshots/make_screenshots.py          # writes next to this file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "CorrReg"))


def register_phantom(size: int = 192, seed: int = 0):
    import slicer
    import torch
    from CorrRegLib.phantom import make_spine_phantom
    from CorrRegModuleLib import selftest
    from CorrRegModuleLib.logic import CorrRegLogicCore

    torch.manual_seed(seed)
    scene = slicer.vtkMRMLScene()
    phantom = make_spine_phantom(spacing_mm=2.0, seed=seed)
    case = selftest.buildPhantomCase(scene, size=size, phantom=phantom, angles=(6.0, -4.0))
    logic = CorrRegLogicCore(scene)
    pose = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "C-arm pose")
    result = logic.register(case["ct"], case["xray"], pose, initialPoseMode="ap", sod=selftest.PAPER_SOD,
                            rotationOffsetDeg=(4.0, -3.0, 5.0), translationOffsetMm=(8.0, -6.0, 20.0), background=True)
    run = logic.currentRun
    xray = slicer.util.arrayFromVolume(case["xray"])[0].copy()
    after = slicer.util.arrayFromVolume(run.drrNode)[0].copy()
    before = run.renderer.render(run.options.initialPose, full=True)
    targets = phantom.landmarks
    errors = (selftest.mTRE(run.options.initialPose, case["truePose"], targets),
              selftest.mTRE(result.pose, case["truePose"], targets))
    return xray, before, after, errors, run.pipelineNote


def _grey(img):
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def save_slice_view(path: Path, xray, before, after, title: str) -> Path:
    """Background X-ray, foreground DRR at 50 % (Slicer blends the two layers' grey levels)."""
    from CorrRegLib.visualize import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8), dpi=110)
    for ax, drr, label in zip(axes, (before, after), ("initial pose", "registered pose")):
        ax.imshow(0.5 * _grey(xray) + 0.5 * _grey(drr), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"Red view, {label}: X-ray + DRR (opacity 0.5)", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def main(argv=None) -> int:
    from CorrRegLib.visualize import save_overlay

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE), help="folder for the PNGs")
    p.add_argument("--size", type=int, default=192, help="X-ray pixels per side")
    args = p.parse_args(argv)
    xray, before, after, (e0, e1), note = register_phantom(args.size)
    title = f"CorrReg in Slicer, {note}: mTRE {e0:.1f} mm -> {e1:.2f} mm"
    out = Path(args.out)
    print(save_overlay(out / "CorrReg-overlay.png", xray, before, after, title=title))
    print(save_slice_view(out / "CorrReg-slice-view.png", xray, before, after, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
