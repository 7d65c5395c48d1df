"""HastenScheduler: agreement with diffusers' schedulers inside the pipeline loop, every solver by replay,
plans, real pipelines, config round trips and bad input."""

from __future__ import annotations

import pytest
import torch

import hasten

diffusers = pytest.importorskip("diffusers")
from hasten.pipelines import HastenScheduler  # noqa: E402

LABELS = torch.arange(4) % 10


@pytest.fixture(scope="module")
def unet():
    return hasten.load("mnist-unet")


@pytest.fixture(scope="module")
def dit():
    return hasten.load("mnist-dit")


def _pipeline_loop(model, scheduler, steps=10, **set_kwargs):
    """What a diffusers pipeline does with its scheduler (set_timesteps, scale, model call, step)."""
    scheduler.set_timesteps(steps, **set_kwargs)
    # flow-matching schedulers have no init_noise_sigma (they start from unit noise)
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = noise * getattr(scheduler, "init_noise_sigma", 1)
    scale = model.info.time_scale / 1000 if model.info.objective == "flow" else 1.0
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    for t in scheduler.timesteps:
        with torch.no_grad():
            t_in = (torch.as_tensor(t) * scale).expand(4)
            out = model.network(scale_input(x, t), t_in, class_labels=LABELS).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


_DDPM_TYPE = [
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m", {"third_order_term": "reference"}),
    ("DPMSolverSinglestepScheduler", {}, "dpmpp_2s", {"intermediate": "grid"}),
    ("UniPCMultistepScheduler", {}, "unipc", {}),
    ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "ddim", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler", {}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, "heun", {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "trailing", "set_alpha_to_one": True}, "plms",
     {"warmup": "heun"}),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "config", "solver", "options"), _DDPM_TYPE, ids=lambda v: str(v)[:24])
def test_agrees_with_diffusers_schedulers(unet, cls, config, solver, options):
    """The pipeline loop with diffusers' scheduler and with HastenScheduler mirroring it: same samples."""
    reference = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="linear", **config)
    theirs = _pipeline_loop(unet, reference)
    ours_scheduler = HastenScheduler.from_config(reference.config, solver=solver, solver_options=options)
    assert ours_scheduler.config.source == cls  # found from the live config's options
    ours = _pipeline_loop(unet, ours_scheduler)
    assert len(ours_scheduler.timesteps) == len(reference.timesteps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-4 if cls == "PNDMScheduler" else 1e-4)


@pytest.mark.parametrize(
    ("cls", "solver", "options"),
    [("FlowMatchEulerDiscreteScheduler", "euler", {}), ("FlowMatchHeunDiscreteScheduler", "heun", {"space": "flow"})],
)
def test_agrees_with_flow_matching_schedulers(dit, cls, solver, options):
    reference = getattr(diffusers, cls)(num_train_timesteps=1000, shift=1.0)
    theirs = _pipeline_loop(dit, reference)
    scheduler = HastenScheduler.from_scheduler(reference, solver=solver, solver_options=options)
    assert scheduler.config.prediction_type == "flow_prediction"
    ours = _pipeline_loop(dit, scheduler)
    assert float(scheduler.timesteps[0]) == 1000.0  # the model sees t = 1 as with diffusers
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def _hasten_direct(model, scheduler, solver, **options):
    """hasten.sample on the scheduler's grid from the same noise (the reference for the replay)."""
    grid = scheduler._grid
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)).double()
    x_start = x * scheduler.init_noise_sigma / float(scheduler.noise_schedule.alpha_from_ve_sigma(grid[0]))
    # the scheduler integrates in float64 (stochastic solvers draw float64 noise from the same seed)
    out = hasten.sample(model.denoiser, x_start, grid, solver, cond={"class_labels": LABELS},
                        generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    return out.float()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3s", "dpm_solver_2", "unipc", "heun", "euler_ancestral",
                                    "dpmpp_2m_sde", "plms", "dpm_solver_v3"])  # fmt: skip
