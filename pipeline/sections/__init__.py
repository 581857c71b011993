"""params.yaml's sections, one frozen dataclass each, grouped along the data path; the root
``Params`` and the loading live in pipeline/config.py. Importing any section imports them all
(a search's space names keys of every section)."""

from pipeline.sections.data import DataParams, ShardParams, SyntheticParams
from pipeline.sections.inference import EvaluateParams, PredictParams, ProtocolParams
from pipeline.sections.model import ModelParams
from pipeline.sections.release import ExportParams, RegisterParams
from pipeline.sections.training import LOSS_OUTPUTS, MlflowParams, TrainParams, TuneParams

__all__ = [
    "LOSS_OUTPUTS",
    "DataParams",
    "EvaluateParams",
    "ExportParams",
    "MlflowParams",
    "ModelParams",
    "PredictParams",
    "ProtocolParams",
    "RegisterParams",
    "ShardParams",
    "SyntheticParams",
    "TrainParams",
    "TuneParams",
]
