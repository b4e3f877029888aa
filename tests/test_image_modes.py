"""Folder images in every mode Pillow returns, normalised as an image viewer shows them (issue 12):
16-bit greys scaled (not clipped), transparency composited onto white, palette, CMYK, 1-bit, float and
EXIF orientation. Each test writes small files with Pillow and checks the loaded tensors' values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.train.data import _load_folder
from agent.train.images import IMAGE_BACKGROUND, normalize_image

SIZE = 8


def load(folder: Path, channels: int) -> torch.Tensor:
    """Every image of ``folder`` at its own size (no resampling), as the training tensors (the loader of
    ``load_dataset("folder", ...)`` before its held-out split)."""
    images, _, _ = _load_folder(folder, SIZE, channels)
    return images


def byte_of(values: torch.Tensor) -> torch.Tensor:
    return ((values + 1.0) * 127.5).round()


def save(folder: Path, name: str, image: Image.Image, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    image.save(path, **options)
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greys_are_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    ramp = np.rint(np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE))
    if mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16))
    elif mode == "I;16B":
        image = Image.frombytes(mode, (SIZE, SIZE), ramp.astype(">u2").tobytes())
    else:
        image = Image.fromarray(ramp.astype(np.int32))
    assert image.mode == mode
    expected = np.rint(ramp / 257)
    assert np.array_equal(np.asarray(normalize_image(image, "L")), expected)
    save(tmp_path, "ramp.png" if mode != "I" else "ramp.tif", image)
    values = load(tmp_path, 1)
    assert values.shape == (1, 1, SIZE, SIZE)
    assert torch.equal(byte_of(values[0, 0]), torch.from_numpy(expected).float())
    assert len(values.unique()) > SIZE * SIZE // 2  # not two grey levels
    assert float((values == 1.0).float().mean()) < 0.05


@pytest.mark.timeout(30)
def test_16_bit_png_file_keeps_its_grey_levels(tmp_path: Path) -> None:
    grey = np.full((SIZE, SIZE), 32768, dtype=np.uint16)  # mid grey in 16 bits
    save(tmp_path, "mid.png", Image.fromarray(grey))
    assert Image.open(tmp_path / "mid.png").mode.startswith("I")
    values = load(tmp_path, 3)
    assert torch.equal(byte_of(values), torch.full((1, 3, SIZE, SIZE), 128.0))


@pytest.mark.timeout(30)
def test_transparent_pixels_are_white_whatever_colour_they_hide(tmp_path: Path) -> None:
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[: SIZE // 2, :, 3] = 0  # ... hidden in the top half
    rgba[SIZE // 2 :, :, 3] = 255
    save(tmp_path, "hidden.png", Image.fromarray(rgba, mode="RGBA"))
    values = byte_of(load(tmp_path, 3)[0])
    assert torch.equal(values[:, : SIZE // 2], torch.full((3, SIZE // 2, SIZE), 255.0))
    red = torch.tensor([255.0, 0.0, 0.0])[:, None, None].expand(3, SIZE // 2, SIZE)
    assert torch.equal(values[:, SIZE // 2 :, :], red)


@pytest.mark.timeout(30)
def test_half_transparency_blends_with_the_white_background() -> None:
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert np.asarray(normalize_image(image, "RGB")).tolist() == [[[127, 127, 127]] * 2] * 2
    grey_alpha = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(normalize_image(grey_alpha, "L")).tolist() == [[255, 255]] * 2
    assert IMAGE_BACKGROUND == (255, 255, 255)


@pytest.mark.timeout(30)
def test_palette_with_a_transparent_index(tmp_path: Path) -> None:
    image = Image.new("P", (SIZE, SIZE))
    image.putpalette([0, 0, 255, 0, 255, 0] + [0, 0, 0] * 254)  # 0: blue, 1: green
    image.putdata([0] * (SIZE * SIZE // 2) + [1] * (SIZE * SIZE // 2))
    save(tmp_path, "palette.png", image, transparency=0)
    values = byte_of(load(tmp_path, 3)[0])
    assert torch.equal(values[:, 0, 0], torch.tensor([255.0, 255.0, 255.0]))  # blue was transparent
    assert torch.equal(values[:, -1, -1], torch.tensor([0.0, 255.0, 0.0]))
    save(tmp_path / "opaque", "palette.png", image)  # without transparency: its colours
    assert torch.equal(byte_of(load(tmp_path / "opaque", 3)[0])[:, 0, 0], torch.tensor([0.0, 0.0, 255.0]))


@pytest.mark.timeout(30)
def test_palette_alpha_cmyk_one_bit_and_float_modes() -> None:
    palette_alpha = Image.new("RGBA", (2, 2), (10, 20, 30, 0)).convert("PA")
    assert palette_alpha.mode == "PA"
    assert np.asarray(normalize_image(palette_alpha, "RGB")).tolist() == [[[255, 255, 255]] * 2] * 2
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(normalize_image(cmyk, "RGB"))[0, 0].tolist() == [255, 0, 0]
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    assert np.asarray(normalize_image(one_bit, "L")).tolist() == [[0, 255]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32), mode="F")
    assert np.asarray(normalize_image(floats, "L")).tolist() == [[0, 128, 255, 255, 0, 0]]
    assert np.asarray(normalize_image(floats, "RGB"))[0, 1].tolist() == [128, 128, 128]


@pytest.mark.timeout(30)
def test_float_tiff_in_a_folder(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    save(tmp_path, "float.tiff", Image.fromarray(ramp, mode="F"))
    values = byte_of(load(tmp_path, 1)[0, 0])
    assert torch.equal(values, torch.from_numpy(np.rint(ramp.astype(np.float64) * 255)).float())


@pytest.mark.timeout(30)
def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path: Path) -> None:
    stored = np.zeros((SIZE, SIZE), dtype=np.uint8)
    stored[0, :] = 255  # a white top row as stored ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... "rotate 90° clockwise to display": the white row becomes the right column
    save(tmp_path, "rotated.png", Image.fromarray(stored), exif=exif.tobytes())
    values = byte_of(load(tmp_path, 1)[0, 0])
    assert torch.equal(values[:, -1], torch.full((SIZE,), 255.0))
    assert float(values[:, :-1].sum()) == 0.0


@pytest.mark.timeout(30)
def test_ordinary_8_bit_images_load_as_before(tmp_path: Path) -> None:
    rgb = np.arange(SIZE * SIZE * 3, dtype=np.uint8).reshape(SIZE, SIZE, 3)
    save(tmp_path, "rgb.png", Image.fromarray(rgb))
    values = byte_of(load(tmp_path, 3)[0])
    assert torch.equal(values, torch.from_numpy(rgb).permute(2, 0, 1).float())
    grey = Image.fromarray(rgb).convert("L")
    assert torch.equal(byte_of(load(tmp_path, 1)[0, 0]), torch.from_numpy(np.array(grey)).float())
