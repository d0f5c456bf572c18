"""common/locks.py: one holder at a time, and `held_by` looking without getting in a starting writer's way."""

import fcntl
import threading

import pytest

from common.locks import Held, exclusive, held_by


def test_a_writer_starting_while_held_by_looks_goes_ahead(tmp_path):
    """`held_by` (what `saebatch status` asks) takes the lock shared for an instant; a writer
    starting in that instant waits it out instead of refusing."""
    path = tmp_path / "shard_00000.h5.lock"
    path.touch()
    with open(path) as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held_by's probe, caught mid-way
        threading.Timer(0.3, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with exclusive(path, "another writer of shard 0", wait=False):
            assert held_by(path) is not None


def test_a_lock_still_held_after_the_grace_is_refused_naming_its_holder(tmp_path):
    path = tmp_path / "shard_00000.h5.lock"
    with exclusive(path, "another writer of shard 0", wait=False):
        with pytest.raises(Held, match=r"another writer of shard 0 is running right now .*wait for it, or cancel it"):
            with exclusive(path, "another writer of shard 0", wait=False):
                pass
    assert held_by(path) is None
