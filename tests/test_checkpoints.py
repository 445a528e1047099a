"""Checkpoints: a saved checkpoint reloads to identical predictions, and a restored optimizer
continues exactly where the original would have."""

import numpy as np
import tensorflow as tf

from srtrain import checkpoints, losses, models, train
from srtrain.config import load_config


def _setup(cfg):
    strategy = tf.distribute.get_strategy()
    model = models.from_config(cfg.model, 2)
    opt = train.make_optimizer(1e-3, "float32")
    opt.build(model.trainable_variables)
    step = train.make_train_step(strategy, model, opt, losses.mae, global_batch=2)
    return model, opt, step


def test_checkpoint_roundtrip(tmp_path):
    cfg = load_config(None, ["model.filters=8", "model.arch=advanced"])
    rng = np.random.default_rng(0)
    batches = [
        (rng.random((2, 16, 16, 3), "float32"), rng.random((2, 32, 32, 3), "float32"))
        for _ in range(3)
    ]
    model, opt, step = _setup(cfg)
    step(batches[0])
    step(batches[1])
    export = models.from_config(cfg.model, 2)
    export.set_weights(model.get_weights())
    state = checkpoints.TrainState(epoch=1, step=2, lr=1e-3, best_psnr=20.5)
    checkpoints.save(tmp_path / "ckpt", cfg, export, opt, state, model.get_weights())

    # inference: plain keras loading, identical predictions (BatchNorm in inference mode)
    loaded = checkpoints.load_model(str(tmp_path / "ckpt"))
    x = batches[2][0]
    np.testing.assert_array_equal(
        loaded(x, training=False).numpy(), model(x, training=False).numpy()
    )

    # resume: a fresh model + optimizer restored, then one more identical step on both
    model2, opt2, step2 = _setup(cfg)
    restored, best = checkpoints.restore(tmp_path / "ckpt", model2, opt2)
    assert (restored.epoch, restored.step, restored.best_psnr) == (1, 2, 20.5)
    assert len(best) == len(model.get_weights())
    step(batches[2])
    step2(batches[2])
    for a, b in zip(model.get_weights(), model2.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "ckpt" / "config.yaml").read_text().startswith("data:")
