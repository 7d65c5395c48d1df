"""Few-step students: ``hasten distill``, ``hasten.distill(...)``.

Each method is one module that registers itself in :data:`METHODS`; importing this package registers the
built-in ones. The package is callable: ``hasten.distill(teacher=..., method=..., nfe=..., out=...)`` is
:func:`hasten.distill.distill`. See ``docs/guide/distillation.md`` for which method to use when.
"""

import sys
import types

from . import consistency, ctm, dmd, early_exit, guidance, mmd, progressive, reflow  # noqa: F401  (register the methods; ctm also the two-time folder format)
from ._base import METHODS, DistillConfig, DistillMethod, DistillResult, NoOptions, distill, prepare, register_method

__all__ = ["METHODS", "DistillConfig", "DistillMethod", "DistillResult", "NoOptions", "distill", "prepare",
           "register_method"]  # fmt: skip


class _CallableModule(types.ModuleType):
    """``hasten.distill`` is both this package and its verb (a module cannot be called otherwise)."""

    def __call__(self, *args, **kwargs) -> DistillResult:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
