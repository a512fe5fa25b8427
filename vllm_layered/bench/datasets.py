"""The requests a benchmark sends: input images (random shapes or a folder) and a layer count each."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))  # (width, height) of the random images
RANDOM_POOL = 16  # distinct random images, cycled through by the requests


@dataclass(frozen=True)
class BenchRequest:
    """One request: the uploaded file (name, bytes) and its layer count."""

    filename: str
    image: bytes
    layers: int


def parse_layers(spec: str) -> tuple[int, int]:
    """"4" -> (4, 4); "2-8" -> (2, 8). Any non-negative counts: the server judges what it accepts."""
    low, _, high = spec.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--layers must be N or LOW-HIGH, got {spec!r}") from None
    if bounds[0] < 0 or bounds[0] > bounds[1]:
        raise ValueError(f"--layers must be N or LOW-HIGH with 0 <= LOW <= HIGH, got {spec!r}")
    return bounds


def random_image(rng: np.random.Generator, long_side: int) -> Image.Image:
    """An RGBA picture of random shapes on a random background, of one of ASPECT_RATIOS (PNG-compressible,
    unlike pixel noise, so uploads stay realistic in size)."""
    aw, ah = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]
    scale = long_side / max(aw, ah)
    width, height = max(16, round(aw * scale)), max(16, round(ah * scale))
    image = Image.new("RGBA", (width, height), tuple(int(c) for c in rng.integers(0, 256, 4)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 4))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=fill)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def folder_images(folder: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image file in ``folder`` (by suffix, sorted by name; not recursive)."""
    if not folder.is_dir():
        raise ValueError(f"--dataset must be 'random' or a folder of images; {folder} is neither")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [(p.name, p.read_bytes()) for p in files]


def load_dataset(
    dataset: str, num_requests: int, layers: tuple[int, int], *, seed: int = 0, image_size: int = 640
) -> list[BenchRequest]:
    """``num_requests`` requests from "random" (seeded images, long side ``image_size``) or a folder (its
    images in name order, cycled). Layer counts are uniform in ``layers`` (inclusive), seeded."""
    rng = np.random.default_rng(seed)
    if dataset == "random":
        pool = [(f"random_{i}.png", _png(random_image(rng, image_size))) for i in range(min(num_requests, RANDOM_POOL))]
    else:
        pool = folder_images(Path(dataset))
    counts = rng.integers(layers[0], layers[1] + 1, num_requests)
    return [BenchRequest(*pool[i % len(pool)], int(counts[i])) for i in range(num_requests)]
