"""Worker for the RDPO DDP test: train under torchrun, save this rank's policy state and mean table."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from solvers.table import save_table
from training.ppo import train

if __name__ == "__main__":
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    table, folder = train(config, overrides, progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_table(table, out / f"rank{rank}.json")
    torch.save(torch.load(folder / "checkpoint.pt", weights_only=True)["policy"], out / f"policy{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
