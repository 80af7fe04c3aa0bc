"""Load test of `llm-serve serve`: concurrent streaming clients for a fixed time, mixing short and
long prompts, n > 1 and cancellations (clients that hang up mid-stream).

A tiny random model (2 layers, width 64, a byte-level BPE tokenizer trained here) is served with a
paged cache in a subprocess; the clients are asyncio tasks in this process. Reported: requests done,
cancelled and refused (429, the queue bound), any 5xx (there should be none), p50 / p99 time to first
token and inter-token latency, the server's RSS after warm-up and at the end (flat: no leak), and
/health once the clients stop (every slot and page back). A reliability check, not a speed figure.

    python benchmarks/serve_load.py [--clients 64] [--seconds 60] [--slots 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

TEXT = (
    "the quick brown fox jumps over the lazy dog. a small model writes small words, and the "
    "words make a story. Hello world! How are you today? numbers: 0 1 2 3 4 5 6 7 8 9 10. "
)


def make_checkpoint(folder: Path) -> None:
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import llm_core

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([TEXT] * 20, trainer)
    cfg = llm_core.load_config(
        "bench-small.yml",
        ["num_layers=2", "emb_dim=64", "num_heads=4", "num_kv_heads=2", "head_dim=16",
         "mlp_dim=128", f"vocab_size={tok.get_vocab_size()}"],
    )  # fmt: skip
    llm_core.save(llm_core.build_model(cfg, rngs=nnx.Rngs(0)), folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def client(url: str, stop_at: float, stats: dict, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        while time.perf_counter() < stop_at:
            long = rng.random() < 0.3
            prompt = TEXT * (4 if long else 1)
            n = 2 if rng.random() < 0.15 else 1
            body = {
                "model": "tiny", "prompt": prompt[: rng.randint(20, len(prompt))],
                "max_tokens": rng.randint(8, 64), "temperature": 0.8, "n": n, "stream": True,
            }  # fmt: skip
            hang_up = rng.random() < 0.2  # this client leaves after a few chunks
            start, last, chunks = time.perf_counter(), None, 0
            try:
                async with http.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                        await asyncio.sleep(0.2)
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        now = time.perf_counter()
                        if last is None:
                            stats["ttft"].append(now - start)
                        else:
                            stats["itl"].append(now - last)
                        last, chunks = now, chunks + 1
                        if hang_up and chunks >= 3:
                            break
                stats["cancelled" if hang_up and chunks >= 3 else "done"] += 1
                stats["status"][200] = stats["status"].get(200, 0) + 1
            except httpx.HTTPError as err:
                stats["errors"].append(repr(err))


async def run_clients(url: str, clients: int, seconds: float, stats: dict) -> None:
    stop_at = time.perf_counter() + seconds
    rngs = [random.Random(i) for i in range(clients)]
    await asyncio.gather(*(client(url, stop_at, stats, rng) for rng in rngs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    make_checkpoint(work / "tiny")
    port = 8700 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    settings = [
        "kv_cache_kind=paged", f"max_decode_slots={args.slots}", "kv_cache_max_length=512",
        f"max_queue_size={args.clients}", "max_prefill_length=128",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "llm_serve.cli", "serve", "--checkpoint", str(work / "tiny"),
           "--port", str(port), "--model-name", "tiny", "--set", *settings]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit("server exited")
            time.sleep(0.2)
        proc = psutil.Process(server.pid)
        stats = {"ttft": [], "itl": [], "status": {}, "done": 0, "cancelled": 0, "errors": []}
        rss: list[tuple[float, float]] = []

        async def sample_rss(seconds: float) -> None:
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                rss.append((time.perf_counter() - start, proc.memory_info().rss / 2**20))
                await asyncio.sleep(1.0)

        async def everything() -> None:
            await asyncio.gather(
                run_clients(url, args.clients, args.seconds, stats), sample_rss(args.seconds)
            )

        print(f"{args.clients} clients for {args.seconds:.0f} s, {args.slots} decode slots; "
              f"load average {os.getloadavg()}")  # fmt: skip
        asyncio.run(everything())
        time.sleep(1.0)
        health = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        code = server.wait(timeout=60)
    five = {s: c for s, c in stats["status"].items() if s >= 500}
    warm = [m for t, m in rss if t >= min(10.0, args.seconds / 3)]
    print(f"requests: {stats['done']} finished, {stats['cancelled']} cancelled by their client, "
          f"statuses {dict(sorted(stats['status'].items()))}, 5xx: {sum(five.values())}, "
          f"client errors: {len(stats['errors'])}")  # fmt: skip
    print(f"TTFT p50 {pct(stats['ttft'], 0.5) * 1e3:.0f} ms, p99 {pct(stats['ttft'], 0.99) * 1e3:.0f} ms; "
          f"inter-token p50 {pct(stats['itl'], 0.5) * 1e3:.1f} ms, p99 {pct(stats['itl'], 0.99) * 1e3:.1f} ms "
          f"({len(stats['itl'])} gaps)")  # fmt: skip
    if warm:
        quarters = [rss[min(len(rss) - 1, int(q * len(rss)))] for q in (0.25, 0.5, 0.75, 1.0)]
        print(f"server RSS after warm-up {warm[0]:.0f} MB, at the end {warm[-1]:.0f} MB "
              f"(max {max(warm):.0f}, median {statistics.median(warm):.0f}); by time: "
              + ", ".join(f"{t:.0f} s {m:.0f} MB" for t, m in quarters))  # fmt: skip
    print(f"after the clients: active_slots {health['active_slots']}, queue_depth "
          f"{health['queue_depth']}, free pages {health['free_pages']} of {health['total_pages']}; "
          f"server exit status after SIGTERM {code}")  # fmt: skip
    ok = (not five and not stats["errors"] and health["active_slots"] == 0
          and health["free_pages"] == health["total_pages"] and code == 0)  # fmt: skip
    print("load test:", "passed" if ok else "FAILED")
    if stats["errors"]:
        print("first errors:", stats["errors"][:3])


if __name__ == "__main__":
    main()
