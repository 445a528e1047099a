"""The weight EMA (train.ema_decay): the update rule, in the train step, saved and restored with
checkpoints. Its behaviour under MirroredStrategy is checked in tests/test_train.py."""

import numpy as np
import pytest
import tensorflow as tf

from srtrain import checkpoints, losses, models, train
from srtrain.config import from_dict
from srtrain.ema import WeightEMA


def tiny(**kw):
    return models.build_unet(filters=4, batch_norm=True, **kw)


def batch():
    return (tf.random.uniform((2, 8, 8, 3), seed=1), tf.random.uniform((2, 16, 16, 3), seed=2))


def test_each_train_step_moves_the_average_toward_the_weights():
    strategy = tf.distribute.get_strategy()
    model = tiny()
    ema = WeightEMA(strategy, model, tiny(), decay=0.9)
    opt = train.make_optimizer(1e-2, "float32")
    opt.build(model.trainable_variables)
    step = train.make_train_step(strategy, model, opt, losses.mae, 2, ema=ema)
    for n in range(1, 4):
        before = ema.averaged.get_weights()
        step(batch())
        d = min(0.9, (1 + n) / (10 + n))  # the ramp: short memory at first
        assert float(ema.decay_at(n)) == pytest.approx(d)
        expected = [d * b + (1 - d) * w for b, w in zip(before, model.get_weights(), strict=True)]
        for got, want in zip(ema.averaged.get_weights(), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # BatchNorm moving statistics are averaged too, and the average lags the weights
    names = [w.path for w in model.weights]
    assert any("moving_mean" in n for n in names)
    assert not all(
        np.allclose(a, b)
        for a, b in zip(ema.averaged.get_weights(), model.get_weights(), strict=True)
    )
    assert not any(w.trainable for w in ema.averaged.weights)


def test_checkpoints_export_the_average_and_resume_the_raw_weights(tmp_path):
    cfg = from_dict({"model": {"arch": "advanced", "filters": 4}})
    model, averaged = tiny(), tiny()
    rng = np.random.default_rng(0)
    raw = [rng.random(w.shape).astype("float32") for w in model.get_weights()]
    avg = [rng.random(w.shape).astype("float32") for w in model.get_weights()]
    model.set_weights(raw)
    averaged.set_weights(avg)
    opt = train.make_optimizer(1e-3, "float32")
    opt.build(model.trainable_variables)
    checkpoints.save(
        tmp_path, cfg, averaged, opt, checkpoints.TrainState(lr=1e-3), None, model.get_weights()
    )
    # inference loads the average
    exported = checkpoints.load_model(str(tmp_path)).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(exported, avg, strict=True))
    # a resumed run gets both back where they were
    model2, averaged2 = tiny(), tiny()
    opt2 = train.make_optimizer(1e-3, "float32")
    opt2.build(model2.trainable_variables)
    checkpoints.restore(tmp_path, model2, opt2, averaged2)
    assert all(np.array_equal(a, b) for a, b in zip(model2.get_weights(), raw, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(averaged2.get_weights(), avg, strict=True))
