"""The model section: the architecture (danet.DANetConfig) as params."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.schema import Section, param


@dataclass(frozen=True)
class ModelParams(Section):
    """The architecture; ``num_classes`` comes from the shard manifest (0 = take it from there)."""

    NAME = "model"
    backbone: str = "resnet18d"
    head: str = param("danet", choices=("danet", "fcn"))
    output_stride: int = param(8, choices=(8, 16))
    multi_grid: tuple[int, ...] | None = param(None, ge=1, le=64)
    aux: bool = False
    attention_impl: str = param("auto", choices=("dense", "efficient", "auto"))
    dropout: float = param(0.1, ge=0.0, lt=1.0)
    pretrained: bool = False
    pretrained_path: str | None = None
    num_classes: int = param(0, ge=0, le=65_535)
    init_from: str = ""  # fine-tune from a segmentation model (model.pt, run id, models:/...)

    def to_danet_config(self, num_classes: int) -> Any:
        """The ``DANetConfig``; a ``num_classes`` param must agree with the manifest's classes."""
        from danet import DANetConfig

        if self.num_classes and self.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes is {self.num_classes} but the shard manifest has {num_classes} classes"
            )
        values = dataclasses.asdict(self)
        del values["num_classes"], values["init_from"]
        try:
            return DANetConfig(num_classes=num_classes, **values)
        except ValueError as err:
            raise ConfigError(str(err)) from None
