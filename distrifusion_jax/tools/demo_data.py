"""Procedural captioned scenes for the demo model (shapes in named colours at named places) and their pixel check."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# name -> anchor (x, y) as fractions of the image; a centre's position is the nearest anchor
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
PLACES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TRAIN_SEEDS = range(0, 10**9)  # training examples' seeds
HELDOUT_SEED_BASE = 10**9  # heldout_prompts draws from seeds from here up, never a training seed
LARGEST_AREA = (0.055, 0.08)  # the first (largest) object's area, as a fraction of the image
OTHER_AREA = (0.35, 0.6)  # each other object's area, as a fraction of the largest's (so it is >= 1.67x)
JITTER = 0.03  # centre offset from the anchor, fraction of the image
MARGIN = 0.02  # shapes keep this far (fraction of the image) inside the border
TEXTURE = 0.12  # texture amplitude: a pixel mixes at most about this far towards white or black
SUPERSAMPLE = 4  # masks are drawn at this multiple of the size and box-filtered down (antialiasing)


@dataclass(frozen=True)
class SceneObject:
    """One shape: centre and area as fractions of the image; box (x0, y0, x1, y1) and area in pixels once drawn."""

    shape: str
    colour: str
    position: str
    centre: tuple[float, float]
    area_frac: float
    box: tuple[int, int, int, int] | None = None
    area: int | None = None


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-3 objects, largest first (distinct colours and positions, none the background's)."""

    background: str
    objects: tuple[SceneObject, ...]


def _extent(shape: str, area: float) -> tuple[float, float, float]:
    """(half width, extent above the centre, extent below) of a shape of this area (upright equilateral triangle)."""
    if shape == "circle":
        r = np.sqrt(area / np.pi)
        return r, r, r
    if shape == "square":
        return (np.sqrt(area) / 2,) * 3
    side = np.sqrt(4 * area / np.sqrt(3))
    return side / 2, side / np.sqrt(3), side / (2 * np.sqrt(3))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene's layout (no pixels): the first draws from rng, so make_example's layout depends only on the seed."""
    k = int(rng.integers(1, 4))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[: k + 1]]
    positions = [list(POSITIONS)[i] for i in rng.permutation(len(POSITIONS))[:k]]
    largest = rng.uniform(*LARGEST_AREA)
    areas = [largest] + sorted(largest * rng.uniform(*OTHER_AREA, size=k - 1), reverse=True)
    objects = []
    for colour, position, area in zip(colours[1:], positions, areas):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        half, up, down = _extent(shape, area)
        x, y = np.array(POSITIONS[position]) + rng.uniform(-JITTER, JITTER, size=2)
        x = float(np.clip(x, MARGIN + half, 1 - MARGIN - half))
        y = float(np.clip(y, MARGIN + up, 1 - MARGIN - down))
        objects.append(SceneObject(shape, colour, position, (x, y), float(area)))
    return Scene(colours[0], tuple(objects))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """'a red circle on the left, an orange square at the top and ..., on a blue background' (largest first)."""
    parts = [f"{_article(o.colour)} {o.colour} {o.shape} {PLACES[o.position]}" for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on {_article(scene.background)} {scene.background} background"


def _mask(obj: SceneObject, size: int) -> np.ndarray:
    """The shape's coverage in [0, 1], float32 [size, size], antialiased by supersampling."""
    big = size * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    half, up, down = (e * big for e in _extent(obj.shape, obj.area_frac))
    x, y = obj.centre[0] * big, obj.centre[1] * big
    if obj.shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=255)
    else:
        draw.polygon([(x, y - up), (x + half, y + down), (x - half, y + down)], fill=255)
    return np.asarray(image.resize((size, size), Image.BOX), np.float32) / 255


def _shade(rgb, t: np.ndarray) -> np.ndarray:
    """rgb mixed towards white where t > 0 and towards black where t < 0 (hue kept): float [..., 3]."""
    rgb = np.asarray(rgb, np.float32)
    t = t[..., None]
    return np.where(t > 0, rgb + t * (255 - rgb), rgb * (1 + t))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in [-1, 1] varying over about size / cells pixels: a cells x cells grid upsampled bicubically."""
    grid = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32))
    return np.clip(np.asarray(grid.resize((size, size), Image.BICUBIC)), -1, 1)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres' (x, y) as fractions of the image, float32 [size, size] each."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)


def _object_texture(rng: np.random.Generator, obj: SceneObject, size: int) -> np.ndarray:
    """The object's fill over the whole image: its colour with stripes, radial shading or blotches, and grain."""
    x, y = _grid(size)
    kind = ("stripes", "radial", "blotches")[int(rng.integers(3))]
    if kind == "stripes":
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(0.03, 0.08), rng.uniform(0, 2 * np.pi)
        t = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    elif kind == "radial":  # lit from the upper left
        r = _extent(obj.shape, obj.area_frac)[0]
        d = np.hypot(x - obj.centre[0] + 0.4 * r, y - obj.centre[1] + 0.4 * r) / (1.6 * r)
        t = 1 - 2 * np.clip(d, 0, 1)
    else:
        t = _smooth_noise(rng, size, int(rng.integers(8, 16)))
    t = TEXTURE * t + rng.normal(0, 0.25 * TEXTURE, (size, size))
    return _shade(COLOURS[obj.colour], np.clip(t, -1.4 * TEXTURE, 1.4 * TEXTURE))


