"""The first images of some shards with their truth and a model's prediction: the overlays a
training run logs per evaluation and writes at its end, and those ``danet evaluate`` draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from danet.inference import Protocol, infer, to_input
from pipeline.data.loader import read_shard
from pipeline.data.manifest import ShardRef

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # image (H, W, 3), truth, prediction (H, W)


def prediction_rows(
    module: torch.nn.Module,
    shards: Sequence[ShardRef],
    count: int,
    device: torch.device | str = "cpu",
    protocol: Protocol | None = None,
) -> list[Row]:
    """(image, truth, prediction) of the first ``count`` images of ``shards``, predicted by
    ``module`` (RGB in [0, 1] -> logits, in eval mode) through ``protocol`` (default: the whole
    image, as in-training validation)."""
    rows: list[Row] = []
    protocol = protocol or Protocol()
    with torch.no_grad():
        for ref in shards:
            for _, image, label in read_shard(ref):
                if len(rows) >= count:
                    return rows
                pred = infer(module, to_input(image).to(device), protocol).argmax(1)[0]
                rows.append((image, label, pred.cpu().numpy().astype(np.uint8)))
    return rows
