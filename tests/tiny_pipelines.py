"""Tiny diffusers pipelines from parts with random weights (nothing downloaded): one per family hasten adapts.

Each builder returns ``(pipeline, call_kwargs)``: the keyword arguments a user would pass to the pipeline
(encoded prompts instead of text, since the pipelines carry no text encoders) and that ``hasten.from_pipeline``
takes too.
"""

from __future__ import annotations

import diffusers
import torch

SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _seeded(seed: int):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 100)


def _vae(latent_channels: int = 4, **config) -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=latent_channels, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        **config,
    ).eval()  # fmt: skip


def ddpm():
    _seeded(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=4).eval()  # fmt: skip
    # clip_sample off: HastenScheduler honours DDPM's default clipping of x0, the adapter comparison has none
    return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False)), {}


def stable_diffusion():
    gen = _seeded(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=diffusers.DPMSolverMultistepScheduler(**SCALED_LINEAR), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    negative = torch.randn(1, 7, 32, generator=gen) * 0.1  # one negative prompt for both prompts
    embeds = torch.randn(2, 7, 32, generator=gen)
    return pipe, {"prompt_embeds": embeds, "negative_prompt_embeds": negative.expand(2, 7, 32)}


def stable_diffusion_xl():
    gen = _seeded(2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    ).eval()  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SCALED_LINEAR, timestep_spacing="trailing"),
    )  # fmt: skip
    return pipe, {
        "prompt_embeds": torch.randn(1, 7, 64, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
        "negative_prompt_embeds": torch.randn(1, 7, 64, generator=gen) * 0.1,
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=gen) * 0.1,
    }


def dit():
    _seeded(3)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000,  # the pipeline's null class is 1000
    ).eval()  # fmt: skip
    # clip_sample off: HastenScheduler honours DDIM's default clipping of x0, the adapter comparison has none
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler)
    return pipe, {"class_labels": [1, 7]}


def pixart():
    gen = _seeded(6)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())  # fmt: skip
    mask = torch.ones(1, 5)
    mask[:, 4] = 0  # a padded token
    return pipe, {
        "prompt_embeds": torch.randn(1, 5, 32, generator=gen), "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(1, 5, 32, generator=gen) * 0.1,
        "negative_prompt_attention_mask": torch.ones(1, 5), "negative_prompt": None,
    }  # fmt: skip


def stable_diffusion_3():
    gen = _seeded(4)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    return pipe, {
        "prompt_embeds": torch.randn(1, 9, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
        "negative_prompt_embeds": torch.randn(1, 9, 32, generator=gen) * 0.1,
        "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=gen) * 0.1,
    }


def flux():
    gen = _seeded(5)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    ).eval()  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(latent_channels=4, shift_factor=0.1159,
        scaling_factor=0.3611), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    return pipe, {"prompt_embeds": torch.randn(1, 6, 32, generator=gen),
                  "pooled_prompt_embeds": torch.randn(1, 32, generator=gen)}  # fmt: skip


BUILDERS = {
    "ddpm": ddpm,
    "sd": stable_diffusion,
    "sdxl": stable_diffusion_xl,
    "dit": dit,
    "pixart": pixart,
    "sd3": stable_diffusion_3,
    "flux": flux,
}
