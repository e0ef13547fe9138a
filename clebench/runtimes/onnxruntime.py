"""Evaluate exported QDQ models with ONNX Runtime on the CPU, in two modes, and describe the runtime
(the interface every runtime module has: clebench.runtimes.engines).

* "sim": QDQ fusion disabled (session.disable_quant_qdq), so Runtime runs float kernels between explicit
  QuantizeLinear / DequantizeLinear: the simulator's arithmetic, on a faster CPU engine.
* "int8": Runtime's default optimizations fuse DQ -> op -> Q into integer kernels (QLinearConv, QGemm,
  QLinearAdd, ...): the deployed int8 model. `int8_kernels` counts which ops actually ran as integer kernels.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from clebench.evaluation import accuracy
from clebench.runtimes import MODES
from clebench.runtimes.engines import LayerPrecision
from clebench.runtimes.export import require
from clebench.timing import cpu_name

# ops that run on integers after Runtime's QDQ fusion (contrib QLinear* ops live in com.microsoft)
INTEGER_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid",
               "QLinearLeakyRelu", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
# conv / matmul layers as Runtime runs them: on integers (after QDQ fusion) or in float
INTEGER_LAYER_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                     "MatMulIntegerToFloat"}
FLOAT_LAYER_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NhwcFusedConv"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool", "AveragePool", "FusedConv",
                     "FusedGemm", "FusedMatMul", "Concat"}
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def session_options(mode: str, threads: int | None = None, optimized_path: str | os.PathLike | None = None):
    """onnxruntime.SessionOptions for `mode` ("sim" or "int8") with `threads` intra-op threads (None: Runtime's)."""
    ort = require("onnxruntime")
    if mode not in MODES:
        raise ValueError(f"ONNX Runtime mode must be one of {MODES}, got {mode!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
    if mode == "sim":
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.log_severity_level = 3  # not the warning that an optimized model is specific to this machine
    return options


def make_session(path: str | os.PathLike, mode: str, threads: int | None = None, optimized_path=None):
    """An onnxruntime.InferenceSession of the model at `path` on the CPU."""
    ort = require("onnxruntime")
    state = ort.capi.onnxruntime_pybind11_state
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist; write it with clebench.runtimes.export.export_onnx")
    try:
        return ort.InferenceSession(str(path), session_options(mode, threads, optimized_path),
                                    providers=["CPUExecutionProvider"])
    except (state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile) as error:  # corrupt or foreign
        raise ValueError(f"ONNX Runtime cannot load {path}: {error}") from None


def evaluate_onnx(path: str | os.PathLike, loader: Iterable, *, mode: str, threads: int | None = None,
                  progress: bool = True, desc: str | None = None) -> dict:
    """clebench.evaluation.evaluate's dict {"top1", "top5", "n", "predictions"} for the ONNX model at `path`.

    loader yields (float inputs [B, ...] normalized as for the torch model, int labels [B]); mode "sim" or "int8".
    """
    session = make_session(path, mode, threads)
    input_name = session.get_inputs()[0].name

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {input_name: array})[0])

    return accuracy(forward, loader, progress=progress, desc=desc or f"onnxruntime-{mode}")


def optimized_graph(path: str | os.PathLike, mode: str = "int8"):
    """The onnx GraphProto Runtime actually runs for `path` in `mode`, after its optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        make_session(path, mode, 1, optimized)
        return require("onnx").load(str(optimized), load_external_data=False).graph


def int8_kernels(path: str | os.PathLike, mode: str = "int8") -> dict[str, int]:
    """Op types of the graph Runtime actually runs for `path` in `mode` (after its optimizations), with counts.

    In int8 mode a layer that ran as an integer kernel shows up as QLinearConv / QGemm / ...; one left as Conv /
    Gemm ran in float on dequantized values (its QDQ pattern was not fused).
    """
    return dict(sorted(Counter(node.op_type for node in optimized_graph(path, mode).node).items()))


def layer_precision(path: str | os.PathLike, mode: str = "int8", threads: int | None = None) -> LayerPrecision:
    """Which conv / matmul layers Runtime runs on integers for `path` in `mode` (its optimized graph's op types:
    QLinearConv, ConvInteger, MatMulInteger, QGemm ... are integer; Conv, Gemm, MatMul and their fused forms float).

    threads: unused (the optimized graph does not depend on it); there for the runtimes' common interface.
    """
    nodes = optimized_graph(path, mode).node
    return LayerPrecision(sum(node.op_type in INTEGER_LAYER_OPS for node in nodes),
                          tuple(node.name or node.output[0] for node in nodes if node.op_type in FLOAT_LAYER_OPS))


def tensors(path: str | os.PathLike, inputs: torch.Tensor, names: list[str], *, mode: str = "int8",
            threads: int | None = None) -> tuple[dict[str, np.ndarray], LayerPrecision]:
    """The tensors `names` of the model at `path` for `inputs` [B, ...], made extra graph outputs, as Runtime computes
    them in `mode` ({name: array}), and the layer precision of that probed model (an extra output can stop Runtime
    fusing the node that makes it)."""
    with tempfile.TemporaryDirectory() as folder:
        probed = with_outputs(path, names, Path(folder) / "probed.onnx")
        session = make_session(probed, mode, threads)
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        values = session.run(names, {session.get_inputs()[0].name: array})
        return dict(zip(names, values)), layer_precision(probed, mode)


def with_outputs(path: str | os.PathLike, names: list[str], out: str | os.PathLike) -> Path:
    """Write the model at `path` to `out` with the float tensors `names` added as graph outputs."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    known = {output for node in model.graph.node for output in node.output}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"{path} has no tensor named {', '.join(missing[:5])}")
    present = {output.name for output in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in present)
    onnx.save(model, str(out))
    return Path(out)


def _cpu_info() -> tuple[str, set[str]]:
    """(the CPU model name, clebench.timing.cpu_name's, "unknown" without one; its /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", set()
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    return cpu_name(fallback="unknown"), set(flags.group(1).split()) if flags else set()


def int8_gemm_path(flags: set[str]) -> str:
    """The u8s8 kernel family MLAS (Runtime's CPU kernels) dispatches to on a CPU with these flags.

    Without VNNI (or AMX), u8s8 products go through vpmaddubsw, whose int16 pair sums can saturate.
    """
    if "amx_int8" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX512-VNNI (no saturation)"
    if "avx_vnni" in flags:
        return "AVX-VNNI (no saturation)"
    if "avx512bw" in flags:
        return "AVX512BW vpmaddubsw (u8s8 may saturate)"
    if "avx2" in flags:
        return "AVX2 vpmaddubsw (u8s8 may saturate)"
    return "generic"


def runtime_info(model_path: str | os.PathLike | None = None) -> dict:
    """onnx / onnxruntime versions ("version": Runtime's), the CPU and its int8-relevant flags, for meta.json.

    With `model_path`, also the op counts Runtime runs for it in int8 mode (`int8_kernels`).
    """
    ort, onnx = require("onnxruntime"), require("onnx")
    model, flags = _cpu_info()
    info = {
        "version": ort.__version__, "onnxruntime_version": ort.__version__, "onnx_version": onnx.__version__, "cpu": model,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
        "int8_gemm_path": int8_gemm_path(flags) if flags else "unknown (no /proc/cpuinfo)",
    }
    if model_path is not None:
        info["int8_kernels"] = int8_kernels(model_path)
    return info
