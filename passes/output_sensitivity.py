"""How strongly a small change of an intermediate tensor reaches the model's outputs, per
channel: the Gauss-Newton matrix of the outputs with respect to that tensor, from gradients.

A layer's own error weighs all of its output channels alike, but the model does not: a channel
that the next LayerNorm scales down, that the next layer reads with small weights, or that an
attention head ignores matters less than its neighbours. For a tensor y with channels on one axis
and the graph outputs f, the matrix

    M = E_rows[ J^T J ],   J = d f / d y_row    (rows: tokens or pixels; padding left out)

says what an error e in one row costs at the outputs, e^T M e (to first order, rows taken as
independent). A layer y = W x whose weights change by dW then costs tr(dW H dW^T M), H = E[x x^T]:
its rows (output channels) are weighted by M instead of the identity.

J^T J is estimated without forming J (Hutchinson): for random sign vectors v over the outputs,
E_v[(J^T v)(J^T v)^T] = J^T J, and J^T v is one backward sweep. onnxruntime computes the forward
tensors of the calibration feeds; the sweep runs in numpy over the nodes between the probed
tensors and the outputs (`vjp`), `probes` directions at once. Several outputs are weighted by
1 / their mean energy, so each output counts as its relative change does (as in `OutputProbe`).
Cost per calibration sample: one onnxruntime run that keeps every tensor on the path, and one
backward sweep holding up to `probes` gradients of each live tensor.
"""

from __future__ import annotations

import numpy as np

from ir import Model, Node, Value, downstream_nodes, to_onnx

from .calibration import CalibrationSet, capture_session, make_session, real_token_rows
from .vjp import NotDifferentiable, pull_back

__all__ = ["output_sensitivity", "layer_output_metrics", "normalized_metric", "NotDifferentiable",
           "METRIC_DAMP"]

FLOAT_KINDS = "f"
# Added x I to a full metric scaled to a mean diagonal of 1: the estimate comes from a few
# samples, and output directions it has not seen still cost something.
METRIC_DAMP = 0.1


def output_sensitivity(model: Model, values: list[Value], calibration: CalibrationSet,
                       samples: int, mask_name: str | None = None,
                       outputs: list[str] | None = None, probes: int = 16, seed: int = 0,
                       channel_axis: dict[str, int] | None = None,
                       matrix: bool = False) -> dict[str, np.ndarray]:
    """Per probed value name, E_rows[J^T J] over its channel axis (default: the last axis; a
    Conv output has its channels on axis 1): a [C, C] matrix with `matrix`, else its diagonal.

    Raises NotDifferentiable when an op between the values and the outputs has no gradient
    rule, and KeyError for an output name that is not a float graph output."""
    graph = model.graph
    chosen = _chosen_outputs(graph, outputs)
    path = _path_nodes(graph, values, chosen)
    probed = {v.name for v in values}
    axes = {v.name: (channel_axis or {}).get(v.name, -1) for v in values}
    captured = sorted({v.name for node in path for v in (*node.inputs, *node.outputs)
                       if v is not None and not v.is_constant and not v.is_graph_input()}
                      | {o.name for o in chosen} | {v.name for v in values})
    feeds = calibration.feeds(model, samples)
    masks = [feed.get(mask_name) if mask_name else None for feed in feeds]
    weights = _output_weights(model, chosen, feeds, masks)
    session = capture_session(model, captured)
    rng = np.random.default_rng(seed)
    sums = {name: None for name in probed}
    channels = {}
    rows = dict.fromkeys(probed, 0)
    for feed, mask in zip(feeds, masks):
        forward = dict(feed)
        forward.update(zip(captured, session.run(captured, feed)))
        channels.update({name: forward[name].shape[axes[name]] for name in probed})
        seeds = {}
        for output in chosen:
            data = forward[output.name]
            signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (probes, *data.shape))
            if mask is not None and data.ndim >= mask.ndim and data.shape[:mask.ndim] == mask.shape:
                signs *= np.asarray(mask, dtype=np.float32).reshape(
                    (1, *mask.shape) + (1,) * (data.ndim - mask.ndim))
            seeds[output.name] = signs * weights[output.name]
        grads = _backward(model, path, forward, seeds, probed)
        for name in probed:
            grad = grads.get(name)
            if grad is None:
                continue
            channel_rows = _channel_rows(grad, axes[name], mask)
            rows[name] += channel_rows.shape[0] // probes
            # float32 products (a few hundred rows each), summed in float64.
            update = (channel_rows.T @ channel_rows if matrix
                      else (channel_rows ** 2).sum(axis=0)).astype(np.float64)
            sums[name] = update if sums[name] is None else sums[name] + update
    result = {}
    for value in values:
        total = sums[value.name]
        if total is None:  # the value does not reach the chosen outputs
            size = channels.get(value.name, 0)
            total = np.zeros((size, size) if matrix else size)
        result[value.name] = total / max(1, rows[value.name] * probes)
    return result


def _chosen_outputs(graph, names: list[str] | None) -> list[Value]:
    floats = [v for v in graph.outputs if v.dtype is None or v.dtype.kind == FLOAT_KINDS]
    if not names:
        return floats
    by_name = {v.name: v for v in floats}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise KeyError(f"{unknown[0]!r} is not a float graph output "
                       f"(float outputs: {', '.join(by_name) or 'none'})")
    return [by_name[name] for name in names]