def _background(rng: np.random.Generator, colour: str, size: int) -> np.ndarray:
    """The background colour with a gentle linear gradient, faint large-scale mottling and grain."""
    x, y = _grid(size)
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.09)
    t = strength * 2 * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    t = t + 0.02 * _smooth_noise(rng, size, 4) + rng.normal(0, 0.01, (size, size))
    return _shade(COLOURS[colour], t.astype(np.float32))


def render(scene: Scene, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, Scene]:
    """The scene as uint8 [size, size, 3] (largest object drawn last, on top) and the scene with boxes and areas."""
    image = _background(rng, scene.background, size)
    placed = []
    for obj in reversed(scene.objects):
        alpha = _mask(obj, size)
        image = image * (1 - alpha[..., None]) + _object_texture(rng, obj, size) * alpha[..., None]
        rows, cols = np.nonzero(alpha >= 0.5)
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        placed.insert(0, replace(obj, box=box, area=int(rows.size)))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), replace(scene, objects=tuple(placed))


def make_example(seed: int, size: int = 256) -> tuple[np.ndarray, str, Scene]:
    """(image uint8 [size, size, 3], caption, layout) from a seed; the caption and layout do not depend on size."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    image, scene = render(scene, rng, size)
    return image, caption(scene), scene


def make_batch(seeds, size: int = 256) -> tuple[np.ndarray, list[str]]:
    """(images uint8 [N, size, size, 3], captions) for these seeds."""
    examples = [make_example(int(s), size) for s in seeds]
    return np.stack([e[0] for e in examples]), [e[1] for e in examples]


def expected_of(scene: Scene) -> dict:
    """What check_image looks for: the largest object's colour and position."""
    return {"colour": scene.objects[0].colour, "position": scene.objects[0].position}


def heldout_prompts(n: int = 64, seed: int = 0) -> list[tuple[str, dict]]:
    """n distinct evaluation prompts with their expected largest object ({'colour', 'position', 'seed'}), from
    seeds HELDOUT_SEED_BASE + seed * 10**6 + i (never a training seed; a repeated caption is skipped)."""
    prompts, seen, i = [], set(), 0
    while len(prompts) < n:
        s = HELDOUT_SEED_BASE + seed * 10**6 + i
        scene = sample_scene(np.random.default_rng(s))
        text, i = caption(scene), i + 1
        if text not in seen:
            seen.add(text)
            prompts.append((text, {**expected_of(scene), "seed": s}))
    return prompts


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of each pixel's nearest named colour (RGB distance): int [...] for uint8 [..., 3]."""
    palette = np.array(list(COLOURS.values()), np.float32)
    d = (palette**2).sum(-1) - 2 * pixels.astype(np.float32) @ palette.T  # + |pixel|^2, the same for all
    return d.argmin(-1)


def nearest_position(x: float, y: float) -> str:
    """The position whose anchor is nearest to (x, y), given as fractions of the image."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def check_image(image: np.ndarray, expected: dict) -> dict:
    """Does the image's largest object have the expected colour and position? The commonest named colour is the
    background; the next commonest is the largest object's, and the median of its pixels is its centre."""
    h, w = image.shape[:2]
    labels = nearest_colours(image)
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    names = list(COLOURS)
    order = np.argsort(-counts, kind="stable")
    background, found = names[order[0]], int(order[1])
    result = {"background": background, "colour": None, "position": None, "centre": None, "fraction": 0.0}
    if counts[found] > 0:
        rows, cols = np.nonzero(labels == found)
        x, y = (float(np.median(cols)) + 0.5) / w, (float(np.median(rows)) + 0.5) / h
        result.update(colour=names[found], position=nearest_position(x, y), centre=(x, y))
        result["fraction"] = float(counts[found]) / (h * w)
    result["ok_colour"] = result["colour"] == expected["colour"]
    result["ok_position"] = result["position"] == expected["position"]
    result["ok"] = result["ok_colour"] and result["ok_position"]
    return result


def write_dataset(folder, n: int, seed: int = 0, size: int = 256) -> Path:
    """n examples (seeds seed .. seed + n - 1) as folder/images/NNNNNN.png and folder/captions.jsonl."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n):
            image, text, scene = make_example(seed + i, size)
            name = f"images/{i:06d}.png"
            Image.fromarray(image).save(folder / name)
            f.write(
                json.dumps({"file": name, "caption": text, "seed": seed + i, **expected_of(scene)}) + "\n"
            )
    return folder
