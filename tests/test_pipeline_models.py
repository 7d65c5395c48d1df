"""hasten.from_pipeline: every supported pipeline family, from tiny parts, sampled by hasten and by the pipeline
itself (with HastenScheduler) from the same noise: the same latents, so the adapters make exactly the model
calls the pipelines make (conditioning, guidance, time units, packing)."""

from __future__ import annotations

import pytest
import torch

import hasten

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' text-to-image pipelines import it
import tiny_pipelines  # noqa: E402
from hasten.generate import guided_denoiser  # noqa: E402
from hasten.pipelines import HastenScheduler, PipelineModel, from_pipeline  # noqa: E402

SIZE = {"sd": 16, "sdxl": 16, "pixart": 16, "sd3": 16, "flux": 32}  # pixels; the pixel and DiT models have one size


def _size(family: str) -> dict[str, int]:
    return {"height": SIZE[family], "width": SIZE[family]} if family in SIZE else {}


def _pipeline_run(pipe, kwargs, family, latents, steps):
    """The pipeline's own loop with HastenScheduler; returns model-space samples (pixel models, DiT: images)."""
    gen = torch.Generator().manual_seed(0)
    if family == "ddpm":
        return torch.as_tensor(pipe(batch_size=len(latents), num_inference_steps=steps, generator=gen,
                                    output_type="np").images).permute(0, 3, 1, 2)  # fmt: skip
    if family == "dit":
        images = pipe(kwargs["class_labels"], num_inference_steps=steps, generator=gen, output_type="np").images
        return torch.as_tensor(images).permute(0, 3, 1, 2)
    # one row per sample, prompts cycling as hasten cycles them (not every pipeline repeats given embeddings)
    rows = torch.arange(len(latents))
    kwargs = {k: v[rows % len(v)] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if family == "pixart":  # its aspect-ratio bins exist for its released sizes only
        kwargs["use_resolution_binning"] = False
    return pipe(**kwargs, **_size(family), latents=latents, num_inference_steps=steps, generator=gen,
                output_type="latent").images  # fmt: skip


def test_a_pipelines_clipping_is_honoured():
    """DDPM's default clip_sample=True is part of the model: hasten's samplers clip x0 as the pipeline does."""
    pipe, _ = tiny_pipelines.ddpm()
    pipe.scheduler = diffusers.DDPMScheduler()  # the defaults: clip_sample=True, range 1
    pipe.set_progress_bar_config(disable=True)
    model = hasten.from_pipeline(pipe)
    assert model.x0_processing is not None
    latents = torch.randn((2, *model.info.image_shape), generator=torch.Generator().manual_seed(0))
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    theirs = _pipeline_run(pipe, {}, "ddpm", latents, steps=5)
    grid = pipe.scheduler._grid
    x = (
        latents.double()
        * pipe.scheduler.init_noise_sigma
        / float(pipe.scheduler.noise_schedule.alpha_from_ve_sigma(grid[0]))
    )
    ours = model.to_images(hasten.sample(guided_denoiser(model, 1.0), x, grid, "dpmpp_2m").float())
    unclipped = model.to_images(hasten.sample(model.denoiser, x, grid, "dpmpp_2m").float())
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=5e-5)
    assert (unclipped - theirs.float()).abs().max() > 1e-3  # the clipping matters on this network


@pytest.mark.parametrize("family", list(tiny_pipelines.BUILDERS))
def test_each_family_agrees_with_its_own_pipeline(family):
    pipe, kwargs = tiny_pipelines.BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    model = hasten.from_pipeline(pipe, **kwargs, **_size(family))
    assert isinstance(model, PipelineModel) and model.info.arch == type(model.network).__name__
    batch = 2
    # the pipelines that draw their own noise (DDPM, DiT) draw this from the generator seeded 0
    latents = torch.randn((batch, *model.info.image_shape), generator=torch.Generator().manual_seed(0))
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    theirs = _pipeline_run(pipe, kwargs, family, latents, steps=5)

    grid = pipe.scheduler._grid  # the grid the pipeline's own set_timesteps call built
    start = float(pipe.scheduler.noise_schedule.alpha_from_ve_sigma(grid[0]))
    x = latents.double() * pipe.scheduler.init_noise_sigma / start
    ours = hasten.sample(guided_denoiser(model, model.default_guidance), x, grid, "dpmpp_2m",
                         cond=model.conditioning(None, range(batch)))  # fmt: skip
    if family in ("ddpm", "dit"):
        ours = model.to_images(ours.float())
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0.05  # not a degenerate output
    # measured: <= 1.6e-5 absolute; PixArt 6.1e-5 on latents of magnitude ~100 (relative 5e-7)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=5e-5)


