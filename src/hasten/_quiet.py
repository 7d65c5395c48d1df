"""Keep the peers' import-time noise off a user's screen, and nothing else.

Importing a diffusers model class imports ``diffusers.quantizers``, which imports torchao when it is
installed. On a CPU-only install that logs, on every command: torchao's CUDA kernel libraries failing to load,
torch's pytree deprecation notices about torchao's enums, and diffusers' note that torchao's tensor classes
could not be imported. None of them concerns anything hasten does (hasten's torchao rows import torchao
themselves and report their own failures). Each filter sits on the one logger that emits the message and
drops only records matching that exact message; every other record of those loggers still shows.
"""

from __future__ import annotations

import logging
import re

__all__ = ["silence_peer_import_noise"]


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


# (logger, message pattern, condition): the condition is checked when a matching record arrives.
_NOISE = (
    # torchao's CUDA kernels (mxfp8, cutlass) cannot load without a GPU; with one, the failure is shown.
    ("torchao", re.compile(r"Failed to load .*torchao[/\\]_C[^/\\]*\.so"), _cuda_missing),
    # torch deprecates register_constant on Enum subclasses, which torchao still calls at import.
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported"), None),
    # diffusers' torchao loader on a torchao release without the classes it looks for.
    ("diffusers.quantizers.torchao.torchao_quantizer", re.compile(r"^Unable to import `torchao` Tensor objects"), None),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern[str], condition) -> None:
        super().__init__()
        self.pattern, self.condition = pattern, condition

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        return self.condition is not None and not self.condition()


def silence_peer_import_noise() -> None:
    """Install the filters (idempotent). Call before the first diffusers model class is imported."""
    for name, pattern, condition in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern, condition))
