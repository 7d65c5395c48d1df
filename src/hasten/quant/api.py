"""``quantize_(model, QuantConfig(...), calibration=...)``: time-step-aware post-training quantisation.

What one call does, in order:

1. finds the layers to quantise (every ``nn.Linear`` / ``nn.Conv2d`` the network calls, less ``exclude``),
   the order they run in, and the *temporal* layers: those whose input depends on the time input and the
   conditioning only (found by running the network twice on different samples with the same time input:
   their inputs do not change). They form TFMQ-DM's temporal information block;
2. measures every other layer's input ranges on the calibration set, per network time input (one range
   per sampling step, TFMQ-DM's finite-set calibration) and over all of them (used for unseen times);
   split layers (UNet shortcut concatenations) get one range per part;
3. quantises weights per output channel with searched clipping (``reconstruct="adaround"``: then learns
   each weight's rounding on the layer's calibration inputs, for the temporal layers against their outputs
   over the calibration time inputs, TFMQ-DM's temporal reconstruction, done layer by layer);
4. replaces the layers by :class:`~hasten.quant.modules.QuantizedLayer` and hooks the network so the layers
   know the time input of each call (the ``"hasten.quant.time"`` hook of :mod:`hasten.hooks`). The first and
   last layers keep 8-bit weights (``first_last_bits``).

Temporal layers keep float activations (their inputs are a few vectors per call, so quantising them saves
nothing and disturbs every step). Attention's activation-activation products stay in float.

Reference: Li et al., "Q-Diffusion", ICCV 2023; Huang et al., "Towards Accurate Post-training Quantization
for Diffusion Models" (TFMQ-DM), CVPR 2024; Nagel et al., "Up or Down? Adaptive Rounding", ICML 2020.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config, check_choice
from ..hooks import hooked_modules
from ..progress import BudgetProgress
from .calibrate import MIN_SAMPLES, CalibrationSet, NetworkCall
from .modules import EXECUTIONS, QuantizedLayer, check_execution, network_time, publish_network_time, set_execution
from .quantizers import act_range_search, adaround, quantize_weight, sqnr_db

__all__ = ["QuantConfig", "QuantReport", "is_quantized", "quantize_", "shortcut_splits"]

WEIGHT_BITS = (4, 8)
ACTIVATION_BITS = (8, None)
TEMPORAL = ("separate", "plain")
RECONSTRUCT = ("none", "adaround")
RANGE_SEARCH = ("mse", "minmax")
SAMPLE_PER_CHUNK = 2048  # input values kept per layer, time input and chunk for the range search
ADAROUND_SAMPLES = 128  # calibration samples whose layer inputs AdaRound learns from


@dataclasses.dataclass(frozen=True)
class QuantConfig(Config):
    """How to quantise. ``QuantConfig(weights=8, activations=8)`` is W8A8; ``activations=None`` is weight-only.

    Attributes:
        weights: Weight bits (8 or 4), per output channel, symmetric.
        activations: Activation bits (8, uint8 per tensor) or None to keep float activations.
        per_step: One activation range per network time input (finite-set calibration); else one range.
        split_shortcut: Separate ranges for the two halves of UNet shortcut concatenations.
        temporal: "separate": layers fed by the time embedding only keep float activations and are
            reconstructed on their own; "plain": treated like every other layer.
        reconstruct: "none" (rounding to nearest after the range search) or "adaround" (learned rounding).
        range_search: "mse" (Lp-optimal clipping, p = 2.4) or "minmax".
        first_last_bits: Weight bits of the first and last layer (None: same as ``weights``).
        keep_input_float: Leave the first layer's input (the noisy sample itself) unquantised. Near the
            end of sampling the noise the network must read is far below one 8-bit step of the image's
            range; quantising it costs the bundled UNet 10 dB of output SQNR at the last steps.
        keep_output_float: Leave the last layer (the one producing the prediction) in float. A noise
            prediction's error is multiplied by sigma / alpha (up to ~150x) in the denoised estimate at
            high noise; on the bundled UNet the 288 weights of its output conv at 8 bits alone moved the
            samples by 0.055 RMSE of 0.094. It is a tiny layer.
        exclude: Layer-name patterns (fnmatch) left in float.
        execution: "auto" (integer kernels where the device of a call has them: oneDNN on x86 CPUs,
            ``torch._int_mm`` for linear layers on CUDA; else simulated), "kernel" (require them on the
            network's device), "float8" (linear layers in e4m3 through ``torch._scaled_mm``: CUDA compute
            capability 8.9+; re-rounds the integer weights), "simulated" (fake-quantised float compute).
        adaround_iters: Optimisation steps per layer for ``reconstruct="adaround"``.
    """

    weights: int = 8
    activations: int | None = 8
    per_step: bool = True
    split_shortcut: bool = True
    temporal: str = "separate"
    reconstruct: str = "none"
    range_search: str = "mse"
    first_last_bits: int | None = 8
    keep_input_float: bool = True
    keep_output_float: bool = True
    exclude: tuple[str, ...] = ()
    execution: str = "auto"
    adaround_iters: int = 300

    def __post_init__(self) -> None:
        check_choice("weights", self.weights, WEIGHT_BITS)
        check_choice("activations", self.activations, ACTIVATION_BITS)
        check_choice("first_last_bits", self.first_last_bits, (*WEIGHT_BITS, None))
        check_choice("temporal", self.temporal, TEMPORAL)
        check_choice("reconstruct", self.reconstruct, RECONSTRUCT)
        check_choice("range_search", self.range_search, RANGE_SEARCH)
        check_choice("execution", self.execution, EXECUTIONS)
        if self.adaround_iters < 1:
            raise ValueError(f"adaround_iters must be >= 1, got {self.adaround_iters}")

    @property
    def label(self) -> str:
        """``W8A8``, ``W4A8``, ``W8A16`` (float activations)."""
        return f"W{self.weights}A{self.activations or 16}"


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize_` did: per-layer settings and SQNR, the network's output SQNR, execution."""

    config: QuantConfig
    layers: list[dict[str, Any]]
    network_sqnr_db: float
    quantized_parameters: int
    total_parameters: int

    @property
    def execution(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer["execution"]] = counts.get(layer["execution"], 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "network_sqnr_db": self.network_sqnr_db,
            "quantized_parameters": self.quantized_parameters, "total_parameters": self.total_parameters,
            "execution": self.execution, "layers": self.layers,
        }  # fmt: skip


