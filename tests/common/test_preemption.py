"""The batch system's warning signal, held until the task is at a safe point: it saves there, then
the signal's own handler (submitit's, which requeues the task and exits) runs."""

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
        raise RuntimeError("requeued")

    before = signal.signal(WARNING, requeue)
    yield calls
    assert signal.getsignal(WARNING) is requeue  # the block gave the signal back to its handler
    signal.signal(WARNING, before)


def test_a_warning_waits_for_the_safe_point_which_saves_before_the_handler_runs(requeue_calls):
    events = []
    with HeldWarning() as warning:
        warning.at_safe_point(lambda: events.append("saved"))  # no warning yet: nothing saved
        os.kill(os.getpid(), WARNING)
        events.append("went on")
        assert requeue_calls == []
        with pytest.raises(RuntimeError, match="requeued"):
            warning.at_safe_point(lambda: events.append("saved"))
    assert events == ["went on", "saved"] and requeue_calls == [WARNING]


def test_a_warning_held_to_the_end_of_the_block_reaches_its_handler_there(requeue_calls):
    with pytest.raises(RuntimeError, match="requeued"), HeldWarning():
        os.kill(os.getpid(), WARNING)
        assert requeue_calls == []
    assert requeue_calls == [WARNING]


def test_no_warning_no_save_and_the_handler_is_back_after_the_block(requeue_calls):
    with HeldWarning() as warning:
        warning.at_safe_point(lambda: pytest.fail("saved without a warning"))
    assert requeue_calls == []


def test_a_signal_without_a_python_handler_is_left_alone():
    before = signal.signal(WARNING, signal.SIG_IGN)
    try:
        with HeldWarning():
            assert signal.getsignal(WARNING) == signal.SIG_IGN
            os.kill(os.getpid(), WARNING)  # ignored, as without the block
    finally:
        signal.signal(WARNING, before)
