"""The embedded default dataset: real photos that ship inside installed packages.

scikit-image bundles a handful of photographs and scikit-learn two more; `data.source: samples`
trains on them with no download anywhere. The splits are fixed by name, so every run and every
worker sees the same division: 12 photos train, 3 validate (best checkpoint, plateau, early
stopping, trial ranking read them) and 2 test (read once at the end of a run, by nothing else).
Files are read as their encoded bytes, exactly as shard records are, so the same tf.data decode
path serves both.
"""

from __future__ import annotations

from importlib import resources

# (name, package holding the file, file name). Grayscale photos become RGB when decoded.
PHOTOS = (
    ("astronaut", "skimage.data", "astronaut.png"),
    ("camera", "skimage.data", "camera.png"),
    ("chelsea", "skimage.data", "chelsea.png"),
    ("coffee", "skimage.data", "coffee.png"),
    ("rocket", "skimage.data", "rocket.jpg"),
    ("motorcycle_left", "skimage.data", "motorcycle_left.png"),
    ("motorcycle_right", "skimage.data", "motorcycle_right.png"),
    ("hubble_deep_field", "skimage.data", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "skimage.data", "ihc.png"),
    ("retina", "skimage.data", "retina.jpg"),
    ("moon", "skimage.data", "moon.png"),
    ("brick", "skimage.data", "brick.png"),
    ("grass", "skimage.data", "grass.png"),
    ("gravel", "skimage.data", "gravel.png"),
    ("coins", "skimage.data", "coins.png"),
    ("china", "sklearn.datasets.images", "china.jpg"),
    ("flower", "sklearn.datasets.images", "flower.jpg"),
)

# Held out for validation: three colour photos of everyday scenes, none of them a near-duplicate
# of a training photo (motorcycle_left and _right are a stereo pair, so both train).
VAL_NAMES = ("chelsea", "coffee", "flower")
# Held out for testing: two more natural colour photos (a rocket on its launch pad and a temple in
# a landscape, both 640x427), unlike any training photo; astronaut and the motorcycle pair stay in
# training, whose other photos are textures, grayscale or scientific images.
TEST_NAMES = ("rocket", "china")

SPLITS = ("train", "val", "test")


def split_of(name: str) -> str:
    return "val" if name in VAL_NAMES else "test" if name in TEST_NAMES else "train"


def names(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"samples: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    return [n for n, _, _ in PHOTOS if split_of(n) == split]


def read(split: str) -> list[tuple[str, bytes]]:
    """(id, encoded image bytes) for every photo of a split, in a fixed order."""
    wanted = set(names(split))
    out = []
    for name, package, filename in PHOTOS:
        if name in wanted:
            out.append(
                (f"samples/{name}", resources.files(package).joinpath(filename).read_bytes())
            )
    return out
