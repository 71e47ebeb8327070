"""HPS / CLIP-score / aesthetic reward heads on tiny random CLIPs (CPU, offline, no real weights).

The heads are loaded through their real loading paths (open_clip config + strict HPS checkpoint; transformers
``from_pretrained`` of a local folder; the aesthetic MLP state dict) and compared with references computed here
independently (torchvision transforms on PIL images, the models' own forward passes).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from training.rewards import clip_score, hps
from training.rewards.registry import MultiReward, available_rewards, build_reward

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TINY_NAME = "hps-test-tiny"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
PROMPTS = ["a red cube on a table", "a photo of a cat", "an astronaut riding a horse, oil painting"]


class NotATensor:
    """Pickled as a class instance: ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self):
        self.payload = 1


pytestmark = pytest.mark.usefixtures("no_network")


def reference_preprocess(array: np.ndarray, size: int = 224) -> torch.Tensor:
    """HPSv2 / OpenAI CLIP eval transform written with torchvision on a PIL image."""
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                           T.ToTensor(), T.Normalize(MEAN, STD)])
    return transform(Image.fromarray(array).convert("RGB"))


def level_images(height: int, width: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images ``[1, 3, H, W]`` whose values sit at ``k + 0.25`` or ``k + 0.75`` uint8 levels, with the expected
    rounded and truncated bytes ``[H, W, 3]``."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 255, size=(height, width, 3))
    frac = np.where(rng.random((height, width, 3)) < 0.5, 0.25, 0.75)
    x = torch.from_numpy((k + frac) / 127.5 - 1).float().permute(2, 0, 1)[None]
    return x, (k + (frac > 0.5)).astype(np.uint8), k.astype(np.uint8)


# -- preprocessing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(48, 64), (200, 300), (300, 200), (224, 227), (224, 224)])
def test_preprocess_matches_torchvision(height, width):
    x, rounded, truncated = level_images(height, width, seed=height + width)
    got_round = hps.images_to_uint8(x)[0]
    got_trunc = hps.images_to_uint8(x, truncate=True)[0]
    np.testing.assert_array_equal(got_round, rounded)
    np.testing.assert_array_equal(got_trunc, truncated)
    # rounding and truncation differ exactly at the +0.75 values, by one level
    assert ((got_round.astype(int) - got_trunc.astype(int)) == (rounded != truncated)).all()
    assert 0 < (rounded != truncated).mean() < 1
    for array, truncate in ((rounded, False), (truncated, True)):
        ours = hps.clip_preprocess(hps.images_to_uint8(x, truncate=truncate))
        ref = reference_preprocess(array)
        assert ours.shape == (1, 3, 224, 224)
        torch.testing.assert_close(ours[0], ref, rtol=0, atol=1e-6)


def test_crop_and_resize_geometry():
    assert hps.resized_size(48, 64, 224) == (224, 298)          # int(224 * 64 / 48) = 298
    assert hps.resized_size(300, 200, 224) == (336, 224)
    assert hps.center_crop_box(224, 227, 224) == (0, 2)         # round(1.5) = 2 (torchvision)
    assert hps.center_crop_box(224, 229, 224) == (0, 2)         # round(2.5) = 2: half to even


def test_uint8_clamps_and_grayscale():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5)
    assert hps.images_to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]      # 127.5 -> 128 (half even)
    assert hps.images_to_uint8(x, truncate=True)[0, 0, :, 0].tolist() == [0, 0, 127, 255, 255]
    gray = hps.clip_preprocess(hps.images_to_uint8(torch.zeros(2, 1, 32, 32)))
    assert gray.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError):
        hps.images_to_uint8(torch.zeros(1, 4, 8, 8))


