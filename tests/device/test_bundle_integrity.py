"""Bundles check themselves before anything runs them: `Classifier.open`, `run`, `verify` and `device-build`
refuse a truncated, altered, missing or added model file by name, and a corrupt or hostile bundle.tar.gz
is refused with nothing written. The bundle is the session's small INT8 Lite0 CPU build (tests/builds.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.integrity import HASH_CACHE, RACY_SECONDS
from tests.builds import copy_bundle

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = "models/model.bin"


@pytest.fixture(scope="module")
def build(small_cpu_build) -> Path:
    return small_cpu_build.root


@pytest.fixture()
def bundle(build, tmp_path) -> Path:
    return copy_bundle(build, tmp_path)


@pytest.fixture(scope="module")
def images(imagenet, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for path in sorted((imagenet / "val").glob("*.JPEG"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _flip_byte(path: Path, keep_mtime: bool = False) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _open_error(bundle: Path, **options) -> str:
    from pipeline.runtime import Classifier

    with pytest.raises(PipelineError) as raised:
        Classifier.open(bundle, **options)
    return str(raised.value)


def _run(bundle: Path, images: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "--artifact", str(bundle), "--source", str(images),
                           "--json"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_intact_bundle_classifies_and_remembers_its_hashes(bundle, images):
    from pipeline.runtime import Classifier

    time.sleep(RACY_SECONDS + 0.1)  # the copy's files are too new to be remembered
    with Classifier.open(bundle) as classifier:
        assert classifier.labels
    cache = json.loads((bundle / HASH_CACHE).read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(cache) == set(manifest["files"])
    assert cache[MODEL_FILE]["size"] == manifest["sizes"][MODEL_FILE] == (bundle / MODEL_FILE).stat().st_size
    done = _run(bundle, images)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_a_flipped_byte_is_refused_by_open_and_run(bundle, images):
    _flip_byte(bundle / MODEL_FILE)
    message = _open_error(bundle)
    assert "model.bin" in message and "damaged" in message
    done = _run(bundle, images)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and "model.bin" in line and "damaged" in line


def test_a_flipped_byte_is_found_even_with_the_mtime_put_back(bundle):
    from pipeline.runtime import Classifier

    time.sleep(RACY_SECONDS + 0.1)
    Classifier.open(bundle).close()  # remembered as good
    _flip_byte(bundle / MODEL_FILE, keep_mtime=True)
    assert "damaged" in _open_error(bundle)


def test_a_truncated_model_is_refused_without_hashing(bundle):
    path = bundle / MODEL_FILE
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size // 2)
    message = _open_error(bundle, check_hashes=False)
    assert "model.bin" in message and "truncated" in message


def test_a_missing_model_is_refused_by_every_command(bundle, images, capsys):
    (bundle / MODEL_FILE).unlink()
    assert "missing" in _open_error(bundle)
    for command in (["verify", str(bundle)], ["device-build", str(bundle)], ["run", "--artifact", str(bundle),
                                                                               "--source", str(images)]):
        code = main(command)
        error = capsys.readouterr().err.strip()
        if command[0] == "device-build" and "cannot build a TensorRT engine here" in error:
            continue  # without TensorRT, device-build says so before it opens the bundle (with Bundle.open, as verify)
        assert code == 2 and "model.bin" in error and "missing" in error, (command, error)


def test_an_added_model_file_is_refused(bundle):
    shutil.copy(bundle / MODEL_FILE, bundle / "models" / "other.bin")
    message = _open_error(bundle)
    assert "other.bin" in message and "not part of the bundle" in message


def test_a_bundle_where_the_hash_cache_cannot_be_written_still_opens(bundle):
    """A read-only bundle re-hashes on every open. (root writes through chmod 555, hence also a folder in the
    cache file's place, which no one can replace with a file.)"""
    from pipeline.runtime import Classifier

    time.sleep(RACY_SECONDS + 0.1)
    (bundle / HASH_CACHE).unlink(missing_ok=True)
    (bundle / HASH_CACHE).mkdir()
    Classifier.open(bundle).close()
    assert (bundle / HASH_CACHE).is_dir()
    (bundle / HASH_CACHE).rmdir()
    if os.geteuid() != 0:
        os.chmod(bundle, 0o555)
        try:
            Classifier.open(bundle).close()
            assert not (bundle / HASH_CACHE).exists()
        finally:
            os.chmod(bundle, 0o755)
    _flip_byte(bundle / MODEL_FILE)  # nothing was remembered: the damage is still found
    assert "damaged" in _open_error(bundle)


def _tar(path: Path, members: list[tuple[str, bytes]], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
    return path


@pytest.mark.parametrize("name", ["bundle/../../escaped.txt", "/tmp/escaped-absolute.txt"])
def test_an_archive_with_escaping_paths_is_refused(tmp_path, name, capsys):
    (tmp_path / "box").mkdir()
    archive = _tar(tmp_path / "box" / "bundle.tar.gz", [("bundle/manifest.json", b"{}"), (name, b"owned")])
    assert main(["verify", str(archive)]) == 2
    error = capsys.readouterr().err
    assert "refused" in error and "outside the bundle" in error and str(archive) in error
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "box" / "bundle").exists()
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["bundle.tar.gz"]


def test_an_archive_with_a_link_is_refused(tmp_path, capsys):
    archive = _tar(tmp_path / "bundle.tar.gz", [("bundle/manifest.json", b"{}")], link=("bundle/models", "/etc"))
    assert main(["verify", str(archive)]) == 2
    assert "link" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar.gz"]


def test_a_corrupt_archive_is_a_clear_error_and_leaves_nothing(build, tmp_path, capsys):
    data = (build / "bundle.tar.gz").read_bytes()
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert main(["verify", str(archive)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "bundle.tar.gz" in line and "corrupt" in line and "copy it again" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar.gz"]
    archive.write_bytes(data)  # the good copy then opens
    from pipeline.runtime import Classifier

    Classifier.open(archive).close()


def _repacked(bundle: Path, archive: Path, change: dict) -> Path:
    """Another bundle's archive: the same files with a manifest that differs (as a rebuilt bundle's does)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(change)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return archive


def test_an_older_bundle_folder_beside_a_newer_archive_is_refused_not_run(build, tmp_path):
    from pipeline.runtime import Classifier

    box = tmp_path / "device"
    box.mkdir()
    archive = box / "bundle.tar.gz"
    shutil.copy(build / "bundle.tar.gz", archive)
    Classifier.open(archive).close()  # extracts bundle/ beside it
    assert (box / "bundle" / "manifest.json").is_file()
    Classifier.open(archive).close()  # the same archive again: the folder is reused
    newer = _repacked(copy_bundle(build, tmp_path / "newer"), tmp_path / "newer.tar.gz", {"built_at": "later"})
    shutil.copy(newer, archive)  # a rebuilt bundle copied over the old archive
    message = _open_error(archive)
    assert "holds another bundle than" in message and str(box / "bundle") in message
    assert (box / "bundle" / "manifest.json").is_file()  # nothing was removed: it may hold device engines


def test_a_bundle_untarred_by_hand_opens_through_its_archive(build, tmp_path):
    from pipeline.runtime import Classifier

    archive = tmp_path / "bundle.tar.gz"
    shutil.copy(build / "bundle.tar.gz", archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path, filter="data")  # what `tar xzf bundle.tar.gz` does
    Classifier.open(archive).close()  # the same manifest inside and out: the folder is used
