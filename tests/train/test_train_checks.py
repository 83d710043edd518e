"""`armfast train`: every ordinary mistake ends in one line naming the flag or file, before
CLIP is loaded; a killed run resumes cleanly; what the run writes is ours."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import numpy as np
import pytest
from PIL import Image

from armfast.train import load_checkpoint
from helpers.cli import block_clip, no_clip, one_error, run_cli  # noqa: F401  (fixture)
from helpers.synthetic_datasets import write_learnable_coco, write_tiny_clip_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-checks")
    write_learnable_coco(root / "coco", n_train=4, n_val=2)
    model = write_tiny_clip_dir(root / "clip")
    return root, model


def train_args(data, out, *extra):
    root, model = data
    return ["train", "--data-root", root / "coco", "--out", out, "--model", model,
            "--steps", "2", "--batch-size", "2", "--crop", "32", "--base-short", "40",
            "--shallow-layers", "0,1,2", "--workers", "0", "--val-every", "0", "--ckpt-every", "1",
            "--log-every", "1", "--warmup", "1", "--templates", "simple", "--no-progress", *extra]


def folder(tmp_path, classes="background\ncat\ndog\n", bad_value=None):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        m = np.zeros((32, 32), np.uint8)
        m[:, 16:] = 1 + i % 2
        if bad_value is not None and i == 2:
            m[0, 0] = bad_value
        Image.fromarray(m).save(masks / f"{i}.png")
    (tmp_path / "classes.txt").write_text(classes)
    return ["--dataset", "folder", "--images", images, "--masks", masks,
            "--class-file", tmp_path / "classes.txt"]


def test_setting_mistakes_fail_before_clip(data, tmp_path, capsys, no_clip):
    out = tmp_path / "run"

    def error(*extra, base=None):
        argv = train_args(data, out) if base is None else base
        return one_error(capsys, [*argv, *extra])

    assert "--crop must be a multiple of the patch size 8" in error("--crop", "30")
    assert "--batch-size 5 x 1 process(es) needs at least 5 training images; the training set " \
        "has 4" in error("--batch-size", "5")
    assert "--baselines: unknown nope" in error("--baselines", "sclip,nope")
    assert "--backend must be auto or one of" in error("--backend", "flash")
    assert "--backend cuda does not run on cpu" in error("--backend", "cuda")
    assert "stride 64 is larger than crop 32" in error(
        "--val-every", "1", "--val-crop", "32", "--val-stride", "64")
    missing = tmp_path / "nowhere"
    assert f"--data-root: {missing} is not a folder" in error(
        base=train_args(data, out)[:1] + ["--data-root", missing] + train_args(data, out)[3:])
    assert f"--resume: no checkpoint file at {missing}" in error("--resume", missing)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert f"--out: {afile} exists and is not a folder" in error(
        base=train_args(data, afile))
    assert f"--out: cannot write in {afile / 'run'}" in error(base=train_args(data, afile / "run"))
    base = train_args(data, out)
    drop = base.index("--data-root")
    base = base[:drop] + base[drop + 2:]
    assert "--class-file: no file at" in error(
        *folder(tmp_path / "f1")[:-1], tmp_path / "missing.txt", base=base)
    assert "'cat' names both class 1 (line 2) and class 3 (line 4)" in error(
        *folder(tmp_path / "f2", classes="background\ncat\ndog\nkitty, cat\n"), base=base)


def test_labels_are_checked_before_clip(data, tmp_path, capsys, monkeypatch):
    root, model = data
    base = train_args(data, tmp_path / "run")
    drop = base.index("--data-root")
    base = base[:drop] + base[drop + 2:]
    block_clip(monkeypatch)
    line = one_error(capsys, [*base, *folder(tmp_path / "f", bad_value=9)])
    assert "training labels: 1 of 4 masks cannot be used" in line
    assert f"{tmp_path / 'f' / 'masks' / '2.png'} (values [9])" in line
    assert "class id 0..2" in line and "armfast check-dataset" in line
    monkeypatch.undo()
    rc, _, err = run_cli(capsys, [*base, *folder(tmp_path / "g")])
    assert rc == 0, err
    record = json.loads((tmp_path / "run" / "labels-checked.json").read_text())
    assert record["masks"] == 4 and record["classes"] == 3


def test_resume_problems_fail_before_clip(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, train_args(data, out))
    assert rc == 0, err
    block_clip(monkeypatch)
    assert "--batch-size 2 -> 4" in one_error(
        capsys, train_args(data, out, "--resume", "--batch-size", "4", "--steps", "4"))
    assert "already holds checkpoints of a run (the latest is step_00000002.safetensors)" in \
        one_error(capsys, train_args(data, out, "--steps", "4"))
    ckpt = out / "checkpoints" / "step_00000002.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    line = one_error(capsys, train_args(data, out, "--resume", "--steps", "4"))
    assert f"checkpoint {ckpt} is corrupt or truncated" in line


def test_killed_run_resumes_cleanly(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_args(data, out, "--steps", "4")
    rc, _, err = run_cli(capsys, [*argv, "--stop-at", "3"])
    assert rc == 0, err
    # killed after logging step 3, before its checkpoint, in the middle of a log line and
    # of writing the checkpoint of step 4 by another (now dead) process
    (out / "checkpoints" / "step_00000003.safetensors").unlink()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / "checkpoints" / f".step_00000004.safetensors.tmp-{dead.pid}"
    stale.write_bytes(b"partial")
    rc, _, err = run_cli(capsys, [*argv, "--resume"])
    assert rc == 0, err
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert load_checkpoint(out / "checkpoints" / "step_00000004.safetensors")["step"] == 4


def test_what_a_finished_run_writes(data, tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        rc, _, err = run_cli(capsys, train_args(data, out, "--warmup", "5"))
    finally:
        os.umask(old)
    assert rc == 0
    # a warm-up longer than the run: one warning line of ours
    assert any(line.startswith("armfast train: warning: --warmup 5 is longer than --steps 2")
               for line in err), err
    card = (out / "arm" / "README.md").read_text()
    assert "pushed to the Hub" not in card and "ARM.from_pretrained" in card
    assert "## Training" in card and "coco_stuff164k" in card
    files = [p for p in out.rglob("*") if p.is_file()]
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes
    assert json.loads((out / "config.json").read_text())["templates"] == "simple"


def test_encoding_class_names_shows_progress(data, tmp_path, capsys):
    argv = [a for a in train_args(data, tmp_path / "run") if a != "--no-progress"]
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0
    assert "encoding 171 class names x 1 templates" in out
    assert any("encode class names" in line for line in err)


@pytest.mark.parametrize("command", ["segment", "train", "eval"])
def test_pretrained_none_means_random_weights_everywhere(command, recwarn):
    """One meaning of --pretrained none: random weights (train and eval used to reject it)."""
    from armfast.cli import build_parser
    from armfast.cli._clip_args import clip_weights

    required = {"segment": ["x.png", "--classes", "a", "-o", "out"],
                "train": ["--out", "run"], "eval": ["--dataset", "voc21"]}[command]
    args = build_parser().parse_args([command, *required, "--pretrained", "none"])
    assert clip_weights(args) is None
    assert any("random weights" in str(w.message) for w in recwarn)
    args = build_parser().parse_args([command, *required, "--pretrained", "None"])
    assert clip_weights(args) is None
    args = build_parser().parse_args([command, *required, "--pretrained", "no-such-tag"])
    with pytest.raises(ValueError, match="--pretrained 'no-such-tag' is not an open_clip weights "
                                         "tag of ViT-B-16 .tags: openai"):
        clip_weights(args)


def test_full_disk_is_one_line(data, tmp_path, capsys, monkeypatch):
    import errno

    import armfast._files

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(armfast._files.os, "fsync", no_space)
    line = one_error(capsys, train_args(data, tmp_path / "run", "--no-label-check"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001.safetensors"
    assert f"cannot write {ckpt}: No space left on device" in line
    assert not [p for p in ckpt.parent.iterdir() if ".tmp-" in p.name]
