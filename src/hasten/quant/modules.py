"""Quantised layers: integer weights with scales, activation ranges per sampling step, real int8 kernels.

A :class:`QuantizedLayer` replaces one ``nn.Linear`` or ``nn.Conv2d``. It holds the weights as int8 values
(4-bit weights are int8 values in [-8, 7]; they are packed two per byte only on disk) with one scale per
output channel, and, for quantised activations, a bank of uint8 (scale, zero point) pairs: row 0 for any
time, then one row per calibrated network time input (TFMQ-DM's finite-set calibration). The row is chosen
per call from the network's time input, which a hook on the quantised network publishes (the
``"hasten.quant.time"`` hook in :mod:`hasten.hooks`, beside any cache on the same network), so the right
ranges are used whatever loop calls the network.

A layer may split its input channels into groups with their own activation ranges and weight scales
(Q-Diffusion's split quantisation of UNet shortcut concatenations, where the deep features and the skip
features have ranges far apart).

Execution is chosen per call from the device the input is on (:meth:`QuantizedLayer.path_for`):

* ``"kernel"`` runs integer kernels: on x86 CPUs PyTorch's oneDNN int8 convolution and linear (uint8
  activations x int8 weights, int32 accumulation, float32 output); on CUDA, linear layers through
  ``torch._int_mm`` (the uint8 grid shifted to int8, int32 accumulation, the zero point's contribution
  subtracted as one row-sum vector, both scales and the bias applied in one fused multiply-add).
  Convolutions on CUDA stay simulated (PyTorch exposes no int8 convolution there).
* ``"float8"`` runs linear layers through ``torch._scaled_mm`` in float8 e4m3 with a per-tensor activation
  scale taken from the calibrated range and per-output-channel weight scales, bias and output cast fused in
  the matrix product (Hopper/Ada GPUs' fast path). This re-rounds the calibrated integer weights to e4m3
  (3 mantissa bits): a nearby function, not the same one; its error is measured, not assumed.
* ``"simulated"`` dequantises and runs the float operator on fake-quantised inputs.

``"kernel"`` and ``"simulated"`` compute the same function up to float rounding (tested per path).

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

from ..hooks import HookHandle, add_hook
from .quantizers import fake_quant_act

__all__ = [
    "EXECUTIONS",
    "TIME_HOOK",
    "QuantizedLayer",
    "check_execution",
    "cuda_int8_available",
    "execution_summary",
    "float8_available",
    "int8_kernels_available",
    "network_time",
    "publish_network_time",
    "set_execution",
]

EXECUTIONS = ("auto", "kernel", "float8", "simulated")
PATHS = ("onednn-int8", "cuda-int8", "float8", "simulated")  # what one call actually runs
FLOAT8_MAX = 448.0  # largest finite float8 e4m3fn value
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


@functools.cache
def cuda_int8_available(device: str) -> bool:
    """Whether ``torch._int_mm`` runs on this CUDA device (checked once on a small product)."""
    try:
        a = (torch.arange(32 * 32) % 200 - 100).reshape(32, 32).to(torch.int8).to(device)
        b = torch.eye(32, dtype=torch.int8).to(device)
        return bool(torch.equal(torch._int_mm(a, b.t()), a.int()))
    except (AttributeError, AssertionError, RuntimeError, NotImplementedError):  # no CUDA build: AssertionError
        return False


def _float8_product(device: str, *, bias: bool) -> bool:
    """Whether a small e4m3 product with row-wise scales (and the bias, if asked) runs here and is right."""
    try:
        dtype = torch.float8_e4m3fn
        a, b = torch.ones(32, 32).to(device, dtype), torch.ones(32, 32).to(device, dtype)
        out = torch._scaled_mm(
            a, b.t(), scale_a=torch.full((32, 1), 2.0).to(device), scale_b=torch.ones(1, 32).to(device),
            bias=torch.ones(32, dtype=torch.bfloat16).to(device) if bias else None, out_dtype=torch.bfloat16,
        )  # fmt: skip
        return bool(torch.all(out == (65.0 if bias else 64.0)))
    except (AttributeError, AssertionError, RuntimeError, NotImplementedError, TypeError):
        return False


@functools.cache
def float8_available(device: str) -> bool:
    """Whether ``torch._scaled_mm`` runs e4m3 x e4m3 with row-wise scales and bfloat16 output here."""
    return _float8_product(device, bias=False)


@functools.cache
def float8_fuses_bias(device: str) -> bool:
    """Whether that product also takes the bias (else it is added after)."""
    return _float8_product(device, bias=True)


def _int8_in(x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``x`` on the uint8 grid shifted to int8 (float32 arithmetic whatever ``x``'s dtype)."""
    return torch.clamp(torch.round(x.float() / scale) + zero, -128, 127).to(torch.int8)


