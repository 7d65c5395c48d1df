"""hasten's own small models: architectures, the on-disk format and ``hasten.load``.

A model folder is a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, so
``UNet2DModel.from_pretrained(folder)`` loads it too) plus ``hasten.json`` (what the network predicts, its
schedule, classes, image shape, training record) and ``MODEL_CARD.md``. Bundled models live in
``hasten/models/weights/<name>/``.

A folder in another format says so with a record in ``hasten.json`` (``quantization`` for the integer
folders ``hasten quantize`` writes); the module that writes the format registers how to open it in
:data:`FOLDER_FORMATS`, so this loader imports none of them. ``hasten/__init__`` imports every built-in
registrant (:mod:`hasten.quant.storage` among them), and Python runs it before any ``hasten.*`` module, so
``from hasten.models.zoo import load`` alone opens every built-in format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..registry import Registry
from ..schedules.noise import FlowMatching, NoiseSchedule, VPDiscrete
from .adapters import EpsDenoiser, FlowDenoiser, NetworkDenoiser, VDenoiser, X0Denoiser

__all__ = [
    "BUNDLED",
    "FOLDER_FORMATS",
    "FolderFormat",
    "LoadedModel",
    "ModelInfo",
    "build_network",
    "bundled_models",
    "load",
    "make_denoiser",
    "save_model",
]

BUNDLED = pathlib.Path(__file__).parent / "weights"
FORMAT_VERSION = 1
DIFFUSERS_FORMAT = "diffusers"
FORMAT_RECORDS = (
    "quantization",
    "target_level",
    "ensemble",
)  # fields of hasten.json whose presence means another format


@dataclasses.dataclass(frozen=True)
class FolderFormat:
    """How to open the network of a model folder in one format.

    Args:
        weights_file: The file holding the weights (what the fingerprint hashes, what ``bytes_on_disk`` counts).
        load_network: ``(network_class, folder) -> nn.Module``: the network with its weights, on the CPU.
        load_model: Instead of ``load_network``, for a folder that is more than one network (an ensemble of
            other models): ``(folder, info, device=, dtype=) -> LoadedModel``, the whole model.
    """

    weights_file: str
    load_network: Callable[[Any, pathlib.Path], nn.Module] | None = None
    load_model: Callable[..., LoadedModel] | None = None

    def __post_init__(self) -> None:
        if (self.load_network is None) == (self.load_model is None):
            raise TypeError("a FolderFormat takes exactly one of load_network and load_model")


FOLDER_FORMATS: Registry[FolderFormat] = Registry("model folder format")
"""Keyed by the ``hasten.json`` record that declares the format; ``"diffusers"`` (no record) is this module's."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ``hasten.json`` records about a model folder."""

    name: str
    arch: str  # "unet" | "dit"
    objective: str  # "eps" | "v" | "x0" | "flow"
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # 0: unconditional; else labels 0..num_classes-1 and null_class = num_classes
    data: str
    time_scale: float = 1.0
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)  # set by `hasten quantize`
    # The model's own sampler (a few-step student's: solver, options, schedule, steps, guidance), used when a
    # caller names no sampler setting; empty: the library's defaults. Set by `hasten distill`.
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)
    distillation: dict[str, Any] = dataclasses.field(default_factory=dict)  # method, teacher, cost (distill)
    # A consistency model's boundary, {"sigma_min": s}: the denoiser returns the consistency function of the
    # network's data prediction, exactly x at level s (adapters.consistency_boundary). Set by
    # `hasten distill --method consistency`; empty: a plain denoiser.
    consistency: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A two-time network's target-level embedding (a CTM student, hasten.distill.ctm): its folder format
    target_level: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What structured pruning removed (hasten.prune): the shapes and widths the network differs from its config
    # in (models/structure.py; every folder format's loader applies it), importance, speed-up, MACs, parameters.
    pruning: dict[str, Any] = dataclasses.field(default_factory=dict)
    # An ensemble of other models (hasten.ensemble): method, members with their fingerprints, fused blocks
    ensemble: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def folder_format(self) -> str:
        """The folder's format, a key of :data:`FOLDER_FORMATS`: the record of :data:`FORMAT_RECORDS` that
        ``hasten.json`` carries, or ``"diffusers"``."""
        declared = [name for name in FORMAT_RECORDS if getattr(self, name)]
        if len(declared) > 1:
            raise ValueError(f"model {self.name!r} declares more than one folder format: {declared}")
        return declared[0] if declared else DIFFUSERS_FORMAT

    @property
    def learned_guidance(self) -> float:
        """The classifier-free guidance scale a distilled student learned from its teacher (1: none)."""
        record = self.distillation or {}
        return float(record.get("guidance", (record.get("config") or {}).get("guidance", 1.0)))

    @property
    def weights_file(self) -> str:
        """The weights file of the folder: diffusers' for float models, the format's own otherwise."""
        return get_folder_format(self.folder_format).weights_file

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.num_classes else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_shape"] = list(self.image_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["image_shape"] = tuple(data["image_shape"])
        return cls(**data)

    def schedule(self) -> NoiseSchedule:
        """The noise schedule the network was trained with."""
        if self.objective == "flow":
            return FlowMatching()
        return VPDiscrete.from_betas("linear", 1000)