def test_generate_bench_pieces_on_a_pipeline_model(tmp_path):
    """hasten.generate, the diffusers peer loop and the reference solve all run on a pipeline model; the
    prompts cycle over the samples and guidance defaults to the pipeline's."""
    from hasten.bench.peers import diffusers_generate

    pipe, kwargs = tiny_pipelines.stable_diffusion()
    model = from_pipeline(pipe, **kwargs, height=16, width=16, guidance=3.0)
    assert model.default_guidance == 3.0 and len(model.uncond["encoder_hidden_states"]) == 1
    cond = model.conditioning(None, range(3))["encoder_hidden_states"]
    torch.testing.assert_close(cond[2], kwargs["prompt_embeds"][0])  # sample 2 uses prompt 0 again
    gen = hasten.generate(model, 3, solver="unipc", steps=4)
    assert gen.images01.shape == (3, 3, 16, 16) and gen.samples.shape == (3, 4, 8, 8) and gen.nfe == 4
    peer = diffusers_generate(model, 3, "dpmpp_2m", steps=4, guidance=model.default_guidance)
    ours = hasten.generate(model, 3, solver="dpmpp_2m", steps=4, schedule="time_uniform")
    assert peer.images01.shape == ours.images01.shape
    unguided = hasten.generate(model, 3, solver="dpmpp_2m", steps=4, guidance=1.0)
    assert not torch.allclose(unguided.samples, gen.samples)


def test_from_a_saved_folder(tmp_path):
    pipe, _ = tiny_pipelines.dit()
    pipe.save_pretrained(tmp_path / "dit")
    again = from_pipeline(tmp_path / "dit", class_labels=[3])
    first = from_pipeline(pipe, class_labels=[3])
    assert again.fingerprint == first.fingerprint and again.info.name == "dit"
    assert again.condition_key == first.condition_key != from_pipeline(pipe, class_labels=[4]).condition_key
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        from_pipeline(tmp_path)


