"""Which model is best: the two scores a model carries, named by what they are, and the one rule
that compares them.

A model has two mIoUs on its validation split, never shown under one name:

- ``best_val_miou`` -- **the training run's own validation**: the whole-image protocol (one
  scale, no flip), measured every ``train.eval_every_epochs`` inside training; the best of them
  is the model file's. It chooses **among the models one config trained**: the search's best
  trial (Ray Tune's metric ``val_miou``, per evaluation) and ``evaluate.model: auto`` (train.out's
  model or tune.out's).
- ``eval_miou`` -- **the evaluate stage's protocol score**: ``danet evaluate`` under
  ``evaluate``'s protocol (scales, flip, sliding window; its name is the ``eval_protocol`` tag).
  It decides **the champion** in the registry, between comparable evaluations (same dataset,
  split, shards' digest and protocol).

Both are compared by :func:`beats`: strictly higher wins; NaN never wins and never defends; ties
keep the earlier one (the champion, the first trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

TRAINING_SCORE = "best_val_miou"  # the training run's own validation, at its best evaluation
PROTOCOL_SCORE = "eval_miou"  # the evaluate stage's score under evaluate's protocol
LEGACY_PROTOCOL_SCORE = "val_miou"  # the registry's tag before the two were told apart


def beats(new: float, old: float | None) -> bool:
    """Does ``new`` beat ``old``? Strictly higher; a NaN never beats, and an old NaN or None (no
    score to defend) is beaten by any number."""
    if math.isnan(new):
        return False
    return old is None or math.isnan(old) or new > old


def best(items: Iterable[T], score: Callable[[T], float]) -> T | None:
    """The item whose ``score`` beats every earlier one's (the first on ties); None if none has a
    number."""
    found: T | None = None
    top: float | None = None
    for item in items:
        if beats(value := score(item), top):
            found, top = item, value
    return found
