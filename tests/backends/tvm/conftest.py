"""Helpers for the TVM backend tests: build one-node ONNX graphs and compare TVM with
onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("tvm")

import ir  # noqa: E402
from passes.api import compress  # noqa: E402


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: [(name, np dtype, shape)]; inits: {name: array}."""
    def info(name, dtype, shape):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                             shape)
    graph = helper.make_graph(nodes, "test", [info(*i) for i in inputs],
                              [info(*o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    return proto


def ort_run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def tvm_run(proto: onnx.ModelProto, feeds: dict, spec: str = "cleanup") -> list[np.ndarray]:
    """Lower with our lowering, compile for the host with default schedules, run in the VM."""
    import tvm
    from tvm import relax

    from backends.tvm.build import build_module
    from backends.tvm.lower import lower_model
    from backends.tvm.targets import parse_target

    model = ir.load_model(proto)
    compress(model, spec)
    lowered = lower_model(model)
    executable, _ = build_module(lowered, parse_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[name]) for name, _, _ in lowered.inputs]
    args += [tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
    result = vm["main"](*args)
    return [r.numpy() for r in result]


def qemu_root_or_skip():
    """The aarch64 Python root for qemu-user runs: QEMU_TVM_ROOT if set, else built (once,
    cached) by backends.tvm.qemu_root, which needs the package registries the first time; skips
    when qemu-user or the cross compiler is missing."""
    import os
    import shutil
    from pathlib import Path

    from backends.tvm import qemu_root
    if shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("apt-get install -y qemu-user gcc-aarch64-linux-gnu")
    root = os.environ.get("QEMU_TVM_ROOT")
    try:
        return Path(root) if root else qemu_root.ensure_root(log=lambda m: None)
    except qemu_root.QemuRootError as exc:
        pytest.skip(f"cannot prepare the aarch64 root: {exc}")
