"""Tokenization for all-MiniLM-L6-v2 with the `tokenizers` library and the package's tokenizer.json.

The ONNX graph has static input shapes, so every sentence is truncated / right-padded to exactly
`seq_len` tokens (`[CLS] ... [SEP] [PAD]...`, pad id 0). Returned arrays are int64 [N, seq_len],
keyed by the graph's input names. token_type_ids are not returned: the graph fixes them to 0,
as sentence-transformers does for single sentences.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .build import package_model_dir

__all__ = ["load_tokenizer", "tokenize"]


@lru_cache(maxsize=None)
def load_tokenizer(seq_len: int = 128):
    """A `tokenizers.Tokenizer` padding/truncating to `seq_len` (one cached instance per length).

    tokenizer.json ships with truncation and padding fixed at 128; both are replaced here.
    """
    from tokenizers import Tokenizer

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 ([CLS] and [SEP]), got {seq_len}")
    tok = Tokenizer.from_file(str(package_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]", direction="right")
    return tok


def tokenize(sentences: list[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: int64 arrays of shape [len(sentences), seq_len]."""
    if isinstance(sentences, str):
        raise TypeError("tokenize() takes a list of sentences, not a single string")
    encodings = load_tokenizer(seq_len).encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, seq_len),
        "attention_mask": np.array([e.attention_mask for e in encodings],
                                   dtype=np.int64).reshape(-1, seq_len),
    }
