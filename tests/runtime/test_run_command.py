"""`python -m pipeline run` for real: a short video written here with cv2.VideoWriter and a folder of ImageNet
val images, classified through a CPU bundle of an EfficientNet-Lite0 build."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from tests.runtime.test_runtime import ROOT, golden_paths, shared_build


@pytest.fixture(scope="module")
def build(tmp_path_factory, imagenet) -> Path:
    return shared_build(tmp_path_factory, imagenet, "cpu")


@pytest.fixture(scope="module")
def bundle(build) -> Path:
    return build / "bundle"


@pytest.fixture(scope="module")
def video(build, bundle, tmp_path_factory) -> Path:
    """An MJPG .avi of 6 val images at 320x240, two frames each."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    assert writer.isOpened()
    for image in golden_paths(build, bundle)[:6]:
        frame = cv2.resize(cv2.imread(image), (320, 240), interpolation=cv2.INTER_AREA)
        writer.write(frame)
        writer.write(frame)
    writer.release()
    return path


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_run_on_a_video_with_json(bundle, video, capsys):
    from pipeline.runtime import Classifier

    assert main(["run", "--artifact", str(bundle), "--source", str(video), "--json", "--top-k", "3"]) == 0
    out, err = capsys.readouterr()
    lines = _json_lines(out)
    assert [line["frame"] for line in lines] == list(range(12))
    assert all(len(line["top_k"]) == 3 and line["latency_ms"] > 0 for line in lines)
    assert "FPS" in err and "p50" in err
    # The same frames decoded here and classified by the runtime give the same answers.
    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    with Classifier.open(bundle) as classifier:
        expected = [classifier.classify(frame, top_k=1)[0].index for frame in frames]
    assert [line["top_k"][0]["index"] for line in lines] == expected
    assert lines[0]["top_k"][0]["name"] == (bundle / "labels.txt").read_text().splitlines()[expected[0]]


def test_max_frames_stops_early(bundle, video, capsys):
    assert main(["run", "--artifact", str(bundle), "--source", str(video), "--json", "--max-frames", "4"]) == 0
    assert len(_json_lines(capsys.readouterr().out)) == 4


def test_run_on_an_image_folder_matches_the_reference(build, bundle, tmp_path):
    """As `python -m pipeline run` in its own process: top-1 of the folder's images against the torch reference."""
    folder = tmp_path / "images"
    (folder / "day2").mkdir(parents=True)
    paths = golden_paths(build, bundle)[:8]
    names = {}  # as `run` names them: relative to the folder, subfolders included
    for i, path in enumerate(paths):
        relative = f"day2/{Path(path).name}" if i % 2 else Path(path).name
        shutil.copy(path, folder / relative)
        names[path] = relative
    (folder / "notes.txt").write_text("not an image")
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--artifact", str(bundle), "--source", str(folder),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = _json_lines(done.stdout)
    assert [line["source"] for line in lines] == sorted(names.values())
    reference = np.load(bundle / "golden" / "reference_logits.npy").argmax(1)
    by_name = {names[p]: int(reference[i]) for i, p in enumerate(paths)}
    agreement = np.mean([line["top_k"][0]["index"] == by_name[line["source"]] for line in lines])
    assert agreement >= 0.85
    assert "efficientnet_lite0" in done.stderr and "openvino" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_stream_still_prints_its_summary(build, bundle, tmp_path, signum):
    """A long folder stream stopped after its first frame: the summary of what ran, exit 128 + signal."""
    folder = tmp_path / "long"
    folder.mkdir()
    source = Path(golden_paths(build, bundle)[0])
    for i in range(3000):  # links: minutes of frames, so the signal always lands mid-stream
        (folder / f"{i:05d}.jpg").symlink_to(source)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--artifact", str(bundle), "--source",
                                str(folder), "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    first = process.stdout.readline()  # the first frame is classified
    assert json.loads(first)["frame"] == 0
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    summary = err.strip().splitlines()[-1]
    assert "frames in" in summary and "p50" in summary and summary.endswith("; interrupted"), summary
    assert "Traceback" not in err


@pytest.mark.parametrize("source, message", [
    ("missing.mp4", "no such file, folder or camera index"),
    ("videosrc ! videoconvert ! appsink", "built without GStreamer"),
    ("", "--source is empty"),
])
def test_sources_that_do_not_open_exit_2(bundle, source, message, capsys):
    if "!" in source:
        from pipeline.runtime.sources import has_gstreamer

        if has_gstreamer():
            pytest.skip("this OpenCV has GStreamer: the message for OpenCV without it cannot be shown")
    assert main(["run", "--artifact", str(bundle), "--source", source]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_camera_that_is_not_there_exits_2(bundle, capfd):
    assert main(["run", "--artifact", str(bundle), "--source", "57"]) == 2
    assert "OpenCV cannot open this camera" in capfd.readouterr().err  # OpenCV may log its own lines too


def test_a_file_that_is_not_a_video_and_an_empty_folder_exit_2(bundle, tmp_path, capsys):
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("no video here")
    assert main(["run", "--artifact", str(bundle), "--source", str(not_video)]) == 2
    assert "cannot open" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "--artifact", str(bundle), "--source", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_bad_options_and_a_missing_bundle_exit_2(bundle, video, tmp_path, capsys):
    assert main(["run", "--artifact", str(bundle), "--source", str(video), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["run", "--artifact", str(bundle), "--source", str(video), "--max-frames", "-1"]) == 2
    assert "--max-frames" in capsys.readouterr().err
    assert main(["run", "--artifact", str(tmp_path / "nothing"), "--source", str(video)]) == 2
    assert "no such bundle" in capsys.readouterr().err
