"""Speed and quality of hasten's quantised execution paths on a CUDA GPU (issue 7's GPU part).

    python benchmarks/quant_gpu.py --out DIR            # on a CUDA machine, about 4 minutes on an H200
    python benchmarks/quant_gpu.py --out DIR --small    # the same stages on small shapes (CPU smoke run)

Three stages, each recorded in ``DIR/quant_gpu.json`` as soon as it ends (a failing stage records its error
and the next one still runs):

1. ``layers``: one linear layer at DiT-XL/2's shapes (tokens x in -> out), bfloat16 ``F.linear`` against the
   same layer quantised W8A8 by hasten and run on ``cuda-int8`` (``torch._int_mm``) and ``float8``
   (``torch._scaled_mm``, e4m3), plus the bare products alone, to show where the time goes.
2. ``network``: DiT-XL/2 (diffusers ``DiTTransformer2DModel``, 675M parameters, random weights: speed does not
   depend on the values), calibrated along a DPM-Solver++ trajectory through ``hasten.from_pipeline`` and
   quantised with ``hasten.quantize_`` (W8A8); forward time of the bfloat16 network against its quantised
   paths and torchao's float8 / int8 configurations on the same network; output SQNR against bfloat16.
3. ``bundled``: the bundled mnist-dit quantised W8A8 on the GPU, 1000 samples (DPM-Solver++(2M), 20 steps)
   per path: FD, RMSE to the float network's samples from the same noise, network time at batch 1000.

Times are medians of CUDA-event-timed repeats after warm-up; every ratio is against a baseline measured in the
same run on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import pathlib
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import hasten
from hasten.hooks import get_hook, remove_hook
from hasten.metrics.quality import evaluate_mnist
from hasten.quant import (
    QuantConfig,
    QuantizedLayer,
    collect_calibration,
    execution_summary,
    modules,
    quantize_,
    set_execution,
)
from hasten.quant.modules import (
    TIME_HOOK,
    cuda_int8_available,
    float8_available,
    network_time,
    publish_network_time,
)
from hasten.quant.quantizers import act_range_search, quantize_weight, sqnr_db

EXECUTIONS = ("simulated", "kernel", "float8")
BATCHES = [16, 64, 256]
PEERS = ["float8", "int8"]


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, a wall clock on the CPU)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def unfused():
    """Run the quantise/dequantise steps op by op (no torch.compile fusion) inside."""
    previous, modules.FUSE_ON_CUDA = modules.FUSE_ON_CUDA, False
    try:
        yield
    finally:
        modules.FUSE_ON_CUDA = previous


def graphed(forward: Callable[[], Any]) -> Callable[[], None]:
    """``forward`` captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
    return graph.replay


@contextlib.contextmanager
def fixed_time(network: nn.Module, t: float):
    """Declare the network time directly instead of through the pre-hook (which reads the timestep tensor
    on the host, a sync a CUDA graph cannot hold): the graph of one sampling step, as a sampler would keep."""
    had_hook = get_hook(network, TIME_HOOK) is not None
    if had_hook:
        remove_hook(network, TIME_HOOK)
    try:
        with network_time(t):
            yield
    finally:
        if had_hook:
            publish_network_time(network)


def quantized_linear(linear: nn.Linear, sample: torch.Tensor) -> QuantizedLayer:
    """A W8A8 hasten layer from ``linear`` with its activation range searched on ``sample`` (one row)."""
    layer = QuantizedLayer.like(linear, bits=8, act_rows=1).to(linear.weight.device)
    w_int, scale = quantize_weight(linear.weight.detach().float(), 8)
    layer.weight_int.copy_(w_int)
    layer.weight_scale[0] = scale
    layer.act_scale[0, 0], layer.act_zero_point[0, 0] = act_range_search(sample.float().flatten()[:1_000_000].cpu())
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach().float())
    layer.execution = "kernel"
    return layer