def test_bad_input():
    pipe, kwargs = tiny_pipelines.stable_diffusion()
    with pytest.raises(ValueError, match=r"pass prompt=\.\.\. or prompt_embeds"):
        from_pipeline(pipe)
    with pytest.raises(ValueError, match="without text encoders needs prompt_embeds"):
        from_pipeline(pipe, prompt="a red bicycle")
    with pytest.raises(ValueError, match="class_labels cannot be used with a UNet2DConditionModel"):
        from_pipeline(pipe, **kwargs, class_labels=[1])
    with pytest.raises(ValueError, match="one negative prompt"):
        from_pipeline(pipe, prompt_embeds=kwargs["prompt_embeds"], negative_prompt_embeds=kwargs["prompt_embeds"])
    with pytest.raises(ValueError, match="multiples of the VAE's factor 2"):
        from_pipeline(pipe, **kwargs, height=15, width=16)
    unguided = from_pipeline(pipe, prompt_embeds=kwargs["prompt_embeds"], guidance=1.0)
    with pytest.raises(ValueError, match="unconditional branch"):
        hasten.generate(unguided, 2, steps=3, guidance=2.0)
    dit, _ = tiny_pipelines.dit()
    with pytest.raises(ValueError, match=r"classes in 0\.\.999"):
        from_pipeline(dit, class_labels=[1000])
    flux, flux_kwargs = tiny_pipelines.flux()
    with pytest.raises(ValueError, match="multiples of 4"):
        from_pipeline(flux, **flux_kwargs, height=18, width=32)

    class Other(torch.nn.Module):
        pass

    pipe.unet = Other()
    with pytest.raises(ValueError, match=r"denoiser is Other .*supported: UNet2DModel"):
        from_pipeline(pipe, **kwargs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_pipelines_agree_with_flow_match_euler(family):
    """In SD3's and Flux's own pipelines, HastenScheduler("euler") mirrors FlowMatchEulerDiscreteScheduler,
    Flux's resolution shift of the sigmas the pipeline passes included; a hasten grid stops the pipeline
    passing its own sigmas."""
    pipe, kwargs = tiny_pipelines.BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(**kwargs, **_size(family), num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images  # fmt: skip

    theirs = run()
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="euler")
    torch.testing.assert_close(run(), theirs, rtol=0, atol=1e-5)
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m", schedule="karras")
    assert pipe.scheduler.config.use_flow_sigmas
    assert torch.isfinite(run()).all() and len(pipe.scheduler.timesteps) == 6


def test_bench_a_pipeline_folder(tmp_path):
    """`hasten bench --pipeline DIR` on a Stable Diffusion pipeline saved from parts, prompts from an embeddings
    file: hasten rows, a diffusers peer, the pipeline's own scheduler and the reference, no FD (no feature
    network for this data), an HTML report."""
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from hasten.cli.app import app

    pipe, kwargs = tiny_pipelines.stable_diffusion()
    pipe.save_pretrained(tmp_path / "sd")
    save_file({k: v.contiguous() for k, v in kwargs.items()}, str(tmp_path / "prompts.safetensors"))
    args = ["bench", "--pipeline", str(tmp_path / "sd"), "--prompt-embeds", str(tmp_path / "prompts.safetensors"),
            "--height", "16", "--width", "16", "--guidance", "3", "--n", "10", "--out", str(tmp_path / "out"),
            "--format", "json"]  # fmt: skip
    from hasten.bench import matrix

    quick = matrix.PRESETS["quick"]
    small = dataclasses_replace(quick, solvers=("dpmpp_2m",), steps=(3,), peers=("dpmpp_2m",), reference_steps=12)
    matrix.PRESETS["pipeline-test"] = small
    try:
        result = CliRunner().invoke(app, [*args, "--preset", "pipeline-test"])
    finally:
        del matrix.PRESETS["pipeline-test"]
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    labels = {r["label"] for r in rows}
    assert {r["library"] for r in rows} == {"reference", "hasten", "diffusers"}
    assert any("pipeline[scheduler=DPMSolverMultistepScheduler]" in label for label in labels), labels
    assert all(r["fd"] is None for r in rows) and all(r["guidance"] == 3.0 for r in rows)
    measured = [r for r in rows if r["library"] != "reference"]
    assert all(r["nfe"] == 3 and 0 < r["rmse_ref"] < 1 for r in measured)
    # the pipeline's own DPM-Solver++ and diffusers' at the same settings are one algorithm on one grid
    own = next(r for r in measured if r["solver"] == "pipeline")
    peer = next(r for r in measured if r["library"] == "diffusers" and r["solver"] == "dpmpp_2m")
    assert abs(own["rmse_ref"] - peer["rmse_ref"]) < 1e-6
    assert "No FD" in (tmp_path / "out" / "report.html").read_text()
    bad = CliRunner().invoke(app, ["bench", "--prompt", "a cat"])
    assert bad.exit_code != 0 and "go with --pipeline" in bad.output


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_tune_cache_and_quantise_a_pipeline_model(tmp_path):
    """The other verbs take a pipeline model: a capped tune on DiT, a block cache on DiT and DeepCache on SDXL's
    UNet2DConditionModel, W8A8 quantisation of SDXL calibrated on its trajectory (its added conditions are a
    dict of tensors: recorded, merged across batches, saved and loaded)."""
    from hasten.accel import BlockCacheConfig, DeepCacheConfig
    from hasten.quant.calibrate import CalibrationSet, collect_calibration
    from hasten.tune.tuner import TuneConfig, tune

    dit, dit_kwargs = tiny_pipelines.dit()
    model = from_pipeline(dit, **dit_kwargs)
    plan = tune(model, TuneConfig(nfe=3, minutes=0.5, n_search=4, n_heldout=10, max_evaluations=3,
                                  reference_steps=12, use_v3=False, guidance=model.default_guidance),
                out=tmp_path / "plan.json")  # fmt: skip
    assert plan.fingerprint == model.fingerprint and plan.guidance == 4.0 and plan.num_steps == 3
    assert hasten.generate(model, 2, plan=plan).nfe == 3
    cached = hasten.generate(model, 2, steps=6, accel=BlockCacheConfig(interval=2))
    assert cached.accel_stats["reused"] > 0

    sdxl, sdxl_kwargs = tiny_pipelines.stable_diffusion_xl()
    model = from_pipeline(sdxl, **sdxl_kwargs, height=16, width=16)
    assert hasten.generate(model, 2, steps=6, accel=DeepCacheConfig(interval=3)).accel_stats["reused"] > 0
    float_samples = hasten.generate(model, 4, steps=4).samples
    calibration = collect_calibration(model, n=32, steps=4, batch_size=16)  # two batches to merge
    calibration.save(tmp_path / "calibration.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calibration.safetensors")
    added = loaded.calls[0].kwargs["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"} and len(added["time_ids"]) == loaded.calls[0].batch_size == 64
    report = hasten.quantize_(model, hasten.QuantConfig(weights=8, activations=8), calibration=loaded)
    assert len(report.layers) > 50
    quantised = hasten.generate(model, 4, steps=4).samples
    assert 0 < (quantised - float_samples).abs().max() < 0.5 * float_samples.abs().max()


def test_sample_and_tune_commands_take_a_pipeline_folder(tmp_path):
    import json

    from typer.testing import CliRunner

    from hasten.cli.app import app

    pipe, _ = tiny_pipelines.dit()
    pipe.save_pretrained(tmp_path / "dit")
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--pipeline", str(tmp_path / "dit"), "--class-label", "3", "--steps", "3",
                                 "--n", "2", "--out", str(tmp_path / "grid.png"), "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if '{"model"' in line)  # after diffusers' progress bar
    data = json.loads(line[line.index("{") :])
    assert data["nfe"] == 3 and data["guidance"] == 4.0 and (tmp_path / "grid.png").exists()
    result = runner.invoke(app, ["tune", "--pipeline", str(tmp_path / "dit"), "--nfe", "3", "--minutes", "0.05",
                                 "--n-search", "4", "--n-heldout", "10", "--reference-steps", "12", "--no-v3",
                                 "--out", str(tmp_path / "plan.json"), "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = hasten.load_plan(tmp_path / "plan.json")
    assert plan.guidance == 4.0 and plan.model == "dit"
    bad = runner.invoke(app, ["sample", "--class-label", "3"])
    assert bad.exit_code == 2 and "go with --pipeline" in bad.output


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_caches_on_dual_stream_transformers(family):
    """SD3's and Flux's blocks carry the text stream too and return (text, hidden); the block caches keep the
    middle stack's residual for both (SD3's last block ends the text stream: its stand-in returns None).
    Refreshing at every step is exact; reuse stays close and skips work."""
    from hasten.accel import BlockCacheConfig, FirstBlockCacheConfig

    pipe, kwargs = tiny_pipelines.BUILDERS[family]()
    torch.manual_seed(0)
    if family == "sd3":
        pipe.transformer = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        ).eval()  # fmt: skip
    else:
        pipe.transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=4, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
            guidance_embeds=True,
        ).eval()  # fmt: skip
    model = from_pipeline(pipe, **kwargs, **_size(family))
    plain = hasten.generate(model, 2, steps=6).samples
    every = hasten.generate(model, 2, steps=6, accel=BlockCacheConfig(interval=1))
    assert every.accel_stats["reused"] == 0 and torch.equal(every.samples, plain)
    for config in (BlockCacheConfig(interval=2), FirstBlockCacheConfig(threshold=0.5)):
        cached = hasten.generate(model, 2, steps=6, accel=config)
        assert cached.accel_stats["reused"] >= 3
        assert 0 < (cached.samples - plain).abs().max() < 0.1 * plain.abs().max()


def test_accelerate_calibrate_takes_a_pipeline_with_an_rmse_budget(tmp_path):
    """No feature network for a pipeline's data, so the cache calibration's budget is the RMSE to the uncached
    images (required, named in the error when missing); the config it writes samples the pipeline."""
    import json

    from typer.testing import CliRunner

    from hasten.cli.app import app

    pipe, _ = tiny_pipelines.dit()
    pipe.save_pretrained(tmp_path / "dit")
    runner = CliRunner()
    base = ["accelerate", "calibrate", "--pipeline", str(tmp_path / "dit"), "--technique", "block_cache", "--steps",
            "6", "--n", "10", "--out", str(tmp_path / "accel.json")]  # fmt: skip
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2 and "give max_rmse" in missing.output
    result = runner.invoke(app, [*base, "--max-rmse", "0.5", "--format", "json"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "accel.json.calibration.json").read_text())
    assert record["setting"]["guidance"] == 4.0 and all(row["fd"] is None for row in record["rows"])
    assert record["heldout"]["passed"] and record["heldout"]["rmse_to_uncached"] <= 0.5
    sample = ["sample", "--pipeline", str(tmp_path / "dit"), "--steps", "6", "--n", "2", "--accel",
              str(tmp_path / "accel.json"), "--out", str(tmp_path / "g.png")]  # fmt: skip
    sampled = runner.invoke(app, sample)
    assert sampled.exit_code == 0, sampled.output


def test_a_float16_vae_decodes_in_float32_as_its_pipeline_does():
    pipe, kwargs = tiny_pipelines.stable_diffusion()
    model = from_pipeline(pipe, **kwargs, height=16, width=16)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    full = model.to_images(latents)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    torch.testing.assert_close(model.to_images(latents), full, rtol=0, atol=1e-3)  # float16 weights, float32 math
    assert next(pipe.vae.parameters()).dtype == torch.float16  # given back as it was
