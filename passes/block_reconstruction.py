"""Block-wise reconstruction: once a model is compressed, tune the weights of each of its blocks
so that the block's output matches the original model's again, with the sparsity masks fixed.

Layer-wise methods (SparseGPT, ADMM, error correction) fit each layer's own output, one layer
at a time. Inside a block the layers could share the work: an attention block's query and key
projections only matter through the logits they form together, and an FFN's up-projection
through the GELU and the down-projection after it. Here each block is fitted as a whole, in graph
order, on calibration feeds (as BRECQ does for quantization):

    min over the block's weights   E || block(x~) - block_ref(x) ||^2      (zeros stay zero)

where x~ is the block's input in the compressed model (the blocks before it already tuned) and
block_ref(x) the original model's value at the same place. Gradients come from the `vjp` rules
on onnxruntime's forward values; Adam takes steps relative to each layer's weight scale.

A block ends at a cut: a value that alone carries everything the layers before it computed
(a transformer's residual stream after each LayerNorm; a ResNet's output after each residual
block). Values the block also reads that no layer reaches (an attention mask) are fed as they
are. A block with a sparse layer is tuned, dense layers in it included; a stretch without
weights (a LayerNorm, pooling) joins the block before it, so the last block is fitted at the
graph outputs themselves; a stretch of dense layers only runs, untuned.

The feeds' last `held_out` are not trained on: a block keeps the epoch with the lowest error on
them, its starting weights included, so a block that would only overfit stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ir import CompressError, Model, Node, Value, downstream_nodes, to_onnx

from .calibration import subgraph_session
from .staged_capture import StagedCapture
from .vjp import NotDifferentiable, pull_back

__all__ = ["TunedLayer", "Block", "find_blocks", "reconstruct_blocks"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


@dataclass
class TunedLayer:
    """A layer whose weight (and bias) the reconstruction may change. `keep` marks the weight
    entries allowed to be nonzero (None: all of them)."""
    node: Node
    weight: Value
    bias: Value | None = None
    keep: np.ndarray | None = None

    def parameters(self) -> list[Value]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])


@dataclass
class Block:
    """Nodes (graph order) fitted together: `inputs` are what they read from outside (the
    previous block's output and values no sparse layer reaches), `outputs` what is compared
    with the original model, `layers` what is tuned (none: the block only runs)."""
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    layers: list[TunedLayer]


def find_blocks(model: Model, layers: list[TunedLayer]) -> list[Block]:
    """The model's nodes from the layers on, split at cuts (see the module docstring), from the
    first block with a sparse layer (`keep` set; any layer when none is) to the last. A
    stretch between two cuts that holds none of `layers` (a LayerNorm, pooling) joins the block
    before it; one with dense layers only runs, untuned (the caller left those layers dense on
    purpose); dense layers in a block with a sparse one are tuned with it."""
    graph = model.graph
    nodes = list(graph.nodes)
    sparse = [layer for layer in layers if layer.keep is not None] or list(layers)
    reached = downstream_nodes(layer.node for layer in layers)
    last_read: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None:
                last_read[value.name] = index
    for value in graph.outputs:
        last_read[value.name] = len(nodes)

    # A cut after node i: exactly one value computed from the layers is still to be read. What
    # they read from outside counts too (until its last read), so that the first block is not
    # cut between layers that share their input.
    live = {v.name for layer in layers for v in layer.node.inputs
            if v is not None and not v.is_constant
            and (v.producer is None or id(v.producer) not in reached)}
    segments: list[list[Node]] = [[]]
    cuts: list[str] = []
    for index, node in enumerate(nodes):
        if id(node) not in reached:
            continue
        segments[-1].append(node)
        live.update(v.name for v in node.outputs if v is not None and v.name in last_read)
        live = {name for name in live if last_read[name] > index}
        if len(live) == 1:
            cuts.append(next(iter(live)))
            segments.append([])
    if not segments[-1]:
        segments.pop()
    at_end = [v.name for v in graph.outputs if v.producer is not None
              and id(v.producer) in reached]

    layer_of = {id(layer.node): layer for layer in layers}
    anchors = {id(layer.node) for layer in sparse}
    blocks: list[Block] = []
    for index, segment in enumerate(segments):
        output = [cuts[index]] if index < len(cuts) else at_end
        if any(id(node) in anchors for node in segment):
            blocks.append(Block(segment, [], output,
                                [layer_of[id(n)] for n in segment if id(n) in layer_of]))
        elif not blocks or any(id(node) in layer_of for node in segment):
            blocks.append(Block(segment, [], output, []))
        else:
            blocks[-1].nodes.extend(segment)
            blocks[-1].outputs = output
    while blocks and not blocks[-1].layers:  # nothing after it is tuned
        blocks.pop()
    while blocks and not blocks[0].layers:  # nothing before it is tuned: the model's values
        blocks.pop(0)
    for block in blocks:
        produced = {v.name for n in block.nodes for v in n.outputs if v is not None}
        reads = []
        for node in block.nodes:
            for value in node.inputs:
                if value is not None and not value.is_constant and value.name not in produced \
                        and value.name not in reads:
                    reads.append(value.name)
        block.inputs = reads
    return blocks


def reconstruct_blocks(model: Model, reference: Model, feeds: list[dict[str, np.ndarray]],
                       layers: list[TunedLayer], epochs: int, step: float, batch: int = 8,
                       held_out: int = 64, row_mask_input: str | None = None,
                       seed: int = 0, progress=None) -> list[dict]:
    """Tune the layers' weights in place, block after block (see the module docstring).
    `reference` is the original model (its values carry the same names at the cuts); `step`
    is Adam's step as a fraction of each layer's RMS weight. Returns one record per block."""
    blocks = find_blocks(model, layers)
    # Written once: the blocks feed their tuned weights as inputs, and nothing else changes.
    proto = to_onnx(model)
    known = {v.name for n in reference.graph.nodes for v in n.outputs if v is not None}
    held_out = min(held_out, len(feeds) // 4)
    train = np.arange(len(feeds) - held_out)
    held = np.arange(len(feeds) - held_out, len(feeds))
    rng = np.random.default_rng(seed)
    # Padding tokens never reach a pooled output: their rows are left out of the error.
    masks = [feed.get(row_mask_input) if row_mask_input else None for feed in feeds]
    targets = StagedCapture(reference, feeds)
    outside = StagedCapture(model, feeds, keep=False)
    records = []
    carried: list[dict[str, np.ndarray]] | None = None  # the previous block's outputs
    iterator = progress(blocks, total=len(blocks), desc="block reconstruction") \
        if progress else blocks
    for block in iterator:
        fresh = [name for name in block.inputs if carried is None or name not in carried[0]]
        inputs = [dict(carried[i]) if carried is not None else {} for i in range(len(feeds))]
        if fresh:
            for index, values in enumerate(outside.capture(fresh)):
                inputs[index].update(values)
        fitted = _BlockFit(model, block, proto)
        missing = [name for name in block.outputs if name not in known]
        if block.layers and missing:
            records.append({"nodes": [layer.node.name for layer in block.layers],
                            "output": block.outputs,
                            "skipped": f"{', '.join(missing)} not in the original model"})
        elif block.layers:
            wanted = [dict(values) for values in targets.capture(block.outputs)]
            try:
                records.append(fitted.train(inputs, wanted, masks, train, held, epochs, step,
                                            batch, rng))
            except NotDifferentiable as error:  # met on the first sample: nothing changed yet
                records.append({"nodes": [layer.node.name for layer in block.layers],
                                "output": block.outputs, "skipped": str(error)})
        carried = [fitted.outputs(inputs[i]) for i in range(len(feeds))]
    return records


class _BlockFit:
    """One block as an onnxruntime session whose tuned weights are inputs, with its backward
    sweep and Adam state."""

    def __init__(self, model: Model, block: Block, proto: onnx.ModelProto):
        self.model = model
        self.block = block
        self.parameters = {p.name: p for layer in block.layers for p in layer.parameters()}
        self.keep = {layer.weight.name: layer.keep for layer in block.layers
                     if layer.keep is not None}
        # Steps are relative to the layer's weight scale (a bias moves like its weight).
        self.scale = {}
        for layer in block.layers:
            rms = float(np.sqrt(np.mean(np.square(layer.weight.const, dtype=np.float64))))
            for p in layer.parameters():
                self.scale[p.name] = max(rms, 1e-12)
        # Adam works in float32 (at least); the session gets each weight in its own dtype.
        self.values = {p: v.const.astype(np.promote_types(v.const.dtype, np.float32))
                       for p, v in self.parameters.items()}
        self.dtypes = {p: v.const.dtype for p, v in self.parameters.items()}
        self.computed = [v.name for n in block.nodes for v in n.outputs if v is not None]
        # Values whose gradient leads to a tuned weight: those downstream of one in the block.
        reached = downstream_nodes(layer.node for layer in block.layers)
        self.carries_gradient = {v.name for n in block.nodes if id(n) in reached
                                 for v in n.outputs if v is not None}
        self.session = self._session(proto)

    def _session(self, proto):
        # `proto` is the model as `to_onnx` wrote it: its nodes follow the graph's node list.
        position = {id(node): index for index, node in enumerate(self.model.graph.nodes)}
        nodes = [proto.graph.node[position[id(node)]] for node in self.block.nodes]
        declared = {v.name: v for v in (*proto.graph.input, *proto.graph.value_info,
                                        *proto.graph.output)}
        inputs = []
        for name in [*self.block.inputs, *self.parameters]:
            if name in declared:
                inputs.append(declared[name])
            else:
                value = self.parameters[name] if name in self.parameters else self._value(name)
                inputs.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.dtype(value.dtype)), None))
        return subgraph_session(proto, nodes, inputs, self.computed)

    def _value(self, name: str) -> Value:
        for node in self.block.nodes:
            for value in node.inputs:
                if value is not None and value.name == name:
                    return value
        raise CompressError(f"block reconstruction: no value {name!r}")

    def forward(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run_feed = {name: feed[name] for name in self.block.inputs}
        run_feed.update({p: v.astype(self.dtypes[p], copy=False) for p, v in self.values.items()})
        values = dict(zip(self.computed, self.session.run(self.computed, run_feed)))
        values.update(run_feed)
        return values

    def outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.forward(feed)
        return {name: values[name] for name in self.block.outputs}

    def _residuals(self, values, wanted, mask) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Per output: the difference to the original, and the weights of its entries (0 for
        padding tokens under `mask`; each output's mean squared error counted once)."""
        found = []
        for name in self.block.outputs:
            difference = values[name].astype(np.float32) - wanted[name]
            weight = np.ones(difference.shape, np.float32)
            if mask is not None and difference.ndim > mask.ndim \
                    and difference.shape[:mask.ndim] == mask.shape:
                weight *= np.asarray(mask, np.float32).reshape(
                    mask.shape + (1,) * (difference.ndim - mask.ndim))
            weight /= max(float(weight.sum()), 1.0)
            found.append((name, difference, weight))
        return found

    def error(self, feed, wanted, mask) -> float:
        values = self.forward(feed)
        return sum(float((d * d * w).sum()) for _, d, w in self._residuals(values, wanted, mask))

    def gradients(self, feed, wanted, mask) -> dict[str, np.ndarray]:
        """d error / d tuned weight, by the `vjp` rules from the outputs back."""
        values = self.forward(feed)
        grads = {name: (2 * d * w)[None] for name, d, w in self._residuals(values, wanted, mask)}
        found = {}
        opset = self.model.opset
        for node in reversed(self.block.nodes):
            outs = [grads.pop(v.name, None) if v is not None else None for v in node.outputs]
            if all(g is None for g in outs):
                continue
            ins = [None if v is None else self.values[v.name] if v.name in self.values
                   else v.const if v.is_constant else values.get(v.name) for v in node.inputs]
            ys = [None if v is None else values[v.name] for v in node.outputs]
            flags = [v is not None and (v.name in self.values or v.name in self.carries_gradient)
                     for v in node.inputs]
            for value, grad, flag in zip(node.inputs, pull_back(node, outs, ins, ys, opset,
                                                                wanted=flags), flags):
                if grad is None or not flag:
                    continue
                if value.name in self.values:
                    found[value.name] = found.get(value.name, 0) + grad[0]
                else:
                    grads[value.name] = grads[value.name] + grad if value.name in grads else grad
        return found

    def train(self, inputs, wanted, masks, train, held, epochs, step, batch, rng) -> dict:
        def held_error() -> float:
            return float(np.mean([self.error(inputs[i], wanted[i], masks[i]) for i in held])) \
                if len(held) else 0.0

        moments = {p: np.zeros_like(v) for p, v in self.values.items()}
        squares = {p: np.zeros_like(v) for p, v in self.values.items()}
        start = held_error()
        best, best_values, best_epoch = start, {p: v.copy() for p, v in self.values.items()}, 0
        count = 0
        for epoch in range(1, epochs + 1):
            order = rng.permutation(train)
            for first in range(0, len(order), batch):
                chosen = order[first:first + batch]
                total: dict[str, np.ndarray] = {}
                for i in chosen:
                    for name, grad in self.gradients(inputs[i], wanted[i], masks[i]).items():
                        total[name] = total[name] + grad if name in total else grad
                count += 1
                self._adam(total, len(chosen), moments, squares, count, step)
            error = held_error()
            if error < best:
                best, best_epoch = error, epoch
                best_values = {p: v.copy() for p, v in self.values.items()}
        self.values = best_values
        for name, value in self.parameters.items():
            value.const = best_values[name].astype(value.const.dtype)
        return {"nodes": [layer.node.name for layer in self.block.layers],
                "output": self.block.outputs, "held_out_error": [start, best],
                "epoch_kept": best_epoch}

    def _adam(self, total, samples, moments, squares, count, step) -> None:
        beta1, beta2 = ADAM_BETAS
        for name, grad in total.items():
            grad = grad / samples
            moments[name] = beta1 * moments[name] + (1 - beta1) * grad
            squares[name] = beta2 * squares[name] + (1 - beta2) * grad * grad
            update = (moments[name] / (1 - beta1 ** count)) \
                / (np.sqrt(squares[name] / (1 - beta2 ** count)) + ADAM_EPSILON)
            self.values[name] = self.values[name] - step * self.scale[name] * update
            keep = self.keep.get(name)
            if keep is not None:
                self.values[name] = self.values[name] * keep
