"""Metrics checked against numbers worked out by hand from the definitions in docs/reference.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharedris.metrics import (
    GRES_METRIC_KEYS,
    GRES_THRESHOLDS,
    METRIC_KEYS,
    THRESHOLDS,
    GRESMeter,
    RISMeter,
    compute_gres_metrics,
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


# ------------------------------------------------------------------------------------ GRES metrics
PRESENT, ABSENT = False, True  # the model's "no target" decision


def gres_triples(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Random samples, about a third without a target, with random no-target decisions."""
    rng = np.random.default_rng(seed)
    triples = []
    for _ in range(n):
        gt = rng.random((6, 7)) < 0.5 if rng.random() < 0.65 else np.zeros((6, 7), dtype=bool)
        triples.append((rng.random((6, 7)) < 0.5, gt, bool(rng.random() < 0.4)))
    return triples


def test_gres_worked_example_of_the_reference() -> None:
    # docs/reference.md: S1 target found (I 2, U 6), S2 no target said absent (g 1), S3 no target
    # said present (U |P| = 5), S4 target said absent although P = G (I 0, U 4).
    s1 = (mask("001111"), mask("111100"), PRESENT)
    s2 = (mask("111000"), mask("000000"), ABSENT)
    s3 = (mask("111110"), mask("000000"), PRESENT)
    s4 = (mask("111100"), mask("111100"), ABSENT)
    results = compute_gres_metrics(*zip(s1, s2, s3, s4))
    assert list(results) == list(GRES_METRIC_KEYS)
    assert results["cIoU"] == pytest.approx(2 / 15)
    assert results["gIoU"] == pytest.approx((1 / 3 + 1 + 0 + 0) / 4)
    assert results["N-acc"] == 0.5 and results["T-acc"] == 0.5
    assert all(results[f"P@{t}"] == 0.0 for t in GRES_THRESHOLDS)  # g 1/3 and 0 on the targets
    # Not the other codebases' rule (the mask IoU kept for S4): cIoU 0.40, gIoU 0.5833.
    assert results["cIoU"] != pytest.approx(0.4) and results["gIoU"] != pytest.approx(7 / 12)


TARGET, FULL = mask("11110"), mask("11111")  # I 4, U 5: g 0.8 when the target is found
EMPTY, STRAY = mask("00000"), mask("11000")


@pytest.mark.parametrize(("pred", "gt", "no_target", "expected"), [
    # target predicted present (ReLA's TN): the mask IoU counts; 0.8 reaches P@0.8 exactly
    (FULL, TARGET, PRESENT, {"cIoU": 0.8, "gIoU": 0.8, "N-acc": None, "T-acc": 1.0,
                             "P@0.7": 1.0, "P@0.8": 1.0, "P@0.9": 0.0}),
    # target predicted absent (FP): I = 0 whatever the mask, U stays |P ∪ G|
    (FULL, TARGET, ABSENT, {"cIoU": 0.0, "gIoU": 0.0, "N-acc": None, "T-acc": 0.0,
                            "P@0.7": 0.0, "P@0.8": 0.0, "P@0.9": 0.0}),
    # no target predicted absent (TP): g = 1 although the mask has pixels; U = 0
    (STRAY, EMPTY, ABSENT, {"cIoU": 0.0, "gIoU": 1.0, "N-acc": 1.0, "T-acc": None,
                            "P@0.7": None, "P@0.8": None, "P@0.9": None}),
    # no target predicted present (FN): g = 0 although the mask is empty
    (EMPTY, EMPTY, PRESENT, {"cIoU": 0.0, "gIoU": 0.0, "N-acc": 0.0, "T-acc": None,
                             "P@0.7": None, "P@0.8": None, "P@0.9": None}),
], ids=["target-present", "target-absent", "no-target-absent", "no-target-present"])
def test_gres_each_decision_case(pred, gt, no_target, expected) -> None:
    got = compute_gres_metrics([pred], [gt], [no_target])
    assert {k for k, v in got.items() if v is None} == {k for k, v in expected.items() if v is None}
    assert {k: v for k, v in got.items() if v is not None} == pytest.approx(
        {k: v for k, v in expected.items() if v is not None})


def test_gres_unions_of_each_case_add_up() -> None:
    meter = GRESMeter()
    meter.update(FULL, TARGET, PRESENT)  # I 4, U 5
    meter.update(FULL, TARGET, ABSENT)  # I 0, U 5
    meter.update(STRAY, EMPTY, ABSENT)  # I 0, U 0
    meter.update(STRAY, EMPTY, PRESENT)  # I 0, U |P| = 2
    assert meter.state()[0][:2].tolist() == [4, 12]
    results = meter.compute()
    assert results["cIoU"] == pytest.approx(4 / 12)
    assert results["gIoU"] == pytest.approx((0.8 + 0 + 1 + 0) / 4)
    assert results["N-acc"] == 0.5 and results["T-acc"] == 0.5
    assert (results["P@0.7"], results["P@0.8"], results["P@0.9"]) == (0.5, 0.5, 0.0)


def _gres_by_the_rules(triples) -> dict[str, float]:
    """The definitions of docs/reference.md, sample by sample, in floats."""
    rows = []  # (has target, I, U, g, no-target decision)
    for pred, gt, n in triples:
        if not gt.any():
            rows.append((False, 0, 0 if n else int(pred.sum()), 1.0 if n else 0.0, n))
        else:
            i, u = (0 if n else int((pred & gt).sum())), int((pred | gt).sum())
            rows.append((True, i, u, i / u, n))
    targets = [r for r in rows if r[0]]
    empties = [r for r in rows if not r[0]]
    results = {"cIoU": sum(r[1] for r in rows) / sum(r[2] for r in rows),
               "gIoU": sum(r[3] for r in rows) / len(rows),
               "N-acc": sum(r[4] for r in empties) / len(empties),
               "T-acc": sum(not r[4] for r in targets) / len(targets)}
    for t in GRES_THRESHOLDS:
        results[f"P@{t}"] = sum(r[3] >= t for r in targets) / len(targets)
    return results


