"""prune-layers: remove whole residual blocks (y = x + f(x) -> y = x) and transformer layers.

A *residual block* is an Add whose operands are a value x and a branch f(x), where f's nodes
(every node on a path from x to the branch operand) are read by nothing outside the branch. In
post-norm networks (BERT) the Add feeds a LayerNormalization alone, which then belongs to the
block: removing it maps LN(x + f(x)) to x, i.e. the block's input passes straight through. A
*transformer layer* is an attention block (its branch holds a Softmax) followed directly by a
block that reads its output; removing it maps the layer's output to its input.

Which blocks go is decided on calibration data: `criterion=change` ranks blocks by how much they
change their input, ||y - x|| / ||x||; `criterion=output` removes each block alone and measures
how far the model's outputs move (one run per block, slower, closer to what matters).
`bridge=linear` replaces each removed block by a fitted affine map instead of the identity
(see `bridge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ir import Graph, Model, Node, Value, copy_model, downstream_nodes, to_onnx

from ..calibration import capture, make_session
from ..core import Option, OptionError, Pass, PassContext, PassResult, register_pass
from ..cleanup.dead_code import EliminateDeadCode
from .bridge import bridge_rows, fit_bridge, insert_bridge

__all__ = ["Block", "find_blocks", "remove_block", "PruneLayers"]


@dataclass
class Block:
    """A removable span of the graph: replacing `output` by `input` deletes `nodes`."""
    kind: str            # "residual" or "transformer"
    name: str
    input: Value
    output: Value
    nodes: list[Node]

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "nodes": len(self.nodes),
                "input": self.input.name, "output": self.output.name}


def _branch_nodes(skip: Value, branch: Value) -> list[Node] | None:
    """Nodes on a path from `skip` to `branch`, or None when some node outside reads them."""
    forward = downstream_nodes(skip.consumers())
    between: dict[int, Node] = {}
    stack = [branch.producer] if branch.producer is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in between or id(node) not in forward:
            continue
        between[id(node)] = node
        stack.extend(v.producer for v in node.inputs if v is not None)
    if not between or branch.producer is None or id(branch.producer) not in between:
        return None
    return list(between.values())


def _closed(nodes: list[Node], exits: set[int]) -> bool:
    """Every output of `nodes` is read only by them or by the `exits` nodes (no graph output)."""
    inside = {id(n) for n in nodes} | exits
    for node in nodes:
        for out in node.outputs:
            if out is None:
                continue
            if out.is_graph_output() or any(id(r) not in inside for r in out.consumers()):
                return False
    return True


def _residual_block(add: Node) -> Block | None:
    a, b = add.input(0), add.input(1)
    if a is None or b is None or a.is_constant or b.is_constant:
        return None
    for skip, branch in ((a, b), (b, a)):
        if tuple(skip.shape or ()) != tuple(add.output.shape or ()):
            continue  # a broadcasting Add is not y = x + f(x)
        nodes = _branch_nodes(skip, branch)
        if nodes is None or not _closed(nodes, {id(add)}):
            continue
        output, members = add.output, [*nodes, add]
        readers = output.consumers()
        if (len(readers) == 1 and readers[0].op_type == "LayerNormalization"
                and not output.is_graph_output()):
            output, members = readers[0].output, [*members, readers[0]]  # post-norm block
        return Block("residual", add.name, skip, output, members)
    return None


def find_blocks(graph: Graph, kinds=("residual", "transformer")) -> list[Block]:
    """Residual blocks in graph order, and transformer layers made of two of them."""
    residual = [b for b in map(_residual_block, graph.nodes_of("Add", "Sum")) if b is not None
                if len(b.nodes) > 1]
    blocks = [b for b in residual if "residual" in kinds]
    if "transformer" in kinds:
        for attention in residual:
            if not any(n.op_type == "Softmax" for n in attention.nodes):
                continue
            for follower in residual:
                if follower.input is attention.output and not any(
                        n.op_type == "Softmax" for n in follower.nodes):
                    name = attention.name.split("/")[0] if "/" in attention.name else attention.name
                    blocks.append(Block("transformer", name, attention.input, follower.output,
                                        [*attention.nodes, *follower.nodes]))
    return blocks


def remove_block(graph: Graph, block: Block) -> None:
    """Replace the block's output by its input and delete its nodes."""
    block.output.replace_all_uses_with(block.input)
    for node in block.nodes:
        graph.detach_inputs(node)
    for node in block.nodes:
        graph.remove_node(node)


def _change_scores(model: Model, blocks: list[Block], ctx: PassContext, samples: int):
    """||y - x|| / ||x|| of each block on calibration data (small = the block does little)."""
    names = sorted({v.name for b in blocks for v in (b.input, b.output)})
    captured = capture(model, names, ctx.require_calibration(model), limit=samples)
    scores = []
    for block in blocks:
        x = np.concatenate([a.ravel() for a in captured[block.input.name]]).astype(np.float64)
        y = np.concatenate([a.ravel() for a in captured[block.output.name]]).astype(np.float64)
        scores.append(float(np.linalg.norm(y - x) / (np.linalg.norm(x) + 1e-12)))
    return scores


def _outputs(model: Model, feeds) -> list[np.ndarray]:
    session = make_session(to_onnx(model))
    return [np.concatenate([np.ravel(r) for r in session.run(None, f)]) for f in feeds]


