"""Input orders for N:M sparsity: reorder the channels that layers read so that each group of M
consecutive inputs mixes important and unimportant weights, and an N:M mask keeps more of what
matters (Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021).

An N:M mask keeps the N largest of every M consecutive inputs of a row. When the important
inputs of a layer sit next to each other (four strong FFN units in a row, say), every mask must
drop some of them while other groups keep weak ones. Reordering the channels is free when the
whole channel group moves together (`prune.groups`): the producer's output channels, every
parameter along them and the consumer's input rows, so the model computes exactly the same
function and the stored weights stay a plain N:M layout.

What moves:
- a channel group that is free to prune (an FFN's hidden units, a 1x1 conv's input channels),
  ordered for the consumers it feeds whose N:M groups run over its channels one by one (MatMul,
  Gemm, 1x1 Conv; a consumer reading `span` features per channel with span % M == 0 is
  indifferent to the order);
- attention heads: the entries inside each head (Q/K/V's columns and the output projection's
  rows), each head by its own order, when the analysis proved the head-size axes carry nothing
  else (`ChannelGroup.within_heads_reorderable`); the heads themselves stay in place, since
  whole heads never share an N:M group when the head size is a multiple of M. When every op on
  the head-size axes is also linear (reshapes, transposes, Q K^T, attention x V, scaling) and
  the output projection's input statistics are at hand, each head gets a new orthogonal basis
  instead (`choose_head_basis`): its output's principal directions, interleaved so that each
  group of M mixes strong and weak ones. A mask then drops mostly weak directions, which no
  reordering of the original entries can isolate (SparseGPT 2:4 on MiniLM's six output
  projections: layer error 19-29% lower, against 6-9% lower for reordering alone).
Groups tied to a Concat, frozen groups, and groups whose size is not a multiple of M stay as
they are.

The order maximises the saliency an N:M mask keeps, summed over the consumers' rows: the square
of the Wanda score, (|w| x input norm)^2. It serves masks that see the activations (Wanda,
SparseGPT). For a magnitude mask no grouping reliably lowers the output error (2:4 on 1x1
convs, bench/results/sparsify.md: ordered for |w|^2 or for the Wanda score, the output error
rose on random-weight ResNet50 and SqueezeNet), so the pass refuses that combination.

The search is the greedy channel swap: for each channel, the swap with another group's channel
that gains the most, applied at once, over sweeps until no swap gains. With A_c = the best N of
c's group without c and B_c = the N-th largest of those (per row), putting y in c's place keeps
A_c + max(0, y - B_c), so all swap gains of one channel cost two [rows, K] passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ir import Graph

from ..prune.apply import reorder_channels
from ..prune.groups import ChannelGroup, analyze_groups
from .layers import SparsifyTarget
from .patterns import SparsityPattern

__all__ = ["ReorderCandidate", "reorder_candidates", "nm_order", "kept_saliency",
           "choose_order", "choose_head_basis", "reorder_for_nm"]

MAX_SWEEPS = 3  # the first sweep finds most of the gain; later ones add ~0.1%


@dataclass
class ReorderCandidate:
    """A channel group whose order matters to some N:M consumers (the targets reading one input
    column per channel), and whether the order runs inside heads."""
    group: ChannelGroup
    consumers: list[SparsifyTarget]
    within_heads: bool
    rotatable: bool = False  # within heads, and every op on the head-size axes is linear

    @property
    def blocks(self) -> int:
        """Independent orders: one per head, or one for the whole group."""
        return self.group.size if self.within_heads else 1


def _consumer_axis(target: SparsifyTarget) -> int | None:
    """Axis of the stored weight that the [out, in] view's columns come from, when each column
    is one input channel (Conv only with 1x1 kernels and no groups)."""
    if target.op_type == "Conv":
        return 1 if target.groups == 1 and all(k == 1 for k in target.kernel) else None
    return 0 if target.transposed else 1


def reorder_candidates(graph: Graph, targets: list[SparsifyTarget], m: int
                       ) -> list[ReorderCandidate]:
    """Channel groups of the graph whose order changes the N:M groups of some target."""
    by_weight = {(id(t.node), id(t.weight)): t for t in targets}
    groups = analyze_groups(graph)
    concat_parts = {id(part) for g in groups for part, _, _ in g.derived_from}
    found = []
    for group in groups:
        if not group.prunable or id(group) in concat_parts:
            continue
        within_heads = group.kind == "heads"
        if within_heads and (not group.within_heads_reorderable or group.unit_span % m):
            continue
        unit = group.unit_span if within_heads else 1
        consumers, indifferent = [], True
        for action in group.actions:
            target = by_weight.get((id(action.node), id(action.value)))
            if action.role != "sink" or target is None:
                continue
            span = action.span // unit
            if _consumer_axis(target) == action.axis and span == 1:
                consumers.append(target)
            elif span % m:
                indifferent = False  # its N:M groups straddle channels: order not modelled
        if consumers and indifferent and (group.size * unit) % m == 0:
            rotatable = within_heads and _linear_in_head_entries(group.head_size_classes)
            found.append(ReorderCandidate(group, consumers, within_heads, rotatable))
    return found


def _linear_in_head_entries(classes: list[ChannelGroup]) -> bool:
    """True when every op touching the head-size axes is linear in them, so that an orthogonal
    change of basis inside each head leaves the model's function unchanged (a reordering only
    needs the ops to treat entries alike): head reshapes, Transpose, Identity; MatMul with one
    operand carrying the axis, or both contracting it (Q K^T, both in the same basis); Mul by
    (or Div of a carrying numerator by) something broadcast along it; Add/Sub of operands that
    all carry it."""
    axes: dict[int, list[int]] = {}
    for size_class in classes:
        for value, axis in size_class.dims:
            axes.setdefault(id(value), []).append(axis)
    if any(len(found) != 1 for found in axes.values()):
        return False
    values = {id(value): value for size_class in classes for value, _ in size_class.dims}
    nodes = {}
    for value in values.values():
        for node in [value.producer, *(user for user, _ in value.uses())]:
            if node is not None:
                nodes[id(node)] = node
    for node in nodes.values():
        carried = [i for i, x in enumerate(node.inputs) if x is not None and id(x) in values]
        op = node.op_type
        if op in ("Reshape", "Transpose", "Identity") or (op == "Mul" and len(carried) == 1) \
                or (op == "Div" and carried == [0]) \
                or (op in ("Add", "Sub") and len(carried) == len(node.inputs)):
            continue
        if op == "MatMul":
            if len(carried) < 2:
                continue
            a, b = node.inputs
            if axes[id(a)][0] == len(a.shape) - 1 and axes[id(b)][0] == len(b.shape) - 2:
                continue
        return False
    return True


def kept_saliency(saliency: np.ndarray, n: int, m: int) -> float:
    """What an N:M mask keeps of `saliency` [rows, K] (K a multiple of M)."""
    grouped = np.sort(saliency.reshape(saliency.shape[0], -1, m), axis=2)
    return float(grouped[..., m - n:].sum())


def nm_order(saliency: np.ndarray, n: int, m: int, sweeps: int = MAX_SWEEPS) -> np.ndarray:
    """A column order of `saliency` [rows, K] (K a multiple of M, 0 < N < M) whose N:M mask
    keeps at least as much as the identity order (greedy swaps, see the module docstring).
    The search runs in float32 with preallocated buffers: it is two [rows, K] passes per
    channel per sweep, and memory traffic is its whole cost."""
    p = np.array(saliency, dtype=np.float32, copy=True)
    k = p.shape[1]
    order = np.arange(k)
    group_of = order // m
    best_others = np.empty_like(p)   # A: sum of the best N of the group without the column
    nth_other = np.empty_like(p)     # B: the N-th largest of the group without the column
    loss = np.empty(k, dtype=np.float32)  # over rows, A minus the group's kept sum (<= 0)
    buffer = np.empty_like(p)

    def refresh(g: int) -> None:
        cols = slice(g * m, (g + 1) * m)
        block = p[:, cols]
        ranked = np.argsort(block, axis=1, kind="stable")
        rank = np.empty_like(ranked)
        np.put_along_axis(rank, ranked, np.arange(m)[None, :].repeat(len(block), 0), axis=1)
        ordered = np.take_along_axis(block, ranked, axis=1)
        top = ordered[:, m - n:].sum(axis=1, keepdims=True)
        kept = rank >= m - n
        replacement = ordered[:, m - n - 1:m - n]   # the best of those left out
        best_others[:, cols] = np.where(kept, top - block + replacement, top)
        nth_other[:, cols] = np.where(kept, replacement, ordered[:, m - n:m - n + 1])
        loss[cols] = best_others[:, cols].sum(axis=0) - top.sum()

    for g in range(k // m):
        refresh(g)
    threshold = 1e-7 * kept_saliency(saliency, n, m)
    for _ in range(sweeps):
        swaps = 0
        for a in range(k):
            np.subtract(p, nth_other[:, a:a + 1], out=buffer)
            np.maximum(buffer, 0.0, out=buffer)
            gain = buffer.sum(axis=0)
            np.subtract(p[:, a:a + 1], nth_other, out=buffer)
            np.maximum(buffer, 0.0, out=buffer)
            gain += buffer.sum(axis=0) + loss + loss[a]
            gain[group_of == group_of[a]] = -np.inf
            b = int(np.argmax(gain))
            if gain[b] <= threshold:
                continue
            p[:, [a, b]] = p[:, [b, a]]
            order[[a, b]] = order[[b, a]]
            refresh(group_of[a])
            refresh(group_of[b])
            swaps += 1
        if not swaps:
            break
    # float32 gains could accept a swap that loses in exact arithmetic: never return worse.
    if kept_saliency(saliency[:, order], n, m) < kept_saliency(saliency, n, m):
        return np.arange(k)
    return order


def choose_order(candidate: ReorderCandidate, saliency: np.ndarray, n: int, m: int
                 ) -> tuple[np.ndarray, dict]:
    """The order of the candidate's channels for `saliency` (its consumers' rows stacked,
    columns in channel or head-entry order), and a record of what the mask keeps before and
    after (relative to all the saliency)."""
    blocks = candidate.blocks
    width = saliency.shape[1] // blocks
    order = np.concatenate([
        b * width + nm_order(saliency[:, b * width:(b + 1) * width], n, m)
        for b in range(blocks)])
    total = max(float(saliency.sum()), 1e-300)
    record = {"consumers": [t.node.name for t in candidate.consumers],
              "kind": "entries within heads" if candidate.within_heads else "channels",
              "channels": int(len(order)), "moved": int((order != np.arange(len(order))).sum()),
              "kept_before": round(kept_saliency(saliency, n, m) / total, 4),
              "kept_after": round(kept_saliency(saliency[:, order], n, m) / total, 4)}
    return order, record


def choose_head_basis(candidate: ReorderCandidate, weights: list[np.ndarray],
                      hessian: np.ndarray, n: int, m: int) -> tuple[np.ndarray, dict]:
    """Orthogonal bases B [heads, size, size] for a rotatable heads candidate: per head, the
    eigenvectors of its consumers' input second moment `hessian` [features, features] (so the
    head's entries become uncorrelated and their energy concentrates in a few of them), put in
    the order `nm_order` picks for the saliency in that basis, (W B)^2 x eigenvalue. The
    consumers' [out, in] `weights` are stacked. A mask then drops mostly the weak directions
    of every head, which a reordering of the original entries cannot isolate."""
    heads, size = candidate.group.size, candidate.group.unit_span
    stacked = np.vstack(weights)
    saliency = stacked ** 2 * np.maximum(np.diag(hessian), 0.0)[None, :]
    bases, rotated = np.empty((heads, size, size)), np.empty_like(saliency)
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        energy, vectors = np.linalg.eigh(hessian[cols, cols])
        head_saliency = (stacked[:, cols] @ vectors) ** 2 * np.maximum(energy, 0.0)[None, :]
        order = nm_order(head_saliency, n, m)
        bases[h] = vectors[:, order]
        rotated[:, cols] = head_saliency[:, order]
    # Each fraction is of its own basis's total: diag(H) ignores the correlations that the
    # eigenbasis removes, so the two totals differ.
    record = {"consumers": [t.node.name for t in candidate.consumers],
              "kind": "basis within heads", "channels": heads * size, "moved": heads * size,
              "kept_before": round(kept_saliency(saliency, n, m) / max(saliency.sum(), 1e-300), 4),
              "kept_after": round(kept_saliency(rotated, n, m) / max(rotated.sum(), 1e-300), 4)}
    return bases, record


def reorder_for_nm(graph: Graph, targets: list[SparsifyTarget], pattern: SparsityPattern,
                   statistics, scores, progress=None) -> list[dict]:
    """Reorder (and give rotatable heads new bases) every candidate group of `graph` for the
    N:M `pattern` of `targets`, in place; returns one record per group.

    `statistics(targets, full)` gives their InputStatistics (full: with the Hessian, needed for
    head bases), `scores(target, statistics)` the [out, in] importance whose square is the
    saliency. All orders are chosen on the unchanged graph and applied together: a group's
    change only moves or mixes the rows of another group's consumers, never their N:M groups."""
    candidates = reorder_candidates(graph, targets, pattern.m)
    readers = {id(t.node): t for c in candidates for t in c.consumers}
    rotating = {id(t.node) for c in candidates if c.rotatable for t in c.consumers}
    stats = {}
    for full in (False, True):
        chosen = [t for key, t in readers.items() if (key in rotating) == full]
        if chosen:
            stats.update(zip([id(t.node) for t in chosen], statistics(chosen, full)))
    orders, bases, records = [], [], []
    steps = progress(candidates, total=len(candidates), desc="sparsify: reorder") \
        if progress else candidates
    for candidate in steps:
        if candidate.rotatable:
            hessian = sum(stats[id(t.node)].hessian() for t in candidate.consumers)
            basis, record = choose_head_basis(candidate, [t.matrix() for t in candidate.consumers],
                                              hessian, pattern.n, pattern.m)
            bases.append((candidate.group, basis))
        else:
            saliency = np.vstack([scores(t, stats[id(t.node)]) ** 2 for t in candidate.consumers])
            order, record = choose_order(candidate, saliency, pattern.n, pattern.m)
            orders.append((candidate.group, order, candidate.within_heads))
        records.append(record)
    reorder_channels(graph, orders, bases)
    return records
