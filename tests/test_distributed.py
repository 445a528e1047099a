"""Replication on CPU: MirroredStrategy over 2 logical CPU devices, MultiWorkerMirroredStrategy
over 2 Ray workers. Replicas must see different data, keep identical weights, and one step of
2 replicas x batch 4 must equal 1 replica x batch 8 on the same data.

Each check runs in a fresh process (TensorFlow fixes its devices at start-up): this file doubles
as the script those processes run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import run_mode, set_args

REPO = Path(__file__).resolve().parents[1]


def _mirrored_check() -> dict:
    import tensorflow as tf

    from srtrain import losses, models, train
    from srtrain.config import load_config

    train.split_cpu(2)
    strategy = train.pick_strategy()
    out = {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync}
    cfg = load_config(None, ["data.patch_size=32", "data.batch_size=4", "model.filters=8"])

    # replicas receive different data from the real pipeline
    batch = next(iter(train.distributed_train_dataset(strategy, cfg, global_batch=8)))
    lr_parts = [t.numpy() for t in strategy.experimental_local_results(batch[0])]
    out["per_replica_shapes"] = [list(p.shape) for p in lr_parts]
    out["replicas_differ"] = not np.allclose(lr_parts[0], lr_parts[1])

    # one step of 2 replicas x 4 == 1 replica x 8 on the same data (Base U-Net, fp32)
    rng = np.random.default_rng(0)
    lr = rng.random((8, 16, 16, 3), "float32")
    hr = rng.random((8, 32, 32, 3), "float32")
    keras_seed = 7
    import keras

    keras.utils.set_random_seed(keras_seed)
    single = models.build_unet(filters=16)
    init = single.get_weights()
    opt1 = train.make_optimizer(1e-3, "float32")
    opt1.build(single.trainable_variables)
    step1 = train.make_train_step(tf.distribute.get_strategy(), single, opt1, losses.mae, 8)
    loss1 = float(step1((tf.constant(lr), tf.constant(hr))))

    def mirrored_copy():
        """The single-replica model's initial weights and a fresh optimizer under `strategy`."""
        with strategy.scope():
            model = models.build_unet(filters=16)
            model.set_weights(init)
            opt = train.make_optimizer(1e-3, "float32")
            opt.build(model.trainable_variables)
        return model, train.make_train_step(strategy, model, opt, losses.mae, 8)

    mirrored, step2 = mirrored_copy()
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((lr, hr))
    )  # global batch 8 -> 4 per replica
    dist_batch = next(iter(dist))
    out["mirrored_batch_shapes"] = [
        list(t.shape) for t in strategy.experimental_local_results(dist_batch[0])
    ]
    loss2 = float(step2(dist_batch))
    for _ in range(2):  # a couple more steps to check replicas stay in sync
        step2(dist_batch)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(single.get_weights(), init, strict=True)]
    out["single_moved"] = max(diffs) > 0
    out["loss_single"], out["loss_mirrored"] = loss1, loss2
    # compare after the first step only: rebuild a second mirrored copy for a 1-step comparison
    m3, step3 = mirrored_copy()
    step3(dist_batch)
    out["max_weight_diff_vs_single"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(single.get_weights(), m3.get_weights(), strict=True)
    )
    # every mirrored variable is identical on both replicas
    out["replica_weight_spread"] = _replica_spread(strategy, mirrored)

    # the Advanced U-Net (BatchNorm) as the loop builds it for 2 replicas: model.sync_batch_norm
    # unset means synchronised statistics, so 2 x 4 normalises like 1 x 8 (one replica: the
    # fused kernel, so this also checks it against Keras' synchronised call)
    adv_cfg = load_config(None, ["model.arch=advanced", "model.filters=8"]).model
    keras.utils.set_random_seed(keras_seed)
    adv_single = models.from_config(adv_cfg, 2, fused_batch_norm=True)
    adv_init = adv_single.get_weights()
    opt4 = train.make_optimizer(1e-3, "float32")
    opt4.build(adv_single.trainable_variables)
    step4 = train.make_train_step(tf.distribute.get_strategy(), adv_single, opt4, losses.mae, 8)
    with strategy.scope():
        adv = models.from_config(
            adv_cfg, 2, replicas=strategy.num_replicas_in_sync, fused_batch_norm=True
        )
        adv.set_weights(adv_init)
        opt5 = train.make_optimizer(1e-3, "float32")
        opt5.build(adv.trainable_variables)
    step5 = train.make_train_step(strategy, adv, opt5, losses.mae, 8)
    for _ in range(2):
        step4((tf.constant(lr), tf.constant(hr)))
        step5(dist_batch)
    moving = [i for i, w in enumerate(adv.weights) if "moving" in w.path]
    out["adv_moving_stats"] = len(moving)
    out["adv_moving_moved"] = max(
        float(np.max(np.abs(adv.get_weights()[i] - adv_init[i]))) for i in moving
    )
    out["adv_max_diff_vs_single"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(adv_single.get_weights(), adv.get_weights(), strict=True)
    )
    out["adv_moving_max_diff_vs_single"] = max(
        float(np.max(np.abs(adv_single.get_weights()[i] - adv.get_weights()[i]))) for i in moving
    )
    for _ in range(2):
        step5(dist_batch)
    out["adv_replica_spread"] = _replica_spread(strategy, adv)
    with strategy.scope():  # synchronised BatchNorm adds no weights
        full = models.from_config(load_config(None, ["model.arch=advanced"]).model, 2, replicas=2)
    out["adv_params_64_filters"] = full.count_params()
    return out


def _replica_spread(strategy, model) -> float:
    """The largest difference between the two replicas' copies of any variable (weights, and
    BatchNorm's moving statistics)."""
    return max(
        float(np.max(np.abs(parts[0].numpy() - parts[1].numpy())))
        for v in model.weights
        for parts in [strategy.experimental_local_results(v.value)]
    )


def _fp16_overflow_check() -> dict:
    """fp16 on 2 replicas, an overflow planted on replica 1 only: one step, then what happened."""
    import keras
    import numpy as np
    import tensorflow as tf

    from srtrain import losses, models, train

    train.split_cpu(2)
    strategy = train.pick_strategy()
    rng = np.random.default_rng(0)
    lr = rng.random((2, 4, 16, 16, 3), "float32")  # (replica, B, h, w, C)
    hr = rng.random((2, 4, 32, 32, 3), "float32")
    lr[1, 0, 0, 0, 0] = 1e6  # beyond float16's 65504: inf on replica 1 only
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = models.build_unet(filters=8, dtype="mixed_float16")
        opt = train.make_optimizer(1e-3, "mixed_float16")
        opt.build(model.trainable_variables)
    init = [w.copy() for w in model.get_weights()]
    scale_before = float(opt.dynamic_scale.numpy())
    step = train.make_train_step(strategy, model, opt, losses.mae, 8)
    batch = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            tf.constant(lr[ctx.replica_id_in_sync_group]),
            tf.constant(hr[ctx.replica_id_in_sync_group]),
        )
    )
    step(batch)
    per_replica = [
        [v.value.values[i].numpy() for v in model.weights] for i in range(2)
    ]  # every variable as each replica holds it
    out = {
        "scale_before": scale_before,
        "scale_after": float(opt.dynamic_scale.numpy()),
        "iterations": int(opt.iterations.numpy()),
        "finite": all(bool(np.isfinite(w).all()) for ws in per_replica for w in ws),
        "replica_spread": max(
            float(np.max(np.abs(a - b))) for a, b in zip(*per_replica, strict=True)
        ),
        "moved": max(
            float(np.max(np.abs(a - b))) for a, b in zip(per_replica[0], init, strict=True)
        ),
    }
    # a clean batch afterwards is applied, on both replicas alike
    clean = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            tf.constant(np.clip(lr[ctx.replica_id_in_sync_group], 0, 1)),
            tf.constant(hr[ctx.replica_id_in_sync_group]),
        )
    )
    step(clean)
    out["moved_after_clean_step"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), init, strict=True)
    )
    out["iterations_after_clean_step"] = int(opt.iterations.numpy())
    return out


@pytest.fixture(scope="module")
def mirrored():
    return run_mode(__file__, "mirrored")


def test_mirrored_strategy_over_two_logical_cpus(mirrored):
    assert mirrored["strategy"] == "MirroredStrategy" and mirrored["replicas"] == 2
    assert mirrored["per_replica_shapes"] == [[4, 16, 16, 3], [4, 16, 16, 3]]
    assert mirrored["replicas_differ"]


def test_two_replicas_of_4_equal_one_of_8(mirrored):
    assert mirrored["mirrored_batch_shapes"] == [[4, 16, 16, 3], [4, 16, 16, 3]]
    assert mirrored["single_moved"]
    assert mirrored["loss_mirrored"] == pytest.approx(mirrored["loss_single"], rel=1e-5)
    assert mirrored["max_weight_diff_vs_single"] < 1e-5


def test_mirrored_replicas_keep_identical_weights(mirrored):
    assert mirrored["replica_weight_spread"] == 0.0


def test_advanced_unet_two_replicas_of_4_equal_one_of_8_with_sync_batch_norm(mirrored):
    assert mirrored["adv_params_64_filters"] == 1_887_107
    assert mirrored["adv_moving_stats"] > 0 and mirrored["adv_moving_moved"] > 0
    # weights and moving statistics after 2 steps, as one replica of 8 computes them
    assert mirrored["adv_max_diff_vs_single"] < 1e-4
    assert mirrored["adv_moving_max_diff_vs_single"] < 1e-5


def test_advanced_unet_replicas_keep_identical_weights_and_moving_statistics(mirrored):
    assert mirrored["adv_replica_spread"] == 0.0


def _run_check(name: str) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_fp16_overflow_on_one_replica_skips_the_step_on_all():
    r = _run_check("fp16")
    # the verdict is taken on the summed gradients: skipped everywhere, the loss scale halves
    assert r["scale_before"] == 2.0**15 and r["scale_after"] == 2.0**14
    assert r["iterations"] == 0
    assert r["finite"] and r["moved"] == 0.0 and r["replica_spread"] == 0.0
    # and a clean step afterwards trains, on both replicas alike
    assert r["moved_after_clean_step"] > 0 and r["iterations_after_clean_step"] == 1


@pytest.mark.slow
def test_local_mode_trains_with_mirrored_strategy(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "srtrain.run",
            "--local",
            *set_args(
                "debug.cpu_replicas=2",
                "data.patch_size=32",
                "data.val_patch_size=64",
                "data.batch_size=4",
                "model.filters=8",
                "model.arch=advanced",
                "train.epochs=1",
                "train.steps_per_epoch=5",
                "train.lr_scaling=linear",
            ),
            "--output",
            str(tmp_path),
            "--name",
            "m",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 replica(s) x batch 4 = global batch 8" in p.stdout
    result = json.loads((tmp_path / "m" / "result.json").read_text())
    assert result["replicas"] == 2 and result["global_batch"] == 8
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(2 * 5e-4)  # linear lr scaling with 2 replicas
    # trained with synchronised BatchNorm on 2 replicas, saved for one: plain Keras loads it
    import keras

    model = keras.saving.load_model(Path(result["checkpoint"], "model.keras"), compile=False)
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bns and not any(la.synchronized for la in bns)
    assert model(np.zeros((1, 16, 16, 3), "float32")).shape == (1, 32, 32, 3)


def _mwms_worker(config: dict) -> None:
    """A Ray Train worker: 2 steps of the real loop's pieces, then its view of data and weights."""
    import hashlib

    import numpy as np
    import ray.train

    from srtrain import losses, models, train
    from srtrain.config import from_dict

    cfg = from_dict(config["cfg"])
    strategy = train.pick_strategy()
    rank = ray.train.get_context().get_world_rank()
    with strategy.scope():  # Advanced: BatchNorm, synchronised over the 2 workers' replicas
        model = models.from_config(cfg.model, 2, replicas=strategy.num_replicas_in_sync)
        opt = train.make_optimizer(1e-3, "float32")
        opt.build(model.trainable_variables)
    global_batch = cfg.data.batch_size * strategy.num_replicas_in_sync
    it = iter(train.distributed_train_dataset(strategy, cfg, global_batch))
    step = train.make_train_step(strategy, model, opt, losses.mae, global_batch)
    first = next(it)
    data_digest = hashlib.sha1(
        strategy.experimental_local_results(first[0])[0].numpy().tobytes()
    ).hexdigest()
    losses_seen = [float(step(first)), float(step(next(it)))]
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    import tensorflow as tf

    record = {
        "rank": rank,
        "mwms": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
        "replicas": strategy.num_replicas_in_sync,
        "data": data_digest,
        "weights": hashlib.sha1(weights.astype("float32").tobytes()).hexdigest(),
        "losses": losses_seen,
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


@pytest.mark.slow
@pytest.mark.ray
def test_multi_worker_mirrored_over_two_ray_workers(tmp_path):
    p = subprocess.run(
        [sys.executable, __file__, "mwms", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["mwms"] and r1["mwms"]
    assert r0["replicas"] == r1["replicas"] == 2
    assert r0["data"] != r1["data"]  # each worker reads its own shard of the data
    # all-reduced gradients and synchronised BatchNorm keep weights and moving statistics
    # identical on both workers
    assert r0["weights"] == r1["weights"]
    assert r0["losses"] == pytest.approx(r1["losses"])  # the reduced global loss


def _run_mwms(out: str) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from srtrain.config import load_config, to_dict

    cfg = load_config(
        None, ["data.patch_size=32", "data.batch_size=2", "model.arch=advanced", "model.filters=8"]
    )
    ray.init(num_cpus=2, configure_logging=False)
    try:
        TensorflowTrainer(
            _mwms_worker,
            train_loop_config={"cfg": to_dict(cfg), "out": out},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="mwms", storage_path=out),
        ).fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "mirrored":
        print(json.dumps(_mirrored_check()))
    elif sys.argv[1] == "fp16":
        print(json.dumps(_fp16_overflow_check()))
    elif sys.argv[1] == "mwms":
        _run_mwms(sys.argv[2])