def _path_nodes(graph, values: list[Value], outputs: list[Value]) -> list[Node]:
    """The nodes on some path from a probed value to a chosen output, in graph order."""
    downstream = downstream_nodes(node for value in values for node in value.consumers())
    upstream: set[int] = set()
    frontier = [v.producer for v in outputs if v.producer is not None]
    while frontier:
        node = frontier.pop()
        if id(node) in upstream:
            continue
        upstream.add(id(node))
        frontier.extend(v.producer for v in node.all_inputs() if v.producer is not None)
    path = [node for node in graph.nodes if id(node) in downstream and id(node) in upstream]
    for node in path:
        if node.subgraphs():
            raise NotDifferentiable(f"no gradient through control flow ({node.op_type} "
                                    f"node {node.name!r})")
    return path


def _output_weights(model, outputs, feeds, masks) -> dict[str, float]:
    """1 / sqrt(mean energy per feed) for each output, so that every output's squared change
    counts relative to its size (padding rows left out)."""
    if len(outputs) == 1:
        return {outputs[0].name: 1.0}
    session = make_session(to_onnx(model))
    names = [o.name for o in outputs]
    energy = dict.fromkeys(names, 0.0)
    for feed, mask in zip(feeds, masks):
        for name, data in zip(names, session.run(names, feed)):
            energy[name] += float((real_token_rows(np.asarray(data, np.float64), mask) ** 2).sum())
    return {name: 1.0 / np.sqrt(max(total / max(1, len(feeds)), 1e-30))
            for name, total in energy.items()}


def _backward(model: Model, path: list[Node], forward: dict, seeds: dict,
              keep: set[str]) -> dict[str, np.ndarray]:
    """Gradients (with the probe axis) of every value on the path, seeded at the outputs; only
    the gradients named in `keep` are returned (the others are freed as the sweep goes)."""
    grads = dict(seeds)
    reachable = {v.name for node in path for v in node.outputs if v is not None} | keep
    opset = model.opset
    for node in reversed(path):
        out_grads = [grads.get(v.name) if v is not None else None for v in node.outputs]
        for value in node.outputs:
            if value is not None and value.name not in keep:
                grads.pop(value.name, None)
        if all(grad is None for grad in out_grads):
            continue
        inputs = [None if v is None else (v.const if v.is_constant else forward[v.name])
                  for v in node.inputs]
        outputs = [None if v is None else forward[v.name] for v in node.outputs]
        wanted = [value is not None and not value.is_constant and value.name in reachable
                  and np.asarray(forward[value.name]).dtype.kind == FLOAT_KINDS
                  for value in node.inputs]
        pulled = pull_back(node, out_grads, inputs, outputs, opset, wanted=wanted)
        for value, grad, want in zip(node.inputs, pulled, wanted):
            if grad is None or not want:
                continue
            grads[value.name] = grad if value.name not in grads else grads[value.name] + grad
    return {name: grads[name] for name in keep if name in grads}


def _channel_rows(grad: np.ndarray, axis: int, mask) -> np.ndarray:
    """[probes * rows, C] from a [probes, *shape] gradient: channels last, padding rows out."""
    moved = np.moveaxis(grad, axis if axis < 0 else axis + 1, -1)
    per_probe = [real_token_rows(moved[k], mask).reshape(-1, moved.shape[-1])
                 for k in range(moved.shape[0])]
    return np.concatenate(per_probe).astype(np.float32)


def normalized_metric(sensitivity: np.ndarray, damp: float = METRIC_DAMP) -> np.ndarray | None:
    """A sensitivity from `output_sensitivity` as a layer's error metric: scaled to a mean
    diagonal of 1 (a layer's own error scale stays), plus `damp` x I when it is a full matrix;
    None when nothing reaches the outputs (every direction alike)."""
    diagonal = np.diag(sensitivity) if sensitivity.ndim == 2 else sensitivity
    mean = float(diagonal.mean()) if diagonal.size else 0.0
    if mean <= 0:
        return None
    metric = sensitivity / mean
    return metric + damp * np.eye(len(metric)) if metric.ndim == 2 else metric


def layer_output_metrics(model: Model, nodes: list[Node], calibration: CalibrationSet,
                         samples: int, mask_name: str | None, outputs: list[str], seed: int,
                         full: bool, label: str,
                         damp: float = METRIC_DAMP) -> dict[str, np.ndarray]:
    """For a pass: {node name: `normalized_metric` of the node's output} for linear layers
    (MatMul/Gemm outputs: channels last; Conv: axis 1), `damp` x I added to full metrics. An
    unknown output name or an op without a gradient rule is the pass's OptionError, prefixed by
    `label` (e.g. the pass name)."""
    from .core import OptionError
    values = list({id(node): node.output for node in nodes}.values())
    axes = {node.output.name: 1 for node in nodes if node.op_type == "Conv"}
    try:
        sensitivity = output_sensitivity(model, values, calibration, samples, mask_name,
                                         outputs or None, seed=seed, channel_axis=axes,
                                         matrix=full)
    except KeyError as exc:
        raise OptionError(f"{label}: scan_outputs: {exc.args[0]}") from None
    except NotDifferentiable as exc:
        raise OptionError(f"{label}: {exc}") from None
    metrics = {node.name: normalized_metric(sensitivity[node.output.name], damp)
               for node in nodes}
    return {name: metric for name, metric in metrics.items() if metric is not None}
