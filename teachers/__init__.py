"""The model table (ResNet-RS rows, any timm model), weights, run directories, inference."""

from rs_pseudolabel.teachers.checkpoint import (
    TeacherInfo,
    describe_teacher,
    export_run,
    is_run_dir,
    load_teacher,
)
from rs_pseudolabel.teachers.inference import Predictor
from rs_pseudolabel.teachers.registry import ModelConfig, create_model, get_config, list_models
from rs_pseudolabel.teachers.table import format_table, models_table
from rs_pseudolabel.teachers.weights import WeightsError, read_weights

__all__ = [
    "ModelConfig",
    "Predictor",
    "TeacherInfo",
    "WeightsError",
    "create_model",
    "describe_teacher",
    "export_run",
    "format_table",
    "get_config",
    "is_run_dir",
    "list_models",
    "load_teacher",
    "models_table",
    "read_weights",
]
