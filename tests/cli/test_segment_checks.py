"""`armfast segment`: mistakes fail in one line before CLIP is loaded; no two inputs write
the same output file; images are read as a viewer shows them."""
from __future__ import annotations

import numpy as np
from PIL import Image

from helpers.cli import no_clip, one_error, run_cli  # noqa: F401  (fixture)

SMALL = ["--pretrained", "none", "--templates", "simple", "--short-side", "32", "--crop", "32",
         "--stride", "16", "--device", "cpu"]


def _png(path, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_mistakes_fail_before_clip(tmp_path, capsys, no_clip):
    image = _png(tmp_path / "a.png")

    def error(*extra):
        return one_error(capsys, ["segment", image, "--classes", "cat,dog", "-o", tmp_path / "out",
                                  *SMALL, *extra])

    assert "--backend must be auto or one of" in error("--backend", "flash")
    assert "stride 48 is larger than crop 32" in error("--stride", "48")
    afile = tmp_path / "file"
    afile.write_text("x")
    assert f"--output: cannot write in {afile / 'out'}" in error("-o", afile / "out")
    assert "--model must be an open_clip model" in error("--model", "ViT-Q-99")
    line = one_error(capsys, ["segment", image, "--classes", "cat,dog,Cat", "-o", tmp_path / "o",
                              *SMALL])
    assert "--classes: 'Cat' names both class 0 (cat) and class 2 (Cat)" in line
    assert "--vfm" in error("--baseline", "proxyclip")


def test_output_names_never_collide():
    from armfast.cli.segment import output_stems

    stems = output_stems(["a/photo.jpg", "photo_overlay.jpg", "b/photo.png", "PHOTO.jpg"])
    files = [f.format(s).lower() for s in stems for f in ("{}.png", "{}_overlay.png")]
    assert len(set(files)) == len(files), files
    assert stems[0] == "photo"


def test_colliding_inputs_write_separate_files(tmp_path, capsys):
    first = _png(tmp_path / "photo.png", h=40, w=56, seed=1)
    second = _png(tmp_path / "photo_overlay.png", h=48, w=32, seed=2)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, ["segment", first, second, "--classes", "cat,dog", "-o", out,
                                  *SMALL])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "photo.png", "photo_overlay.png", "photo_overlay_2.png", "photo_overlay_2_overlay.png"]
    assert Image.open(out / "photo.png").size == (56, 40)  # labels of the first
    assert Image.open(out / "photo_overlay.png").mode == "RGB"  # the first's overlay, kept
    assert Image.open(out / "photo_overlay_2.png").size == (32, 48)  # labels of the second


def test_exif_rotated_photo_is_segmented_upright(tmp_path, capsys):
    stored = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, ["segment", path, "--classes", "cat,dog", "-o", out, *SMALL])
    assert rc == 0, err
    assert Image.open(out / "phone.png").size == (40, 56)  # as viewed: 40 wide, 56 high
