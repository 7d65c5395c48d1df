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
from ..schedules.grids import from_sigmas, from_timesteps
from ..solvers import get_solver, sample

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
        solver: Any hasten solver name (``hasten.available()``); ``solver_options`` its options.
        schedule: ``"native"`` (the timesteps of the scheduler this one replaces, from ``source``) or a hasten
            discretisation (``auto``, ``karras``, ``logsnr``, ``time_uniform``, ``trailing``, ...).
        final_sigma: ``"zero"`` (the last step lands on clean data) or ``"sigma_min"`` (stops at the
            smallest trained noise level, diffusers' ``final_sigmas_type="sigma_min"``).
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            Flow matching's resolution shift (SD3: fixed ``shift``; Flux: ``mu`` passed to ``set_timesteps``).
        source, source_config: The scheduler this one was made from and its full config (``from_config``
            records both; ``schedule="native"`` rebuilds its timesteps from them).
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
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._plan = None
        self._reset()

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """From another scheduler's config (``pipe.scheduler.config``): keeps the training schedule and the
        prediction type, records the source scheduler (for ``schedule="native"``), and takes hasten's options
        (``solver=``, ``schedule=``, ``solver_options=``) as keyword arguments.

        Every value of the source config carries over, its defaults included (diffusers would otherwise
        swap in this class's defaults for them, e.g. another ``timestep_spacing``)."""
        config = dict(config or {})
        config.pop("_use_default_values", None)
        name = config.pop("_class_name", None)
        candidates = [name] if name else _infer_source(config)
        if candidates and cls.__name__ not in candidates:
            source_config = {k: v for k, v in config.items() if not k.startswith("_")}
            kwargs.setdefault("source", _pick_source(candidates, source_config))
            kwargs.setdefault("source_config", source_config)
            if all("Flow" in c for c in candidates) or config.get("use_flow_sigmas"):
                kwargs.setdefault("prediction_type", "flow_prediction")
                kwargs.setdefault("shift", config.get("shift", config.get("flow_shift", 1.0)))
        own = set(inspect.signature(cls.__init__).parameters)
        config = {k: v for k, v in config.items() if k in own}  # the source's other options live in source_config
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
        self.init_noise_sigma = 1.0  # pipelines start from unit noise x_T (a native grid may refine this)
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
        self.timesteps = self._model_time(torch.tensor(self._call_sigmas, dtype=torch.float64)).to(
            device=device, dtype=torch.float32)  # fmt: skip
        self._reset()

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
        return None if not self._outputs else len(self._outputs)

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> SchedulerOutput | tuple[Tensor]:
        """Take the model output for the current call and return the sample for the next one."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(...) before step()")
        begin = self._begin_index or 0
        if not self._outputs:
            sigma0 = self._call_sigmas[begin]
            # The replay integrates in float64: a few latent-sized tensors, and it lets flow grids start a
            # hair below t = 1 (VE sigma 1e6) without cancellation.
            self._x_start = sample.to(torch.float64) / float(self.noise_schedule.alpha_from_ve_sigma(sigma0))
            self._start_step = self._call_steps[begin]
            if begin and self._call_steps[begin - 1] == self._start_step:
                raise ValueError(f"begin index {begin} is not the first model call of a grid step")
            if generator is not None:
                self._noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        if begin + len(self._outputs) >= len(self._call_sigmas):
            raise RuntimeError(f"step() called more often than the {len(self._call_sigmas)} model calls of the grid")
        if self._returned is not None and sample is not self._returned and not torch.equal(sample, self._returned):
            self._record_edit(sample, begin + len(self._outputs))
        self._outputs.append(model_output.detach())
        x, sigma = self._replay()
        alpha = self.noise_schedule.alpha_from_ve_sigma(sigma) if sigma > 0 else 1.0
        prev = (x * float(alpha)).to(sample.dtype)
        self._returned = prev
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

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
        self._begin_index: int | None = getattr(self, "_begin_index", None)
        self._noise_seed = self.config.seed

    def _model_time(self, sigma: Tensor) -> Tensor:
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
            return from_timesteps(schedule, ts, final=final)
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
            return from_timesteps(self.noise_schedule, ts, final=final)
        source = source_cls.from_config(_source_config(self.config))
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:
            if "sigmas" not in inspect.signature(source.set_timesteps).parameters:
                raise ValueError(f"{source_cls.__name__} takes no explicit sigmas; pass num_inference_steps")
            kwargs["sigmas"] = sigmas.float().numpy()
        source.set_timesteps(n, **kwargs)
        # The first model input the source gives a pipeline's unit noise: Euler/Heun-type schedulers start
        # at sigma_max * noise (not sqrt(sigma_max^2 + 1) * noise) and scale it down; mirror that exactly.
        start = torch.ones(1) * getattr(source, "init_noise_sigma", 1.0)
        scaled = getattr(source, "scale_model_input", lambda x, t: x)(start, source.timesteps[0])
        self.init_noise_sigma = float(scaled)
        if self.flow:
            t = source.sigmas.double().unique_consecutive()
            t = t[t > 0]
            return from_sigmas(_finish(self.noise_schedule.ve_sigma(t.clamp(max=self.noise_schedule.t_max)), final,
                                       self.noise_schedule))  # fmt: skip
        ts = source.timesteps.double().unique_consecutive()
        return from_timesteps(self.noise_schedule, ts, final=final)

    def _replay(self) -> tuple[Tensor, float]:
        """Rerun the solver on the outputs given so far; the state where it asks for the next one."""
        outputs, adapter, count = self._outputs, self._adapter, [0]

        def denoiser(x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
            j = count[0]
            if j >= len(outputs):
                raise _NextCall(x, sigma)
            count[0] += 1
            return adapter.denoised_from_output(outputs[j].to(x.device, x.dtype), x, sigma)

        def edits(i: int, sigma: float, x: Tensor) -> Tensor | None:
            return self._edits.get(i)

        generator = torch.Generator(device=self._x_start.device).manual_seed(self._noise_seed)
        try:
            x = sample(denoiser, self._x_start, self._grid[self._start_step :], self._solver, generator=generator,
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


def _source_config(config: Any) -> dict[str, Any]:
    """The replaced scheduler's own config (recorded by ``from_config``), else the shared fields of ours."""
    data = dict(config.source_config or {k: v for k, v in dict(config).items() if not k.startswith("_")})
    if config.final_sigma == "sigma_min":
        data["final_sigmas_type"] = "sigma_min"
    return data


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
