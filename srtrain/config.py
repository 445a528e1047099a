"""The typed configuration tree of a training job.

A job is a YAML file (see jobs/) whose sections mirror the frozen dataclasses below. Every option
and its default lives here, once. `load_config(path, overrides)` reads a job, applies repeatable
`--set dotted.key=value` overrides (parsed to the field's type) and validates the result; any
problem raises `ConfigError` with the dotted key path, which the entry points print as one line
and exit 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ARCH_FLAGS = ("leaky_relu", "strided_conv", "conv_transpose", "batch_norm", "residual")
VGG19_LAYERS = tuple(
    f"block{b}_conv{c}"
    for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
    for c in range(1, n + 1)
)


class ConfigError(ValueError):
    """A job configuration problem a user can fix; the message names the key path."""


@dataclass(frozen=True)
class DataConfig:
    # "samples" (photos bundled with scikit-image / scikit-learn), or a shard dataset built by
    # `python -m srtrain.data build` (local directory or s3://bucket/prefix). Training reads
    # shards only: build an image folder into shards first (the builder takes folders and
    # archives).
    source: str = "samples"
    train_split: str = "train"
    val_split: str = "val"
    # Held out from every training decision (best checkpoint, plateau, early stopping, trial
    # ranking): evaluated once, on the chosen weights, at the end of a run. A source without this
    # split reports no test metrics.
    test_split: str = "test"
    # HR patch side for training; the LR input is patch_size / scale.
    patch_size: int = 96
    # HR center-crop side for validation; 0 means patch_size.
    val_patch_size: int = 0
    # Images per replica per step; the global batch is batch_size x replicas.
    batch_size: int = 8
    # Cap on validation images (0: all of the split).
    val_images: int = 0
    shuffle_buffer: int = 512
    # Training patches cut from each decoded photo (shard sources). 1: decode only the patch's
    # window, every patch from a fresh decode. k > 1: one decode gives k patches, each with the
    # same distribution, in k different batches; 10-20% more images per CPU-second at k = 2
    # (bench/README.md). For input-bound training, at the price of correlated sibling patches.
    patches_per_image: int = 1
    # Keep each training shard on local disk after its first read (shard sources only): epochs
    # after the first read no object storage. SRTRAIN_CACHE_DIR sets where (default: the temp dir).
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
    decoded_cache: bool | float = False
    # S3-compatible endpoint; empty: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str = ""
    region: str = ""


@dataclass(frozen=True)
class DegradationConfig:
    scale: int = 2
    blur_kernel: int = 5
    blur_sigma: float = 1.0
    # Standard deviation of additive Gaussian noise on the 0-255 scale.
    noise_sigma: float = 10.0
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
    filters: int = 64
    # Each flag defaults to the arch: all off for base, all on for advanced.
    leaky_relu: bool | None = None
    strided_conv: bool | None = None
    conv_transpose: bool | None = None
    batch_norm: bool | None = None
    residual: bool | None = None
    # Keras BatchNormalization momentum of the moving statistics validation uses (batch_norm
    # only). 0.99, Keras' default, is the original recipe's; at a few thousand steps its moving
    # statistics lag the weights and validation PSNR swings between epochs: 0.9 follows them.
    bn_momentum: float = 0.99
    # BatchNorm statistics over all replicas (one batch of N x data.batch_size, and moving
    # statistics identical on every replica). Unset or true: on whenever training runs on
    # several replicas; false: each replica normalises by its own batch.
    sync_batch_norm: bool | None = None


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["mae", "composite"] = "mae"
    # Weight of the perceptual term in MAE + alpha x perceptual.
    alpha: float = 0.0
    # VGG19 layer name -> weight inside the perceptual term.
    perceptual_layers: dict[str, float] = field(default_factory=lambda: {"block5_conv4": 1.0})
    # "imagenet" (Keras download and cache), a local .weights.h5/.h5 file, or an s3:// object.
    vgg_weights: str = "imagenet"


@dataclass(frozen=True)
class TrainConfig:
    # The defaults are the embedded samples job, sized to finish in under 10 minutes on 2 CPU
    # cores; jobs/iaprtc12-*.yaml carry the original project's 50-epoch recipe.
    epochs: int = 10
    steps_per_epoch: int = 200
    # Validation batches per epoch (0: the whole validation split).
    val_steps: int = 0
    lr: float = 5e-4
    # "linear" multiplies lr by global_batch / batch_size (the replica count).
    lr_scaling: Literal["none", "linear"] = "none"
    # "plateau": the original's ReduceLROnPlateau (lr x plateau_factor after plateau_patience
    # epochs without a better val PSNR). "cosine": linear warmup over warmup_steps, then a
    # cosine decay to min_lr at the last planned step (epochs x steps_per_epoch), computed from
    # the optimizer's step on the device every step; val PSNR then decides nothing about lr.
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = 0
    plateau_factor: float = 0.2
    plateau_patience: int = 3
    min_lr: float = 1e-6
    # Exponential moving average of the weights (BatchNorm statistics included), decay per step;
    # 0: off. When on, the averaged weights are the ones validated, chosen as best, tested and
    # exported (model.keras); the raw weights stay in the checkpoint for resuming. The decay
    # ramps up as min(ema_decay, (1 + step) / (10 + step)) so early epochs validate sensibly.
    ema_decay: float = 0.0
    # Clip the global gradient (summed over replicas, before the optimizer) to this L2 norm;
    # 0: off. Every replica scales its gradient by the same factor.
    grad_clip_norm: float = 0.0
    # Epochs without a better val PSNR before stopping (0: never stop early).
    early_stop_patience: int = 7
    # Wall-time budget for training, validation included (0: none). At an epoch end the run
    # stops if one more epoch, as long as the longest so far, would pass it; the time counts
    # from the first step (a resumed run adds the time its checkpoint recorded). The best-on-val
    # weights are then tested and exported as after early stopping. With the cosine schedule lr
    # has not decayed to min_lr when the budget ends it; train.ema_decay smooths that.
    time_limit_minutes: float = 0.0
    seed: int = 2077
    # "auto": bf16 where the hardware has fast bf16 (AMX CPUs, Ampere+ GPUs), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    jit: bool = False
    # Also checkpoint every N steps inside an epoch (0: only at epoch ends).
    checkpoint_every_steps: int = 0
    # Checkpoints kept: --local keeps the best and this many latest ones; Ray mode keeps this
    # many + 1 with the highest val PSNR, and the latest (Ray's CheckpointConfig.num_to_keep).
    keep_checkpoints: int = 2
    # Validation images written to samples.png.
    sample_images: int = 3


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1


@dataclass(frozen=True)
class RunConfig:
    # Run directory name under storage; empty: "<job name>-<UTC timestamp>".
    name: str = ""
    # Local directory or s3://bucket/prefix holding run directories (--output sets it).
    storage: str = "runs"
    # Worker failures Ray recovers from by restarting from the latest checkpoint.
    max_failures: int = 0


@dataclass(frozen=True)
class DebugConfig:
    # Tests only: the rank-1 worker (rank 0 with one worker) kills itself at this global step,
    # once per run.
    fail_at_step: int = 0
    # Split the CPU into this many logical devices (>= 2: MirroredStrategy over them), to test
    # multi-GPU code paths on a machine without GPUs. 0: off.
    cpu_replicas: int = 0


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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks `value` (from YAML) against the annotation `tp`; returns it in the field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}, expected one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
        return {_coerce(k, ktp, path): _coerce(v, vtp, f"{path}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = path or "the job file"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{key_path}: unknown key (allowed: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Builds and validates a Config from nested plain data (parsed YAML)."""
    return _resolve(_build(Config, data, ""))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- overrides ----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. train.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-3" as a string; the field's type decides, so try a number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", value, re.I) else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Sets each dotted key in nested plain data (a copy); the Config build validates it."""
    data = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


# --- loading ------------------------------------------------------------------------------------


class _JobLoader(yaml.SafeLoader):
    """YAML 1.1 reads a plain `on`, `off`, `yes` or `no` as a boolean, keys included; a job's keys
    are names (`degradation.on`), so a key is kept as the text written. Values are unchanged."""


def _mapping_with_named_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    return {
        (k.value if k.tag == "tag:yaml.org,2002:bool" else loader.construct_object(k, deep=True)): (
            loader.construct_object(v, deep=True)
        )
        for k, v in node.value
    }


_JobLoader.add_constructor("tag:yaml.org,2002:map", _mapping_with_named_keys)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read job file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_JobLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a job YAML (None: all defaults), applies --set overrides, validates."""
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, list(overrides)))


