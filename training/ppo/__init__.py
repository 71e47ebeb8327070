"""RDPO (EPD-Solver++ Stage 2, docs/authors-code.md §7): fine-tune an EPD predictor table with PPO on a reward, through
a residual Dirichlet policy over tables; ``python -m training.ppo.launch --config training/ppo/cfgs/digits.yaml``."""

from .advantages import group_indices, rloo_advantages
from .cold_start import ColdStart, cold_start
from .config import DEFAULTS, load_config
from .loss import PPOLoss, ppo_loss
from .policy import DirichletPolicy, TableSample
from .trainer import RDPOTrainer, train

__all__ = ["group_indices", "rloo_advantages", "ColdStart", "cold_start", "DEFAULTS", "load_config", "PPOLoss",
           "ppo_loss", "DirichletPolicy", "TableSample", "RDPOTrainer", "train"]
