"""Structured pruning: ``hasten prune``, ``hasten.prune(...)``.

``hasten.prune(model="mnist-dit", target_speedup=1.5, finetune_minutes=30, out="pruned")`` measures how much
pruning the network needs for the speed-up (each candidate pruned on a copy and timed against the unpruned
network, same inputs, calls interleaved), prunes it (:mod:`.surgery`, with the importance of
:mod:`.importance`), fine-tunes it by distillation from the unpruned model (:mod:`.method`) and writes a model
folder that loads with :func:`hasten.load` (its ``hasten.json`` records what was pruned, the measured speed-up,
MACs and parameters before and after, and the fine-tune's cost). The package is callable, as ``hasten.distill``
is. See ``docs/guide/pruning.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
import types
from typing import Any

import torch

from . import method as _method  # noqa: F401  (registers the "prune" distillation method)
from .importance import block_scores, channel_importance, taylor_gradients
from .method import IMPORTANCES, PruneMethod, PruneOptions, spectral_error
from .surgery import (
    STRUCTURES,
    copy_with_gradients,
    example_inputs,
    flops_and_params,
    network_speedup,
    prune_channels,
    remove_blocks,
)

__all__ = [
    "IMPORTANCES",
    "RATIOS",
    "STRUCTURES",
    "PruneMethod",
    "PruneOptions",
    "PruneResult",
    "block_scores",
    "channel_importance",
    "prune",
    "prune_channels",
    "remove_blocks",
    "select",
    "spectral_error",
    "taylor_gradients",
]

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # channel shares tried, smallest first
SELECTION_FILE = "selection.json"  # under <out>/method/: what the speed-up search measured and chose


@dataclasses.dataclass
class PruneResult:
    folder: pathlib.Path
    selection: dict[str, Any]
    steps: int
    seconds: float
    final_loss: float


def _settings(structure: str, importance: str) -> str:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if importance == "auto":
        return "output_change" if structure == "blocks" else "taylor"
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be auto or one of {', '.join(IMPORTANCES)}, got {importance!r}")
    return importance


def select(
    model: Any,
    *,
    target_speedup: float,
    structure: str = "channels",
    importance: str = "auto",
    timing_batch: int = 128,
    seed: int = 0,
    progress: Any = None,
    **settings: Any,
) -> dict[str, Any]:
    """The least pruning of ``model`` (a loaded model) whose network call is ``target_speedup`` times faster than
    the unpruned one's, measured on this machine at batch ``timing_batch``: the smallest ratio of :data:`RATIOS`
    (``channels``), or the fewest lowest-scoring blocks (``blocks``). Every candidate's measurement is returned;
    ``ValueError`` names the best speed-up reached when none meets the target. ``settings``: more
    :class:`PruneOptions` (``round_to``, ``taylor_levels``, ...), honoured as the pruning itself honours them."""
    importance = _settings(structure, importance)
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup must be > 1 (a speed-up), got {target_speedup}")
    options: dict[str, Any] = {**settings, "structure": structure, "importance": importance}
    first = _first_candidate(structure)
    device = next(model.network.parameters()).device
    method = PruneMethod(model, _config(model, options | first, seed), PruneOptions.create(**options, **first), device)
    base = model.network
    cond = method.example_cond(timing_batch)
    inputs = example_inputs(base, model.info.image_shape, timing_batch, cond)
    small = example_inputs(base, model.info.image_shape, 2, method.example_cond(2))
    macs_base, params_base = flops_and_params(base, small)
    tried: list[dict[str, Any]] = []
    if structure == "channels":
        scored = copy.deepcopy(base).float()
        measured = method.score_channels(scored)  # once; each candidate's copy carries the gradients
        candidates = [{"ratio": r} for r in RATIOS]
    else:
        scored = None
        scores = block_scores(model, seed=seed)
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        candidates = [{"blocks": tuple(sorted(order[:k]))} for k in range(1, len(scores))]
        measured = {"block_scores": scores}
    chosen = None
    for candidate in candidates:
        method.options = PruneOptions.create(**options, **candidate)
        if structure == "channels":
            network = copy_with_gradients(scored)
            method.prune_scored(network)
        else:
            network = remove_blocks(copy.deepcopy(base), candidate["blocks"])
        timing = network_speedup(base, network, inputs)
        macs, params = flops_and_params(network, small)
        row = {**{k: list(v) if isinstance(v, tuple) else v for k, v in candidate.items()}, **timing,
               "macs": macs, "macs_ratio": macs_base / macs, "parameters": params}  # fmt: skip
        tried.append(row)
        if progress is not None:
            progress(row)
        if timing["speedup"] >= target_speedup:
            chosen = row
            break
    scored = None  # free the gradient copy before training
    if chosen is None:
        best = max(tried, key=lambda r: r["speedup"])
        what = f"ratio {best['ratio']}" if structure == "channels" else f"{len(best['blocks'])} blocks removed"
        raise ValueError(
            f"no {structure} pruning of {model.info.name} reaches a {target_speedup:g}x network speed-up on this "
            f"machine (batch {timing_batch}): the best measured was {best['speedup']:.2f}x at {what}; ask for at "
            f"most that (--target-speedup), or try the other structure"
        )
    return {
        "target_speedup": target_speedup, "structure": structure, "importance": importance,
        "timing_batch": timing_batch, "macs_base": macs_base, "parameters_base": params_base, "tried": tried,
        "chosen": chosen, **measured, "threads": torch.get_num_threads(), "device": str(method.device),
    }  # fmt: skip


def _first_candidate(structure: str) -> dict[str, Any]:
    return {"ratio": RATIOS[0]} if structure == "channels" else {"blocks": (0,)}


def _config(model: Any, options: dict[str, Any], seed: int):
    from ..distill import DistillConfig

    return DistillConfig(teacher=model.info.name, method="prune", nfe=10, seed=seed, options=options)


def prune(
    model: str = "mnist-dit",
    out: str | os.PathLike | None = None,
    *,
    target_speedup: float = 1.5,
    finetune_minutes: float = 30.0,
    structure: str = "channels",
    importance: str = "auto",
    ratio: float | None = None,
    blocks: tuple[int, ...] | None = None,
    steps: int = 10,
    batch_size: int = 64,
    lr: float = 2e-4,
    ema_decay: float = 0.995,
    timing_batch: int = 128,
    seed: int = 0,
    resume: bool = False,
    device: str = "cpu",
    max_steps: int | None = None,
    progress: bool = True,
    name: str | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` for a measured network speed-up and fine-tune it; writes a model folder at ``out``.

    Args:
        model: A bundled model name or a (float) model folder.
        out: The pruned model's folder; must be new unless ``resume``.
        target_speedup: Network-level speed-up to reach (wall clock of one call at ``timing_batch``, this
            machine); the least pruning that reaches it is chosen. Ignored when ``ratio`` / ``blocks`` is given.
        finetune_minutes: Fine-tune time in all, across resumes.
        structure, importance: ``channels`` (``taylor`` / ``magnitude``) or ``blocks`` (``output_change``).
        ratio, blocks: Prune exactly this much instead of searching.
        steps: Steps of the pruned model's default sampler (``PruneOptions.solver``, the teacher's by default).
        batch_size, lr, ema_decay, seed: The fine-tune's (a short fine-tune wants a short EMA).
        **options: More :class:`PruneOptions` (``output_weight``, ``data_weight``, ``feature_weight``,
            ``spectral_alpha``, ``taylor_levels``, ``round_to``, ...).

    Raises:
        FileExistsError: ``out`` holds files and ``resume`` is False.
        ValueError: a quantised model, a setting no pruning meets (the best reached is named), a bad option.
    """
    from ..distill import DistillConfig, distill
    from ..distill._base import METHOD_WORK, has_run
    from ..models.zoo import load

    if out is None:
        raise TypeError("prune() needs out: the folder to write the pruned model into")
    folder = pathlib.Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder for the pruned model")
    if folder.is_dir() and any(folder.iterdir()):
        if not resume:
            raise FileExistsError(f"{folder} already holds files; resume its run (--resume) or choose another folder")
        if not has_run(folder):
            raise FileExistsError(f"{folder} holds files but no pruning run to resume; choose another folder")
    importance = _settings(structure, importance)
    if structure == "channels" and importlib.util.find_spec("torch_pruning") is None:
        raise ValueError("pruning channels needs Torch-Pruning: pip install 'hasten[prune]' (or torch-pruning)")
    if ratio is not None and blocks is not None:
        raise ValueError("give ratio (structure 'channels') or blocks (structure 'blocks'), not both")
    loaded = load(model, device=device)
    if loaded.info.quantization:
        raise ValueError(
            f"{model} is a quantised folder: prune the float model it came from, then quantise the pruned folder "
            "(hasten quantize --model PRUNED)"
        )
    probe = {"ratio": ratio or 0.5} if structure == "channels" else {"blocks": tuple(blocks or (0,))}
    probed = PruneOptions.create(structure=structure, importance=importance, **options, **probe)  # refused now, by name
    PruneMethod.check(loaded, _config(loaded, options | probe, seed), probed)  # and what does not fit the network
    saved = folder / METHOD_WORK / SELECTION_FILE
    if saved.is_file():  # a resumed run keeps what it chose (timings differ from run to run)
        selection = json.loads(saved.read_text())
    elif ratio is not None or blocks is not None:
        selection = {"structure": structure, "importance": importance, "chosen": {"ratio": ratio} if ratio
                     is not None else {"blocks": sorted(blocks)}, "target_speedup": None}  # fmt: skip
    else:
        report = (lambda row: print(f"  tried {row}", flush=True)) if progress else None
        selection = select(
            loaded, target_speedup=target_speedup, structure=structure, importance=importance,
            timing_batch=timing_batch, seed=seed, progress=report, **options,
        )  # fmt: skip
    chosen = selection["chosen"]
    pick = {"ratio": chosen["ratio"]} if structure == "channels" else {"blocks": tuple(chosen["blocks"])}
    from .._io import write_text_atomic

    (folder / METHOD_WORK).mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(selection, indent=2) + "\n")
    config = DistillConfig(
        teacher=model, method="prune", nfe=steps, minutes=finetune_minutes, batch_size=batch_size, lr=lr,
        ema_decay=ema_decay, seed=seed, options={"structure": structure, "importance": importance, **options, **pick},
    )  # fmt: skip
    result = distill(config, folder, resume=True, device=device, max_steps=max_steps, progress=progress, name=name)
    _record_selection(folder, selection)
    return PruneResult(folder, selection, result.steps, result.seconds, result.final_loss)


