"""The typed config: YAML + --set overrides parsed to field types, errors naming the key path."""

from pathlib import Path

import pytest

from srtrain.config import ConfigError, apply_overrides, from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_samples_job_and_resolve_arch_flags():
    cfg = load_config()
    assert cfg.data.source == "samples"
    assert cfg.model.arch == "base"
    assert not any(
        [
            cfg.model.leaky_relu,
            cfg.model.strided_conv,
            cfg.model.conv_transpose,
            cfg.model.batch_norm,
            cfg.model.residual,
        ]
    )
    adv = from_dict({"model": {"arch": "advanced", "residual": False}})
    assert adv.model.leaky_relu and adv.model.batch_norm and adv.model.residual is False


def test_embedded_default_is_the_samples_jobs():
    # `python -m srtrain.run` and `--config jobs/samples-base.yaml` must run the same job, and
    # the advanced sample must differ from it only in the architecture.
    assert load_config(None) == load_config(REPO / "jobs" / "samples-base.yaml")
    assert load_config(None, ["model.arch=advanced"]) == load_config(
        REPO / "jobs" / "samples-advanced.yaml"
    )


def test_overrides_are_parsed_to_the_field_type():
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "train.epochs=3",
            "model.batch_norm=true",
            "degradation.noise_sigma=5",
            "loss.perceptual_layers={block2_conv2: 2}",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.model.batch_norm is True
    assert cfg.degradation.noise_sigma == 5.0 and isinstance(cfg.degradation.noise_sigma, float)
    assert cfg.loss.perceptual_layers == {"block2_conv2": 2.0}


def test_quality_options_default_to_the_original_recipe():
    cfg = from_dict({})
    t = cfg.train
    assert (t.schedule, t.warmup_steps, t.ema_decay, t.grad_clip_norm) == ("plateau", 0, 0.0, 0.0)
    assert cfg.model.bn_momentum == 0.99 and cfg.data.test_split == "test"


def test_channel_shuffle_left_unset_is_on_for_the_samples_and_off_for_shards():
    assert load_config().data.channel_shuffle is True
    assert from_dict({"data": {"source": "shards/x"}}).data.channel_shuffle is False
    assert load_config(REPO / "jobs" / "iaprtc12-base.yaml").data.channel_shuffle is False
    assert load_config(REPO / "jobs" / "quality-base.yaml").data.channel_shuffle is False
    assert load_config(None, ["data.channel_shuffle=false"]).data.channel_shuffle is False
    on = from_dict({"data": {"source": "s3://b/p", "channel_shuffle": True}})
    assert on.data.channel_shuffle is True


def test_job_files_load(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("# comment\ntrain:\n  epochs: 2\nmodel:\n  arch: advanced\n")
    cfg = load_config(job, ["train.epochs=4"])
    assert cfg.train.epochs == 4 and cfg.model.conv_transpose is True


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"trian": {"epochs": 1}}, "trian"),
        ({"train": {"epoch": 1}}, "train.epoch"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 1.5}}, "train.epochs"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": -1e-3}}, "train.lr"),
        ({"loss": {"alpha": -0.1}}, "loss.alpha"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
        ({"data": {"patch_size": 100}}, "data.patch_size"),  # not a multiple of 4 x 2
        ({"data": {"patches_per_image": 0}}, "data.patches_per_image"),
        ({"degradation": {"scale": 3}, "data": {"patch_size": 32}}, "data.patch_size"),
        ({"degradation": {"blur_kernel": 4}}, "degradation.blur_kernel"),
        ({"model": {"arch": "resnet"}}, "model.arch"),
        ({"model": {"batch_norm": "yes"}}, "model.batch_norm"),
        ({"loss": {"perceptual_layers": {"block9_conv1": 1.0}}}, "loss.perceptual_layers.block9"),
        ({"run": {"name": "a/b"}}, "run.name"),
        ({"train": "fast"}, "train"),
        ({"train": {"schedule": "step"}}, "train.schedule"),
        ({"train": {"warmup_steps": 2000}}, "train.warmup_steps"),  # >= the planned 2000 steps
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
        ({"train": {"grad_clip_norm": -1.0}}, "train.grad_clip_norm"),
        ({"model": {"bn_momentum": 1.0}}, "model.bn_momentum"),
        ({"data": {"test_split": ""}}, "data.test_split"),
        # A rule that reads another option runs once that option passed its own rules.
        ({"degradation": {"scale": 5}}, "degradation.scale"),
        ({"degradation": {"scale": 0}}, "degradation.scale"),
        ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "train.min_lr"),
        ({"loss": {"kind": "composite", "perceptual_layers": {}}}, "loss.perceptual_layers"),
        ({"loss": {"kind": "composite", "vgg_weights": " "}}, "loss.vgg_weights"),
        ({"loss": {"mse_final_fraction": 1.0}}, "loss.mse_final_fraction"),
        ({"loss": {"kind": "composite", "mse_final_fraction": 0.2}}, "loss.mse_final_fraction"),
    ],
)
def test_bad_values_name_the_key_path(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value).startswith(key), str(e.value)
    assert "\n" not in str(e.value)


def test_an_error_says_what_was_given_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"epochs": 2, "steps_per_epoch": 5, "warmup_steps": 10}})
    assert str(e.value) == (
        "train.warmup_steps: got 10, allowed: an integer in [0, 10) "
        "(train.epochs x train.steps_per_epoch)"
    )
    with pytest.raises(ConfigError) as e:
        from_dict({"loss": {"perceptual_layers": {"block2_conv2": 0}}})
    assert str(e.value) == "loss.perceptual_layers.block2_conv2: got 0.0, allowed: a weight > 0"


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_override("a.b=c") == (["a", "b"], "c")
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        parse_override("novalue")
    assert apply_overrides({"a": {"x": 1}}, ["a.y=2"]) == {"a": {"x": 1, "y": 2}}


@pytest.mark.parametrize("arch", ["base", "advanced"])
def test_quality_jobs_state_their_whole_recipe_on_the_first_line(arch):
    job = REPO / "jobs" / f"quality-{arch}.yaml"
    first = job.read_text().splitlines()[0]
    assert first.startswith(
        '# python -m srtrain.data build "../shared/datasets/[bt]*/*.png" DIR --split '
    )
    assert first.endswith(
        f" && python -m srtrain.run --config jobs/quality-{arch}.yaml --set data.source=DIR"
    )
    assert "test=" in first  # the build makes a test split
    cfg = load_config(job, ["data.source=DIR"])
    assert (cfg.model.arch, cfg.model.filters, cfg.loss.kind) == (arch, 64, "mae")
    assert cfg.train.schedule == "cosine" and cfg.train.ema_decay > 0
