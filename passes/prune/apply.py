"""Physically remove channels: slice every constant of a group and fix dependent attributes.
Reordering a group's channels (`reorder_channels`) takes the same path with every channel kept."""

from __future__ import annotations

import numpy as np

from ir import Graph

from .groups import ChannelGroup

__all__ = ["kept_indices_of", "remove_channels", "reorder_channels"]


def kept_indices_of(group: ChannelGroup, kept: dict[int, np.ndarray]) -> np.ndarray:
    """Kept channel indices of a group: chosen ones, all of them, or (Concat) its parts'."""
    if group.index in kept:
        return kept[group.index]
    if group.derived_from:
        pieces = [offset + kept_indices_of(part, kept) for part, offset, _ in group.derived_from]
        return np.concatenate(pieces)
    return np.arange(group.size)


def _expand(indices: np.ndarray, span: int) -> np.ndarray:
    if span == 1:
        return indices
    return (indices[:, None] * span + np.arange(span)[None, :]).reshape(-1)


def remove_channels(graph: Graph, groups: list[ChannelGroup], kept: dict[int, np.ndarray]) -> int:
    """Slice the constants of every group whose kept set is smaller than its size.

    Each constant may be sliced along several axes (a Conv weight is sliced along its outputs by
    one group and its inputs by another); slices compose because they touch different axes. A
    constant shared by several nodes is replaced once. Returns the number of channels removed.
    """
    changes: dict[int, tuple] = {}
    removed = 0
    for group in groups:
        indices = kept_indices_of(group, kept)
        if len(indices) == group.size:
            continue
        if group.index in kept:
            removed += group.size - len(indices)
        for action in group.actions:
            _plan(changes, action, _expand(indices, action.span))
        for node in group.depthwise:
            node.attrs["group"] = int(len(indices))
        for node, axis in group.reshapes:
            # The pruned axis becomes -1 ([N, -1] after Flatten, [B, S, -1, 32] for heads): the
            # same target then fits any kept count. Each node gets its own constant because
            # layers often share one shape initializer.
            target = np.array(node.output.shape, dtype=np.int64)
            target[axis] = -1
            node.set_input(1, graph.add_constant(node.name + "_shape", target))
    _apply(graph, changes, "_pruned")
    return removed


def reorder_channels(graph: Graph, orders: list[tuple[ChannelGroup, np.ndarray, bool]],
                     head_bases: list[tuple[ChannelGroup, np.ndarray]] = ()) -> None:
    """Put each group's channels in its order (a permutation) in every constant the group acts
    on; the model computes the same function. With `within_heads` (a heads group whose
    `within_heads_reorderable` is set) the order runs over the heads' entries,
    size * unit_span, so each head's entries can be reordered among themselves.

    `head_bases` go further for heads groups whose head-size axes only meet linear ops: the
    entries x of head h become x B_h (B [heads, head size, head size], each B_h orthogonal).
    Every constant along the group's axis is multiplied by B_h on that axis: a producer's
    columns (x = u W, so x B = u (W B)) and a consumer's rows alike (x W = (x B)(B^T W), and
    row e of B^T W is sum_d B[d, e] W[d], the same product along the rows). Changes of
    several groups compose on a constant they share."""
    changes: dict[int, tuple] = {}
    for group, order, within_heads in orders:
        per_unit = group.unit_span if within_heads else 1
        for action in group.actions:
            _plan(changes, action, _expand(np.asarray(order), action.span // per_unit))
    for group, bases in head_bases:
        for action in group.actions:
            if action.span != bases.shape[1]:
                raise ValueError(f"{action.value.name}: {action.span} entries per head, "
                                 f"not {bases.shape[1]}")
            _plan(changes, action, bases)
    _apply(graph, changes, "_reordered")


def _plan(changes: dict[int, tuple], action, change: np.ndarray) -> None:
    """Record the change of one axis of a constant: indices to take (1-D) or per-head bases
    (3-D). A constant that several nodes of one group read is acted on once per read, always
    with the same change, so each axis keeps one entry and is changed once."""
    value, axes = changes.setdefault(id(action.value), (action.value, {}))
    axes[action.axis] = change


def _apply(graph: Graph, changes: dict[int, tuple], suffix: str) -> None:
    """Swap each changed constant in for every use of the original. Changes of different axes
    compose (a Conv weight's outputs belong to one group, its inputs to another)."""
    for value, axes in changes.values():
        array = value.const
        for axis, change in axes.items():
            if change.ndim == 1:
                array = np.take(array, change, axis=axis)
                continue
            heads, size = change.shape[:2]
            moved = np.moveaxis(array, axis, -1)
            mixed = np.einsum("...hd,hde->...he", moved.reshape(*moved.shape[:-1], heads, size),
                              change).reshape(moved.shape)
            array = np.moveaxis(mixed, -1, axis).astype(value.const.dtype)
        replacement = graph.add_constant(value.name + suffix, np.ascontiguousarray(array))
        replacement.meta.update(value.meta)
        for node, index in value.uses():
            node.set_input(index, replacement)
    graph.remove_unused_constants()
