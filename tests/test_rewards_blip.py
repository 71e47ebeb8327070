"""PickScore and ImageReward heads on tiny random models saved to disk and read back through the real loading
paths (CPU, offline): scores against independent computations, key mapping, refusal of code pickles, and the
ImageReward preprocessing against torchvision."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.rewards import build_reward
from training.rewards import imagereward as ir
from training.rewards import pickscore as ps

# -- helpers ----------------------------------------------------------------------------------------------------


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Fixed images in [-1, 1] with smooth structure and some exact extremes."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    phase = torch.rand(b, c, 1, 1, generator=g) * 6
    x = torch.sin(3 * xx + 2 * yy + phase) * 0.9 + 0.2 * torch.randn(b, c, h, w, generator=g)
    return x.clamp(-1, 1)


def _pil_by_rounding(images: torch.Tensor) -> list:
    """Independent uint8 conversion (numpy rounding) to RGB PIL images."""
    from PIL import Image

    arr = np.rint((images.double().numpy().clip(-1, 1) + 1) / 2 * 255).astype(np.uint8)
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]


PROMPTS = ["a photo of a red cat", "a dog", "the blue sky over the old city, a very long prompt " * 3]


# -- PickScore ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from backends.testing.random_init import build_clip_tokenizer

    root = tmp_path_factory.mktemp("pickscore")
    tokenizer = build_clip_tokenizer("tiny")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="gelu")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                                 logit_scale_init_value=3.0)).eval()
    weights, processor = root / "PickScore_v1", root / "processor"
    model.save_pretrained(weights)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(processor)
    tokenizer.save_pretrained(processor)
    return weights, processor


def test_pickscore_matches_independent_clip_score(pick_dirs):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    weights, processor = pick_dirs
    head = build_reward("pickscore", weights_path=str(weights), processor_path=str(processor), device="cpu")
    assert head.name == "pickscore"
    images = _images((3, 3, 40, 48), seed=1)
    scores = head.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, head.score(images, PROMPTS))

    model = CLIPModel.from_pretrained(str(weights), local_files_only=True).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(str(processor))(
        images=_pil_by_rounding(images), return_tensors="pt")["pixel_values"]
    tokenizer = AutoTokenizer.from_pretrained(str(processor), local_files_only=True)
    expected = []
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):          # one pair at a time, as the authors do
            text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            img = model.get_image_features(pixel_values=pixels[i:i + 1]).pooler_output
            txt = model.get_text_features(**text).pooler_output
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            expected.append(model.logit_scale.exp() * (img * txt).sum(-1))
    expected = torch.cat(expected)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.normalise(torch.tensor([-1.0, 13.0, 30.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_pickscore_missing_folders_name_the_repos(pick_dirs, tmp_path):
    weights, _ = pick_dirs
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):
        ps.PickScoreHead(weights_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        ps.PickScoreHead(weights_path=weights)                       # no processor next to the weights
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        ps.PickScoreHead(weights_path=weights, processor_path=tmp_path / "nowhere")


def test_uint8_conversion_rounds():
    x = torch.tensor([-1.0, -0.999, 0.0, 1 / 255, 0.5, 1.0, 1.7]).view(1, 1, 1, 7)
    got = ps.images_to_uint8(x)[0, 0, :, 0]
    want = np.rint((x.clamp(-1, 1).double().numpy().ravel() + 1) / 2 * 255).astype(np.uint8)
    assert got.tolist() == want.tolist() == [0, 0, 128, 128, 191, 255, 255]


# -- ImageReward ---------------------------------------------------------------------------------------------------

TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, text_hidden=24,
            text_layers=2, text_heads=4, text_intermediate=40, max_positions=40)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "photo", "red", "blue", "cat",
         "dog", "sky", "over", "old", "city", "very", "long", "prompt", "##s", ",", "."]


def _tiny_model(seed: int = 0, **overrides) -> ir.ImageRewardModel:
    config = ir.ImageRewardConfig.from_overrides(dict(TINY, vocab_size=len(WORDS) + 2, **overrides))
    torch.manual_seed(seed)
    model = ir.ImageRewardModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.split(".")[-2]:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1 or "embed" in name or "token" in name:
                p.normal_(0, 0.3)
    return model


def _official_state(model: ir.ImageRewardModel) -> dict[str, torch.Tensor]:
    state = {ir.to_official_key(k): v.clone() for k, v in model.state_dict().items()}
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")) for k in state)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY["max_positions"])[None]
    state["blip.text_decoder.cls.predictions.bias"] = torch.zeros(3)
    state["blip.vision_proj.weight"] = torch.zeros(2, 2)
    return state


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    model = _tiny_model()
    torch.save(_official_state(model), root / "ImageReward.pt")
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return model, root / "ImageReward.pt", root / "bert"


def _ir_head(ir_files, **kw) -> ir.ImageRewardHead:
    _, weights, tokenizer = ir_files
    return build_reward("imagereward", weights_path=str(weights), tokenizer_path=str(tokenizer),
                        config=dict(TINY, vocab_size=len(WORDS) + 2), device="cpu", **kw)


def test_imagereward_scores_through_the_official_layout(ir_files):
    model = ir_files[0]
    head = _ir_head(ir_files)
    assert head.name == "imagereward"
    assert head.ignored_keys == ["blip.text_decoder.cls.predictions.bias",
                                 "blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight"]
    images = _images((3, 3, 40, 40), seed=2)
    scores = head.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, head.score(images, PROMPTS))
    assert scores.std() > 1e-4                                        # the inputs matter

    # the tokenizer: BLIP's [DEC] / [ENC] after the vocabulary, [CLS] first, 35 tokens
    assert head.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS), len(WORDS) + 1]
    ids, mask = head.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, 35)
    assert (ids[:, 0] == WORDS.index("[CLS]")).all() and mask[0].sum() == 8   # [CLS] a photo of a red cat [SEP]
    assert mask[2].all()                                              # truncated at 35

    # the same numbers from the in-memory model (independent of the file path)
    pixels = ir.imagereward_preprocess(images, 32)
    with torch.no_grad():
        reward = model(pixels, ids, mask).double()
    torch.testing.assert_close(scores, ((reward - ir.IMAGEREWARD_MEAN) / ir.IMAGEREWARD_STD).float())

    # padding does not leak: scoring one at a time gives the batch's numbers
    single = torch.cat([head.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(single, scores, rtol=1e-5, atol=1e-5)


def test_imagereward_offset_flag(ir_files):
    images = _images((2, 3, 32, 32), seed=3)
    plain, offset = _ir_head(ir_files), _ir_head(ir_files, authors_offset=True)
    a, b = plain.score(images, PROMPTS[:2]), offset.score(images, PROMPTS[:2])
    assert ir.AUTHORS_OFFSET == 3 * 1.0333394966054072 and abs(ir.AUTHORS_OFFSET - 3.1000) < 1e-4
    torch.testing.assert_close(b - a, torch.full((2,), ir.AUTHORS_OFFSET), rtol=0, atol=2e-6)
    torch.testing.assert_close(plain.normalise(a), offset.normalise(b), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.normalise(a), ((a.double() + ir.AUTHORS_OFFSET) / 10).clamp(0, 1).float())
    assert plain.normalise(torch.tensor([-5.0, 10.0])).tolist() == [0.0, 1.0]
    enc = _ir_head(ir_files, enc_token=True)
    assert (enc.tokenize(PROMPTS)[0][:, 0] == len(WORDS) + 1).all()
    assert not torch.allclose(enc.score(images, PROMPTS[:2]), a)


def test_imagereward_blocks_match_timm_and_transformers():
    """The vision tower equals timm's ViT and the text tower transformers' BERT (cross-attention, made
    bidirectional) with the same weights: the layouts are the ones of BLIP. (transformers' cross-attention
    takes keys of the text width, so here the image width equals the text width.)"""
    import timm
    from transformers import BertConfig, BertModel

    model = _tiny_model(seed=5, text_hidden=32)
    cfg = model.config
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width, depth=cfg.vision_layers,
        num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio, qkv_bias=True, num_classes=0,
        global_pool="").eval()
    missing, unexpected = vit.load_state_dict(model.visual_encoder.state_dict(), strict=False)
    assert not missing and not unexpected
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder(pixels), vit.forward_features(pixels), rtol=1e-5, atol=1e-5)

    bert_cfg = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                          num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                          max_position_embeddings=cfg.max_positions, is_decoder=True, add_cross_attention=True,
                          hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager")
    bert = BertModel(bert_cfg, add_pooling_layer=False).eval()
    bert.config.is_decoder = False                                   # bidirectional masks, like BLIP's encoder
    for layer in bert.encoder.layer:
        layer.attention.self.is_causal = False
    missing, unexpected = bert.load_state_dict(model.text_encoder.state_dict(), strict=False)
    assert set(missing) == {"embeddings.token_type_embeddings.weight"} and not unexpected
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()
        image = model.visual_encoder(pixels)
        ids = torch.tensor([[2, 5, 9, 8, 12, 3, 0, 0], [2, 13, 3, 0, 0, 0, 0, 0]])
        mask = (ids != 0).long()
        ones = torch.ones(image.shape[:2], dtype=torch.long)
        ours = model.text_encoder(ids, mask, image, ones)
        theirs = bert(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                      encoder_attention_mask=ones).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-5)


def test_imagereward_missing_key_and_shape_errors(ir_files, tmp_path):
    model = ir_files[0]
    state = _official_state(model)
    gone = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    del state[gone]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
        ir.load_official_weights(ir.ImageRewardModel(model.config), ir.load_imagereward_state_dict(tmp_path / "missing.pt"))
    state = _official_state(model)
    state["mlp.layers.7.weight"] = torch.zeros(1, 17)
    with pytest.raises(ValueError, match="mlp.layers.7.weight"):
        ir.load_official_weights(ir.ImageRewardModel(model.config), state)
    state = _official_state(model)
    state["blip.text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="pooler"):
        ir.load_official_weights(ir.ImageRewardModel(model.config), state)
    with pytest.raises(FileNotFoundError, match="THUDM/ImageReward"):
        ir.load_imagereward_state_dict(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        ir.load_blip_tokenizer(tmp_path / "absent")


class _Boom:
    """Unpickling this would run ``os.system``: weights_only must refuse before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_imagereward_refuses_code_pickles(tmp_path):
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="refusing"):
        ir.load_imagereward_state_dict(tmp_path / "module.pt")
    marker = tmp_path / "ran"
    torch.save({"mlp.layers.0.weight": torch.zeros(1), "x": _Boom(marker)}, tmp_path / "boom.pt")
    with pytest.raises(ValueError, match="refusing"):
        ir.load_imagereward_state_dict(tmp_path / "boom.pt")
    assert not marker.exists()


@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (1, 3, 48, 64), (1, 1, 50, 30), (1, 3, 224, 224),
                                   (1, 3, 512, 512)])
def test_imagereward_preprocess_matches_torchvision(shape):
    from torchvision import transforms as T

    images = _images(shape, seed=sum(shape))
    normalise = T.Normalize(ir.CLIP_MEAN, ir.CLIP_STD)
    crop = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      normalise])
    square = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), normalise])
    pils = _pil_by_rounding(images)
    got = ir.imagereward_preprocess(images)
    assert got.shape == (shape[0], 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack([crop(p) for p in pils]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ir.imagereward_preprocess(images, square_resize=True),
                               torch.stack([square(p) for p in pils]), rtol=0, atol=1e-6)


def test_config_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown ImageReward config keys: bogus"):
        ir.ImageRewardConfig.from_overrides({"bogus": 1})
    full = ir.ImageRewardConfig()
    assert (full.vision_width, full.vision_layers, full.text_hidden, full.vocab_size, full.max_length) == \
        (1024, 24, 768, 30524, 35)