def _output_scores(model: Model, blocks: list[Block], ctx: PassContext, samples: int):
    """Relative change of the model's outputs when each block alone is removed."""
    feeds = ctx.require_calibration(model).feeds(model, samples)
    reference = np.concatenate(_outputs(model, feeds)).astype(np.float64)
    scores = []
    for index in ctx.progress(range(len(blocks)), total=len(blocks), desc="prune-layers: scan"):
        trial = copy_model(model)  # find_blocks is deterministic: same order
        remove_block(trial.graph, find_blocks(trial.graph, (blocks[index].kind,))[index])
        moved = np.concatenate(_outputs(trial, feeds)).astype(np.float64)
        scores.append(float(np.linalg.norm(moved - reference) / (np.linalg.norm(reference) + 1e-12)))
    return scores


@register_pass
class PruneLayers(Pass):
    """Remove whole residual blocks (y = x + f(x) becomes y = x) or transformer layers, the ones
    that matter least on calibration data, so the network gets shallower without retraining.

    `kind=residual` removes single residual blocks (a post-norm block's LayerNormalization goes
    with it); `kind=transformer` removes attention+FFN layers. `count` (or `ratio` of the blocks
    found) says how many; `criterion=change` ranks blocks by ||f(x)|| relative to ||x||,
    `criterion=output` by how much removing each block alone moves the model's outputs.
    `bridge=linear` keeps, for each removed block, y = x + x D + c fitted by ridge least squares
    to the original block's output on calibration tokens (F*F MACs per token instead of the
    block's), in graph order so that each bridge also corrects the ones before it.
    """
    name = "prune-layers"
    requires_static_shapes = True
    options = {
        "count": Option(int, 0, "number of blocks to remove (0: use ratio)"),
        "ratio": Option(float, 0.0, "fraction of the blocks found to remove"),
        "kind": Option(str, "auto", "which blocks: residual, transformer, or auto (transformer "
                       "layers when there are any, else residual blocks)",
                       choices=("auto", "residual", "transformer")),
        "criterion": Option(str, "output", "block importance", choices=("change", "output")),
        "samples": Option(int, 32, "calibration samples for the importance measurement"),
        "bridge": Option(str, "none", "replace removed blocks by the identity (none) or a "
                         "fitted affine map (linear)", choices=("none", "linear")),
        "bridge_samples": Option(int, 256, "calibration samples for fitting bridges"),
        "damp": Option(float, 0.01, "bridge ridge strength relative to the mean diagonal of "
                       "the input Gram matrix"),
    }

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.count < 0 or not 0 <= self.ratio < 1:
            raise OptionError("prune-layers: need count >= 0 and 0 <= ratio < 1")
        kind = self.kind
        if kind == "auto":
            kind = "transformer" if find_blocks(model.graph, ("transformer",)) else "residual"
        blocks = find_blocks(model.graph, (kind,))
        wanted = self.count or int(round(self.ratio * len(blocks)))
        details = {"kind": kind, "blocks_found": [b.describe() for b in blocks]}
        if not blocks or not wanted:
            return PassResult(changed=False, notes=[f"prune-layers: {len(blocks)} {kind} blocks "
                                                    "found, none removed"], details=details)
        if wanted >= len(blocks):
            raise OptionError(f"prune-layers: asked to remove {wanted} of {len(blocks)} {kind} "
                              "blocks; at least one must stay")
        measure = _change_scores if self.criterion == "change" else _output_scores
        scores = measure(model, blocks, ctx, self.samples)
        chosen = sorted(np.argsort(scores, kind="stable")[:wanted])
        if self.bridge == "linear":
            self._bridge(model, [blocks[i] for i in chosen], ctx)
        else:
            # Later blocks first: a block's input may be the output of an earlier chosen
            # block, which stays a live value until that earlier block is itself removed.
            for index in reversed(chosen):
                remove_block(model.graph, blocks[index])
        EliminateDeadCode().run(model, ctx)  # e.g. an attention mask no layer reads any more
        details.update(scores={b.name: s for b, s in zip(blocks, scores)}, bridge=self.bridge,
                       removed=[blocks[i].name for i in chosen])
        return PassResult(changed=True, details=details, notes=[
            f"prune-layers: removed {wanted} of {len(blocks)} {kind} blocks: "
            + ", ".join(blocks[i].name for i in chosen)])

    def _bridge(self, model: Model, chosen: list[Block], ctx: PassContext) -> None:
        """Replace each chosen block (graph order) by a fitted affine bridge."""
        calibration = ctx.require_calibration(model)
        names = [v.name for v in model.graph.inputs]
        mask = "attention_mask" if "attention_mask" in names else None
        targets = bridge_rows(model, [b.output.name for b in chosen], calibration,
                              self.bridge_samples, mask)
        renamed: dict[int, Value] = {}
        for block in chosen:
            source = renamed.get(id(block.input), block.input)
            x = bridge_rows(model, [source.name], calibration, self.bridge_samples,
                            mask)[source.name]
            update, offset = fit_bridge(x, targets[block.output.name], self.damp)
            output = insert_bridge(model.graph, source, update, offset, block.name)
            renamed[id(block.output)] = output
            block.output.replace_all_uses_with(output)
            for node in block.nodes:
                model.graph.detach_inputs(node)
            for node in block.nodes:
                model.graph.remove_node(node)
        model.graph.toposort()
