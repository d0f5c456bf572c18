"""The batch system's warning before it stops a task, held until the task can save its state.

Slurm sends SIGUSR2 some time before a time limit or a preemption (`--signal`, which submitit
sets), and submitit's local controller does the same at its time limit. submitit's handler
requeues the task and exits at once, wherever the signal lands: a task that keeps long-lived
state between checkpoints (an SAE training, minutes between them) would lose all of it since the
last. `HeldWarning` holds the signal while a loop runs; the loop calls `at_safe_point(save)`
between its steps, and a held warning then saves first and hands over to submitit's handler, so
the requeued task resumes from that step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

WARNING = signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL), as the sbatch scripts' --signal=USR2
log = logging.getLogger(__name__)


class HeldWarning:
    """Within the block, the warning signal waits for `at_safe_point`; at the block's end, a warning
    still held goes to its handler. Holds nothing where the signal has no Python handler (no
    submitit task) or outside the main thread (where handlers cannot be set)."""

    def __init__(self) -> None:
        self._handler: Callable[[int, FrameType | None], Any] | None = None
        self._held: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> HeldWarning:
        handler = signal.getsignal(WARNING)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            self._handler = handler
            signal.signal(WARNING, self._hold)
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._held = (signum, frame)

    def at_safe_point(self, save: Callable[[], None]) -> None:
        """Where the state is whole: if a warning came, `save()`, then let its handler stop the task."""
        if self._held is None:
            return
        log.warning("the batch system's warning signal came: saving the state before the task stops")
        save()
        self._release()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._release()

    def _release(self) -> None:
        """Give the signal back to its handler, and hand it a held warning."""
        if self._handler is None:
            return
        handler, held = self._handler, self._held
        self._handler = self._held = None
        signal.signal(WARNING, handler)
        if held is not None:
            handler(*held)
