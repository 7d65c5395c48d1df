"""Execution paths of quantised layers: CUDA int8 (``torch._int_mm``), float8 (``torch._scaled_mm``) and
simulation compute what they should, on whatever device the call runs; dtype casts keep the scales float32.

The int8 and float8 arithmetic is checked on the CPU (PyTorch runs both products there too); the tests
marked ``gpu`` repeat the agreement on CUDA with the bundled DiT and are run on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hasten
from hasten.quant import QuantConfig, QuantizedLayer, execution_summary, float8_available, quantize_, set_execution
from hasten.quant.modules import FLOAT8_MAX, check_execution, network_time
from hasten.quant.quantizers import act_range_search, quantize_weight, sqnr_db


def _layer(in_features=64, out_features=48, *, split=(), bias=True, seed=0) -> tuple[nn.Linear, QuantizedLayer]:
    """A float linear layer and its W8A8 twin with two calibrated time rows (t = 100 and 900)."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    layer = QuantizedLayer.like(linear, bits=8, split=split, act_rows=3)
    layer.act_t[1:] = torch.tensor([100.0, 900.0])
    for g, (lo, hi) in enumerate(layer.channel_groups):
        w_int, scale = quantize_weight(linear.weight[:, lo:hi].detach(), 8)
        layer.weight_int[:, lo:hi] = w_int
        layer.weight_scale[g] = scale
        for row, spread in enumerate((3.0, 1.0, 5.0)):
            sample = torch.randn(4096, generator=gen) * spread + 0.5 * g
            layer.act_scale[row, g], layer.act_zero_point[row, g] = act_range_search(sample)
    if bias:
        layer.bias.copy_(linear.bias.detach())
    layer.execution = "kernel"
    return linear, layer


def _simulated(layer: QuantizedLayer, x: torch.Tensor, t: float) -> torch.Tensor:
    previous, layer.execution = layer.execution, "simulated"
    try:
        with network_time(t):
            return layer(x)
    finally:
        layer.execution = previous


@pytest.mark.parametrize("split", [(), (16,)])
@pytest.mark.parametrize("t", [None, 120.0, 880.0])
def test_int_mm_path_is_the_simulated_function(split, t):
    _, layer = _layer(split=split)
    x = torch.randn(5, 7, 64) * 2 + 0.3
    row = layer.row_for(t)
    assert row == {None: 0, 120.0: 1, 880.0: 2}[t]
    integer = layer._int_mm_forward(x, row)  # what CUDA runs, through PyTorch's CPU int8 product here
    simulated = _simulated(layer, x, t)
    assert integer.shape == simulated.shape == (5, 7, 48)
    assert sqnr_db(simulated, integer) > 60  # the same integers: equal up to float rounding (rare ties)
    assert (integer - simulated).abs().max() < 1e-3 * simulated.abs().max()


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn).float()


@pytest.mark.skipif(not float8_available("cpu"), reason="this PyTorch has no float8 _scaled_mm on the CPU")
@pytest.mark.parametrize("split", [(), (16,)])
def test_float8_path_is_e4m3_with_the_calibrated_range(split):
    _, layer = _layer(split=split)
    x = torch.randn(6, 64) * 2 + 0.3
    row = layer.row_for(880.0)
    out = layer._float8_forward(x, row)
    # the same product written out: e4m3 activations on the calibrated range, e4m3 weights per channel
    expected = torch.zeros(6, 48)
    for g, (lo, hi) in enumerate(layer.channel_groups):
        s, z = float(layer.act_scale[row, g]), int(layer.act_zero_point[row, g])
        s8 = max(z * s, (255 - z) * s) / FLOAT8_MAX
        w = layer.weight_int[:, lo:hi].float() * layer.weight_scale[g][:, None]
        w_scale = w.abs().amax(dim=1) / FLOAT8_MAX
        x8 = _e4m3(x[:, lo:hi] / s8) * s8
        expected += x8 @ (_e4m3(w / w_scale[:, None]) * w_scale[:, None]).T
    expected += layer.bias
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 1e-2 * expected.abs().max()  # bfloat16 output rounding
    # and close to the integer-grid function it stands in for (e4m3 keeps 3 mantissa bits)
    assert sqnr_db(_simulated(layer, x, 880.0), out) > 20


