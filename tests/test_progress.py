"""Progress output: a tqdm bar on a terminal, rate-limited plain lines anywhere else."""

from __future__ import annotations

import io

from tqdm import tqdm

from sharedris.progress import LineProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar():
    bar = progress(range(3), desc="eval", file=Terminal())
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]


def test_a_log_gets_one_line_per_interval_and_a_summary():
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=640, desc="train", file=out, interval=5.0, clock=clock)
    assert isinstance(bar, LineProgress)
    for _ in range(640):  # 640 steps over 20 s: a line at 5, 10, 15 and 20 s, not one per step
        clock.now += 1 / 32  # exact in binary, so the 20 s boundary is hit exactly
        bar.update()
        bar.set_postfix(loss=0.5, lr=1e-4)
    bar.close()
    bar.close()  # closing twice prints the summary once
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert lines[0] == "train: 160/640 (25%) in 0:05, 32 it/s, 0:15 left | loss=0.5, lr=0.0001"
    assert lines[-1] == "train: done, 640/640 in 0:20, 32 it/s | loss=0.5, lr=0.0001"


def test_iterating_counts_and_closes_and_a_resumed_run_rates_only_new_steps():
    out, clock = io.StringIO(), FakeClock()

    def items():
        for i in range(4):
            clock.now += 10.0
            yield i

    assert list(progress(items(), desc="stem", file=out, clock=clock, initial=6)) == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1] == "stem: done, 10 in 0:40, 10 s/it"


def test_disabled_progress_prints_nothing(capsys):
    bar = progress(range(5), desc="eval", disable=True)
    assert list(bar) == list(range(5))
    assert capsys.readouterr().err == ""


def test_write_prints_a_line_on_stdout(capsys):
    bar = progress(total=2, file=io.StringIO())
    bar.write("epoch 1: val oIoU 0.5")
    assert capsys.readouterr().out == "epoch 1: val oIoU 0.5\n"


def test_byte_counts_are_shown_in_decimal_units():
    out, clock = io.StringIO(), FakeClock()
    bar = progress(total=2_500_000, initial=1_000_000, desc="file.zip", file=out, interval=5.0, clock=clock,
                   unit="B", unit_scale=True, leave=False)
    clock.now += 5
    bar.update(500_000)  # 500 kB in 5 s since the resume point
    bar.close()
    first, summary = out.getvalue().splitlines()
    assert first.startswith("file.zip: 1.5 MB/2.5 MB (60%) in 0:05, 100.0 kB/s")
    assert summary.startswith("file.zip: done, 1.5 MB/2.5 MB")