def test_every_solver_replays_exactly(unet, solver):
    """Through the scheduler any hasten solver gives what hasten.sample gives; a singlestep solver's inner
    evaluations are timesteps of their own; stochastic solvers replay their noise."""
    # DPM-Solver-v3 needs its model statistics; a pipeline cannot estimate them: pass them (here: none)
    options = {"ems": "degenerate"} if solver == "dpm_solver_v3" else {}
    scheduler = HastenScheduler(solver=solver, schedule="logsnr", solver_options=options)
    ours = _pipeline_loop(unet, scheduler, steps=6)
    direct = _hasten_direct(unet, scheduler, solver, **options)
    calls = hasten.sample(lambda x, s, **c: torch.zeros_like(x), torch.zeros(1, 1), scheduler._grid, solver,
                          generator=torch.Generator().manual_seed(0), return_info=True, **options).nfe  # fmt: skip
    assert len(scheduler.timesteps) == calls
    torch.testing.assert_close(ours, direct, rtol=0, atol=2e-4)


def test_runs_a_tuned_plan(dit, unet):
    plan = hasten.load_plan("plans/mnist-dit-nfe5.json")  # per-step UniPC decisions on a searched grid
    scheduler = HastenScheduler.from_plan(plan, model=dit, prediction_type="flow_prediction")  # checks the weights
    ours = _pipeline_loop(dit, scheduler, steps=plan.num_steps)
    assert len(scheduler.timesteps) == 5
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x_start = x / float(dit.schedule.alpha_from_ve_sigma(plan.sigmas[0]))
    direct = hasten.sample(dit.denoiser, x_start, plan=plan, cond={"class_labels": LABELS})
    torch.testing.assert_close(ours, direct, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="5-step plan"):
        scheduler.set_timesteps(7)
    with pytest.raises(ValueError, match="plan was made for model"):
        HastenScheduler.from_plan(plan, model=unet)


def test_in_a_real_ddpm_pipeline_and_config_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=4).eval()  # fmt: skip
    scheduler = HastenScheduler(solver="unipc", schedule="karras", solver_options={"order": 3})
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    first = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.save_pretrained(tmp_path / "pipe")
    again = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.scheduler, HastenScheduler)
    assert again.scheduler.config.solver == "unipc" and again.scheduler.config.solver_options == {"order": 3}
    again.set_progress_bar_config(disable=True)
    second = again(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (first.images == second.images).all()
    assert first.images.std() > 0


def test_in_a_stable_diffusion_pipeline_with_guidance():
    """A real StableDiffusionPipeline from tiny parts (UNet2DConditionModel, AutoencoderKL, prompt embeddings
    passed directly, classifier-free guidance): HastenScheduler mirroring DPM-Solver++ gives its images; a
    singlestep third-order solver on a Karras grid runs with its inner evaluations as timesteps."""
    pytest.importorskip("transformers")
    import tiny_pipelines

    pipe, prompts = tiny_pipelines.stable_diffusion()  # its scheduler: DPMSolverMultistep, SD's betas
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(**prompts, num_inference_steps=8, guidance_scale=3.0, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip

    theirs = run()
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    torch.testing.assert_close(run(), theirs, rtol=0, atol=1e-5)
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3s", schedule="karras")
    images = run()
    assert torch.isfinite(images).all() and len(pipe.scheduler.timesteps) > 8  # inner evaluations listed


def test_explicit_timesteps_and_sigmas(unet):
    scheduler = HastenScheduler(solver="dpmpp_2m")
    scheduler.set_timesteps(timesteps=[999, 700, 400, 100])
    assert scheduler.timesteps.tolist() == [999.0, 700.0, 400.0, 100.0]
    assert float(scheduler._grid[-1]) == 0.0
    sigmas = [float(s) for s in hasten.get_sigmas("karras", 4, unet.schedule)]
    scheduler.set_timesteps(sigmas=sigmas)
    assert len(scheduler.timesteps) == 4
    with pytest.raises(ValueError, match="timesteps must lie in"):
        scheduler.set_timesteps(timesteps=[1500, 10])
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps(4, timesteps=[999, 10])


def test_add_noise_matches_diffusers():
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ours = HastenScheduler.from_config(theirs.config)
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([10, 500, 990])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_img2img_begins_at_a_step_boundary(unet):
    scheduler = HastenScheduler(solver="dpmpp_2m", schedule="trailing")
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    x0 = torch.zeros(4, 1, 28, 28)
    x = scheduler.add_noise(x0, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                            scheduler.timesteps[4:5])  # fmt: skip
    for t in scheduler.timesteps[4:]:
        with torch.no_grad():
            out = unet.network(x, t.expand(4), class_labels=LABELS).sample
        x = scheduler.step(out, t, x).prev_sample
    assert torch.isfinite(x).all() and x.abs().max() < 5
    with pytest.raises(RuntimeError, match="more often"):
        scheduler.step(out, scheduler.timesteps[-1], x)


def test_bad_input():
    with pytest.raises(ValueError, match=r"unknown solver|solver"):
        HastenScheduler(solver="dpmpp_9m")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        HastenScheduler(prediction_type="score")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        HastenScheduler().step(torch.zeros(1, 1), 999, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="needs mu"):
        HastenScheduler(prediction_type="flow_prediction", use_dynamic_shifting=True).set_timesteps(4)


def test_grids_outside_the_training_range_are_refused():
    vp, flow = HastenScheduler(), HastenScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0\.0, 999\.0\]"):
        vp.set_timesteps(timesteps=[1500, 500])
    with pytest.raises(ValueError, match=r"sigmas must lie in .*trained noise levels"):
        vp.set_timesteps(sigmas=[1e9, 1.0])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\] for a flow-matching model"):
        flow.set_timesteps(timesteps=[1200.0, 500.0])
    with pytest.raises(ValueError, match="sigmas must lie in"):
        flow.set_timesteps(sigmas=[0.5, -0.1])
    flow.set_timesteps(sigmas=[1.0, 0.5])  # times in [0, 1], as diffusers' flow pipelines pass them
    assert len(flow.timesteps) == 2


