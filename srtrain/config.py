"""The typed configuration tree of a training job.

A job is a YAML file (see jobs/) whose sections mirror the frozen dataclasses below. Every option,
its default and the rules on its value live here, once (srtrain/options.py declares and applies
them). `load_config(path, overrides)` reads a job, applies repeatable `--set dotted.key=value`
overrides (parsed to the field's type) and validates the result; any problem raises `ConfigError`
with the dotted key path, which the entry points print as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from srtrain.options import (
    ConfigError,
    Rule,
    apply_overrides,
    at_least,
    build,
    option,
    parse_override,
    read_yaml,
    validate,
)

# Callers import the job-file helpers and ConfigError from here too.
__all__ = [
    "ARCH_FLAGS",
    "VGG19_LAYERS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "DegradationConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "replace",
    "to_dict",
    "to_yaml",
]

ARCH_FLAGS = ("leaky_relu", "strided_conv", "conv_transpose", "batch_norm", "residual")
VGG19_LAYERS = tuple(
    f"block{b}_conv{c}"
    for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
    for c in range(1, n + 1)
)

_FRACTION = Rule(lambda v: 0 < v < 1, "a number in (0, 1)")


def _filled(text: str) -> bool:
    return text.strip() != ""


def _four_scales(data: DataConfig, cfg: Config) -> int:
    """The U-Net takes LR sides that are multiples of 4 (srtrain/models.py): HR sides are
    multiples of 4 x scale."""
    return 4 * cfg.degradation.scale


def _kind(loss: LossConfig, cfg: Config) -> str:
    return loss.kind


@dataclass(frozen=True)
class DataConfig:
    # "samples" (photos bundled with scikit-image / scikit-learn), or a shard dataset built by
    # `python -m srtrain.data build` (local directory or s3://bucket/prefix). Training reads
    # shards only: build an image folder into shards first (the builder takes folders and
    # archives).
    source: str = option(
        "samples", Rule(_filled, "'samples' or a shard dataset (local path or s3://bucket/prefix)")
    )
    train_split: str = "train"
    val_split: str = "val"
    # Held out from every training decision (best checkpoint, plateau, early stopping, trial
    # ranking): evaluated once, on the chosen weights, at the end of a run. A source without this
    # split reports no test metrics.
    test_split: str = option("test", Rule(_filled, "a split name, e.g. test"))
    # HR patch side for training; the LR input is patch_size / scale.
    patch_size: int = option(
        96,
        Rule(
            lambda v, m: v >= m and v % m == 0,
            "a positive multiple of {} (4 x degradation.scale)",
            given=_four_scales,
        ),
    )
    # HR center-crop side for validation; 0 means patch_size.
    val_patch_size: int = option(
        0,
        Rule(
            lambda v, m: v == 0 or (v >= m and v % m == 0),
            "0 or a positive multiple of {}",
            given=_four_scales,
        ),
    )
    # Images per replica per step; the global batch is batch_size x replicas.
    batch_size: int = option(8, at_least(1))
    # Cap on validation images (0: all of the split).
    val_images: int = option(0, at_least(0))
    shuffle_buffer: int = option(512, at_least(1))
    # Training patches cut from each decoded photo (shard sources). 1: decode only the patch's
    # window, every patch from a fresh decode. k > 1: one decode gives k patches, each with the
    # same distribution, in k different batches; 10-20% more images per CPU-second at k = 2
    # (bench/README.md). For input-bound training, at the price of correlated sibling patches.
    patches_per_image: int = option(1, at_least(1))
    # Keep each training shard on local disk after its first read (shard sources only): epochs
    # after the first read no object storage. SRTRAIN_CACHE sets where (README: Local cache).
    cache: bool = False
    # Decode each worker's share of the training images once into memory (uint8) and cut every
    # patch from there: a uniformly random image, window and flip/rotation per patch, a copy's
    # worth of CPU (shard sources; ignored for samples, which are always kept decoded). Needs
    # height x width x 3 bytes per image (IAPR TC-12: 10.4 GB in all, 1.3 GB per worker at 8
    # workers), checked before filling against the worker's free memory (cgroup limit or
    # MemAvailable, less 10% and 0.5 GB). false: off. true: on when it fits, else window
    # decoding with a warning. A number: on, with at most that many GB; a run whose share does
    # not fit fails at the start with one line giving both figures. data.patches_per_image does
    # not apply with the cache.
    decoded_cache: bool | float = option(
        False, Rule(lambda v: isinstance(v, bool) or v > 0, "false, true or a size in GB > 0")
    )
    # Give every training patch a uniformly random order of its R, G and B channels (one of the
    # 6), drawn from the batch's seed with its noise, on either side of `degradation.on`. The
    # degradation treats channels alike, so the mapping to learn is unchanged; what goes is the
    # colour bias of a small training set (the bundled photos: gray textures, red retina and
    # stained-tissue images), which otherwise gives a short training run a colour cast of up to
    # 0.07 on natural photos (bench/README.md). On a varied set it costs: 0.15 dB on Set14 at
    # equal steps on BSD200 + T91 (bench/README.md, the ablation), so a tool for small sets.
    # Unset: on for `source: samples` (the embedded default's 2,000 steps: Set14 +1.33 dB over
    # bicubic with it, +0.50 without; bench/README.md), off for shard sources.
    channel_shuffle: bool | None = None
    # S3-compatible endpoint; empty: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str = ""
    region: str = ""


@dataclass(frozen=True)
class DegradationConfig:
    scale: int = option(2, Rule(lambda v: v in (2, 3, 4), "2, 3 or 4"))
    blur_kernel: int = option(5, Rule(lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"))
    blur_sigma: float = option(1.0, at_least(0.0))
    # Standard deviation of additive Gaussian noise on the 0-255 scale.
    noise_sigma: float = option(10.0, at_least(0.0, "0-255 scale"))
    # Seed of the validation/test degradation: the same image always gives the same LR.
    eval_seed: int = 1234
    # Where training pairs are degraded. "input": in tf.data, on the CPU. "replica": tf.data
    # delivers uint8 HR patches and per-sample seeds and each replica degrades its batch inside
    # its compiled train step, on its device (same function, same seeds, same LR): the GPU
    # default (jobs/iaprtc12-*.yaml), since a CPU core feeds a GPU far fewer pairs than it
    # trains on (bench/README.md). Validation and test LR are made in tf.data either way. Under
    # train.jit the noise comes from XLA's own random stream (same distribution, other values).
    # CPU-only runs keep "input": there it makes no measurable difference (srtrain.run --local,
    # Base U-Net at 16 filters, HR 96, batch 8, fp32, 3 runs each way alternated, AMD EPYC at
    # load 7-20 on 2 cores: median 41 img/s input vs 42 replica, 20.0 vs 19.6 CPU-s per run),
    # and in tf.data the degradation overlaps the step instead of lengthening it.
    on: Literal["input", "replica"] = "input"


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["base", "advanced"] = "base"
    filters: int = option(64, at_least(4))
    # Each flag defaults to the arch: all off for base, all on for advanced.
    leaky_relu: bool | None = None
    strided_conv: bool | None = None
    conv_transpose: bool | None = None
    batch_norm: bool | None = None
    residual: bool | None = None
    # Keras BatchNormalization momentum of the moving statistics validation uses (batch_norm
    # only). 0.99, Keras' default, is the original recipe's; its moving statistics lag weights
    # that move fast: the original's validation PSNR swung between epochs, and with the quality
    # recipe it stayed below bicubic for the first 3 of 6 epochs before catching up (1,200
    # steps, bench/README.md). 0.9 follows them (jobs/quality-advanced.yaml).
    bn_momentum: float = option(0.99, _FRACTION)
    # BatchNorm statistics over all replicas (one batch of N x data.batch_size, and moving
    # statistics identical on every replica). Unset or true: on whenever training runs on
    # several replicas; false: each replica normalises by its own batch.
    sync_batch_norm: bool | None = None


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["mae", "composite"] = "mae"
    # Weight of the perceptual term in MAE + alpha x perceptual.
    alpha: float = option(0.0, at_least(0.0))
    # VGG19 layer name -> weight inside the perceptual term.
    perceptual_layers: dict[str, float] = option(  # noqa: RUF009 (option() copies the dict)
        {"block5_conv4": 1.0},
        Rule(
            lambda v, kind: kind != "composite" or bool(v), "at least one VGG19 layer", given=_kind
        ),
        each_key=Rule(
            lambda name: name in VGG19_LAYERS,
            "a VGG19 conv layer name, e.g. block2_conv2 or block5_conv4",
        ),
        each_value=Rule(lambda w: w > 0, "a weight > 0"),
    )
    # The last fraction of the planned steps trains on MSE instead of MAE: PSNR scores MSE.
    # The cosine's tail, moved with it when the time limit re-plans the run; each example's
    # MSE is divided by twice its (constant) MAE, so the gradients keep MAE's size and Adam's
    # steps go on as before (`mae` only). 0: MAE throughout, as the original.
    mse_final_fraction: float = option(
        0.0,
        Rule(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        Rule(lambda v, kind: v == 0 or kind == "mae", "0 unless loss.kind is mae", given=_kind),
    )
    # "imagenet" (Keras download and cache), a local .weights.h5/.h5 file, or an s3:// object.
    vgg_weights: str = option(
        "imagenet",
        Rule(
            lambda v, kind: kind != "composite" or _filled(v),
            "'imagenet', a local weights file or an s3:// object",
            given=_kind,
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    # The defaults are the embedded samples job, sized to finish in under 10 minutes on 2 CPU
    # cores; jobs/iaprtc12-*.yaml carry the original project's 50-epoch recipe.
    epochs: int = option(10, at_least(1))
    steps_per_epoch: int = option(200, at_least(1))
    # Validation batches per epoch (0: the whole validation split).
    val_steps: int = option(0, at_least(0))
    lr: float = option(5e-4, Rule(lambda v: v > 0, "a number > 0"))
    # "linear" multiplies lr by global_batch / batch_size (the replica count).
    lr_scaling: Literal["none", "linear"] = "none"
    # "plateau": the original's ReduceLROnPlateau (lr x plateau_factor after plateau_patience
    # epochs without a better val PSNR). "cosine": linear warmup over warmup_steps, then a
    # cosine decay to min_lr at the last planned step (epochs x steps_per_epoch, or the last
    # epoch time_limit_minutes lets the run finish), computed from the optimizer's step on the
    # device every step; val PSNR then decides nothing about lr.
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = option(
        0,
        Rule(
            lambda v, total: 0 <= v < total,
            "an integer in [0, {}) (train.epochs x train.steps_per_epoch)",
            given=lambda t, _: t.epochs * t.steps_per_epoch,
        ),
    )
    plateau_factor: float = option(0.2, _FRACTION)
    plateau_patience: int = option(3, at_least(1))
    min_lr: float = option(
        1e-6,
        Rule(lambda v, lr: 0 < v <= lr, "a number in (0, train.lr={}]", given=lambda t, _: t.lr),
    )
    # Exponential moving average of the weights (BatchNorm statistics included), decay per step;
    # 0: off. When on, the averaged weights are the ones validated, chosen as best, tested and
    # exported (model.keras); the raw weights stay in the checkpoint for resuming. The decay
    # ramps up as min(ema_decay, (1 + step) / (10 + step)) so early epochs validate sensibly.
    ema_decay: float = option(0.0, Rule(lambda v: 0 <= v < 1, "a number in [0, 1) (0: off)"))
    # Clip the global gradient (summed over replicas, before the optimizer) to this L2 norm;
    # 0: off. Every replica scales its gradient by the same factor.
    grad_clip_norm: float = option(0.0, at_least(0.0, "0: off"))
    # Epochs without a better val PSNR before stopping (0: never stop early).
    early_stop_patience: int = option(7, at_least(0, "0 disables early stopping"))
    # Wall-time budget for training, validation included (0: none). At an epoch end the run
    # stops if one more epoch, as long as the longest so far (not counting the first epoch of a
    # process, which also compiles, once a later one is timed), would pass it; the time counts
    # from the first step (a resumed run adds the time its checkpoint recorded). The best-on-val
    # weights are then tested and exported as after early stopping. The cosine schedule is
    # re-planned at every epoch end to end with the last epoch that fits (by the same rule), so
    # a run the limit cuts short still decays to min_lr.
    time_limit_minutes: float = option(0.0, at_least(0.0, "0: no limit"))
    seed: int = 2077
    # "auto": bf16 where the hardware has fast bf16 (AMX CPUs, Ampere+ GPUs), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # XLA-compile the train step: for GPUs. On CPU it is slower (0.25x images/s with bf16 on
    # AMX, 0.55x fp32; bench/README.md).
    jit: bool = False
    # Also checkpoint every N steps inside an epoch (0: only at epoch ends).
    checkpoint_every_steps: int = option(0, at_least(0))
    # Checkpoints kept: --local keeps the best and this many latest ones; Ray mode keeps this
    # many + 1 with the highest val PSNR, and the latest (Ray's CheckpointConfig.num_to_keep).
    keep_checkpoints: int = option(2, at_least(1))
    # Validation images written to samples.png.
    sample_images: int = option(3, at_least(0))


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = option(1, at_least(1))
    gpus_per_worker: int = option(0, at_least(0))
    cpus_per_worker: int = option(1, at_least(1))


@dataclass(frozen=True)
class RunConfig:
    # Run directory name under storage; empty: "<job name>-<UTC timestamp>".
    name: str = option(
        "",
        Rule(
            lambda v: v == "" or re.fullmatch(r"[\w.-]+", v) is not None,
            "letters, digits, '_', '-' and '.'",
        ),
    )
    # Local directory or s3://bucket/prefix holding run directories (--output sets it).
    storage: str = option("runs", Rule(_filled, "a local directory or s3://bucket/prefix"))
    # Worker failures Ray recovers from by restarting from the latest checkpoint.
    max_failures: int = option(0, at_least(-1, "-1: forever"))
    # srtrain.run trains in its own process, without Ray (what --local does, which sets it): for
    # one small machine, where Ray's own processes would take about an eighth of 2 cores
    # (bench/README.md). A search's trials always run on Ray.
    local: bool = option(False)


@dataclass(frozen=True)
class DebugConfig:
    # Tests only: the rank-1 worker (rank 0 with one worker) kills itself at this global step,
    # once per run.
    fail_at_step: int = option(0, at_least(0))
    # Split the CPU into this many logical devices (>= 2: MirroredStrategy over them), to test
    # multi-GPU code paths on a machine without GPUs. 0: off.
    cpu_replicas: int = option(0, at_least(0))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# --- building from plain data -------------------------------------------------------------------

_ARCH_DEFAULTS = {"base": False, "advanced": True}


def from_dict(data: Mapping[str, Any]) -> Config:
    """Builds and validates a Config from nested plain data (parsed YAML); each model flag left
    unset takes its arch's default, data.channel_shuffle left unset its source's."""
    cfg = build(Config, data, "")
    flags = {
        k: _ARCH_DEFAULTS[cfg.model.arch]
        if getattr(cfg.model, k) is None
        else getattr(cfg.model, k)
        for k in ARCH_FLAGS
    }
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **flags))
    if cfg.data.channel_shuffle is None:
        shuffle = cfg.data.source == "samples"
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channel_shuffle=shuffle))
    validate(cfg, "", cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a job YAML (None: all defaults), applies --set overrides, validates."""
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, list(overrides)))


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of a resolved config with --set style overrides applied and validated again."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))
