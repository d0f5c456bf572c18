"""What a run records of what produced it: the code's commit and state, package versions, host, time."""

import datetime
import importlib.metadata
import subprocess

from common import provenance


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_the_commit_and_whether_the_code_differs_from_it(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "code.py").write_text("A = 1\n")
    (tmp_path / "notes.md").write_text("notes\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "empty")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "code")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert provenance.git_version(tmp_path) == {"sha": head, "dirty": False}
    (tmp_path / "notes.md").write_text("other notes\n")  # outside common/ and jobs/: the code is the commit's
    assert provenance.git_version(tmp_path) == {"sha": head, "dirty": False}
    (tmp_path / "common" / "code.py").write_text("A = 2\n")
    assert provenance.git_version(tmp_path) == {"sha": head, "dirty": True}


def test_outside_git_the_version_is_unknown(tmp_path):
    assert provenance.git_version(tmp_path) == {"sha": None, "dirty": None}


def test_package_versions_are_the_installed_ones_and_none_when_missing(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("torch", "h5py", "no-such-package-saebatch"))
    assert provenance.package_versions() == {"torch": importlib.metadata.version("torch"),
                                             "h5py": importlib.metadata.version("h5py"),
                                             "no-such-package-saebatch": None}


def test_collect_records_an_aware_utc_time_and_the_host():
    record = provenance.collect()
    assert set(record) == {"code", "packages", "python", "platform", "host", "time"}
    when = datetime.datetime.fromisoformat(record["time"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - when) < datetime.timedelta(minutes=1)
