"""degradation.on=replica: tf.data delivers uint8 HR + seeds, the train step degrades on its
device with the input side's own function. For the same seeds both paths must give the same LR,
on one CPU device and on 2 logical CPU devices (MirroredStrategy, in a fresh process since
TensorFlow fixes its devices at start-up: this file doubles as the script that process runs).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import run_mode

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.patch_size=32", "data.batch_size=4", "model.filters=4"]
TOL = 1e-5  # float tolerance on [0, 1]; the noise alone is sigma 10/255 = 0.04


def _paths(*extra):
    from srtrain.config import load_config

    return (
        load_config(None, [*BASE, *extra]),
        load_config(None, [*BASE, *extra, "degradation.on=replica"]),
    )


def test_degradation_on_reads_from_yaml_and_round_trips(tmp_path):
    """YAML 1.1 reads a plain `on:` key as True: the job loader keeps it as the key `on`, and
    the resolved config.yaml (read back by compare/evaluate with yaml.safe_load) round-trips."""
    import yaml

    from srtrain.config import ConfigError, from_dict, load_config, to_yaml

    job = tmp_path / "job.yaml"
    job.write_text("degradation:\n  on: replica\ntrain:\n  jit: yes\n")
    cfg = load_config(job)
    assert cfg.degradation.on == "replica" and cfg.train.jit is True
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert load_config(None).degradation.on == "input"
    with pytest.raises(ConfigError, match=r"degradation\.on"):
        load_config(None, ["degradation.on=gpu"])
    for name in ("iaprtc12-base", "iaprtc12-advanced"):
        assert load_config(REPO / "jobs" / f"{name}.yaml").degradation.on == "replica"


def _replica_lr(strategy, prepare, batch, shift_seeds=0):
    """The (lr, hr) the train step's replicas compute from a distributed (hr, seeds) batch,
    as lists of per-replica arrays. `shift_seeds` changes the seeds (the test's own guard)."""
    import tensorflow as tf

    @tf.function
    def run(hr, seeds):
        return strategy.run(lambda h, s: prepare(h, s + shift_seeds), args=(hr, seeds))

    lr, hr = run(*batch)
    return [[t.numpy() for t in strategy.experimental_local_results(x)] for x in (lr, hr)]


def _one_step(strategy, cfg, batch, init, jit=False):
    """Weights after one train step of a tiny Base U-Net from `init` on `batch`."""
    from srtrain import losses, models, train

    with strategy.scope():
        model = models.build_unet(filters=4)
        model.set_weights(init)
        opt = train.make_optimizer(1e-3, "float32")
        opt.build(model.trainable_variables)
    global_batch = cfg.data.batch_size * strategy.num_replicas_in_sync
    step = train.make_train_step(
        strategy, model, opt, losses.mae, global_batch, jit, train.prepare_batch(cfg)
    )
    loss = float(step(batch))
    return loss, model.get_weights()


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def _compare(strategy) -> dict:
    """Both paths over `train.distributed_train_dataset` under `strategy`, 2 steps."""
    import keras

    from srtrain import models, train

    cfg_in, cfg_rep = _paths()
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg_in.data.batch_size * replicas
    it_in = iter(train.distributed_train_dataset(strategy, cfg_in, global_batch))
    it_rep = iter(train.distributed_train_dataset(strategy, cfg_rep, global_batch))
    prepare = train.prepare_batch(cfg_rep)
    out = {"replicas": replicas, "lr_diff": 0.0, "hr_diff": 0.0, "shifted_lr_diff": 1.0}
    for _ in range(2):
        b_in, b_rep = next(it_in), next(it_rep)
        hr_u8, seeds = (strategy.experimental_local_results(x) for x in b_rep)
        out["delivered"] = [str(hr_u8[0].dtype.name), list(hr_u8[0].shape), list(seeds[0].shape)]
        lr_in, hr_in = ([t.numpy() for t in strategy.experimental_local_results(x)] for x in b_in)
        lr_rep, hr_rep = _replica_lr(strategy, prepare, b_rep)
        lr_shift, _ = _replica_lr(strategy, prepare, b_rep, shift_seeds=1)
        out["lr_diff"] = max(out["lr_diff"], _max_diff(lr_in, lr_rep))
        out["hr_diff"] = max(out["hr_diff"], _max_diff(hr_in, hr_rep))
        out["shifted_lr_diff"] = min(out["shifted_lr_diff"], _max_diff(lr_in, lr_shift))
        out["replicas_differ"] = replicas == 1 or not np.allclose(lr_rep[0], lr_rep[1])
    # one whole train step from the same weights: same loss, same weights
    keras.utils.set_random_seed(0)
    init = models.build_unet(filters=4).get_weights()
    loss_in, w_in = _one_step(strategy, cfg_in, b_in, init)
    loss_rep, w_rep = _one_step(strategy, cfg_rep, b_rep, init)
    out["loss_in"], out["loss_rep"] = loss_in, loss_rep
    out["step_weight_diff"] = _max_diff(w_in, w_rep)
    out["moved"] = _max_diff(w_in, init) > 0
    return out


def _check_comparison(out: dict, replicas: int) -> None:
    assert out["replicas"] == replicas
    assert out["delivered"] == ["uint8", [4, 32, 32, 3], [4, 2]]
    assert out["replicas_differ"]
    assert out["hr_diff"] == 0.0
    assert out["lr_diff"] < TOL
    # the guard: with other seeds on one path the LR would not match (noise differs)
    assert out["shifted_lr_diff"] > 100 * TOL
    assert out["moved"]
    assert out["loss_rep"] == pytest.approx(out["loss_in"], rel=1e-5)
    assert out["step_weight_diff"] < 1e-5


def test_same_lr_on_both_paths_one_device():
    import tensorflow as tf

    _check_comparison(_compare(tf.distribute.get_strategy()), replicas=1)


def test_replica_path_trains_under_mixed_precision_and_jit():
    """bf16 and fp16 policies (fp16 with loss scaling): one step on the replica path gives the
    loss of the input path (the degradation computes in float32 either way). train.jit: a step
    runs; under XLA the noise comes from XLA's own Philox stream (the same distribution, not the
    same values), so there the noise-free part must match and the noise must have sigma."""
    import keras
    import tensorflow as tf

    from srtrain import data, losses, models, train

    cfg_in, cfg_rep = _paths()
    batch_in = next(iter(data.train_dataset(cfg_in)))
    hr_u8, seeds = next(iter(data.train_dataset(cfg_rep)))
    for policy in ("mixed_bfloat16", "mixed_float16"):
        step_losses = []
        for cfg, batch in ((cfg_in, batch_in), (cfg_rep, (hr_u8, seeds))):
            keras.utils.set_random_seed(1)
            model = models.build_unet(filters=4, dtype=policy)
            opt = train.make_optimizer(1e-3, policy)
            opt.build(model.trainable_variables)
            strategy = tf.distribute.get_strategy()
            prepare = train.prepare_batch(cfg)
            step = train.make_train_step(strategy, model, opt, losses.mae, 4, False, prepare)
            step_losses.append(float(step(batch)))
        assert np.isfinite(step_losses[0]), policy
        assert step_losses[1] == pytest.approx(step_losses[0], rel=1e-6), policy

    clean_in, clean = _paths("degradation.noise_sigma=0")
    lr_in, _ = next(iter(data.train_dataset(clean_in)))
    hr_clean, seeds_clean = next(iter(data.train_dataset(clean)))
    jit_clean = tf.function(train.prepare_batch(clean), jit_compile=True)
    np.testing.assert_allclose(jit_clean(hr_clean, seeds_clean)[0].numpy(), lr_in, atol=TOL)

    flat = tf.fill([4, 64, 64, 3], tf.constant(128, tf.uint8))  # no clipping, blur does nothing
    lr_jit, _ = tf.function(train.prepare_batch(cfg_rep), jit_compile=True)(flat, seeds)
    std = float(tf.math.reduce_std(lr_jit - 128 / 255)) * 255
    assert abs(std - cfg_rep.degradation.noise_sigma) < 0.5
    loss, _ = _one_step(
        tf.distribute.get_strategy(),
        cfg_rep,
        (hr_u8, seeds),
        models.build_unet(filters=4).get_weights(),
        jit=True,
    )
    assert np.isfinite(loss)


def test_eval_dataset_is_the_same_on_both_paths():
    from srtrain import data

    cfg_in, cfg_rep = _paths("data.val_patch_size=64")
    for (k1, lr1, hr1), (k2, lr2, hr2) in zip(
        data.eval_dataset(cfg_in).take(2), data.eval_dataset(cfg_rep).take(2), strict=True
    ):
        assert list(k1.numpy()) == list(k2.numpy())
        np.testing.assert_array_equal(lr1.numpy(), lr2.numpy())
        np.testing.assert_array_equal(hr1.numpy(), hr2.numpy())


def test_same_lr_on_both_paths_two_logical_cpus():
    out = run_mode(__file__, "mirrored")
    assert out["strategy"] == "MirroredStrategy"
    _check_comparison(out, replicas=2)


def _mirrored() -> dict:
    from srtrain import train

    train.split_cpu(2)
    strategy = train.pick_strategy()
    return {"strategy": type(strategy).__name__, **_compare(strategy)}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "mirrored":
        print(json.dumps(_mirrored()))
