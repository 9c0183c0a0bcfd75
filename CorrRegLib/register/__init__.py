"""Registration: a pipeline of small stages that a steppable session runs (docs/registration.md).

Stages (one module each): ``search`` (rotation grid with exhaustive in-plane matching, candidate
refinement, bounded CMA-ES), ``network`` (descent along the learned similarity), ``refine``
(coarse-to-fine gradient refinement), ``verify`` (is the result right?). ``bounds`` keeps every
stage to plausible poses, ``problem`` holds the CT, the views and their caches, ``pipeline``
composes the stages per method into attempts, ``session`` steps through them.
"""

from .network import BUNDLED_MODEL_DIR, bundled_model_dir, check_model_camera
from .options import Level, RegistrationOptions
from .session import DEFAULT_METHOD, METHODS, RegistrationResult, RegistrationSession, StepState, register
from .state import RegistrationCancelled
from .views import View

__all__ = [
    "BUNDLED_MODEL_DIR", "DEFAULT_METHOD", "METHODS", "Level", "RegistrationCancelled", "RegistrationOptions",
    "RegistrationResult", "RegistrationSession", "StepState", "View", "bundled_model_dir", "check_model_camera",
    "register",
]
