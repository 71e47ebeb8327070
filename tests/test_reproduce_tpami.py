"""scripts/reproduce_tpami.py: the EPD-Solver++ (TPAMI) tables as data, every cell's plan and NFE, the command
line, and one cell end to end (sample -> five-metric scoring -> ours vs paper -> resume) on a tiny random-weight
SD1.5 pipeline with tiny random CLIP / aesthetic reward heads loaded through their real loading code, on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from scripts import reproduce_tpami as rt
from solvers.epd import sample_epd
from solvers.registry import eval_count, get_solver
from solvers.schedules import (ScheduleSpec, VPDiscreteMap, default_rho, flowmatch_sigmas, make_sigmas,
                               sd15_alphas_cumprod)
from training.rewards import pretrained

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official" / "tpami"
HAVE_OFFICIAL = all((OFFICIAL / f"{m}-best.pkl").is_file() for m in ("sd15", "sd3-512", "sd3-1024"))
needs_official = pytest.mark.skipif(not HAVE_OFFICIAL, reason=f"the authors' released TPAMI tables are not at "
                                    f"{OFFICIAL} (CI keeps shared/official/ beside the clone)")
SPEC = ROOT.parent / "shared" / "spec" / "reference-behaviour.md"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# The paper's setting / model names, as both documents write them, -> our backbone keys.
BACKBONE_OF = {"SD1.5": "sd15", "SD3-Medium, 512": "sd3_512", "SD3-M 512": "sd3_512", "SD3-Medium, 1024": "sd3_1024",
               "SD3-M 1024": "sd3_1024"}


@pytest.fixture(autouse=True)
def _no_weight_env(monkeypatch):
    for item in pretrained.MANIFEST.values():
        monkeypatch.delenv(item.env, raising=False)
    for name in (rt.TABLES_ENV, "SD15_MODEL_PATH", "SD3_MODEL_PATH", pretrained.ROOT_ENV):
        monkeypatch.delenv(name, raising=False)


# -- the paper's numbers ---------------------------------------------------------------------------------------
def _number(text: str) -> float:
    return float(text.replace("**", "").replace("\u2212", "-").strip())


def _parse_method(text: str) -> tuple[str, int, str | None]:
    match = re.fullmatch(r"(.+?) \((\d+)(?:, (\w+))?\)", text.replace("**", "").strip())
    assert match, text
    return match.group(1), int(match.group(2)), match.group(3)


def _rows_of_markdown(lines: list[str], backbone_of_line) -> dict[str, list[dict]]:
    """Table rows ``| setting | method | scores |`` -> ``{backbone: [row]}``; a blank setting continues the one
    above."""
    out: dict[str, list[dict]] = {}
    backbone = setting = None
    for line in lines:
        found = backbone_of_line(line)
        if found:
            backbone = found
        if not line.startswith("| ") or "---" in line or line.startswith(("| Setting", "| Model")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        if cells[0]:
            setting = cells[0]
            for name, key in BACKBONE_OF.items():
                if setting.startswith(name):
                    backbone = key
        method, steps, schedule = _parse_method(cells[1])
        scores = [_number(v) for v in re.split(r"\s*/\s*", cells[2])]
        nfe = int(re.search(r"NFE (\d+)", setting).group(1))
        out.setdefault(backbone, []).append({"nfe": nfe, "method": method, "steps": steps,
                                             "schedule": schedule.lower() if schedule else None, "scores": scores})
    return out


def _rows_of_json() -> dict[str, list[dict]]:
    data = rt.paper_data()
    return {b: [{"nfe": r["nfe"], "method": r["method"], "steps": r["steps"],
                 "schedule": r["schedule"].lower() if r["schedule"] else None,
                 "scores": [r["scores"][m] for m in rt.METRICS]} for r in block["rows"]]
            for b, block in data["backbones"].items()}


def test_paper_data_equals_our_transcription_in_authors_code():
    """docs/tpami_tables.json against docs/authors-code.md §10.2 (in the repository, always there)."""
    text = (ROOT / "docs" / "authors-code.md").read_text()
    section = text[text.index("### 10.2"):text.index("### 10.3")].splitlines()
    parsed = _rows_of_markdown(section, lambda line: None)
    assert parsed == _rows_of_json()
    assert {b: len(r) for b, r in parsed.items()} == {b: len(r) for b, r in rt.paper_rows().items()}


@pytest.mark.skipif(not SPEC.is_file(), reason=f"the specification of the authors' code is not at {SPEC}")
def test_paper_data_equals_the_spec_tables():
    text = SPEC.read_text()
    section = text[text.index("### 10.2"):text.index("### 10.3")].splitlines()

    def heading(line: str) -> str | None:
        match = re.fullmatch(r"\*\*(.+)\*\*", line.strip())
        if not match:
            return None
        return next(key for name, key in BACKBONE_OF.items() if match.group(1).startswith(name))

    parsed = _rows_of_markdown(section, heading)
    assert parsed == _rows_of_json()
    counts = {b: len(r) for b, r in parsed.items()}
    assert counts == {b: len(r) for b, r in rt.paper_rows().items()} and sum(counts.values()) == len(
        [line for line in section if re.match(r"\|[^|]*\|[^|]*\(\d+[^|]*\)[^|]*\|", line)])
    assert "Columns: HPSv2.1 / PickScore / ImageReward / CLIP / Aesthetic" in text[text.index("### 10.2"):]


def test_paper_rows_named_and_looked_up():
    rows = rt.paper_rows()
    assert list(rows) == list(rt.BACKBONES) == ["sd15", "sd3_512", "sd3_1024"]
    for backbone, cells in rows.items():
        assert list(cells).count("epd") == 1 and len(set(cells)) == len(cells)
        assert rt.paper_data()["backbones"][backbone]["resolution"] == rt.BACKBONES[backbone].resolution
    sd15 = rows["sd15"]
    # the names of the examples, each the row its name says
    assert (sd15["ddim-50"].method, sd15["ddim-50"].steps, sd15["ddim-50"].schedule) == ("DDIM", 50, "Uniform")
    assert (sd15["heun-10-uniform"].steps, sd15["heun-10-uniform"].schedule) == (10, "Uniform")
    assert (sd15["dpm2-10-logsnr"].method, sd15["dpm2-10-logsnr"].schedule) == ("DPM-Solver-2", "LogSNR")
    assert sd15["ipndm-20"].method == "iPNDM" and sd15["ipndm3m-50"].method == "iPNDM-3M"
    assert sd15["epd"].scores["hps"] == 0.2482 and rows["sd3_1024"]["epd"].scores["aesthetic"] == 5.3995
    assert rows["sd3_512"]["heun-14"].nfe == 28 and "heun-14-uniform" not in rows["sd3_512"]
    with pytest.raises(ValueError, match="no cell 'heun-25' for sd15; choose one of ddim-50"):
        rt.plan_cell("sd15", "heun-25")


# -- every cell's plan runs at the paper's NFE ---------------------------------------------------------------------
class _Counting:
    """Counts the sequential calls of the exact denoiser of N(0, I) data, ``D(x, sigma) = x / (1 + sigma^2)`` (the
    count does not depend on the model; this one costs nothing)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + sigma ** 2)


