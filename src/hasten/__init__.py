"""hasten: make a pretrained diffusion model sample fast, and prove it.

The public API in one place::

    import hasten
    den = hasten.EpsDenoiser(unet, hasten.VPDiscrete.from_betas("linear"))
    sigmas = hasten.get_sigmas("karras", 10, den.schedule)
    x = hasten.sample(den, noise * sigmas[0], sigmas, "dpmpp_2m")
    acc = hasten.accelerate_(unet, hasten.accel.DeepCacheConfig(interval=3))   # feature caching
    hasten.quantize_(model, hasten.QuantConfig(weights=8, activations=8), calibration=...)   # int8
    model = hasten.from_pipeline(pipe, prompt="a red bicycle")   # a diffusers pipeline as a hasten model
    inv = hasten.invert(model, images01, labels=y)   # images -> noise space (exact DDPM inversion)
    edited = hasten.edit(model, inv, to_label=3).images01   # the same noise under another class
    recipe = hasten.load_recipe("recipe.json")   # from `hasten optimize`: sampler + cache + quantisation
    images = hasten.generate(recipe.load_model(), 16, recipe=recipe).images01
    hasten.distill(teacher="mnist-dit", method="progressive", nfe=2, minutes=30, out="student")   # a student
"""

# quant and tune also register extension points on import (a folder format, an option resolver), before
# any hasten.* submodule is used: see docs/architecture.md, "Import structure".
from . import accel, distill, ensemble, models, prune, quant, schedules, solvers, tune  # noqa: F401  (hasten.distill and hasten.prune are also verbs)
from .accel import AccelConfig, accelerate_
from .config import Config
from .editing import Inversion, edit, invert
from .generate import Generation, generate
from .models import (
    CFGDenoiser,
    Denoiser,
    DynamicThreshold,
    EpsDenoiser,
    FlowDenoiser,
    VDenoiser,
    X0Denoiser,
)
from .models.zoo import LoadedModel, ModelInfo, bundled_models, load
from .quant import QuantConfig, quantize_
from .recipe import Recipe, RecipeError, load_recipe, save_recipe
from .registry import Registry
from .schedules import (
    VE,
    FlowMatching,
    NoiseSchedule,
    VPCosine,
    VPDiscrete,
    VPLinear,
    get_sigmas,
    karras,
    logsnr_uniform,
)
from .solvers import NonFiniteOutputError, SampleOutput, Solver, available, get_solver, sample
from .tune.plan import Plan, load_plan

__version__ = "0.1.0"


def from_pipeline(pipe, **inputs):
    """A diffusers pipeline's denoiser as a hasten model; see :func:`hasten.pipelines.from_pipeline`.

    (Defined here so ``import hasten`` stays free of diffusers until a pipeline is used.)
    """
    from .pipelines.adapters import from_pipeline as adapt

    return adapt(pipe, **inputs)


__all__ = [
    "VE",
    "AccelConfig",
    "CFGDenoiser",
    "Config",
    "Denoiser",
    "DynamicThreshold",
    "EpsDenoiser",
    "FlowDenoiser",
    "FlowMatching",
    "Generation",
    "Inversion",
    "LoadedModel",
    "ModelInfo",
    "NoiseSchedule",
    "NonFiniteOutputError",
    "Plan",
    "QuantConfig",
    "Recipe",
    "RecipeError",
    "Registry",
    "SampleOutput",
    "Solver",
    "VDenoiser",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "X0Denoiser",
    "__version__",
    "accel",
    "accelerate_",
    "available",
    "bundled_models",
    "edit",
    "from_pipeline",
    "generate",
    "get_sigmas",
    "get_solver",
    "invert",
    "karras",
    "load",
    "load_plan",
    "load_recipe",
    "logsnr_uniform",
    "models",
    "prune",
    "quant",
    "quantize_",
    "sample",
    "save_recipe",
    "schedules",
    "solvers",
    "tune",
]
