"""Scales and zero points: activations per tensor, weights per output channel.

Conventions (ONNX QuantizeLinear/DequantizeLinear): q = saturate(round(x / scale) + zero_point),
x' = (q - zero_point) * scale.
- Activations: `uint8` asymmetric (zero point in 0..255, range [lo, hi] mapped onto 0..255) or
  `int8` symmetric (zero point 0, range [-T, T] onto -127..127).
- Weights: `int8` symmetric per output channel, q in -127..127 (the -128 code is left unused so
  the range is symmetric and int8 x int8 products cannot overflow in VNNI-style kernels).
  Symmetric means exact zeros stay exactly zero, so sparse weights keep their pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantParams", "activation_params", "weight_params", "quantize_weight",
           "dequantize", "fake_quantize"]

# A scale of 0 (an all-zero channel or tensor) is invalid for QuantizeLinear; any positive scale
# quantizes zeros exactly, so a tiny one is used instead.
_MIN_SCALE = 1e-8


@dataclass
class QuantParams:
    """scale/zero_point are numpy arrays: shape [] (per tensor) or [C] (per channel on `axis`)."""
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def dtype(self) -> str:
        return str(self.zero_point.dtype)

    def to_json(self) -> dict:
        return {"scale": self.scale.astype(float).tolist(),
                "zero_point": self.zero_point.astype(int).tolist(),
                "axis": self.axis, "dtype": self.dtype}


def activation_params(lo: float, hi: float, dtype: str = "uint8") -> QuantParams:
    """Per-tensor parameters for the clipping range [lo, hi] (lo <= 0 <= hi)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "int8":
        scale = max(abs(lo), abs(hi)) / 127.0
        return QuantParams(np.array(max(scale, _MIN_SCALE), np.float32), np.array(0, np.int8))
    if dtype != "uint8":
        raise ValueError(f"activation dtype must be uint8 or int8, got {dtype!r}")
    scale = max((hi - lo) / 255.0, _MIN_SCALE)
    zero_point = int(np.clip(np.round(-lo / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def weight_params(weight: np.ndarray, axis: int | None) -> QuantParams:
    """Symmetric int8 parameters, per channel along `axis` (None: one scale for the tensor)."""
    w = np.asarray(weight, dtype=np.float32)
    if axis is None:
        scale = np.array(max(float(np.abs(w).max(initial=0.0)) / 127.0, _MIN_SCALE), np.float32)
        return QuantParams(scale, np.array(0, np.int8), None)
    axis = axis % w.ndim
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    absmax = np.abs(w).max(axis=reduce, initial=0.0) if reduce else np.abs(w)
    scale = np.maximum(absmax / 127.0, _MIN_SCALE).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(weight: np.ndarray, params: QuantParams) -> np.ndarray:
    """The int8 tensor for `weight` under symmetric `params` (exact zeros map to 0)."""
    w = np.asarray(weight, dtype=np.float32)
    scale = params.scale
    if params.axis is not None:
        shape = [1] * w.ndim
        shape[params.axis] = -1
        scale = scale.reshape(shape)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8)


def _broadcast(array: np.ndarray, params: QuantParams, ndim: int) -> np.ndarray:
    if params.axis is None:
        return array
    shape = [1] * ndim
    shape[params.axis] = -1
    return array.reshape(shape)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """(q - zero_point) * scale, as DequantizeLinear computes it."""
    zero = _broadcast(params.zero_point.astype(np.float32), params, q.ndim)
    return ((q.astype(np.float32) - zero) * _broadcast(params.scale, params, q.ndim)
            ).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) in numpy (round half to even, as ONNX specifies)."""
    info = np.iinfo(params.zero_point.dtype)
    scale = _broadcast(params.scale, params, x.ndim)
    zero = _broadcast(params.zero_point.astype(np.float32), params, x.ndim)
    q = np.clip(np.round(x / scale) + zero, info.min, info.max)
    return ((q - zero) * scale).astype(np.float32)