def _grid_of(cell: rt.Cell) -> torch.Tensor:
    """The grid the cell's sample.py flags build for the real model, written here from the model's schedule:
    SD1.5's scaled-linear alphas (sigma 0.0292 .. 14.61), SD3-Medium's static shift 3."""
    args = sample.build_parser().parse_args(rt.sample_argv(cell, Path("unused"), "0-1", 2, Path("p.txt"),
                                                           guidance=1.0, resolution=512))
    assert (args.solver, args.steps, args.afs) == (cell.solver, cell.row.steps, False)
    if cell.backbone.key == "sd15":
        alphas = sd15_alphas_cumprod()
        vp = VPDiscreteMap(alphas)
        kind = "discrete" if args.schedule == "default" else args.schedule
        spec = ScheduleSpec(kind=kind, num_steps=args.steps + 1, sigma_min=vp.sigma_min, sigma_max=vp.sigma_max,
                            rho=default_rho(kind), variant=args.grid_variant)
        return make_sigmas(spec, alphas_cumprod=alphas)
    assert args.schedule == "default"
    return flowmatch_sigmas(args.steps + 1, shift=3.0, variant=args.grid_variant)


@pytest.mark.parametrize("backbone", list(rt.BACKBONES))
def test_every_baseline_cell_runs_at_the_paper_nfe(backbone):
    for key, row in rt.paper_rows()[backbone].items():
        if key == "epd":
            continue
        cell = rt.plan_cell(backbone, key)
        sigmas = _grid_of(cell)
        assert len(sigmas) == row.steps + 1 and float(sigmas[-1]) > 0 and bool((sigmas[1:] < sigmas[:-1]).all())
        assert eval_count(cell.solver, sigmas).sequential == row.nfe == cell.counts()[0], key
        counter = _Counting()
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        get_solver(cell.solver)(counter, x * float(sigmas[0]), sigmas.double(), None)
        assert counter.calls == row.nfe, (backbone, key, counter.calls)
    # the mapping of the paper's names
    cells = {k: rt.plan_cell(backbone, k) for k in rt.paper_rows()[backbone] if k != "epd"}
    assert {c.solver for k, c in cells.items() if k.startswith("ddim")} == {"euler"}
    assert {c.solver for k, c in cells.items() if k.startswith("ipndm-")} == {"ipndm"}
    if backbone == "sd15":
        assert cells["ipndm3m-50"].solver == "ipndm3"
        assert (cells["heun-25-polynomial"].grid, cells["dpm2-10-logsnr"].grid, cells["ddim-20"].grid) == \
            ("polynomial", "logsnr", "discrete")
    else:
        assert {c.grid for c in cells.values()} == {"flowmatch"}


