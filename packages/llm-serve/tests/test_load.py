"""Bounded load test: 32 concurrent streaming clients on loopback for ~12 s, some disconnecting
mid-stream. Ends with no server errors, every slot and page back, and flat server memory."""

from __future__ import annotations

import concurrent.futures
import random
import threading
import time

import httpx
import psutil
import pytest
from conftest import ServerProcess, save_tiny_checkpoint

pytestmark = pytest.mark.slow

CLIENTS = 32
PHASE_SECONDS = (4.0, 8.0)  # warm-up phase, then the measured phase


def client_loop(url: str, seed: int, stop_at: float, stats: dict, lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as c:
        while time.time() < stop_at:
            body = {
                "model": "tiny",
                "prompt": "hello world " * rng.randint(1, 12),
                "max_tokens": rng.randint(4, 40),
                "temperature": rng.choice([0.0, 0.8]),
                "stream": True,
            }
            hang_up = rng.random() < 0.2
            with c.stream("POST", url + "/v1/completions", json=body) as r:
                status = r.status_code
                n = 0
                for line in r.iter_lines():
                    n += line.startswith("data: ")
                    if hang_up and n >= 3:
                        break
            with lock:
                stats[status] = stats.get(status, 0) + 1
                stats["hung_up"] = stats.get("hung_up", 0) + hang_up


def run_phase(url: str, seconds: float, seed: int) -> dict:
    stats: dict = {}
    lock = threading.Lock()
    stop_at = time.time() + seconds
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(client_loop, url, seed * 1000 + i, stop_at, stats, lock)
            for i in range(CLIENTS)
        ]
        for f in futures:
            f.result(timeout=seconds + 90)
    return stats


def test_concurrent_streaming_clients(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    server = ServerProcess(folder, "kv_cache_kind=paged", "max_decode_slots=8", "max_queue_size=64")
    try:
        proc = psutil.Process(server.proc.pid)
        warm = run_phase(server.url, PHASE_SECONDS[0], 1)
        rss_before = proc.memory_info().rss
        load = run_phase(server.url, PHASE_SECONDS[1], 2)
        deadline = time.time() + 10
        while (health := httpx.get(server.url + "/health").json())["active_slots"] and (
            time.time() < deadline
        ):
            time.sleep(0.1)
        rss_after = proc.memory_info().rss
        codes = {k for k in {**warm, **load} if isinstance(k, int)}
        assert codes == {200}, (warm, load, server.output())
        assert load[200] >= CLIENTS and load["hung_up"] > 0
        assert health["active_slots"] == 0 and health["queue_depth"] == 0
        assert health["free_pages"] == health["total_pages"]
        growth = (rss_after - rss_before) / 2**20
        assert growth < 64, f"server memory grew {growth:.0f} MiB under load"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'llm_requests_total{finish_reason="abort"}' in metrics
    finally:
        server.close()