# -- HPS ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """A tiny random open_clip CLIP saved as HPS checkpoints: ``(plain, module_prefixed, model)``."""
    import open_clip
    import open_clip.factory

    open_clip.factory._MODEL_CONFIGS[TINY_NAME] = dict(TINY_CFG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME, pretrained=None).eval()
    state = model.state_dict()
    root = tmp_path_factory.mktemp("hps")
    plain, prefixed = root / "HPS_v2.1_compressed.pt", root / "HPS_v2_compressed.pt"
    torch.save({"state_dict": state}, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, prefixed)
    return plain, prefixed, model


def hps_options(**extra):
    return dict(model_name=TINY_NAME, model_config=TINY_CFG, device="cpu", **extra)


def test_hps_scores(tiny_hps):
    import open_clip

    plain, prefixed, model = tiny_hps
    head = build_reward("hps", weights_path=str(plain), **hps_options(batch_size=2))
    assert head.name == "hps" and head.version == "v2.1"
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 48) * 2 - 1
    scores = head.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    torch.testing.assert_close(head.score(images, PROMPTS), scores, rtol=0, atol=0)
    torch.testing.assert_close(head.normalise(scores), scores.clamp(0, 1))
    # independent reference: torchvision preprocessing, the original model, open_clip tokens, cosine
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = torch.stack([reference_preprocess(a) for a in arrays])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(PROMPTS)), dim=-1)
    torch.testing.assert_close(scores, (img * txt).sum(-1), rtol=0, atol=1e-5)
    # the module.-prefixed checkpoint loads the same weights; hpsv2 is the same head with another file name
    other = build_reward("hpsv2", weights_path=prefixed, **hps_options())
    assert other.name == "hpsv2" and other.version == "v2"
    torch.testing.assert_close(other.score(images, PROMPTS), scores, rtol=0, atol=1e-6)
    truncated = build_reward("hpsv21", weights_path=plain, **hps_options(truncate=True))
    assert truncated.name == "hpsv21"
    assert torch.isfinite(truncated.score(images, PROMPTS)).all()


def test_hps_strict_loading(tiny_hps, tmp_path):
    plain, _, model = tiny_hps
    state = model.state_dict()
    missing = dict(state)
    missing.pop("visual.proj")
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    extra = dict(state, **{"extra.weight": torch.zeros(2)})
    torch.save({"state_dict": extra}, tmp_path / "extra.pt")
    shape = dict(state, **{"visual.proj": torch.zeros(64, 16)})
    torch.save(shape, tmp_path / "shape.pt")                       # a bare state dict is accepted too
    for name, needle in (("missing.pt", "visual.proj"), ("extra.pt", "extra.weight"), ("shape.pt", "visual.proj")):
        with pytest.raises(ValueError, match="does not match") as err:
            build_reward("hps", weights_path=tmp_path / name, **hps_options())
        assert needle in str(err.value) and name in str(err.value)


def test_hps_refuses_pickled_code_and_missing_files(tiny_hps, tmp_path):
    plain, _, model = tiny_hps
    torch.save({"state_dict": model.state_dict(), "extra": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="weights_only"):
        build_reward("hps", weights_path=tmp_path / "code.pt", **hps_options())
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt.*HPS_v2\.1_compressed\.pt.*huggingface\.co/xswu/HPSv2"):
        build_reward("hps", weights_path=tmp_path / "nowhere.pt", **hps_options())
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt"):
        build_reward("hpsv2", weights_path=tmp_path / "nowhere.pt", **hps_options())
    with pytest.raises(ValueError, match="HPS_v2.1_compressed.pt"):
        build_reward("hps", **hps_options())
    with pytest.raises(ValueError, match="different config"):
        build_reward("hps", weights_path=plain, model_name=TINY_NAME,
                     model_config=dict(TINY_CFG, embed_dim=16), device="cpu")


# -- CLIP score and aesthetic ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP (projection dim 32) saved with a tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from backends.testing.random_init import build_clip_tokenizer

    tokenizer = build_clip_tokenizer("tiny")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                       crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=list(MEAN), image_std=list(STD),
                       do_convert_rgb=True).save_pretrained(folder)
    clip_score.clear_cache()
    yield folder
    clip_score.clear_cache()