@needs_official
@pytest.mark.parametrize("backbone", list(rt.BACKBONES))
def test_epd_cells_run_the_released_best_table_at_nfe_20(backbone):
    cell = rt.plan_cell(backbone, "epd")
    assert cell.table_path == OFFICIAL / f"{rt.BACKBONES[backbone].release}-best.pkl"
    counter = _Counting()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample_epd(counter, x * float(cell.table.sigmas[0]), cell.table, None)
    assert counter.calls == cell.row.nfe == cell.counts()[0] == 20
    assert cell.counts()[1] == cell.table.eval_count().total == 30 and cell.table.num_steps == 11
    assert rt.plan_cell(backbone, "epd", release="distilled").name == "epd-distilled"
    other = next(b for b in rt.BACKBONES if rt.BACKBONES[b].backend != rt.BACKBONES[backbone].backend)
    with pytest.raises(ValueError, match="a table for"):
        rt.plan_cell(backbone, "epd", table=rt.release_table(other))


# -- the command line --------------------------------------------------------------------------------------------
def test_help_lists_every_cell(capsys):
    """``--help`` (the issue's acceptance check runs ``python scripts/reproduce_tpami.py --help``; here the same
    parser in this process) lists every backbone and every cell of the paper data."""
    with pytest.raises(SystemExit) as exit_info:
        rt.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listed: dict[str, list[str]] = {}
    backbone = None
    for line in text[text.index("cells (--backbone"):].splitlines()[1:]:
        match = re.match(r"  (\w+)  \(", line)
        if match:
            backbone = match.group(1)
        elif line.startswith("    "):
            listed.setdefault(backbone, []).append(line.split()[0])
    assert listed == {b: list(cells) for b, cells in rt.paper_rows().items()}
    for metric in rt.METRICS:
        assert metric in text


