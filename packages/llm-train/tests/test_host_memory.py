"""host_memory: the environment the train commands re-run in, and its effect: the large
temporaries of a jitted call fault in by huge pages, not 4 KiB at a time."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from llm_train.host_memory import TUNABLE, huge_page_env

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

CHILD = """
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((64 * 2**20 // 4,), jnp.float32)  # 64 MiB
# like a train step: large temporaries inside the call (a sort of 64 MiB), a small result
step = jax.jit(lambda a: jnp.sort(a * 2.0)[:: 2**12].sum())
for _ in range(2):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x).block_until_ready()
print(json.dumps({"faults_per_call": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3}))
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason="a glibc tunable")
def test_huge_page_env_adds_the_tunable_once():
    env = huge_page_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    other = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{TUNABLE}"
    assert huge_page_env(env) is None  # already set: no second re-run
    assert huge_page_env({"LLM_TRAIN_MALLOC": "system"}) is None


@pytest.mark.skipif(
    not GLIBC_LINUX or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs glibc and transparent huge pages",
)
def test_huge_pages_cut_the_page_faults_of_a_steps_temporaries():
    def faults(env):
        out = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_call"]

    plain_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    plain, tuned = faults(plain_env), faults(huge_page_env(plain_env))
    assert plain > 64 * 2**20 // 4096  # the default: every call faults its temporaries in
    assert tuned < plain / 20, (tuned, plain)
