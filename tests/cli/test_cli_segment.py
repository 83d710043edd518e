"""`armfast segment` end to end on generated PNGs with a random-weight CLIP."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from armfast import ARM
from armfast.cli import build_parser, main

SMALL = ["--pretrained", "none", "--templates", "simple", "--short-side", "32", "--crop", "32",
         "--stride", "16", "--device", "cpu"]


def _png(path, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_segment_end_to_end_with_errors(tmp_path, capsys):
    good = _png(tmp_path / "street.png")
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    ARM().save_pretrained(tmp_path / "arm")
    out = tmp_path / "out"
    rc = main(["segment", good, str(bad), str(tmp_path / "missing.jpg"),
               "--classes", "road,person|people,sky", "--baseline", "sclip",
               "--arm", str(tmp_path / "arm"), "-o", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 1  # two images failed, the good one was still written
    lines = [line for line in err.splitlines() if "error:" in line]
    assert any("broken.png: cannot read image" in line for line in lines)
    assert any("missing.jpg: cannot read image" in line for line in lines)

    labels = Image.open(out / "street.png")
    assert labels.mode == "P" and labels.size == (56, 40)
    assert set(np.unique(np.asarray(labels)).tolist()) <= {0, 1, 2}
    overlay = Image.open(out / "street_overlay.png")
    assert overlay.mode == "RGB" and overlay.height >= 40 and overlay.width > 56  # legend beside
    assert not (out / "broken.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--classes", " , "], "class list is empty"),
    (["--classes", "cat", "--clip-weights", "/nonexistent/clip.safetensors"],
     "--clip-weights: no file at /nonexistent/clip.safetensors"),
    (["--class-file", "/nonexistent/names.txt"], "names.txt"),
    (["--classes", "cat", "--arm", "/nonexistent/arm"], "no ARM folder"),
])
def test_segment_setup_errors_are_one_line(tmp_path, capsys, extra, message):
    argv = ["segment", _png(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *extra]
    if "--clip-weights" not in extra:
        argv += ["--pretrained", "none", "--templates", "simple"]
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_segment_parser():
    args = build_parser().parse_args(["segment", "x.png", "--classes", "a,b", "-o", "out"])
    assert args.baseline == "sclip" and args.pretrained is None and args.model == "ViT-B-16"
    # --pretrained is not given: openai weights, the default of segment, train and eval alike
    from armfast.cli._clip_args import DEFAULT_TAG

    assert DEFAULT_TAG == "openai"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "x.png", "-o", "out"])  # classes are required
