"""Early exit for DiTs: light exit heads that let a call stop after block ``i`` when they are confident.

After each transformer block ``i`` but the last, an *exit head* ``g_i`` maps the hidden tokens to the network's
output (a copy of the model's own adaLN final layer: norm, shift/scale from the conditioning, projection,
unpatchify, so it starts sensible) and an *uncertainty estimator* ``u_i`` predicts, per token, how wrong
``g_i`` is: ``u = sigmoid(w . silu(A LN(h) + B silu(c)) + b)`` from the token and the conditioning ``c``
(timestep and class embedding; DeeDiff's linear map made a one-hidden-layer MLP of width d/4). At sampling
time, after block ``i`` the mean of ``u_i`` over the tokens and the batch is compared with a threshold that
depends on the step; below it the call returns ``g_i``'s output and the remaining blocks and the final layer
never run. The whole batch exits together: a batched call's cost is
the deepest sample's, so a per-sample exit saves nothing on a CPU batch.

The heads are trained with the backbone frozen (it is the teacher): on MNIST training images noised at a
uniformly drawn time, the full network's own output is the target (so any objective works: the heads learn
the network's output space), and per exit layer the loss is

* ``L_u = mean (u - tanh|g - y|)^2``: the estimator regresses DeeDiff's pseudo target, per token (the mean of
  ``tanh|g - y|`` over the token's pixels);
* ``L_UAL = mean (1 - u) |g - y|^2``: DeeDiff's uncertainty-aware layer loss, ``u`` taken as a constant here
  (its gradient would push ``u`` up wherever the head is wrong, away from the estimate ``L_u`` asks for);
* ``L_layer = mean |g - y|^2``: the unweighted per-layer loss the independent reproduction needed, so a head
  is never excused from being right where its estimator says it is unsure;

summed over the three and averaged over the exit layers. One estimator per layer (not per time step: the
reproduction found per-step estimators hardly ever exit with a frozen backbone). DeeDiff's joint training of
the backbone with its heads is the distillation method ``early_exit`` (:mod:`hasten.distill.early_exit`),
which uses the same loss on the trained network's hidden tokens.

Threshold: ``threshold`` at the first step, ramping linearly to ``final_threshold`` at the last (None: the
same everywhere). Exits are allowed only when the threshold at the step is above zero: a threshold of 0
never exits and does not even evaluate the estimators, so the output is bit-identical to the full network.

Reference: Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion Model
Generation", 2023 (AdaDiff, ECCV 2024), Eqs. 4-8; the independent reproduction
razvanmatisan/early-exiting-diffusion (per-layer estimators, unweighted layer loss).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import RunConfig
from ..hooks import add_hook, remove_hooks
from ..train import objective_target
from .hooks import TECHNIQUES, AccelConfig, Accelerator, CallState, check_window, window_steps

HEADS_FORMAT = "hasten.exit_heads/1"
FINAL_LAYER = ("norm_out", "proj_out_1", "proj_out_2")


# -- the config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EarlyExitConfig(AccelConfig):
    """Early exit through trained exit heads (``hasten accelerate train-exits``).

    Args:
        heads: The heads file (safetensors, made for this network's weights; relative paths are taken from
            the working directory).
        threshold: Exit after a block when its estimated uncertainty (mean ``tanh`` error of its head, in
            (0, 1)) is below this, at the first step; 0 never exits.
        final_threshold: The threshold at the last step, reached linearly over the steps (None: constant).
        start, stop: Fractions of the steps outside which every call runs in full.
    """

    technique: ClassVar[str] = "early_exit"
    type_tag: ClassVar[str] = "early_exit"
    heads: str
    threshold: float = 0.0
    final_threshold: float | None = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.heads, str) or not self.heads:
            raise ValueError("heads must name an exit-heads file (from `hasten accelerate train-exits`)")
        for option in ("threshold", "final_threshold"):
            value = getattr(self, option)
            if option == "final_threshold" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{option} must be in [0, 1] (an uncertainty; 0 never exits), got {value!r}")
        check_window(self.start, self.stop)

    def threshold_at(self, step: int, num_steps: int | None) -> float:
        """The threshold at step ``step`` of ``num_steps`` (0 outside the ``[start, stop)`` window)."""
        if self.final_threshold is None and self.start == 0.0 and self.stop == 1.0:
            return float(self.threshold)
        if num_steps is None:
            raise ValueError(
                f"an early exit with final_threshold={self.final_threshold}, start={self.start}, stop={self.stop} "
                "needs the number of steps: sample with hasten.sample/generate, or call reset(num_steps=N) first"
            )
        if step not in window_steps(self.start, self.stop, num_steps):
            return 0.0
        if self.final_threshold is None:
            return float(self.threshold)
        frac = step / (num_steps - 1) if num_steps > 1 else 0.0
        return float(self.threshold + (self.final_threshold - self.threshold) * frac)


# -- the network's layout -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiTLayout:
    """What exit heads need to know of a DiT: its blocks, width, patch and output channels."""

    blocks: nn.ModuleList
    inner_dim: int
    patch_size: int
    out_channels: int

    @classmethod
    def of(cls, network: nn.Module) -> DiTLayout:
        blocks = getattr(network, "transformer_blocks", None)
        parts_ok = all(isinstance(getattr(network, name, None), nn.Module) for name in FINAL_LAYER)
        emb = getattr(getattr(blocks[0], "norm1", None), "emb", None) if isinstance(blocks, nn.ModuleList) else None
        if not (isinstance(blocks, nn.ModuleList) and len(blocks) >= 2 and parts_ok and emb is not None):
            raise TypeError(
                f"early exit needs a DiT (diffusers DiTTransformer2DModel: transformer_blocks with adaLN-Zero "
                f"norm1.emb, and the final layer {', '.join(FINAL_LAYER)}); {type(network).__name__} is not one "
                "(UNets: see docs/guide/early-exit.md for why they have no exits)"
            )
        config = getattr(network, "config", None)
        patch = int(getattr(config, "patch_size", 0) or 0)
        out_channels = int(getattr(network, "out_channels", 0) or 0)
        inner = int(network.proj_out_2.in_features)
        if patch < 1 or out_channels < 1 or network.proj_out_2.out_features != patch * patch * out_channels:
            raise TypeError(f"{type(network).__name__}: cannot read the patch size and output channels of its DiT")
        return cls(blocks, inner, patch, out_channels)

    @staticmethod
    def conditioning(network: nn.Module, timestep: Tensor, class_labels: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The embedding the final layer is conditioned on (block 0's timestep + class embedding)."""
        return network.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=dtype)


