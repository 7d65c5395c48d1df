"""Structure records: how a pruned network differs from the network its diffusers config builds.

Structured pruning (:mod:`hasten.prune`) removes channels, attention head dimensions or whole blocks. Removed
blocks are expressible in a diffusers config (``num_layers``), so the saved ``config.json`` says so; narrower
layers are not (a DiT config has one width for the residual stream, the attention and the MLP), so the folder
keeps the base architecture's config and ``hasten.json`` carries a ``pruning`` record whose ``structure`` lists

* ``shapes``: every parameter and buffer whose shape differs from the config-built network's, and
* ``attributes``: every integer attribute of a module that differs (``in_features``, ``out_channels``,
  ``num_channels``, an up-sampler's ``channels``...), so the module computes with its new width.

:func:`build_pruned` builds the network from the config, resizes those tensors (empty, to be filled by the
weights file) and sets those attributes; every folder format's loader calls it, so a pruned network can also be
quantised, and loading needs neither Torch-Pruning nor pickle. The record is written by :func:`structure_of`,
which compares the pruned network with a fresh build of its config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["apply_structure", "build_pruned", "structure_of"]


def _int_attributes(module: nn.Module) -> dict[str, Any]:
    """A module's plain integer (or tuple-of-integers) attributes: the widths it computes with."""
    out: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            out[key] = list(value)
    return out


def structure_of(network: nn.Module, base: nn.Module) -> dict[str, Any]:
    """The ``structure`` of a pruned ``network`` relative to ``base`` (a fresh build of its config): the tensor
    shapes and module attributes that differ. Refuses a network whose modules are not ``base``'s by name."""
    base_modules = dict(base.named_modules())
    missing = [name for name, _ in network.named_modules() if name not in base_modules]
    if missing:
        raise ValueError(f"the pruned network has modules its config does not build, e.g. {missing[:3]}")
    base_state = base.state_dict()
    shapes = {}
    for key, tensor in network.state_dict().items():
        if key not in base_state:
            raise ValueError(f"the pruned network has a tensor {key!r} its config does not build")
        if tuple(tensor.shape) != tuple(base_state[key].shape):
            shapes[key] = list(tensor.shape)
    attributes = {}
    for name, module in network.named_modules():
        ours, theirs = _int_attributes(module), _int_attributes(base_modules[name])
        changed = {k: v for k, v in ours.items() if k in theirs and theirs[k] != v}
        if changed:
            attributes[name] = changed
    return {"shapes": shapes, "attributes": attributes}


def apply_structure(network: nn.Module, structure: Mapping[str, Any]) -> nn.Module:
    """Resize ``network`` (built from the base config) in place to the recorded ``structure``; the resized
    tensors are uninitialised until the weights are loaded. Refuses a record that names what the network lacks."""
    try:
        shapes, attributes = dict(structure["shapes"]), dict(structure["attributes"])
    except (KeyError, TypeError):
        raise ValueError("a pruning structure needs 'shapes' and 'attributes' mappings") from None
    for key, shape in shapes.items():
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = network.get_submodule(owner_name)
        except AttributeError:
            raise ValueError(f"the pruning record resizes {key!r}, which this network does not have") from None
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(
                torch.empty(tuple(shape), dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )
        elif leaf in owner._buffers and owner._buffers[leaf] is not None:
            old = owner._buffers[leaf]
            owner._buffers[leaf] = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        else:
            raise ValueError(f"the pruning record resizes {key!r}, which this network does not have")
    for name, changed in attributes.items():
        try:
            module = network.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the pruning record changes module {name!r}, which this network does not have") from None
        for key, value in changed.items():
            if not hasattr(module, key):
                raise ValueError(f"the pruning record sets {name}.{key}, which this module does not have")
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
    return network


def build_pruned(network_class: Any, folder: Any, pruning: Mapping[str, Any] | None) -> nn.Module:
    """The network of a model folder built from its ``config.json``, resized to its pruning record (if any)."""
    network = network_class.from_config(network_class.load_config(folder))
    if pruning:
        apply_structure(network, pruning.get("structure") or {"shapes": {}, "attributes": {}})
    return network


def pruning_record(folder: Any) -> dict[str, Any]:
    """The ``pruning`` record of a model folder's ``hasten.json`` (``{}``: not pruned)."""
    import json
    import pathlib

    data = json.loads((pathlib.Path(folder) / "hasten.json").read_text())
    record = data.get("pruning") or {}
    if not isinstance(record, dict):
        raise ValueError(f"the pruning record of {folder} must be a mapping, got {type(record).__name__}")
    return record
