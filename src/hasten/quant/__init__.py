"""Time-step-aware post-training quantisation with integer storage and int8/float8 kernels.

    calibration = hasten.quant.collect_calibration(model, solver="dpmpp_2m", steps=20)
    report = hasten.quantize_(model, hasten.quant.QuantConfig(weights=4, activations=8), calibration=calibration)
    hasten.quant.save_quantized(model, "mnist-unet-w4a8", record=...)   # or `hasten quantize`
    hasten.load("mnist-unet-w4a8")                                       # a model like any other

See ``docs/guide/quantization.md``.
"""

from .api import QuantConfig, QuantReport, is_quantized, quantize_, shortcut_splits
from .calibrate import MIN_SAMPLES, MODES, CalibrationSet, collect_calibration
from .modules import (
    QuantizedLayer,
    cuda_int8_available,
    execution_summary,
    float8_available,
    int8_kernels_available,
    set_execution,
)
from .storage import WEIGHTS_FILE, load_quantized_network, quantize_to_folder, save_quantized

__all__ = [
    "MIN_SAMPLES",
    "MODES",
    "WEIGHTS_FILE",
    "CalibrationSet",
    "QuantConfig",
    "QuantReport",
    "QuantizedLayer",
    "collect_calibration",
    "cuda_int8_available",
    "execution_summary",
    "float8_available",
    "int8_kernels_available",
    "is_quantized",
    "load_quantized_network",
    "quantize_",
    "quantize_to_folder",
    "save_quantized",
    "set_execution",
    "shortcut_splits",
]
