"""Smoke run of Stage-1 distillation on an SD1.5-architecture UNet with random weights (nothing downloaded).

    python scripts/distill_smoke_sd15.py --json smoke.json            # GPU: 512x512 (64x64 latents), fp16 UNet
    python scripts/distill_smoke_sd15.py --tiny --device cpu          # a few-second CPU check of the same path

The SD1.5 backend proper arrives with the backbone work; until then this wraps a diffusers ``UNet2DConditionModel``
built from the SD1.5 architecture config as a denoiser, exactly as docs/authors-code.md §5.1 describes (``c_in =
1/sqrt(1+sigma^2)``, fractional timestep from the discrete VP map, eps -> x0, CFG in one batched call), and runs a few
distillation iterations of several settings through the real trainer, reporting seconds per iteration and peak GPU
memory. Prompts are stand-ins: each maps to a fixed random text embedding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.base import BackendBase  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.core import sigma_batch  # noqa: E402
from solvers.schedules import VPDiscreteMap, sd15_alphas_cumprod  # noqa: E402
from training.distill import Distiller, load_config  # noqa: E402

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 4,
             "norm_num_groups": 16, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


class EpsUNetDenoiser(BackendBase):
    """An eps-prediction UNet on the SD1.5 discrete VP schedule as ``denoiser(x, sigma, cond) -> x0``."""

    name = "sd15-unet-smoke"
    family = "ve"
    prediction_type = "epsilon"
    condition_kind = "prompt"
    state_dtype = torch.float32

    def __init__(self, unet, guidance: float = 7.5, tokens: int = 77):
        self.unet = unet
        self.guidance = guidance
        self.tokens = tokens
        self.alphas_cumprod = sd15_alphas_cumprod()
        self.map = VPDiscreteMap(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = self.map.sigma_min, self.map.sigma_max
        size = unet.config.sample_size
        self.shape = (unet.config.in_channels, size, size)
        width = unet.config.cross_attention_dim
        self.uncond = self._embedding("", width)

    def _embedding(self, prompt: str, width: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(1, self.tokens, width, generator=gen)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_prompts(self, prompts: list[str], seeds: list[int] | None = None) -> torch.Tensor:
        width = self.unet.config.cross_attention_dim
        return torch.cat([self._embedding(p, width) for p in prompts]).to(self.unet.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma_batch(sigma, x)
        c_in = (1 / torch.sqrt(1 + sigma ** 2)).view(-1, 1, 1, 1)
        timestep = self.map.timestep(sigma).to(x.device)
        dtype = self.unet.dtype
        inputs, steps = (c_in * x).to(dtype), timestep.to(dtype)
        if cond is None:
            cond = self.uncond.to(x.device).expand(x.shape[0], -1, -1)
        cond = cond.to(dtype)
        if self.guidance != 1.0:
            uncond = self.uncond.to(device=x.device, dtype=dtype).expand(x.shape[0], -1, -1)
            eps = self.unet(torch.cat([inputs, inputs]), torch.cat([steps, steps]),
                            encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.guidance * (eps_cond - eps_uncond)
        else:
            eps = self.unet(inputs, steps, encoder_hidden_states=cond).sample.float()
        return x - sigma.view(-1, 1, 1, 1) * eps

    def describe(self) -> dict:
        return {"backend": "random-sd15-unet", "guidance": self.guidance, "shape": list(self.shape)}


SETTINGS = {  # name -> overrides (all: SD1.5 discrete grid, dpm teacher M=1, K=2, data-space loss)
    "N4-bptt-b2": ["student.num_steps=4", "loss.backprop=trajectory", "batch=2"],
    "N11-step-b2": ["student.num_steps=11", "loss.backprop=step", "batch=2"],
    "N11-bptt-b1": ["student.num_steps=11", "loss.backprop=trajectory", "batch=1"],
}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per setting (after one warm-up)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet at 8x8 latents (CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype) if args.device != "cpu" else torch.float32
    unet = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET)).to(args.device, dtype).eval()
    unet.requires_grad_(False)
    denoiser = EpsUNetDenoiser(unet)
    params = sum(p.numel() for p in unet.parameters())
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "unet_parameters": params, "unet_dtype": str(dtype), "latent_shape": list(denoiser.shape),
              "torch": torch.__version__, "settings": {}}
    print(f"UNet: {params / 1e6:.1f}M parameters, {dtype}, latents {denoiser.shape}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(100)))
        for name in args.settings.split(","):
            overrides = ["name=smoke", f"outdir={tmp}/exps", "dataset=ms_coco", "schedule.kind=discrete",
                         "schedule.rho=1", "student.afs=false", "student.scale_dir=0", "teacher.solver=dpm",
                         "teacher.M=1", "loss.steps=all", "optim.lr=0.01", f"conditions.prompt_file={prompts}",
                         f"device={args.device}", "dtype=float32", *SETTINGS[name],
                         f"total_kimg={(args.iterations + 1) * 0.002}"]
            config = load_config(None, overrides)
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            row: dict = {"overrides": SETTINGS[name]}
            try:
                distiller = Distiller(config, run_dir, backend=denoiser, progress=False)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for iteration in range(args.iterations + 1):
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    record = distiller.train_iteration(iteration)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                timed = times[1:]
                row.update({"seconds_per_iteration": sum(timed) / len(timed), "warmup_seconds": times[0],
                            "teacher_seconds_total": distiller.teacher_seconds,
                            "loss": record["loss"], "positions_row0": record["positions"][0],
                            "optimizer_steps_per_iteration": distiller.num_rows})
                if args.device.startswith("cuda"):
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            except torch.OutOfMemoryError as err:
                row["error"] = f"out of memory: {str(err).splitlines()[0]}"
            finally:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            report["settings"][name] = row
            print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
