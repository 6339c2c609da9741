"""sparsify on the real MiniLM: SparseGPT keeps the sentence embeddings closer to the dense model's
than magnitude pruning does (fast, seq_len 32), the issue's cosine bound (slow; 2:4 xfail: not
met) and the cosine of the corrections at the level bench/sparsify_accuracy.py measured (slow); the
slow tests use seq_len 32, where every evaluation sentence fits (same metric as 128).

The fast test sparsifies the six layers of one transformer block only, so that it runs in a few
seconds; the slow tests run the full configurations of bench/sparsify_accuracy.py.
"""

import os

import onnx
import pytest

import ir
import passes

minilm = pytest.importorskip("models.minilm", reason="models.minilm not in this tree")


@pytest.fixture(scope="module")
def dense32():
    return onnx.load(str(minilm.model_path(seq_len=32, batch=1)))


def _cosine(proto) -> float:
    return minilm.cosine_to_reference(proto)["cosine_mean"]


def test_calibration_corpus_is_large_deterministic_and_held_out(tmp_path):
    from models.minilm.corpus import calibration_texts
    from models.minilm.evaluate import EVAL_SENTENCES
    texts = calibration_texts(512)
    assert len(texts) == 512 and len(set(texts)) > 500 and texts == calibration_texts(512)
    assert not set(EVAL_SENTENCES) & set(texts)
    path = minilm.calibration_npz(tmp_path / "c.npz", n=512, seq_len=128)
    import numpy as np
    mask = np.load(path)["attention_mask"]
    assert mask.shape == (512, 128) and mask.sum() > 4 * 1536  # well above FFN-down's inputs


def test_sparsegpt_beats_magnitude_on_one_block(dense32, tmp_path):
    calib = minilm.calibration_npz(tmp_path / "calib.npz", n=48, seq_len=32, corpus="sentences")
    others = "exclude=layer0/*+layer1/*+layer3/*+layer4/*+layer5/*"
    by_method = {}
    for method in ("magnitude", "sparsegpt"):
        out = passes.apply(dense32, f"sparsify:sparsity=0.5:method={method}:samples=48:{others}",
                           calibration=calib)
        by_method[method] = _cosine(out)
    assert by_method["sparsegpt"] > by_method["magnitude"] + 0.01, by_method
    assert by_method["sparsegpt"] > 0.97, by_method


@pytest.mark.slow
def test_block_reconstruction_brings_one_sparse_block_closer(dense32, tmp_path):
    # One transformer block at 2:4; reconstruction tunes its attention and FFN (two blocks cut
    # at their LayerNorms) and leaves the dense blocks after them alone.
    calib = minilm.calibration_npz(tmp_path / "calib.npz", n=96, seq_len=32, corpus="everyday")
    others = "exclude=layer0/*+layer1/*+layer3/*+layer4/*+layer5/*"
    base = f"sparsify:pattern=nm:nm=2of4:method=sparsegpt:samples=96:{others}"
    plain = passes.apply(dense32, base, calibration=calib)
    tuned_model = ir.load_model(dense32)
    report = passes.compress(tuned_model, f"{base}:reconstruct=true:reconstruct_epochs=2",
                             calibration=calib)
    records = report.passes[-1].details["reconstruction"]
    assert [r["output"] for r in records] == [["layer2/attn/layernorm"],
                                              ["layer2/ffn/layernorm"]]
    tuned = ir.to_onnx(tuned_model)
    for proto in (plain, tuned):
        zeros = [init for init in proto.graph.initializer if init.name.endswith("_sparse")]
        assert len(zeros) == 6
    # Measured: 1 - cosine 0.0110 -> 0.0091.
    assert 1 - _cosine(tuned) < 0.9 * (1 - _cosine(plain)), (_cosine(tuned), _cosine(plain))


def test_reordering_and_new_head_bases_keep_the_real_model_unchanged(dense32):
    # The exporter's real attention graph: every FFN group gets a random order and every head a
    # random orthogonal basis (what `reorder=true` may apply); the embeddings must not move.
    import numpy as np

    import ir
    from passes.prune.apply import reorder_channels
    from passes.sparsify.layers import find_targets
    from passes.sparsify.permute import reorder_candidates
    model = ir.load_model(dense32)
    passes.prepare(model)
    candidates = reorder_candidates(model.graph, find_targets(model.graph, ["MatMul"]), 4)
    heads = [c for c in candidates if c.within_heads]
    ffn = [c for c in candidates if not c.within_heads]
    assert len(heads) == 6 and len(ffn) == 6 and all(c.rotatable for c in heads)
    rng = np.random.default_rng(0)
    size = heads[0].group.unit_span
    bases = [(c.group, np.stack([np.linalg.qr(rng.standard_normal((size, size)))[0]
                                 for _ in range(c.group.size)])) for c in heads]
    reorder_channels(model.graph, [(c.group, rng.permutation(c.group.size), False) for c in ffn],
                     bases)
    result = minilm.cosine_to_reference(ir.to_onnx(model))
    assert result["cosine_min"] > 0.99999, result


