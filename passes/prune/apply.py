"""Physically remove channels: slice every constant of a group and fix dependent attributes."""

from __future__ import annotations

import numpy as np

from ir import Graph

from .groups import ChannelGroup

__all__ = ["kept_indices_of", "remove_channels"]


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
    slices: dict[int, tuple] = {}
    removed = 0
    for group in groups:
        indices = kept_indices_of(group, kept)
        if len(indices) == group.size:
            continue
        if group.index in kept:
            removed += group.size - len(indices)
        for action in group.actions:
            value, axes = slices.get(id(action.value), (action.value, {}))
            axes[action.axis] = _expand(indices, action.span)
            slices[id(action.value)] = (value, axes)
        for node in group.depthwise:
            node.attrs["group"] = int(len(indices))
        for node, axis in group.reshapes:
            # The pruned axis becomes -1 ([N, -1] after Flatten, [B, S, -1, 32] for heads): the
            # same target then fits any kept count. Each node gets its own constant because
            # layers often share one shape initializer.
            target = np.array(node.output.shape, dtype=np.int64)
            target[axis] = -1
            node.set_input(1, graph.add_constant(node.name + "_shape", target))
    for value, axes in slices.values():
        array = value.const
        for axis, indices in axes.items():
            array = np.take(array, indices, axis=axis)
        replacement = graph.add_constant(value.name + "_pruned", np.ascontiguousarray(array))
        replacement.meta.update(value.meta)
        for node, index in value.uses():
            node.set_input(index, replacement)
    graph.remove_unused_constants()
    return removed
