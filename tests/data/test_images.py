"""Images reach the model as a viewer shows them: EXIF orientation, transparency, 16-bit,
CMYK and the other modes Pillow reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from armfast.data.base import read_image
from armfast.inference import to_image_tensor

WHITE = (255, 255, 255)


def stored_pixels(h=4, w=6):
    """Every pixel distinct, so any rotation or flip shows."""
    a = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 3
    return a


@pytest.mark.parametrize("orientation, view", [
    (1, lambda a: a),
    (3, lambda a: a[::-1, ::-1]),  # upside down
    (6, lambda a: np.rot90(a, k=-1)),  # rotate 90 degrees clockwise to view
    (8, lambda a: np.rot90(a, k=1)),  # counter-clockwise
])
def test_exif_orientation_is_applied(tmp_path, orientation, view):
    a = stored_pixels()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(a).save(path, exif=exif)
    expected = view(a)
    np.testing.assert_array_equal(read_image(path), expected)  # the dataset readers
    x = to_image_tensor(str(path))
    assert tuple(x.shape[-2:]) == expected.shape[:2]
    with Image.open(path) as im:  # a PIL image handed over as it was opened
        assert tuple(to_image_tensor(im).shape[-2:]) == expected.shape[:2]
    from armfast.data.images import displayed_size, open_rgb

    np.testing.assert_array_equal(np.asarray(open_rgb(path)), expected)
    assert displayed_size(path) == expected.shape[:2]  # what check-dataset compares


def _modes():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # what transparent pixels happen to store
    rgba[0, 0, 3] = 255
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 40
    la[0, 0, 1] = 255
    p = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), mode="P")
    p.putpalette([200, 100, 50, 0, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    i16 = Image.fromarray(np.array([[65535, 32768], [0, 257]], np.uint16))
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    one = Image.fromarray(np.array([[True, False], [False, True]]))
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), mode="F")
    return [
        ("RGBA", Image.fromarray(rgba, mode="RGBA"), [[(10, 20, 30), WHITE], [WHITE, WHITE]]),
        ("LA", Image.fromarray(la, mode="LA"), [[(40,) * 3, WHITE], [WHITE, WHITE]]),
        ("P+transparency", p, [[(200, 100, 50), WHITE], [WHITE, WHITE]]),
        ("I;16", i16, [[(255,) * 3, (128,) * 3], [(0,) * 3, (1,) * 3]]),
        ("CMYK", cmyk, [[WHITE, WHITE], [WHITE, WHITE]]),
        ("1", one, [[WHITE, (0,) * 3], [(0,) * 3, WHITE]]),
        ("F", f, [[(0,) * 3, (128,) * 3], [(255,) * 3, (64,) * 3]]),
    ]


def test_an_rgba_array_is_composited_as_its_pil_image():
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent, fully opaque
    from_array = to_image_tensor(rgba)
    assert torch.equal(from_array, to_image_tensor(Image.fromarray(rgba, mode="RGBA")))
    assert torch.equal(from_array[:, 0, 0], torch.ones(3))  # white under a transparent pixel
    assert torch.equal(from_array[:, 0, 1], torch.from_numpy(rgba[0, 1, :3]).float() / 255)


@pytest.mark.parametrize("name, image, expected", _modes(), ids=[m[0] for m in _modes()])
def test_every_mode_becomes_the_rgb_a_viewer_shows(tmp_path, name, image, expected):
    expected = np.array(expected, dtype=np.uint8)
    got = (to_image_tensor(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    if name not in ("F", "1"):  # as files too (PNG/TIFF keep these modes)
        path = tmp_path / ("x.tif" if name == "CMYK" else "x.png")
        image.save(path)
        np.testing.assert_array_equal(read_image(path), expected)


def test_rgba_arrays_are_composited():
    a = np.zeros((1, 2, 4), np.uint8)
    a[0, 0] = (100, 0, 0, 255)
    a[0, 1] = (100, 0, 0, 0)
    got = (to_image_tensor(a) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got[0], [(100, 0, 0), WHITE])


def test_unreadable_files_name_the_file(tmp_path):
    from armfast.data.images import open_rgb

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        open_rgb(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_rgb(tmp_path / "missing.png")