def test_gres_random_samples_follow_the_rules() -> None:
    triples = gres_triples(40, seed=3)
    results = compute_gres_metrics(*zip(*triples))
    assert results == pytest.approx(_gres_by_the_rules(triples), rel=1e-12)
    assert 0 < results["N-acc"] < 1 and 0 < results["T-acc"] < 1


def test_gres_shares_over_no_samples_do_not_apply() -> None:
    only_targets = compute_gres_metrics([FULL, TARGET], [TARGET, TARGET], [PRESENT, PRESENT])
    assert only_targets["N-acc"] is None and only_targets["T-acc"] == 1.0
    only_empty = compute_gres_metrics([STRAY, EMPTY], [EMPTY, EMPTY], [ABSENT, ABSENT])
    assert only_empty == {"cIoU": 0.0, "gIoU": 1.0, "N-acc": 1.0, "T-acc": None,
                          "P@0.7": None, "P@0.8": None, "P@0.9": None}
    table = format_table({"targets": {**dict.fromkeys(METRIC_KEYS, 0.5), **only_targets}})
    assert table.splitlines()[1].split()[-2:] == ["-", "100.00"]  # N-acc, T-acc


@pytest.mark.parametrize(("threshold", "numerator", "denominator"), [(0.7, 7, 10), (0.8, 4, 5), (0.9, 9, 10)])
def test_gres_precision_boundary_is_inclusive_and_exact(threshold, numerator, denominator) -> None:
    scale = 10**17
    at, below = GRESMeter(), GRESMeter()
    at.add(numerator * scale, denominator * scale, True, False)
    below.add(numerator * scale - 1, denominator * scale, True, False)
    assert at.compute()[f"P@{threshold}"] == 1.0 and below.compute()[f"P@{threshold}"] == 0.0


def test_gres_merge_state_and_torch_equal_one_meter() -> None:
    triples = gres_triples(17, seed=4)
    whole, first, second, from_torch = GRESMeter(), GRESMeter(), GRESMeter(), GRESMeter()
    for i, (pred, gt, n) in enumerate(triples):
        whole.update(pred, gt, n)
        (first if i < 6 else second).update(pred, gt, n)
        from_torch.update(torch.from_numpy(pred), torch.from_numpy(gt), torch.tensor(n))
    (counts_a, g_a), (counts_b, g_b) = first.state(), second.state()
    assert counts_a.dtype == np.int64 and g_a.dtype == np.float64 and counts_a.shape == (6 + len(GRES_THRESHOLDS),)
    rebuilt = GRESMeter.from_state(counts_a + counts_b, g_a + g_b)
    for meter in (first.merge(second), rebuilt):
        np.testing.assert_array_equal(meter.state()[0], whole.state()[0])
        assert meter.compute() == pytest.approx(whole.compute(), rel=1e-12)
    assert from_torch.compute() == whole.compute() == compute_gres_metrics(*zip(*triples))


def test_gres_bad_inputs_raise_value_error() -> None:
    good = mask("10", "01")
    with pytest.raises(ValueError, match="empty"):
        compute_gres_metrics([], [], [])
    with pytest.raises(ValueError, match="preds and gts and no_target_preds differ in length"):
        compute_gres_metrics([good, good], [good, good], [False])
    with pytest.raises(ValueError, match=r"sample 0: predicted_no_target must be a bool"):
        compute_gres_metrics([good], [good], [0.7])  # a presence score, not a decision
    with pytest.raises(ValueError, match="boolean"):
        compute_gres_metrics([good.astype(np.uint8)], [good], [False])
    with pytest.raises(ValueError, match="without a target cannot have an intersection"):
        GRESMeter().add(1, 2, False, False)
    with pytest.raises(ValueError, match="no samples"):
        GRESMeter().compute()
    with pytest.raises(ValueError, match="cannot merge a RISMeter into a GRESMeter"):
        GRESMeter().merge(RISMeter())


def _gres_all_reduce_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        triples = gres_triples(13, seed=5)  # odd count: ranks hold different numbers of samples
        whole, local = GRESMeter(), GRESMeter()
        for i, (pred, gt, n) in enumerate(triples):
            whole.update(pred, gt, n)
            if i % world_size == rank:
                local.update(pred, gt, n)
        results, expected = local.all_reduce_().compute(), whole.compute()
        np.testing.assert_array_equal(local.state()[0], whole.state()[0])
        for key in ("cIoU", "N-acc", "T-acc", *(f"P@{t}" for t in GRES_THRESHOLDS)):
            assert results[key] == expected[key]  # ratios of integer sums: exact
        assert results["gIoU"] == pytest.approx(expected["gIoU"], rel=1e-12, abs=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gres_all_reduce_matches_single_process(tmp_path) -> None:
    mp.spawn(_gres_all_reduce_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_gres_all_reduce_without_process_group_is_a_no_op() -> None:
    meter = GRESMeter()
    meter.update(FULL, TARGET, PRESENT)
    assert meter.all_reduce_() is meter and meter.state()[0][:6].tolist() == [4, 5, 1, 0, 1, 0]
