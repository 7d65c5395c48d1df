"""``hasten.from_pipeline``: a diffusers pipeline's denoiser as a hasten model.

    pipe = StableDiffusionPipeline.from_pretrained("./my-sd")          # or a folder path directly
    model = hasten.from_pipeline(pipe, prompt="a red bicycle", guidance=5.0)
    gen = hasten.generate(model, 4, solver="unipc", steps=8)           # images in gen.images01

The result is a :class:`PipelineModel`, the same kind of object ``hasten.load`` returns, so everything
that takes a model takes it: ``hasten.generate``, ``hasten bench --pipeline``, ``hasten.tune``, the
caches (``accelerate_``) and quantisation (``quantize_`` on ``model.network``). The prompts (or class
labels) are encoded once, here, by the pipeline's own ``encode_prompt``; sample ``i`` of a run uses
prompt ``i mod P``. Classifier-free guidance is hasten's :class:`~hasten.models.CFGDenoiser` against the
negative prompt the pipeline itself would use (SDXL's zeros for an empty negative prompt included).

Families (the pipeline's denoiser class): ``UNet2DModel`` (DDPM/DDIM pipelines, hasten's own models),
``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL with its pooled text and size conditions),
``DiTTransformer2DModel`` (class labels; a learned-variance half of the output is dropped),
``PixArtTransformer2DModel`` (prompts with token masks; 1024-px models' size conditions),
``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` (flow matching; Flux's latents are packed 2x2
into tokens, its resolution shift follows the image size and its distilled guidance is an input).

Reference: the diffusers pipelines' denoising loops (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``DiTPipeline``, ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``), whose model calls
these adapters reproduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import os
import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from ..models.adapters import EpsDenoiser, FlowDenoiser, NetworkDenoiser, VDenoiser, X0Denoiser
from ..models.zoo import LoadedModel, ModelInfo
from ..schedules import FlowMatching
from .scheduler import HastenScheduler

__all__ = ["FAMILIES", "PipelineModel", "from_pipeline"]

FAMILIES = {
    "UNet2DModel": "DDPM / DDIM pipelines (unconditional or class-conditional pixel UNets)",
    "UNet2DConditionModel": "Stable Diffusion 1.x / 2.x and SDXL",
    "DiTTransformer2DModel": "DiT (class labels)",
    "PixArtTransformer2DModel": "PixArt-alpha / PixArt-sigma",
    "SD3Transformer2DModel": "Stable Diffusion 3 (flow matching)",
    "FluxTransformer2DModel": "Flux (flow matching)",
}
_OBJECTIVES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
_DENOISERS = {"eps": EpsDenoiser, "v": VDenoiser, "x0": X0Denoiser}
_DECODE_BATCH = 8


# -- the model calls of each family, as ``call(x_t, t, **cond)`` in the pipeline's own time units -------------
def _noise_half(out: Tensor, x: Tensor) -> Tensor:
    """A learned-variance network (DiT, PixArt) returns 2C channels: the first C are the noise."""
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


class _UNetCall(nn.Module):
    """UNet2DConditionModel; SDXL's added conditions arrive as the flat keywords ``text_embeds``/``time_ids``
    (so classifier-free guidance can batch them like any other input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, **added: Tensor) -> Tensor:
        return self.net(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None).sample


