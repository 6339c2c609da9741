"""The default CPU schedule: conv and matmul get the register tile (a local accumulator), other
reductions the single-row schedule, and results stay exact."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from backends.tvm.schedule import _vector_width, default_schedule_pass  # noqa: E402
from backends.tvm.targets import parse_target  # noqa: E402


def _conv_module(channels=16, size=14):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, channels, size, size], "float32"))
    w = relax.Var("w", relax.TensorType([channels, channels, 3, 3], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _scheduled(mod):
    target = parse_target("host").tvm_target()
    with target:
        mod = relax.get_pipeline("zero")(mod)
        return default_schedule_pass(target)(mod), target


def test_conv_gets_register_tile_and_matches_numpy():
    mod, target = _scheduled(_conv_module())
    conv = [f for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in f.script()]
    assert conv and '"local"' in conv[0].script()  # the accumulator tile
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    want = np.maximum(np.einsum("nchwij,kcij->nkhw", windows, w), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extent,lanes,width", [(56, 8, 8), (14, 8, 14), (7, 8, 7),
                                                (28, 8, 14), (1, 8, None), (12, 4, 4)])
def test_vector_width(extent, lanes, width):
    assert _vector_width(extent, lanes) == width