OUTPUT_SCAN = ("sparsify:sparsity=0.5:method=sparsegpt:schedule=output:scan_samples=128:"
               "scan_outputs=sentence_embedding")


METRIC = "output_metric=full:scan_samples=128:scan_outputs=sentence_embedding"
BEST_50 = f"{OUTPUT_SCAN}:error_correction=true:admm=true:output_metric=full"
BEST_24 = f"sparsify:pattern=nm:nm=2of4:method=sparsegpt:error_correction=true:admm=true:{METRIC}"


def _sparsify_minilm(spec, dense32, tmp_path, samples=512):
    calib = minilm.calibration_npz(tmp_path / "calib.npz", n=samples, seq_len=32, corpus="prose")
    return passes.apply(dense32, f"{spec}:samples={samples}", calibration=calib)


@pytest.mark.slow
def test_issue_bound_sparsegpt_cosine_50_percent(dense32, tmp_path):
    out = _sparsify_minilm(BEST_50, dense32, tmp_path)
    assert _cosine(out) >= float(os.environ.get("SPARSIFY_MINILM_COSINE", "0.97"))


@pytest.mark.slow
@pytest.mark.xfail(reason="not met from 512 prose sentences (0.908); met from 17861 everyday "
                          "texts with block reconstruction, see the next test and "
                          "bench/results/sparsify.md", strict=False)
def test_issue_bound_sparsegpt_cosine_2_4(dense32, tmp_path):
    out = _sparsify_minilm(BEST_24, dense32, tmp_path)
    assert _cosine(out) >= float(os.environ.get("SPARSIFY_MINILM_COSINE", "0.97"))


# The 2:4 configuration that meets the bound (bench/sparsify_accuracy.py's "..., block
# reconstruction" row): ~30 minutes on 2 cores, ~9 GiB of memory.
BEST_24_EVERYDAY = (
    "sparsify:pattern=nm:nm=2of4:method=sparsegpt:error_correction=true:admm=true:"
    "output_metric=full:scan_samples=1024:scan_outputs=sentence_embedding:reorder=true:"
    "bias_correction=true:residual_correction=true:reconstruct=true:reconstruct_samples=2048")


@pytest.mark.slow
def test_issue_bound_sparsegpt_cosine_2_4_everyday(dense32, tmp_path):
    from models.minilm.corpus import held_out_everyday
    samples = 17861
    calib = minilm.calibration_npz(tmp_path / "calib.npz", n=samples, seq_len=32,
                                   corpus="everyday")
    out = passes.apply(dense32, f"{BEST_24_EVERYDAY}:samples={samples}", calibration=calib)
    assert _cosine(out) >= float(os.environ.get("SPARSIFY_MINILM_COSINE", "0.97"))
    # Text it did not see: the held-out everyday lines (measured 0.9665).
    assert minilm.cosine_to_reference(out, sentences=held_out_everyday())["cosine_mean"] > 0.96


# (spec, cosine measured by bench/sparsify_accuracy.py at seq_len 32 with 512 prose sentences)
MEASURED = [
    ("sparsify:sparsity=0.5:method=sparsegpt:error_correction=true", 0.9197),
    ("sparsify:sparsity=0.5:method=sparsegpt:refit=true", 0.9249),
    ("sparsify:sparsity=0.5:method=sparsegpt:error_correction=true:refit=true", 0.9280),
    ("sparsify:pattern=nm:nm=2of4:method=sparsegpt:error_correction=true:refit=true", 0.8800),
    ("sparsify:sparsity=0.5:method=sparsegpt:error_correction=true:admm=true", 0.9411),
    (OUTPUT_SCAN, 0.9323),
    (f"{OUTPUT_SCAN}:error_correction=true:admm=true", 0.9604),
    (f"sparsify:sparsity=0.5:method=sparsegpt:error_correction=true:admm=true:{METRIC}", 0.9556),
    (BEST_24, 0.9075),
    ("sparsify:pattern=nm:nm=2of4:method=sparsegpt:reorder=true", 0.8486),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec,measured", MEASURED)
def test_minilm_cosine_stays_at_the_measured_level(spec, measured, dense32, tmp_path):
    """The corrections' measured cosine (bench/results/sparsify.md) minus a 0.01 margin."""
    assert _cosine(_sparsify_minilm(spec, dense32, tmp_path)) >= measured - 0.01
