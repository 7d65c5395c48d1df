"""Quantised layers: integer weights with scales, activation ranges per sampling step, real int8 kernels.

A :class:`QuantizedLayer` replaces one ``nn.Linear`` or ``nn.Conv2d``. It holds the weights as int8 values
(4-bit weights are int8 values in [-8, 7]; they are packed two per byte only on disk) with one scale per
output channel, and, for quantised activations, a bank of uint8 (scale, zero point) pairs: row 0 for any
time, then one row per calibrated network time input (TFMQ-DM's finite-set calibration). The row is chosen
per call from the network's time input, which a pre-hook on the quantised network publishes, so the
right ranges are used whatever loop calls the network.

A layer may split its input channels into groups with their own activation ranges and weight scales
(Q-Diffusion's split quantisation of UNet shortcut concatenations, where the deep features and the skip
features have ranges far apart).

Execution: ``"kernel"`` runs PyTorch's oneDNN int8 convolution and linear kernels (x86 CPUs; uint8
activations x int8 weights, int32 accumulation, float32 output), ``"simulated"`` dequantises and runs the
float operator on fake-quantised inputs. Both compute the same function up to float rounding.

Reference: Li et al., "Q-Diffusion", ICCV 2023 (split shortcut quantisation); Huang et al., "TFMQ-DM",
CVPR 2024 (finite-set calibration of activation ranges per time step).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import fake_quant_act

__all__ = ["EXECUTIONS", "QuantizedLayer", "int8_kernels_available", "network_time", "publish_network_time"]

EXECUTIONS = ("auto", "kernel", "simulated")
# PyTorch marks its quantised tensor type deprecated; its quantize_per_tensor is still the fast uint8
# quantiser here (a third of the time of round/clamp/cast). int8_kernels_available() tests it too, so a
# PyTorch without it falls back to simulation instead of failing.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
_TIME: contextvars.ContextVar[float | None] = contextvars.ContextVar("hasten_quant_network_time", default=None)


@functools.cache
def int8_kernels_available() -> bool:
    """Whether this PyTorch build runs oneDNN int8 conv/linear on the CPU (checked once on a tiny layer)."""
    try:
        w = torch.ones(1, 1, 1, 1, dtype=torch.int8)
        packed = torch.ops.onednn.qconv_prepack(w, torch.ones(1), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        x = torch.quantize_per_tensor(torch.full((1, 1, 2, 2), 3.0), 1.0, 0, torch.quint8).int_repr()
        out = torch.ops.onednn.qconv2d_pointwise(
            x, 1.0, 0, packed, torch.ones(1), torch.zeros(1, dtype=torch.long), None, [1, 1], [0, 0], [1, 1], 1,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return bool(torch.allclose(out, torch.full_like(out, 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@contextlib.contextmanager
def network_time(t: float | None) -> Iterator[None]:
    """Declare the time input of the network calls inside (what the pre-hook below does automatically)."""
    token = _TIME.set(t)
    try:
        yield
    finally:
        _TIME.reset(token)


def time_argument(network: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The ``timestep`` argument of a call to ``network`` as a float (first element of a batch), or None."""
    try:
        bound = inspect.signature(network.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None
    for name in ("timestep", "timesteps", "t"):
        value = bound.get(name)
        if isinstance(value, Tensor) and value.numel():
            return float(value.flatten()[0])
        if isinstance(value, int | float):
            return float(value)
    return None


class _TimeHooks:
    """The pre-hook/post-hook pair of :func:`publish_network_time`; ``remove()`` takes both off."""

    def __init__(self, network: nn.Module) -> None:
        self._tokens: list[contextvars.Token] = []
        self._handles = [
            network.register_forward_pre_hook(self._enter, with_kwargs=True),
            network.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._tokens.append(_TIME.set(time_argument(module, args, kwargs)))

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._tokens:
            _TIME.reset(self._tokens.pop())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def publish_network_time(network: nn.Module) -> _TimeHooks:
    """Hook ``network`` so that its quantised layers see the time input of the call they are part of."""
    return _TimeHooks(network)


class QuantizedLayer(nn.Module):
    """An int8/int4-weight Linear or Conv2d with optional uint8 activations (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        weight_shape: tuple[int, ...],
        *,
        bits: int,
        has_bias: bool,
        split: tuple[int, ...] = (),
        act_rows: int = 0,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "conv2d"):
            raise ValueError(f"kind must be 'linear' or 'conv2d', got {kind!r}")
        self.kind, self.bits = kind, bits
        self.split = tuple(split)  # input-channel boundaries between groups (empty: one group)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups
        if self.split and groups != 1:
            raise ValueError("split quantisation needs an ungrouped layer (groups == 1)")
        n_groups = len(self.split) + 1
        out_channels = weight_shape[0]
        self.register_buffer("weight_int", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n_groups, out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)
        if act_rows:
            self.register_buffer("act_t", torch.full((act_rows,), float("nan")))
            self.register_buffer("act_scale", torch.ones(act_rows, n_groups))
            self.register_buffer("act_zero_point", torch.zeros(act_rows, n_groups, dtype=torch.int32))
        else:
            self.act_t = self.act_scale = self.act_zero_point = None
        self.execution = "simulated"
        self._packed: tuple[Any, list[Any]] | None = None
        self._weight_zero: Tensor | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def like(cls, module: nn.Module, *, bits: int, split: tuple[int, ...] = (), act_rows: int = 0) -> QuantizedLayer:
        """An empty quantised layer with the geometry of ``module`` (an ``nn.Linear`` or ``nn.Conv2d``)."""
        if isinstance(module, nn.Linear):
            return cls("linear", tuple(module.weight.shape), bits=bits, has_bias=module.bias is not None,
                       split=split, act_rows=act_rows)  # fmt: skip
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"only zero-padded convolutions with explicit padding are supported, got {module}")
            return cls(
                "conv2d", tuple(module.weight.shape), bits=bits, has_bias=module.bias is not None, split=split,
                act_rows=act_rows, stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups,
            )  # fmt: skip
        raise TypeError(f"can quantise nn.Linear and nn.Conv2d, got {type(module).__name__}")

    @property
    def in_channels(self) -> int:
        return self.weight_int.shape[1] * self.groups

    @property
    def channel_groups(self) -> list[tuple[int, int]]:
        """(start, stop) of each input-channel group."""
        edges = [0, *self.split, self.weight_int.shape[1]]
        return list(itertools.pairwise(edges))

    @property
    def quantizes_activations(self) -> bool:
        return self.act_scale is not None

    def dequantized_weight(self) -> Tensor:
        """The float weights this layer computes with: int values times their group's channel scale."""
        shape = [-1] + [1] * (self.weight_int.dim() - 1)
        parts = [
            self.weight_int[:, lo:hi].float() * self.weight_scale[g].reshape(shape)
            for g, (lo, hi) in enumerate(self.channel_groups)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        act = f"uint8 x {self.act_t.numel()} ranges" if self.quantizes_activations else "float"
        split = f", split={list(self.split)}" if self.split else ""
        return f"{self.kind}, w{self.bits} {tuple(self.weight_int.shape)}, activations {act}{split}, {self.execution}"

    # -- forward -----------------------------------------------------------------------------------
    def row_for(self, t: float | None) -> int:
        """Bank row for network time ``t``: the nearest calibrated time, else row 0 (all times)."""
        if self.act_t is None or self.act_t.numel() == 1 or t is None:
            return 0
        distance = (self.act_t[1:] - t).abs()
        return 1 + int(torch.argmin(distance))

    def _channel_dim(self) -> int:
        return 1 if self.kind == "conv2d" else -1

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def fake_quantized_input(self, x: Tensor, row: int) -> Tensor:
        """``x`` on this layer's uint8 grids (bank ``row``, one grid per channel group); ``x`` itself for a
        layer with float activations."""
        if not self.quantizes_activations:
            return x
        dim = self._channel_dim()
        parts = [
            fake_quant_act(x.narrow(dim, lo, hi - lo), float(self.act_scale[row, g]), int(self.act_zero_point[row, g]))
            for g, (lo, hi) in enumerate(self.channel_groups)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizes_activations:
            return self._float_op(x, self.dequantized_weight().to(x.dtype), self.bias)
        row = self.row_for(_TIME.get())
        if self.execution == "kernel" and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._kernel_forward(x, row)
        return self._float_op(self.fake_quantized_input(x, row), self.dequantized_weight(), self.bias)

    def _packed_weights(self) -> list[Any]:
        """oneDNN's packed int8 weights per channel group, rebuilt only when the weights change."""
        key = (self.weight_int.data_ptr(), self.weight_int._version, self.weight_scale._version)
        if self._packed is None or self._packed[0] != key:
            packed = []
            for g, (lo, hi) in enumerate(self.channel_groups):
                w = self.weight_int[:, lo:hi].contiguous()
                if self.kind == "linear":
                    packed.append(torch.ops.onednn.qlinear_prepack(w, None))
                else:
                    packed.append(torch.ops.onednn.qconv_prepack(
                        w, self.weight_scale[g], 1.0, 0, list(self.stride), list(self.padding),
                        list(self.dilation), self.groups, None,
                    ))  # fmt: skip
            self._packed = (key, packed)
            self._weight_zero = torch.zeros(self.weight_scale.shape[1], dtype=torch.long)  # symmetric weights
        return self._packed[1]

    def _kernel_forward(self, x: Tensor, row: int) -> Tensor:
        packed = self._packed_weights()
        dim = self._channel_dim()
        out = None
        for g, (lo, hi) in enumerate(self.channel_groups):
            scale, zero_point = float(self.act_scale[row, g]), int(self.act_zero_point[row, g])
            part = x.narrow(dim, lo, hi - lo) if len(self.split) else x
            x_q = torch.quantize_per_tensor(part.contiguous(), scale, zero_point, torch.quint8).int_repr()
            w_scale, w_zero = self.weight_scale[g], self._weight_zero
            bias = self.bias if g == 0 else None
            if self.kind == "linear":
                flat = x_q.reshape(-1, x_q.shape[-1])
                y = torch.ops.onednn.qlinear_pointwise(
                    flat, scale, zero_point, packed[g], w_scale, w_zero, bias, 1.0, 0, torch.float32, "none", [], ""
                ).reshape(*x.shape[:-1], -1)
            else:
                y = torch.ops.onednn.qconv2d_pointwise(
                    x_q, scale, zero_point, packed[g], w_scale, w_zero, bias, list(self.stride), list(self.padding),
                    list(self.dilation), self.groups, 1.0, 0, torch.float32, "none", [], "",
                )  # fmt: skip
            out = y if out is None else out + y
        assert out is not None
        # oneDNN returns channels-last; the float ops around (GroupNorm above all) are slower on it on the CPU
        return out.contiguous()
