"""hasten inside diffusers pipelines (imports diffusers: ``import hasten`` does not load this package).

from hasten.pipelines import HastenScheduler
pipe.scheduler = HastenScheduler.from_config(pipe.scheduler.config, solver="unipc", schedule="karras")
"""

from .scheduler import HastenScheduler

__all__ = ["HastenScheduler"]
