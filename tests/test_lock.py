"""One writer per build folder, with real processes: two builds of one folder at once both finish (one
waits, saying who holds the folder), `--no-wait` exits 4 naming the holder, `clean` and `report` respect
the lock, a dead holder blocks no one, and other targets' folders are not blocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import BusyError
from pipeline.lock import folder_lock
from tests.faults import ROOT, assert_consistent, build_args, manifest, root_of, start


@pytest.fixture()
def holder(tmp_path):
    """A process that holds the lock of the tiny build's folder until it is killed."""
    processes = []

    def hold(root: Path) -> subprocess.Popen:
        code = ("import sys, time; from pathlib import Path; from pipeline.lock import folder_lock\n"
                "with folder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")
        process = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _wait_for_text(path: Path, text: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in path.read_text(), path.read_text()


def test_two_builds_of_one_folder_at_once_both_finish(tmp_path, imagenet):
    """The second starts while the first is building (48 images: about 10 s), as a second terminal would."""
    args = build_args(tmp_path, imagenet, "--eval-images", "48")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start(args, stdout=subprocess.DEVNULL, stderr=logs[0].open("w"))
    _wait_for_text(logs[0], "reference")  # past its imports, holding the folder
    second = start(args, stdout=subprocess.DEVNULL, stderr=logs[1].open("w"))
    assert [first.wait(timeout=600), second.wait(timeout=600)] == [0, 0], [log.read_text()[-2000:] for log in logs]
    waited = logs[1].read_text()
    assert "waiting for" in waited and f"in use by pid {first.pid}" in waited and "since" in waited
    assert "nothing to rebuild" in waited  # it found the first one's stages complete
    assert_consistent(root_of(tmp_path))
    assert main(args) == 0  # a third run finds everything cached
    assert manifest(tmp_path)["built_this_run"] == []


def test_no_wait_names_the_holder_and_a_waiting_build_continues_when_it_dies(tmp_path, imagenet, holder, capsys):
    args = build_args(tmp_path, imagenet)
    root = root_of(tmp_path)
    held = holder(root)
    assert main([*args, "--no-wait"]) == BusyError.exit_code == 4
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert f"in use by pid {held.pid}" in line and str(root) in line and "--no-wait" in line
    assert not root.exists()  # nothing was written

    log = tmp_path / "waiting.log"
    waiting = start(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait_for_text(log, f"in use by pid {held.pid}")
    time.sleep(1.0)
    assert waiting.poll() is None and not (root / "manifest.json").exists()  # still waiting
    os.kill(held.pid, signal.SIGKILL)  # the kernel frees a dead holder's lock
    assert waiting.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert_consistent(root)


def test_clean_and_report_respect_the_lock_and_other_targets_are_free(tmp_path, imagenet, holder, capsys):
    args = build_args(tmp_path, imagenet)
    assert main(args) == 0
    root = root_of(tmp_path)
    held = holder(root)
    common = ["--model", "efficientnet_lite0", "--target", "cpu", "--build-dir", str(tmp_path / "build"), "--no-wait"]
    capsys.readouterr()
    assert main(["clean", *common]) == 4
    assert f"pid {held.pid}" in capsys.readouterr().err
    assert_consistent(root)
    assert main(["report", str(root), "--no-wait", "--latency-seconds", "0"]) == 4
    assert f"pid {held.pid}" in capsys.readouterr().err
    assert not (root / "report").exists()
    with folder_lock(root_of(tmp_path, "jetson"), wait=False):  # another target's folder: its own lock
        pass
    held.kill()
    held.wait()
    assert main(["clean", *common]) == 0
    assert not root.exists()
