"""criterion=obs on all-MiniLM-L6-v2 (the configuration of bench/prune_minilm.py's table, at a
shorter sequence and fewer calibration sentences to stay within a few minutes): 25% of the heads
and 30% of the FFN units go, the totals hold, and the sentence-embedding cosine to the original
stays above what was measured (minus a margin) and well above the l1 baseline."""

import pytest

import ir
import passes
from models.minilm import calibration_npz, cosine_to_reference, model_path

# Measured with this exact setup (seq_len 32, 128 prose sentences): 0.8623 (l1: 0.7197). It
# ran 22 minutes on the shared 2-core machine under a load of ~20, a few minutes when idle.
MEASURED_COSINE = 0.8623


def _prune_minilm(tmp_path, seq_len: int, samples: int, options: str, corpus: str = "prose"):
    """MiniLM with 25% of its heads and 30% of its FFN units removed by criterion=obs; checks
    the totals and returns (model, report, reference path)."""
    reference = model_path(seq_len=seq_len)
    calib = calibration_npz(tmp_path / "calib.npz", n=samples, seq_len=seq_len, corpus=corpus)
    model = ir.load_model(reference)
    report = passes.compress(model, "prune-channels:ratio=0.3:head_ratio=0.25:criterion=obs:"
                             f"samples={samples}:{options}", calibration=calib)
    groups = report.passes[-1].details["kept_per_group"]
    heads = [g for g in groups if g["kind"] == "heads"]
    units = [g for g in groups if g["kind"] != "heads"]
    assert len(heads) == len(units) == 6
    assert sum(g["kept"] for g in heads) == 54  # 72 heads - 25%
    assert abs(sum(g["kept"] for g in units) - 0.7 * 6 * 1536) <= 8  # rounded to steps of 8
    return model, report, reference


@pytest.mark.slow
def test_obs_keeps_minilm_embeddings(tmp_path):
    model, _, reference = _prune_minilm(tmp_path, 32, 128, "target=residual:schedule=global")
    cosine = cosine_to_reference(ir.to_onnx(model), reference)["cosine_mean"]
    l1 = ir.load_model(reference)
    passes.compress(l1, "prune-channels:ratio=0.3:head_ratio=0.25:criterion=l1")
    assert cosine > cosine_to_reference(ir.to_onnx(l1), reference)["cosine_mean"] + 0.08
    assert cosine >= MEASURED_COSINE - 0.02


# bench/prune_minilm.py's rows (seq_len 64, 512 prose sentences): 0.9218 (154 s when idle) and,
# with the output metric, 0.9279 (253 s).
OUTPUT_SCAN = "sequential=false:schedule=output:scan_outputs=sentence_embedding"


@pytest.mark.slow
@pytest.mark.parametrize("options,measured", [(OUTPUT_SCAN, 0.9218),
                                              (f"{OUTPUT_SCAN}:output_metric=true", 0.9279)])
def test_output_scan_allocation_at_the_measured_level(tmp_path, options, measured):
    model, report, reference = _prune_minilm(tmp_path, 64, 512, options)
    pruned = report.passes[-1].details["obs"]  # the groups that lost units
    assert len(pruned) >= 10 and all("output_scan" in g for g in pruned)
    cosine = cosine_to_reference(ir.to_onnx(model), reference)["cosine_mean"]
    assert cosine >= measured - 0.01


@pytest.mark.slow
def test_issue_bound_with_everyday_calibration(tmp_path):
    """Issue #3's bound (cosine >= 0.95) with the best configuration calibrated on everyday
    sentences, on the evaluation sentences and on the everyday lines calibration never saw
    (bench/prune_minilm.py --corpus everyday: 0.9674 and 0.9616)."""
    from models.minilm.corpus import held_out_everyday

    model, _, reference = _prune_minilm(tmp_path, 64, 512, f"{OUTPUT_SCAN}:output_metric=true",
                                        corpus="everyday")
    proto = ir.to_onnx(model)
    assert cosine_to_reference(proto, reference)["cosine_mean"] >= 0.95
    assert cosine_to_reference(proto, reference, held_out_everyday())["cosine_mean"] >= 0.95
