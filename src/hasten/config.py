"""Frozen-dataclass configuration base: every option object round-trips through JSON.

The pattern follows torchao's ``AOBaseConfig``: a config is plain data (no tensors, no modules),
so it can be written into results files, plans and model cards and read back exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")

_CONFIG_TYPES: dict[str, type[Config]] = {}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every hasten config. Subclasses are frozen dataclasses of JSON-able fields."""

    type_tag: ClassVar[str] = "config"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("type_tag") or f"{cls.__module__}.{cls.__qualname__}"
        cls.type_tag = tag
        _CONFIG_TYPES[tag] = cls

    @classmethod
    def option_names(cls) -> list[str]:
        """The names of the options (dataclass fields) this config takes."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def create(cls: type[C], **options: Any) -> C:
        """Build from keyword options with a clear error for an option this config does not take."""
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(
                f"{cls.__name__} does not take option(s) {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(allowed) or '(no options)'}"
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with a ``_type`` tag, suitable for ``json.dumps``."""
        data = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"_type": self.type_tag, **data}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict`. Called on the base class it dispatches on ``_type``."""
        data = dict(data)
        tag = data.pop("_type", None)
        target: type[Config] = cls
        if tag is not None:
            if tag not in _CONFIG_TYPES:
                import difflib

                known = sorted(t for t, k in _CONFIG_TYPES.items() if issubclass(k, cls) and k is not cls)
                known = [t for t in known if "." not in t] or known  # registered names, not internal parts
                close = difflib.get_close_matches(str(tag), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown {cls.__name__} type {tag!r}{hint} (known: {', '.join(known)})")
            target = _CONFIG_TYPES[tag]
            if not issubclass(target, cls):
                raise TypeError(f"config type {tag!r} is not a {cls.__name__}")
        field_types = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: (tuple(v) if isinstance(v, list) and k in field_types else v) for k, v in data.items()}
        return target.create(**kwargs)  # type: ignore[return-value]


def check_choice(option: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` naming the option, the bad value and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """A resumable run's settings (training, distillation, aggregator or head training).

    :meth:`resume_key` is what a resumed run must repeat: every field but its budget (``BUDGET``), so a run can be
    continued for longer, or stopped sooner, without being taken for another one."""

    BUDGET: ClassVar[tuple[str, ...]] = ("minutes", "checkpoint_minutes")

    def resume_key(self) -> dict[str, Any]:
        data = self.to_dict()
        for name in self.BUDGET:
            data.pop(name)
        return data


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):  # e.g. a distillation's options: a tuple must read back as the list JSON stores
        return {k: _to_plain(v) for k, v in value.items()}
    return value
