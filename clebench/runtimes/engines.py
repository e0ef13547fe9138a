"""The engines that evaluate a QuantSim: torch, or its ONNX QDQ export on a real runtime in one of two modes.

Every runtime module (`clebench.runtimes.onnxruntime`, `clebench.runtimes.openvino`) has the same functions:

    evaluate_onnx(path, loader, *, mode, threads, progress, desc) -> evaluate()'s dict
    layer_precision(path, mode, threads) -> LayerPrecision     which conv / matmul layers ran on integers
    tensors(path, inputs, names, *, mode, threads) -> ({name: array}, LayerPrecision)   tensors as extra outputs
    runtime_info() -> dict                                      versions and the CPU, for meta.json

and two modes:

* "sim": the simulation's arithmetic (float kernels between explicit quantize / dequantize) on a faster CPU engine.
* "int8": the runtime's own low-precision path, as deployed (integer convolutions where it can fuse them).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from clebench.evaluation import evaluate
from clebench.quant.sim import QuantSim
from clebench.runtimes import MODES, RUNTIMES
from clebench.runtimes.export import cached_export

ENGINES = ("torch", *(f"{runtime}-{mode}" for runtime in RUNTIMES for mode in MODES))


@dataclass(frozen=True)
class LayerPrecision:
    """How a runtime ran a model's convolution / matmul layers: on integers, or in float (by name)."""

    integer: int
    float_layers: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.integer + len(self.float_layers)

    def __str__(self) -> str:
        text = f"{self.integer} of {self.total} conv/matmul layers on integers"
        return text if not self.float_layers else f"{text}; in float: {', '.join(self.float_layers)}"


def runtime(name: str) -> ModuleType:
    """The module of runtime `name` (one of RUNTIMES); its own import raises MissingExtraError naming the extra."""
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return importlib.import_module(f"clebench.runtimes.{name}")


def split_engine(engine: str) -> tuple[str, str]:
    """(runtime, mode) of an ONNX engine name such as "openvino-int8"."""
    if engine not in ENGINES or engine == "torch":
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    name, mode = engine.rsplit("-", 1)
    return name, mode


def evaluate_quantized(sim: QuantSim, dummy_input: torch.Tensor, loader: Iterable, *, engine: str,
                       workdir: str | os.PathLike, threads: int | None = None, device: str | torch.device = "cpu",
                       progress: bool = True, desc: str | None = None) -> dict:
    """Evaluate `sim` with `engine` (one of ENGINES); evaluate()'s dict {"top1", "top5", "n", "predictions"}.

    The runtime engines export into `workdir` (reusing a verified earlier export of the same sim). The int8 modes
    always export int32 biases, as integer kernels need them; the sim modes export the sim as it is.
    """
    if engine == "torch":
        return evaluate(sim.model, loader, device, progress=progress, desc=desc)
    name, mode = split_engine(engine)
    module = runtime(name)
    path = cached_export(sim, dummy_input, workdir, int32_bias=True if mode == "int8" else None)
    return module.evaluate_onnx(path, loader, mode=mode, threads=threads, progress=progress, desc=desc or engine)
