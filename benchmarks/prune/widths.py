"""What a pruning setting does before any fine-tune: MACs, one network call's paired wall-clock speed-up (batch
128, one thread, median of 9) and the pruned network's relative error to the unpruned one's output at a few
timesteps (magnitude importance, so no data is needed). Writes JSON.

Usage: python benchmarks/prune/widths.py MODEL OUT.json SETTING [SETTING ...]
  SETTING: ratio[:round_to[:levels]], e.g. 0.25  0.25:16  0.5::1,2
"""

from __future__ import annotations

import copy
import json
import pathlib
import platform
import sys
import time

import torch
from torch import nn

import hasten
from hasten.prune import surgery
from hasten.prune.importance import channel_importance


def main() -> None:
    torch.set_num_threads(1)
    name, out, settings = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    model = hasten.load(name)
    net = model.network.eval()
    labels = torch.arange(128) % 10
    inputs = surgery.example_inputs(net, model.info.image_shape, 128, {"class_labels": labels})
    small = tuple(v[:2] if isinstance(v, torch.Tensor) else v for v in inputs)
    base_macs, base_params = surgery.flops_and_params(net, small)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(64, *model.info.image_shape, generator=gen)
    rows = []
    for setting in settings:
        ratio, round_to, levels = ([*setting.split(":"), "", ""])[:3]
        pruned = surgery.prune_channels(
            copy.deepcopy(net), small, float(ratio), channel_importance("magnitude"),
            round_to=int(round_to) if round_to else None,
            levels=[int(v) for v in levels.split(",")] if levels else None,
        )  # fmt: skip
        macs, params = surgery.flops_and_params(pruned, small)
        errors = {}
        with torch.no_grad():
            for t in (50, 300, 700, 950):
                step = torch.full((64,), float(t))
                a = net(probe, step, class_labels=labels[:64]).sample
                b = pruned(probe, step, class_labels=labels[:64]).sample
                errors[t] = ((a - b).pow(2).mean() / a.pow(2).mean()).item()
        norms = sorted({(m.num_channels, m.num_groups) for m in pruned.modules() if isinstance(m, nn.GroupNorm)})
        row = {"setting": setting, "macs_ratio": base_macs / macs, "parameters": params,
               **surgery.network_speedup(net, pruned, inputs, repeats=9),
               "relative_mse_by_timestep": errors, "group_norms": norms}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps({
        "model": name, "parameters_before": base_params, "rows": rows, "batch": 128, "threads": 1,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
