"""srtrain.upscale: whole images of any size, padding and cropping back, tiling equal to untiled,
grayscale in -> RGB out, unreadable files reported and skipped with a failing exit code."""

import numpy as np
import pytest
from PIL import Image
from untrained import save_checkpoint

from srtrain import upscale
from srtrain.config import load_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny untrained checkpoint (random weights are enough to test geometry and blending)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000001"
    return str(path), save_checkpoint(path, load_config(None, ["model.filters=8"]))


def test_any_size_is_padded_and_cropped_back(ckpt):
    _, model = ckpt
    lr = np.random.default_rng(0).random((37, 22, 3), np.float32)
    out = upscale.predict(model, lr, 2)
    assert out.shape == (74, 44, 3)
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_tiled_equals_untiled_where_the_image_fits_one_tile(ckpt):
    _, model = ckpt
    lr = np.random.default_rng(1).random((50, 61, 3), np.float32)
    whole = upscale.predict(model, lr, 2, tile=0)
    one_tile = upscale.predict(model, lr, 2, tile=64, overlap=16)
    assert np.abs(whole - one_tile).max() < 1e-3


def test_many_tiles_equal_untiled_within_1e3(ckpt):
    _, model = ckpt
    # Neither side a multiple of the tile or of 4: the last tiles start off the step.
    lr = np.random.default_rng(2).random((299, 341, 3), np.float32)
    assert len(upscale._spans(299, 128, 64)) >= 3 and len(upscale._spans(341, 128, 64)) >= 3
    whole = upscale.predict(model, lr, 2, tile=0)
    tiled = upscale.predict(model, lr, 2, tile=128)  # the default overlap
    assert tiled.shape == whole.shape
    assert np.abs(whole - tiled).max() < 1e-3


def test_dihedral_transforms_are_the_eight_and_undo_exactly():
    img = np.arange(3 * 5 * 2).reshape(3, 5, 2)
    seen = {
        upscale.dihedral(img, k).tobytes() + bytes(upscale.dihedral(img, k).shape) for k in range(8)
    }
    assert len(seen) == 8
    for k in range(8):
        np.testing.assert_array_equal(upscale.undo_dihedral(upscale.dihedral(img, k), k), img)


def test_self_ensemble_averages_the_eight_turned_back_outputs():
    rng = np.random.default_rng(3)
    lr = rng.random((21, 30, 3), np.float32)
    ramp = np.linspace(0, 1, 400, dtype=np.float32)

    def nearest(x, training=False):  # equivariant: the ensemble changes nothing
        return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)

    def skewed(x, training=False):  # adds a ramp along the width: not equivariant
        up = nearest(x)
        return up + ramp[: up.shape[2]][None, None, :, None]

    plain = upscale.predict(nearest, lr, 2)
    np.testing.assert_allclose(upscale.predict(nearest, lr, 2, ensemble=True), plain, atol=1e-6)
    by_hand = np.mean(
        [
            upscale.undo_dihedral(upscale.predict(skewed, upscale.dihedral(lr, k), 2), k)
            for k in range(8)
        ],
        axis=0,
    )
    got = upscale.predict(skewed, lr, 2, ensemble=True)
    np.testing.assert_allclose(got, by_hand, atol=1e-6)
    # Half of the turns put the ramp along the height: the output is no longer the skewed one.
    assert np.abs(got - upscale.predict(skewed, lr, 2)).max() > 0.05


def test_self_ensemble_of_a_model_matches_within_float_rounding_under_tiles(ckpt):
    _, model = ckpt
    lr = np.random.default_rng(4).random((50, 61, 3), np.float32)
    whole = upscale.predict(model, lr, 2, ensemble=True)
    one_tile = upscale.predict(model, lr, 2, tile=64, overlap=16, ensemble=True)
    assert whole.shape == (100, 122, 3) and np.abs(whole - one_tile).max() < 1e-3


def test_tiles_start_on_the_pooling_grid_and_cover_the_image():
    for size, tile, step in ((150, 64, 32), (171, 64, 32), (100, 32, 16), (61, 64, 48)):
        spans = upscale._spans(size, tile, step)
        assert all(a % upscale.MODEL_MULTIPLE == 0 for a, _ in spans)
        assert spans[-1][1] == size and all(b - a <= tile + 3 for a, b in spans)
        kept = upscale._seams(spans)
        assert kept[0][0] == 0 and kept[-1][1] == size
        for (a, b), (k0, k1) in zip(spans, kept, strict=True):
            assert a <= k0 < k1 <= b
        assert all(kept[i][1] == kept[i + 1][0] for i in range(len(kept) - 1))


def test_cli_photo_grayscale_and_bad_file(ckpt, tmp_path, capsys):
    path, _ = ckpt
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), np.uint8)).save(src / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 45), np.uint8), "L").save(src / "gray.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    rc = upscale.main(
        [
            "--checkpoint",
            path,
            str(src),
            "--out",
            str(out),
            "--tile",
            "32",
            "--overlap",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 1  # something failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped" in err
    photo, gray = Image.open(out / "photo.png"), Image.open(out / "gray.png")
    assert photo.size == (200, 140) and photo.mode == "RGB"
    assert gray.size == (90, 66) and gray.mode == "RGB"
    assert (
        upscale.main(
            ["--checkpoint", path, str(src / "photo.jpg"), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    ens = tmp_path / "ens"
    args = ["--checkpoint", path, str(src / "photo.jpg"), "--out", str(ens), "--self-ensemble"]
    assert upscale.main([*args, "--no-progress"]) == 0
    one, eight = (np.asarray(Image.open(d / "photo.png"), np.int16) for d in (out, ens))
    assert one.shape == eight.shape and np.abs(one - eight).max() > 0


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    rc = upscale.main(
        ["--checkpoint", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and any("nope" in line and "model.keras" in line for line in err)
