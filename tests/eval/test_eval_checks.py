"""`armfast eval`: mistakes end in one line naming the flag or file, before CLIP is loaded;
an evaluation that fails part-way keeps the rows it finished."""
from __future__ import annotations

import json

import pytest

from armfast import ARM
from helpers.cli import no_clip, one_error, run_cli  # noqa: F401  (fixture)
from helpers.synthetic_datasets import write_dataset, write_eval_setup

SMALL = ["--short-side", "40", "--crop", "32", "--stride", "16", "--workers", "0",
         "--no-progress", "--templates", "simple"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-checks")
    model = write_eval_setup(root)
    ARM().save_pretrained(root / "arm-vit-b16")  # for another CLIP
    return root, model


def args(setup, *extra, datasets="cityscapes"):
    root, model = setup
    return ["eval", "--dataset", datasets, "--root", root / "data", "--model", model, *SMALL,
            *extra]


def test_mistakes_fail_before_clip(setup, tmp_path, capsys, no_clip):
    root, _ = setup
    broken = tmp_path / "broken-arm"
    broken.mkdir()
    for f in ("config.json", "README.md"):
        (broken / f).write_bytes((root / "arm" / f).read_bytes())
    (broken / "model.safetensors").write_bytes((root / "arm" / "model.safetensors").read_bytes()[:500])
    line = one_error(capsys, args(setup, "--arm", broken))
    assert f"--arm: {broken / 'model.safetensors'} is damaged or truncated" in line
    line = one_error(capsys, args(setup, "--arm", root / "arm-vit-b16"))
    assert "--arm: arm was trained for backbone ViT-B-16" in line and "width 768 != 64" in line
    line = one_error(capsys, args(setup, "--arm", root / "arm" / "model.safetensors"))
    assert "--arm: " in line and "give the ARM folder" in line
    afile = tmp_path / "file"
    afile.write_text("x")
    assert f"--json: {afile} exists and is not a folder" in one_error(
        capsys, args(setup, "--json", afile / "r.json"))
    assert "--backend must be auto or one of" in one_error(capsys, args(setup, "--backend", "x"))
    assert "stride 64 is larger than crop 32" in one_error(capsys, args(setup, "--stride", "64"))
    assert f"--root {tmp_path / 'none'}: voc21: dataset root" in one_error(
        capsys, ["eval", "--dataset", "voc21", "--root", tmp_path / "none", *SMALL])
    classes = tmp_path / "classes.txt"
    classes.write_text("road\nsky\nroad\n")
    line = one_error(capsys, ["eval", "--dataset", "folder", "--images", tmp_path, "--masks",
                              root, "--class-file", classes, *SMALL])
    assert "'road' names both class 0 (line 1) and class 2 (line 3)" in line


def test_a_failure_part_way_keeps_the_finished_rows(setup, tmp_path, capsys):
    root, _ = setup
    data = tmp_path / "data"
    write_dataset("cityscapes", data, n=2, size=(40, 48), splits=("val",))
    write_dataset("voc21", data, n=2, size=(40, 48), splits=("val",))
    bad = data / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "val0001.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "r.json"
    argv = ["eval", "--dataset", "cityscapes,voc21", "--root", data, "--model", setup[1],
            "--baseline", "sclip,naclip", "--json", out, *SMALL]
    rc, text, err = run_cli(capsys, argv)
    errors = [line for line in err if ": error: " in line]
    assert rc == 2 and len(errors) == 1 and "val0001.png" in errors[0], err
    payload = json.loads(out.read_text())
    assert payload["complete"] is False and "val0001.png" in payload["error"]
    assert [(r["dataset"], r["method"]) for r in payload["results"]] == [
        ("cityscapes", "sclip"), ("cityscapes", "naclip")]
    assert "mIoU (%)" in text and "2 result(s) finished before the error" in text


def test_templates(setup, capsys):
    rc, text, err = run_cli(capsys, args(setup, "--limit", "1"))
    assert rc == 0, err
    assert "1 template(s) (simple)" in text
