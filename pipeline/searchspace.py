"""``tune.space``: which params a search may vary, and the distributions it draws them from.

A key is a params key as ``--set`` takes it (``train.lr``, or a key of a mapping param:
``train.loss_weights.pam``) of the sections a trial runs (model, data, train), except those a
search holds fixed (``FIXED_IN_SEARCH``, with the reason its error names). A value is one of
``loguniform: [low, high]``, ``uniform: [low, high]``, ``randint: [low, high]`` (both ends
included), ``choice: [...]`` or ``grid: [...]`` (every point, for the random searcher). Whether a
value suits its param (type, bounds, a crop the loader can cut) is checked against the real
params when the search starts (pipeline/training/search.py ``check_space``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError
from pipeline.schema import require

# params that were replaced: an old params file gets the new form in its one line
_SPACE_HINT = (
    "use tune.space, e.g. {train.lr: {loguniform: [0.005, 0.02]}, data.crop_size: "
    "{choice: [80, 96]}}"
)
RENAMED = dict.fromkeys(("tune.lr_min", "tune.lr_max", "tune.crop_sizes"), _SPACE_HINT) | {
    "train.bf16": "use train.precision: bf16 (true), fp32 (false) or fp16 (with loss scaling)"
}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHED = ("model", "data", "train")  # the sections a trial's values may change
# keys a search holds fixed, and why (a trial may vary the recipe, not what it is compared on)
_FIXED = {
    "the trials start from one set of weights": (
        "model.backbone model.pretrained model.pretrained_path model.init_from model.num_classes"
    ),
    "the trials are compared on one dataset": (
        "data.shards data.train_split data.val_split data.normalization"
    ),
    "tune.epochs and tune.eval_every_epochs set a trial's schedule": (
        "train.epochs train.eval_every_epochs"
    ),
    "where and how a trial runs, not its recipe": (
        "train.num_workers train.cpus_per_worker train.use_gpu train.gpus_per_worker "
        "train.placement_strategy "
        "train.max_failures train.checkpoints_to_keep train.checkpoint_every train.run_name "
        "train.storage_path train.out train.ray_address train.log_every data.loader_workers "
        "data.gpu_decode"
    ),
}
FIXED_IN_SEARCH = {key: why for why, keys in _FIXED.items() for key in keys.split()}
MAX_POINTS = 1_000  # values of one choice or grid: each is checked before the search starts
MAX_TRIALS = 10_000  # tune.num_samples x every grid's points
INT64 = 2**63 - 1  # randint's ends: numpy draws int64, and high + 1 must be one too


def check_space(space: Mapping[str, Any], search_alg: str, fields: Mapping[str, list[str]]) -> None:
    """``tune.space``: at least one entry, each a known, searchable key (``fields``: each
    section's param names) and one well-formed distribution."""
    require(bool(space), "tune.space must name at least one params key to search")
    for key, spec in space.items():
        check_entry(key, spec, search_alg, fields)


def search_size(space: Mapping[str, Mapping[str, Any]], num_samples: int) -> None:
    """The number of trials a search would run (``num_samples`` x every grid's points), bounded
    before anything starts."""
    grids = [len(args) for spec in space.values() for kind, args in spec.items() if kind == "grid"]
    trials = num_samples * math.prod(grids)
    if trials > MAX_TRIALS:
        shown = " x ".join([*(str(n) for n in grids), f"tune.num_samples {num_samples}"])
        raise ConfigError(
            f"tune.space: {trials:,} trials ({shown}): at most {MAX_TRIALS:,}; use fewer grid "
            "points or a range"
        )


def candidates(space: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Per key, every choice or grid point, or both ends of a range (floats for the uniform
    ones: what a trial draws there)."""
    out: dict[str, list[Any]] = {}
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        values = [float(a) for a in args] if kind.endswith("uniform") else list(args)
        out[key] = list({repr(v): v for v in values}.values())  # each distinct value once
    return out


def check_entry(key: str, spec: Any, search_alg: str, fields: Mapping[str, list[str]]) -> None:
    """One ``tune.space`` entry."""
    where = f"tune.space.{key}"
    section, _, name = key.partition(".")
    field_name = name.partition(".")[0]
    if section not in SEARCHED or not field_name:
        raise ConfigError(
            f"{where}: not a params key a trial can change (a key of {', '.join(SEARCHED)}, "
            "dotted as --set takes it)"
        )
    if field_name not in fields[section]:
        raise ConfigError(f"{where}: {section}.{field_name} is not a known param")
    if (reason := FIXED_IN_SEARCH.get(f"{section}.{field_name}")) is not None:
        raise ConfigError(f"{where}: a search holds {section}.{field_name} fixed ({reason})")
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where} must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if not isinstance(args, list | tuple) or not args:
        raise ConfigError(f"{where}.{kind} must be a non-empty list, got {args!r}")
    if len(args) > MAX_POINTS:
        raise ConfigError(
            f"{where}.{kind} lists {len(args):,} values: at most {MAX_POINTS:,} (each is checked "
            "before the search starts); use a range (uniform, loguniform, randint) instead"
        )
    if kind in ("loguniform", "uniform", "randint"):
        number = int if kind == "randint" else (int, float)
        ok = len(args) == 2 and all(
            isinstance(a, number) and not isinstance(a, bool) and math.isfinite(a) for a in args
        )
        if ok and kind == "randint" and not all(-INT64 <= a < INT64 for a in args):
            raise ConfigError(
                f"{where}.randint {list(args)}: both ends must lie within -(2**63 - 1) and "
                "2**63 - 2 (64-bit integers)"
            )
        if not ok or args[0] > args[1] or (kind == "loguniform" and args[0] <= 0):
            shape = "two integers" if kind == "randint" else "two numbers"
            low = " > 0" if kind == "loguniform" else ""
            raise ConfigError(
                f"{where}.{kind} must be [low, high], {shape}, low{low} <= high, got {list(args)}"
            )
    if kind == "grid" and search_alg == "optuna":
        raise ConfigError(f"{where}: grid is for tune.search_alg random (Optuna samples)")
