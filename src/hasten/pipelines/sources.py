"""The diffusers schedulers ``HastenScheduler`` replaces: each class's algorithm as a hasten solver, and the
fate of every field of its config.

Every ``__init__`` parameter of a supported class belongs to exactly one group below, and a field hasten does
not reproduce is refused, with an error naming it, when it holds anything but the value hasten reproduces:

* ``TRAINING``: the model's noise schedule and output type, kept by ``HastenScheduler``'s own config.
* ``GRID``: what only shapes the source's timesteps; ``schedule="native"`` rebuilds them with the source's
  own ``set_timesteps``, so every value is honoured there (another ``schedule=`` replaces the grid on purpose).
* ``FINAL``: where the last step lands (``final_sigmas_type="sigma_min"``, ``set_alpha_to_one=False``:
  the smallest trained noise level); mapped to ``final_sigma``, on every grid.
* ``PROCESSING``: clipping and dynamic thresholding of the predicted ``x0``, applied to the model outputs
  before any solver sees them (``OutputProcessing``).
* ``OUTPUT``: ``variance_type``: a learned variance's half of the model output is dropped, as diffusers does.
* the class's ``algorithm`` fields: read by its mirror (the hasten solver ``from_scheduler`` picks when no
  ``solver=`` is given); an explicit ``solver=`` replaces them.

Reference: the ``__init__`` signatures and ``step`` methods of diffusers 0.42's schedulers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..models.guidance import DynamicThreshold

__all__ = ["SOURCES", "OutputProcessing", "audit", "final_of", "processing_of"]

TRAINING = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                      "prediction_type", "rescale_betas_zero_snr"})  # fmt: skip
GRID = frozenset({
    "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "sigma_min", "sigma_max", "interpolation_type", "use_lu_lambdas", "lambda_min_clipped", "use_flow_sigmas",
    "flow_shift", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "time_shift_type", "shift_terminal",
})  # fmt: skip
FINAL = frozenset({"final_sigmas_type", "set_alpha_to_one"})
PROCESSING = frozenset({"clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                        "sample_max_value"})  # fmt: skip
OUTPUT = frozenset({"variance_type"})
# Euler's "log_linear" sigmas lie between its timesteps and end above 0 while its final level is 0
_NO_NATIVE = {"interpolation_type": "linear"}
SHARED = TRAINING | GRID | FINAL | PROCESSING | OUTPUT


def _refuse(cls: str, field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{cls}: {field}={value!r} has no hasten equivalent ({allowed}); set it to that value or "
                      f"pass solver= to replace the scheduler's algorithm")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Source:
    """One diffusers scheduler class: the fields its algorithm reads, and the hasten solver that mirrors it."""

    algorithm: frozenset[str]
    mirror: Callable[[str, Mapping[str, Any]], tuple[str, dict[str, Any]]]


def _ddim(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return "ddim", {}  # its eta is a step() argument


def _ddpm(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_small_log"):
        # the same variance in log form; "fixed_large" (beta_t) and a learned variance are other samplers
        raise _refuse(cls, "variance_type", c["variance_type"], "'fixed_small' or 'fixed_small_log': the posterior")
    return "ddpm", {}


def _pndm(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("prediction_type", "epsilon") != "epsilon":
        # diffusers' PNDM combines the raw outputs of several steps, then converts the mix to noise at the
        # current step: PLMS only for noise prediction. hasten's plms converts each output first.
        raise _refuse(cls, "prediction_type", c["prediction_type"], "'epsilon' for PNDM's combination of outputs")
    return "plms", {"warmup": "heun" if c.get("skip_prk_steps", False) else "prk"}


def _order(cls: str, c: Mapping[str, Any], allowed: tuple[int, ...]) -> int:
    order = c.get("solver_order", 2)
    if order not in allowed:
        raise _refuse(cls, "solver_order", order, f"one of {allowed}")
    return order


def _dpm_multistep(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    order = _order(cls, c, (1, 2, 3))
    algorithm = c.get("algorithm_type", "dpmsolver++")
    kinds = {"dpmsolver++": ("data", 0.0), "dpmsolver": ("noise", 0.0), "sde-dpmsolver++": ("data", 1.0),
             "sde-dpmsolver": ("noise", 1.0)}  # fmt: skip
    if algorithm not in kinds:
        raise _refuse(cls, "algorithm_type", algorithm, f"one of {sorted(kinds)}")
    if c.get("euler_at_final", False):
        raise _refuse(cls, "euler_at_final", True, "False; the step onto sigma = 0 is first order anyway")
    prediction, eta = kinds[algorithm]
    options = {"order": order, "prediction": prediction, "solver_type": c.get("solver_type", "midpoint"),
               "lower_order_final": c.get("lower_order_final", True), "eta": eta,
               "third_order_term": "reference"}  # fmt: skip
    return "dpmpp_2m", options


def _dpm_singlestep(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    order = _order(cls, c, (1, 2, 3))
    algorithm = c.get("algorithm_type", "dpmsolver++")
    kinds = {"dpmsolver++": "data", "dpmsolver": "noise"}
    if algorithm not in kinds:
        raise _refuse(cls, "algorithm_type", algorithm, f"one of {sorted(kinds)}")
    options = {"order": order, "prediction": kinds[algorithm], "solver_type": c.get("solver_type", "midpoint"),
               "lower_order_final": c.get("lower_order_final", False), "intermediate": "grid"}  # fmt: skip
    return "dpmpp_2s", options


def _unipc(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    order = _order(cls, c, (1, 2, 3))
    if c.get("solver_type", "bh2") not in ("bh1", "bh2"):
        raise _refuse(cls, "solver_type", c["solver_type"], "'bh1' or 'bh2'")
    if list(c.get("disable_corrector") or []):
        raise _refuse(cls, "disable_corrector", c["disable_corrector"], "[]: hasten's corrector is on or off for a run")
    if c.get("solver_p") is not None:
        raise _refuse(cls, "solver_p", c["solver_p"], "None")
    options = {"order": order, "variant": c.get("solver_type", "bh2"),
               "prediction": "data" if c.get("predict_x0", True) else "noise",
               "lower_order_final": c.get("lower_order_final", True)}  # fmt: skip
    return "unipc", options


def _euler(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("timestep_type", "discrete") != "discrete":
        raise _refuse(cls, "timestep_type", c["timestep_type"], "'discrete': the model sees training timesteps")
    return "euler", {}


def _flow_euler(cls: str, c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("stochastic_sampling", False):
        raise _refuse(cls, "stochastic_sampling", True, "False; use solver='euler_ancestral' for a stochastic sampler")
    if c.get("invert_sigmas", False):
        raise _refuse(cls, "invert_sigmas", True, "False: hasten integrates from noise to data")
    return "euler", {}


SOURCES: dict[str, Source] = {
    "DDIMScheduler": Source(frozenset(), _ddim),
    "DDPMScheduler": Source(frozenset(), _ddpm),
    "PNDMScheduler": Source(frozenset({"skip_prk_steps"}), _pndm),
    "EulerDiscreteScheduler": Source(frozenset({"timestep_type"}), _euler),
    "EulerAncestralDiscreteScheduler": Source(frozenset(), lambda cls, c: ("euler_ancestral", {})),
    "HeunDiscreteScheduler": Source(frozenset(), lambda cls, c: ("heun", {})),
    "DPMSolverMultistepScheduler": Source(
        frozenset({"solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final"}),
        _dpm_multistep),
    "DPMSolverSinglestepScheduler": Source(
        frozenset({"solver_order", "algorithm_type", "solver_type", "lower_order_final"}), _dpm_singlestep),
    "UniPCMultistepScheduler": Source(
        frozenset({"solver_order", "solver_type", "predict_x0", "lower_order_final", "disable_corrector",
                   "solver_p"}), _unipc),
    "FlowMatchEulerDiscreteScheduler": Source(frozenset({"stochastic_sampling", "invert_sigmas"}), _flow_euler),
    "FlowMatchHeunDiscreteScheduler": Source(frozenset(), lambda cls, c: ("heun", {"space": "flow"})),
}  # fmt: skip


def init_fields(cls_name: str) -> list[str]:
    """The ``__init__`` parameters of a diffusers scheduler class (its config fields)."""
    import diffusers

    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    return [name for name in params if name not in ("self", "kwargs")]


def audit(cls_name: str, config: Mapping[str, Any], solver_given: bool) -> tuple[str, dict[str, Any]] | None:
    """Check every field of ``cls_name``'s ``config``; return the mirroring ``(solver, options)`` when no solver
    was given (None when one was).

    Raises:
        ValueError: a class with no mirror when no solver is given, or a field set to a value hasten does not
            reproduce (the message names the field).
    """
    source = SOURCES.get(cls_name)
    if source is None:
        if not solver_given:
            raise ValueError(f"HastenScheduler has no mirror of {cls_name}; pass solver= (hasten.available()) or "
                             f"use one of {', '.join(sorted(SOURCES))}")  # fmt: skip
        return None
    fields = set(init_fields(cls_name))
    unknown = fields - SHARED - source.algorithm
    if unknown:  # a diffusers release added a field this table does not know: refuse rather than drop it
        raise ValueError(f"{cls_name}: config field(s) {sorted(unknown)} are not known to HastenScheduler")
    for field, allowed in _NO_NATIVE.items():  # grid options schedule="native" does not rebuild
        if config.get(field, allowed) != allowed:
            raise ValueError(f"{cls_name}: {field}={config[field]!r} is not supported (only {allowed!r})")
    if config.get("thresholding") and config.get("prediction_type") == "flow_prediction":
        raise _refuse(cls_name, "thresholding", True, "False for flow models")
    if config.get("time_shift_type", "exponential") != "exponential" and config.get("use_dynamic_shifting"):
        raise _refuse(cls_name, "time_shift_type", config["time_shift_type"], "'exponential'")
    return None if solver_given else source.mirror(cls_name, config)


def final_of(config: Mapping[str, Any]) -> str:
    """``final_sigma`` of a source config: ``"sigma_min"`` where its last step stops at the smallest trained
    level (``final_sigmas_type="sigma_min"``; DDIM/PNDM ``set_alpha_to_one=False``), else ``"zero"``."""
    if config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {config['final_sigmas_type']!r}")
    if config.get("final_sigmas_type") == "sigma_min" or config.get("set_alpha_to_one") is False:
        return "sigma_min"
    return "zero"


@dataclasses.dataclass(frozen=True)
class OutputProcessing:
    """What a source scheduler does to the predicted ``x0`` before its update: dynamic thresholding
    (``thresholding``, diffusers' rule ``s = clamp(quantile(|x0|, ratio), 1, sample_max_value)``) or clipping to
    ``[-clip_sample_range, clip_sample_range]`` (``clip_sample``); thresholding wins where both are set, as
    in diffusers. ``learned_variance`` drops the variance half of the model output."""

    threshold: DynamicThreshold | None = None
    clip_range: float | None = None
    learned_variance: bool = False

    @property
    def changes_x0(self) -> bool:
        return self.threshold is not None or self.clip_range is not None

    def x0(self, x0: Tensor) -> Tensor:
        if self.threshold is not None:
            return self.threshold(x0)
        if self.clip_range is not None:
            return x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def model_output(self, output: Tensor, sample: Tensor) -> Tensor:
        if self.learned_variance and output.shape[1] > sample.shape[1]:
            return output[:, : sample.shape[1]]
        return output


def processing_of(config: Mapping[str, Any]) -> OutputProcessing:
    """The :class:`OutputProcessing` a source config asks for."""
    threshold = clip = None
    if config.get("thresholding", False):
        top = float(config.get("sample_max_value", 1.0))
        # diffusers clamps the scale to [1, sample_max_value]; torch's clamp gives sample_max_value where it is < 1
        threshold = DynamicThreshold(percentile=float(config.get("dynamic_thresholding_ratio", 0.995)),
                                     min_scale=min(1.0, top), max_scale=top)  # fmt: skip
    elif config.get("clip_sample", False):
        clip = float(config.get("clip_sample_range", 1.0))
        if not clip > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip}")
    learned = config.get("variance_type") in ("learned", "learned_range")
    return OutputProcessing(threshold, clip, learned)
