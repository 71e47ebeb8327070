"""MPS reward head on a tiny random network saved to disk and read back through the real factory (CPU, offline).

Checks: scores through ``build_reward("mps")`` against the in-memory network and against an independent
re-implementation of the whole forward (plain tensor ops, explicit loops); the state-dict key names of the MPS
module tree; strict loading; refusal of pickled models; the condition mask; causality of the self-attention block.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.rewards import MultiReward, build_reward
from training.rewards import mps

TINY = {"clip": {"projection_dim": 32, "logit_scale_init_value": 2.0,
                 "text_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "max_position_embeddings": 77},
                 "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "image_size": 32, "patch_size": 8}},
        "cross": {"dim": 32, "layer_num": 2, "heads": 2, "dim_head": 16, "ff_mult": 2}}
PROMPTS = ["a photo of a red cat", "a dog", "the blue sky over the old city, a very long prompt " * 4]
CROSS_KEYS = {"0.fn.norm.gamma", "0.fn.norm.beta", "0.fn.to_q.weight", "0.fn.to_kv.weight", "0.fn.to_out.weight",
              "0.fn.ff.0.weight", "0.fn.ff.2.weight", "1.fn.norm.gamma", "1.fn.norm.beta", "1.fn.rotary_emb.inv_freq",
              "1.fn.fused_attn_ff_proj.weight", "1.fn.attn_out.weight", "1.fn.ff_out.1.weight"}


pytestmark = pytest.mark.usefixtures("no_network")


def tiny_config(tokenizer) -> dict:
    config = {"clip": dict(TINY["clip"]), "cross": dict(TINY["cross"])}
    config["clip"]["text_config"] = dict(TINY["clip"]["text_config"], vocab_size=len(tokenizer),
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
    return config


def randomise(net: mps.MPSNetwork, seed: int) -> mps.MPSNetwork:
    """Non-trivial layer-norm scales and logit scale (the defaults are ones / a constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("norm.gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
        net.model.logit_scale.fill_(2.3)
    return net.eval()


@pytest.fixture(scope="module")
def mps_files(tmp_path_factory):
    """``(root, net, config)``: a tiny random MPS network saved as ``root/MPS_overall_state_dict.pt`` and a tiny
    CLIP tokenizer + image processor in ``root/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the manifest's default places)."""
    from transformers import CLIPImageProcessor

    from backends.testing.random_init import build_clip_tokenizer

    root = tmp_path_factory.mktemp("mps")
    tokenizer = build_clip_tokenizer("tiny")
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    net = randomise(mps.build_mps_network(config), seed=1)
    torch.save(net.state_dict(), root / "MPS_overall_state_dict.pt")
    processor = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(processor)
    tokenizer.save_pretrained(processor)
    return root, net, config


def images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    x = torch.sin(3 * xx + 2 * yy + torch.rand(b, c, 1, 1, generator=g) * 6) * 0.9
    return (x + 0.2 * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)


# -- independent reference (plain tensor ops, loops) ----------------------------------------------------------------

def ref_layer_norm(x, gamma):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * gamma


def ref_swiglu_ff(x, w_in, w_out):
    h = x @ w_in.T
    half = h.shape[-1] // 2
    return (h[..., :half] * (h[..., half:] * torch.sigmoid(h[..., half:]))) @ w_out.T


def ref_cross_attention(x, ctx, keep, p, heads, dim_head):
    """Residual cross-attention layer; ``keep [B, T]`` bool: context tokens visible to every query."""
    xn = ref_layer_norm(x, p["norm.gamma"])
    k = ctx @ p["to_kv.weight"][:dim_head].T
    v = ctx @ p["to_kv.weight"][dim_head:].T
    outs = []
    for h in range(heads):
        q = xn @ p["to_q.weight"][h * dim_head:(h + 1) * dim_head].T / math.sqrt(dim_head)
        rows = []
        for b in range(x.shape[0]):
            logits = q[b] @ k[b, keep[b]].T                                    # only the visible tokens
            rows.append(torch.softmax(logits, dim=-1) @ v[b, keep[b]])
        outs.append(torch.stack(rows))
    attn = torch.cat(outs, dim=-1) @ p["to_out.weight"].T
    return attn + ref_swiglu_ff(xn, p["ff.0.weight"], p["ff.2.weight"]) + x


def ref_rotary(t, positions_count, dim_head):
    """Rotate pairs (k, k + d/2) as complex numbers by angle ``pos / 10000^(2k/d)``."""
    half = dim_head // 2
    freqs = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) * 2 / dim_head)
    angle = torch.arange(positions_count, dtype=torch.float64)[:, None] * freqs[None]
    z = torch.complex(t[..., :half].double(), t[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def ref_parallel_block(x, p, heads, dim_head, causal=True):
    n = x.shape[1]
    xn = ref_layer_norm(x, p["norm.gamma"])
    proj = xn @ p["fused_attn_ff_proj.weight"].T
    inner = heads * dim_head
    q_all, k, v, ff = (proj[..., :inner], proj[..., inner:inner + dim_head],
                       proj[..., inner + dim_head:inner + 2 * dim_head], proj[..., inner + 2 * dim_head:])
    k = ref_rotary(k, n, dim_head)
    outs = []
    for h in range(heads):
        q = ref_rotary(q_all[..., h * dim_head:(h + 1) * dim_head], n, dim_head) / math.sqrt(dim_head)
        out = torch.zeros(x.shape[0], n, dim_head, dtype=x.dtype)
        for i in range(n):
            stop = i + 1 if causal else n                                      # keys 0..i
            weights = torch.softmax(q[:, i:i + 1] @ k[:, :stop].transpose(1, 2), dim=-1)
            out[:, i] = (weights @ v[:, :stop])[:, 0]
        outs.append(out)
    attn = torch.cat(outs, dim=-1) @ p["attn_out.weight"].T
    half = ff.shape[-1] // 2
    ff_act = ff[..., :half] * F.silu(ff[..., half:])
    return attn + ff_act @ p["ff_out.1.weight"].T + x


def ref_keep(text_tokens, cond_tokens, threshold, per_prompt=True):
    """Visible prompt tokens ``[B, T]`` (bool), from explicit loops."""
    b_count, t_count = text_tokens.shape[:2]
    s = torch.zeros(b_count, t_count, dtype=torch.float64)
    for b in range(b_count):
        for i in range(t_count):
            s[b, i] = max(float(text_tokens[b, i].double() @ c.double()) for c in cond_tokens[0])
    top = s.max(dim=1, keepdim=True).values if per_prompt else s.max()
    return (s / top) > threshold


def ref_scores(net, config, pixels, ids, cond_ids, threshold):
    """The whole MPS score from module weights and independent glue."""
    cross = config["cross"]
    heads, dim_head = cross["heads"], cross["dim_head"]
    clip = net.model
    with torch.no_grad():
        text_hidden = clip.text_model(input_ids=ids).last_hidden_state
        cond_hidden = clip.text_model(input_ids=cond_ids).last_hidden_state
        text_tokens = text_hidden @ clip.text_projection.weight.T
        cond_tokens = cond_hidden @ clip.text_projection.weight.T
        eos_pos = [int((row == config["clip"]["text_config"]["eos_token_id"]).nonzero()[0]) for row in ids]
        text_eos = torch.stack([text_tokens[b, p] for b, p in enumerate(eos_pos)])
        vision = clip.vision_model(pixel_values=pixels).last_hidden_state   # before post_layernorm
        x = vision @ clip.visual_projection.weight.T
        keep = ref_keep(text_tokens, cond_tokens, threshold)
        sd = net.state_dict()
        for layer in range(cross["layer_num"]):
            prefix = f"cross_model.layers.{layer}."
            p0 = {k[len(prefix) + 5:]: v for k, v in sd.items() if k.startswith(prefix + "0.fn.")}
            p1 = {k[len(prefix) + 5:]: v for k, v in sd.items() if k.startswith(prefix + "1.fn.")}
            x = ref_cross_attention(x, text_tokens, keep, p0, heads, dim_head)
            x = ref_parallel_block(x, p1, heads, dim_head)
        feature = x[:, 0]
        cos = (text_eos * feature).sum(-1) / (text_eos.norm(dim=-1) * feature.norm(dim=-1))
        return clip.logit_scale.exp() * cos, keep


# -- tests -----------------------------------------------------------------------------------------------------------

def test_factory_scores_tiny_checkpoint(mps_files):
    """(1) the saved state dict loads through build_reward("mps") (weights + processor from the manifest root);
    finite deterministic scores that match the in-memory network, independent of the chunk size."""
    from transformers import CLIPImageProcessorPil
    from transformers import AutoTokenizer

    root, net, config = mps_files
    head = build_reward("mps", root=root, device="cpu", config=config, batch_size=2)
    assert head.name == "mps" and not head.network.training
    assert not any(p.requires_grad for p in head.network.parameters())
    x = images((3, 3, 40, 48), seed=2)
    scores = head.score(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, head.score(x, PROMPTS))
    assert float(scores.std()) > 1e-3                                       # the images / prompts matter
    one = build_reward("mps", root=root, device="cpu", config=config, batch_size=1)
    torch.testing.assert_close(one.score(x, PROMPTS), scores, rtol=0, atol=1e-5)

    processor = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    arr = np.rint((x.double().numpy() + 1) / 2 * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    from PIL import Image
    pixels = CLIPImageProcessorPil.from_pretrained(str(processor))(
        images=[Image.fromarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    tokenizer = AutoTokenizer.from_pretrained(str(processor), local_files_only=True)
    enc = lambda t: tokenizer(t, padding="max_length", truncation=True, max_length=77, return_tensors="pt")  # noqa: E731
    ids, cond = enc(PROMPTS)["input_ids"], enc([mps.MPS_CONDITION])["input_ids"]
    assert ids.shape == (3, 77) and cond.shape == (1, 77)
    with torch.no_grad():
        text_eos, feature = net(ids, pixels, cond, threshold=0.3)
    expected = mps.mps_score(text_eos, feature, net.logit_scale)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # through the registry mix: normalise = clamp(s / 26, 0, 1)
    result = MultiReward({"mps": 1.0}, options={"mps": {"root": root, "device": "cpu", "config": config}})(x, PROMPTS)
    torch.testing.assert_close(result.raw["mps"], scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.reward, (scores / 26).clamp(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(head.normalise(torch.tensor([-3.0, 13.0, 40.0])), torch.tensor([0.0, 0.5, 1.0]))
    # the threshold is an option: the public code's 0.01 keeps more prompt tokens and changes the scores
    loose = build_reward("mps", root=root, device="cpu", config=config, threshold=0.01)
    assert loose.threshold == 0.01 and head.threshold == mps.MPS_THRESHOLD == 0.3
    assert not torch.allclose(loose.score(x, PROMPTS), scores, atol=1e-4)


def test_score_equals_independent_reimplementation(mps_files):
    """(7) score = exp(logit_scale) * cos(text EOS, cross-model position 0), recomputed with plain tensor ops
    (explicit per-head / per-position loops, complex-number rotary, loop-built mask) from the module weights."""
    root, net, config = mps_files
    head = build_reward("mps", root=root, device="cpu", config=config)
    x = images((2, 3, 36, 36), seed=5)
    prompts = PROMPTS[:2]
    pixels, ids, cond = head.pixels(x), head.tokenize(prompts), head.tokenize([mps.MPS_CONDITION])
    expected, keep = ref_scores(net, config, pixels, ids, cond, threshold=0.3)
    assert 0 < int(keep.sum()) < keep.numel()                               # the mask hides some tokens, not all
    torch.testing.assert_close(head.score(x, prompts), expected.float(), rtol=1e-4, atol=1e-4)


def test_state_dict_keys_follow_the_mps_module_tree(mps_files):
    """(2) key names and shapes of the original module tree; no non-persistent buffers in the state dict."""
    _, net, config = mps_files
    keys = set(net.state_dict())
    for key in ("model.logit_scale", "model.text_projection.weight", "model.visual_projection.weight",
                "model.text_model.embeddings.token_embedding.weight", "model.text_model.final_layer_norm.weight",
                "model.vision_model.embeddings.class_embedding", "model.vision_model.post_layernorm.weight",
                "cross_model.layers.0.0.fn.norm.gamma", "cross_model.layers.0.0.fn.norm.beta",
                "cross_model.layers.0.0.fn.to_kv.weight", "cross_model.layers.1.0.fn.ff.2.weight",
                "cross_model.layers.1.1.fn.rotary_emb.inv_freq", "cross_model.layers.1.1.fn.ff_out.1.weight"):
        assert key in keys, key
    cross = {k for k in keys if k.startswith("cross_model.")}
    assert cross == {f"cross_model.layers.{i}.{k}" for i in range(2) for k in CROSS_KEYS}
    assert {k for k in keys if not k.startswith(("model.", "cross_model."))} == set()
    assert not any("position_ids" in k or "pos_emb" in k or k.endswith(".mask") for k in keys)
    # full size, built on the meta device: ViT-H-14 + the 4-layer cross model of dim 1024
    full = mps.build_mps_network(device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in full.items()}
    assert shapes["model.vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    assert shapes["model.vision_model.embeddings.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert shapes["model.text_model.embeddings.position_embedding.weight"] == (77, 1024)
    assert shapes["model.visual_projection.weight"] == (1024, 1280)
    assert shapes["model.text_projection.weight"] == (1024, 1024)
    assert shapes["cross_model.layers.3.0.fn.to_q.weight"] == (16 * 64, 1024)
    assert shapes["cross_model.layers.3.0.fn.to_kv.weight"] == (2 * 64, 1024)
    assert shapes["cross_model.layers.3.0.fn.ff.0.weight"] == (2 * 4 * 1024, 1024)
    assert shapes["cross_model.layers.3.0.fn.ff.2.weight"] == (1024, 4 * 1024)
    assert shapes["cross_model.layers.3.1.fn.fused_attn_ff_proj.weight"] == (16 * 64 + 2 * 64 + 2 * 4 * 1024, 1024)
    assert shapes["cross_model.layers.3.1.fn.rotary_emb.inv_freq"] == (32,)
    assert not any(k.startswith("cross_model.layers.4.") for k in full)
    assert sum(1 for k in full if "vision_model.encoder.layers." in k and k.endswith("fc1.weight")) == 32
    assert sum(1 for k in full if "text_model.encoder.layers." in k and k.endswith("fc1.weight")) == 24
    inv = net.state_dict()["cross_model.layers.0.1.fn.rotary_emb.inv_freq"]
    torch.testing.assert_close(inv, 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))


def test_strict_loading(mps_files, tmp_path):
    """(3) a renamed and a missing key, or a wrong shape, fail with the keys listed; stray position_ids of older
    transformers are accepted."""
    root, net, config = mps_files
    processor = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    state = net.state_dict()
    bad = dict(state)
    bad["cross_model.layers.0.0.fn.q.weight"] = bad.pop("cross_model.layers.0.0.fn.to_q.weight")
    del bad["model.logit_scale"]
    torch.save(bad, tmp_path / "renamed.pt")
    with pytest.raises(mps.MPSStateDictError) as info:
        build_reward("mps", weights_path=tmp_path / "renamed.pt", processor_path=processor, device="cpu",
                     config=config)
    msg = str(info.value)
    assert "2 missing keys" in msg and "cross_model.layers.0.0.fn.to_q.weight" in msg and "model.logit_scale" in msg
    assert "1 unexpected keys: cross_model.layers.0.0.fn.q.weight" in msg and "strict" in msg
    wide = dict(state, **{"cross_model.layers.1.1.fn.attn_out.weight": torch.zeros(32, 64)})
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(mps.MPSStateDictError, match=r"1 shape mismatches: cross_model\.layers\.1\.1\.fn\.attn_out"):
        build_reward("mps", weights_path=tmp_path / "wide.pt", processor_path=processor, device="cpu", config=config)
    # the tiny file against the default ViT-H network: a size mismatch, not a silent load
    with pytest.raises(mps.MPSStateDictError, match=r"[1-9][0-9]* shape mismatches"):
        build_reward("mps", root=root, device="cpu")
    # older transformers saved position_ids buffers: accepted and dropped
    old = dict(state, **{"model.text_model.embeddings.position_ids": torch.arange(77)[None],
                         "model.vision_model.embeddings.position_ids": torch.arange(17)[None]})
    torch.save({"state_dict": old}, tmp_path / "old.pt")
    head = build_reward("mps", weights_path=tmp_path / "old.pt", processor_path=processor, device="cpu",
                        config=config)
    ref = build_reward("mps", root=root, device="cpu", config=config)
    x = images((2, 3, 32, 32), seed=7)
    assert torch.equal(head.score(x, PROMPTS[:2]), ref.score(x, PROMPTS[:2]))
    ids = head.network.model.text_model.embeddings.position_ids
    assert not ids.is_meta and ids.tolist() == [list(range(77))]


def test_pickled_model_is_refused(mps_files, tmp_path):
    """(4) a whole pickled nn.Module (what the authors publish) is refused before anything is built."""
    root, net, config = mps_files
    pickled = tmp_path / "MPS_overall_checkpoint.pth"
    torch.save(net, pickled)
    with pytest.raises(mps.PickledModelError, match="weights_only=False") as info:
        build_reward("mps", weights_path=pickled, processor_path=root / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                     device="cpu", config=config)
    msg, found = str(info.value), torch.serialization.get_unsafe_globals_in_checkpoint(str(pickled))
    assert "training.rewards.mps.MPSNetwork" in found and "it pickles" in msg and "state_dict" in msg
    assert any(name in msg for name in found)                                # (names listed in set order)


def test_condition_mask_against_loops():
    """(5a) the mask: max over condition tokens, divided by the prompt's (or the batch's) maximum, kept iff
    above the threshold; repeated over the image tokens."""
    g = torch.Generator().manual_seed(11)
    text = torch.randn(3, 9, 8, generator=g)
    text[1] *= 0.2                                                           # a prompt with small similarities
    cond = torch.randn(1, 5, 8, generator=g)
    for threshold in (0.3, 0.01, 0.6):
        for norm, per_prompt in (("prompt", True), ("batch", False)):
            mask = mps.condition_mask(text, cond, threshold, num_queries=4, mask_norm=norm)
            keep = ref_keep(text, cond, threshold, per_prompt)
            assert mask.shape == (3, 4, 9)
            assert set(mask.unique().tolist()) <= {0.0, -math.inf}
            for q in range(4):
                assert torch.equal(mask[:, q] == 0, keep)
    per_prompt = mps.condition_mask(text, cond, 0.3, mask_norm="prompt")
    batch = mps.condition_mask(text, cond, 0.3, mask_norm="batch")
    assert ((per_prompt[:, 0] == 0).sum(-1) >= 1).all()                     # each prompt keeps its best token
    assert int((batch[1, 0] == 0).sum()) < int((per_prompt[1, 0] == 0).sum())   # the batch max hides the small one
    with pytest.raises(ValueError, match="mask_norm"):
        mps.condition_mask(text, cond, 0.3, mask_norm="global")


def test_masked_context_tokens_are_ignored():
    """(5b) perturbing prompt tokens hidden by the mask changes nothing in the cross model's output; perturbing a
    visible one does."""
    torch.manual_seed(3)
    model = mps.CrossModel(dim=32, layer_num=2, dim_head=16, heads=2, ff_mult=2).eval()
    queries, context = torch.randn(2, 6, 32), torch.randn(2, 10, 32)
    hidden = torch.zeros(2, 10, dtype=torch.bool)
    hidden[0, [1, 4, 5, 9]] = True
    hidden[1, [0, 2, 3]] = True
    mask = torch.zeros(2, 6, 10).masked_fill(hidden[:, None], -math.inf)
    with torch.no_grad():
        base = model(queries, context, mask)
        moved = context + 5 * torch.randn(2, 10, 32) * hidden[..., None]
        assert torch.equal(model(queries, moved, mask), base)
        visible = context.clone()
        visible[0, 2] += 1.0
        assert (model(queries, visible, mask)[0] - base[0]).abs().max() > 1e-3
        # the same layer with the hidden tokens dropped from the context altogether
        layer = model.layers[0][0]
        for b in range(2):
            keep = ~hidden[b]
            full = layer(queries[b:b + 1], context[b:b + 1], mask[b:b + 1])
            dropped = layer(queries[b:b + 1], context[b:b + 1, keep], None)
            torch.testing.assert_close(full, dropped, rtol=1e-6, atol=1e-6)


def test_self_attention_block_is_causal():
    """(6) in the parallel block, perturbing token 5 leaves tokens 0..4 unchanged (and changes 5..); without the
    causal mask token 0 changes. Consequence: the cross model's position 0 ignores the other image tokens."""
    torch.manual_seed(4)
    block = mps.ParallelTransformerBlock(dim=32, dim_head=16, heads=2, ff_mult=2).eval()
    x = torch.randn(2, 8, 32)
    y = x.clone()
    y[:, 5] += torch.randn(2, 32)
    with torch.no_grad():
        out_x, out_y = block(x), block(y)
        assert torch.equal(out_x[:, :5], out_y[:, :5])
        assert (out_x[:, 5:] - out_y[:, 5:]).abs().amax(dim=(0, 2)).min() > 1e-4
        open_block = mps.ParallelTransformerBlock(dim=32, dim_head=16, heads=2, ff_mult=2, causal=False)
        open_block.load_state_dict(block.state_dict())
        assert (open_block(x)[:, 0] - open_block(y)[:, 0]).abs().max() > 1e-4
        # the block against the loop reference (rotary as complex rotation), causal and not
        params = {k: v for k, v in block.state_dict().items()}
        torch.testing.assert_close(block(x) + x, ref_parallel_block(x, params, 2, 16), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(open_block(x) + x, ref_parallel_block(x, params, 2, 16, causal=False),
                                   rtol=1e-5, atol=1e-5)
        cross = mps.CrossModel(dim=32, layer_num=2, dim_head=16, heads=2, ff_mult=2).eval()
        queries, context = torch.randn(1, 7, 32), torch.randn(1, 5, 32)
        other = queries.clone()
        other[:, 1:] = torch.randn(1, 6, 32)
        assert torch.equal(cross(queries, context, None)[:, 0], cross(other, context, None)[:, 0])


def test_missing_files_and_options(mps_files, tmp_path):
    root, _, config = mps_files
    with pytest.raises(FileNotFoundError, match="MPS_overall_state_dict.pt"):
        build_reward("mps", root=tmp_path / "empty")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "preprocessor_config.json").write_text("{}")    # no tokenizer
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        build_reward("mps", weights_path=root / "MPS_overall_state_dict.pt", processor_path=tmp_path / "proc",
                     config=config, device="cpu")
    with pytest.raises(ValueError, match="cross-model dim"):
        mps.build_mps_network({"cross": {"dim": 64}}, device="meta")
    with pytest.raises(ValueError, match="mask_norm"):
        build_reward("mps", root=root, config=config, device="cpu", mask_norm="global")
