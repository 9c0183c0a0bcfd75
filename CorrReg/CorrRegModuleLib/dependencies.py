"""The Python packages CorrRegLib needs in Slicer, and installing them (torch through the PyTorch
extension, the rest with pip, each after asking)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

import slicer

#: Python packages CorrRegLib needs besides what Slicer bundles (numpy, SimpleITK).
REQUIRED_PACKAGES = ("torch", "roma", "cma", "safetensors", "tqdm")
PIP_REQUIREMENTS = {"roma": "roma>=1.4", "cma": "cma>=3.3", "safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}
#: The module's requirements file (the same list as PIP_REQUIREMENTS).
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt")


class DependenciesMixin:
    """Checks and installs the packages; part of ``CorrRegLogicCore``."""

    @staticmethod
    def missingDependencies() -> list[str]:
        """Required Python packages that are not installed here.

        Looked up without importing them (importing torch and the rest takes a second or more,
        which the GUI thread must not spend); the registration worker imports them, and a
        broken installation is reported from there."""
        missing = []
        for name in REQUIRED_PACKAGES:
            if name in sys.modules:
                continue
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(name)
        return missing

    def requireDependencies(self) -> None:
        """Raise ValueError naming the missing packages and how to get them."""
        missing = self.missingDependencies()
        if not missing:
            return
        how = []
        if "torch" in missing:
            how.append("PyTorch: install the 'PyTorch' extension from the Extensions Manager and let it install "
                       "torch (or run CorrRegLogic().installDependencies())")
        others = [m for m in missing if m != "torch"]
        if others:
            how.append("the others with the module's Register button (it offers to install them) or "
                       f"slicer.util.pip_install('{' '.join(PIP_REQUIREMENTS.get(m, m) for m in others)}')")
        raise ValueError(f"CorrReg needs the Python package(s) {', '.join(missing)}, which are not installed; "
                         + "; ".join(how))

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing (inside Slicer): torch through the PyTorch extension's
        PyTorchUtils logic, the rest with ``slicer.packaging.pip_ensure`` (or pip_install after
        asking). Returns True when everything is importable afterwards."""
        missing = self.missingDependencies()
        if not missing:
            return True
        if "torch" in missing:
            try:
                import PyTorchUtils  # the PyTorch extension's module
            except ImportError:
                raise ValueError("CorrReg needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                 "Manager, restart Slicer and try again") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=askConfirmation) is None:
                return False
        others = [PIP_REQUIREMENTS[m] for m in self.missingDependencies() if m in PIP_REQUIREMENTS]
        if others:
            try:
                import slicer.packaging as packaging
                ensure = packaging.pip_ensure
            except (ImportError, AttributeError):
                packaging = ensure = None
            if ensure is not None:
                requirements = others
                if os.path.exists(REQUIREMENTS_FILE) and hasattr(packaging, "load_requirements"):
                    requirements = packaging.load_requirements(REQUIREMENTS_FILE)
                try:
                    ensure(requirements, prompt_install=askConfirmation, requester="CorrReg")
                except RuntimeError as e:  # the user declined
                    logging.info(f"CorrReg: dependencies not installed ({e})")
                    return False
            else:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        "CorrReg needs these Python packages: " + ", ".join(others) + ". Install them now?",
                        "CorrReg dependencies"):
                    return False
                slicer.util.pip_install(others)
        importlib.invalidate_caches()
        return not self.missingDependencies()
