"""Without network, the default weights (--pretrained openai) fail in seconds with a line that
says how to run offline; cached weights are used without asking the network."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers.cli import one_error

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a Hub that cannot be reached."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def _advice(line):
    return "--clip-weights FILE" in line and "--pretrained none" in line and "offline" in line


def test_default_weights_offline_fail_fast_in_every_command(offline, capsys):
    images, masks = offline / "images", offline / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "a.png")
    (offline / "classes.txt").write_text("a\nb\n")
    data = ["--dataset", "folder", "--images", images, "--masks", masks,
            "--class-file", offline / "classes.txt"]
    commands = [
        ["segment", images / "a.png", "--classes", "cat", "-o", offline / "out"],
        ["eval", *data],
        ["train", *data, "--out", offline / "run", "--batch-size", "1", "--crop", "32"],
    ]
    for argv in commands:
        start = time.perf_counter()
        line = one_error(capsys, argv)
        assert time.perf_counter() - start < 10, argv
        assert "not cached on this machine" in line and "127.0.0.1:9" in line, line
        assert _advice(line), line


def test_hf_hub_offline_is_respected(offline, monkeypatch):
    from armfast.clip.weights import WeightsUnavailable, pretrained_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        pretrained_file("ViT-B-16", "openai")


def test_cached_weights_need_no_network(offline):
    from armfast.clip.weights import pretrained_file

    repo = offline / "hf-cache" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    start = time.perf_counter()
    path = pretrained_file("ViT-B-16", "openai")
    assert path == str(snapshot / "open_clip_model.safetensors")
    assert time.perf_counter() - start < 2


def test_console_offline_message_is_one_line_and_fast(tmp_path):
    """The whole command, from a fresh process, as a user without network runs it."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ARMFAST_DEBUG")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=UNREACHABLE)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "armfast.cli", "segment", str(image),
                           "--classes", "cat", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and _advice(lines[0]), proc.stderr
    assert elapsed < 30, elapsed  # open_clip alone retries for ~50 s
