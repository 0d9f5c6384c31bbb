"""`sharedris serve` with request batching vs one request at a time, side by side: the same
requests from the same concurrent clients, requests per second both ways and the ratio.

    python benchmarks/serve_batching.py                          # 8 clients, 400 requests, 256 px
    python benchmarks/serve_batching.py --clients 2 --requests 10   # a quick check

Two services run as real processes (`sharedris serve`, the default model unless --model): one
batched (``--batch-wait-ms``, ``--max-batch``), one unbatched (wait 0, max batch 1: each request
alone through the model, as before batching). Synthetic scenes of ``--image-size`` px are sent as
PNG files with their expressions, ``--clients`` requests in flight at a time, ``--requests`` in all,
first to one service then to the other, for ``--rounds`` rounds (the order alternates). Prints the
CPU (lscpu's model name, torch's kernel level), requests per second both ways, the mean number of
expressions per forward pass, the errors, and whether the two gave the same answers: masks byte for
byte, scores and presences within 0.0001 (batching changes float sums in their last bits).
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from sharedris.benchmark import cpu_description
from sharedris.data.synthetic import SyntheticRefScenes


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def _requests(n: int, size: int, texts: int) -> list[tuple[bytes, list[str]]]:
    """``n`` requests: PNG-encoded synthetic scenes (at most 64 distinct, then repeated) and expressions."""
    scenes = SyntheticRefScenes("test", size=size, length=min(n, 64), seed=0)
    made = []
    for i in range(min(n, 64)):
        sample = scenes[i]
        buf = io.BytesIO()
        sample["image"].save(buf, format="PNG")
        made.append((buf.getvalue(), (list(sample["texts"]) * texts)[:texts]))
    return [made[i % len(made)] for i in range(n)]


class _Service:
    """`sharedris serve` in a process of its own, on a free port, until :meth:`stop`."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log_dir / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sharedris", "serve", "--port", str(port), *args],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the {name} service did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _run(url: str, requests: list[tuple[bytes, list[str]]], clients: int) -> tuple[float, list[Any]]:
    """Seconds to answer all ``requests`` with ``clients`` in flight; the answers (JSON without the
    timings, or the error as a string), in request order."""
    local = threading.local()

    def call(request: tuple[bytes, list[str]]) -> Any:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        image, texts = request
        try:
            r = local.client.post(f"{url}/v1/segment", files={"image": ("scene.png", image)}, data={"text": texts})
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        body = r.json()
        body.pop("timings_ms")
        return body

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(call, requests))
    return time.perf_counter() - start, answers


def _compare(a: list[Any], b: list[Any]) -> tuple[int, int, float]:
    """(answers with the same masks and fields, masks compared, largest score or presence difference)."""
    same = masks = 0
    worst = 0.0
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            continue
        pairs = list(zip(x["results"], y["results"]))
        masks += len(pairs)
        worst = max([worst] + [abs(r[k] - s[k]) for r, s in pairs for k in ("score", "present")])
        exact = [{k: v for k, v in r.items() if k not in ("score", "present")} for r in x["results"]]
        same += exact == [{k: v for k, v in s.items() if k not in ("score", "present")} for s in y["results"]]
    return same, masks, worst


def _modes(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    yield "unbatched", ["--batch-wait-ms", "0", "--max-batch", "1"]
    yield "batched", ["--batch-wait-ms", str(args.batch_wait_ms), "--max-batch", str(args.max_batch)]


def _measure(args: argparse.Namespace, requests: list[tuple[bytes, list[str]]]
             ) -> tuple[dict[str, tuple[float, list[Any], float]], str]:
    """Per service: seconds for all rounds, the answers, and the mean expressions per forward pass;
    and the precision the services ran at."""
    seconds = {"unbatched": 0.0, "batched": 0.0}
    answers: dict[str, list[Any]] = {"unbatched": [], "batched": []}
    with tempfile.TemporaryDirectory() as logs:
        services = [_Service(name, ["--model", args.model, "--precision", args.precision, *flags], Path(logs))
                    for name, flags in _modes(args)]
        try:
            for service in services:  # one warm-up request each (first-call costs), not counted
                _run(service.url, requests[:1], 1)
            before = {service.name: service.health()["batching"] for service in services}
            for round_ in range(args.rounds):
                for service in services if round_ % 2 == 0 else services[::-1]:
                    took, got = _run(service.url, requests, args.clients)
                    seconds[service.name] += took
                    answers[service.name] += got
            after = {service.name: service.health()["batching"] for service in services}
            precision = services[0].health()["precision"]
        finally:
            for service in services:
                service.stop()
    per_pass = {name: (after[name]["expressions"] - before[name]["expressions"])
                / max(after[name]["forward_passes"] - before[name]["forward_passes"], 1) for name in seconds}
    return {name: (seconds[name], answers[name], per_pass[name]) for name in seconds}, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    parser.add_argument("--clients", type=int, default=8, help="requests in flight at a time")
    parser.add_argument("--requests", type=int, default=400, help="requests per service per round")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square synthetic scenes, px")
    parser.add_argument("--texts", type=int, default=1, help="expressions per request")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the batched service's --batch-wait-ms")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched service's --max-batch")
    parser.add_argument("--precision", default="fp32", help="both services' --precision")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the order of the two alternates")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.texts, args.rounds, args.image_size) < 1:
        parser.error("--clients, --requests, --texts, --rounds and --image-size must be at least 1")

    results, precision = _measure(args, _requests(args.requests, args.image_size, args.texts))
    total = args.requests * args.rounds
    print(f"service batching: model {args.model} ({precision}), {args.image_size}x{args.image_size} images, "
          f"{args.texts} expression(s) per request, {args.clients} clients, {args.requests} requests x "
          f"{args.rounds} round(s) per service")
    print(f"CPU (lscpu): {_lscpu_model()}; torch get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}; "
          f"torch threads per service: {torch.get_num_threads()}")
    print(cpu_description())
    print(f"  {'':<34} {'requests/s':>10} {'expressions/pass':>16} {'errors':>6}")
    for name, flags in _modes(args):
        seconds, answers, per_pass = results[name]
        errors = sum(isinstance(a, str) for a in answers)
        label = f"{name} (wait {flags[1]} ms, max {flags[3]})"
        print(f"  {label:<34} {total / seconds:>10.1f} {per_pass:>16.2f} {errors:>6}")
    print(f"  ratio batched / unbatched: x{results['unbatched'][0] / results['batched'][0]:.2f}")
    errors = [a for _, answers, _ in results.values() for a in answers if isinstance(a, str)]
    same, masks, worst = _compare(results["unbatched"][1], results["batched"][1])
    identical = not errors and same == total and worst <= 1e-4 + 1e-9
    print(f"  outputs identical: {'yes' if identical else 'NO'} ({same}/{total} answers with the same masks, byte "
          f"for byte, of {masks} masks; largest score or presence difference {worst:.4f}); "
          f"errors: {len(errors)}" + (f", the first: {errors[0]}" if errors else ""))


if __name__ == "__main__":
    main()
