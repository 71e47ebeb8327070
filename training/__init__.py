"""Training utilities for EPD-Solver distillation (Stage-1 losses, feature extractors)."""