def patch_means(x: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, tokens]``: the mean over each token's patch and channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.mean(dim=(1, 3, 5)).reshape(b, -1)


class ExitHeads(nn.Module):
    """The exit heads ``g_i`` and uncertainty estimators ``u_i`` of blocks ``0 .. num_exits - 1``."""

    def __init__(self, inner_dim: int, patch_size: int, out_channels: int, num_exits: int) -> None:
        super().__init__()
        self.inner_dim, self.patch_size, self.out_channels = inner_dim, patch_size, out_channels
        self.num_exits = num_exits
        pixels = patch_size * patch_size * out_channels
        self.modulation = nn.ModuleList(nn.Linear(inner_dim, 2 * inner_dim) for _ in range(num_exits))
        self.projection = nn.ModuleList(nn.Linear(inner_dim, pixels) for _ in range(num_exits))
        width = max(8, inner_dim // 4)  # the estimator's hidden width: a small MLP per exit
        self.uem_tokens = nn.ModuleList(nn.Linear(inner_dim, width) for _ in range(num_exits))
        self.uem_condition = nn.ModuleList(nn.Linear(inner_dim, width, bias=False) for _ in range(num_exits))
        self.uem_out = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_exits))

    def layout(self) -> dict[str, int]:
        return {"inner_dim": self.inner_dim, "patch_size": self.patch_size, "out_channels": self.out_channels,
                "num_exits": self.num_exits}  # fmt: skip

    @classmethod
    def from_network(cls, network: nn.Module) -> ExitHeads:
        """Heads for ``network``, each initialised as a copy of its final layer; estimators start at u = 0.5."""
        lay = DiTLayout.of(network)
        heads = cls(lay.inner_dim, lay.patch_size, lay.out_channels, len(lay.blocks) - 1)
        with torch.no_grad():
            for i in range(heads.num_exits):
                heads.modulation[i].load_state_dict(network.proj_out_1.state_dict())
                heads.projection[i].load_state_dict(network.proj_out_2.state_dict())
                nn.init.zeros_(heads.uem_out[i].weight)
                nn.init.zeros_(heads.uem_out[i].bias)
        return heads.to(next(network.parameters()).dtype)

    def output(self, i: int, hidden: Tensor, conditioning: Tensor) -> Tensor:
        """``g_i``: the network's output from block ``i``'s hidden tokens (the DiT final layer's computation)."""
        shift, scale = self.modulation[i](F.silu(conditioning)).chunk(2, dim=1)
        h = F.layer_norm(hidden, (self.inner_dim,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = self.projection[i](h)
        side, p, c = int(h.shape[1] ** 0.5), self.patch_size, self.out_channels
        h = h.reshape(-1, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, side * p, side * p)

    def uncertainty(self, i: int, hidden: Tensor, conditioning: Tensor) -> Tensor:
        """``u_i`` per token, ``[B, tokens]`` in (0, 1)."""
        tokens = self.uem_tokens[i](F.layer_norm(hidden, (self.inner_dim,), eps=1e-6))
        features = F.silu(tokens + self.uem_condition[i](F.silu(conditioning))[:, None])
        return torch.sigmoid(self.uem_out[i](features)[..., 0])


def exit_loss(
    heads: ExitHeads,
    hidden: list[Tensor],
    conditioning: Tensor,
    target: Tensor,
    *,
    layer_weights: Tensor | None = None,
    sample_weights: Tensor | None = None,
    estimator_target: Tensor | None = None,
) -> dict[str, Tensor]:
    """The training loss of every exit (see the module docstring): ``total`` and its parts, each averaged over
    the exit layers. ``hidden[i]``: block ``i``'s output tokens; ``target``: the full network's output (the
    frozen teacher's, also when the backbone is trained with the heads). ``estimator_target``: what the
    uncertainty estimators' pseudo-labels measure the error to, when the heads learn toward another target
    (None: ``target``); the estimate decides an exit, so it must be the error to the network's output, not
    to a noisy training target.

    ``layer_weights`` [num_exits] makes the average over the exits a weighted one (normalised to sum 1) and
    ``sample_weights`` [B] the average over the batch (normalised to mean 1); None: plain means."""
    parts = {"uncertainty": [], "ual": [], "layer": []}
    if sample_weights is not None:
        sample_weights = (sample_weights / sample_weights.mean()).float()

    def batch_mean(per_token: Tensor) -> Tensor:  # [B, tokens] -> scalar
        if sample_weights is None:
            return per_token.mean()
        return (per_token.mean(1) * sample_weights).mean()

    for i in range(heads.num_exits):
        output = heads.output(i, hidden[i], conditioning).float()
        err = output - target.float()
        miss = err if estimator_target is None else output - estimator_target.float()
        u = heads.uncertainty(i, hidden[i], conditioning).float()
        pseudo = patch_means(torch.tanh(miss.detach().abs()), heads.patch_size)
        token_sq = patch_means(err.pow(2), heads.patch_size)
        parts["uncertainty"].append(batch_mean((u - pseudo).pow(2)))
        parts["ual"].append(batch_mean((1 - u.detach()) * token_sq))
        parts["layer"].append(batch_mean(token_sq))
    if layer_weights is None:
        out = {name: torch.stack(values).mean() for name, values in parts.items()}
    else:
        weights = (layer_weights / layer_weights.sum()).float()
        out = {name: (torch.stack(values) * weights).sum() for name, values in parts.items()}
    out["total"] = out["uncertainty"] + out["ual"] + out["layer"]
    return out


# -- the heads file -------------------------------------------------------------------------------------


def network_fingerprint(network: nn.Module) -> str:
    """sha256 of a network's weights (names, dtypes, shapes, bytes): which network exit heads belong to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_exit_heads(
    heads: ExitHeads, path: str | os.PathLike, network: nn.Module, record: dict[str, Any]
) -> pathlib.Path:
    """Write ``heads`` atomically as safetensors; the metadata names the network they were trained for."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    meta = {
        "format": HEADS_FORMAT,
        "network_fingerprint": network_fingerprint(network),
        "layout": json.dumps(heads.layout()),
        "record": json.dumps(record),
    }
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_exit_heads(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata (``network_fingerprint``, ``layout``, ``record``) of a heads file."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"exit heads {str(path)!r} do not exist (make them with `hasten accelerate train-exits`)"
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an exit-heads file (format {meta.get('format')!r}, need {HEADS_FORMAT!r})"
        )
    meta["layout"] = json.loads(meta["layout"])
    meta["record"] = json.loads(meta.get("record") or "{}")
    return tensors, meta


def load_exit_heads(path: str | os.PathLike, network: nn.Module) -> ExitHeads:
    """The heads in ``path``, refused unless they were trained for exactly ``network``'s weights."""
    tensors, meta = read_exit_heads(path)
    mine = network_fingerprint(network)
    if meta.get("network_fingerprint") != mine:
        made_for = meta["record"].get("model") or "another network"
        raise ValueError(
            f"exit heads {str(path)!r} were trained for network weights {meta.get('network_fingerprint')} "
            f"({made_for}), not for this {type(network).__name__} with weights {mine}; train heads for it with "
            "`hasten accelerate train-exits`"
        )
    heads = ExitHeads(**meta["layout"])
    heads.load_state_dict(tensors)
    return heads.to(next(network.parameters()).dtype).eval().requires_grad_(False)


# -- the accelerator ------------------------------------------------------------------------------------


class _Exit(Exception):  # control flow: carries an exit head's output out of the blocks
    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


@TECHNIQUES.register("early_exit")
class EarlyExit(Accelerator):
    """Installed early exit: estimators after blocks ``0 .. N-2``; a confident one ends the call.

    ``stats.reused`` counts the calls that exited; ``nfe_saved`` is FLOP-weighted: an exit saves the skipped
    blocks and the final layer, and every call pays for the estimators it evaluated and the head it used.

    Reference: Tang et al., DeeDiff (2023), Sec. 3.3 (uncertainty-based exit).
    """

    config_type = EarlyExitConfig
    config: EarlyExitConfig

    def _install(self) -> None:
        self.layout = DiTLayout.of(self.module)
        self.heads = load_exit_heads(self.config.heads, self.module)
        if self.heads.num_exits != len(self.layout.blocks) - 1:
            raise ValueError(f"exit heads {self.config.heads!r} have {self.heads.num_exits} exits for a network of "
                             f"{len(self.layout.blocks)} blocks")  # fmt: skip
        device = next(self.module.parameters()).device
        self.heads.to(device)
        self.names = [f"transformer_blocks.{i}" for i in range(len(self.layout.blocks))]
        for i, block in enumerate(self.layout.blocks):
            self._patch(block, self.names[i], self._block_forward(i))
        for name in FINAL_LAYER:  # patched only to measure their FLOP share (an exit skips them)
            self._patch(getattr(self.module, name), name, _passthrough)
        self._exited: int | None = None
        self._estimated: int = 0
        self._conditioning: Tensor | None = None
        self._captured: list[tuple[Tensor, Tensor]] = []
        self.exits: dict[int, int] = {}  # exit block -> calls (since install or reset)

    def reset(self, *, num_steps: int | None = None) -> None:
        super().reset(num_steps=num_steps)
        self.exits = {}

    def _begin_call(self, call: CallState) -> None:
        call.full = True  # nothing is cached: every call may exit, decided by the estimators inside it

    def _root_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._call is not None:
            return original(*args, **kwargs)
        self._exited, self._estimated, self._conditioning = None, 0, None
        before = self._stats.nfe_saved
        x = args[0] if args else kwargs.get("hidden_states")
        out = super()._root_forward(functools.partial(self._exiting, original), *args, **kwargs)
        shares = self._flops.get(tuple(x.shape[1:]), {}) if isinstance(x, Tensor) else {}
        if self._exited is None and self._estimated:  # a full call that paid for its estimators
            self._stats.nfe_saved = before - sum(shares.get(f"exit.uem.{j}", 0.0) for j in range(self._estimated))
        self._conditioning = None
        return out

    def _exiting(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except _Exit as done:
            if not kwargs.get("return_dict", True):
                return (done.output,)
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=done.output)

    def _skipped_share(self, call: CallState, shares: dict[str, float]) -> float:
        i = self._exited
        if i is None:
            return 0.0
        saved = sum(shares.get(name, 0.0) for name in (*self.names[i + 1 :], *FINAL_LAYER))
        cost = sum(shares.get(f"exit.uem.{j}", 0.0) for j in range(i + 1)) + shares.get(f"exit.head.{i}", 0.0)
        return saved - cost

    def _block_forward(self, i: int) -> Callable[..., Any]:
        last = i == len(self.layout.blocks) - 1

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            call = self._call
            if call is None or last:
                return out
            if self._flop_mode is not None:  # the FLOP-counting call runs in full; its estimators are counted after
                self._captured.append((out, kwargs))
                return out
            threshold = self.config.threshold_at(call.step, call.num_steps)
            if threshold <= 0.0:
                return out
            cond = self._condition(kwargs, out)
            with torch.no_grad():
                u = float(self.heads.uncertainty(i, out, cond).mean())
            self._estimated = i + 1
            if u < threshold:
                with torch.no_grad():
                    result = self.heads.output(i, out, cond)
                self._exited = i
                self.exits[i] = self.exits.get(i, 0) + 1
                call.skipped.update(self.names[i + 1 :])
                raise _Exit(result)
            return out

        return forward

    def _condition(self, kwargs: dict[str, Any], hidden: Tensor) -> Tensor:
        if self._conditioning is None:
            with torch.no_grad():
                self._conditioning = DiTLayout.conditioning(
                    self.module, kwargs.get("timestep"), kwargs.get("class_labels"), hidden.dtype
                )
        return self._conditioning

    def _flops_counted(self, shape: tuple[int, ...], total: float) -> None:
        """After the FLOP-counting call: each estimator's and head's cost as a share of the same total, counted
        on the hidden states that call produced."""
        captured, self._captured = self._captured, []
        shares = self._flops[shape]
        with torch.no_grad():
            for i, (hidden, kwargs) in enumerate(captured):
                cond = self._condition(kwargs, hidden)
                for kind, fn in (("uem", self.heads.uncertainty), ("head", self.heads.output)):
                    with FlopCounterMode(display=False) as mode:
                        fn(i, hidden, cond)
                    shares[f"exit.{kind}.{i}"] = mode.get_total_flops() / total if total else 0.0


def _passthrough(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return original(*args, **kwargs)


# -- training -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExitTrainConfig(RunConfig):
    """Settings of one exit-head training run (all but the time budget must match to resume)."""

    type_tag: ClassVar[str] = "exit_heads_training"
    model: str = ""
    network_fingerprint: str = ""
    minutes: float = 15.0
    batch_size: int = 128
    lr: float = 1e-3
    label_dropout: float = 0.1
    checkpoint_minutes: float = 2.0
    seed: int = 0


def checkpoint_folder(out: str | os.PathLike) -> pathlib.Path:
    """Where a heads training run keeps its checkpoint: ``<out>.train/`` beside the heads file."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".train")


def forward_with_blocks(network: nn.Module, x: Tensor, timestep: Tensor, class_labels: Tensor | None):
    """The full network's output, every block's output tokens and the final layer's conditioning, in one
    forward (gradients flow where autograd is on: the joint fine-tune trains through them)."""
    lay = DiTLayout.of(network)
    hidden: list[Tensor] = []

    def keep(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        hidden.append(out)
        return out

    handles = [add_hook(block, "hasten.exit_capture", keep) for block in lay.blocks]
    try:
        cond = {} if class_labels is None else {"class_labels": class_labels}
        output = network(x, timestep, **cond).sample
        conditioning = DiTLayout.conditioning(network, timestep, class_labels, hidden[0].dtype)
    finally:
        remove_hooks(handles)
    return output, hidden, conditioning


def capture_blocks(network: nn.Module, x: Tensor, timestep: Tensor, class_labels: Tensor | None):
    """:func:`forward_with_blocks` without gradients (the frozen network's targets and hidden tokens)."""
    with torch.no_grad():
        return forward_with_blocks(network, x, timestep, class_labels)


def _schedule_at(model: Any, x0: Tensor, fraction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The time ``fraction`` [B] of the way through ``model``'s schedule, and its ``alpha`` and ``sigma`` shaped to
    broadcast against ``x0``."""
    schedule = model.schedule
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * fraction
    view = (-1, *([1] * (x0.ndim - 1)))
    return t, schedule.alpha(t).to(x0.device).view(view), schedule.sigma(t).to(x0.device).view(view)


def network_input(model: Any, x0: Tensor, fraction: Tensor, noise: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x0`` noised at ``fraction`` [B] of the way through ``model``'s schedule (0: its cleanest time, 1: pure
    noise), as the network itself takes it: its own ``x_t`` and its own time input. Exit heads live in the
    network's output space, so they are trained on the network's inputs rather than the denoiser's."""
    t, alpha, sigma = _schedule_at(model, x0, fraction)
    x_t = (alpha * x0 + sigma * noise).to(dtype)
    return x_t, model.denoiser.model_time(model.schedule.ve_sigma(t).to(x0.device)).to(dtype)


def network_target(model: Any, x0: Tensor, fraction: Tensor, noise: Tensor) -> Tensor:
    """What ``model``'s network was trained to output at :func:`network_input`'s ``x_t`` (same ``x0``, ``fraction``
    and ``noise``): the data's own target in the network's output space (:func:`hasten.train.objective_target`)."""
    _, alpha, sigma = _schedule_at(model, x0, fraction)
    return objective_target(model.info.objective, x0.double(), noise.double(), alpha, sigma).to(x0.dtype)


def train_exit_heads(
    model: Any,
    out: str | os.PathLike,
    *,
    minutes: float = 15.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    seed: int = 0,
    max_steps: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train exit heads for a loaded model's DiT (backbone frozen) and write them to ``out``; resumable.

    A rerun with the same ``out`` continues from ``<out>.train/``'s checkpoint (``minutes`` is the total across
    resumes); the heads file is written at the end and the checkpoint folder removed.

    Args:
        model: A loaded hasten model (``hasten.load``) whose network is a DiT and whose data hasten has.
        out: The heads file to write (``.safetensors``); refused if it exists unless ``force`` (which then also
            discards the checkpoint of the run that wrote it).
        minutes: Training time in all; max_steps: optional step limit as well.
        batch_size, lr: AdamW on the heads; label_dropout: share of labels replaced by the null class (so the
            heads also serve the unconditional branch of classifier-free guidance).

    Returns:
        The training record that is also stored in the file's metadata.

    Reference: DeeDiff (Tang et al., 2023) Eq. 8 with a frozen backbone, plus an unweighted layer loss.
    """
    from ..data import load_dataset, to_model_space
    from ..train import TrainingLoop

    out = pathlib.Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{str(out)!r} already exists; choose another output or pass force=True")
    checks = (
        ("minutes", minutes, minutes > 0, "> 0"), ("batch_size", batch_size, batch_size >= 1, ">= 1"),
        ("lr", lr, lr > 0, "> 0"), ("label_dropout", label_dropout, 0 <= label_dropout < 1, "in [0, 1)"),
    )  # fmt: skip
    for option, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{option} must be {allowed}, got {value!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (or None: the time budget alone), got {max_steps}")
    network = model.network.eval().requires_grad_(False)
    device = next(network.parameters()).device
    fingerprint = network_fingerprint(network)
    config = ExitTrainConfig(model=model.info.name, network_fingerprint=fingerprint, minutes=minutes,
                             batch_size=batch_size, lr=lr, label_dropout=label_dropout, seed=seed)  # fmt: skip
    folder = checkpoint_folder(out)
    if force and out.exists():  # starting over: an earlier run's checkpoint is not resumed
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(model.info.data)
    images = to_model_space(dataset.images).to(device)
    labels = dataset.labels.to(device) if dataset.labels is not None else None
    null_class = model.info.null_class
    torch.manual_seed(seed)
    heads = ExitHeads.from_network(network).to(device).train()
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    loop = TrainingLoop(
        folder, config, {"heads": heads}, {"opt": opt}, gen, budget_seconds=minutes * 60.0,
        checkpoint_minutes=config.checkpoint_minutes, label="exit heads", progress=progress,
    )  # fmt: skip
    loop.resume(device)
    dtype = next(network.parameters()).dtype

    def step(index: int) -> float:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen, device=device)
        x0 = images[idx]
        y = None
        if labels is not None:
            y = labels[idx].clone()
            if null_class is not None:
                y[torch.rand(batch_size, generator=gen, device=device) < label_dropout] = null_class
        # a uniform time on the model's own schedule: the heads learn every noise level the sampler visits
        u = torch.rand(batch_size, generator=gen, device=device, dtype=torch.float64)
        x_t, timestep = network_input(model, x0, u, torch.randn(x0.shape, generator=gen, device=device), dtype)
        target, hidden, cond = capture_blocks(network, x_t, timestep, y)
        loss = exit_loss(heads, hidden, cond, target)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    loop.run(step, batch_size=batch_size, max_steps=max_steps)
    record = {"model": model.info.name, "model_fingerprint": model.fingerprint} | loop.record(heads, device)
    save_exit_heads(heads, out, network, record)
    shutil.rmtree(folder, ignore_errors=True)
    return record
