"""Quantised models on disk: integers and scales in safetensors, a folder ``hasten.load`` opens as a model.

A quantised model folder holds ``config.json`` (the diffusers network config), ``hasten.json`` (the
model's description plus a ``quantization`` record: config, the full-precision model it came from and how
it was calibrated), ``quantized.safetensors`` and ``QUANTIZATION.json`` (the per-layer report). In the
weights file each quantised layer ``L`` stores

* ``L.weight_int`` (int8) or ``L.weight_int4`` (uint8, two signed 4-bit values per byte),
* ``L.weight_scale`` (float32, one row per input-channel group), ``L.bias``,
* ``L.act_t``, ``L.act_scale``, ``L.act_zero_point`` (the activation range bank) when activations are
  quantised;

the safetensors metadata lists the layers with their geometry; everything else in the network (norms,
embeddings, layers left in float) is stored as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from ..models.structure import build_pruned, pruning_record
from ..models.zoo import FOLDER_FORMATS, FolderFormat
from .modules import QuantizedLayer, publish_network_time, set_execution
from .quantizers import pack_int4, unpack_int4

__all__ = ["QUANT_FORMAT", "WEIGHTS_FILE", "load_quantized_network", "save_quantized"]

QUANT_FORMAT = 1
WEIGHTS_FILE = "quantized.safetensors"
RECORD = "quantization"  # the hasten.json record that marks a quantised folder (a key of FOLDER_FORMATS)


def _layer_spec(layer: QuantizedLayer) -> dict[str, Any]:
    return {
        "kind": layer.kind, "bits": layer.bits, "shape": list(layer.weight_int.shape), "split": list(layer.split),
        "has_bias": layer.bias is not None, "act_rows": 0 if layer.act_t is None else layer.act_t.numel(),
        "stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation),
        "groups": layer.groups,
    }  # fmt: skip


def quantized_state(network: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to store (4-bit weights packed) and the layer specs."""
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, Any] = {}
    quantized = {name: m for name, m in network.named_modules() if isinstance(m, QuantizedLayer)}
    for name, layer in quantized.items():
        specs[name] = _layer_spec(layer)
        if layer.bits == 4:
            tensors[f"{name}.weight_int4"] = pack_int4(layer.weight_int)
        else:
            tensors[f"{name}.weight_int"] = layer.weight_int
        for key in ("weight_scale", "bias", "act_t", "act_scale", "act_zero_point"):
            value = getattr(layer, key)
            if value is not None:
                tensors[f"{name}.{key}"] = value
    for key, value in network.state_dict().items():
        if not _owned_by(quantized, key):
            tensors[key] = value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, specs


