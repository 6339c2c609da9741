"""Sparsification: zero weights in unstructured, block or N:M patterns (magnitude, Wanda,
SparseGPT), recording each weight's pattern for the backends. See `sparsify.Sparsify`."""

from .metadata import METADATA_KEY, restore_sparsity_meta, sparsity_of, write_sparsity_property
from .patterns import SparsityPattern, parse_pattern, select_mask
from .sparsegpt import sparsegpt_prune
from .sparsify import Sparsify

__all__ = ["Sparsify", "SparsityPattern", "parse_pattern", "select_mask", "sparsegpt_prune",
           "sparsity_of", "restore_sparsity_meta", "write_sparsity_property", "METADATA_KEY"]
