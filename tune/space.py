"""Search jobs: a training job plus a `search:` section, parsed and validated before Ray starts.

```yaml
search:
  metric: val_psnr          # val_psnr | val_ssim | val_loss, reported by every epoch
  mode: max
  algorithm: optuna         # optuna (TPE) | hyperopt (TPE) | random; all seeded
  seed: 2077
  num_samples: 10           # trials
  max_concurrent_trials: 0  # 0: as many as the cluster fits (scaling x concurrent <= cluster)
  scheduler:                # ASHA, on the `epoch` each trial reports
    grace_period: 2         # epochs every trial runs before it can be stopped
    reduction_factor: 2     # keep the top 1/reduction_factor at each rung
    max_epochs: 0           # epochs of a full trial; 0: train.epochs
  space:                    # dotted config key -> distribution
    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    loss.alpha: {choice: [0.0, 0.005, 0.02]}
    model.filters: {choice: [32, 64]}
    model.batch_norm: {choice: [false, true]}
```

Distributions: `{loguniform: [low, high]}`, `{uniform: [low, high]}`, `{randint: [low, high]}`
(high excluded) and `{choice: [v1, v2, ...]}`. A choice of `loss.perceptual_layers` takes layer
names or {layer: weight} mappings. A sampled `loss.alpha` decides `loss.kind`: 0 trains with MAE
alone, alpha > 0 with MAE + alpha x VGG19 perceptual (`composite`).

Every problem raises `ConfigError` naming the key path (`search.space.train.lr: ...`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from srtrain.config import (
    ARCH_FLAGS,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    parse_override,
    read_yaml,
    to_dict,
)
from srtrain.options import Rule, at_least, build, option, require_mapping, validate, with_value

SEARCHABLE = (
    "train.lr",
    "train.plateau_factor",
    "train.schedule",
    "train.warmup_steps",
    "train.ema_decay",
    "train.grad_clip_norm",
    "model.bn_momentum",
    "loss.alpha",
    "loss.perceptual_layers",
    *(f"model.{flag}" for flag in ARCH_FLAGS),
    "model.filters",
    "data.batch_size",
    "data.patch_size",
)
KINDS = ("loguniform", "uniform", "randint", "choice")
METRICS = ("val_psnr", "val_ssim", "val_loss")
ALGORITHMS = ("optuna", "hyperopt", "random")

# The search `python -m tune.search` runs with no --config: tune-samples.yaml beside this module
# (package data; jobs/tune-samples.yaml links to it, so the two cannot drift apart).
DEFAULT_JOB_FILE = Path(__file__).with_name("tune-samples.yaml")


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of KINDS
    args: tuple  # (low, high) for ranges, the values for a choice

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


def parse_space(data: Any, path: str) -> dict[str, Distribution]:
    """A `space:` mapping -> {dotted config key: Distribution}; `_check_space` then tries the
    values it can sample against the job."""
    require_mapping(data, path)
    if not data:
        raise ConfigError(f"{path}: empty; map at least one config key to a distribution")
    space = {}
    for key, spec in data.items():
        key_path = f"{path}.{key}"
        if not isinstance(key, str) or not _known_key(key):
            raise ConfigError(
                f"{key_path}: unknown config key (searchable: {', '.join(SEARCHABLE)})"
            )
        if key not in SEARCHABLE:
            raise ConfigError(f"{key_path}: not searchable (searchable: {', '.join(SEARCHABLE)})")
        space[key] = _parse_distribution(spec, key_path)
    return space


def _epochs_of_a_full_trial(scheduler: SchedulerSettings, cfg: Config) -> int:
    return scheduler.max_epochs or cfg.train.epochs


@dataclass(frozen=True)
class SchedulerSettings:
    # Epochs every trial runs before ASHA can stop it.
    grace_period: int = option(
        1,
        Rule(
            lambda v, epochs: 1 <= v <= epochs,
            "an integer in [1, {}] (the epochs of a full trial)",
            given=_epochs_of_a_full_trial,
        ),
    )
    # ASHA keeps the top 1/reduction_factor of the trials at each rung.
    reduction_factor: float = option(2.0, Rule(lambda v: 1 < v < math.inf, "a number > 1"))
    # Epochs of a full trial; 0: train.epochs.
    max_epochs: int = option(0, at_least(0, "0: train.epochs"))


@dataclass(frozen=True)
class SearchSettings:
    # Dotted config key -> distribution (see above); parse_search also makes sure every value a
    # distribution can sample gives a valid trial config.
    space: dict[str, Distribution] = option(parse=parse_space)  # noqa: RUF009 (a required option)
    metric: str = option("val_psnr", Rule(lambda v: v in METRICS, ", ".join(METRICS)))
    mode: str = option("max", Rule(lambda v: v in ("max", "min"), "max or min"))
    algorithm: str = option("optuna", Rule(lambda v: v in ALGORITHMS, ", ".join(ALGORITHMS)))
    seed: int = option(0, at_least(0))
    num_samples: int = option(8, at_least(1))
    max_concurrent_trials: int = option(0, at_least(0, "0: as many as the cluster fits"))
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    # Epochs of a full trial: scheduler.max_epochs or train.epochs (filled in by parse_search).
    max_epochs: int = option(0, derived=True)


# --- loading ------------------------------------------------------------------------------------


def load_search_job(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[Config, SearchSettings]:
    """Reads a search job (None: the embedded default), applies `--set` overrides, validates.

    Returns the base training config (what every trial starts from) and the search settings.
    `--set search.space.train.lr='{loguniform: [1e-4, 1e-2]}'` replaces one distribution.
    """
    data = read_yaml(path or DEFAULT_JOB_FILE)
    data = _apply_overrides(data, list(overrides))
    search = data.pop("search", None)
    if search is None:
        where = path or "the job"
        raise ConfigError(
            f"search: missing; {where} is a training job without a search section "
            "(see jobs/tune-samples.yaml)"
        )
    cfg = from_dict(data)
    return cfg, parse_search(search, cfg)


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Training keys go through srtrain's overrides; search.space.<dotted key> stays one key."""
    plain = []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[:2] == ["search", "space"] and len(keys) > 2:
            search = require_mapping(data.setdefault("search", {}), "search")
            space = require_mapping(search.setdefault("space", {}), "search.space")
            space[".".join(keys[2:])] = value
        else:
            plain.append(text)
    return apply_overrides(data, plain)


