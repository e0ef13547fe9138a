"""Encodings as AIMET's JSON writes them (format 0.6.1): one entry per tensor, or per channel, of
{bitwidth, dtype, is_symmetric ("True"/"False"), min, max, offset, scale}, where AIMET's offset is quant_min minus
the zero point (so a symmetric signed b-bit grid has offset -2^(b-1)), and its inverse."""
from __future__ import annotations

import torch

from clebench.quant.config import check_bits
from clebench.quant.encoding import Encoding


def aimet_entries(entry: dict) -> list[dict]:
    """One AIMET encoding dict per channel (per-tensor: one), from `Encoding.to_dict()`."""
    scales = entry["scale"] if entry["per_channel"] else [entry["scale"]]
    zero_points = entry["zero_point"] if entry["per_channel"] else [entry["zero_point"]]
    quant_min = -(2 ** (entry["bits"] - 1)) if entry["symmetric"] else 0
    return [
        {"bitwidth": entry["bits"], "dtype": "int", "is_symmetric": str(entry["symmetric"]),
         "min": (quant_min - zp) * scale, "max": (quant_min - zp + 2 ** entry["bits"] - 1) * scale,
         "offset": quant_min - zp, "scale": scale}
        for scale, zp in zip(scales, zero_points)
    ]


def encoding_from_aimet_entries(entries: list[dict], axis: int | None) -> Encoding:
    """The Encoding of AIMET entries: one (per tensor, axis None) or one per channel along `axis`.

    ValueError for entries that disagree on bit width or symmetry, a bit width outside 2-16, or a non-positive scale.
    """
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"AIMET encodings are a non-empty list of dicts, got {entries!r:.80}")
    try:
        bits = {int(e["bitwidth"]) for e in entries}
        symmetric = {str(e["is_symmetric"]) == "True" for e in entries}
        scale = torch.tensor([float(e["scale"]) for e in entries], dtype=torch.float32)
        offset = torch.tensor([int(e["offset"]) for e in entries], dtype=torch.int32)
    except KeyError as error:
        raise ValueError(f"an AIMET encoding entry lacks {error}") from None
    if len(bits) > 1 or len(symmetric) > 1:
        raise ValueError(f"the channels of one AIMET encoding disagree: bitwidths {sorted(bits)}, symmetric {symmetric}")
    (bits,), (symmetric,) = bits, symmetric
    check_bits(bits, "an AIMET encoding's bitwidth")
    if not (scale > 0).all():
        raise ValueError(f"AIMET encoding scales must be positive, got {scale.tolist()}")
    quant_min = -(2 ** (bits - 1)) if symmetric else 0
    zero_point = quant_min - offset
    if axis is None:
        scale, zero_point = scale[0], zero_point[0]
    return Encoding(scale, zero_point, bits, symmetric, axis)
