"""A loaded masked diffusion model and the one sampling entry point of the discrete path.

:func:`load_masked` takes a bundled name (``"mnist-mdm"``) or a folder; :class:`MaskedDiffusionModel` turns the
network into the ``model(x, rows) -> logits`` callable the samplers take, for given class labels and guidance,
and converts between tokens and images. :func:`generate_masked` samples ``n`` sequences batch by batch with
per-sequence randomness (:class:`~hasten.discrete.sampling.RowGenerators`, seeded from the sample index as
:mod:`hasten.seeds` seeds continuous noise), times the sampling alone and counts network calls per sequence.

Classifier-free guidance of a masked model mixes log-probabilities: ``log p_g = g log p(.|x, y) + (1 - g)
log p(.|x, null)``, renormalised (``g = 1``: the conditional model; the model trains with the null class).
Reference: Nisonoff et al., "Unlocking Guidance for Discrete State-Space Diffusion and Flow Models", 2024 (the
rate form); Schiff et al., "Simple Guidance Mechanisms for Discrete Diffusion Models", 2024 (the logit form used
here for a time-agnostic SUBS network).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import torch
from torch import Tensor

from ..seeds import row_seed
from .model import OBJECTIVE, MaskedUNet
from .sampling import DiscreteSampler, RowGenerators, get_discrete_sampler

__all__ = ["MaskedDiffusionModel", "MaskedGeneration", "generate_masked", "is_masked_folder", "load_masked"]

DEFAULT_SAMPLER = "first_hitting"  # exact in law at one token per call (the reverse process's own law)


def _folder_of(name_or_path: str | os.PathLike) -> pathlib.Path:
    from ..models.zoo import BUNDLED

    folder = pathlib.Path(name_or_path)
    if not (folder / "hasten.json").is_file():
        folder = BUNDLED / str(name_or_path)
    return folder


def is_masked_folder(name_or_path: str | os.PathLike) -> bool:
    """Whether a bundled name or folder holds a masked diffusion model (hasten.json's objective is ``mdlm``)."""
    meta = _folder_of(name_or_path) / "hasten.json"
    try:
        return json.loads(meta.read_text()).get("objective") == OBJECTIVE
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


@dataclasses.dataclass
class MaskedDiffusionModel:
    """A masked diffusion network with what sampling it needs: vocabulary, sequence length, classes, fingerprint."""

    network: MaskedUNet
    info: Any  # hasten.models.zoo.ModelInfo
    folder: pathlib.Path
    fingerprint: str

    @property
    def vocab(self) -> int:
        return self.network.vocab

    @property
    def mask_id(self) -> int:
        return self.network.vocab  # MASK is the value after the vocabulary

    @property
    def length(self) -> int:
        return self.network.grid[0] * self.network.grid[1]

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def default_sampler(self) -> DiscreteSampler:
        """The model's own sampler (``hasten.json``'s ``sampler``: ``{"solver": name, "options": {...}}``, chosen
        from its measured FD-calls curve) or, without one, the exact first-hitting sampler (``L`` calls)."""
        own = self.info.sampler
        if not own:
            return get_discrete_sampler(DEFAULT_SAMPLER)
        try:
            return get_discrete_sampler(own["solver"], **own.get("options", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{self.folder / 'hasten.json'}: its sampler {own!r} is not a discrete sampler ({err})"
            ) from None

    def labels(self, n: int, label: int | None = None) -> Tensor | None:
        """``label`` for all ``n`` sequences, or the classes in turn (0, 1, ..., 0, ...); None if unconditional.
        ``label = num_classes`` is the null class the model trained with: its unconditional distribution."""
        k = self.info.num_classes
        if not k:
            if label is not None:
                raise ValueError(f"model {self.info.name!r} is unconditional; a label is not allowed")
            return None
        if label is None:
            return torch.arange(n) % k
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= k:
            raise ValueError(f"label must be an integer in 0..{k} for {self.info.name!r} ({k}: the null class, "
                             f"unconditional), got {label!r}")  # fmt: skip
        return torch.full((n,), label, dtype=torch.long)

    def model(self, labels: Tensor | None = None, guidance: float = 1.0):
        """The sampler's ``model(x, rows) -> logits [B, L, V]`` for sequences labelled ``labels`` (``[N]``)."""
        if not isinstance(guidance, int | float) or isinstance(guidance, bool) or not guidance >= 0:
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        null = self.info.num_classes  # the class trained as "no label" (label dropout)
        if guidance != 1.0 and (labels is None or bool((labels == null).any())):
            raise ValueError(f"guidance {guidance:g} needs class labels 0..{null - 1} (the null class {null} is "
                             "the unconditional model itself); use guidance 1")  # fmt: skip
        device = self.device

        @torch.no_grad()
        def evaluate(x: Tensor, rows: Tensor) -> Tensor:
            x = x.to(device)
            y = None if labels is None else labels[rows.cpu()].to(device)
            if guidance == 1.0:
                return self.network(x, y)
            both = self.network(torch.cat([x, x]), torch.cat([y, torch.full_like(y, null)]))
            cond, uncond = both.float().log_softmax(-1).chunk(2)
            return (guidance * cond + (1 - guidance) * uncond).log_softmax(-1)

        evaluate.labels = labels  # what a sampler's own conditional parts (an EDLM energy) are given
        return evaluate

    def to_images(self, tokens: Tensor) -> Tensor:
        """Tokens ``[N, L]`` (values ``0..V-1``) -> images ``[N, 1, H, W]`` in [0, 1] (value / (V - 1))."""
        if tokens.ndim != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"{self.info.name} makes sequences of {self.length} tokens, got {tuple(tokens.shape)}")
        if int(tokens.max()) >= self.vocab or int(tokens.min()) < 0:
            raise ValueError(f"tokens must be clean values in 0..{self.vocab - 1} (no MASK left)")
        return (tokens.float() / max(self.vocab - 1, 1)).reshape(-1, 1, *self.network.grid).cpu()

    def from_images(self, images01: Tensor, *, threshold: float | None = None) -> Tensor:
        """Images ``[N, 1, H, W]`` whose pixels are 0 or 1 -> tokens ``[N, L]``. Continuous images are refused
        unless ``threshold`` is given (pixels ``>= threshold`` become 1): binarising is a choice, not a default."""
        shape = (1, *self.network.grid)
        if images01.ndim != 4 or tuple(images01.shape[1:]) != shape:
            raise ValueError(f"{self.info.name} takes images [N, {', '.join(map(str, shape))}], "
                             f"got {tuple(images01.shape)}")  # fmt: skip
        if threshold is None:
            if not bool(((images01 == 0) | (images01 == 1)).all()):
                raise ValueError(
                    f"{self.info.name} is a discrete model of binary images; these have values other than 0 and 1 "
                    "(continuous images): binarise them first (threshold=0.5)"
                )
            return images01.flatten(1).long()
        return (images01 >= threshold).long().flatten(1)


def load_masked(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> MaskedDiffusionModel:
    """A bundled masked model by name (``"mnist-mdm"``) or a folder; other models are refused by name."""
    from diffusers import UNet2DModel

    from ..models.zoo import ModelInfo, bundled_models, weights_fingerprint

    folder = _folder_of(name_or_path)
    meta = folder / "hasten.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no hasten model {str(name_or_path)!r} (no hasten.json); bundled models: "
                                f"{', '.join(bundled_models())}")  # fmt: skip
    info = ModelInfo.from_dict(json.loads(meta.read_text()))
    if info.objective != OBJECTIVE:
        raise ValueError(f"{name_or_path} holds a {info.objective!r} (continuous) model, not a masked diffusion model "
                         f"({OBJECTIVE!r}): load it with hasten.load")  # fmt: skip
    unet = UNet2DModel.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
    vocab = int(info.training.get("vocab", 2))
    net = MaskedUNet(unet, vocab, tuple(info.image_shape[1:])).to(device).eval().requires_grad_(False)
    return MaskedDiffusionModel(net, info, folder, weights_fingerprint(folder, info.weights_file))


@dataclasses.dataclass
class MaskedGeneration:
    tokens: Tensor  # [N, L]
    images01: Tensor  # [N, 1, H, W] in {0, 1}
    labels: Tensor | None
    calls: Tensor  # [N] network evaluations of each sequence
    seconds: float  # sampling alone
    sampler: DiscreteSampler
    energy_calls: Tensor | None = None  # [N] energy evaluations of each sequence (an energy-corrected sampler's)

    @property
    def nfe(self) -> int:
        """The most network calls any sequence took."""
        return int(self.calls.max())

    @property
    def mean_calls(self) -> float:
        return float(self.calls.double().mean())


def row_generators(seed: int, indices: range) -> RowGenerators:
    """Sample ``j``'s generator of a run seeded ``seed``: from ``row_seed(seed, j, "discrete")``."""
    return RowGenerators([torch.Generator().manual_seed(row_seed(seed, j, "discrete")) for j in indices])


def generate_masked(
    model: MaskedDiffusionModel,
    n: int,
    sampler: str | DiscreteSampler | None = None,
    *,
    seed: int = 0,
    label: int | None = None,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    batch_size: int = 256,
    callback=None,
    **options: Any,
) -> MaskedGeneration:
    """``n`` samples of ``model`` by a discrete sampler (a registered name with ``options``, or a configured one;
    None: the model's own, :meth:`MaskedDiffusionModel.default_sampler`).

    Sample ``j`` depends only on ``(seed, j)`` and its label, not on the batch it shares. ``labels`` (``[n]``)
    overrides ``label``'s classes-in-turn default. ``callback(done, n)`` after each batch."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampler is None:
        if options:
            raise TypeError(f"sampler options {sorted(options)} need a sampler name")
        chosen = model.default_sampler().bind(model)
    else:
        chosen = get_discrete_sampler(sampler, **options).bind(model)
    chosen.check_length(model.length)
    if labels is None:
        labels = model.labels(n, label)
    elif label is not None:
        raise ValueError("give label or labels, not both")
    elif labels.shape != (n,) or not model.info.num_classes:
        raise ValueError(f"labels must be [n] = [{n}] class indices of a conditional model, got {tuple(labels.shape)}")
    elif int(labels.min()) < 0 or int(labels.max()) > model.info.num_classes:
        raise ValueError(f"labels must lie in 0..{model.info.num_classes} ({model.info.num_classes}: the null class)")
    tokens, calls, energy_calls = [], [], []
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        rows = range(first, min(n, first + batch_size))
        batch_labels = None if labels is None else labels[rows.start : rows.stop]
        x = torch.full((len(rows), model.length), model.mask_id, dtype=torch.long, device=model.device)
        out = chosen.run(model.model(batch_labels, guidance), x, model.mask_id, row_generators(seed, rows))
        tokens.append(out.tokens.cpu())
        calls.append(out.calls)
        if getattr(out, "energy_calls", None) is not None:
            energy_calls.append(out.energy_calls)
        if callback is not None:
            callback(rows.stop, n)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    all_tokens = torch.cat(tokens)
    energy = torch.cat(energy_calls) if energy_calls else None
    return MaskedGeneration(all_tokens, model.to_images(all_tokens), labels, torch.cat(calls), seconds, chosen, energy)
