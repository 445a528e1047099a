"""Pieces of srtrain/train.py: global-norm gradient clipping (one replica and two, where it must
equal one replica on the same global batch), the EMA under MirroredStrategy, and the one test-split
evaluation at the end of a run.

The two-replica check runs in a fresh process (TensorFlow fixes its devices at start-up): this
file doubles as the script that process runs.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import run_mode

REPO = Path(__file__).resolve().parents[1]


def test_clipping_scales_the_gradient_to_the_global_norm():
    import tensorflow as tf

    from srtrain import train

    grads = [tf.fill([4], 3.0), tf.fill([2, 2], 4.0)]  # global norm sqrt(4*9 + 4*16) = 10
    clipped = train.clip_global_norm(grads, 2.0)
    assert float(tf.linalg.global_norm(clipped)) == pytest.approx(2.0)
    np.testing.assert_allclose(clipped[0].numpy() / clipped[1].numpy()[0, 0], 0.75)
    same = train.clip_global_norm(grads, 50.0)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(same, grads, strict=True))
    # gradients that still carry an fp16 loss scale are judged unscaled
    scaled = [g * 1024.0 for g in grads]
    kept = train.clip_global_norm(scaled, 50.0, loss_scale=1024.0)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(kept, scaled, strict=True))


def _mirrored_check() -> dict:
    import keras
    import tensorflow as tf

    from srtrain import losses, models, train
    from srtrain.ema import WeightEMA

    train.split_cpu(2)
    strategy = train.pick_strategy()
    rng = np.random.default_rng(0)
    lr = rng.random((8, 16, 16, 3), "float32")
    hr = rng.random((8, 32, 32, 3), "float32")
    dist = next(
        iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((lr, hr))))
    )
    out = {"replicas": strategy.num_replicas_in_sync}

    # clipped: 2 replicas x 4 == 1 replica x 8 (a tight clip, so it is active)
    keras.utils.set_random_seed(7)
    single = models.build_unet(filters=8)
    init = single.get_weights()
    opt1 = train.make_optimizer(1e-2, "float32")
    opt1.build(single.trainable_variables)
    step1 = train.make_train_step(
        tf.distribute.get_strategy(), single, opt1, losses.mae, 8, clip_norm=1e-3
    )
    step1((tf.constant(lr), tf.constant(hr)))
    with strategy.scope():
        mirrored = models.build_unet(filters=8)
        mirrored.set_weights(init)
        opt2 = train.make_optimizer(1e-2, "float32")
        opt2.build(mirrored.trainable_variables)
    step2 = train.make_train_step(strategy, mirrored, opt2, losses.mae, 8, clip_norm=1e-3)
    step2(dist)
    out["clip_diff_vs_single"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(single.get_weights(), mirrored.get_weights(), strict=True)
    )
    # unclipped, Adam's first step moves weights by ~lr; clipped identically, it must too, so
    # compare against the SGD-like size of the move: both runs clipped the same global gradient
    out["moved"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(init, mirrored.get_weights(), strict=True)
    )

    # EMA of an Advanced U-Net (BatchNorm) under MirroredStrategy: both replicas' shadow copies
    # stay identical and follow the rule
    with strategy.scope():
        adv = models.build_unet(filters=8, batch_norm=True, strided_conv=True)
        ema = WeightEMA(
            strategy, adv, models.build_unet(filters=8, batch_norm=True, strided_conv=True), 0.5
        )
        opt3 = train.make_optimizer(1e-2, "float32")
        opt3.build(adv.trainable_variables)
    step3 = train.make_train_step(strategy, adv, opt3, losses.mae, 8, clip_norm=1.0, ema=ema)
    before = ema.averaged.get_weights()
    step3(dist)
    d = float(ema.decay_at(1))
    want = [d * b + (1 - d) * w for b, w in zip(before, adv.get_weights(), strict=True)]
    out["ema_rule_error"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(ema.averaged.get_weights(), want, strict=True)
    )

    def spread(weights):
        return max(
            (
                float(np.max(np.abs(parts[0].numpy() - parts[1].numpy())))
                for v in weights
                for parts in [strategy.experimental_local_results(v.value)]
            ),
            default=0.0,
        )

    # Trainable weights are identical on both replicas; BatchNorm moving statistics are each
    # replica's own (without sync BatchNorm), and each replica's average follows its own.
    trainable = [i for i, w in enumerate(adv.weights) if w.trainable]
    stats = [i for i, w in enumerate(adv.weights) if not w.trainable]
    out["ema_replica_spread"] = spread([ema.averaged.weights[i] for i in trainable])
    out["ema_stats_spread"] = spread([ema.averaged.weights[i] for i in stats])
    out["model_stats_spread"] = spread([adv.weights[i] for i in stats])
    d_stats = [
        float(np.max(np.abs(parts[0].numpy() - (d * b0 + (1 - d) * parts[1].numpy()))))
        for i in stats
        for parts, b0 in [
            (
                (
                    strategy.experimental_local_results(ema.averaged.weights[i].value)[1],
                    strategy.experimental_local_results(adv.weights[i].value)[1],
                ),
                before[i],
            )
        ]
    ]
    out["ema_stats_rule_error_replica1"] = max(d_stats)
    out["ema_moved"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(before, ema.averaged.get_weights(), strict=True)
    )
    return out


@pytest.mark.slow
def test_clipping_and_ema_under_mirrored_strategy():
    out = run_mode(__file__, "mirrored")
    assert out["replicas"] == 2
    assert out["moved"] > 1e-3
    assert out["clip_diff_vs_single"] < 1e-5
    assert out["ema_moved"] > 0
    assert out["ema_rule_error"] < 1e-6
    assert out["ema_replica_spread"] == 0.0
    assert out["ema_stats_rule_error_replica1"] < 1e-6
    assert out["ema_stats_spread"] <= out["model_stats_spread"] + 1e-6


def test_the_best_weights_are_tested_once_on_the_test_split_or_reported_absent():
    import tensorflow as tf

    from srtrain import losses, models, train
    from srtrain.config import from_dict

    cfg = from_dict(
        {"data": {"patch_size": 32, "val_patch_size": 64, "val_images": 1}, "model": {"filters": 4}}
    )
    eval_step = train.make_eval_step(models.from_config(cfg.model, 2), losses.mae, 2)
    lines = []
    ctx = train.Context(run_dir="unused", log_fn=lines.append)
    strategy = tf.distribute.get_strategy()
    out = train.evaluate_test_split(cfg, ctx, strategy, eval_step)
    assert out["test_split"] == "test" and out["test_images"] == 2  # all of it, not val_images
    assert 10 < out["test_bicubic_psnr"] < 40 and 0 < out["test_ssim"] <= 1
    assert "64 center crops" in out["test_protocol"]
    assert not lines
    missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_split="holdout"))
    out = train.evaluate_test_split(missing, ctx, strategy, eval_step)
    assert out["test_psnr"] is None and out["test_bicubic_psnr"] is None
    assert len(lines) == 1 and "no split 'holdout'" in lines[0]


if __name__ == "__main__":
    if sys.argv[1:] == ["mirrored"]:
        print(json.dumps(_mirrored_check()))