def reference_clip(folder, images: torch.Tensor, prompts: list[str]):
    """Normalised image and text embeddings from ``CLIPModel.forward`` on torchvision-preprocessed pixels."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = torch.stack([reference_preprocess(a) for a in arrays])
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    return out.image_embeds, out.text_embeds


def test_clip_score_head(tiny_clip_dir):
    head = build_reward("clip", weights_path=str(tiny_clip_dir), device="cpu", batch_size=2)
    assert head.name == "clip"
    assert (head.bundle.size, head.bundle.crop, head.bundle.resample) == (224, 224, 3)
    torch.manual_seed(2)
    images = torch.rand(3, 3, 200, 300) * 2 - 1
    prompts = list(PROMPTS)
    prompts[2] = " ".join(["a very long prompt about a red cube"] * 30)     # > 77 tokens: truncated
    scores = head.score(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    torch.testing.assert_close(head.score(images, prompts), scores, rtol=0, atol=0)
    img, txt = reference_clip(tiny_clip_dir, images, prompts)
    torch.testing.assert_close(scores, (img * txt).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(head.normalise(torch.tensor([-0.2, 0.3, 1.5])), torch.tensor([0.0, 0.3, 1.0]))


def test_aesthetic_head(tiny_clip_dir, tmp_path):
    torch.manual_seed(3)
    mlp = clip_score.AestheticMLP(32)
    state = mlp.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(state, tmp_path / "plain.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    head = build_reward("aesthetic", weights_path=tmp_path / "plain.pth", clip_path=tiny_clip_dir, device="cpu",
                        batch_size=2)
    assert head.name == "aesthetic" and not head.mlp.training
    torch.manual_seed(4)
    images = torch.rand(3, 3, 48, 64) * 2 - 1
    scores = head.score(images, PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(head.score(images, PROMPTS), scores, rtol=0, atol=0)
    img, _ = reference_clip(tiny_clip_dir, images, PROMPTS)
    with torch.no_grad():
        expected = mlp.eval()(img)[:, 0]
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(head.normalise(torch.tensor([5.5, -1.0, 12.0])), torch.tensor([0.55, 0.0, 1.0]))
    prefixed = build_reward("aesthetic", weights_path=tmp_path / "prefixed.pth", clip_path=tiny_clip_dir,
                            device="cpu", batch_size=2)
    torch.testing.assert_close(prefixed.score(images, PROMPTS), scores, rtol=0, atol=0)
    # the shared CLIP copy: one model for both heads in a multi-reward
    multi = MultiReward({"clip": 1.0, "aesthetic": 1.0},
                        options={"clip": {"weights_path": tiny_clip_dir, "device": "cpu"},
                                 "aesthetic": {"weights_path": tmp_path / "plain.pth", "clip_path": tiny_clip_dir,
                                               "device": "cpu"}})
    assert multi.heads["clip"].bundle is multi.heads["aesthetic"].bundle
    result = multi(images, PROMPTS)
    torch.testing.assert_close(result.raw["aesthetic"], scores, rtol=0, atol=1e-6)
    # a 768-input predictor does not fit a CLIP with projection dim 32
    torch.save(clip_score.AestheticMLP(768).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="input size 32"):
        build_reward("aesthetic", weights_path=tmp_path / "wide.pth", clip_path=tiny_clip_dir, device="cpu")
    torch.save({"layers.0.weight": torch.zeros(1), "head.scale": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="head.scale"):
        build_reward("aesthetic", weights_path=tmp_path / "odd.pth", clip_path=tiny_clip_dir, device="cpu")


def test_clip_heads_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*clip-vit-large-patch14"):
        build_reward("clip", weights_path=tmp_path / "nowhere", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        build_reward("aesthetic", weights_path=tmp_path / "nowhere.pth", clip_path=tmp_path, device="cpu")


def test_registered():
    assert {"hps", "hpsv2", "hpsv21", "clip", "aesthetic"} <= set(available_rewards())
