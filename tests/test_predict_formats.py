"""``cnnpress predict`` reads JPEG as it reads PNG (by suffix or by the file's first bytes),
folders of both, and names the formats it reads when a file is none of them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnpress.cli.predict import read_images, read_inputs
from cnnpress.data import load_dataset
from cnnpress.errors import CnnpressError


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "test")


def test_a_jpeg_gives_the_pixels_of_its_png(tmp_path, data):
    pixels = data.images[0, 0].numpy()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(pixels).save(tmp_path / "b.jpeg", quality=100)
    png = read_images(tmp_path / "a.png", data.spec)
    jpg = read_images(tmp_path / "a.jpg", data.spec)
    assert png.shape == jpg.shape == (1, 1, 16, 16)
    step = 1 / (255 * float(np.min(data.spec.std)))  # one grey level, normalised
    assert float((png - jpg).abs().max()) <= 3 * step  # JPEG at quality 100: a level or so
    (tmp_path / "camera.bin").write_bytes((tmp_path / "a.jpg").read_bytes())
    assert read_images(tmp_path / "camera.bin", data.spec).equal(jpg)  # read by its magic
    x, sources = read_inputs([tmp_path], data.spec)  # a folder: PNG and JPEG in name order
    assert [s.rsplit("/", 1)[-1] for s, _ in sources] == ["a.jpg", "a.png", "b.jpeg"]
    assert x.shape == (3, 1, 16, 16)


def test_a_file_of_no_known_format_is_refused_naming_the_formats(tmp_path, data):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CnnpressError) as err:
        read_images(tmp_path / "notes.txt", data.spec)
    text = str(err.value)
    assert "\n" not in text and "IDX" in text and "JPEG" in text and ".npy" in text
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    with pytest.raises(CnnpressError, match="not a readable PNG or JPEG"):
        read_images(tmp_path / "broken.jpg", data.spec)
    np.save(tmp_path / "ok.npy", data.images[:2].numpy())
    assert read_images(tmp_path / "ok.npy", data.spec).shape == (2, 1, 16, 16)
