"""Evaluate exported QDQ models with OpenVINO on the CPU, in two modes, and describe the runtime
(the interface every runtime module has: clebench.runtimes.engines).

* "sim": low-precision transformations off and f32 inference precision, so every convolution runs in f32 with the
  QuantizeLinear / DequantizeLinear pairs as float fake quantization: the simulator's arithmetic.
* "int8": OpenVINO's defaults: its low-precision transformations move each DequantizeLinear past the layer and run
  the convolution on u8 activations and i8 weights. `layer_precision` reads which layers really did from the compiled
  model's runtime graph (each node's `runtimePrecision` and input types).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from clebench.errors import MissingExtraError
from clebench.evaluation import accuracy
from clebench.runtimes import MODES
from clebench.runtimes.engines import LayerPrecision

OPENVINO_EXTRA_HINT = 'pip install -e ".[openvino]"'
# runtime-graph layer types of convolutions and matmuls (OpenVINO's CPU plugin names them so)
LAYER_TYPES = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}
INTEGER_PRECISIONS = {"u8", "i8", "u4", "i4"}
_INTEGER_ELEMENT_TYPES = {"u8", "i8", "u4", "i4"}  # ov.Type.get_type_name() of integer activations


def require_openvino():
    """Import openvino (the optional `openvino` extra) or raise a one-line MissingExtraError."""
    try:
        import openvino
    except ImportError:
        raise MissingExtraError(f"openvino is not installed: {OPENVINO_EXTRA_HINT} (the optional openvino extra)") from None
    return openvino


def compile_config(mode: str, threads: int | None = None) -> dict:
    """compile_model properties for `mode` with `threads` inference threads (None: OpenVINO's), one stream."""
    if mode not in MODES:
        raise ValueError(f"OpenVINO mode must be one of {MODES}, got {mode!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    config = {"NUM_STREAMS": 1, **({"INFERENCE_NUM_THREADS": threads} if threads is not None else {})}
    if mode == "sim":
        config |= {"LP_TRANSFORMS_MODE": False, "INFERENCE_PRECISION_HINT": "f32"}
    return config


def read_model(path: str | os.PathLike, outputs: list[str] | None = None):
    """The openvino.Model of the ONNX file at `path`, with those of the tensors `outputs` it still has (its ONNX
    frontend merges some nodes, dropping their output names) added as extra outputs."""
    ov = require_openvino()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; write it with clebench.runtimes.export.export_onnx")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as error:  # corrupt or foreign file
        raise ValueError(f"OpenVINO cannot read {path}: {str(error).splitlines()[0]}") from None
    if outputs:
        known = {name for op in model.get_ops() for output in op.outputs() for name in output.get_names()}
        kept = [name for name in outputs if name in known]
        if kept:
            model.add_outputs(kept)
    return model


def compile_model(path: str | os.PathLike, mode: str, threads: int | None = None, outputs: list[str] | None = None):
    """An openvino.CompiledModel of the model at `path` on the CPU in `mode` (see the module docstring)."""
    ov = require_openvino()
    config = compile_config(mode, threads)
    return ov.Core().compile_model(read_model(path, outputs), "CPU", config)


def evaluate_onnx(path: str | os.PathLike, loader: Iterable, *, mode: str, threads: int | None = None,
                  progress: bool = True, desc: str | None = None) -> dict:
    """clebench.evaluation.evaluate's dict {"top1", "top5", "n", "predictions"} for the ONNX model at `path`.

    loader yields (float inputs [B, ...] normalized as for the torch model, int labels [B]); mode "sim" or "int8".
    """
    request = compile_model(path, mode, threads).create_infer_request()

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        request.infer({0: array})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return accuracy(forward, loader, progress=progress, desc=desc or f"openvino-{mode}")


def _text(rt_info, key: str) -> str:
    return rt_info[key].astype(str) if key in rt_info else ""


def compiled_layer_precision(compiled) -> LayerPrecision:
    """Conv / matmul layers of a CompiledModel's runtime graph on integers: runtimePrecision u8/i8 and an integer
    activation input (a layer whose i8 weights are only decompressed to f32 reports i8 but reads f32 activations)."""
    integer, floats = 0, []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if _text(info, "layerType") not in LAYER_TYPES:
            continue
        activation = op.input(0).get_element_type().get_type_name()
        if _text(info, "runtimePrecision") in INTEGER_PRECISIONS and activation in _INTEGER_ELEMENT_TYPES:
            integer += 1
        else:
            floats.append(op.get_friendly_name())
    return LayerPrecision(integer, tuple(floats))


def layer_precision(path: str | os.PathLike, mode: str = "int8", threads: int | None = None) -> LayerPrecision:
    """Which conv / matmul layers OpenVINO runs on integers for `path` in `mode` (compiled_layer_precision)."""
    return compiled_layer_precision(compile_model(path, mode, threads))


def tensors(path: str | os.PathLike, inputs: torch.Tensor, names: list[str], *, mode: str = "int8",
            threads: int | None = None) -> tuple[dict[str, np.ndarray], LayerPrecision]:
    """The tensors `names` of the model at `path` for `inputs` [B, ...], made extra model outputs, as OpenVINO
    computes them in `mode` ({name: array}; a name OpenVINO merged away is absent), and the layer precision of that
    probed model (an extra output can change what the low-precision transformations fuse)."""
    compiled = compile_model(path, mode, threads, outputs=names)
    array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
    values = compiled.create_infer_request().infer({0: array})
    by_name = {name: value for output, value in values.items() for name in output.get_names()}
    return {name: np.array(by_name[name]) for name in names if name in by_name}, compiled_layer_precision(compiled)


def runtime_info() -> dict:
    """OpenVINO's version ("version") and its view of the CPU (device name, optimization capabilities), for meta.json."""
    ov = require_openvino()
    core = ov.Core()
    return {
        "version": ov.__version__,
        "openvino_version": ov.__version__,
        "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "optimization_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }
