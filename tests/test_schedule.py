"""The cosine schedule (computed on the device from the optimizer's step) and the epoch-end
policy (best weights, plateau lr cuts, early stopping), as pure functions."""

import itertools
import math
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import tensorflow as tf

from srtrain import losses, models, schedule, train
from srtrain.checkpoints import TrainState
from srtrain.config import from_dict


def train_cfg(**kw):
    base = {"epochs": 4, "steps_per_epoch": 25, "lr": 1e-2, "min_lr": 1e-4}
    return from_dict({"train": {**base, **kw}}).train


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    cfg = train_cfg(schedule="cosine", warmup_steps=10)
    lrs = [float(schedule.lr_at(s, cfg)) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(5e-3)
    assert lrs[9] == pytest.approx(1e-2)  # the peak at the last warmup step
    assert lrs[10] == pytest.approx(1e-2, rel=1e-6)  # cosine starts at the base lr
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[99] == pytest.approx(1e-4)  # min_lr at the last planned step
    mid = 10 + (99 - 10) / 2
    assert float(schedule.lr_at(mid, cfg)) == pytest.approx((1e-2 + 1e-4) / 2, rel=1e-5)
    # linear lr scaling passes its own base
    assert float(schedule.lr_at(9, cfg, base_lr=4e-2)) == pytest.approx(4e-2)


def test_the_optimizer_follows_the_schedule_from_its_own_step():
    cfg = from_dict(
        {"train": {"schedule": "cosine", "warmup_steps": 3, "epochs": 1, "steps_per_epoch": 10}}
    )
    model = models.build_unet(filters=4)
    opt = train.make_optimizer(schedule.learning_rate(cfg.train, 1e-3), "float32")
    opt.build(model.trainable_variables)
    step = train.make_train_step(tf.distribute.get_strategy(), model, opt, losses.mae, 2)
    batch = (tf.random.uniform((2, 8, 8, 3), seed=1), tf.random.uniform((2, 16, 16, 3), seed=2))
    for n in range(1, 6):
        step(batch)
        assert int(opt.iterations) == n
        assert float(opt.learning_rate) == pytest.approx(float(schedule.lr_at(n, cfg.train, 1e-3)))
    # Re-planned (as the time limit does at an epoch end): the same compiled step follows the
    # new end; min_lr arrives at the new last step.
    lr = opt._learning_rate
    lr.plan(1)  # 10 -> still 10 steps: nothing moves
    assert float(lr(5)) == pytest.approx(float(schedule.lr_at(5, cfg.train, 1e-3)))
    short = from_dict({"train": {**cfg.train.__dict__, "steps_per_epoch": 7}}).train
    lr.total.assign(7.0)
    step(batch)
    assert float(opt.learning_rate) == pytest.approx(float(schedule.lr_at(6, short, 1e-3)))
    assert float(lr(6)) == pytest.approx(cfg.train.min_lr)
    # plateau keeps a plain float the epoch-end policy reassigns
    assert schedule.learning_rate(from_dict({}).train, 5e-4) == 5e-4


def test_planned_epochs_end_where_the_time_limit_will_stop_the_run():
    cfg = train_cfg(epochs=40, time_limit_minutes=10)
    assert schedule.planned_epochs(TrainState(), cfg) == 40  # no epoch timed yet
    assert schedule.planned_epochs(TrainState(), train_cfg(epochs=40)) == 40  # no limit
    # 100 s per epoch: after epoch 1, five more fit in the 500 s left.
    state = TrainState(epoch=1, train_seconds=100.0, longest_epoch_seconds=100.0)
    assert schedule.planned_epochs(state, cfg) == 6
    # the same rule as the stop: at epoch 5 (500 s) one more epoch fits, at epoch 6 none
    assert (
        schedule.planned_epochs(dataclasses_replace(state, epoch=5, train_seconds=500.0), cfg) == 6
    )
    assert (
        schedule.planned_epochs(dataclasses_replace(state, epoch=6, train_seconds=600.0), cfg) == 6
    )
    # never beyond train.epochs, never before the epochs already done
    assert schedule.planned_epochs(state, train_cfg(epochs=3, time_limit_minutes=10)) == 3
    late = TrainState(epoch=7, train_seconds=700.0, longest_epoch_seconds=100.0)
    assert schedule.planned_epochs(late, cfg) == 7
    # and the policy stops exactly at the planned epoch
    policy_state = TrainState(epoch=5, train_seconds=500.0, longest_epoch_seconds=100.0)
    _, d = schedule.epoch_end_policy(
        policy_state, {"epoch": 6, "val_psnr": 1.0, "epoch_seconds": 100.0}, cfg
    )
    assert d.out_of_time


def test_the_first_epoch_of_a_process_counts_only_until_a_warm_one_is_timed():
    """It also traces, compiles and fills caches: a 300 s first epoch of 100 s ones must not
    cost the run its last epochs."""
    cfg = train_cfg(epochs=40, time_limit_minutes=10)
    timed = [(300.0, False), (100.0, True), (100.0, True)]
    state = TrainState()
    plans = []
    for e, (seconds, warm) in enumerate(timed, 1):
        state, _ = schedule.epoch_end_policy(
            dataclasses_replace(state, epoch=e),  # as the loop sets it before the policy
            {"epoch": e, "val_psnr": 1.0, "epoch_seconds": seconds},
            cfg,
            warm,
        )
        plans.append(schedule.planned_epochs(state, cfg))
    assert plans == [2, 4, 4]  # 300 s as the estimate, then 100 s: 300 + 3 x 100 = 600 s
    assert schedule.epoch_estimate(state) == 100.0 and state.longest_epoch_seconds == 300.0


def row(epoch, psnr):
    return {"epoch": epoch, "val_psnr": psnr}


def run_policy(cfg, psnrs, lr=1e-2):
    state, decisions = TrainState(lr=lr), []
    for e, p in enumerate(psnrs, 1):
        state, d = schedule.epoch_end_policy(state, row(e, p), cfg)
        decisions.append(d)
    return state, decisions


def test_plateau_cuts_the_lr_after_patience_epochs_without_a_better_val_psnr():
    cfg = train_cfg(plateau_patience=2, plateau_factor=0.5, early_stop_patience=0)
    state, d = run_policy(cfg, [20.0, 21.0, 20.5, 20.9, 20.8, 20.7])
    assert [x.improved for x in d] == [True, True, False, False, False, False]
    assert [x.lr_reduced for x in d] == [False, False, False, True, False, True]
    assert state.lr == pytest.approx(2.5e-3)
    assert state.best_psnr == 21.0 and state.best_epoch == 2
    assert state.best_metrics == row(2, 21.0)
    assert not any(x.stop for x in d)


def test_cosine_never_cuts_the_lr_and_early_stopping_still_counts():
    cfg = train_cfg(schedule="cosine", plateau_patience=1, early_stop_patience=3)
    state, d = run_policy(cfg, [20.0, 19.0, 19.5, 19.9])
    assert not any(x.lr_reduced for x in d) and state.lr == 1e-2
    assert [x.stop for x in d] == [False, False, False, True]


def test_the_policy_returns_a_new_state():
    state = TrainState(lr=1e-2)
    new, _ = schedule.epoch_end_policy(state, row(1, 20.0), train_cfg())
    assert state.best_psnr == float("-inf") and new.best_psnr == 20.0
    assert math.isfinite(new.best_psnr) and np.isclose(new.lr, 1e-2)


def test_the_time_limit_stops_when_one_more_epoch_would_not_fit():
    cfg = train_cfg(time_limit_minutes=10, early_stop_patience=0, epochs=20)
    state, stops = TrainState(lr=1e-2), []
    # epochs of 150, 170, 160, 165 s: after the third 480 s are used and the longest took 170,
    # 650 > 600 would not fit... after the second 320 + 170 = 490 fits
    for e, secs in enumerate([150.0, 170.0, 160.0], 1):
        state, d = schedule.epoch_end_policy(
            state, {**row(e, 20.0 + e), "epoch_seconds": secs}, cfg
        )
        stops.append((d.stop, d.out_of_time))
    assert stops == [(False, False), (False, False), (True, True)]
    assert state.train_seconds == pytest.approx(480.0)
    assert state.longest_epoch_seconds == pytest.approx(170.0)
    assert state.best_epoch == 3  # the last epoch still counts for best


def test_without_a_time_limit_time_is_only_counted():
    cfg = train_cfg(early_stop_patience=0)
    state = TrainState(lr=1e-2)
    for e in range(1, 4):
        state, d = schedule.epoch_end_policy(state, {**row(e, 20.0), "epoch_seconds": 1e6}, cfg)
        assert not d.stop and not d.out_of_time
    assert state.train_seconds == pytest.approx(3e6)
