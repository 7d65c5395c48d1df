"""RAS, region-adaptive sampling for DiTs: each step recompute only the tokens in the model's focus.

On a RAS step the transformer runs on a subset of ``ratio * T`` tokens per image. Their queries attend to
every token: fresh keys/values for the active tokens, and for the others the keys/values from the last
step that computed them (kept per block). The network output of an inactive token is its output from
the last step that computed it. Tokens are ranked per image by how much the network's output varies
inside them (``std`` over the token's output values, or their ``l2`` norm), boosted by
``exp(starvation * steps_since_computed)`` so no region is starved. Full ("error reset") steps follow the
refresh schedule: every ``interval`` steps, and always before ``start`` / from ``stop`` on.

Unlike the reference code, the selection is per image, so a batch of any size (and classifier-free
guidance's doubled batch) works and each image's result does not depend on the others in its batch.

Works on diffusers patch transformers with a ``pos_embed`` token embedding, ``transformer_blocks`` whose
``attn1`` is self-attention, and a per-token output projection (``proj_out_2`` as in
``DiTTransformer2DModel``, or ``proj_out`` as in ``PixArtTransformer2DModel``).

Reference: Liu et al., "Region-Adaptive Sampling for Diffusion Transformers", 2025 (microsoft/RAS),
Sec. 3 (token selection by output deviation, starvation scaling, cached K/V of dropped tokens, dense
error-reset steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_choice
from .hooks import TECHNIQUES, Accelerator, CallState, RefreshSchedule

METRICS = ("std", "l2")


@dataclasses.dataclass(frozen=True)
class RASConfig(RefreshSchedule):
    """RAS settings. Steps on the refresh schedule compute every token; the others ``ratio`` of them.

    Args:
        ratio: Share of tokens recomputed on a RAS step, in (0, 1]; 1 never reuses (bitwise uncached).
        metric: Token ranking, ``"std"`` or ``"l2"`` of the token's network output.
        starvation: Growth rate of a cached token's priority per step it has not been computed.
        interval, schedule, start, stop: Full ("error reset") steps, see :class:`RefreshSchedule`.
            Defaults follow the paper's SD3 setting scaled to fractions: 4 of 28 warm-up steps, resets
            every ~10 steps.
    """

    technique: ClassVar[str] = "ras"
    type_tag: ClassVar[str] = "ras"
    interval: int = 10
    start: float = 0.15
    ratio: float = 0.5
    metric: str = "std"
    starvation: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ratio, int | float) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1] (a share of the tokens), got {self.ratio!r}")
        check_choice("metric", self.metric, METRICS)
        if not isinstance(self.starvation, int | float) or not 0.0 <= self.starvation <= 10.0:
            raise ValueError(f"starvation must be in [0, 10], got {self.starvation!r}")


def _ras_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str, nn.Module]:
    blocks = getattr(model, "transformer_blocks", None)
    out_name = next((n for n in ("proj_out_2", "proj_out") if isinstance(getattr(model, n, None), nn.Linear)), None)
    embed = getattr(model, "pos_embed", None)
    if not isinstance(blocks, nn.ModuleList) or embed is None or out_name is None:
        raise TypeError(
            f"RAS needs a patch transformer with pos_embed, transformer_blocks and a per-token proj_out_2 or "
            f"proj_out Linear; {type(model).__name__} lacks some (UNets: use DeepCacheConfig)"
        )
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn1", None)
        if attn is None or not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
            raise TypeError(f"RAS needs diffusers self-attention at transformer_blocks.{i}.attn1")
        unsupported = [a for a in ("spatial_norm", "group_norm") if getattr(attn, a, None) is not None]
        if unsupported or getattr(attn, "is_cross_attention", False):
            raise TypeError(f"transformer_blocks.{i}.attn1 uses {unsupported or 'cross-attention'}; RAS does not")
    return embed, blocks, out_name, getattr(model, out_name)


@TECHNIQUES.register("ras")
class RAS(Accelerator):
    """Installed RAS: token subsets through the blocks, cached keys/values and outputs for the rest.

    Reference: Liu et al., "Region-Adaptive Sampling for Diffusion Transformers", 2025, Sec. 3.
    """

    config_type = RASConfig
    config: RASConfig

    def _install(self) -> None:
        embed, blocks, out_name, out_proj = _ras_parts(self.module)
        self.block_names = [f"transformer_blocks.{i}" for i in range(len(blocks))]
        self._patch(embed, "pos_embed", self._embed_forward)
        for i, block in enumerate(blocks):
            attn = block.attn1
            self._patch(block, self.block_names[i], _passthrough)  # measured: the blocks' FLOP share
            self._patch(attn.to_k, f"{self.block_names[i]}.attn1.to_k", self._capture(i, "k"))
            self._patch(attn.to_v, f"{self.block_names[i]}.attn1.to_v", self._capture(i, "v"))
            self._patch(attn, f"{self.block_names[i]}.attn1", self._attention_forward(i, attn))
        self._patch(out_proj, out_name, self._output_forward)

    def _begin_call(self, call: CallState) -> None:
        call.full = self.config.ratio >= 1.0 or self.config.is_refresh(call.step, call.num_steps)

    def _skipped_share(self, call: CallState, shares: dict[str, float]) -> float:
        blocks = sum(shares.get(name, 0.0) for name in self.block_names)
        return blocks * (1.0 - call.slot["active"].shape[1] / call.slot["tokens"])

    # -- patched forwards -------------------------------------------------------------------------------

    def _embed_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        h = original(*args, **kwargs)
        call = self._call
        if call is None:
            return h
        slot = call.slot
        slot["tokens"] = h.shape[1]
        if call.full:
            slot.pop("active", None)
            return h
        k = max(1, round(self.config.ratio * h.shape[1]))
        priority = slot["score"] * torch.exp(self.config.starvation * slot["stale"])
        active = priority.topk(k, dim=1).indices.sort(dim=1).values  # [B, k], per image
        slot["active"] = active
        call.skipped.update(self.block_names)
        return h.gather(1, active[..., None].expand(-1, -1, h.shape[2]))

    def _capture(self, block: int, which: str) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            call = self._call
            if call is not None and call.full and self.config.ratio < 1.0:
                call.slot[f"{which}{block}"] = out  # every token's key/value from this full step
            return out

        return forward

    def _attention_forward(self, block: int, attn: nn.Module) -> Callable[..., Any]:
        def forward(original: Callable[..., Any], hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None or call.full:
                return original(hidden_states, *args, **kwargs)
            slot = call.slot
            active = slot["active"]
            q = attn.to_q(hidden_states)
            k_new, v_new = attn.to_k(hidden_states), attn.to_v(hidden_states)  # not stored: not a full call
            index = active[..., None].expand(-1, -1, k_new.shape[2])
            keys = slot[f"k{block}"].scatter(1, index, k_new)  # fresh for active tokens, cached for the rest
            values = slot[f"v{block}"].scatter(1, index, v_new)
            slot[f"k{block}"], slot[f"v{block}"] = keys, values
            batch, heads = q.shape[0], attn.heads
            head_dim = keys.shape[2] // heads
            q = q.view(batch, -1, heads, head_dim).transpose(1, 2)
            keys = keys.view(batch, -1, heads, head_dim).transpose(1, 2)
            values = values.view(batch, -1, heads, head_dim).transpose(1, 2)
            if getattr(attn, "norm_q", None) is not None:
                q = attn.norm_q(q)
            if getattr(attn, "norm_k", None) is not None:
                keys = attn.norm_k(keys)
            out = F.scaled_dot_product_attention(q, keys, values)
            out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "residual_connection", False):
                out = out + hidden_states
            return out / getattr(attn, "rescale_output_factor", 1.0)

        return forward

    def _output_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        call = self._call
        if call is None or self.config.ratio >= 1.0:
            return out
        slot = call.slot
        active = slot.get("active")
        if active is None:
            full = out
            slot["stale"] = torch.zeros(out.shape[:2], device=out.device, dtype=out.dtype)
        else:  # put the active tokens' new outputs among the cached ones
            full = slot["out"].scatter(1, active[..., None].expand(-1, -1, out.shape[2]), out)
            slot["stale"] = (slot["stale"] + 1).scatter(1, active, 0.0)
        slot["out"] = full
        slot["score"] = full.std(dim=2) if self.config.metric == "std" else full.norm(dim=2)
        return full


def _passthrough(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return original(*args, **kwargs)