def is_quantized(network: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLayer) for m in network.modules())


def shortcut_splits(network: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shortcut convolutions fed by ``cat([deep, skip])`` in a diffusers UNet's up blocks, with the number
    of deep channels (where the split goes). Empty for networks without that layout."""
    config = getattr(network, "config", None)
    up_blocks = getattr(network, "up_blocks", None)
    if config is None or up_blocks is None or "block_out_channels" not in config:
        return {}
    reversed_channels = list(reversed(config["block_out_channels"]))
    splits: dict[str, tuple[int, ...]] = {}
    for i, block in enumerate(up_blocks):
        # diffusers' up block i takes the previous block's output first, then its own outputs
        prev_output = reversed_channels[max(i - 1, 0)]
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            deep = prev_output if j == 0 else reversed_channels[i]
            if isinstance(shortcut, nn.Conv2d) and 0 < deep < shortcut.in_channels:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = (deep,)
    return splits


def _sample_input(call: NetworkCall) -> tuple[str, Any]:
    """Where the noisy sample sits in a call: ``("arg", 0)`` or ``("kw", name)``."""
    if call.args and isinstance(call.args[0], Tensor) and call.args[0].dim() >= 3:
        return "arg", 0
    for name in ("sample", "hidden_states", "x"):
        if isinstance(call.kwargs.get(name), Tensor):
            return "kw", name
    raise ValueError("cannot find the noisy sample among the network's inputs (first argument or sample=...)")


def _shifted(call: NetworkCall) -> NetworkCall:
    where, key = _sample_input(call)
    if where == "arg":
        args = (call.args[0] + 1.0, *call.args[1:])
        return NetworkCall(args, call.kwargs, call.t, call.step, call.branch)
    return NetworkCall(call.args, {**call.kwargs, key: call.kwargs[key] + 1.0}, call.t, call.step, call.branch)


def _layer_inputs(network: nn.Module, modules: dict[str, nn.Module], call: NetworkCall) -> dict[str, Tensor]:
    """Each named module's (first) input on one call, in execution order; modules never called are absent."""
    return {name: inputs[0] for name, inputs in _layer_inputs_all(network, modules, call).items()}


def _targets(network: nn.Module, config: QuantConfig, filter_fn: Callable | None) -> dict[str, nn.Module]:
    targets = {}
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        targets[name] = module
    return targets


@torch.no_grad()
def _activation_ranges(
    network: nn.Module,
    calibration: CalibrationSet,
    layers: dict[str, nn.Module],
    splits: dict[str, tuple[int, ...]],
    config: QuantConfig,
    bar: BudgetProgress,
) -> dict[str, tuple[list[float], Tensor, Tensor]]:
    """Per layer: the calibrated times, and uint8 scales / zero points of shape [1 + times, groups]
    (row 0: over all times). Without ``per_step`` only row 0."""
    generator = torch.Generator().manual_seed(0)
    samples: dict[tuple[str, float | None, int], list[Tensor]] = {}
    current: dict[str, float | None] = {"t": None}

    def observer(name: str, module: nn.Module):
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
        size = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        edges = [0, *splits.get(name, ()), size]

        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            for g, (lo, hi) in enumerate(itertools.pairwise(edges)):
                part = x.narrow(channel_dim, lo, hi - lo).flatten()
                keep = part[torch.randint(0, part.numel(), (SAMPLE_PER_CHUNK,), generator=generator)]
                keep = torch.cat([keep, part.min()[None], part.max()[None]])  # the extremes always count
                samples.setdefault((name, current["t"], g), []).append(keep)

        return hook

    handles = [module.register_forward_pre_hook(observer(name, module)) for name, module in layers.items()]
    try:
        done = 0
        for chunk in calibration.chunks():
            current["t"] = chunk.t
            with network_time(chunk.t):
                chunk.run(network)
            done += chunk.batch_size
            bar.update(done, f"activation ranges: {done}/{len(calibration)} samples")
    finally:
        for handle in handles:
            handle.remove()
    times = calibration.times if config.per_step else []
    search = config.range_search == "mse"
    result = {}
    for name in layers:
        groups = len(splits.get(name, ())) + 1
        scale = torch.ones(1 + len(times), groups)
        zero = torch.zeros(1 + len(times), groups, dtype=torch.int32)
        for g in range(groups):
            pooled = [s for (n, _, gg), parts in samples.items() if n == name and gg == g for s in parts]
            if not pooled:
                raise ValueError(f"layer {name!r} was never called on the calibration set")
            scale[0, g], zero[0, g] = act_range_search(torch.cat(pooled), search=search)
            for row, t in enumerate(times, start=1):
                parts = samples.get((name, t, g))
                if parts:
                    scale[row, g], zero[row, g] = act_range_search(torch.cat(parts), search=search)
                else:  # a time this layer never ran at (should not happen): fall back to all times
                    scale[row, g], zero[row, g] = scale[0, g], zero[0, g]
        result[name] = (times, scale, zero)
    return result


def _quantize_weights(module: nn.Module, layer: QuantizedLayer, config: QuantConfig) -> None:
    w = module.weight.detach().float()
    for g, (lo, hi) in enumerate(layer.channel_groups):
        w_int, scale = quantize_weight(w[:, lo:hi], layer.bits, search=config.range_search == "mse")
        layer.weight_int[:, lo:hi] = w_int
        layer.weight_scale[g] = scale


def _adaround_samples(calibration: CalibrationSet, count: int, generator: torch.Generator) -> list[NetworkCall]:
    """About ``count`` samples spread evenly over the calibration calls (so over times and branches)."""
    per_call = max(1, math.ceil(count / len(calibration.calls)))
    picked = []
    for call in calibration.calls:
        size = call.batch_size
        rows = torch.randperm(size, generator=generator)[: min(per_call, size)]
        picked.append(call.select(rows.sort().values))
    return picked


@torch.no_grad()
def _capture(network: nn.Module, modules: dict[str, nn.Module], calls: list[NetworkCall]):
    """Inputs of the named modules on ``calls``: name -> list of (input, time)."""
    captured: dict[str, list[tuple[Tensor, float | None]]] = {name: [] for name in modules}
    for call in calls:
        for name, x in _layer_inputs_all(network, modules, call).items():
            captured[name].extend((xi, call.t) for xi in x)
    return captured


@torch.no_grad()
def _layer_inputs_all(network: nn.Module, modules: dict[str, nn.Module], call: NetworkCall) -> dict[str, list[Tensor]]:
    """Every input of each named module on one call (a module may run more than once), keyed in the order
    the modules first ran; modules never called are absent."""
    seen: dict[str, list[Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        with network_time(call.t):
            call.run(network)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _adaround_layer(module: nn.Module, layer: QuantizedLayer, inputs: list[tuple[Tensor, float | None]],
                    float_inputs: list[tuple[Tensor, float | None]], config: QuantConfig,
                    generator: torch.Generator) -> None:  # fmt: skip
    """Learn the rounding of one layer's weights: ``inputs`` (from the partly quantised network, fake-quantised
    as the layer will see them) must reproduce the float layer's output on ``float_inputs``."""
    with torch.no_grad():
        x_q = torch.cat([layer.fake_quantized_input(x, layer.row_for(t)) for x, t in inputs])
        target = torch.cat([module(x) for x, _ in float_inputs])
    bias = None if module.bias is None else module.bias.detach()
    dim = 1

    def forward(x: Tensor, w: Tensor) -> Tensor:
        return layer._float_op(x, w, bias)

    w = module.weight.detach().float()
    learned = []
    for g, (lo, hi) in enumerate(layer.channel_groups):
        if len(layer.channel_groups) == 1:
            fwd = forward
        else:  # learn one group's rounding with the other groups at their current values

            def fwd(x: Tensor, w_g: Tensor, lo=lo, hi=hi) -> Tensor:
                full = layer.dequantized_weight().clone()
                full = torch.cat([full[:, :lo], w_g, full[:, hi:]], dim=dim)
                return forward(x, full)

        learned.append(adaround(
            w[:, lo:hi], layer.weight_scale[g], layer.bits, fwd, x_q, target, iters=config.adaround_iters,
            generator=generator,
        ))  # fmt: skip
    for (lo, hi), w_int in zip(layer.channel_groups, learned, strict=True):
        layer.weight_int[:, lo:hi] = w_int


def _reconstruct(network, order, targets, layers, calibration, config, progress) -> None:
    """AdaRound every layer in execution order, each on the inputs it gets from the network with all earlier
    layers already quantised (BRECQ's asymmetric reconstruction: later layers learn to absorb the errors of
    earlier ones), against the float layer's output on float inputs. Leaves the quantised layers in place;
    on an error the float layers are put back."""
    generator = torch.Generator().manual_seed(0)
    samples = _adaround_samples(calibration, ADAROUND_SAMPLES, generator)
    float_inputs = _capture(network, {n: targets[n] for n in order}, samples)
    bar = BudgetProgress(progress, "AdaRound", len(order))
    try:
        for i, name in enumerate(order):
            inputs = _capture(network, {name: targets[name]}, samples)[name]
            _adaround_layer(targets[name], layers[name], inputs, float_inputs.pop(name), config, generator)
            _set_parent(network, name, layers[name])
            bar.update(i + 1, f"{i + 1}/{len(order)} layers: {name}")
    except BaseException:
        for name in order:
            _set_parent(network, name, targets[name])
        raise
    finally:
        bar.close()


def _set_parent(network: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, module)


def quantize_(
    model: Any,
    config: QuantConfig | None = None,
    *,
    calibration: CalibrationSet,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = False,
) -> QuantReport:
    """Quantise ``model`` (a :class:`hasten.LoadedModel` or its network) in place; see the module docstring.

    Args:
        model: The model; its network's Linear and Conv2d layers are replaced.
        config: :class:`QuantConfig` (default W8A8 with every time-step-aware option on).
        calibration: From :func:`hasten.quant.collect_calibration` on this model.
        filter_fn: ``(module, name) -> bool``: quantise only the layers it accepts.
        progress: Show a progress bar (activation ranges, then AdaRound layer by layer).

    Returns:
        :class:`QuantReport` (per-layer bits, groups, SQNR in dB of the layer output on calibration inputs).
    """
    config = QuantConfig() if config is None else config
    network: nn.Module = getattr(model, "network", model)
    if is_quantized(network):
        raise ValueError("this network is already quantised; load the full-precision model to quantise it again")
    hooked = hooked_modules(network)
    if hooked:  # a cache would serve stale features to the calibration passes, and a hooked layer would be lost
        where = ", ".join(f"{name or type(network).__name__}: {list(names)}" for name, names in hooked.items())
        raise ValueError(
            f"the network carries hooks ({where}); remove them (e.g. the accelerator's .remove()) before "
            "quantize_ and install them again after"
        )
    fingerprint = getattr(model, "fingerprint", None)
    if fingerprint and not calibration.fingerprint:
        raise ValueError(
            "the calibration set does not say which model it was collected on (no fingerprint); collect one on this "
            "model with hasten.quant.collect_calibration, or, if it was, set calibration.fingerprint = "
            "model.fingerprint"
        )
    if calibration.fingerprint and fingerprint and calibration.fingerprint != fingerprint:
        raise ValueError(
            f"the calibration set was collected on another model (fingerprint {calibration.fingerprint}, this "
            f"model {fingerprint}); collect one on this model with hasten.quant.collect_calibration"
        )
    if len(calibration) < MIN_SAMPLES:
        raise ValueError(f"the calibration set has {len(calibration)} samples; at least {MIN_SAMPLES} are needed")
    device = next(iter(network.parameters())).device
    if config.activations:
        check_execution(config.execution, device)
    targets = _targets(network, config, filter_fn)
    middle = calibration.calls[len(calibration.calls) // 2]
    probe = middle.select(torch.arange(min(8, middle.batch_size)))
    try:
        first = _layer_inputs(network, targets, probe)
    except Exception as err:
        raise ValueError(f"the network cannot run on the calibration inputs ({err}); was the set made for it?") from err
    order = list(first)  # execution order; layers the network never calls are not quantised
    if not order:
        raise ValueError("the network has no nn.Linear or nn.Conv2d layer to quantise (after exclude/filter_fn)")
    shifted = _layer_inputs(network, targets, _shifted(probe))
    temporal = set()
    if config.temporal == "separate":
        temporal = {name for name in order if name in shifted and torch.equal(first[name], shifted[name])}
    splits = shortcut_splits(network) if config.split_shortcut else {}
    spatial = [name for name in order if name not in temporal]
    if config.keep_output_float and len(spatial) > 1:  # the prediction layer stays an ordinary float layer
        order = [name for name in order if name != spatial[-1]]
        spatial = spatial[:-1]
    edges = {spatial[0], spatial[-1]} if spatial else set()
    quantized_inputs = spatial[1:] if (config.keep_input_float and spatial) else spatial
    act_layers = {name: targets[name] for name in quantized_inputs} if config.activations else {}
    bar = BudgetProgress(progress, f"quantise {config.label}", len(calibration))
    try:
        ranges = _activation_ranges(network, calibration, act_layers, splits, config, bar)
    finally:
        bar.close()

    layers: dict[str, QuantizedLayer] = {}
    for name in order:
        module = targets[name]
        bits = config.first_last_bits if (name in edges and config.first_last_bits) else config.weights
        times, scale, zero = ranges.get(name, ([], None, None))
        rows = 0 if scale is None else scale.shape[0]
        layer = QuantizedLayer.like(module, bits=bits, split=splits.get(name, ()), act_rows=rows)
        layer = layer.to(module.weight.device)
        if scale is not None:
            layer.act_t[1:] = torch.tensor(times, dtype=torch.float32)
            layer.act_scale.copy_(scale)
            layer.act_zero_point.copy_(zero)
        if module.bias is not None:
            layer.bias.copy_(module.bias.detach().float())
        _quantize_weights(module, layer, config)
        layers[name] = layer

    with torch.no_grad():
        reference_out = _output(probe.run(network))  # the float network's output, for the report
    total = sum(p.numel() for p in network.parameters())
    if config.reconstruct == "adaround":
        _reconstruct(network, order, targets, layers, calibration, config, progress)
    with torch.no_grad(), network_time(probe.t):  # each layer alone on the probe's float inputs
        layer_sqnr = {name: sqnr_db(targets[name](first[name]), layers[name](first[name])) for name in order}
    for name, layer in layers.items():
        _set_parent(network, name, layer)
    set_execution(network, config.execution)
    publish_network_time(network)
    network._hasten_quant_config = config  # type: ignore[attr-defined]
    with torch.no_grad():
        quantized_out = _output(probe.run(network))
    rows = [{
        "name": name, "kind": layer.kind, "bits": layer.bits, "activations": "uint8" if layer.quantizes_activations
        else "float", "temporal": name in temporal, "split": list(layer.split), "execution": layer.path_on(device),
        "parameters": layer.weight_int.numel(), "sqnr_db": layer_sqnr[name],
    } for name, layer in layers.items()]  # fmt: skip
    return QuantReport(config, rows, sqnr_db(reference_out, quantized_out),
                       sum(layer.weight_int.numel() for layer in layers.values()), total)  # fmt: skip


def _output(out: Any) -> Tensor:
    """The tensor of a network output (diffusers returns a dataclass with ``.sample``)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"cannot read a tensor from a network output of type {type(out).__name__}")