def _last_error(capsys) -> str:
    """The last stderr line (sampling's progress bars come before it), an error line."""
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    base = ["--backbone", "sd15", "--prompt-file", str(prompts), "--outdir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "weights")]
    cases = [
        (base + ["--method", "heun-25"], "choose from ddim-50, ipndm3m-50"),
        (base + ["--method", "ddim-20,heun-14"], "--method 'heun-14'"),
        (base, "give --method"),
        (base + ["--all", "--method", "ddim-20"], "--all or --method"),
        (base + ["--method", "ddim-20", "--table", "t.pkl"], "--table names one table"),
        (base + ["--method", "ddim-20", "--metrics", "fid"], "--metrics 'fid'"),
        (base + ["--method", "ddim-20", "--metrics", "clip", "--skip-metrics", "clip"], "no metric left"),
        (base + ["--method", "ddim-20", "--weights", "clip:/x"], "--weights 'clip:/x'"),
        (base + ["--method", "ddim-20", "--weights", "clip=/nowhere"], "clip=/nowhere: no such file"),
        (base + ["--method", "ddim-20", "--metric-option", "hps=1"], "--metric-option 'hps=1'"),
        (base + ["--method", "ddim-20", "--seeds", "0-3", "--num-images", "2", "--no-score"], "--seeds gives 4"),
        (["--backbone", "sd15", "--method", "ddim-20", "--prompt-file", str(tmp_path / "none.txt")], "none.txt"),
        (base + ["--method", "ddim-20", "--metrics", "hps"], "HPS_v2.1_compressed.pt"),
        (base + ["--method", "ddim-20", "--prompt-set", "hpsv2"], "--prompt-set or --prompt-file, not both"),
    ]
    if not rt.PROMPT_SETS["hpsv2"].exists():      # (not in the repository; a user may have added it)
        cases.append((["--backbone", "sd15", "--method", "ddim-20", "--prompt-set", "hpsv2"],
                      "hpsv2_benchmark.txt not found"))
    for argv, message in cases:
        assert rt.main(argv) == 2, argv
        assert message in _one_error(capsys), (argv, message)
    # one missing file names it and how to leave the metric out; several are listed in one line
    assert rt.main(base + ["--method", "ddim-20", "--metrics", "hps"]) == 2
    line = _one_error(capsys)
    assert str(tmp_path / "weights" / "HPS_v2.1_compressed.pt") in line and "--skip-metrics hps" in line
    assert rt.main(base + ["--method", "ddim-20"]) == 2
    line = _one_error(capsys)
    assert "--skip-metrics hps,pickscore,imagereward,clip,aesthetic" in line
    assert line.count("sac+logos+ava1-l14-linearMSE.pth") == 1 and line.count("clip-vit-large-patch14") == 1
    # argparse's own errors: one line too
    with pytest.raises(SystemExit) as exit_info:
        rt.main(["--backbone", "sdxl", "--method", "epd"])
    assert exit_info.value.code == 2 and "invalid choice: 'sdxl'" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_each_plan(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    assert rt.main(["--backbone", "sd3_1024", "--method", "ddim-28,heun-10", "--prompt-file", str(prompts),
                    "--dry-run", "--cache-dir", str(tmp_path), "--skip-metrics", "imagereward"]) == 0
    plans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["cell"] for p in plans] == ["ddim-28", "heun-10"]
    for p in plans:
        args = sample.build_parser().parse_args(p["sample_py"])
        assert (args.resolution, json.loads(args.backend_config), args.backend, args.seeds) == \
            (1024, {"guidance": 4.5}, "sd3", "0-2")
        assert args.upscale == 1 and args.grid_variant == "official" and p["metrics"] == [
            "hps", "pickscore", "clip", "aesthetic"]
        assert p["paper"] == rt.paper_rows()["sd3_1024"][p["cell"]].scores and p["missing_weights"]
    assert (plans[0]["nfe_sequential"], plans[1]["nfe_sequential"]) == (28, 20)


def test_launch_sh_targets(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    env = {**os.environ, "PYTHON": PYTHON, "TPAMI_OUTDIR": str(tmp_path / "tpami"), "PROMPTS": str(prompts)}
    proc = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_tpami", "sd15", "heun-10-polynomial",
                           "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["cell"] == "heun-10-polynomial" and plan["solver"]["grid"] == "polynomial"
    assert plan["sample_py"][plan["sample_py"].index("--outdir") + 1] == \
        str(tmp_path / "tpami" / "sd15" / "heun-10-polynomial" / "images")
    assert plan["prompt_file"] == str(prompts)
    # what each target hands to Python, one process or torchrun (a stand-in interpreter prints its arguments)
    echo = tmp_path / "echo-python"
    echo.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    echo.chmod(0o755)
    calls = {}
    for nproc in ("1", "2"):
        run = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_tpami_table", "sd3_512", "--batch", "4"],
                             capture_output=True, text=True, env={**env, "PYTHON": str(echo), "NPROC_PER_NODE": nproc,
                                                                  "WEIGHTS_DIR": "w"})
        assert run.returncode == 0, run.stderr
        calls[nproc] = run.stdout.splitlines()
    script = ["scripts/reproduce_tpami.py", "--outdir", str(tmp_path / "tpami"), "--cache-dir", "w", "--prompt-file",
              str(prompts), "--backbone", "sd3_512", "--all", "--batch", "4"]
    assert calls["1"] == script
    assert calls["2"] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    # the default list is the script's own, so a --prompt-set among the flags is not overridden
    run = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_tpami", "sd15", "epd", "--prompt-set", "hpsv2"],
                         capture_output=True, text=True, env={**env, "PYTHON": str(echo), "WEIGHTS_DIR": "w",
                                                              "PROMPTS": "src/prompts/test.txt"})
    assert run.stdout.splitlines() == ["scripts/reproduce_tpami.py", "--outdir", str(tmp_path / "tpami"),
                                       "--cache-dir", "w", "--backbone", "sd15", "--method", "epd", "--prompt-set",
                                       "hpsv2"]
    usage = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_tpami", "sd15"], capture_output=True,
                           text=True, env=env)
    assert usage.returncode == 2 and "usage: ./launch.sh reproduce_tpami BACKBONE METHOD" in usage.stderr
    usage = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_tpami_table"], capture_output=True,
                           text=True, env=env)
    assert usage.returncode == 2 and "usage: ./launch.sh reproduce_tpami_table BACKBONE" in usage.stderr
    helptext = subprocess.run(["bash", str(ROOT / "launch.sh"), "help"], capture_output=True, text=True, env=env)
    assert helptext.returncode == 0
    assert "reproduce_tpami BACKBONE METHOD" in helptext.stdout and "reproduce_tpami_table BACKBONE" in helptext.stdout


