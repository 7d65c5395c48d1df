"""torchao's data-free quantisation configs on the same network, in the same bench run.

torchao (the production peer) quantises weights with min-max ranges and, for the dynamic config, the
activations of each call from their own range at run time: no calibration data, no time-step awareness,
``nn.Linear`` layers only (convolutions stay in float). Each peer quantises a copy of the network once per
bench run; its size is that of its serialised state dict (torchao's tensors are not safetensors-ready).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
from typing import Any

import torch

__all__ = ["QUANT_PEERS", "QuantPeer", "quant_peer_model", "quant_peers_available"]


@dataclasses.dataclass(frozen=True)
class QuantPeer:
    config: str  # torchao.quantization class name
    description: str


QUANT_PEERS: dict[str, QuantPeer] = {
    "int8_weight_only": QuantPeer("Int8WeightOnlyConfig", "torchao int8 weight-only (Linear layers)"),
    "int8_dynamic": QuantPeer(
        "Int8DynamicActivationInt8WeightConfig", "torchao int8 dynamic activations x int8 weights (Linear layers)"
    ),
}


def quant_peers_available() -> list[str]:
    """The torchao peers this environment can run (none without torchao)."""
    return list(QUANT_PEERS) if importlib.util.find_spec("torchao") is not None else []


def quant_peer_model(model: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` (a LoadedModel) with torchao's ``name`` config applied, and what to report."""
    import torchao.quantization as tq

    if name not in QUANT_PEERS:
        raise ValueError(f"unknown torchao peer {name!r}; known: {', '.join(QUANT_PEERS)}")
    peer = QUANT_PEERS[name]
    denoiser = copy.deepcopy(model.denoiser)  # the copy's network is the one quantised
    network = denoiser.model
    tq.quantize_(network, getattr(tq, peer.config)())
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    quantized = dataclasses.replace(model, network=network, denoiser=denoiser)
    return quantized, {"bytes_on_disk": buffer.getbuffer().nbytes, "execution": peer.description}
