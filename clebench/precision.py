"""The FP32 precision policy of evaluations, and the description of the hardware that meta.json records."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from clebench.timing import cpu_name

__all__ = ["PRECISION_POLICY", "fp32_precision", "device_info"]

PRECISION_POLICY = "fp32: TF32 off for cuDNN convolutions and CUDA matmuls"


@contextlib.contextmanager
def fp32_precision() -> Iterator[None]:
    """Run the block with TF32 off (``cudnn.allow_tf32``, ``cuda.matmul.allow_tf32``); restore both flags after.

    On Ampere and later GPUs torch uses TF32 (10-bit mantissa) for FP32 convolutions by default, which moves
    FP32 and simulated accuracies away from the CPU's; the flags do nothing on a CPU.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def device_info(device: str | torch.device) -> dict[str, str | None]:
    """What ran the evaluations: device and CPU names, precision policy, torch / CUDA / cuDNN versions, CPU ISA."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's CPU kernels use, e.g. AVX512
        "precision_policy": PRECISION_POLICY,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": str(torch.backends.cudnn.version()) if cuda else None,
    }
