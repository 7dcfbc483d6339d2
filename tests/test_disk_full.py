"""A stage that meets a full disk or a file-size limit, for real: a build process under RLIMIT_FSIZE (every
machine), and one on a small tmpfs (where this user may mount one). One line names the folder and the
space needed, exit 5, nothing half-written is kept, the previous good stage and manifest stay usable,
and the same command completes once the space is there."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from pipeline.artifact import Bundle
from pipeline.cli import main
from pipeline.errors import OutOfSpaceError
from tests.faults import ROOT, assert_consistent, build_args, manifest, root_of

LIMIT = 4 << 20  # bytes per file: the reference's files fit, the 18 MB ONNX export does not


def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=apply, timeout=600, check=False)


def test_a_file_size_limit_keeps_the_last_good_build(tmp_path, imagenet):
    args = build_args(tmp_path, imagenet)
    assert main(args) == 0
    root = root_of(tmp_path)
    manifest_before = (root / "manifest.json").read_bytes()
    export_before = (root / "export" / "stage.json").read_bytes()

    done = _limited([*args, "--force"], LIMIT)
    assert done.returncode == OutOfSpaceError.exit_code == 5, done.stderr[-2000:]
    (line,) = [text for text in done.stderr.splitlines() if text.startswith("error:")]
    assert str(root) in line and "file-size limit" in line and "4.2 MB per file" in line
    assert "export needs about 18." in line and "run the same command" in line  # the last export's size
    assert "Traceback" not in done.stderr
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no partial output left
    assert (root / "manifest.json").read_bytes() == manifest_before
    assert (root / "export" / "stage.json").read_bytes() == export_before
    assert_consistent(root)
    Bundle.open(root / "bundle").check_files()  # the previous bundle is intact

    assert main(args) == 0  # the limit lifted: the same command completes
    assert manifest(tmp_path)["built_this_run"] == []  # the force-rebuilt reference was whole, the rest intact


@pytest.fixture()
def small_disk(tmp_path):
    """A 45 MB tmpfs: the reference, export and simplify fit; the first OpenVINO IR does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); "
                    "the RLIMIT_FSIZE test covers the file-size case")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_stage_then_more_space(small_disk, imagenet, capsys):
    args = build_args(small_disk, imagenet)
    assert main(args) == 5
    (line,) = [text for text in capsys.readouterr().err.splitlines() if text.startswith("error:")]
    root = root_of(small_disk)
    assert str(root) in line and "no space left" in line and "openvino_fp32 needs more than" in line
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert not (root / "openvino_fp32").exists() and not (root / "manifest.json").exists()
    finished = [name for name in ("reference", "export", "simplify") if (root / name / "stage.json").is_file()]
    assert finished == ["reference", "export", "simplify"]

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    assert main(args) == 0
    assert manifest(small_disk)["built_this_run"] == ["openvino_fp32", "openvino_fp16", "bundle"]
    assert_consistent(root)
