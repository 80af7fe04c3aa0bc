"""The garbage collector is paused only for start-up and never left off."""

import gc

from llm_train.cli import main
from llm_train.start_up import pause_gc, resume_gc


def test_pause_and_resume():
    assert gc.isenabled()
    pause_gc()
    assert not gc.isenabled()
    resume_gc()
    assert gc.isenabled()


def test_a_collector_turned_off_by_the_caller_stays_off():
    gc.disable()
    try:
        pause_gc()
        resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_cli_turns_it_back_on(capsys):
    assert main(["plan", "bench-small.yml"]) == 0
    assert "train FLOPs / token" in capsys.readouterr().out
    assert gc.isenabled()