def _int8_out(acc: Tensor, col_scale: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """The int32 product scaled per output channel plus the zero point's and the bias's offset, in ``dtype``
    (written once: a float32 intermediate is a second pass over the largest tensor of the layer)."""
    return torch.addcmul(offset, acc, col_scale).to(dtype)


def _float8_in(x: Tensor, scale: Tensor) -> Tensor:
    return (x.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)


_STEPS = {"int8_in": _int8_in, "int8_out": _int8_out, "float8_in": _float8_in}
# On CUDA the quantise / dequantise steps around the integer products run as one fused kernel each, built by
# torch.compile (several passes over the activations otherwise: they cost as much as the int8 product saves).
# Set to False to run them op by op; a step whose compilation fails falls back to that by itself.
FUSE_ON_CUDA = True
_FUSED: dict[str, Any] = {}


def _fused(name: str) -> Any:
    eager = _STEPS[name]
    if not FUSE_ON_CUDA or not torch.cuda.is_available() or _FUSED.get(name) is False:
        return eager
    if name not in _FUSED:
        _FUSED[name] = torch.compile(eager, dynamic=True)

    def call(*args: Any) -> Tensor:
        if args[0].device.type != "cuda":
            return eager(*args)
        try:
            return _FUSED[name](*args)
        except Exception as err:  # any compiler failure: keep working, op by op
            warnings.warn(f"hasten: fusing the {name} step failed ({type(err).__name__}: {err}); running it op by op",
                          stacklevel=2)  # fmt: skip
            _FUSED[name] = False
            return eager(*args)

    return call


@contextlib.contextmanager
def network_time(t: float | None) -> Iterator[None]:
    """Declare the time input of the network calls inside (what the hook below does automatically)."""
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


TIME_HOOK = "hasten.quant.time"


def _publish_time(network: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """The time hook: the call's time input is the quantised layers' for the duration of the call."""
    with network_time(time_argument(network, args, kwargs)):
        return forward(*args, **kwargs)


def publish_network_time(network: nn.Module) -> HookHandle:
    """Hook ``network`` (as :data:`TIME_HOOK`) so that its quantised layers see the time input of the call
    they are part of; ``remove()`` on the handle takes the hook off again."""
    return add_hook(network, TIME_HOOK, functools.partial(_publish_time, network))


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
        self.execution = "simulated"  # what is asked for: "kernel", "float8" or "simulated"
        self._prepared: dict[str, tuple[Any, Any]] = {}  # per kernel path: (buffer versions, prepared weights)
        self._paths: dict[tuple, str] = {}  # (device, dtype, execution, rows > 16) -> path

    def __getstate__(self) -> dict[str, Any]:
        # kernel-ready weights are caches (oneDNN's packed ones cannot even be copied): copies rebuild them
        return {**self.__dict__, "_prepared": {}, "_paths": {}}

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLayer:
        # Moves follow the network; dtype casts do not: scales, times and bias stay float32 when the network
        # is cast to bfloat16 (a bfloat16 scale is off by up to 0.4%, and 999 would read as 1000).
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

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
        times = self._bank()[0]
        return 1 + min(range(len(times) - 1), key=lambda i: abs(times[i + 1] - t))

    def _bank(self) -> tuple[list[float], list[list[float]], list[list[int]]]:
        """The activation bank as Python numbers (times, scales, zero points), read from the device once per
        change of the buffers: reading them per call would stall a GPU's queue on every layer."""

        def read() -> tuple:
            return self.act_t.double().tolist(), self.act_scale.double().tolist(), self.act_zero_point.tolist()

        return self._prepare("bank", read)

    def path_for(self, x: Tensor) -> str:
        """What a call on ``x`` runs: ``"onednn-int8"``, ``"cuda-int8"``, ``"float8"`` or ``"simulated"``."""
        key = (x.device, x.dtype, self.execution, x.numel() > 16 * x.shape[-1])
        path = self._paths.get(key)
        if path is None:  # decided once per device, dtype and request: this runs on every call
            self._paths[key] = path = self._choose_path(x)
        return path

    def _choose_path(self, x: Tensor) -> str:
        if not self.quantizes_activations or self.execution == "simulated":
            return "simulated"
        rows = x.numel() // max(x.shape[-1], 1)
        linear = self.kind == "linear" and self.groups == 1
        if self.execution == "float8":
            fits = linear and all((hi - lo) % 16 == 0 for lo, hi in self.channel_groups)
            fits = fits and self.weight_int.shape[0] % 16 == 0
            return "float8" if fits and float8_available(str(x.device)) else "simulated"
        if x.device.type == "cpu":
            return "onednn-int8" if x.dtype == torch.float32 and int8_kernels_available() else "simulated"
        if x.device.type == "cuda" and linear and rows > 16:  # torch._int_mm's shape rules on CUDA
            fits = all((hi - lo) % 8 == 0 for lo, hi in self.channel_groups) and self.weight_int.shape[0] % 8 == 0
            return "cuda-int8" if fits and cuda_int8_available(str(x.device)) else "simulated"
        return "simulated"

    def path_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
        """The path of a typical call on ``device`` (a batch of more than 16 rows)."""
        shape = (4, self.in_channels, 8, 8) if self.kind == "conv2d" else (32, self.in_channels)
        return self.path_for(torch.empty(shape, device=device, dtype=dtype))

    def _channel_dim(self) -> int:
        return 1 if self.kind == "conv2d" else -1

    def _float_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def fake_quantized_input(self, x: Tensor, row: int) -> Tensor:
        """``x`` on this layer's uint8 grids (bank ``row``, one grid per channel group); ``x`` itself for a
        layer with float activations. Computed in float32 whatever ``x``'s dtype (a bfloat16 ``x / scale``
        would be off by more than one step)."""
        if not self.quantizes_activations:
            return x
        dim = self._channel_dim()
        _, scales, zeros = self._bank()
        parts = [
            fake_quant_act(x.narrow(dim, lo, hi - lo).float(), scales[row][g], zeros[row][g]).to(x.dtype)
            for g, (lo, hi) in enumerate(self.channel_groups)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _float_bias(self, dtype: torch.dtype) -> Tensor | None:
        if self.bias is None or self.bias.dtype == dtype:
            return self.bias
        return self._prepare(f"bias-{dtype}", lambda: self.bias.to(dtype))

    def _compute_weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantised weights in ``dtype``, kept between calls (float activations and simulation)."""
        return self._prepare(f"weight-{dtype}", lambda: self.dequantized_weight().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizes_activations:
            return self._float_op(x, self._compute_weight(x.dtype), self._float_bias(x.dtype))
        row = self.row_for(_TIME.get())
        path = self.path_for(x)
        if path == "onednn-int8":
            return self._kernel_forward(x, row)
        if path == "cuda-int8":
            return self._int_mm_forward(x, row)
        if path == "float8":
            return self._float8_forward(x, row)
        x_q = self.fake_quantized_input(x, row)
        return self._float_op(x_q, self._compute_weight(x.dtype), self._float_bias(x.dtype))

    def _prepare(self, path: str, build: Any) -> Any:
        """What ``build`` derives from the buffers (kernel-ready weights, per-row constants, the bank as
        Python numbers), rebuilt only when a buffer changes or moves: a call does no host-device traffic and
        no small kernels for them."""
        buffers = (self.weight_int, self.weight_scale, self.bias, self.act_t, self.act_scale, self.act_zero_point)
        key = tuple((b.data_ptr(), b._version, b.dtype, b.device) for b in buffers if b is not None)
        cached = self._prepared.get(path)
        if cached is None or cached[0] != key:
            self._prepared[path] = cached = (key, build())
        return cached[1]

    def _int_mm_constants(self) -> dict[str, Any]:
        """Per channel group the int8 weights as a column-major [k, n] view (the layout cuBLASLt's int8 product
        wants); per bank row and group the activation scale and shifted zero point (0-d tensors) and the
        epilogue's per-channel factor ``s_x s_w`` and offset ``-z' s_x s_w rowsum(W_q) (+ b)``."""
        weights = [self.weight_int[:, lo:hi].contiguous() for lo, hi in self.channel_groups]
        scale = self.act_scale.float()  # [rows, groups]
        zero = self.act_zero_point.float() - 128.0
        rowsum = torch.stack([w.sum(dim=1, dtype=torch.int32).float() for w in weights])  # [groups, n]
        col_scale = scale[:, :, None] * self.weight_scale.float()[None]  # [rows, groups, n]
        offset = -zero[:, :, None] * rowsum[None] * col_scale
        if self.bias is not None:
            offset[:, 0] += self.bias.float()
        return {"w_t": [w.t() for w in weights], "scale": scale, "zero": zero, "col_scale": col_scale,
                "offset": offset}  # fmt: skip

    def _int_mm_forward(self, x: Tensor, row: int) -> Tensor:
        """``y = s_x s_w (X_q W_q^T - z' rowsum(W_q)) + b`` with X_q on the uint8 grid shifted by -128 to int8
        (zero point z' = z - 128): the same integers as the uint8 grid, so the same function as simulation."""
        c = self._prepare("cuda-int8", self._int_mm_constants)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        for g, (lo, hi) in enumerate(self.channel_groups):
            part = flat[:, lo:hi] if self.split else flat
            x_q = _fused("int8_in")(part, c["scale"][row, g], c["zero"][row, g])
            acc = torch._int_mm(x_q, c["w_t"][g])
            y = _fused("int8_out")(acc, c["col_scale"][row, g], c["offset"][row, g], x.dtype)
            out = y if out is None else out + y
        assert out is not None
        return out.reshape(*x.shape[:-1], -1)

    def _float8_constants(self) -> dict[str, Any]:
        """Per channel group e4m3 weights [n, k] scaled per output channel to the format's range, with the
        scales as the [1, n] row ``torch._scaled_mm`` takes; per bank row and group the activation scale that
        maps the larger end of the calibrated range to the format's largest value; the bias in bfloat16."""
        weights, scales = [], []
        for g, (lo, hi) in enumerate(self.channel_groups):
            w = self.weight_int[:, lo:hi].float() * self.weight_scale[g].float()[:, None]
            scale = (w.abs().amax(dim=1) / FLOAT8_MAX).clamp_min(1e-12)
            weights.append((w / scale[:, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn))
            scales.append(scale[None, :].contiguous())
        s, z = self.act_scale.float(), self.act_zero_point.float()
        act = (torch.maximum(z * s, (255.0 - z) * s) / FLOAT8_MAX).clamp_min(1e-12)  # [rows, groups]
        bias = self._float_bias(torch.bfloat16)
        return {"w8": weights, "w_scale": scales, "act": act, "act_host": act.tolist(), "bias": bias}

    def _float8_forward(self, x: Tensor, row: int) -> Tensor:
        """e4m3 x e4m3 product with a per-tensor activation scale from the calibrated range and per-channel
        weight scales; bias (where the product takes it) and the bfloat16 output fused in the product."""
        c = self._prepare("float8", self._float8_constants)
        flat = x.reshape(-1, x.shape[-1])
        fuse_bias = float8_fuses_bias(str(x.device))
        out = None
        for g, (lo, hi) in enumerate(self.channel_groups):
            part = flat[:, lo:hi] if self.split else flat
            x8 = _fused("float8_in")(part, c["act"][row, g])
            scale_a = torch.full((x8.shape[0], 1), c["act_host"][row][g], device=x.device, dtype=torch.float32)
            bias = c["bias"] if g == 0 else None
            y = torch._scaled_mm(x8, c["w8"][g].t(), scale_a=scale_a, scale_b=c["w_scale"][g],
                                 bias=bias if fuse_bias else None, out_dtype=torch.bfloat16)  # fmt: skip
            if bias is not None and not fuse_bias:
                y = y + bias
            out = y if out is None else out + y
        assert out is not None
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _onednn_constants(self) -> dict[str, Any]:
        """oneDNN's packed int8 weights per channel group, and the weights' (zero) zero points."""
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
        return {"packed": packed, "weight_zero": torch.zeros(self.weight_scale.shape[1], dtype=torch.long)}

    def _kernel_forward(self, x: Tensor, row: int) -> Tensor:
        c = self._prepare("onednn-int8", self._onednn_constants)
        packed = c["packed"]
        dim = self._channel_dim()
        _, scales, zeros = self._bank()
        out = None
        for g, (lo, hi) in enumerate(self.channel_groups):
            scale, zero_point = float(scales[row][g]), int(zeros[row][g])
            part = x.narrow(dim, lo, hi - lo) if len(self.split) else x
            x_q = torch.quantize_per_tensor(part.contiguous(), scale, zero_point, torch.quint8).int_repr()
            w_scale, w_zero = self.weight_scale[g], c["weight_zero"]
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


def check_execution(execution: str, device: torch.device | str) -> None:
    """Refuse an execution that cannot run on ``device`` (``"auto"`` and ``"simulated"`` always can)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {list(EXECUTIONS)}, got {execution!r}")
    device = torch.device(device)
    if execution == "kernel" and not (
        (device.type == "cpu" and int8_kernels_available())
        or (device.type == "cuda" and cuda_int8_available(str(device)))
    ):
        raise RuntimeError(
            f"execution='kernel' needs int8 kernels on {device} (PyTorch's oneDNN on x86 CPUs, torch._int_mm on "
            "CUDA); use 'auto' to fall back to simulation"
        )
    if execution == "float8" and not float8_available(str(device)):
        raise RuntimeError(
            f"execution='float8' needs torch._scaled_mm with e4m3 and row-wise scales on {device} (CUDA GPUs of "
            "compute capability 8.9 or later); use 'auto'"
        )


def set_execution(network: nn.Module, execution: str) -> None:
    """Switch every quantised layer of ``network`` to ``execution`` ("auto" = "kernel", integer kernels
    where the device of each call has them), e.g. after moving a quantised model to a GPU with float8."""
    layers = [m for m in network.modules() if isinstance(m, QuantizedLayer)]
    if not layers:
        raise ValueError("the network has no quantised layers (quantise it with hasten.quantize_ first)")
    check_execution(execution, layers[0].weight_int.device)
    for layer in layers:
        layer.execution = (
            "simulated" if not layer.quantizes_activations else "kernel" if execution == "auto" else execution
        )


def execution_summary(network: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """How many quantised layers of ``network`` run each path (see :data:`PATHS`) on ``device``."""
    counts = dict.fromkeys(PATHS, 0)
    for module in network.modules():
        if isinstance(module, QuantizedLayer):
            counts[module.path_on(device, dtype)] += 1
    return {path: n for path, n in counts.items() if n}