class _DiTCall(nn.Module):
    """DiTTransformer2DModel; a learned-variance network returns 2C channels, of which the first C are the noise."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        return _noise_half(self.net(x, timestep=t, class_labels=class_labels).sample, x)


class _PixArtCall(nn.Module):
    """PixArtTransformer2DModel: prompt tokens with their attention mask, and (1024-px models) the resolution and
    aspect-ratio conditions as flat keywords; a learned-variance half of the output is dropped."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                resolution: Tensor | None = None, aspect_ratio: Tensor | None = None) -> Tensor:  # fmt: skip
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        out = self.net(x, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                       timestep=t, added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
        return _noise_half(out, x)


class _SD3Call(nn.Module):
    """SD3Transformer2DModel: prompt tokens and the pooled prompt; timesteps ``1000 t``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor) -> Tensor:
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                        pooled_projections=pooled_projections, return_dict=False)[0]  # fmt: skip


class _FluxCall(nn.Module):
    """FluxTransformer2DModel on packed latents ``[B, tokens, 4C]``: fed ``t`` (not ``1000 t``), the positional
    ids of the image and text tokens, and the distilled guidance scale when the model embeds one."""

    def __init__(self, net: nn.Module, img_ids: Tensor, txt_ids: Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("img_ids", img_ids, persistent=False)
        self.register_buffer("txt_ids", txt_ids, persistent=False)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                guidance: Tensor | None = None) -> Tensor:  # fmt: skip
        return self.net(hidden_states=x, timestep=t / 1000, guidance=guidance, pooled_projections=pooled_projections,
                        encoder_hidden_states=encoder_hidden_states, txt_ids=self.txt_ids.to(x.device),
                        img_ids=self.img_ids.to(x.device), return_dict=False)[0]  # fmt: skip


@dataclasses.dataclass
class PipelineModel(LoadedModel):
    """A diffusers pipeline's denoiser with its conditioning fixed: a :class:`hasten.LoadedModel` (see the
    module docstring). ``cond`` holds one row per prompt (or class), ``uncond`` the negative inputs for
    guidance (None where the pipeline has none, e.g. guidance-distilled Flux)."""

    pipeline: Any = None
    family: str = ""
    cond: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    uncond: dict[str, Tensor] | None = None
    default_guidance: float = 1.0
    scheduler_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)  # (height, width) of the decoded images

    @functools.cached_property
    def condition_key(self) -> str:  # type: ignore[override]  # the conditioning is fixed: hash it once
        digest = hashlib.sha256()
        for part in (self.cond, self.uncond or {}):
            for name in sorted(part):
                digest.update(name.encode())
                digest.update(_tensor_bytes(part[name]))
        return digest.hexdigest()[:16]

    @functools.cached_property
    def x0_processing(self):  # type: ignore[override]
        """The pipeline scheduler's clipping or dynamic thresholding of x0 (DDPM's and DDIM's ``clip_sample``
        defaults to True), applied by hasten's samplers as by the pipeline's own; None when it has none."""
        from .sources import processing_of

        processing = processing_of(self.scheduler_config)
        return processing.x0 if processing.changes_x0 else None

    def bytes_on_disk(self) -> int:
        """The denoiser's weights in memory (a pipeline's files also hold its text encoders and VAE)."""
        return sum(p.numel() * p.element_size() for p in self.network.parameters())

    def conditioning(self, labels: Tensor | None, rows: range) -> dict[str, Tensor]:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return {name: value[index % len(value)] for name, value in self.cond.items()}

    def unconditional(self) -> dict[str, Tensor] | None:
        return self.uncond

    def _latent_affine(self) -> tuple[Any, Any]:
        """``(a, b)`` with VAE latent ``= x / a + b`` for model-space latents ``x`` (the pipeline's scaling)."""
        config = self.pipeline.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
            return config.scaling_factor / std, mean
        return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0

    @contextlib.contextmanager
    def _vae_dtype(self):
        """The VAE's dtype for a decode or encode: SDXL's overflows in float16, so its pipeline runs it in float32
        (``force_upcast``), and so do we."""
        vae = self.pipeline.vae
        param = next(vae.parameters())
        upcast = param.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            yield param.device, torch.float32 if upcast else param.dtype
        finally:
            if upcast:
                vae.to(torch.float16)

    @property
    def pixel_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        vae = getattr(self.pipeline, "vae", None)
        return tuple(self.info.image_shape) if vae is None else (vae.config.in_channels, *self.image_size)

    @torch.no_grad()
    def to_images(self, x: Tensor) -> Tensor:
        if getattr(self.pipeline, "vae", None) is None:  # a pixel-space model: [-1, 1] -> [0, 1]
            return super().to_images(x)
        if self.family == "FluxTransformer2DModel":
            x = self.pipeline._unpack_latents(x, *self.image_size, self.pipeline.vae_scale_factor)
        a, b = self._latent_affine()
        x = x / a + b
        with self._vae_dtype() as (device, dtype):
            vae = self.pipeline.vae
            decoded = [vae.decode(c.to(device, dtype)).sample.float().cpu() for c in x.split(_DECODE_BATCH)]
        return (torch.cat(decoded) / 2 + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def from_images(self, images01: Tensor) -> Tensor:
        """Images in [0, 1] -> latents: the mean of the VAE encoder's distribution, scaled as the pipeline scales
        latents (so :meth:`to_images` of it is the VAE's reconstruction), packed for Flux."""
        if getattr(self.pipeline, "vae", None) is None:
            return super().from_images(images01)
        pixels = images01 * 2.0 - 1.0
        with self._vae_dtype() as (device, dtype):
            encoded = [self.pipeline.vae.encode(c.to(device, dtype)).latent_dist.mean.float().cpu()
                       for c in pixels.split(_DECODE_BATCH)]  # fmt: skip
        a, b = self._latent_affine()
        z = (torch.cat(encoded) - b) * a
        if self.family == "FluxTransformer2DModel":
            z = self.pipeline._pack_latents(z, *z.shape)
        return z.to(images01.dtype)


def from_pipeline(
    pipe: Any,
    *,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    pooled_prompt_embeds: Tensor | None = None,
    negative_pooled_prompt_embeds: Tensor | None = None,
    prompt_attention_mask: Tensor | None = None,
    negative_prompt_attention_mask: Tensor | None = None,
    class_labels: list[int] | Tensor | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    name: str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
) -> PipelineModel:
    """A hasten model from a diffusers pipeline (an object, or a folder ``DiffusionPipeline.from_pretrained``
    loads).

    Args:
        prompt, negative_prompt: Text, encoded by the pipeline's ``encode_prompt`` (needs its text encoders).
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds: Encoded
            prompts instead of text, shaped as the pipeline takes them (one row per prompt).
        prompt_attention_mask, negative_prompt_attention_mask: PixArt's token masks of encoded prompts.
        class_labels: DiT's classes (default: every class in turn).
        guidance: The guidance scale (default: the pipeline's own default). For Flux it is the distilled
            guidance input of the model; elsewhere hasten's classifier-free guidance, and the default of
            :func:`hasten.generate` for this model.
        height, width: Image size in pixels (default: the pipeline's default size).
        name: A name for reports (default: the folder name or the pipeline class).
        device: Move the pipeline there first (default: leave it where it is).
        allow_pickle: A folder: also load pickled weights (``.bin``) where a part has no safetensors. Off by
            default: unpickling can run code the file carries.

    Raises:
        ValueError: for a denoiser or prediction type hasten does not know (naming what it found and what is
            supported), conditioning the pipeline cannot take, or a folder whose weights are pickled only
            (without ``allow_pickle``).
    """
    args = {"prompt": prompt, "negative_prompt": negative_prompt, "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds, "class_labels": class_labels,
            "prompt_attention_mask": prompt_attention_mask,
            "negative_prompt_attention_mask": negative_prompt_attention_mask}  # fmt: skip
    if isinstance(pipe, str | os.PathLike):
        folder = pathlib.Path(pipe)
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
        name = name or folder.name
        pipe = _load_pipeline(folder, text=prompt is not None or negative_prompt is not None, allow_pickle=allow_pickle)
    if device is not None:
        pipe = pipe.to(device)
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    family = type(net).__name__
    if family not in FAMILIES:
        supported = "; ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise ValueError(
            f"hasten.from_pipeline: {type(pipe).__name__}'s denoiser is {family if net is not None else 'missing'} "
            f"(no .unet or .transformer of a known class); supported: {supported}"
        )
    # the training schedule and prediction type (no step is taken with it: any solver, so any source class, will do)
    scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    objective = _OBJECTIVES[scheduler.config.prediction_type]
    if guidance is None:
        guidance = _default_of(pipe, "guidance_scale", 1.0)
    net.eval().requires_grad_(False)
    builder = {
        "UNet2DModel": _pixel_unet,
        "UNet2DConditionModel": _text_unet,
        "DiTTransformer2DModel": _dit,
        "PixArtTransformer2DModel": _pixart,
        "SD3Transformer2DModel": _sd3,
        "FluxTransformer2DModel": _flux,
    }[family]
    parts = builder(pipe, net, args, guidance, height, width)
    call, shape, cond, uncond, size = parts["call"], parts["shape"], parts["cond"], parts["uncond"], parts["size"]
    if objective == "flow":
        schedule = FlowMatching(shift=parts.get("shift", scheduler.config.shift))
        denoiser: NetworkDenoiser = FlowDenoiser(call, schedule, time_scale=scheduler.config.num_train_timesteps)
    else:
        denoiser = _DENOISERS[objective](call, scheduler.noise_schedule)
    if uncond is not None:
        uncond = _one_negative(uncond)
    default_guidance = 1.0 if uncond is None else float(guidance)
    info = ModelInfo(name=name or type(pipe).__name__, arch=family, objective=objective, image_shape=shape,
                     num_classes=0, data="pipeline", time_scale=denoiser.time_scale)  # fmt: skip
    training = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    if objective == "flow":
        training["shift"] = denoiser.schedule.shift
    return PipelineModel(denoiser, net, info, None, _fingerprint(net), pipeline=pipe, family=family, cond=cond,  # type: ignore[arg-type]
                         uncond=uncond, default_guidance=default_guidance, scheduler_config=training,
                         image_size=size)  # fmt: skip


# -- one builder per family: the model call, latent shape, conditioning and image size ------------------------
def _pixel_unet(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
            family="UNet2DModel")  # fmt: skip
    size = int(net.config.sample_size) if isinstance(net.config.sample_size, int) else net.config.sample_size[0]
    height, width = height or size, width or size
    cond: dict[str, Tensor] = {}
    uncond = None
    if net.config.num_class_embeds:  # hasten's class-conditional UNets keep the last class as the null class
        null = net.config.num_class_embeds - 1
        labels = args["class_labels"]
        cond = {"class_labels": torch.as_tensor(range(null) if labels is None else labels, dtype=torch.long)}
        uncond = {"class_labels": torch.tensor([null])} if guidance != 1.0 else None
    elif args["class_labels"] is not None:
        raise ValueError("class_labels given, but this UNet2DModel has no class embedding")
    return {"call": net, "shape": (net.config.in_channels, height, width), "cond": cond, "uncond": uncond,
            "size": (height, width)}  # fmt: skip


def _latent_size(pipe, net, height, width, default_sample: int) -> tuple[int, int, int]:
    factor = int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
    height = height or default_sample * factor
    width = width or default_sample * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of the VAE's factor {factor}, got {height}x{width}")
    return factor, height, width


def _encode(pipe, args: dict[str, Any], do_cfg: bool) -> tuple[Tensor | None, ...]:
    """The pipeline's own ``encode_prompt`` (prompt text or embeddings, negative prompt rules included)."""
    if args["prompt"] is None and args["prompt_embeds"] is None:
        raise ValueError("this pipeline is text-conditioned: pass prompt=... or prompt_embeds=...")
    accepted = inspect.signature(pipe.encode_prompt).parameters
    kwargs = {"prompt": args["prompt"], "negative_prompt": args["negative_prompt"], "device": pipe.device,
              "num_images_per_prompt": 1, "do_classifier_free_guidance": do_cfg,
              "prompt_embeds": args["prompt_embeds"], "negative_prompt_embeds": args["negative_prompt_embeds"],
              "pooled_prompt_embeds": args["pooled_prompt_embeds"],
              "negative_pooled_prompt_embeds": args["negative_pooled_prompt_embeds"],
              "prompt_attention_mask": args["prompt_attention_mask"],
              "negative_prompt_attention_mask": args["negative_prompt_attention_mask"]}  # fmt: skip
    # None where the signature has a default leaves the pipeline's own default (PixArt's negative prompt "")
    kwargs = {k: v for k, v in kwargs.items()
              if k in accepted and (v is not None or accepted[k].default is inspect.Parameter.empty)}  # fmt: skip
    if "prompt_2" in accepted:
        kwargs["prompt_2"] = None
    if "prompt_3" in accepted:
        kwargs["prompt_3"] = None
    try:
        with torch.no_grad():
            return tuple(pipe.encode_prompt(**kwargs))
    except (AttributeError, TypeError) as err:  # a missing text encoder or tokenizer
        raise ValueError(
            f"{type(pipe).__name__}.encode_prompt could not encode the prompts ({err}); a pipeline without text "
            "encoders needs prompt_embeds (and, for guidance, negative_prompt_embeds; SD3/SDXL also the pooled ones)"
        ) from None


def _text_unet(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "class_labels", family="UNet2DConditionModel")
    factor, height, width = _latent_size(pipe, net, height, width, int(net.config.sample_size))
    do_cfg = guidance > 1.0
    sdxl = net.config.addition_embed_type == "text_time"
    encoded = _encode(pipe, args, do_cfg)
    if sdxl:
        embeds, negative, pooled, negative_pooled = encoded
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        # The pipeline checks the size embedding against the UNet; so do we, by the same rule.
        expected = net.add_embedding.linear_1.in_features
        got = net.config.addition_time_embed_dim * 6 + pooled.shape[-1]
        if expected != got:
            raise ValueError(f"SDXL UNet expects added conditions of size {expected}, the pooled prompt gives {got}")
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.expand(len(embeds), 6)}
        uncond = None
        if do_cfg:
            uncond = {"encoder_hidden_states": negative, "text_embeds": negative_pooled,
                      "time_ids": time_ids.expand(len(negative), 6)}  # fmt: skip
    else:
        embeds, negative = encoded[:2]
        cond = {"encoder_hidden_states": embeds}
        uncond = {"encoder_hidden_states": negative} if do_cfg else None
    shape = (net.config.in_channels, height // factor, width // factor)
    return {"call": _UNetCall(net), "shape": shape, "cond": cond, "uncond": uncond, "size": (height, width)}


def _dit(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
            family="DiTTransformer2DModel")  # fmt: skip
    size = int(net.config.sample_size)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if (height and height != size * factor) or (width and width != size * factor):
        raise ValueError(f"DiT samples at its trained size only: {size * factor}x{size * factor} pixels")
    classes = int(net.config.num_embeds_ada_norm)
    labels = torch.as_tensor(range(classes) if args["class_labels"] is None else args["class_labels"], dtype=torch.long)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"class_labels must be a non-empty list of classes in 0..{classes - 1}, got {labels.tolist()}")
    uncond = {"class_labels": torch.tensor([classes])} if guidance > 1.0 else None  # DiT's null class
    return {"call": _DiTCall(net), "shape": (net.config.in_channels, size, size), "cond": {"class_labels": labels},
            "uncond": uncond, "size": (size * factor, size * factor)}  # fmt: skip


