"""Training a model for the CT from the module: ``corrreg train --progress-json`` in a background
process, its progress read on the main thread, Cancel, and the model then used by method "auto".
Real processes on a tiny phantom; a few training steps only (the model is not meant to be good)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CorrReg"))

from CorrRegModuleLib import selftest  # noqa: E402
from CorrRegModuleLib.logic import CorrRegLogicCore  # noqa: E402
from CorrRegModuleLib.training import MODELS_FOLDER  # noqa: E402
from CorrRegLib.phantom import make_spine_phantom  # noqa: E402


@pytest.fixture(scope="module")
def case():
    scene = slicer.vtkMRMLScene()
    c = selftest.buildPhantomCase(scene, size=32, phantom=make_spine_phantom(spacing_mm=5.0))
    c["scene"] = scene
    return c


def test_train_a_model_for_this_ct_then_register_with_it(case, tmp_path):
    scene = case["scene"]
    logic = CorrRegLogicCore(scene)
    assert logic.defaultModelFolder(case["ct"]) is None  # an unsaved scene: the GUI asks for a folder
    scene.SetURL(str(tmp_path / "case.mrml"))
    folder = logic.defaultModelFolder(case["ct"])
    assert folder == str(tmp_path / MODELS_FOLDER / case["ct"].GetName())
    run = logic.trainModel(case["ct"], case["xray"], steps=2, device="cpu")
    stages, steps_seen = [], set()
    while not run.poll().finished:
        if not stages or stages[-1] != run.progress.stage:
            stages.append(run.progress.stage)
        steps_seen.add((run.progress.done, run.progress.steps))
        time.sleep(0.02)
    # corrreg train --progress-json: one line per step, read while the process runs
    assert run.progress.stage == "finished", (run.progress.error, run.log[-5:])
    assert stages[0] in ("starting", "writing the CT") and "training" in stages
    assert (1, 2) in steps_seen or (2, 2) in steps_seen, steps_seen
    model = Path(run.progress.modelDir)
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    trained = json.loads((model / "config.json").read_text())["camera"]
    assert trained["sdd_mm"] == pytest.approx(case["camera"].sdd)
    # Method "auto" now runs the network pipeline (the model is for this C-arm) and says so.
    reg = logic.start(case["ct"], case["xray"], None, modelPath=str(model), initialPoseMode="carm")
    assert "network" in reg.pipelineNote.split("(")[0], reg.pipelineNote
    reg.cancel()
    reg.finish()


def test_cancel_stops_the_training_process(case, tmp_path):
    logic = CorrRegLogicCore(case["scene"])
    run = logic.trainModel(case["ct"], case["xray"], outDir=str(tmp_path / "model"), steps=100000, device="cpu")
    end = time.perf_counter() + 600
    while run.poll().stage != "training" or run._process is None:
        assert time.perf_counter() < end
        time.sleep(0.05)
    run.cancel()
    assert run.wait(60).stage == "cancelled"
    assert run._process.poll() is not None  # the process is gone
