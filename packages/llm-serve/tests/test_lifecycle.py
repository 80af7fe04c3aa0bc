"""`llm-serve serve` as an orchestrator sees it: /health answers 503 "loading" while the model
compiles, then 200; SIGTERM lets an in-flight streaming request finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
from conftest import free_port, save_tiny_checkpoint


def test_health_loading_until_compiled_and_sigterm_drains(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llm_serve.cli", "serve", "--checkpoint", str(folder)]
    cmd += ["--port", str(port), "--model-name", "tiny", "--drain-timeout", "60"]
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen, deadline = [], time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                r = httpx.get(url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.02)
        assert (503, "loading") in seen and seen[-1] == (200, "ok"), seen

        body = {"model": "tiny", "prompt": "the quick", "max_tokens": 80, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        chunks, signalled = [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[len("data: ") :])
                if not signalled:  # mid-stream: the server is asked to stop
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
        assert chunks[-1] == "[DONE]"
        finish = [c["choices"][0]["finish_reason"] for c in map(json.loads, chunks[:-1])]
        assert finish[-1] == "length" and len(chunks) >= 80  # every token still arrived
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