def _pixart(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "class_labels", "pooled_prompt_embeds", family="PixArtTransformer2DModel")
    factor, height, width = _latent_size(pipe, net, height, width, int(net.config.sample_size))
    do_cfg = guidance > 1.0
    embeds, mask, negative, negative_mask = _encode(pipe, args, do_cfg)
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    uncond = {"encoder_hidden_states": negative, "encoder_attention_mask": negative_mask} if do_cfg else None
    if int(net.config.sample_size) == 128:  # PixArt-alpha 1024 px: resolution and aspect-ratio conditions
        size = {"resolution": torch.tensor([[float(height), float(width)]]),
                "aspect_ratio": torch.tensor([[height / width]])}  # fmt: skip
        cond.update({k: v.expand(len(embeds), -1) for k, v in size.items()})
        if uncond is not None:
            uncond.update(size)
    shape = (net.config.in_channels, height // factor, width // factor)
    return {"call": _PixArtCall(net), "shape": shape, "cond": cond, "uncond": uncond, "size": (height, width)}


def _sd3(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "class_labels", family="SD3Transformer2DModel")
    factor, height, width = _latent_size(pipe, net, height, width, int(net.config.sample_size))
    do_cfg = guidance > 1.0
    embeds, negative, pooled, negative_pooled = _encode(pipe, args, do_cfg)
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if do_cfg else None
    shape = (net.config.in_channels, height // factor, width // factor)
    return {"call": _SD3Call(net), "shape": shape, "cond": cond, "uncond": uncond, "size": (height, width)}


def _flux(pipe, net, args, guidance, height, width) -> dict[str, Any]:
    _refuse(args, "class_labels", "negative_prompt", "negative_prompt_embeds", family="FluxTransformer2DModel")
    factor, height, width = _latent_size(pipe, net, height, width, int(getattr(pipe, "default_sample_size", 128)))
    if height % (2 * factor) or width % (2 * factor):
        raise ValueError(f"Flux packs 2x2 latents: height and width must be multiples of {2 * factor}")
    embeds, pooled, txt_ids = _encode(pipe, args, False)
    rows, cols = height // factor // 2, width // factor // 2
    img_ids = pipe._prepare_latent_image_ids(1, rows, cols, torch.device("cpu"), embeds.dtype)
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if net.config.guidance_embeds:  # guidance-distilled: the scale is an input, no unconditional branch
        cond["guidance"] = torch.full((len(embeds),), float(guidance))
    config = pipe.scheduler.config
    shift = config.get("shift", 1.0)
    if config.get("use_dynamic_shifting", False):  # Flux's shift grows with the number of image tokens
        shift = FlowMatching.for_resolution(rows * cols, config.get("base_image_seq_len", 256),
                                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                            config.get("max_shift", 1.15)).shift  # fmt: skip
    return {"call": _FluxCall(net, img_ids, txt_ids.cpu()), "shape": (rows * cols, net.config.in_channels),
            "cond": cond, "uncond": None, "size": (height, width), "shift": shift}  # fmt: skip


_TEXT_PARTS = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor", "image_encoder")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _load_pipeline(folder: pathlib.Path, *, text: bool, allow_pickle: bool = False) -> Any:
    """``DiffusionPipeline.from_pretrained(folder)``, with the parts it was saved without passed as None and,
    when prompts come as embeddings (``text=False``), the text encoders left unloaded (SD3's and Flux's T5 is
    most of the pipeline's memory). Weights load from safetensors only: a pickled checkpoint can run code when
    it is read, so one is refused unless ``allow_pickle`` (then safetensors are still preferred)."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    absent = {}
    for part, entry in index.items():
        if part.startswith("_"):
            continue
        saved = isinstance(entry, list) and entry and entry[0] is not None and (folder / part).exists()
        if not saved or (not text and part.startswith(_TEXT_PARTS)):
            absent[part] = None
    try:
        return DiffusionPipeline.from_pretrained(folder, use_safetensors=None if allow_pickle else True, **absent)
    except OSError as err:
        pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        if allow_pickle or not pickled or "safetensors" not in str(err):
            raise
        raise ValueError(
            f"{folder} has pickled weights ({', '.join(pickled[:3])}) where safetensors are missing; loading a "
            "pickle can run code it carries. Convert the folder (pipe.save_pretrained(dir, safe_serialization="
            "True)), or, if you trust it, pass allow_pickle=True (--allow-pickle on the command line)"
        ) from None


def _one_negative(uncond: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every prompt is guided against one negative prompt (hasten's guidance takes one unconditional input);
    P identical rows, as ``encode_prompt`` makes for P prompts and one negative prompt, become one."""
    rows = {len(v) for v in uncond.values()}
    for name, value in uncond.items():
        if not all(torch.equal(value[0], row) for row in value[1:]):
            raise ValueError(
                f"hasten guides every prompt against one negative prompt; got {len(value)} different negative "
                f"{name} rows: make one model per negative prompt (from_pipeline with that negative prompt)"
            )
    return {name: value[:1] for name, value in uncond.items()} if rows else uncond


def _refuse(args: dict[str, Any], *names: str, family: str) -> None:
    if family != "PixArtTransformer2DModel":
        names = (*names, "prompt_attention_mask", "negative_prompt_attention_mask")
    given = [n for n in names if args.get(n) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used with a {family} pipeline")


def _default_of(pipe: Any, argument: str, fallback: float) -> float:
    parameter = inspect.signature(pipe.__call__).parameters.get(argument)
    value = None if parameter is None else parameter.default
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else fallback


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _fingerprint(net: nn.Module) -> str:
    """sha256 of the denoiser's weights (names and bytes): plans and cached statistics are keyed by it."""
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(_tensor_bytes(value))
    return digest.hexdigest()[:16]
