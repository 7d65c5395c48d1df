"""``HastenScheduler``: every hasten solver, grid and plan as a diffusers scheduler.

    pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="unipc", schedule="karras")

diffusers pipelines drive a scheduler one model call at a time (``step(model_output, t, sample)``), while a
hasten solver drives the model itself. The scheduler bridges the two by *replay*: it keeps the model
outputs it has been given and, at each ``step``, reruns the solver from the start on a denoiser that
answers from those outputs, stopping where the solver asks for the next model call; the state there is the
``prev_sample`` the pipeline feeds to its model next. The solver's own arithmetic runs unchanged (so the
samples are exactly what ``hasten.sample`` gives on the same model), a singlestep solver's intermediate
evaluations become entries of ``timesteps`` of their own, and the cost is a few tensor operations per
earlier step, small next to a model call.

Spaces: pipelines hold ``x_t = alpha_t x0 + sigma_t eps`` (DDPM-type) or ``x_t = (1 - t) x0 + t eps``
(flow matching), hasten integrates the VE state ``x = x_t / alpha_t``; the scheduler converts at the
boundary. The model output is turned into the denoised estimate by hasten's adapters for the config's
``prediction_type`` (``epsilon``, ``v_prediction``, ``sample`` or ``flow_prediction``).

Reference: the diffusers scheduler interface (``SchedulerMixin``, ``set_timesteps``/``step``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor, nn

from .._context import current_run
from ..models.adapters import EpsDenoiser, FlowDenoiser, VDenoiser, X0Denoiser
from ..schedules import FlowMatching, VPDiscrete, get_sigmas
from ..schedules.grids import from_sigmas
from ..solvers import get_solver, sample
from ..solvers.euler import Euler, EulerAncestral, ancestral_levels
from .sources import audit, final_of, processing_of

__all__ = ["HastenScheduler"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
SCHEDULES_NATIVE = "native"  # the timesteps the pipeline's own scheduler would use
FLOW_T_MAX = 1.0 - 1e-6  # where a flow grid starting at t = 1 starts here (the model still sees t = 1)


class _NextCall(Exception):
    """Raised by the replay denoiser where the solver asks for a model output not given yet."""

    def __init__(self, x: Tensor, sigma: Tensor) -> None:
        super().__init__()
        self.x, self.sigma = x, sigma


class HastenScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running a hasten solver (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The model's training schedule, as in diffusers' DDPM-type schedulers.
        prediction_type: What the model predicts: ``epsilon``, ``v_prediction``, ``sample`` or
            ``flow_prediction`` (velocity of a flow-matching model, SD3/Flux orientation).
        timestep_spacing, steps_offset: diffusers' spacing rules, used by ``schedule="native"`` when the
            source scheduler is unknown.
        solver: Any hasten solver name (``hasten.available()``); ``solver_options`` its options. ``from_config`` and
            ``from_scheduler`` default it to the solver that mirrors the source's algorithm (``sources.SOURCES``).
        schedule: ``"native"`` (the timesteps of the scheduler this one replaces, from ``source``) or a hasten
            discretisation (``auto``, ``karras``, ``logsnr``, ``time_uniform``, ``trailing``, ...).
        final_sigma: ``"zero"`` (the last step lands on clean data) or ``"sigma_min"`` (stops at the
            smallest trained noise level, diffusers' ``final_sigmas_type="sigma_min"``).
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            Flow matching's resolution shift (SD3: fixed ``shift``; Flux: ``mu`` passed to ``set_timesteps``).
        source, source_config: The scheduler this one was made from and its full config (``from_config``
            records both; ``schedule="native"`` rebuilds its timesteps from them, and its ``clip_sample``,
            ``thresholding`` and ``variance_type`` are applied to every model output).
        seed: Seed of the noise stochastic solvers draw (when ``step`` gets no generator).
        use_flow_sigmas: Tells Flux-type pipelines not to pass sigmas of their own; set automatically for a flow
            model on a hasten grid. Sigmas a pipeline does pass are shifted on arrival, as diffusers' flow
            schedulers shift them (on ``schedule="native"`` by the replaced scheduler itself).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
        solver: str = "dpmpp_2m",
        solver_options: dict[str, Any] | None = None,
        schedule: str = SCHEDULES_NATIVE,
        final_sigma: str = "zero",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        source: str | None = None,
        source_config: dict[str, Any] | None = None,
        seed: int = 0,
        use_flow_sigmas: bool = False,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
        if final_sigma not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
        try:  # a bad name or option fails now, naming what is allowed
            get_solver(solver, **(solver_options or {}))
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        self.flow = prediction_type == "flow_prediction"
        if self.flow and schedule != SCHEDULES_NATIVE and not use_flow_sigmas:
            # Flux-type pipelines pass sigmas of their own unless the scheduler says it makes its own grid
            self.register_to_config(use_flow_sigmas=True)
        if self.flow:  # diffusers' flow grids start at t = 1 (pure noise); hasten's VE state needs t < 1
            self.noise_schedule = FlowMatching(shift=shift, t_max=FLOW_T_MAX)
        elif trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64)
            self.noise_schedule = VPDiscrete(torch.cumprod(1.0 - betas, dim=0))
        else:
            self.noise_schedule = VPDiscrete.from_betas(
                beta_schedule, num_train_timesteps, beta_start, beta_end, zero_terminal_snr=rescale_betas_zero_snr
            )
        self._adapter = _adapter(prediction_type, self.noise_schedule, num_train_timesteps)
        self._processing = processing_of(source_config or {})
        # the attributes pipelines and users read, as diffusers' DDPM-type schedulers have them before set_timesteps
        if isinstance(self.noise_schedule, VPDiscrete):
            self.alphas_cumprod = self.noise_schedule.alphas_cumprod.to(torch.float32)
            self.alphas = self.alphas_cumprod / torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
            self.betas = 1.0 - self.alphas
        else:  # flow matching has no betas
            self.alphas_cumprod = self.alphas = self.betas = None
        first = num_train_timesteps if self.flow else num_train_timesteps - 1  # flow: t = 1 is pure noise
        self.timesteps = torch.arange(first, first - num_train_timesteps, -1, dtype=torch.float32)
        self.sigmas = self._public_sigmas(self._ve_sigma(self.timesteps.double()))
        self.init_noise_sigma = torch.tensor(1.0)
        self.num_inference_steps: int | None = None
        self._plan = None
        self._grid: Tensor | None = None
        self._times_at: dict[float, float] = {}
        self._begin_index: int | None = None
        self._reset()

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """From another scheduler's config (``pipe.scheduler.config``): keeps the training schedule and the
        prediction type, records the source scheduler (for ``schedule="native"``), mirrors its algorithm with
        the hasten solver ``sources.SOURCES`` maps it to, and takes hasten's options (``solver=``, ``schedule=``,
        ``solver_options=``, ``final_sigma=``) as keyword arguments; ``solver=`` replaces the mirrored algorithm.

        Every field of the source config is honoured or refused with an error naming it (``sources.audit``):
        its values carry over, defaults included (diffusers would otherwise swap in this class's defaults for
        them, e.g. another ``timestep_spacing``)."""
        config = dict(config or {})
        config.pop("_use_default_values", None)
        name = config.pop("_class_name", None)
        version = config.pop("_diffusers_version", None)
        candidates = [name] if name else _infer_source(config)
        if candidates and cls.__name__ not in candidates:
            source_config = {k: v for k, v in config.items() if not k.startswith("_")}
            source = kwargs.setdefault("source", _pick_source(candidates, source_config))
            kwargs.setdefault("source_config", source_config)
            if all("Flow" in c for c in candidates) or config.get("use_flow_sigmas"):
                kwargs.setdefault("prediction_type", "flow_prediction")
                kwargs.setdefault("shift", config.get("shift", config.get("flow_shift", 1.0)))
            if source is None:
                if "solver" not in kwargs:
                    found = ", ".join(candidates)
                    raise ValueError(f"this config fits several diffusers schedulers ({found}) that differ; use "
                                     "HastenScheduler.from_scheduler(scheduler) or pass solver=")  # fmt: skip
            else:
                mirror = audit(source, {**source_config, **kwargs}, solver_given="solver" in kwargs)
                if mirror is not None:
                    kwargs["solver"], options = mirror
                    kwargs["solver_options"] = {**options, **(kwargs.get("solver_options") or {})}
            kwargs.setdefault("final_sigma", final_of(source_config))
        elif name is not None:
            config["_class_name"] = name  # our own saved config: diffusers checks the name on loading
        own = set(inspect.signature(cls.__init__).parameters)
        # the source's other options live in source_config
        config = {k: v for k, v in config.items() if k in own or k == "_class_name"}
        if version is not None:
            config["_diffusers_version"] = version
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_scheduler(cls, scheduler: Any, **kwargs: Any) -> HastenScheduler:
        """From a scheduler object (``pipe.scheduler``): like :meth:`from_config`, and the source class is
        known for certain (``schedule="native"`` then reproduces its timesteps exactly)."""
        return cls.from_config({**scheduler.config, "_class_name": type(scheduler).__name__}, **kwargs)

    @classmethod
    def from_plan(cls, plan: Any, *, model: Any = None, force: bool = False, **config: Any) -> HastenScheduler:
        """A scheduler that runs a tuned plan (its grid and per-step solvers); ``set_timesteps`` then takes no
        step count (or the plan's).

        A plan is made for one model's weights: with ``model`` (a :class:`hasten.LoadedModel`) the plan is
        checked against it (refused for other weights unless ``force``) and options it needs from the model
        are filled in (DPM-Solver-v3's statistics); without it, pass them in ``solver_options``."""
        if getattr(plan, "skip", None) is not None:
            raise ValueError(
                "this plan skips blocks per step (a per-step architecture), which a diffusers pipeline's loop cannot "
                "apply; sample it with hasten.generate(model, plan=plan), or use a plan without skips"
            )
        if getattr(plan, "assembly", None) is not None:
            raise ValueError(
                "this plan runs a student network at some steps (model assembly), which a scheduler cannot do (the "
                "pipeline calls its own network); sample it with hasten.generate(model, plan=plan)"
            )
        if model is not None:
            from ..generate import options_for_model

            plan.check_model(model.info.name, model.fingerprint, force=force)
            resolved = options_for_model(plan.solver, plan.options, model, plan.guidance)
            config["solver_options"] = {**resolved, **(config.get("solver_options") or {})}
        scheduler = cls(solver=plan.solver, **config)
        scheduler._plan = plan
        return scheduler

    # -- the interface pipelines call ------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | Tensor | None = None,
        sigmas: list[float] | Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid (from a step count, explicit ``timesteps`` or ``sigmas``, or the plan) and list
        one timestep per model call the solver will make."""
        self._grid = self._make_grid(num_inference_steps, timesteps, sigmas, mu)
        options = self.config.solver_options or {}
        self._solver = self._plan.build_solver(**options) if self._plan is not None else get_solver(
            self.config.solver, **options)  # fmt: skip
        calls = _model_calls(self._solver, self._grid)
        self._call_sigmas = [sigma for sigma, _ in calls]
        self._call_steps = [step for _, step in calls]
        self.num_inference_steps = len(self._grid) - 1
        per_step = len(calls) / self.num_inference_steps
        self.order = int(per_step) if per_step == int(per_step) else 1
        call_sigmas = torch.tensor(self._call_sigmas, dtype=torch.float64)
        self.timesteps = self._model_time(call_sigmas).to(device=device, dtype=torch.float32)
        self.sigmas = self._public_sigmas(torch.cat([call_sigmas, self._grid[-1:]])).to(device)
        self.init_noise_sigma = torch.tensor(self._start_scale(float(self._grid[0])))
        self._begin_index = None  # as diffusers: img2img pipelines set it after set_timesteps
        self._reset()

    def _public_sigmas(self, ve_sigmas: Tensor) -> Tensor:
        """``sigmas`` as diffusers' schedulers expose them: VE sigmas (DDPM-type), flow times ``t`` (flow)."""
        return (ve_sigmas / (1 + ve_sigmas) if self.flow else ve_sigmas).to(torch.float32)

    def _start_scale(self, sigma: float) -> float:
        """The scale of unit noise that makes the first model input (``x_T``): 1, except where the replaced
        scheduler keeps sigma-scaled latents (Euler, Heun, ...) and starts them at ``sigma_max``: its model
        then sees ``sigma_max / sqrt(sigma_max^2 + 1)`` times the noise (float32, as diffusers computes it).
        The same rule on every grid, so explicit timesteps give what the native grid gives."""
        if self.flow or not self._sigma_scaled_source():
            return 1.0
        spacing = (self.config.source_config or {}).get("timestep_spacing", "linspace")
        if spacing not in ("linspace", "trailing"):
            return 1.0  # diffusers starts those at sqrt(sigma_max^2 + 1) * noise and scales it back to 1
        s = torch.tensor(sigma, dtype=torch.float32)
        return float(s / (s**2 + 1) ** 0.5)

    def _sigma_scaled_source(self) -> bool:
        """Whether the replaced scheduler's ``scale_model_input`` divides (its latents are ``x / alpha``)."""
        source_cls = self._source_class()
        if source_cls is None:
            return False
        source = source_cls.from_config(_source_config(self.config))
        source.set_timesteps(10)
        ones = torch.ones(1)
        return not torch.equal(source.scale_model_input(ones, source.timesteps[0]), ones)

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Pipelines feed ``x_t`` itself to the model: nothing to scale."""
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at the ``begin_index``-th model call (img2img); it must be the first call of a grid step."""
        self._begin_index = begin_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        return None if not self._outputs else self._entry + len(self._outputs)

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
        **euler_options: Any,
    ) -> SchedulerOutput | tuple[Tensor]:
        """Take the model output for the call at ``timestep`` and return the sample for the next call.

        The arguments are those of diffusers' ``DDIMScheduler.step`` (``eta`` 4th), so DDIM loops and pipelines
        that pass them run unchanged:

        * ``eta``: DDIM's noise fraction, for the ``ddim`` solver (it replaces the solver's ``eta`` for the
          run). Other solvers take ``eta=0`` (the value pipelines pass to every scheduler; diffusers' other
          schedulers ignore it) and refuse any other value.
        * ``use_clipped_model_output``: with ``clip_sample``/``thresholding`` under the ``ddim`` solver, take
          the noise implied by the clipped ``x0`` (otherwise DDIM keeps the model's noise, as diffusers does).
        * ``generator``: ancestral solvers (``ddpm``, ``ddim`` with eta, ``euler_ancestral``) draw each step's
          noise from it as diffusers draws it (pass it to every step); other stochastic solvers seed their
          replay generator from it on the first call.
        * ``variance_noise``: refused (the replay draws its own noise).
        * Euler's ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``: taken at their defaults only.

        A loop that enters mid-schedule without ``set_begin_index`` is located from ``timestep``, as diffusers
        locates it; every later ``timestep`` must be the next one of ``timesteps``.
        """
        if isinstance(eta, torch.Generator):  # a DDPM-style call passing the generator 4th
            eta, generator = None, eta
        _check_euler_options(euler_options)
        if variance_noise is not None:
            raise ValueError("variance_noise is not supported: HastenScheduler draws the noise of stochastic "
                             "solvers itself; pass generator= instead")  # fmt: skip
        if self._grid is None:
            if self.config.source != "DDPMScheduler":
                raise RuntimeError("call set_timesteps(...) before step()")
            self.set_timesteps(self.config.num_train_timesteps)  # DDPM runs every training timestep by default
        t = float(torch.as_tensor(timestep).flatten()[0])
        if not self._outputs:
            self._start(t, sample, eta, use_clipped_model_output, generator)
        begin = self._entry
        call = begin + len(self._outputs)
        if call >= len(self._call_sigmas):
            raise RuntimeError(f"step() called more often than the {len(self._call_sigmas)} model calls of the grid")
        expected = float(self.timesteps[call])
        if not math.isclose(t, expected, rel_tol=1e-5, abs_tol=1e-3):
            raise ValueError(f"step() got timestep {t:g}, but the next model call of this schedule is at "
                             f"{expected:g} (call {call} of {len(self._call_sigmas)})")  # fmt: skip
        if eta is not None and self._eta is not None and eta != self._eta:
            raise ValueError(f"eta changed from {self._eta} to {eta} within a run")
        if self._returned is not None and sample is not self._returned and not torch.equal(sample, self._returned):
            self._record_edit(sample, call)
        self._outputs.append(self._processing.model_output(model_output, sample).detach())
        if self._step_noise:
            self._draw_step_noise(call, model_output, generator)
        x, sigma = self._replay()
        alpha = self.noise_schedule.alpha_from_ve_sigma(sigma) if sigma > 0 else 1.0
        prev = (x * float(alpha)).to(sample.dtype)
        self._returned = prev
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _draw_step_noise(self, call: int, model_output: Tensor, generator: torch.Generator | None) -> None:
        """Draw this step's noise from the pipeline's generator (``randn`` of the model output's shape and dtype,
        diffusers' draw) where the ancestral step adds any."""
        if generator is None:
            raise ValueError("this run draws its noise from the generator step() got first; pass it to every step()")
        step = self._call_steps[call]
        _, sigma_up = ancestral_levels(float(self._grid[step]), float(self._grid[step + 1]), self._run_solver.eta)
        if sigma_up > 0:
            z = torch.randn(model_output.shape, generator=generator, device=generator.device, dtype=model_output.dtype)
            self._noises[step - self._start_step] = z.to(model_output.device, torch.float64) * (
                self._noise_scale * sigma_up
            )

    def _start(self, t: float, sample: Tensor, eta: float | None, use_clipped: bool, generator: Any) -> None:
        """First ``step`` of a run: where it enters, the starting state, the solver's eta and the noise seed."""
        begin = self._begin_index
        if begin is None:  # locate the entry from the timestep (a loop that starts mid-schedule)
            matches = [i for i, ts in enumerate(self.timesteps.tolist()) if math.isclose(ts, t, rel_tol=1e-5,
                                                                                         abs_tol=1e-3)]  # fmt: skip
            if not matches:
                raise ValueError(f"timestep {t:g} is not one of this schedule's timesteps "
                                 f"{[round(v, 3) for v in self.timesteps.tolist()]}")  # fmt: skip
            begin = matches[0]
        if begin and self._call_steps[begin - 1] == self._call_steps[begin]:
            raise ValueError(f"begin index {begin} is not the first model call of a grid step")
        self._entry = begin
        sigma0 = self._call_sigmas[begin]
        # The replay integrates in float64: a few latent-sized tensors, and it lets flow grids start a
        # hair below t = 1 (VE sigma 1e6) without cancellation.
        self._x_start = sample.to(torch.float64) / float(self.noise_schedule.alpha_from_ve_sigma(sigma0))
        self._start_step = self._call_steps[begin]
        self._eta = eta
        self._run_solver = self._solver
        if eta is not None and eta != getattr(self._solver, "eta", None):
            if self.config.solver != "ddim" or not isinstance(self._solver, EulerAncestral):
                if eta != 0:
                    raise ValueError(
                        f"eta={eta} applies to the 'ddim' solver only (diffusers' DDIMScheduler); "
                        f"this scheduler runs {self.config.solver!r}: set its noise in solver_options"
                    )
            else:
                self._run_solver = dataclasses.replace(self._solver, eta=float(eta))
        # DDIM clips x0 but keeps the model's noise (unless use_clipped_model_output): see _replay
        self._keep_noise = (self._processing.changes_x0 and not use_clipped and self.config.source == "DDIMScheduler"
                            and isinstance(self._run_solver, (Euler, EulerAncestral)))  # fmt: skip
        # Ancestral solvers (DDPM, DDIM with eta, Euler ancestral) take one noise draw per step from the
        # pipeline's generator, drawn as diffusers draws it; other stochastic solvers draw from a replay
        # generator seeded from it.
        self._step_noise = (
            generator is not None and isinstance(self._run_solver, EulerAncestral) and self._run_solver.eta > 0
        )
        if self._step_noise:
            self._noise_scale = self._run_solver.s_noise
            self._run_solver = dataclasses.replace(self._run_solver, s_noise=0.0)  # the replay adds the stored draws
        elif generator is not None:
            self._noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

    def _record_edit(self, sample: Tensor, call: int) -> None:
        """The pipeline changed the latents since the last ``step`` (inpainting blends in the known region):
        the replay puts the edited state in at the grid point it belongs to, keeping the solver's history."""
        step = self._call_steps[call]
        if self._call_steps[call - 1] == step:
            raise ValueError(
                "the latents were edited between the inner evaluations of a step; edits (inpainting blending) are "
                "supported at grid points, i.e. with multistep solvers or between the steps of a singlestep one"
            )
        alpha = float(self.noise_schedule.alpha_from_ve_sigma(self._grid[step]))
        self._edits[step - 1 - self._start_step] = sample.detach().to(torch.float64) / alpha

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_t`` at the given model timesteps (img2img): ``alpha_t x0 + sigma_t eps`` (flow: ``(1-t) x0 + t eps``)."""
        sigma = self._ve_sigma(torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu())
        alpha = self.noise_schedule.alpha_from_ve_sigma(sigma)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = alpha.reshape(shape).to(original_samples.device, torch.float32)
        s = (alpha * sigma).reshape(shape).to(original_samples.device, torch.float32)
        return (a * original_samples.float() + s * noise.float()).to(original_samples.dtype)

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor) -> Tensor:
        """Flow matching's forward process at ``timestep`` (what SD3/Flux img2img pipelines call)."""
        return self.add_noise(sample, noise, torch.as_tensor(timestep))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- internals ---------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._outputs: list[Tensor] = []
        self._edits: dict[int, Tensor] = {}  # replay loop step -> VE state the pipeline set after it
        self._returned: Tensor | None = None
        self._x_start: Tensor | None = None
        self._entry = 0  # the model call this run entered at (set_begin_index, or located from the timestep)
        self._eta: float | None = None
        self._run_solver = getattr(self, "_solver", None)
        self._keep_noise = False
        self._step_noise = False
        self._noises: dict[int, Tensor] = {}  # replay loop step -> noise the pipeline's generator gave it
        self._noise_scale = 1.0
        self._noise_seed = self.config.seed

    def _model_time(self, sigma: Tensor) -> Tensor:
        if self._times_at:  # levels of a timestep grid: the model sees those timesteps (float32 probe levels)
            times = [_nearest(self._times_at, level) for level in sigma.tolist()]
            if all(time is not None for time in times):
                return torch.tensor(times, dtype=torch.float64)
        t = self.noise_schedule.t_from_ve_sigma(sigma)
        t = t * self.config.num_train_timesteps if self.flow else t
        # integer timesteps come back through float64 round trips a hair off (flow: the start at FLOW_T_MAX
        # is t = 1 for the model); models see the integer
        tolerance = 2e-3 if self.flow else 1e-6
        return torch.where((t - t.round()).abs() < tolerance, t.round(), t)

    def _ve_sigma(self, model_time: Tensor) -> Tensor:
        t = model_time / self.config.num_train_timesteps if self.flow else model_time
        if self.flow:
            t = t.clamp(max=self.noise_schedule.t_max)
        return self.noise_schedule.ve_sigma(t)

    def _make_grid(self, n: int | None, timesteps: Any, sigmas: Any, mu: float | None) -> Tensor:
        self._times_at: dict[float, float] = {}  # model times of grid levels where they are not the schedule's
        if self._plan is not None:
            if n is not None and n != self._plan.num_steps:
                raise ValueError(f"this scheduler runs a {self._plan.num_steps}-step plan; got num_inference_steps={n}")
            return from_sigmas(self._plan.sigmas)
        if sum(v is not None for v in (n, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        schedule = self.noise_schedule
        if self.flow and self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting=True needs mu (the pipeline's resolution shift)")
            schedule = FlowMatching(shift=math.exp(mu), t_max=FLOW_T_MAX)
            self.noise_schedule = schedule
        final = "zero" if self.config.final_sigma == "zero" else "sigma_min"
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
            top = self.config.num_train_timesteps
            if self.flow and not (ts.min() >= 0 and ts.max() <= top):  # VP ranges are checked by from_timesteps
                raise ValueError(f"timesteps must lie in [0, {top}] for a flow-matching model, got {ts.tolist()}")
            if self.flow:
                return from_sigmas(_finish(self._ve_sigma(ts), final, schedule))
            grid = _timestep_grid(schedule, ts, final)
            self._times_at = dict(zip(grid[: len(ts)].tolist(), ts.tolist(), strict=True))  # exact model times
            return grid
        if sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            top = float(schedule.sigma_max) * (1 + 1e-6)
            if not (s.min() >= 0 and (s.max() <= top or (self.flow and s.max() <= 1))):
                raise ValueError(f"sigmas must lie in [0, {float(schedule.sigma_max):.6g}] (the model's trained noise "
                                 f"levels), got {s.tolist()}")  # fmt: skip
            if self.flow and s.max() <= 1:  # diffusers' flow "sigmas" are times t in [0, 1], shifted on arrival
                if self.config.schedule == SCHEDULES_NATIVE and self._source_class() is not None:
                    return self._native_grid(None, mu, final, sigmas=s)  # Flux passes its own, for the source to shift
                s = schedule.ve_sigma(schedule.time_shift(s).clamp(max=schedule.t_max))
            return from_sigmas(_finish(s, final, schedule))
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if self.config.schedule == SCHEDULES_NATIVE:
            return self._native_grid(n, mu, final)
        grid = get_sigmas(self.config.schedule, n, schedule)
        if final == "sigma_min" and float(grid[-1]) == 0.0:
            grid = torch.cat([grid[:-1][grid[:-1] > schedule.sigma_min], grid.new_tensor([schedule.sigma_min])])
        return from_sigmas(grid)

    def _source_class(self) -> Any:
        """The diffusers scheduler class this one replaces, if known."""
        import diffusers

        source_cls = getattr(diffusers, self.config.source or "", None)
        return None if source_cls is None or source_cls is HastenScheduler else source_cls

    def _native_grid(self, n: int | None, mu: float | None, final: str, sigmas: Tensor | None = None) -> Tensor:
        """The grid of the scheduler this one replaces (its own ``set_timesteps``, with the pipeline's ``sigmas``
        where it passes them), in VE sigmas."""
        source_cls = self._source_class()
        if source_cls is None:
            from ..schedules.grids import discrete_timesteps

            if self.flow:
                return get_sigmas("auto", n, self.noise_schedule)
            ts = discrete_timesteps(n, self.config.num_train_timesteps, self.config.timestep_spacing,
                                    steps_offset=self.config.steps_offset)  # fmt: skip
            return _timestep_grid(self.noise_schedule, ts, final)
        source = source_cls.from_config(_source_config(self.config))
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:
            if "sigmas" not in inspect.signature(source.set_timesteps).parameters:
                raise ValueError(f"{source_cls.__name__} takes no explicit sigmas; pass num_inference_steps")
            kwargs["sigmas"] = sigmas.float().numpy()
        source.set_timesteps(n, **kwargs)
        if self.flow:
            t = source.sigmas.double().unique_consecutive()
            t = t[t > 0]
            return from_sigmas(_finish(self.noise_schedule.ve_sigma(t.clamp(max=self.noise_schedule.t_max)), final,
                                       self.noise_schedule))  # fmt: skip
        ts = source.timesteps.double().unique_consecutive()
        if source_cls.__name__ == "PNDMScheduler":  # its timesteps include the PRK warm-up's midpoints
            ts = torch.as_tensor(source._timesteps, dtype=torch.float64).flip(0)
        grid = _timestep_grid(self.noise_schedule, ts, final)
        self._times_at = dict(zip(grid[: len(ts)].tolist(), ts.tolist(), strict=True))  # the model sees these
        levels = getattr(source, "sigmas", None)
        if levels is None:
            return grid
        # Karras, exponential, beta and Lu grids put the source's sigmas between its (rounded) timesteps: then
        # its sigmas are the grid and its timesteps what the model sees at them.
        levels = levels.double()[:-1].unique_consecutive()  # without the source's final level: ``final`` sets it
        if len(levels) != len(ts) or torch.allclose(levels, grid[: len(ts)], rtol=1e-5, atol=0):
            return grid
        self._times_at = dict(zip(levels.tolist(), ts.tolist(), strict=True))
        return from_sigmas(_finish(levels, final, self.noise_schedule))

    def _replay(self) -> tuple[Tensor, float]:
        """Rerun the solver on the outputs given so far; the state where it asks for the next one."""
        outputs, adapter, count = self._outputs, self._adapter, [0]
        processing, first = self._processing, self._entry

        def denoiser(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
            j = count[0]
            if j >= len(outputs):
                raise _NextCall(x, sigma)
            count[0] += 1
            denoised = adapter.denoised_from_output(outputs[j].to(x.device, x.dtype), x, sigma)
            if not processing.changes_x0:
                return denoised
            clipped = processing.x0(denoised)
            if not self._keep_noise:
                return clipped
            # DDIM's update is x' = x0_clipped + sigma_down * eps with the model's own eps = (x - x0) / sigma;
            # the Euler step D + (sigma_down / sigma)(x - D) gives exactly that for this D.
            level = float(sigma.flatten()[0])
            level_next = float(self._grid[self._call_steps[first + j] + 1])
            sigma_down, _ = ancestral_levels(level, level_next, getattr(self._run_solver, "eta", 0.0))
            r = sigma_down / level
            return (clipped - r * denoised) / (1 - r)

        def edits(i: int, sigma: float, x: Tensor) -> Tensor | None:
            if i in self._edits:
                return self._edits[i]
            return x + self._noises[i].to(x.device) if i in self._noises else None

        generator = torch.Generator(device=self._x_start.device).manual_seed(self._noise_seed)
        try:
            x = sample(denoiser, self._x_start, self._grid[self._start_step :], self._run_solver, generator=generator,
                       callback=edits)  # fmt: skip
        except _NextCall as call:
            return call.x, float(call.sigma.flatten()[0])
        return x, float(self._grid[-1])


def _finish(levels: Tensor, final: str, schedule: Any) -> Tensor:
    """Append the final level (0, or the schedule's smallest) unless the list already ends there."""
    if float(levels[-1]) == 0.0:
        return levels
    end = 0.0 if final == "zero" else schedule.sigma_min
    return levels if float(levels[-1]) <= end else torch.cat([levels, levels.new_tensor([end])])


def _timestep_grid(schedule: Any, timesteps: Tensor, final: str) -> Tensor:
    """VE levels at the model times ``timesteps``, then the final level: every timestep keeps its model call,
    and ``final="sigma_min"`` adds a step onto the smallest trained level (unless the last one is already it)."""
    ts = timesteps.double().flatten()
    if torch.any(ts < schedule.t_min - 1e-9) or torch.any(ts > schedule.t_max + 1e-9):
        raise ValueError(f"timesteps must lie in [{schedule.t_min}, {schedule.t_max}] for {schedule!r}")
    return from_sigmas(_finish(schedule.ve_sigma(ts), final, schedule))


def _nearest(times_at: dict[float, float], level: float) -> float | None:
    """The timestep recorded for ``level`` (to float32 precision), or None."""
    for key, time in times_at.items():
        if abs(key - level) <= 1e-6 * key:
            return time
    return None


_EULER_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def _check_euler_options(options: dict[str, Any]) -> None:
    """``step`` takes the extra arguments of diffusers' Euler scheduler at their defaults only (no churn)."""
    for name, value in options.items():
        if name not in _EULER_DEFAULTS:
            raise TypeError(f"step() got an unexpected argument {name!r}")
        if float(value) != _EULER_DEFAULTS[name]:
            raise ValueError(f"step(): {name}={value} is not supported (only {_EULER_DEFAULTS[name]}); use a "
                             f"stochastic solver such as solver='euler_ancestral' for noise")  # fmt: skip


def _source_config(config: Any) -> dict[str, Any]:
    """The replaced scheduler's own config (recorded by ``from_config``), else the shared fields of ours."""
    return dict(config.source_config or {k: v for k, v in dict(config).items() if not k.startswith("_")})


def _pick_source(candidates: list[str], config: dict[str, Any]) -> str | None:
    """One of the candidate classes when they all give the same timesteps (DDIM and its parallel twin do);
    None when they disagree (then ``schedule="native"`` falls back to ``timestep_spacing``)."""
    import diffusers

    if len(candidates) == 1:
        return candidates[0]
    grids = []
    for name in candidates:
        try:
            scheduler = getattr(diffusers, name).from_config(config)
            scheduler.set_timesteps(10)
            grids.append(scheduler.timesteps.double().tolist())
        except Exception:
            return None
    return min(candidates, key=len) if all(g == grids[0] for g in grids) else None  # the plain name


def _infer_source(config: dict[str, Any]) -> list[str]:
    """The diffusers scheduler classes whose options are exactly the keys of ``config`` (a live
    ``pipe.scheduler.config`` does not name its class; a few classes share the same options)."""
    import diffusers

    keys = {k for k in config if not k.startswith("_")}
    found = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler") or name == HastenScheduler.__name__:
            continue
        try:
            params = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self", "kwargs"}
        except (TypeError, ValueError, ImportError, AttributeError):
            continue
        if params == keys:
            found.append(name)
    return found


@dataclasses.dataclass
class _Adapter:
    """Model output -> denoised VE estimate, through hasten's adapter for the prediction type."""

    denoiser: Any
    schedule: Any

    def denoised_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        alpha = self.schedule.alpha_from_ve_sigma(sigma).to(x.dtype)
        return self.denoiser.to_denoised(out.to(x.dtype), x, alpha * x, alpha, sigma)


def _adapter(prediction_type: str, schedule: Any, num_train_timesteps: int) -> _Adapter:
    network = nn.Identity()  # never called: only the output conversion is used
    cls = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser, "sample": X0Denoiser, "flow_prediction": FlowDenoiser}
    return _Adapter(cls[prediction_type](network, schedule), schedule)


def _probe_state(solver: Any) -> Tensor:
    """A zero state the solver accepts: one element, or the sample shape of per-pixel statistics (DPM-Solver-v3)."""
    for part in getattr(solver, "solvers", (solver,)):
        statistics = getattr(part, "statistics", None)
        if statistics is not None:
            shape = statistics().l.shape[1:]
            if len(shape):
                return torch.zeros(1, *shape)
    return torch.zeros(1, 1)


def _model_calls(solver: Any, grid: Tensor) -> list[tuple[float, int]]:
    """Every model call the solver makes on ``grid``: its noise level and the grid step it belongs to (a dry
    run on a zero state; the step is the one the sample loop publishes)."""
    seen: list[tuple[float, int]] = []

    def probe(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        run = current_run()
        seen.append((float(sigma.flatten()[0]), run.step.index if run is not None and run.step else 0))
        return torch.zeros_like(x)

    sample(probe, _probe_state(solver), grid, solver, generator=torch.Generator().manual_seed(0))
    return seen
