"""Two `jax.distributed` processes on this machine: each runs a test file as a script with its
process id and a shared coordinator port, and prints `RESULT <json>`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: str, *args: str, processes: int = 2, devices: int = 2) -> list[dict]:
    """`python script *args <process id> <port>` in `processes` children with `devices` CPU
    devices each; every child's RESULT, in process order (a failure shows its stderr)."""
    port = str(free_port())
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args, str(pid), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(processes)
    ]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-4000:]
        results.append(json.loads(stdout.split("RESULT ")[1]))
    return results


def global_array(value, sharding):
    """A global jax array built in every process from the same host values (each process fills
    its own devices' shards)."""
    import jax
    import numpy as np

    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
