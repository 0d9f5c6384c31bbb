"""Metrics checked against numbers worked out by hand from the definitions in docs/reference.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharedris.metrics import (
    METRIC_KEYS,
    THRESHOLDS,
    RISMeter,
    compute_ris_metrics,
    format_table,
)


def mask(*rows: str) -> np.ndarray:
    """Build a boolean HxW mask from strings such as ``"1100"``."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


def random_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.random((6, 7)) < 0.5, rng.random((6, 7)) < 0.5) for _ in range(n)]


def test_three_pairs_by_hand() -> None:
    preds = [mask("1110", "0000"), mask("1000", "0000"), mask("0110", "0100")]
    gts = [mask("0111", "0000"), mask("0100", "0010"), mask("0110", "0100")]
    # I/U per pair: 2/4, 0/3, 3/3 -> ΣI/ΣU = 5/10; IoUs 0.5, 0, 1.
    results = compute_ris_metrics(preds, gts)
    assert list(results) == list(METRIC_KEYS)
    assert results["oIoU"] == pytest.approx(5 / 10)
    assert results["mIoU"] == pytest.approx((0.5 + 0 + 1) / 3)
    # IoU exactly 0.5 counts for P@0.5 (>=); only the perfect pair reaches 0.6 and above.
    assert results["P@0.5"] == pytest.approx(2 / 3)
    for key in ("P@0.6", "P@0.7", "P@0.8", "P@0.9"):
        assert results[key] == pytest.approx(1 / 3)


def test_empty_prediction_ground_truth_and_both() -> None:
    preds = [mask("0000", "0000"), mask("1100", "0000"), mask("0000", "0000"), mask("0011", "0000")]
    gts = [mask("1111", "0000"), mask("0000", "0000"), mask("0000", "0000"), mask("0011", "0000")]
    # I/U: empty pred 0/4, empty gt 0/2, both empty 0/0 (IoU 0), perfect 2/2.
    results = compute_ris_metrics(preds, gts)
    assert results["oIoU"] == pytest.approx(2 / (4 + 2 + 0 + 2))
    assert results["mIoU"] == pytest.approx((0 + 0 + 0 + 1) / 4)
    for threshold in THRESHOLDS:
        assert results[f"P@{threshold}"] == pytest.approx(1 / 4)


def test_only_empty_unions_score_zero() -> None:
    empty = mask("000", "000")
    results = compute_ris_metrics([empty, empty], [empty, empty])
    assert results == {key: 0.0 for key in METRIC_KEYS}


@pytest.mark.parametrize(
    ("threshold", "numerator", "denominator"),
    [(0.6, 3, 5), (0.7, 7, 10), (0.8, 4, 5), (0.9, 9, 10)],
)
def test_precision_boundary_is_inclusive_and_exact(
    threshold: float, numerator: int, denominator: int
) -> None:
    # IoU exactly X counts for P@X even with unions far beyond float64's integer precision.
    scale = 10**17
    meter = RISMeter()
    meter.add(numerator * scale, denominator * scale)
    assert meter.compute()[f"P@{threshold}"] == 1.0
    # One pixel short of X is below X, although the float quotient rounds to X.
    below = RISMeter()
    below.add(numerator * scale - 1, denominator * scale)
    assert (numerator * scale - 1) / (denominator * scale) == threshold
    assert below.compute()[f"P@{threshold}"] == 0.0


def test_counters_do_not_overflow_int32() -> None:
    meter = RISMeter()
    for _ in range(3):
        meter.add(2**31 - 1, 2**31)
    counts, iou_sum = meter.state()
    assert counts.dtype == np.int64 and iou_sum.dtype == np.float64
    assert counts[0] == 3 * (2**31 - 1) and counts[1] == 3 * 2**31 and counts[2] == 3
    assert meter.compute()["oIoU"] == (3 * (2**31 - 1)) / (3 * 2**31)


def test_merge_and_state_equal_one_meter_over_all_samples() -> None:
    pairs = random_pairs(11, seed=0)
    whole, first, second = RISMeter(), RISMeter(), RISMeter()
    for i, (pred, gt) in enumerate(pairs):
        whole.update(pred, gt)
        (first if i < 4 else second).update(pred, gt)
    counts_a, iou_a = first.state()
    counts_b, iou_b = second.state()
    rebuilt = RISMeter.from_state(counts_a + counts_b, iou_a + iou_b)
    merged = first.merge(second)
    for meter in (merged, rebuilt):
        np.testing.assert_array_equal(meter.state()[0], whole.state()[0])
        results, expected = meter.compute(), whole.compute()
        for key in METRIC_KEYS:
            assert results[key] == pytest.approx(expected[key], rel=1e-12, abs=0)
    assert whole.compute() == compute_ris_metrics(*zip(*pairs))


def test_torch_masks_match_numpy() -> None:
    pairs = random_pairs(5, seed=1)
    from_torch = RISMeter()
    for pred, gt in pairs:
        from_torch.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert from_torch.compute() == compute_ris_metrics(*zip(*pairs))


def test_shape_mismatch_names_index_and_shapes() -> None:
    good = mask("10", "01")
    with pytest.raises(ValueError, match=r"sample 1: .*\(2, 2\).*\(2, 3\)"):
        compute_ris_metrics([good, good], [good, mask("100", "010")])


def test_bad_inputs_raise_value_error() -> None:
    good = mask("10", "01")
    with pytest.raises(ValueError, match="empty"):
        compute_ris_metrics([], [])
    with pytest.raises(ValueError, match="differ in length"):
        compute_ris_metrics([good, good], [good])
    with pytest.raises(ValueError, match="boolean"):
        compute_ris_metrics([good.astype(np.float32)], [good])
    with pytest.raises(ValueError, match="no sentences"):
        RISMeter().compute()


def test_format_table_prints_percentages() -> None:
    table = format_table({"val": dict(zip(METRIC_KEYS, [0.5, 0.5, 2 / 3, 1 / 3, 0, 0, 0.12345]))})
    header, row = table.splitlines()
    assert header.split() == ["split", *METRIC_KEYS]
    assert row.split() == ["val", "50.00", "50.00", "66.67", "33.33", "0.00", "0.00", "12.35"]
    with pytest.raises(ValueError, match="lacks"):
        format_table({"val": {"oIoU": 0.5}})


def _all_reduce_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        pairs = random_pairs(13, seed=2)  # odd count: ranks hold different numbers of samples
        whole, local = RISMeter(), RISMeter()
        for i, (pred, gt) in enumerate(pairs):
            whole.update(pred, gt)
            if i % world_size == rank:
                local.update(pred, gt)
        results, expected = local.all_reduce_().compute(), whole.compute()
        np.testing.assert_array_equal(local.state()[0], whole.state()[0])
        assert results["oIoU"] == expected["oIoU"]
        for threshold in THRESHOLDS:
            assert results[f"P@{threshold}"] == expected[f"P@{threshold}"]
        assert results["mIoU"] == pytest.approx(expected["mIoU"], rel=1e-12, abs=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_matches_single_process(tmp_path) -> None:
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_all_reduce_without_process_group_is_a_no_op() -> None:
    meter = RISMeter()
    meter.add(1, 2)
    assert meter.all_reduce_() is meter and meter.state()[0][:3].tolist() == [1, 2, 1]