# -- end to end on tiny models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> Path:
    from backends.testing.random_init import save_random_pipeline

    return save_random_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15", "tiny")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights root holding, under the manifest's names, a tiny random transformers CLIP (the ``clip`` head's
    folder and the ``aesthetic`` head's image encoder) and a random aesthetic MLP for its 32-dim embeddings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from backends.testing.random_init import build_clip_tokenizer
    from training.rewards import clip_score

    root = tmp_path_factory.mktemp("weights")
    tokenizer = build_clip_tokenizer("tiny")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    folder = root / pretrained.MANIFEST["clip_vit_l14"].path
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                       crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=list(MEAN), image_std=list(STD),
                       do_convert_rgb=True).save_pretrained(folder)
    torch.save(clip_score.AestheticMLP(32).state_dict(), root / pretrained.MANIFEST["aesthetic"].path)
    clip_score.clear_cache()
    yield root
    clip_score.clear_cache()


def _reference_scores(weights: Path, pngs: list[Path], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CLIP cosine and aesthetic MLP output written here from the saved PNGs: torchvision preprocessing and the
    models' own forward passes."""
    import torchvision.transforms as T
    from transformers import CLIPModel, CLIPTokenizer

    from training.rewards.clip_score import AestheticMLP

    folder = weights / pretrained.MANIFEST["clip_vit_l14"].path
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(MEAN, STD)])
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in pngs])
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    mlp = AestheticMLP(32)
    mlp.load_state_dict(torch.load(weights / pretrained.MANIFEST["aesthetic"].path, weights_only=True))
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
        clip = (out.image_embeds * out.text_embeds).sum(-1)
        aesthetic = mlp.eval()(out.image_embeds)[:, 0]
    return clip.double().numpy(), aesthetic.double().numpy()


