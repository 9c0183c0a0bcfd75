"""Training a patient-specific network for one CT from the GUI: ``corrreg train`` in a background
process, with its progress read from ``--progress-json`` lines and a Cancel.

``TrainingRun`` writes the CT (from a view of the node's voxels, in a helper thread, no MRML) and
the X-ray's camera into the model folder, starts ``python -m CorrRegLib.cli train`` there and
reads its stderr in the same helper thread; ``poll()`` (main thread) returns the newest
``TrainingProgress``. The model lands in ``outDir`` (config.json + model.safetensors), ready
for method "auto" (which uses it when it was trained for this C-arm).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Folder next to a saved scene where models are put by default.
MODELS_FOLDER = "CorrReg models"


@dataclass
class TrainingProgress:
    done: int = 0
    steps: int = 0
    loss: float = float("nan")
    stage: str = "starting"  # "writing the CT", "training", "finished", "failed", "cancelled"
    finished: bool = False
    error: str = ""
    modelDir: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.steps if self.steps else 0.0


def pythonExecutable() -> str:
    """The Python to run ``corrreg train`` with: Slicer's PythonSlicer inside Slicer, else this one."""
    return shutil.which("PythonSlicer") or sys.executable


def _corrreglibParent() -> str:
    import CorrRegLib

    return str(Path(CorrRegLib.__file__).resolve().parents[1])


