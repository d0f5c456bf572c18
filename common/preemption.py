"""The batch system's warning before it stops a task, held until the task can save its state.

Slurm sends SIGUSR2 some time before a time limit (`--signal`, which submitit sets; at a
preemption too where the cluster is set to), and submitit's local controller does the same at its
time limit. submitit's handler requeues the task and exits at once, wherever the signal lands: a
task that keeps long-lived state between checkpoints (an SAE training, minutes between them) would
lose all of it since the last. `HeldWarning` holds the signal while a loop runs; at the loop's
safe points (`at_safe_point`, and the block's end) a held warning saves first and then goes to
submitit's handler, so the requeued task resumes from there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

# the signal submitit's tasks take as the warning: its default, or what SUBMITIT_PREEMPT_SIGNAL names
WARNING = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
log = logging.getLogger(__name__)


class HeldWarning:
    """Within the block, the warning signal waits for `at_safe_point` or the block's end, where
    `save()` runs before the signal's handler. Holds nothing where the signal has no Python handler
    (no submitit task) or outside the main thread (where handlers cannot be set)."""

    def __init__(self, save: Callable[[], None]) -> None:
        self._save = save
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

    def at_safe_point(self) -> None:
        """Where the state is whole: if a warning came, save, then let its handler stop the task."""
        if self._held is not None:
            self._release(save=True, deliver=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """The state is whole at the block's end, unless an error is on its way out: a task failing
        with a warning held fails with its error rather than being requeued to fail again."""
        if self._release(save=error is None, deliver=error is None):
            log.warning("the batch system's warning came while the task failed with %r: not requeued", error)

    def _release(self, save: bool, deliver: bool) -> bool:
        """Give the signal back to its handler, first saving for a held warning (`save`), then
        handing it over (`deliver`). True when a held warning was left undelivered."""
        if self._handler is None:
            return False
        if save and self._held is not None:
            log.warning("the batch system's warning signal came: saving the state before the task stops")
            self._save()  # a warning meanwhile is held too
        handler, self._handler = self._handler, None
        signal.signal(WARNING, handler)  # from here a warning goes straight to it, none is lost
        held, self._held = self._held, None
        if held is not None and deliver:
            handler(*held)
        return held is not None and not deliver