def test_cells_end_to_end_then_resume(tmp_path, tiny_sd15, tiny_weights, capsys, one_torch_thread):
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red cube on a table\na watercolor fox in the snow\n")
    methods = ["ddim-20", "epd"] if HAVE_OFFICIAL else ["ddim-20"]
    out = tmp_path / "results"
    argv = ["--backbone", "sd15", "--method", ",".join(methods), "--model_path", str(tiny_sd15), "--prompt-file",
            str(prompts), "--resolution", "32", "--device", "cpu", "--score-device", "cpu", "--batch", "2",
            "--metrics", "clip,aesthetic", "--cache-dir", str(tiny_weights), "--outdir", str(out)]
    assert rt.main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if " | paper " in line]
    assert len(lines) == 2 * len(methods)
    assert "sampled at 32 px; the paper's sd15 table is at 512 px" in captured.err
    stamps = {}
    for method in methods:
        row = rt.paper_rows()["sd15"][method]
        cell = out / "sd15" / method
        result = json.loads((cell / "scores.json").read_text())
        pngs = sorted((cell / "images").glob("*/*.png"))
        # the images: one per prompt (seeds 0, 1), native 32 px, each from this cell at the paper's NFE 20
        assert [p.name for p in pngs] == ["000000.png", "000001.png"]
        assert {Image.open(p).size for p in pngs} == {(32, 32)}
        metas = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
        assert [m["prompt"] for m in metas] == prompts.read_text().splitlines()
        points = 21 if method == "ddim-20" else 11
        assert {(m["nfe"]["sequential"], m["guidance"], len(m["sigmas"])) for m in metas} == {(20, 7.5, points)}
        assert {m["solver"] for m in metas} == {"euler" if method == "ddim-20" else "epd"}
        assert result["nfe_sequential"] == row.nfe == 20
        # the scores: these two images with their prompts, recomputed here independently
        clip, aesthetic = _reference_scores(tiny_weights, pngs, [m["prompt"] for m in metas])
        assert result["metrics"]["clip"]["count"] == 2
        assert result["metrics"]["clip"]["mean"] == pytest.approx(clip.mean(), abs=1e-5)
        assert result["metrics"]["aesthetic"]["mean"] == pytest.approx(aesthetic.mean(), abs=1e-5)
        assert result["metrics"]["clip"]["std"] == pytest.approx(clip.std(), abs=1e-5)
        assert result["skipped_metrics"] == ["hps", "pickscore", "imagereward"]
        for metric in ("clip", "aesthetic"):
            m = result["metrics"][metric]
            assert m["paper"] == row.scores[metric] and m["difference"] == pytest.approx(m["mean"] - m["paper"])
            name = rt.paper_data()["metrics"][metric]
            assert f"{metric} ({name}): ours {m['mean']:.4f} | paper {row.scores[metric]:.4f} (sd15, {row.label}, " \
                   f"NFE 20)" in lines
        assert result["images"] == {"dir": str(cell / "images"), "count": 2, "seeds": "0-1", "reused": 0,
                                    "generated_this_run": 2}
        stamps.update({p: p.stat().st_mtime_ns for p in cell.glob("images/*/*")})
    if len(methods) > 1:
        summary = json.loads((out / "sd15" / "summary-ddim-20_epd.json").read_text())
        assert [c["cell"] for c in summary["cells"]] == methods
    # resume: nothing is sampled again, nothing rewritten; the scores come out the same
    before = {m: json.loads((out / "sd15" / m / "scores.json").read_text())["metrics"] for m in methods}
    assert rt.main(argv) == 0
    assert capsys.readouterr().out.count("sampled 0 images") == len(methods)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for method in methods:
        again = json.loads((out / "sd15" / method / "scores.json").read_text())
        assert again["images"]["generated_this_run"] == 0 and again["images"]["reused"] == 2
        assert {k: v["mean"] for k, v in again["metrics"].items()} == {k: v["mean"] for k, v in before[method].items()}
    # images of another cell, prompt list or guidance in the folder are refused, not scored
    other = tmp_path / "other.txt"
    other.write_text("something else\nand more\n")
    assert rt.main([*argv[:7], str(other), *argv[8:]]) == 2
    assert "not line 1 of the prompt file" in _last_error(capsys)
    assert rt.main([*argv, "--guidance", "3.0"]) == 2
    assert "sampled with guidance 7.5, not 3.0" in _last_error(capsys)


def test_two_ranks_share_the_seeds_and_rank_0_scores_them_all(tmp_path, tiny_sd15, tiny_weights, capsys,
                                                              monkeypatch, one_torch_thread):
    """The torchrun path of one cell, with the two ranks run one after the other in this process (the barriers
    counted instead of waited on): rank 1 samples its round-robin share and scores nothing; rank 0 samples the
    rest, checks every seed's image (rank 1's too) and scores all of them."""
    import torch.distributed as dist

    waits = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: waits.append(1))
    prompts = tmp_path / "three.txt"
    prompts.write_text("a red cube\na blue sphere\na green cone\n")
    out = tmp_path / "results"
    args = rt.build_parser().parse_args(
        ["--backbone", "sd15", "--method", "ddim-20", "--model_path", str(tiny_sd15), "--prompt-file", str(prompts),
         "--resolution", "32", "--device", "cpu", "--score-device", "cpu", "--batch", "2", "--metrics", "clip",
         "--cache-dir", str(tiny_weights), "--outdir", str(out)])
    cells, run = rt.prepare_run(args)
    images = out / "sd15" / "ddim-20" / "images" / "000000"
    assert rt.run_cell(cells[0], args, run, rank=1, world=2) is None
    assert "rank 1: sampled 1 images" in capsys.readouterr().out
    assert sorted(p.name for p in images.glob("*.png")) == ["000001.png"] and len(waits) == 2
    assert not (out / "sd15" / "ddim-20" / "scores.json").exists()
    result = rt.run_cell(cells[0], args, run, rank=0, world=2)
    assert "rank 0: sampled 2 images" in capsys.readouterr().out and len(waits) == 4
    assert sorted(p.name for p in images.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert result["metrics"]["clip"]["count"] == 3 and result["timing"]["processes"] == 2
    assert result["images"]["count"] == 3 and result["images"]["reused"] == 1
    pngs = sorted(images.glob("*.png"))
    clip, _ = _reference_scores(tiny_weights, pngs, prompts.read_text().splitlines())
    assert result["metrics"]["clip"]["mean"] == pytest.approx(clip.mean(), abs=1e-5)
    assert json.loads((out / "sd15" / "ddim-20" / "scores.json").read_text())["metrics"]["clip"]["count"] == 3
