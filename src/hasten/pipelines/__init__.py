"""hasten inside diffusers pipelines (imports diffusers: ``import hasten`` does not load this package).

from hasten.pipelines import HastenScheduler
pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="unipc", schedule="karras")

model = hasten.from_pipeline(pipe, prompt="a red bicycle")   # the pipeline's denoiser as a hasten model
"""

from .adapters import FAMILIES, PipelineModel, from_pipeline
from .scheduler import HastenScheduler

__all__ = ["FAMILIES", "HastenScheduler", "PipelineModel", "from_pipeline"]