def save_quantized(model: Any, folder: str | os.PathLike, *, record: dict[str, Any], report: dict | None = None):
    """Write a quantised :class:`hasten.LoadedModel` as a model folder (each file replaced atomically).

    ``record`` becomes ``hasten.json``'s ``quantization`` entry (config, source model, calibration).
    """
    from safetensors.torch import save_file

    network = model.network
    tensors, specs = quantized_state(network)
    if not specs:
        raise ValueError("the model has no quantised layers; run hasten.quant.quantize_ first")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"hasten_quant": str(QUANT_FORMAT),
                                                             "layers": json.dumps(specs)})  # fmt: skip
        network.save_config(tmp)
        info = model.info.to_dict() | {RECORD: {"format": QUANT_FORMAT, **record}}
        (tmp / "hasten.json").write_text(json.dumps(info, indent=2) + "\n")
        if report is not None:
            (tmp / "QUANTIZATION.json").write_text(json.dumps(report, indent=2) + "\n")
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_quantized_network(network_class: Any, folder: pathlib.Path, execution: str = "auto") -> nn.Module:
    """Build the network from ``config.json`` and load ``quantized.safetensors`` into quantised layers.

    Refuses (naming the entry) a weights file with a missing tensor, a missing scale or a shape that does
    not match the network.
    """
    from safetensors import safe_open

    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}; is it a folder written by `hasten quantize`?")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if meta.get("hasten_quant") != str(QUANT_FORMAT):
        raise ValueError(f"{path} is not a hasten quantised checkpoint of format {QUANT_FORMAT}")
    network = build_pruned(network_class, folder, pruning_record(folder))  # a pruned network keeps its widths
    for name, spec in json.loads(meta["layers"]).items():
        try:
            original = network.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path} quantises layer {name!r}, which this network does not have") from err
        layer = QuantizedLayer.like(original, bits=spec["bits"], split=tuple(spec["split"]), act_rows=spec["act_rows"])
        if list(layer.weight_int.shape) != spec["shape"]:
            raise ValueError(
                f"{path}: layer {name!r} has weight shape {spec['shape']} but the network's is "
                f"{list(layer.weight_int.shape)}"
            )
        if spec["bits"] == 4:
            weights = unpack_int4(_take(tensors, f"{name}.weight_int4", path), tuple(spec["shape"]))
        else:
            weights = _take(tensors, f"{name}.weight_int", path)
        state = {"weight_int": weights}
        for key in ("weight_scale", "bias", "act_t", "act_scale", "act_zero_point"):
            if getattr(layer, key) is not None:
                state[key] = _take(tensors, f"{name}.{key}", path)
        for key, value in state.items():
            target = getattr(layer, key)
            if value.shape != target.shape:
                raise ValueError(f"{path}: {name}.{key} has shape {list(value.shape)}, expected {list(target.shape)}")
            target.copy_(value)
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, layer)
    quantized = {n for n, m in network.named_modules() if isinstance(m, QuantizedLayer)}
    state = network.state_dict()  # the quantised layers' buffers are filled above; the rest comes from the file
    missing = sorted(k for k in state if not _owned_by(quantized, k) and k not in tensors)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors of the network, e.g. {missing[:3]}")
    network.load_state_dict({k: v if _owned_by(quantized, k) else tensors[k] for k, v in state.items()}, strict=True)
    if quantized:
        set_execution(network, execution)
    publish_network_time(network)
    return network


# hasten.load opens a folder whose hasten.json has a quantization record with this (the loader imports no quant).
FOLDER_FORMATS.add(RECORD, FolderFormat(WEIGHTS_FILE, load_quantized_network))


def _take(tensors: dict[str, torch.Tensor], key: str, path: pathlib.Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path} lacks {key!r}; the quantised checkpoint is incomplete")
    return tensors[key]


def _owned_by(layers: Any, key: str) -> bool:
    """Whether a state-dict ``key`` is a tensor of one of the named (quantised) layers."""
    return key.rpartition(".")[0] in layers


def quantize_to_folder(
    model: Any,
    config: Any,
    out: str | os.PathLike,
    *,
    n: int = 128,
    mode: str = "trajectory",
    solver: str = "dpmpp_2m",
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 1000,
    points: int | None = None,
    progress: bool = False,
    solver_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate on ``model``'s own trajectories, quantise a copy, write it to ``out``; returns the record.

    What ``hasten quantize`` runs. ``model`` is a bundled name, a folder or a :class:`hasten.LoadedModel`
    (which is quantised in place). The record (also in ``hasten.json``) names the source model, the
    calibration setting, the config and the sizes on disk.
    """
    from ..models.zoo import load
    from .api import quantize_
    from .calibrate import collect_calibration

    loaded = load(model) if isinstance(model, str | os.PathLike) else model
    if loaded.info.quantization:
        raise ValueError(f"{loaded.folder} is already quantised; quantise the full-precision model it came from")
    calibration = collect_calibration(loaded, n=n, mode=mode, solver=solver, steps=steps, guidance=guidance,
                                      seed=seed, points=points, **(solver_options or {}))  # fmt: skip
    source = {"name": loaded.info.name, "fingerprint": loaded.fingerprint, "bytes": loaded.bytes_on_disk(),
              "folder": str(loaded.folder)}  # fmt: skip
    report = quantize_(loaded, config, calibration=calibration, progress=progress)
    record = {
        "label": config.label, "config": config.to_dict(), "source": source, "calibration": calibration.setting,
        "network_sqnr_db": report.network_sqnr_db,
    }  # fmt: skip
    renamed = dataclasses.replace(loaded.info, name=f"{loaded.info.name}-{config.label.lower()}")
    folder = save_quantized(dataclasses.replace(loaded, info=renamed), out, record=record, report=report.to_dict())
    size = (pathlib.Path(folder) / WEIGHTS_FILE).stat().st_size
    return record | {"out": str(folder), "bytes": size, "size_ratio": size / source["bytes"],
                     "execution": report.execution}  # fmt: skip