_PRESETS: dict[str, dict[str, Any]] = {
    # 28x28 -> 14 -> 7, self-attention at 7x7; about 1.1M parameters.
    "unet": dict(
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    # 4x4 patches (49 tokens for 28x28), 6 blocks of width 128; about 2.1M parameters.
    "dit": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, patch_size=4),
}


def build_network(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh diffusers network of hasten's preset size for ``arch`` ("unet" or "dit")."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"square images only, got {height}x{width}")
    if arch == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel(
            sample_size=height,
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=(num_classes + 1) if num_classes else None,  # + the null class for CFG
            **_PRESETS["unet"],
        )
    if arch == "dit":
        from diffusers import DiTTransformer2DModel

        if not num_classes:
            raise ValueError("the DiT preset is class-conditional; num_classes must be > 0")
        net = DiTTransformer2DModel(
            in_channels=channels,
            out_channels=channels,
            sample_size=height,
            num_embeds_ada_norm=num_classes,
            **_PRESETS["dit"],
        )
        return without_label_dropout(net)
    raise ValueError(f"unknown architecture {arch!r}; allowed: 'unet', 'dit'")


def without_label_dropout(net: nn.Module) -> nn.Module:
    """Turn off diffusers' own label dropout (DiT's ``LabelEmbedding`` drops labels inside every block, with
    torch's global generator, whenever the network is in training mode). hasten drops labels once per image
    with its run's generator (the null class is index ``num_classes``, which DiT's table already has); a loaded
    network has it off too, so a copy trained further (``hasten distill``) is not noised behind its back."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return net


def _network_class(arch: str):
    import diffusers

    return {"unet": diffusers.UNet2DModel, "dit": diffusers.DiTTransformer2DModel}[arch]


def _load_diffusers_network(network_class: Any, folder: pathlib.Path) -> nn.Module:
    from .structure import build_pruned, pruning_record

    pruning = pruning_record(folder)
    if not pruning:
        return network_class.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    from safetensors.torch import load_file

    network = build_pruned(network_class, folder, pruning)  # narrower than its config: resized, then filled
    network.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))  # strict: all of it
    return network


FOLDER_FORMATS.add(DIFFUSERS_FORMAT, FolderFormat("diffusion_pytorch_model.safetensors", _load_diffusers_network))


def get_folder_format(name: str, folder: pathlib.Path | None = None) -> FolderFormat:
    """The registered format ``name``; an unregistered one is refused naming the folder and what is registered."""
    if name in FOLDER_FORMATS:
        return FOLDER_FORMATS.get(name)
    where = f"{folder / 'hasten.json'} declares" if folder is not None else "the model declares"
    raise ValueError(
        f"{where} a {name!r} record, but no loader for that folder format is registered (registered: "
        f"{', '.join(FOLDER_FORMATS.names())}); the module that writes such folders registers it on import"
    )


def weights_fingerprint(folder: pathlib.Path, weights_file: str = "diffusion_pytorch_model.safetensors") -> str:
    """sha256 of the weights file: identifies a model for caches and plans."""
    digest = hashlib.sha256()
    with open(folder / weights_file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """The weights fingerprint of a model folder (what ``load(folder).fingerprint`` is), without loading it."""
    folder = pathlib.Path(folder)
    info = ModelInfo.from_dict(json.loads((folder / "hasten.json").read_text()))
    return weights_fingerprint(folder, info.weights_file)


@dataclasses.dataclass
class LoadedModel:
    """A ready denoiser with everything needed to sample from it."""

    denoiser: NetworkDenoiser
    network: nn.Module
    info: ModelInfo
    folder: pathlib.Path
    fingerprint: str

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def bytes_on_disk(self) -> int:
        return (self.folder / self.info.weights_file).stat().st_size

    # What sampling needs from a model beyond its denoiser; pipeline models (hasten.from_pipeline) override.
    default_guidance = 1.0  # the guidance scale when the caller gives none

    @property
    def default_sampler(self) -> dict[str, Any]:
        """The sampler the model declares for callers that name none (a distilled student's), or ``{}``."""
        return dict(self.info.sampler)

    # what the model's sampler does to the (guided) x0 estimate before each update, or None: a diffusers
    # pipeline's scheduler clipping or thresholding (``clip_sample``, ``thresholding``) is part of its model
    x0_processing = None
    condition_key = ""  # identifies conditioning fixed at load time (prompts), for caches of samples

    def conditioning(self, labels: torch.Tensor | None, rows: range) -> dict[str, torch.Tensor]:
        """The denoiser's keyword inputs for samples ``rows`` of a run (``labels`` their class labels)."""
        return {} if labels is None else {"class_labels": labels}

    def unconditional(self) -> dict[str, torch.Tensor] | None:
        """The unconditional inputs classifier-free guidance contrasts with; None if the model has none."""
        return None if self.info.null_class is None else {"class_labels": torch.tensor([self.info.null_class])}

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in model space -> images in [0, 1] (pixel models: a rescale; latent models: the decoder)."""
        from ..data import from_model_space

        return from_model_space(x)

    @property
    def device(self) -> torch.device:
        """Where the network's parameters (or buffers) live; the CPU for a network with neither."""
        tensor = next(itertools.chain(self.network.parameters(), self.network.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the images :meth:`to_images` returns and :meth:`from_images` takes."""
        return tuple(self.info.image_shape)

    def from_images(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space, the inverse of :meth:`to_images` (latent models: the encoder's mean)."""
        return images01 * 2.0 - 1.0


def bundled_models() -> list[str]:
    """Names of the models shipped with hasten."""
    return sorted(p.name for p in BUNDLED.glob("*") if (p / "hasten.json").exists())


def model_folder(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The folder ``load`` reads: ``name_or_path`` itself when it holds a hasten.json, else the bundled model of that
    name (which may not exist)."""
    folder = pathlib.Path(name_or_path)
    return folder if (folder / "hasten.json").exists() else BUNDLED / str(name_or_path)


def load(
    name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a bundled model by name (``"mnist-unet"``, ``"mnist-dit"``) or a hasten model folder.

    Returns:
        :class:`LoadedModel` with ``.denoiser`` (VE-form, ready for :func:`hasten.sample`) and ``.info``.
    """
    folder = model_folder(name_or_path)
    if not (folder / "hasten.json").exists():
        raise FileNotFoundError(
            f"no hasten model {str(name_or_path)!r}; bundled models: {', '.join(bundled_models()) or '(none)'}, "
            "or pass a folder containing hasten.json"
        )
    try:
        info = ModelInfo.from_dict(json.loads((folder / "hasten.json").read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'hasten.json'} is not valid JSON ({err}); the model folder is damaged") from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / 'hasten.json'} is not a hasten model description: {err}") from None
    if info.format_version > FORMAT_VERSION:
        raise ValueError(f"{folder} was written by a newer hasten (format {info.format_version})")
    from safetensors import SafetensorError

    folder_format = get_folder_format(info.folder_format, folder)
    if folder_format.load_model is not None:
        return folder_format.load_model(folder, info, device=device, dtype=dtype)
    assert folder_format.load_network is not None
    try:
        network = folder_format.load_network(_network_class(info.arch), folder)
    except (OSError, RuntimeError, SafetensorError) as err:  # a missing, truncated or damaged weights file
        raise ValueError(
            f"cannot read the weights in {folder / folder_format.weights_file}: {str(err).splitlines()[0]} (a "
            "damaged or partly copied file?)"
        ) from None
    network = (network.to(device) if dtype is None else network.to(device=device, dtype=dtype)).eval()
    network.requires_grad_(False)
    without_label_dropout(network)
    try:
        denoiser = make_denoiser(network, info)
    except ValueError as err:
        raise ValueError(f"{err} (in {folder / 'hasten.json'})") from None
    return LoadedModel(denoiser, network, info, folder, weights_fingerprint(folder, info.weights_file))


OBJECTIVES = ("eps", "v", "x0", "flow")


def make_denoiser(network: nn.Module, info: ModelInfo) -> NetworkDenoiser:
    """The VE denoiser of ``network`` for what ``info`` says it predicts (its objective and schedule)."""
    schedule = info.schedule()
    denoiser: NetworkDenoiser
    if info.objective == "eps":
        denoiser = EpsDenoiser(network, schedule)
    elif info.objective == "v":
        denoiser = VDenoiser(network, schedule)
    elif info.objective == "x0":
        denoiser = X0Denoiser(network, schedule)
    elif info.objective == "flow":
        denoiser = FlowDenoiser(network, schedule, time_scale=info.time_scale)  # type: ignore[arg-type]
    elif info.objective == "mdlm":
        raise ValueError(
            f"{info.name} is a masked (discrete) diffusion model: load it with hasten.discrete.load_masked (the "
            "CLI's sample and bench take it by name)"
        )
    else:
        raise ValueError(f"unknown objective {info.objective!r}; known: {', '.join(OBJECTIVES)}")
    if info.consistency:
        denoiser.consistency_sigma_min = _consistency_sigma_min(info.consistency)
    return denoiser


def _consistency_sigma_min(record: dict[str, Any]) -> float:
    """The boundary level of a ``consistency`` record, checked (a finite number >= 0, no other keys)."""
    if set(record) != {"sigma_min"}:
        raise ValueError(f"the consistency record must hold exactly 'sigma_min', got keys {sorted(record)}")
    value = record["sigma_min"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ValueError(f"consistency sigma_min must be a finite number >= 0, got {value!r}")
    return float(value)


def save_model(network: nn.Module, info: ModelInfo, folder: str | os.PathLike) -> pathlib.Path:
    """Write the model files (diffusers format + hasten.json) into ``folder``, each file atomically; hasten.json
    last, so a folder that has it is complete (what a resumable run checks to tell a finished folder)."""
    import shutil

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        network.save_pretrained(tmp, safe_serialization=True)
        (tmp / "hasten.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "hasten.json"):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
