"""The bundled sample photos' fixed splits: train, val and a test split nothing else reads."""

import numpy as np

from srtrain import data
from srtrain.config import load_config
from srtrain.data import samples


def test_splits_are_disjoint_and_cover_every_photo():
    splits = {s: set(samples.names(s)) for s in samples.SPLITS}
    assert splits["test"] == {"rocket", "china"}
    assert splits["val"] == {"chelsea", "coffee", "flower"}
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"])
    assert not splits["val"] & splits["test"]
    assert set().union(*splits.values()) == {n for n, _, _ in samples.PHOTOS}
    assert len(splits["train"]) >= 10
    # the stereo pair trains together
    assert {"motorcycle_left", "motorcycle_right"} <= splits["train"]


def test_the_test_split_is_evaluated_as_colour_center_crops():
    cfg = load_config(None, ["data.patch_size=64", "data.val_patch_size=256"])
    ids, images = [], []
    for key, lr, hr in data.eval_dataset(cfg, split=cfg.data.test_split):
        ids += [k.decode() for k in key.numpy()]
        images.append(hr.numpy())
        assert lr.shape[1:] == (128, 128, 3)
    hr = np.concatenate(images)
    assert sorted(ids) == ["samples/china", "samples/rocket"]
    # natural colour photos: the channels differ
    assert np.abs(hr[..., 0] - hr[..., 2]).mean() > 0.02
