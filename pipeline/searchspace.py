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


def check_space(space: Mapping[str, Any], search_alg: str, fields: Mapping[str, list[str]]) -> None:
    """``tune.space``: at least one entry, each a known, searchable key (``fields``: each
    section's param names) and one well-formed distribution."""
    require(bool(space), "tune.space must name at least one params key to search")
    for key, spec in space.items():
        check_entry(key, spec, search_alg, fields)


def candidates(space: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Per key, every choice or grid point, or both ends of a range (floats for the uniform
    ones: what a trial draws there)."""
    out: dict[str, list[Any]] = {}
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        out[key] = [float(a) for a in args] if kind.endswith("uniform") else list(args)
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
    if kind in ("loguniform", "uniform", "randint"):
        number = int if kind == "randint" else (int, float)
        ok = len(args) == 2 and all(isinstance(a, number) and not isinstance(a, bool) for a in args)
        if not ok or args[0] > args[1] or (kind == "loguniform" and args[0] <= 0):
            shape = "two integers" if kind == "randint" else "two numbers"
            low = " > 0" if kind == "loguniform" else ""
            raise ConfigError(
                f"{where}.{kind} must be [low, high], {shape}, low{low} <= high, got {list(args)}"
            )
    if kind == "grid" and search_alg == "optuna":
        raise ConfigError(f"{where}: grid is for tune.search_alg random (Optuna samples)")