def parse_search(data: Any, cfg: Config) -> SearchSettings:
    """Validates a `search:` section against the training config it searches around."""
    settings = build(SearchSettings, require_mapping(data, "search"), "search")
    validate(settings, "search", cfg)
    _check_space(settings.space, cfg)
    epochs = _epochs_of_a_full_trial(settings.scheduler, cfg)
    return dataclasses.replace(settings, max_epochs=epochs)


def _check_space(space: dict[str, Distribution], cfg: Config) -> None:
    """Every value a distribution can sample (its probes) must make a valid training config."""
    base = to_dict(cfg)
    for key, dist in space.items():
        for value in _probe_values(dist):
            _check_value(base, key, value, f"search.space.{key}")
    if "loss.alpha" in space and any(v > 0 for v in _probe_values(space["loss.alpha"])):
        # alpha > 0 trains the composite loss: its layers and weights must be valid too.
        probe = _set(base, "loss.kind", "composite")
        _check_value(
            probe, "loss.alpha", max(_probe_values(space["loss.alpha"])), "search.space.loss.alpha"
        )


def _parse_distribution(spec: Any, path: str) -> Distribution:
    usage = (
        "expected one of {loguniform: [low, high]}, {uniform: [low, high]}, "
        "{randint: [low, high]}, {choice: [v1, v2, ...]}"
    )
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{path}: got {spec!r}, {usage}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: choice needs a non-empty list of values, got {args!r}")
        # YAML 1.1 leaves 1e-3 a string; a number-looking string is the number.
        return Distribution(
            "choice",
            tuple(_number(a) if _number(a) is not None and isinstance(a, str) else a for a in args),
        )
    bounds = [_number(a) for a in args] if isinstance(args, list) and len(args) == 2 else None
    if bounds is None or None in bounds:
        raise ConfigError(f"{path}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = bounds
    if kind == "randint":
        if not all(float(b).is_integer() for b in bounds):
            raise ConfigError(f"{path}: randint needs integer bounds, got {args!r}")
        low, high = int(low), int(high)
    if low >= high:
        raise ConfigError(f"{path}: low {low} >= high {high}; expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{path}: loguniform low {low} <= 0; expected 0 < low < high")
    return Distribution(kind, (low, high))


def _probe_values(dist: Distribution) -> list:
    """Values that stand for everything a distribution can sample, for type and range checks."""
    if dist.kind == "choice":
        return list(dist.args)
    low, high = dist.args
    if dist.kind == "randint":
        return [low, high - 1]
    return [float(low), float(high)]


def _check_value(base: dict, key: str, value: Any, path: str) -> None:
    try:
        from_dict(_set(_with_param(base, key, value), key, decode_value(key, value)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {value!r} is not a valid value ({e})") from None


def _known_key(key: str) -> bool:
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return not dataclasses.is_dataclass(cls)


# --- trials -------------------------------------------------------------------------------------


def encode_choice(value: Any) -> Any:
    """Search algorithms take scalars only: a mapping or list becomes its YAML flow text."""
    if isinstance(value, (Mapping, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return value


def decode_value(key: str, value: Any) -> Any:
    """A sampled value -> the config value (perceptual layers: a name, a list or a mapping)."""
    if key == "loss.perceptual_layers":
        if isinstance(value, str) and value[:1] in "[{":
            value = yaml.safe_load(value)
        if isinstance(value, str):
            return {value: 1.0}
        if isinstance(value, list):
            return {str(name): 1.0 for name in value}
    return value


def trial_config(base: Config, params: Mapping[str, Any], settings: SearchSettings) -> Config:
    """The training config of one trial: the base job with the sampled values applied.

    A sampled loss.alpha also sets loss.kind (0: mae, > 0: composite), and trials train for
    the scheduler's max_epochs.
    """
    data = to_dict(base)
    for key, value in params.items():
        data = _with_param(data, key, value)
        data = _set(data, key, decode_value(key, value))
    data = _set(data, "train.epochs", settings.max_epochs)
    # Mid-epoch checkpoints would report rows without val metrics, which ASHA cannot rank.
    data = _set(data, "train.checkpoint_every_steps", 0)
    return from_dict(data)


def _with_param(data: dict, key: str, value: Any) -> dict:
    if key == "loss.alpha":
        return _set(data, "loss.kind", "composite" if _number(value) else "mae")
    return data


def flat_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's nested trial config -> {dotted key: value}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in flat_params(v).items()})
        else:
            out[k] = v
    return out


def param_space(settings: SearchSettings) -> dict[str, Any]:
    """Ray Tune's nested search space ({"train": {"lr": tune.loguniform(...)}})."""
    import ray.tune

    make = {
        "loguniform": lambda a: ray.tune.loguniform(*a),
        "uniform": lambda a: ray.tune.uniform(*a),
        "randint": lambda a: ray.tune.randint(*a),
        "choice": lambda a: ray.tune.choice([encode_choice(v) for v in a]),
    }
    space: dict[str, Any] = {}
    for key, dist in settings.space.items():
        section, name = key.split(".", 1)
        space.setdefault(section, {})[name] = make[dist.kind](dist.args)
    return space


# --- helpers ------------------------------------------------------------------------------------


def _set(data: dict, key: str, value: Any) -> dict:
    return with_value(data, key.split("."), value)


def _number(v: Any) -> float | None:
    """An int/float, or a string YAML 1.1 left unparsed such as '1e-4'."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v if math.isfinite(v) else None
    if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", v.strip(), re.I):
        return float(v)
    return None
