"""Stage-1 distillation of EPD predictor tables (docs/authors-code.md §6):
``python -m training.distill.launch --config ...``."""

from .config import DEFAULTS, ConfigError, load_config
from .params import TableParameters
from .teacher import TeacherCache, teacher_grid, teacher_states
from .trainer import Distiller, train

__all__ = ["DEFAULTS", "ConfigError", "load_config", "TableParameters", "TeacherCache", "teacher_grid",
           "teacher_states", "Distiller", "train"]