class TrainingRun:
    """One ``corrreg train`` process (see the module docstring)."""

    def __init__(self, ct, camera, outDir, steps: int = 600, device: str = "auto", overwrite: bool = False,
                 python: str | None = None, extraArgs=()):
        self.ct, self.camera = ct, camera
        self.outDir = Path(outDir)
        self.steps, self.device, self.overwrite = int(steps), str(device), bool(overwrite)
        self.python = python or pythonExecutable()
        self.extraArgs = list(extraArgs)
        self.progress = TrainingProgress(steps=self.steps, modelDir=str(self.outDir))
        self.log: list[str] = []
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        self._process: subprocess.Popen | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="CorrReg training", daemon=True)

    def start(self) -> "TrainingRun":
        self._thread.start()
        return self

    # -- helper thread ------------------------------------------------------------------------
    def command(self, ctPath, cameraPath) -> list[str]:
        cmd = [self.python, "-m", "CorrRegLib.cli", "train", "--ct", str(ctPath), "--camera", str(cameraPath),
               "--out", str(self.outDir), "--steps", str(self.steps), "--device", self.device, "--progress-json",
               "--json"]
        return cmd + (["--overwrite"] if self.overwrite else []) + self.extraArgs

    def _run(self) -> None:
        try:
            self._messages.put(TrainingProgress(0, self.steps, stage="writing the CT", modelDir=str(self.outDir)))
            inputs = self.outDir.parent / f".{self.outDir.name}-inputs"
            inputs.mkdir(parents=True, exist_ok=True)
            ctPath, cameraPath = inputs / "ct.nrrd", inputs / "camera.json"
            self._writeCT(ctPath)
            cameraPath.write_text(json.dumps(self.camera.to_dict()), encoding="utf-8")
            if self._cancelled.is_set():
                raise _Cancelled()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([_corrreglibParent()] + [p for p in [env.get("PYTHONPATH")] if p])
            self._process = subprocess.Popen(self.command(ctPath, cameraPath), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, env=env)
            self._messages.put(TrainingProgress(0, self.steps, stage="training", modelDir=str(self.outDir)))
            for line in self._process.stderr:
                self._readLine(line)
            out = self._process.stdout.read()
            code = self._process.wait()
            if self._cancelled.is_set():
                raise _Cancelled()
            if code != 0:
                tail = "".join(self.log[-5:]).strip() or f"exit status {code}"
                raise RuntimeError(f"corrreg train failed: {tail}")
            summary = json.loads(out) if out.strip() else {}
            shutil.rmtree(inputs, ignore_errors=True)
            self._messages.put(TrainingProgress(self.steps, self.steps, stage="finished", finished=True,
                                                modelDir=summary.get("model_dir", str(self.outDir))))
        except _Cancelled:
            self._messages.put(TrainingProgress(self.progress.done, self.steps, stage="cancelled", finished=True,
                                                modelDir=str(self.outDir)))
        except BaseException as err:
            self._messages.put(TrainingProgress(self.progress.done, self.steps, stage="failed", finished=True,
                                                error=str(err), modelDir=str(self.outDir)))

    def _readLine(self, line: str) -> None:
        text = line.strip()
        if text.startswith("{"):
            try:
                rec = json.loads(text)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and rec.get("event") == "step":
                self._messages.put(TrainingProgress(int(rec.get("done", 0)), int(rec.get("steps", self.steps)),
                                                    float(rec.get("loss", float("nan"))), "training",
                                                    modelDir=str(self.outDir)))
                return
        if text and not re.match(r"^\s*$", text):
            self.log.append(line)

    def _writeCT(self, path: Path) -> None:
        import numpy as np
        import SimpleITK as sitk

        voxels = np.asarray(self.ct.voxels)
        if voxels.dtype not in (np.int16, np.uint8, np.int8, np.uint16, np.float32):
            voxels = voxels.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
        image.SetSpacing(tuple(float(s) for s in self.ct.spacing))
        image.SetOrigin(tuple(float(v) for v in self.ct.origin))
        image.SetDirection(tuple(float(v) for row in self.ct.direction for v in row))
        sitk.WriteImage(image, str(path), True)

    # -- main thread ---------------------------------------------------------------------------
    def poll(self) -> TrainingProgress:
        """The newest progress (main thread)."""
        while True:
            try:
                self.progress = self._messages.get_nowait()
            except queue.Empty:
                return self.progress

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the process (terminate, then kill after ``timeout`` seconds)."""
        self._cancelled.set()
        p = self._process
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()

    @property
    def finished(self) -> bool:
        return self.progress.finished

    def wait(self, timeout: float | None = None) -> TrainingProgress:
        end = None if timeout is None else time.perf_counter() + timeout
        while not self.poll().finished:
            if end is not None and time.perf_counter() > end:
                break
            time.sleep(0.05)
        return self.progress


class _Cancelled(Exception):
    pass


class TrainingMixin:
    """Training from the GUI; part of ``CorrRegLogicCore``."""

    def defaultModelFolder(self, ctNode, xrayNode=None) -> str | None:
        """``<scene folder>/CorrReg models/<CT name>``, or None when the scene was never saved."""
        url = self.scene.GetURL() if hasattr(self.scene, "GetURL") else ""
        if not url:
            return None
        name = re.sub(r"[^A-Za-z0-9._ -]+", "_", ctNode.GetName()).strip() or "CT"
        return str(Path(url).resolve().parent / MODELS_FOLDER / name)

    def trainModel(self, ctNode, xrayNode, outDir=None, steps: int = 600, device: str = "auto", camera=None,
                   overwrite: bool = False, **cameraArgs) -> TrainingRun:
        """Start training a network for ``ctNode`` seen through ``xrayNode``'s camera; returns the
        running ``TrainingRun`` (poll it from the main thread, cancel it, or ``wait()``)."""
        if self.currentTraining is not None and not self.currentTraining.poll().finished:
            raise ValueError("a model is already being trained; cancel it first")
        self.requireDependencies()
        self._checkInputs(ctNode, xrayNode)
        cam = self.cameraForNode(xrayNode, camera, **cameraArgs)
        outDir = outDir or self.defaultModelFolder(ctNode, xrayNode)
        if not outDir:
            raise ValueError("choose a folder for the model (the scene has not been saved, so there is no folder "
                             "next to it)")
        run = TrainingRun(self.ctData(ctNode), cam, outDir, steps=steps, device=device, overwrite=overwrite).start()
        self.currentTraining = run
        return run
