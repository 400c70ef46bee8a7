"""The patching engine: named, versioned, reversible patches for ChatGLM remote code and native GLM classes.

Patch authors use :class:`Patch` and :class:`PatchSet`, and contribute sets through the
``glmport_register_patch_sets`` hook. See ``session.py`` for the order of events.
"""

from glmport.patching.model import ALL_BACKENDS, MODES, Patch, PatchContext, PatchSet
from glmport.patching.recorder import PatchRecorder

__all__ = ["ALL_BACKENDS", "MODES", "Patch", "PatchContext", "PatchRecorder", "PatchSet"]