def stage_layers(device: torch.device, small: bool) -> list[dict]:
    shapes = [(1152, 1152), (1152, 4608), (4608, 1152)] if not small else [(64, 64), (64, 256)]
    tokens = [4096, 16384, 65536] if not small else [256]
    rows = []
    for m in tokens:
        for k, n in shapes:
            torch.manual_seed(0)
            linear = nn.Linear(k, n, device=device)
            x = torch.randn(m, k, device=device) * 2 + 0.1
            layer = quantized_linear(linear, x)
            bf16 = linear.to(torch.bfloat16)
            xb = x.bfloat16()
            row: dict[str, Any] = {"tokens": m, "in": k, "out": n}
            row["bf16_s"] = timed(functools.partial(bf16, xb), device)
            layer.execution = "simulated"
            simulated = layer(xb).float()
            for execution in ("kernel", "float8"):
                layer.execution = execution
                path = layer.path_for(xb)
                row[f"{execution}_path"] = path
                if path == "simulated":
                    continue
                row[f"{execution}_s"] = timed(functools.partial(layer, xb), device)
                row[f"{execution}_sqnr_vs_simulated_db"] = sqnr_db(simulated, layer(xb).float())
                row[f"{execution}_speedup"] = row["bf16_s"] / row[f"{execution}_s"]
                if device.type == "cuda":  # the same path with its quantise/dequantise steps op by op
                    with unfused():
                        row[f"{execution}_unfused_s"] = timed(functools.partial(layer, xb), device)
            if device.type == "cuda" and cuda_int8_available(str(device)):  # the bare int8 product
                xq = torch.randint(-128, 127, (m, k), device=device, dtype=torch.int8)
                wq = torch.randint(-128, 127, (n, k), device=device, dtype=torch.int8)
                row["int_mm_only_s"] = timed(functools.partial(torch._int_mm, xq, wq.t()), device)
            if float8_available(str(device)):  # the bare e4m3 product with scales and bf16 out
                x8, w8 = xb.to(torch.float8_e4m3fn), linear.weight.to(torch.float8_e4m3fn)
                sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
                product = functools.partial(torch._scaled_mm, x8, w8.t(), scale_a=sa, scale_b=sb,
                                            out_dtype=torch.bfloat16)  # fmt: skip
                row["scaled_mm_only_s"] = timed(product, device)
            rows.append(row)
            print("layer", json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows


def stage_probe(device: torch.device, small: bool) -> dict:
    """Where a float8 / int8 layer's time goes at DiT-XL's largest linear shape: each step of the path alone."""
    m, k, n = (65536, 1152, 4608) if not small else (256, 64, 64)
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=device)
    x = torch.randn(m, k, device=device) * 2 + 0.1
    layer = quantized_linear(linear, x)
    xb, bf16 = x.bfloat16(), linear.to(torch.bfloat16)
    row: dict[str, Any] = {"tokens": m, "in": k, "out": n, "bf16_linear_s": timed(functools.partial(bf16, xb), device)}
    c = layer._prepare("float8", layer._float8_constants)
    scale = c["act"][0, 0]
    row["f8_quant_eager_s"] = timed(functools.partial(modules._float8_in, xb, scale), device)
    for dynamic in (True, False):
        compiled = torch.compile(modules._float8_in, dynamic=dynamic)
        row[f"f8_quant_compiled_dynamic_{dynamic}_s"] = timed(functools.partial(compiled, xb, scale), device)
    x8 = modules._float8_in(xb, scale)
    scale_a = torch.full((m, 1), c["act_host"][0][0], device=device)
    for bias in (None, c["bias"]):
        product = functools.partial(torch._scaled_mm, x8, c["w8"][0].t(), scale_a=scale_a, scale_b=c["w_scale"][0],
                                    bias=bias, out_dtype=torch.bfloat16)  # fmt: skip
        row[f"f8_scaled_mm_bias_{bias is not None}_s"] = timed(product, device)
    layer.execution = "float8"
    row["f8_layer_s"] = timed(functools.partial(layer, xb), device)
    with unfused():
        row["f8_layer_unfused_s"] = timed(functools.partial(layer, xb), device)
    if device.type == "cuda":
        row["f8_layer_graph_s"] = timed(graphed(functools.partial(layer, xb)), device)
    layer.execution = "kernel"
    if layer.path_for(xb) == "cuda-int8":
        ci = layer._prepare("cuda-int8", layer._int_mm_constants)
        s, z = ci["scale"][0, 0], ci["zero"][0, 0]
        row["i8_quant_fused_s"] = timed(functools.partial(modules._fused("int8_in"), xb, s, z), device)
        xq = modules._int8_in(xb, s, z)
        row["i8_int_mm_s"] = timed(functools.partial(torch._int_mm, xq, ci["w_t"][0]), device)
        acc = torch._int_mm(xq, ci["w_t"][0])
        epilogue = functools.partial(
            modules._fused("int8_out"), acc, ci["col_scale"][0, 0], ci["offset"][0, 0], torch.bfloat16
        )
        row["i8_epilogue_fused_s"] = timed(epilogue, device)
        row["i8_layer_s"] = timed(functools.partial(layer, xb), device)
    print("probe", json.dumps(row))
    return row