def test_paths_follow_device_dtype_and_request():
    _, layer = _layer()
    x = torch.randn(32, 64)
    expected_cpu = "onednn-int8" if hasten.quant.int8_kernels_available() else "simulated"
    assert layer.path_for(x) == expected_cpu
    assert layer.path_for(x.bfloat16()) == "simulated"  # oneDNN's int8 kernels take float32 input
    layer.execution = "simulated"
    assert layer.path_for(x) == "simulated"
    layer.execution = "float8"
    assert layer.path_for(x) == ("float8" if float8_available("cpu") else "simulated")
    _, odd = _layer(in_features=60)  # e4m3 products need multiples of 16
    odd.execution = "float8"
    assert odd.path_for(torch.randn(32, 60)) == "simulated"
    conv = QuantizedLayer.like(nn.Conv2d(16, 16, 3, padding=1), bits=8, act_rows=1)
    conv.execution = "float8"
    assert conv.path_for(torch.randn(2, 16, 8, 8)) == "simulated"  # no float8 convolution


def test_bfloat16_cast_keeps_scales_float32_and_the_function():
    _, layer = _layer()
    x = torch.randn(32, 64)
    reference = _simulated(layer, x, 880.0)
    layer.to(torch.bfloat16)
    assert layer.act_scale.dtype == layer.weight_scale.dtype == layer.bias.dtype == torch.float32
    assert layer.act_t.dtype == torch.float32 and layer.row_for(880.0) == 2
    out = _simulated(layer, x.bfloat16(), 880.0)
    assert out.dtype == torch.bfloat16
    assert sqnr_db(reference, out.float()) > 35  # bfloat16 input/output rounding only


def test_execution_requests_are_checked():
    with pytest.raises(ValueError, match="execution must be one of"):
        check_execution("int4", "cpu")
    with pytest.raises(ValueError, match="execution must be one of"):
        QuantConfig(execution="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="execution='kernel' needs int8 kernels on cuda"):
            check_execution("kernel", "cuda")
    with pytest.raises(ValueError, match="no quantised layers"):
        set_execution(nn.Sequential(nn.Linear(2, 2)), "auto")


@pytest.fixture(scope="module")
def dit_w8a8():
    model = hasten.load("mnist-dit")
    calibration = hasten.quant.collect_calibration(model, n=32, solver="dpmpp_2m", steps=4, seed=0)
    quantize_(model, QuantConfig(weights=8, activations=8), calibration=calibration)
    return model


def test_float8_execution_of_the_bundled_dit(dit_w8a8):
    if not float8_available("cpu"):
        pytest.skip("this PyTorch has no float8 _scaled_mm on the CPU")
    network = dit_w8a8.network
    x, t, labels = torch.randn(4, 1, 28, 28), torch.full((4,), 500.0), torch.tensor([1, 2, 3, 4])
    try:
        set_execution(network, "simulated")
        with torch.no_grad():
            simulated = network(x, t, class_labels=labels).sample
        set_execution(network, "float8")
        summary = execution_summary(network, "cpu")
        assert summary.get("float8", 0) > 0
        with torch.no_grad():
            float8 = network(x, t, class_labels=labels).sample
    finally:
        set_execution(network, "auto")
    assert sqnr_db(simulated, float8) > 15  # measured ~25 dB; a scale in the wrong place gives < 0 dB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths_on_the_bundled_dit(dit_w8a8):
    network = dit_w8a8.network.to("cuda")
    x = torch.randn(64, 1, 28, 28, device="cuda")
    t, labels = torch.full((64,), 500.0, device="cuda"), torch.arange(64, device="cuda") % 10
    outputs = {}
    try:
        for execution in ("simulated", "kernel", "float8"):
            set_execution(network, execution)
            with torch.no_grad():
                outputs[execution] = network(x, t, class_labels=labels).sample.float()
        assert execution_summary(network, "cuda").get("float8", 0) > 0
        set_execution(network, "kernel")
        assert execution_summary(network, "cuda").get("cuda-int8", 0) > 0
    finally:
        set_execution(network, "auto")
        network.to("cpu")
    assert sqnr_db(outputs["simulated"], outputs["kernel"]) > 40
    assert sqnr_db(outputs["simulated"], outputs["float8"]) > 15