def test_latent_edits_between_steps_are_fed_back():
    """Pipelines may change the latents between steps: inpainting blends the known region in after every step,
    and ``callback_on_step_end`` may return edited latents. HastenScheduler takes the edited latents as the
    state at that grid point (keeping the multistep history), so mirroring DPM-Solver++ it gives the
    pipeline's own results; singlestep solvers refuse edits between their inner evaluations."""
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    import tiny_pipelines

    base, prompts = tiny_pipelines.stable_diffusion()
    base.set_progress_bar_config(disable=True)
    common = {**prompts, "num_inference_steps": 6, "guidance_scale": 3.0, "height": 16, "width": 16,
              "output_type": "latent"}  # fmt: skip

    def damp(pipe, i, t, tensors):  # a global edit: every step's latents scaled by 0.9
        return {"latents": tensors["latents"] * 0.9}

    def edited():
        return base(**common, generator=torch.Generator().manual_seed(0), callback_on_step_end=damp).images

    theirs = edited()
    base.scheduler = HastenScheduler.from_config(base.scheduler.config, solver="dpmpp_2m")
    torch.testing.assert_close(edited(), theirs, rtol=0, atol=1e-4)
    assert len(base.scheduler._edits) == 5  # the edit after the last step comes after the last step() call
    base.scheduler._record_edit = lambda sample, call: None  # what ignoring the edits gives
    assert (edited() - theirs).abs().max() > 0.01

    pipe = diffusers.StableDiffusionInpaintPipeline(**{**base.components, "scheduler": base.scheduler})
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base.scheduler.config.source_config)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255  # repaint the right half

    def inpaint():
        return pipe(**common, image=image, mask_image=Image.fromarray(mask), strength=1.0,
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    theirs = inpaint()
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    torch.testing.assert_close(inpaint(), theirs, rtol=0, atol=1e-4)
    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2s", schedule="karras")
    with pytest.raises(ValueError, match="edited between the inner evaluations"):
        inpaint()