def dit_pipeline(small: bool):
    import diffusers

    size = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, sample_size=32)  # DiT-XL/2
    if small:
        size = dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, sample_size=8)
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                                  num_embeds_ada_norm=1000, **size).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  layers_per_block=1, norm_num_groups=8, sample_size=16)  # fmt: skip
    return diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())


def torchao_peers(network: nn.Module) -> dict[str, nn.Module]:
    """torchao's float8 (dynamic, per row) and int8 (dynamic activations) configurations on copies."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
        from torchao.quantization import quantize_ as ao_quantize_
    except Exception as err:  # any import failure: the rows are skipped, the reason kept
        return {"error": repr(err)}  # type: ignore[dict-item]
    peers = {}
    for name, config in (
        ("torchao_float8_rowwise", lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())),
        ("torchao_int8_dynamic", lambda: Int8DynamicActivationInt8WeightConfig()),
    ):
        if name.split("_")[1] not in PEERS:
            continue
        try:
            peer = copy.deepcopy(network)
            ao_quantize_(peer, config(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear)
                         and m.in_features % 16 == 0 and m.out_features % 16 == 0)  # fmt: skip
            peers[name] = peer
        except Exception as err:
            peers[name] = repr(err)  # type: ignore[assignment]
    return peers


def stage_network(device: torch.device, small: bool) -> dict:
    pipe = dit_pipeline(small).to(device)
    labels = list(range(0, 1000, 37))
    model = hasten.from_pipeline(pipe, class_labels=labels)
    t0 = time.perf_counter()
    calibration = collect_calibration(model, n=32, steps=10, solver="dpmpp_2m", seed=0)
    calibrate_s = time.perf_counter() - t0
    float_net = copy.deepcopy(model.network).to(torch.bfloat16)
    t0 = time.perf_counter()
    report = quantize_(model, QuantConfig(weights=8, activations=8), calibration=calibration)
    quantize_s = time.perf_counter() - t0
    quant_net = model.network.to(torch.bfloat16)
    latent = pipe.transformer.config.sample_size
    result: dict[str, Any] = {
        "parameters": sum(p.numel() for p in float_net.parameters()), "calibrate_s": calibrate_s,
        "quantize_s": quantize_s, "report_network_sqnr_db": report.network_sqnr_db, "batches": [],
    }  # fmt: skip
    peers = torchao_peers(float_net)
    result["torchao"] = {k: v for k, v in peers.items() if not isinstance(v, nn.Module)}
    variants: dict[str, Callable[[], None]] = {"bf16": lambda: None}  # name -> setup before timing
    for execution in EXECUTIONS:
        variants[execution] = functools.partial(set_execution, quant_net, execution)
    for name, peer in peers.items():
        if isinstance(peer, nn.Module):
            variants[name] = lambda: None
    nets = {"bf16": float_net, **dict.fromkeys(EXECUTIONS, quant_net), **peers}
    for batch in BATCHES if not small else (4,):
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(batch, 4, latent, latent, generator=gen).to(device, torch.bfloat16)
        t = torch.full((batch,), 500.0, device=device)
        y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        call = dict(hidden_states=x, timestep=t, class_labels=y)
        row: dict[str, Any] = {"batch": batch, "tokens": batch * (latent // 2) ** 2}
        with torch.no_grad():
            reference = float_net(**call).sample.float()
        for name, setup in variants.items():
            setup()
            net = nets[name]
            forward = functools.partial(net, **call)
            if net is quant_net:
                row[f"{name}_paths"] = execution_summary(quant_net, device, torch.bfloat16)
            row[f"{name}_s"] = timed(forward, device)
            if name != "bf16":
                with torch.no_grad():
                    row[f"{name}_sqnr_db"] = sqnr_db(reference, net(**call).sample.float())
            if device.type == "cuda":  # launch overhead removed: one CUDA graph of the whole forward
                try:
                    with fixed_time(net, 500.0):
                        row[f"{name}_graph_s"] = timed(graphed(forward), device)
                except Exception as err:  # capture refused (a host sync inside): recorded, not fatal
                    row[f"{name}_graph_error"] = repr(err)[:300]
                if net is quant_net and name != "simulated":
                    with unfused():
                        row[f"{name}_unfused_s"] = timed(forward, device)
        for name in variants:
            row[f"{name}_speedup"] = row["bf16_s"] / row[f"{name}_s"]
            if f"{name}_graph_s" in row and "bf16_graph_s" in row:
                row[f"{name}_graph_speedup"] = row["bf16_graph_s"] / row[f"{name}_graph_s"]
        result["batches"].append(row)
        print("network", json.dumps(row, default=str))
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return result


def stage_bundled(device: torch.device, small: bool) -> dict:
    n, steps = (1000, 20) if not small else (64, 4)
    model = hasten.load("mnist-dit", device=device)
    float_gen = hasten.generate(model, n, solver="dpmpp_2m", steps=steps, seed=0, batch_size=n)
    float_net = copy.deepcopy(model.network).to(torch.bfloat16)
    calibration = collect_calibration(model, n=128 if not small else 32, steps=steps, solver="dpmpp_2m")
    report = quantize_(model, QuantConfig(weights=8, activations=8), calibration=calibration)
    result: dict[str, Any] = {"n": n, "steps": steps, "report_network_sqnr_db": report.network_sqnr_db, "rows": []}
    x = torch.randn(n, 1, 28, 28, device=device).bfloat16()
    t, y = torch.full((n,), 500.0, device=device), torch.arange(n, device=device) % 10
    float_s = timed(lambda: float_net(x, t, class_labels=y), device)
    rows = [{"execution": "float32", **evaluate_mnist(float_gen.images01.cpu()),
             "rmse_to_float": 0.0, "sampling_s": float_gen.seconds, "network_bf16_s": float_s}]  # fmt: skip
    for execution in EXECUTIONS:
        set_execution(model.network, execution)
        gen = hasten.generate(model, n, solver="dpmpp_2m", steps=steps, seed=0, batch_size=n)
        rmse = float((gen.images01 - float_gen.images01).pow(2).mean().sqrt())
        quant_bf16 = copy.deepcopy(model.network).to(torch.bfloat16)  # the float32 network keeps its precision
        row = {"execution": execution, "paths": execution_summary(model.network, device),
               **evaluate_mnist(gen.images01.cpu()), "rmse_to_float": rmse,
               "sampling_s": gen.seconds,
               "network_bf16_s": timed(lambda net=quant_bf16: net(x, t, class_labels=y), device)}  # fmt: skip
        rows.append(row)
        print("bundled", json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}, default=str))
    result["rows"] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run of every stage)")
    parser.add_argument("--stages", default="probe,layers,network,bundled")
    parser.add_argument("--peers", default="float8,int8", help="torchao configurations beside hasten's")
    parser.add_argument("--batches", default="16,64,256", help="DiT-XL batch sizes of the network stage")
    args = parser.parse_args()
    BATCHES[:] = [int(b) for b in args.batches.split(",")]
    PEERS[:] = args.peers.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda_int8": device.type == "cuda" and cuda_int8_available(str(device)),
        "float8": float8_available(str(device)), "small": args.small,
    }  # fmt: skip
    print(json.dumps(record))
    stages = {"probe": stage_probe, "layers": stage_layers, "network": stage_network, "bundled": stage_bundled}
    for name in args.stages.split(","):
        t0 = time.perf_counter()
        try:
            record[name] = stages[name](device, args.small)
        except Exception:  # record the failure, run the next stage
            record[name] = {"error": traceback.format_exc()}
            print(record[name]["error"])
        record[f"{name}_wall_s"] = time.perf_counter() - t0
        (args.out / "quant_gpu.json").write_text(json.dumps(record, indent=1, default=str))
    print("\nsummary")
    for row in record.get("layers", []) if isinstance(record.get("layers"), list) else []:
        int8, float8 = row.get("kernel_speedup", float("nan")), row.get("float8_speedup", float("nan"))
        print(
            f"  layer {row['tokens']}x{row['in']}->{row['out']}: bf16 {row['bf16_s'] * 1e3:.3f} ms, "
            f"int8 {int8:.2f}x, float8 {float8:.2f}x"
        )
    network = record.get("network", {})
    for row in network.get("batches", []) if isinstance(network, dict) else []:
        print(
            f"  DiT batch {row['batch']}: bf16 {row['bf16_s'] * 1e3:.2f} ms; "
            + ", ".join(f"{k[:-8]} {v:.2f}x" for k, v in row.items() if k.endswith("_speedup"))
        )
    bundled = record.get("bundled", {})
    for row in bundled.get("rows", []) if isinstance(bundled, dict) else []:
        print(
            f"  mnist-dit {row['execution']}: FD {row.get('fd', float('nan')):.1f}, RMSE {row['rmse_to_float']:.4f},"
            f" network {row['network_bf16_s'] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
