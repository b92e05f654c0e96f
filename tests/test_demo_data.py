"""The demo data (distrifusion_jax.tools.demo_data): deterministic scenes, captions true to their layouts, every
colour, shape and position used, and a pixel check that agrees with the generator's own captions."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from distrifusion_jax.tools import demo_data
from distrifusion_jax.tools.demo_data import (
    COLOURS,
    HELDOUT_SEED_BASE,
    PLACES,
    POSITIONS,
    SHAPES,
    TRAIN_SEEDS,
    check_image,
    expected_of,
    heldout_prompts,
    make_batch,
    make_example,
    write_dataset,
)

SEEDS = range(200)
PLACE_OF = {v: k for k, v in PLACES.items()}
OBJECT = re.compile(rf"(an?) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(PLACES.values())})")
ENDING = re.compile(rf"(.*), on (an?) ({'|'.join(COLOURS)}) background")


@pytest.fixture(scope="module")
def small():
    """The 200 seeds' examples at 64x64."""
    return [make_example(s, 64) for s in SEEDS]


def parse(caption):
    """(background, [(colour, shape, position), ...]) from a caption; asserts the grammar, articles included."""
    ending = ENDING.fullmatch(caption)
    assert ending, caption
    listed, article, background = ending.groups()
    parts = listed.split(", ")
    parts[-1:] = parts[-1].split(" and ")
    assert len(parts) in (1, 2, 3) and (len(parts) == 1 or " and " in listed), caption
    assert listed.count(" and ") == (len(parts) > 1), caption
    objects = []
    for part in parts:
        match = OBJECT.fullmatch(part)
        assert match, (part, caption)
        art, colour, shape, place = match.groups()
        assert art == ("an" if colour[0] in "aeiou" else "a"), caption
        objects.append((colour, shape, PLACE_OF[place]))
    assert article == ("an" if background[0] in "aeiou" else "a"), caption
    return background, objects


def test_same_seed_same_example_and_seeds_differ():
    image, caption, scene = make_example(7, 64)
    again, caption_again, scene_again = make_example(7, 64)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert image.tobytes() == again.tobytes() and caption == caption_again and scene == scene_again
    other = [make_example(s, 64) for s in (8, 9, 10)]
    assert all(not np.array_equal(image, o[0]) for o in other)
    assert len({caption} | {o[1] for o in other}) > 1
    # the layout and caption do not depend on the size; the pixel boxes and areas scale with it
    big, big_caption, big_scene = make_example(7, 128)
    assert big.shape == (128, 128, 3) and big_caption == caption
    assert [(o.shape, o.colour, o.position, o.centre) for o in big_scene.objects] == [
        (o.shape, o.colour, o.position, o.centre) for o in scene.objects
    ]
    images, captions = make_batch([7, 8], 64)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], image) and captions == [caption, other[0][1]]


def test_captions_follow_the_grammar_and_the_layout(small):
    words = {"a", "an", "on", "the", "at", "in", "and", "background"} | set(COLOURS) | set(SHAPES)
    words |= {w for place in PLACES.values() for w in place.split()}
    for _, caption, scene in small:
        assert set(re.split(r"[ ,]+", caption)) <= words, caption
        background, objects = parse(caption)
        assert background == scene.background
        assert objects == [(o.colour, o.shape, o.position) for o in scene.objects], caption
        # largest first (the first at least 1.5x any other, in pixels too), the others by decreasing area
        first, *rest = scene.objects
        assert all(first.area_frac >= 1.5 * o.area_frac and first.area >= 1.5 * o.area for o in rest)
        assert [o.area_frac for o in rest] == sorted((o.area_frac for o in rest), reverse=True)
        assert all(0 <= o.box[0] < o.box[2] <= 64 and 0 <= o.box[1] < o.box[3] <= 64 for o in scene.objects)


def test_every_colour_shape_position_and_count_appears(small):
    scenes = [scene for _, _, scene in small]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS) == {s.background for s in scenes}
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        colours, positions = [o.colour for o in s.objects], [o.position for o in s.objects]
        assert s.background not in colours
        assert len(set(colours)) == len(colours) and len(set(positions)) == len(positions)


def test_largest_object_is_clearly_its_colour(small):
    """The largest object's mean colour (its fully covered pixels) is near its named RGB and nearest to it."""
    names = list(COLOURS)
    for seed, (image, caption, scene) in zip(SEEDS[:50], small):
        inside = demo_data._mask(scene.objects[0], 64) > 0.99
        mean = image[inside].astype(np.float64).mean(0)
        named = np.array(COLOURS[scene.objects[0].colour])
        assert np.abs(mean - named).max() < 25, (seed, caption, mean)
        assert names[demo_data.nearest_colours(mean[None])[0]] == scene.objects[0].colour


def test_check_image_agrees_with_the_captions():
    results = []
    for seed in SEEDS:
        image, caption, scene = make_example(seed, 128)
        expected = expected_of(scene)
        results.append(check_image(image, expected)["ok"])
        wrong_colour = next(c for c in COLOURS if c not in (expected["colour"], scene.background))
        wrong_position = next(p for p in POSITIONS if p != expected["position"])
        assert not check_image(image, {**expected, "colour": wrong_colour})["ok"]
        wrong = check_image(image, {**expected, "position": wrong_position})
        assert wrong["ok_colour"] and not wrong["ok_position"] and not wrong["ok"]
    rate = np.mean(results)
    print(f"check_image agrees with the caption on {rate:.1%} of {len(SEEDS)} seeds at 128x128")
    assert rate >= 0.98
    image, caption, scene = make_example(0, 256)  # the training size
    assert check_image(image, expected_of(scene))["ok"]
    blank = check_image(np.full((64, 64, 3), 30, np.uint8), {"colour": "red", "position": "left"})
    assert blank["colour"] is None and not blank["ok"]


def test_heldout_prompts():
    prompts = heldout_prompts()
    assert prompts == heldout_prompts() and len(prompts) == 64
    assert len({p for p, _ in prompts}) == 64
    assert {p for p, _ in heldout_prompts(64, seed=1)} != {p for p, _ in prompts}
    for prompt, expected in prompts:
        assert expected["seed"] >= HELDOUT_SEED_BASE and expected["seed"] not in TRAIN_SEEDS
        background, objects = parse(prompt)
        assert (expected["colour"], expected["position"]) == (objects[0][0], objects[0][2])
    for prompt, expected in prompts[
        :4
    ]:  # the prompt is the caption of its seed's scene, which passes the check
        image, caption, _ = make_example(expected["seed"], 128)
        assert caption == prompt and check_image(image, expected)["ok"]


def test_write_dataset(tmp_path):
    folder = write_dataset(tmp_path / "demo", 3, seed=5, size=32)
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [5, 6, 7]
    for row in rows:
        image, caption, scene = make_example(row["seed"], 32)
        assert row["caption"] == caption and row["colour"] == scene.objects[0].colour
        assert np.array_equal(np.asarray(Image.open(folder / row["file"])), image)