# --- validation ---------------------------------------------------------------------------------

_ARCH_DEFAULTS = {"base": False, "advanced": True}


def _resolve(cfg: Config) -> Config:
    """Fills arch-dependent defaults and checks every value; returns the resolved config."""
    flags = {
        k: _ARCH_DEFAULTS[cfg.model.arch]
        if getattr(cfg.model, k) is None
        else getattr(cfg.model, k)
        for k in ARCH_FLAGS
    }
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **flags))
    _validate(cfg)
    return cfg


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: got {value!r}, allowed: {allowed}")


def _validate(cfg: Config) -> None:
    d, g, m, lo, t, s, r = (
        cfg.data,
        cfg.degradation,
        cfg.model,
        cfg.loss,
        cfg.train,
        cfg.scaling,
        cfg.run,
    )
    _check(g.scale in (2, 3, 4), "degradation.scale", g.scale, "2, 3 or 4")
    mult = 4 * g.scale
    _check(
        d.patch_size >= mult and d.patch_size % mult == 0,
        "data.patch_size",
        d.patch_size,
        f"a positive multiple of {mult} (4 x degradation.scale)",
    )
    _check(
        d.val_patch_size == 0 or (d.val_patch_size >= mult and d.val_patch_size % mult == 0),
        "data.val_patch_size",
        d.val_patch_size,
        f"0 or a positive multiple of {mult}",
    )
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.val_images >= 0, "data.val_images", d.val_images, "an integer >= 0")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 1")
    _check(
        d.patches_per_image >= 1, "data.patches_per_image", d.patches_per_image, "an integer >= 1"
    )
    _check(bool(d.test_split.strip()), "data.test_split", d.test_split, "a split name, e.g. test")
    _check(
        isinstance(d.decoded_cache, bool) or d.decoded_cache > 0,
        "data.decoded_cache",
        d.decoded_cache,
        "false, true or a size in GB > 0",
    )
    _check(
        bool(d.source.strip()),
        "data.source",
        d.source,
        "'samples' or a shard dataset (local path or s3://bucket/prefix)",
    )
    _check(
        g.blur_kernel >= 1 and g.blur_kernel % 2 == 1,
        "degradation.blur_kernel",
        g.blur_kernel,
        "an odd integer >= 1",
    )
    _check(g.blur_sigma >= 0, "degradation.blur_sigma", g.blur_sigma, "a number >= 0")
    _check(
        g.noise_sigma >= 0, "degradation.noise_sigma", g.noise_sigma, "a number >= 0 (0-255 scale)"
    )
    _check(m.filters >= 4, "model.filters", m.filters, "an integer >= 4")
    _check(0 < m.bn_momentum < 1, "model.bn_momentum", m.bn_momentum, "a number in (0, 1)")
    _check(lo.alpha >= 0, "loss.alpha", lo.alpha, "a number >= 0")
    if lo.kind == "composite":
        _check(
            bool(lo.perceptual_layers),
            "loss.perceptual_layers",
            lo.perceptual_layers,
            "at least one VGG19 layer",
        )
        _check(
            bool(lo.vgg_weights.strip()),
            "loss.vgg_weights",
            lo.vgg_weights,
            "'imagenet', a local weights file or an s3:// object",
        )
    for name, w in lo.perceptual_layers.items():
        _check(
            name in VGG19_LAYERS,
            f"loss.perceptual_layers.{name}",
            name,
            "a VGG19 conv layer name, e.g. block2_conv2 or block5_conv4",
        )
        _check(w > 0, f"loss.perceptual_layers.{name}", w, "a weight > 0")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.steps_per_epoch >= 1, "train.steps_per_epoch", t.steps_per_epoch, "an integer >= 1")
    _check(t.val_steps >= 0, "train.val_steps", t.val_steps, "an integer >= 0")
    _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(0 < t.plateau_factor < 1, "train.plateau_factor", t.plateau_factor, "a number in (0, 1)")
    _check(t.plateau_patience >= 1, "train.plateau_patience", t.plateau_patience, "an integer >= 1")
    _check(0 < t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"a number in (0, train.lr={t.lr}]")
    total = t.epochs * t.steps_per_epoch
    _check(
        0 <= t.warmup_steps < total,
        "train.warmup_steps",
        t.warmup_steps,
        f"an integer in [0, {total}) (train.epochs x train.steps_per_epoch)",
    )
    _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "a number in [0, 1) (0: off)")
    _check(
        t.time_limit_minutes >= 0,
        "train.time_limit_minutes",
        t.time_limit_minutes,
        "a number >= 0 (0: no limit)",
    )
    _check(
        t.grad_clip_norm >= 0, "train.grad_clip_norm", t.grad_clip_norm, "a number >= 0 (0: off)"
    )
    _check(
        t.early_stop_patience >= 0,
        "train.early_stop_patience",
        t.early_stop_patience,
        "an integer >= 0 (0 disables early stopping)",
    )
    _check(
        t.checkpoint_every_steps >= 0,
        "train.checkpoint_every_steps",
        t.checkpoint_every_steps,
        "an integer >= 0",
    )
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    _check(t.sample_images >= 0, "train.sample_images", t.sample_images, "an integer >= 0")
    _check(s.num_workers >= 1, "scaling.num_workers", s.num_workers, "an integer >= 1")
    _check(s.gpus_per_worker >= 0, "scaling.gpus_per_worker", s.gpus_per_worker, "an integer >= 0")
    _check(s.cpus_per_worker >= 1, "scaling.cpus_per_worker", s.cpus_per_worker, "an integer >= 1")
    _check(
        r.name == "" or re.fullmatch(r"[\w.-]+", r.name) is not None,
        "run.name",
        r.name,
        "letters, digits, '_', '-' and '.'",
    )
    _check(
        bool(r.storage.strip()), "run.storage", r.storage, "a local directory or s3://bucket/prefix"
    )
    _check(
        r.max_failures >= -1, "run.max_failures", r.max_failures, "an integer >= -1 (-1: forever)"
    )
    _check(
        cfg.debug.fail_at_step >= 0, "debug.fail_at_step", cfg.debug.fail_at_step, "an integer >= 0"
    )
    _check(
        cfg.debug.cpu_replicas >= 0, "debug.cpu_replicas", cfg.debug.cpu_replicas, "an integer >= 0"
    )


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of a resolved config with --set style overrides applied and validated again."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))
