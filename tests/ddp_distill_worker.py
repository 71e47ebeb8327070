"""Worker for test_distill_ddp: run one distillation under torchrun and save this rank's final table."""

import sys
from pathlib import Path

import torch.distributed as dist

from solvers.table import save_table
from training.distill import train

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    table, folder = train(None, overrides, progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_table(table, out / f"rank{rank}.json")
    if dist.is_initialized():
        dist.destroy_process_group()
