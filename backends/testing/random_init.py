"""Diffusers pipelines of the real architectures with random weights, built offline from configs only.

``build_pipeline(model, size)`` makes a ``StableDiffusionPipeline`` (``"sd15"``), ``StableDiffusion3Pipeline``
(``"sd3"``, SD3-Medium), ``FluxPipeline`` (``"flux"``, FLUX.1-dev) or ``StableDiffusionXLPipeline`` (``"sdxl"``,
SDXL base 1.0) whose modules are randomly initialised:

* ``size="tiny"``: 0.7-2.5M parameters per pipeline, that still run every real code path
  (cross-attention UNet, joint-attention MMDiT, FLUX double/single stream blocks, CLIP, T5, KL-VAE); they build,
  save and sample in seconds on a CPU. They are meant for ``TINY_RESOLUTION[model]`` pixels (32; the tiny VAEs
  downsample by 2, so latents are 16x16) but also run at other sizes: SD1.5 at multiples of 8 px, SD3 and FLUX
  at multiples of 4 px (SD3 up to 128 px: ``pos_embed_max_size`` 32), SDXL at multiples of 8 px (its tiny UNet
  downsamples the 16x16 latents twice).
* ``size="full"``: the published architectures (SD1.5 UNet 859.5M, SD3-Medium MMDiT 2.03B, FLUX.1-dev 11.9B,
  SDXL-base UNet 2.57B, CLIP-L/G, T5-v1.1-XXL encoder 4.76B, the 4- and 16-channel KL-VAEs). Modules are constructed directly on
  ``device`` in ``dtype``; ``device="meta"`` builds them without allocating memory (for counting parameters).

Tokenizers are made offline too: CLIP's from the BPE merges that ``open_clip`` ships (the whole 49408-token
vocabulary for ``full``, the first :data:`TINY_CLIP_MERGES` merges for ``tiny``), T5's by training a small
Unigram model with the ``tokenizers`` library on a made-up corpus (ids ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 like
T5's; the full T5 encoder keeps its 32128-row embedding, of which the tokenizer uses a prefix).

``write_ldm_single_file`` writes an SD1.5 pipeline as one original-LDM checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) that diffusers' ``from_single_file`` loads back with
identical weights::

    StableDiffusionPipeline.from_single_file(str(file), config=str(diffusers_folder), local_files_only=True)

(``config`` must be a ``str``: diffusers 0.42 passes it on to each model's ``from_single_file``, which rejects
``pathlib.Path``.)

CLI: ``python -m backends.testing.random_init --model sd15 --size tiny --out DIR [--dtype float16] [--device cuda]``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import math
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "MODELS",
    "SIZES",
    "TINY_RESOLUTION",
    "TINY_CLIP_MERGES",
    "PUBLISHED_PARAMETERS",
    "pipeline_configs",
    "full_configs",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_pipeline",
    "save_random_pipeline",
    "count_parameters",
    "ldm_state_dict",
    "write_ldm_single_file",
]

MODELS = ("sd15", "sd3", "flux", "sdxl")
SIZES = ("tiny", "full")

#: Image side (pixels) each tiny pipeline is meant to run at (latents are 16x16: the tiny VAEs downsample by 2).
TINY_RESOLUTION = {"sd15": 32, "sd3": 32, "flux": 32, "sdxl": 32}

#: Number of CLIP BPE merges kept by the tiny CLIP tokenizers (vocabulary = 512 byte symbols + merges + 2).
TINY_CLIP_MERGES = 2000

#: Published parameter counts of the full-size components (approximate, for sanity checks).
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859.52e6, "vae": 83.65e6, "text_encoder": 123.06e6},
    "sd3": {"transformer": 2.028e9, "vae": 83.8e6, "text_encoder": 123.7e6, "text_encoder_2": 694.7e6,
            "text_encoder_3": 4.762e9},
    "flux": {"transformer": 11.90e9, "vae": 83.8e6, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9},
    # SDXL base 1.0: UNet 2,567,463,684; CLIP-L 123,060,480; OpenCLIP-bigG with projection 694,659,840
    "sdxl": {"unet": 2.5675e9, "vae": 83.65e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6},
}

_CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = 49152 - 256 - 2          # as in CLIP's simple_tokenizer: 48894 merges
_T5_TINY_VOCAB = 640                        # tiny T5 embedding rows (>= the tiny tokenizer's length)
_T5_FULL_VOCAB = 32128
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------


def _clip_vocab_size(size: str) -> int:
    return _CLIP_VOCAB_SIZE if size == "full" else 512 + TINY_CLIP_MERGES + 2


def _clip_text_config(size: str, kind: str, pad_token: str = _EOS) -> dict[str, Any]:
    """CLIP text-encoder config: ``kind`` is ``"L"`` (ViT-L/14) or ``"G"`` (OpenCLIP bigG/14)."""
    vocab = _clip_vocab_size(size)
    ids = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 0 if pad_token == "!" else vocab - 1}
    common = dict(vocab_size=vocab, max_position_embeddings=77, layer_norm_eps=1e-5, **ids)
    if size == "full":
        if kind == "L":
            return dict(common, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        projection_dim=768, hidden_act="quick_gelu")
        return dict(common, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu")
    if kind == "L":
        return dict(common, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, hidden_act="quick_gelu")
    return dict(common, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=48, hidden_act="gelu")


def _t5_config(size: str) -> dict[str, Any]:
    """T5-v1.1 encoder config (XXL for ``full``)."""
    common = dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.1,
                  pad_token_id=0, eos_token_id=1, is_encoder_decoder=False, use_cache=False,
                  tie_word_embeddings=False)
    if size == "full":
        return dict(common, vocab_size=_T5_FULL_VOCAB, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    return dict(common, vocab_size=_T5_TINY_VOCAB, d_model=96, d_kv=24, d_ff=192, num_layers=2, num_heads=4)


def _vae_config(size: str, latent_channels: int, scaling_factor: float, shift_factor: float | None,
                quant_convs: bool) -> dict[str, Any]:
    """KL-VAE config: the SD/SD3/FLUX 4-level one for ``full``, a 2-level (downsample x2) one for ``tiny``."""
    if size == "full":
        blocks, layers, groups, sample = (128, 256, 512, 512), 2, 32, 512 if latent_channels == 4 else 1024
    else:
        blocks, layers, groups, sample = (16, 32), 1, 8, 32
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(blocks),
                up_block_types=["UpDecoderBlock2D"] * len(blocks), block_out_channels=list(blocks),
                layers_per_block=layers, act_fn="silu", latent_channels=latent_channels, norm_num_groups=groups,
                sample_size=sample, scaling_factor=scaling_factor, shift_factor=shift_factor,
                use_quant_conv=quant_convs, use_post_quant_conv=quant_convs, force_upcast=True)


def _sd15_configs(size: str) -> dict[str, dict[str, Any]]:
    if size == "full":
        unet = dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    else:
        unet = dict(sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=2,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    unet.update(in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_eps=1e-5)
    return {
        "unet": unet,
        "vae": _vae_config(size, 4, 0.18215, None, True),
        "text_encoder": _clip_text_config(size, "L"),
        "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                          trained_betas=None),
    }


def _sd3_configs(size: str) -> dict[str, dict[str, Any]]:
    clip_l, clip_g, t5 = _clip_text_config(size, "L"), _clip_text_config(size, "G", pad_token="!"), _t5_config(size)
    if size == "full":
        transformer = dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                           pos_embed_max_size=192)
    else:
        transformer = dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                           pos_embed_max_size=32)
    latent = 16
    transformer.update(patch_size=2, in_channels=latent, out_channels=latent, joint_attention_dim=t5["d_model"],
                       caption_projection_dim=transformer["attention_head_dim"] * transformer["num_attention_heads"],
                       pooled_projection_dim=clip_l["projection_dim"] + clip_g["projection_dim"],
                       dual_attention_layers=[], qk_norm=None)
    return {
        "transformer": transformer,
        "vae": _vae_config(size, latent, 1.5305, 0.0609, False),
        "text_encoder": clip_l,
        "text_encoder_2": clip_g,
        "text_encoder_3": t5,
        "scheduler": dict(num_train_timesteps=1000, shift=3.0),
    }


def _flux_configs(size: str) -> dict[str, dict[str, Any]]:
    clip_l, t5 = _clip_text_config(size, "L"), _t5_config(size)
    if size == "full":
        transformer = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                           axes_dims_rope=[16, 56, 56])
    else:
        transformer = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                           axes_dims_rope=[4, 6, 6])
    latent = 16
    transformer.update(patch_size=1, in_channels=4 * latent, out_channels=None, joint_attention_dim=t5["d_model"],
                       pooled_projection_dim=clip_l["hidden_size"], guidance_embeds=True)
    return {
        "transformer": transformer,
        "vae": _vae_config(size, latent, 0.3611, 0.1159, False),
        "text_encoder": clip_l,
        "text_encoder_2": t5,
        "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    }


def _sdxl_configs(size: str) -> dict[str, dict[str, Any]]:
    """SDXL base 1.0: a 3-level UNet whose cross-attention reads CLIP-L and OpenCLIP-bigG hidden states side by
    side (768 + 1280 = 2048) and whose ``text_time`` embedding takes bigG's pooled projection plus six
    256-wide Fourier features of the micro-conditions (1280 + 6 * 256 = 2816)."""
    clip_l, clip_g = _clip_text_config(size, "L"), _clip_text_config(size, "G", pad_token="!")
    if size == "full":
        unet = dict(sample_size=128, block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                    attention_head_dim=[5, 10, 20], addition_time_embed_dim=256, norm_num_groups=32)
    else:
        unet = dict(sample_size=16, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
                    attention_head_dim=[2, 4, 4], addition_time_embed_dim=8, norm_num_groups=16)
    unet.update(in_channels=4, out_channels=4, layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=clip_l["hidden_size"] + clip_g["hidden_size"], addition_embed_type="text_time",
                projection_class_embeddings_input_dim=clip_g["projection_dim"] + 6 * unet["addition_time_embed_dim"],
                use_linear_projection=True, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_eps=1e-5)
    vae = _vae_config(size, 4, 0.13025, None, True)
    if size == "full":
        vae["sample_size"] = 1024
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": clip_l,
        "text_encoder_2": clip_g,
        "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading",
                          steps_offset=1, use_karras_sigmas=False, set_alpha_to_one=False, skip_prk_steps=True,
                          clip_sample=False, sample_max_value=1.0, trained_betas=None),
    }


def pipeline_configs(model: str, size: str = "tiny") -> dict[str, dict[str, Any]]:
    """Per-component configs (diffusers ``__init__`` kwargs / transformers config kwargs) of a pipeline."""
    _check(model, size)
    return {"sd15": _sd15_configs, "sd3": _sd3_configs, "flux": _flux_configs, "sdxl": _sdxl_configs}[model](size)


def full_configs(model: str) -> dict[str, dict[str, Any]]:
    """The published (full-size) per-component configs of ``model``."""
    return pipeline_configs(model, "full")


def _check(model: str, size: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


# --------------------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order = CLIP's order: printable bytes first, then the rest ascending


def _clip_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, built from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` like CLIP does."""
    spec = importlib.util.find_spec("open_clip")        # locate the file without importing open_clip (and timm)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip (open_clip_torch) is needed for CLIP's BPE merges")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(size: str = "tiny", pad_token: str = _EOS):
    """A ``CLIPTokenizer`` (model_max_length 77): all 48894 merges for ``full``, the first few thousand for ``tiny``.

    ``pad_token`` is ``"<|endoftext|>"`` (CLIP-L, SD1.5) or ``"!"`` (id 0, like SD3's second CLIP tokenizer).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe(_CLIP_NUM_MERGES if size == "full" else TINY_CLIP_MERGES)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=77,
                                                  pad_token=pad_token)
    assert len(tokenizer) == _clip_vocab_size(size), len(tokenizer)
    return tokenizer


_T5_WORDS = """
a an the of and or with without on in under over above below near behind beside between into through across
photo photograph picture painting drawing sketch illustration render rendering image portrait landscape closeup
red orange yellow green blue purple pink brown black white gray grey golden silver crimson teal violet beige
cube sphere cylinder cone pyramid torus ring box ball bottle cup bowl chair table lamp window door house tower
cat dog horse bird fish fox wolf bear lion tiger rabbit mouse owl eagle dragon robot astronaut knight wizard
man woman child girl boy person people crowd friend family king queen soldier sailor farmer painter dancer
city town village street road bridge river lake ocean sea beach island desert forest jungle mountain hill valley
sky cloud rain snow storm wind fog sun moon star planet galaxy space night day morning evening sunset sunrise
small large tiny huge tall short long wide narrow round square sharp soft smooth rough shiny matte glossy
bright dark light shadow glow neon vivid pale muted warm cold hot wet dry old new ancient modern futuristic
detailed realistic photorealistic cinematic dramatic minimal abstract surreal stylized cartoon anime pixel
oil watercolor acrylic charcoal pencil ink digital art artwork masterpiece quality resolution lighting lens
wooden metal glass stone plastic paper fabric leather marble crystal ice fire water smoke sand grass leaves
flower tree rose tulip garden field meadow park path fence wall roof floor ceiling room kitchen library
riding flying running walking sitting standing sleeping reading eating drinking playing singing holding
wearing carrying looking smiling jumping swimming climbing floating falling burning melting glowing
one two three four five six seven eight nine ten many few several some every each first last next other
is are was were be has have had do does did will would can could should very more most less least much
hat coat dress shirt shoes boots gloves scarf glasses helmet armor cape crown sword shield book map clock
car bus train plane ship boat bicycle rocket balloon kite umbrella camera phone computer screen guitar piano
"""


def _t5_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    words = _T5_WORDS.split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(n_sentences)] + words


def _viterbi(word: str, scores: dict[str, float], max_len: int) -> list[str]:
    """Most likely segmentation of ``word`` into pieces of ``scores`` (every single character must be a piece)."""
    best = [0.0] + [-math.inf] * len(word)
    back = [0] * (len(word) + 1)
    for end in range(1, len(word) + 1):
        for start in range(max(0, end - max_len), end):
            score = scores.get(word[start:end])
            if score is not None and best[start] + score > best[end]:
                best[end], back[end] = best[start] + score, start
    pieces, end = [], len(word)
    while end > 0:
        pieces.append(word[back[end]:end])
        end = back[end]
    return pieces[::-1]


def _train_unigram(corpus: list[str], n_pieces: int, max_len: int = 8, iterations: int = 4) -> list[tuple[str, float]]:
    """Deterministic Unigram LM training: seed with frequent substrings, then Viterbi-EM with pruning.

    (``tokenizers``' ``UnigramTrainer`` is not reproducible from run to run, which would make two builds of the
    same pipeline tokenize prompts differently.) Returns ``[(piece, log_prob), ...]`` sorted by score.
    """
    words = Counter("▁" + w for line in corpus for w in line.split())
    chars = sorted({c for w in words for c in w} | {chr(c) for c in range(33, 127)} | {"▁"})
    substrings: Counter[str] = Counter()
    for w, c in words.items():
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + max_len) + 1):
                substrings[w[i:j]] += c
    seeds = sorted(substrings, key=lambda p: (-substrings[p] * len(p), p))[:2 * n_pieces]
    total = sum(substrings[p] for p in seeds) + len(chars)
    scores = {p: math.log(substrings[p] / total) for p in seeds} | {c: math.log(1 / total) for c in chars}
    for it in range(iterations):
        counts: Counter[str] = Counter()
        for w, c in sorted(words.items()):
            for piece in _viterbi(w, scores, max_len):
                counts[piece] += c
        multi = sorted((p for p in scores if len(p) > 1 and counts[p] > 0), key=lambda p: (-counts[p], p))
        if it == iterations - 1:
            multi = multi[:max(0, n_pieces - len(chars))]
        total = sum(counts[p] for p in multi) + sum(counts[c] + 1 for c in chars)
        scores = {p: math.log(counts[p] / total) for p in multi} | {c: math.log((counts[c] + 1) / total) for c in chars}
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def build_t5_tokenizer(n_pieces: int = 500):
    """A ``T5TokenizerFast`` around a small Unigram model trained on a made-up corpus (deterministic).

    ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the pieces, then 100 ``<extra_id_*>`` sentinels, like T5.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _train_unigram(_t5_corpus(), n_pieces)
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer = T5TokenizerFast(tokenizer_object=backend, vocab=vocab, model_max_length=512, extra_ids=100)
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2), ids
    assert len(tokenizer) <= _T5_TINY_VOCAB, len(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _construct_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly on ``device`` in ``dtype`` (default device + default dtype, restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _finish(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode (like ``from_pretrained``), and everything floating in ``dtype`` on ``device``."""
    module.eval()
    tensors = [*module.parameters(), *module.buffers()]
    if device.type != "meta" and any(t.device != device or (t.is_floating_point() and t.dtype != dtype)
                                     for t in tensors):
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()   # silence "modules that should be kept in float32: []"
        try:
            module.to(device=device, dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    return module


def build_pipeline(model: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0):
    """A diffusers pipeline of ``model`` (``"sd15"``/``"sd3"``/``"flux"``/``"sdxl"``) with random weights, built
    offline.

    Returns ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` /
    ``StableDiffusionXLPipeline`` (``force_zeros_for_empty_prompt`` as SDXL base, no watermarker). Modules are constructed
    on ``device`` in ``dtype`` (``"meta"`` allocates nothing); the torch RNG is seeded with ``seed`` inside a forked
    RNG state, so builds are reproducible and the caller's RNG is left untouched.
    """
    import diffusers
    import transformers

    _check(model, size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = pipeline_configs(model, size)

    # tokenizers and schedulers: CPU objects, built outside the device/dtype context
    if model == "sd15":
        scheduler = diffusers.PNDMScheduler.from_config(cfg["scheduler"])
        tokenizers = {"tokenizer": build_clip_tokenizer(size)}
    elif model == "sdxl":
        scheduler = diffusers.EulerDiscreteScheduler.from_config(cfg["scheduler"])
        tokenizers = {"tokenizer": build_clip_tokenizer(size), "tokenizer_2": build_clip_tokenizer(size, pad_token="!")}
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
        t5_name = "tokenizer_3" if model == "sd3" else "tokenizer_2"
        tokenizers = {"tokenizer": build_clip_tokenizer(size), t5_name: build_t5_tokenizer()}
        if model == "sd3":
            tokenizers["tokenizer_2"] = build_clip_tokenizer(size, pad_token="!")

    def clip(name: str, projection: bool) -> torch.nn.Module:
        cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        return cls(transformers.CLIPTextConfig(**cfg[name]))

    def t5(name: str) -> torch.nn.Module:
        return transformers.T5EncoderModel(transformers.T5Config(**cfg[name]))

    fork_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type="cuda"):
        torch.manual_seed(seed)
        with _construct_on(device, dtype):
            vae = diffusers.AutoencoderKL(**cfg["vae"])
            if model == "sd15":
                modules = {"unet": diffusers.UNet2DConditionModel(**cfg["unet"]), "vae": vae,
                           "text_encoder": clip("text_encoder", False)}
            elif model == "sdxl":
                modules = {"unet": diffusers.UNet2DConditionModel(**cfg["unet"]), "vae": vae,
                           "text_encoder": clip("text_encoder", False), "text_encoder_2": clip("text_encoder_2", True)}
            elif model == "sd3":
                modules = {"transformer": diffusers.SD3Transformer2DModel(**cfg["transformer"]), "vae": vae,
                           "text_encoder": clip("text_encoder", True), "text_encoder_2": clip("text_encoder_2", True),
                           "text_encoder_3": t5("text_encoder_3")}
            else:
                modules = {"transformer": diffusers.FluxTransformer2DModel(**cfg["transformer"]), "vae": vae,
                           "text_encoder": clip("text_encoder", False), "text_encoder_2": t5("text_encoder_2")}
    modules = {name: _finish(m, device, dtype) for name, m in modules.items()}

    if model == "sd15":
        return diffusers.StableDiffusionPipeline(**modules, **tokenizers, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    if model == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**modules, **tokenizers, scheduler=scheduler,
                                                   force_zeros_for_empty_prompt=True, add_watermarker=False)
    if model == "sd3":
        return diffusers.StableDiffusion3Pipeline(**modules, **tokenizers, scheduler=scheduler)
    return diffusers.FluxPipeline(**modules, **tokenizers, scheduler=scheduler)


def save_random_pipeline(model: str, path: str | Path, size: str = "tiny", **kwargs) -> Path:
    """``build_pipeline(model, size, **kwargs)`` then ``save_pretrained(path)`` (safetensors); returns ``path``."""
    path = Path(path)
    pipe = build_pipeline(model, size, **kwargs)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def count_parameters(module: torch.nn.Module) -> int:
    """Number of (distinct) parameters of ``module``; works on the meta device."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------------------
# SD1.5 -> original LDM single file
# --------------------------------------------------------------------------------------------------------------

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_DIRECT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_DIRECT = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Diffusers ``UNet2DConditionModel`` keys -> LDM ``openaimodel.UNetModel`` keys (inverse of diffusers' map)."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("only an integer layers_per_block is supported")
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    if config.get("class_embed_type") is not None or config.get("addition_embed_type") is not None:
        raise ValueError("class/addition embeddings are not supported")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        if module in _UNET_DIRECT:
            new = f"{_UNET_DIRECT[module]}.{param}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.([a-z_0-9]+)", module):
            kind, b, j, sub = m[1], int(m[2]), int(m[3]), m[4]
            idx = (1 + b * (lpb + 1) + j) if kind == "down" else b * (lpb + 1) + j
            new = f"{'input' if kind == 'down' else 'output'}_blocks.{idx}.0.{_UNET_RESNET[sub]}.{param}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            kind, b, j, rest = m[1], int(m[2]), int(m[3]), m[4]
            idx = (1 + b * (lpb + 1) + j) if kind == "down" else b * (lpb + 1) + j
            new = f"{'input' if kind == 'down' else 'output'}_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            b = int(m[1])
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if up_has_attn[b] else 1}.conv.{param}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.([a-z_0-9]+)", module):
            new = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{param}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            raise ValueError(f"no LDM name for UNet parameter {key!r}")
        out[new] = value
    return out


def _vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` keys -> LDM ``AutoencoderKL`` keys (attention projections as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        part, _, rest = module.partition(".")
        if module in ("quant_conv", "post_quant_conv"):
            new = key
        elif part in ("encoder", "decoder") and rest in _VAE_DIRECT:
            new = f"{part}.{_VAE_DIRECT[rest]}.{param}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
            b = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            sub = "nin_shortcut" if m[4] == "conv_shortcut" else m[4]
            new = f"{part}.{m[1]}.{b}.block.{m[3]}.{sub}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            new = f"{part}.down.{m[1]}.downsample.conv.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            new = f"{part}.up.{n_up - 1 - int(m[1])}.upsample.conv.{param}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest):
            sub = "nin_shortcut" if m[2] == "conv_shortcut" else m[2]
            new = f"{part}.mid.block_{int(m[1]) + 1}.{sub}.{param}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", rest):
            new = f"{part}.mid.attn_1.{_VAE_ATTN[m[1]]}.{param}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no LDM name for VAE parameter {key!r}")
        out[new] = value
    return out


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """An SD1.5 pipeline's UNet + VAE + CLIP text encoder as one CompVis/LDM-format state dict (CPU tensors)."""
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"pipeline has no {name}: only SD1.5-style pipelines can be written as LDM files")
    text = pipe.text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in text):   # transformers >= 5.6 flattened CLIPTextModel
        text = {f"text_model.{k}": v for k, v in text.items()}
    parts = [("model.diffusion_model.", _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)),
             ("first_stage_model.", _vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)),
             ("cond_stage_model.transformer.", text)]
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for prefix, sd in parts for k, v in sd.items()}


def write_ldm_single_file(pipe, path: str | Path) -> Path:
    """Write an SD1.5 pipeline as one original-LDM checkpoint (``.safetensors``, or ``.ckpt``/``.pt`` via torch.save).

    Load it back with ``StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
    local_files_only=True)`` where ``folder`` is the pipeline's ``save_pretrained`` directory.
    """
    path = Path(path)
    state = ldm_state_dict(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


if __name__ == "__main__":     # ``python -m backends.testing.random_init``: the CLI is tools/random_pipeline.py
    from tools.random_pipeline import main

    raise SystemExit(main())