def _record_selection(folder: pathlib.Path, selection: dict[str, Any]) -> None:
    """Add the speed-up search to the folder's ``pruning`` record and its card (the weights are untouched)."""
    from .. import distributed
    from .._io import write_text_atomic

    if not distributed.is_main():
        return
    path = folder / "hasten.json"
    data = json.loads(path.read_text())
    data["pruning"]["selection"] = selection
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    record = data["pruning"]
    chosen = selection["chosen"]
    amount = (
        f"ratio {record['ratio']}"
        if record["structure_kind"] == "channels"
        else f"blocks removed {record['blocks_removed']}"
    )
    lines = [
        "",
        "## Pruning",
        "",
        f"* **Structure:** {record['structure_kind']}, importance `{record['importance']}`; {amount}.",
        f"* **MACs per image:** {record['macs_before'] / 1e6:.1f}M -> {record['macs_after'] / 1e6:.1f}M "
        f"({record['macs_before'] / record['macs_after']:.2f}x fewer); **parameters:** "
        f"{record['parameters_before']:,} -> {record['parameters_after']:,}.",
    ]
    if "speedup" in chosen:
        lines.append(
            f"* **Measured network speed-up (before fine-tuning):** {chosen['speedup']:.2f}x at batch "
            f"{selection['timing_batch']} on {selection['device']} ({selection['threads']} threads), target "
            f"{selection['target_speedup']}x."
        )
    card = folder / "MODEL_CARD.md"
    write_text_atomic(card, card.read_text() + "\n".join(lines) + "\n")


class _CallableModule(types.ModuleType):
    """``hasten.prune`` is both this package and its verb."""

    def __call__(self, *args: Any, **kwargs: Any) -> PruneResult:
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
