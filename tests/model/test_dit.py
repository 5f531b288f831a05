"""The DiT network: construction, initialisation, conditioning, masking, batch independence."""

import pytest
import torch

from model.attention import SelfAttention
from model.config import get_preset
from model.dit import DiT, TextCond, build_model
from model.flow import random_keep_indices
from model.layers import patchify, unpatchify
from model.routing import InferenceRouting

from tests.model.helpers import tiny_batch, tiny_model


def test_meta_build_then_init_is_deterministic_and_finite():
    cfg = get_preset("tiny-ec")
    with torch.device("meta"):
        m = DiT(cfg)
    assert all(p.is_meta for p in m.parameters())
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.isfinite(va).all(), k
        assert torch.equal(va, vb), k
    assert not torch.equal(a.blocks[1].ffn.experts.w1, build_model(cfg, seed=4).blocks[1].ffn.experts.w1)


def test_adaln_zero_init_makes_every_block_the_identity():
    cfg = get_preset("tiny-ec")
    model = build_model(cfg, seed=0).double()
    x, t, ctx, mask = tiny_batch(cfg, 2)
    h = torch.randn(2, cfg.num_tokens, cfg.dim, dtype=torch.float64)
    c = model.t_embed(t)
    text = TextCond(ctx, mask, None, model.null_text)
    for blk in model.blocks:
        out, _ = blk(h, c, text)
        assert torch.equal(out, h)
    assert (model(x, t, ctx, mask).pred == 0).all()  # zero final layer


@pytest.mark.parametrize("name", ["tiny-ec", "tiny-tc", "tiny-dense"])
def test_per_sample_groups_make_each_image_independent_of_the_batch(name):
    over = {} if name == "tiny-dense" else dict(moe=dict(group="sample", inference_group="sample"))
    model, cfg = tiny_model(name, **over)
    x, t, ctx, mask = tiny_batch(cfg, 4)
    for training in (True, False):
        model.train(training)
        keep = random_keep_indices(4, cfg.num_tokens, cfg.kept_tokens) if training else None
        full = model(x, t, ctx, mask, keep_idx_BK=keep).pred
        alone = model(x[:1], t[:1], ctx[:1], mask[:1], keep_idx_BK=None if keep is None else keep[:1]).pred
        torch.testing.assert_close(alone, full[:1], rtol=1e-10, atol=1e-10)


def test_token_groups_spanning_images_do_depend_on_the_batch():
    model, cfg = tiny_model("tiny-ec", moe=dict(inference_group="tokens", inference_group_size=64))
    model.eval()  # 16 tokens per image: a group of 64 holds 4 images
    x, t, ctx, mask = tiny_batch(cfg, 4)
    full = model(x, t, ctx, mask).pred
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    assert not torch.allclose(model(x2, t, ctx, mask).pred[:1], full[:1])
    sample = InferenceRouting("sample")
    torch.testing.assert_close(model(x2, t, ctx, mask, routing=sample).pred[:1],
                               model(x, t, ctx, mask, routing=sample).pred[:1])


def test_text_padding_and_null_text():
    model, cfg = tiny_model("tiny-ec", moe=dict(inference_group="sample"))
    model.eval()
    x, t, ctx, mask = tiny_batch(cfg, 3)
    out = model(x, t, ctx, mask).pred
    ctx2 = ctx.clone()
    ctx2[~mask] = 123.0  # masked (padding) positions are ignored
    torch.testing.assert_close(model(x, t, ctx2, mask).pred, out)
    drop = torch.tensor([True, False, True])
    a = model(x, t, ctx, mask, text_drop_B=drop).pred
    b = model(x, t, torch.randn_like(ctx), mask, text_drop_B=drop).pred  # dropped text: any ctx
    torch.testing.assert_close(a[drop], b[drop])
    torch.testing.assert_close(a[~drop], out[~drop])
    assert not torch.allclose(a[drop], out[drop])


def test_keeping_every_token_equals_the_unmasked_forward():
    model, cfg = tiny_model("tiny-ec", moe=dict(group="sample"))
    x, t, ctx, mask = tiny_batch(cfg, 2)
    keep = torch.arange(cfg.num_tokens).expand(2, -1)
    masked = model(x, t, ctx, mask, keep_idx_BK=keep).pred  # [B, S, p*p*C]
    full = model(x, t, ctx, mask).pred  # [B, C, H, W]
    torch.testing.assert_close(masked, patchify(full, cfg.patch_size))
    torch.testing.assert_close(unpatchify(masked, cfg.patch_size, cfg.in_channels, cfg.grid), full)


def test_gqa_self_attention_matches_repeated_kv_reference():
    torch.manual_seed(0)
    attn = SelfAttention(32, heads=4, kv_heads=2, qk_norm=False).double()
    attn.init_weights()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q = attn.q(x).view(2, 5, 4, 8).transpose(1, 2)
    k, v = attn.kv(x).view(2, 5, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # KV head j serves q heads 2j, 2j+1
    ref = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1) @ v
    ref = attn.out(ref.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref)


def test_moe_stats_are_reported_per_moe_layer():
    model, cfg = tiny_model("tiny-tc")
    x, t, ctx, mask = tiny_batch(cfg, 4)
    out = model(x, t, ctx, mask)
    assert len(out.moe_stats) == cfg.num_moe_blocks == 2
    assert out.aux_loss.item() > 0
    for s in out.moe_stats:
        assert s["expert_count"].shape == (4 * cfg.num_tokens,)
        assert 0 <= s["drop_rate"].item() < 1


@pytest.mark.parametrize("name", ["tiny-ec", "tiny-tc"])
def test_bf16_autocast_matches_fp32_and_trains(name):
    from model.flow import FlowConfig, flow_loss
    model, cfg = tiny_model(name, dtype=torch.float32, moe=dict(group="sample"))
    x, _, ctx, mask = tiny_batch(cfg, 4, dtype=torch.float32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = flow_loss(model, x, ctx, mask, FlowConfig(), generator=gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow_loss(model, x, ctx, mask, FlowConfig(), generator=gen())
    assert out["out"].pred.dtype == torch.bfloat16
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=0.05)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    router = model.blocks[1].ffn.router.weight
    assert router.grad.dtype == torch.float32 and router.grad.abs().sum() > 0


def test_training_prediction_is_not_a_view():
    """FSDP2 hooks the root module's outputs for backward; an in-place op on a view output would drop the hook."""
    from model.config import get_preset
    from model.dit import build_model
    model = build_model(get_preset("tiny-ec"), seed=0)
    keep_BK = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 8, 32), keep_idx_BK=keep_BK)
    assert out.pred.shape == (2, 8, 16) and out.pred._base is None
