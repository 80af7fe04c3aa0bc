"""Back a CPU train step's large buffers with transparent huge pages, so the step does not spend a
sixth of its time in page faults.

XLA:CPU allocates a step's temporaries as one block (about 1 GB for bench-small). glibc serves a
block that size from a fresh `mmap` and unmaps it when the step frees it, so every step faults it
in again, 4 KiB at a time: 275k faults and 0.44 s of kernel time per 1.41 s step on 2 cores
(AMD EPYC). With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the kernel for transparent
huge pages on such blocks: 2 MiB per fault, 1.4k faults, 0.08 s of kernel time, 1.20 s per step,
the same numbers. (Keeping the block instead, with one malloc arena and no `mmap`, was as fast per
step but made the compiles contend for that arena: 2 s more to the first step.)

Huge pages cost start-up, though: the first touches of the compiler's, the initial state's and
the first step's memory fault in whole 2 MiB pages, and the first step of bench-small printed
about 1.5-2 s later (7.4 s against 5.4 s with an empty compilation cache). They pay for themselves
after about ten steps.

glibc reads its tunables when a process starts, so `llm-train train` re-runs itself once with
`GLIBC_TUNABLES` extended (`rerun_with_huge_pages`) when the run has at least
HUGE_PAGES_MIN_STEPS steps, after loading the config (the re-run repeats the imports, about 1 s).
The quickstart always does: its 300 steps took 97 and 99 s against 111 and 119 s without (kernel
time 11 s against 33-35 s), with the same eval loss. Nothing happens off glibc-Linux, when the
tunable is already set, or with `LLM_TRAIN_MALLOC=system`; where the kernel's transparent huge
pages are `never`, the tunable does nothing. Python callers of `llm_train.trainer.train` can start
their interpreter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_MIN_STEPS = 50  # shorter runs keep the faster start-up


def huge_page_env(environ=None) -> dict | None:
    """The environment to re-run this process in, or None when there is nothing to change."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if (
        not sys.platform.startswith("linux")
        or platform.libc_ver()[0] != "glibc"
        or env.get("LLM_TRAIN_MALLOC") == "system"
        or "glibc.malloc.hugetlb" in tunables
    ):
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def rerun_with_huge_pages(module: str, argv: list[str]) -> None:
    """Replace this process by `python -m module *argv` under `huge_page_env()`; returns only when
    there is nothing to change. Call it first thing, before any output or threads."""
    env = huge_page_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
