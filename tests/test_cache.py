"""The artifact cache on real files: completion marker, tamper detection, interrupted writes."""

import json

import pytest

from pipeline.cache import MARKER, ArtifactCache


def _build(cache, key, content=b"weights"):
    with cache.building("stage") as folder:
        (folder / "model.bin").write_bytes(content)
        return cache.commit("stage", key, folder, {"note": "x"})


def test_hit_after_commit(tmp_path):
    cache = ArtifactCache(tmp_path)
    record = _build(cache, "k1")
    assert json.loads((tmp_path / "stage" / MARKER).read_text())["files"]["model.bin"]["size"] == 7
    lookup = cache.lookup("stage", "k1")
    assert lookup.record is not None and lookup.record.folder == record.folder
    assert not list(tmp_path.glob(".*.tmp"))


def test_key_change_misses(tmp_path):
    cache = ArtifactCache(tmp_path)
    _build(cache, "k1")
    assert cache.lookup("stage", "k2").reason == "its inputs, settings or tools changed"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_artifact_misses(tmp_path, damage):
    cache = ArtifactCache(tmp_path)
    _build(cache, "k1", b"0123456789")
    path = tmp_path / "stage" / "model.bin"
    if damage == "truncate":
        path.write_bytes(b"01234")
    elif damage == "flip":
        path.write_bytes(b"0123456780")
    else:
        path.unlink()
    lookup = cache.lookup("stage", "k1")
    assert lookup.record is None
    assert "model.bin" in lookup.reason


def test_failed_stage_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.building("stage") as folder:
            (folder / "half.onnx").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_folder_without_marker_is_rebuilt_and_replaced(tmp_path):
    cache = ArtifactCache(tmp_path)
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "model.bin").write_bytes(b"stale half-written")
    assert cache.lookup("stage", "k1").reason == "interrupted earlier"
    _build(cache, "k1")
    assert (tmp_path / "stage" / "model.bin").read_bytes() == b"weights"
    assert cache.lookup("stage", "k1").record is not None


def test_sweep_removes_leftover_temporary_folders(tmp_path):
    cache = ArtifactCache(tmp_path)
    (tmp_path / ".stage.abc.tmp").mkdir()
    (tmp_path / ".manifest.json.abc.tmp").write_text("{")  # a manifest write cut short by SIGKILL
    cache.sweep_leftovers()
    assert not (tmp_path / ".stage.abc.tmp").exists()
    assert not (tmp_path / ".manifest.json.abc.tmp").exists()
