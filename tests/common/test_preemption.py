"""The batch system's warning signal, held until the task is at a safe point: it saves there, then
the signal's own handler (submitit's, which requeues the task and exits) runs."""

import logging
import os
import signal

import pytest

from common.preemption import WARNING, HeldWarning


@pytest.fixture
def requeue_calls():
    """A handler of the warning like submitit's, which stops the task: it counts its calls and raises."""
    calls: list[int] = []

    def requeue(signum, frame):
        calls.append(signum)
        raise SystemExit("requeued")

    before = signal.signal(WARNING, requeue)
    yield calls
    assert signal.getsignal(WARNING) is requeue  # the block gave the signal back to its handler
    signal.signal(WARNING, before)


def test_a_warning_waits_for_the_safe_point_which_saves_before_the_handler_runs(requeue_calls):
    events = []
    with HeldWarning(lambda: events.append("saved")) as warning:
        warning.at_safe_point()  # no warning yet: nothing saved
        os.kill(os.getpid(), WARNING)
        events.append("went on")
        with pytest.raises(SystemExit, match="requeued"):
            warning.at_safe_point()
    assert events == ["went on", "saved"] and requeue_calls == [WARNING]


def test_a_warning_held_to_the_end_of_the_block_saves_and_reaches_its_handler_there(requeue_calls):
    events = []
    with pytest.raises(SystemExit, match="requeued"), HeldWarning(lambda: events.append("saved")):
        os.kill(os.getpid(), WARNING)
        events.append("went on")
    assert events == ["went on", "saved"] and requeue_calls == [WARNING]


def test_a_task_failing_with_a_warning_held_fails_with_its_error_unsaved(requeue_calls, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="out of memory"), \
            HeldWarning(lambda: pytest.fail("saved a state that an error left half-made")):
        os.kill(os.getpid(), WARNING)
        raise ValueError("out of memory")
    assert requeue_calls == []
    assert "warning came while the task failed with ValueError('out of memory'): not requeued" in caplog.text


def test_no_warning_no_save(requeue_calls):
    with HeldWarning(lambda: pytest.fail("saved without a warning")) as warning:
        warning.at_safe_point()
    assert requeue_calls == []


def test_a_signal_without_a_python_handler_is_left_alone():
    before = signal.signal(WARNING, signal.SIG_IGN)
    try:
        with HeldWarning(lambda: pytest.fail("saved without a handler to hand the warning to")):
            assert signal.getsignal(WARNING) == signal.SIG_IGN
            os.kill(os.getpid(), WARNING)  # ignored, as without the block
    finally:
        signal.signal(WARNING, before)
