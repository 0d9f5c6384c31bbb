"""Draw training curves (loss per step, val oIoU per epoch) of one or more run folders as an SVG.

    python benchmarks/plot_learning_curve.py runs/tiny runs/tiny_shuffled -o docs/learning_curve.svg
    python benchmarks/plot_learning_curve.py --stages runs/tiny runs/tiny_refine -o docs/learning_curve.svg

Plain SVG, no plotting dependency: x = training samples seen, left panel = training loss
(moving average), right panel = val oIoU after each evaluation. With ``--stages`` the runs are
successive stages of one training (each started from the previous one's weights): each run's
curve starts where the previous one's ended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, PAD = 420, 260, 48


def _read_run(folder: Path, offset: float = 0.0) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(smoothed loss, val oIoU) points of a run, x = training samples seen plus ``offset``."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    batch = cfg["batch_size"]
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    seen: dict[int, dict] = {r["step"]: r for r in steps}  # a resumed run may log a step twice
    loss = [(offset + s * batch, r["loss"]) for s, r in sorted(seen.items())]
    k = 10  # moving average over 10 logged points
    smooth = [(x, sum(v for _, v in loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]))
              for i, (x, _) in enumerate(loss)]
    evals = []
    for f in sorted((folder / "metrics").glob("epoch_*.json")):
        m = json.loads(f.read_text())
        evals.append((offset + m["step"] * batch, m["overall"]["oIoU"]))
    return smooth, evals


def _panel(x0: int, title: str, series: list[tuple[str, str, list[tuple[float, float]]]],
           y_max: float | None, dots: bool) -> list[str]:
    pts = [p for _, _, s in series for p in s]
    if not pts:
        return []
    xmax = max(x for x, _ in pts) or 1.0
    ymax = y_max if y_max is not None else max(y for _, y in pts) * 1.05
    sx = lambda x: x0 + PAD + x / xmax * (W - 1.5 * PAD)  # noqa: E731
    sy = lambda y: H - PAD + -(y / ymax) * (H - 1.6 * PAD)  # noqa: E731
    out = [f'<text x="{x0 + W / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(xmax)}" y2="{sy(0)}" stroke="black"/>',
           f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(ymax)}" stroke="black"/>',
           f'<text x="{sx(xmax)}" y="{H - PAD + 16}" text-anchor="end" font-size="10">{int(xmax):,} samples</text>']
    for frac in (0.0, 0.5, 1.0):
        y = ymax * frac
        out.append(f'<text x="{sx(0) - 4}" y="{sy(y) + 3}" text-anchor="end" font-size="10">{y:.2f}</text>')
    for name, colour, s in series:
        if not s:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if dots:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in s]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by `sharedris train`")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--stages", action="store_true", help="the runs are successive stages of one training")
    args = parser.parse_args()
    data, offset = [], 0.0
    for i, run in enumerate(args.runs):
        loss, evals = _read_run(run, offset)
        data.append((run.name, COLOURS[i % len(COLOURS)], loss, evals))
        if args.stages and loss:
            offset = loss[-1][0]
    body = _panel(0, "training loss (all terms)", [(n, c, loss) for n, c, loss, _ in data], None, False)
    body += _panel(W, "val oIoU", [(n, c, ev) for n, c, _, ev in data], 1.0, True)
    for i, (name, colour, _, _) in enumerate(data):
        body.append(f'<text x="{W + PAD + 8}" y="{40 + 14 * i}" font-size="11" fill="{colour}">{name}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif">'
           f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
