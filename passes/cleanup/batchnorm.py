"""fold-batchnorm: fold inference-mode BatchNormalization into the Conv/Gemm before it."""

from __future__ import annotations

import numpy as np

from ir import Model, Node

from ..core import Pass, PassContext, PassResult, register_pass

__all__ = ["FoldBatchNorm", "batchnorm_affine"]


def batchnorm_affine(bn: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel such that BN(x) = x * scale + shift, or None if not foldable."""
    params = [bn.input(i) for i in range(1, 5)]
    if any(p is None or not p.is_constant for p in params):
        return None
    gamma, beta, mean, var = (p.const.astype(np.float64) for p in params)
    if any(a.ndim != 1 for a in (gamma, beta, mean, var)):
        return None  # spatial=0 form of old opsets: per-position parameters
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in bn.outputs[1:]):
        return None  # training-mode outputs are read
    if bn.attr("training_mode", 0):
        return None
    scale = gamma / np.sqrt(var + bn.attr("epsilon", 1e-5))
    return scale, beta - mean * scale


def _single_reader(node: Node, reader: Node) -> bool:
    out = node.output
    return not out.is_graph_output() and out.consumers() == [reader] and len(out.uses()) == 1


def _fold_conv(conv: Node, scale, shift, graph) -> bool:
    weight, bias = conv.input(1), conv.input(2)
    if weight is None or not weight.is_constant or (bias is not None and not bias.is_constant):
        return False
    w = weight.const
    out_channels = w.shape[0]
    if scale.shape[0] != out_channels:
        return False
    b = bias.const.astype(np.float64) if bias is not None else np.zeros(out_channels)
    new_w = (w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
    new_b = (b * scale + shift).astype(w.dtype)
    _set_weights(conv, graph, new_w, new_b)
    return True


def _fold_conv_transpose(conv: Node, scale, shift, graph) -> bool:
    weight, bias = conv.input(1), conv.input(2)
    if weight is None or not weight.is_constant or (bias is not None and not bias.is_constant):
        return False
    w = weight.const  # (Cin, Cout/group, k...)
    group = conv.attr("group", 1)
    per_group = w.shape[1]
    if scale.shape[0] != per_group * group:
        return False
    b = bias.const.astype(np.float64) if bias is not None else np.zeros(scale.shape[0])
    grouped = w.reshape(group, w.shape[0] // group, per_group, *w.shape[2:])
    factors = scale.reshape(group, 1, per_group, *[1] * (w.ndim - 2))
    new_w = (grouped * factors).reshape(w.shape).astype(w.dtype)
    _set_weights(conv, graph, new_w, (b * scale + shift).astype(w.dtype))
    return True


def _fold_gemm(gemm: Node, scale, shift, graph) -> bool:
    weight, bias = gemm.input(1), gemm.input(2)
    if weight is None or not weight.is_constant:
        return False
    if bias is not None and (not bias.is_constant or bias.const.size not in (1, scale.size)):
        return False
    w = weight.const
    if w.ndim != 2:
        return False
    trans_b = gemm.attr("transB", 0)
    n = w.shape[0] if trans_b else w.shape[1]
    if n != scale.size:
        return False
    beta = gemm.attr("beta", 1.0)
    c = (np.broadcast_to(bias.const.reshape(-1), (n,)).astype(np.float64) * beta
         if bias is not None else np.zeros(n))
    new_w = (w * (scale[:, None] if trans_b else scale[None, :])).astype(w.dtype)
    _set_weights(gemm, graph, new_w, (c * scale + shift).astype(w.dtype))
    gemm.attrs["beta"] = 1.0
    return True


def _set_weights(node: Node, graph, weight: np.ndarray, bias: np.ndarray) -> None:
    """New constants (the old ones may be shared with other nodes)."""
    node.set_input(1, graph.add_constant(node.input(1).name + "_bnfold", weight))
    bias_value = graph.add_constant((node.name or node.op_type) + "_bias_bnfold", bias)
    if len(node.inputs) > 2:
        node.set_input(2, bias_value)
    else:
        node.inputs = [*node.inputs, bias_value]


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


@register_pass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization (inference mode, constant statistics) into the preceding Conv,
    ConvTranspose or Gemm when that layer's output feeds only the BatchNormalization.

    W' = W * gamma / sqrt(var + eps) per output channel; b' = (b - mean) * that + beta.
    """
    name = "fold-batchnorm"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph.nodes):
            if bn.op_type != "BatchNormalization" or bn.graph is not graph:
                continue
            producer = bn.input(0).producer
            if producer is None or producer.op_type not in _FOLDERS:
                continue
            if not _single_reader(producer, bn):
                continue
            affine = batchnorm_affine(bn)
            if affine is None or not _FOLDERS[producer.op_type](producer, *affine, graph):
                continue
            bn.output.replace_all_uses_with(producer.output)
            graph.remove_node(bn)
            folded += 1
        graph.remove_unused_constants()
        return PassResult(changed=bool(folded), details={"folded": folded})
