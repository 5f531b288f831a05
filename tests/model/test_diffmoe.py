"""DiffMoE routing and dynamic inference: the capacity predictor learns, thresholds track the cut-off,
dynamic inference is batch-independent and takes about C tokens per expert per group."""

import pytest
import torch

from model.config import ConfigError, MoEConfig, get_preset
from model.routing import InferenceRouting, Router, expert_choice, global_expert_choice, group_cutoff, selected_plan

from tests.model.helpers import tiny_batch, tiny_model

D, E, FC = 32, 8, 2.0


def make_router(router="diffmoe", decay=0.9, seed=0, **kw) -> Router:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, router=router, capacity_factor=FC, group="batch", threshold_decay=decay, **kw)
    r = Router(D, cfg)
    r.init_weights()
    if r.predictor is not None:
        r.predictor.init_weights()
    with torch.no_grad():
        r.weight.normal_(0, 1.0)  # a fixed, well-spread routing problem
    r.weight.requires_grad_(False)
    return r


def test_capacity_predictor_learns_the_expert_choice_and_threshold_converges():
    r = make_router()
    x = torch.randn(1, 256, D, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(r.predictor.parameters(), lr=3e-3)
    accs = []
    for _ in range(300):
        plan = r(x)
        opt.zero_grad()
        plan.aux_loss.backward()
        opt.step()
        accs.append(float(plan.stats["predictor_acc"]))
    chance = FC / E  # a random top-C overlaps the true top-C in C/G of its picks
    assert accs[0] < chance + 0.2
    assert sum(accs[-10:]) / 10 > 0.85, accs[-10:]
    # The weight of the router never moved: the predictor sees a detached input.
    assert r.weight.grad is None
    # While the predictor moves the EMA lags behind; with it fixed the EMA converges to the cut-off.
    with torch.no_grad():
        cut = group_cutoff(r.predictor(x.reshape(-1, D)).sigmoid(), 1, r.cfg.capacity(256))
        before = (r.threshold_E - cut).abs().max()
        for _ in range(100):
            r(x)
    torch.testing.assert_close(r.threshold_E, cut, atol=1e-3 * float(before) + 1e-6, rtol=0)


@pytest.mark.parametrize("router", ["diffmoe", "expert_choice"])
def test_dynamic_takes_about_C_tokens_per_expert_at_neutral_multiplier(router):
    r = make_router(router, decay=0.95)
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(r.predictor.parameters(), lr=3e-3) if r.predictor is not None else None
    for _ in range(300):  # thresholds (and predictor) on batches from one token distribution
        plan = r(torch.randn(2, 128, D, generator=gen))
        if opt is not None:
            opt.zero_grad()
            plan.aux_loss.backward()
            opt.step()
    r.eval()
    G = 256
    C = r.cfg.capacity(G)
    taken = {}
    for mult in (0.8, 1.0, 1.25):
        dynamic = InferenceRouting("dynamic", multiplier=mult)
        counts = [r(torch.randn(2, 128, D, generator=gen), dynamic).stats["tokens_per_expert"].mean()
                  for _ in range(20)]
        taken[mult] = float(torch.stack(counts).mean())
    assert abs(taken[1.0] - C) < 0.15 * C, (taken, C)
    assert taken[0.8] > taken[1.0] > taken[1.25]  # the multiplier trades tokens (FLOPs) for quality


@pytest.mark.parametrize("name", ["tiny-diffmoe", "tiny-ec", "tiny-tc"])
def test_dynamic_inference_is_batch_independent(name):
    model, cfg = tiny_model(name)
    model.train()
    with torch.no_grad():
        for seed in range(3):  # learn thresholds (on other batches: no score sits exactly on a threshold)
            model(*tiny_batch(cfg, 4, seed=10 + seed))
    x, t, ctx, mask = tiny_batch(cfg, 4)
    model.eval()
    dynamic = InferenceRouting("dynamic")
    with torch.no_grad():
        full = model(x, t, ctx, mask, routing=dynamic).pred
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], mask[i:i + 1], routing=dynamic).pred
                           for i in range(4)])
        swapped = model(x.flip(0), t.flip(0), ctx.flip(0), mask.flip(0), routing=dynamic).pred.flip(0)
    torch.testing.assert_close(alone, full, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(swapped, full, atol=1e-10, rtol=1e-9)
    # Whereas the paper's group routing mixes the images of a batch.
    if cfg.moe.router != "token_choice":
        batch = InferenceRouting("batch")
        with torch.no_grad():
            full_b = model(x, t, ctx, mask, routing=batch).pred
            alone_b = torch.cat([model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], mask[i:i + 1], routing=batch).pred
                                 for i in range(4)])
        assert (alone_b - full_b).abs().max() > 1e-6


def test_dynamic_needs_trained_thresholds():
    model, cfg = tiny_model("tiny-ec")
    x, t, ctx, mask = tiny_batch(cfg, 2)
    model.eval()
    with pytest.raises(RuntimeError, match="thresholds"):
        model(x, t, ctx, mask, routing=InferenceRouting("dynamic"))


def test_selected_plan_pads_to_the_busiest_expert_with_zero_gates():
    select = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)  # [T=4, E=3]
    gate = torch.rand(4, 3)
    idx, g, valid = selected_plan(select, gate)
    assert idx.shape == (3, 3)  # expert 0 has 3 tokens
    assert valid.sum(1).tolist() == [3, 0, 2]
    for e in range(3):
        assert set(idx[e][valid[e]].tolist()) == set(select[:, e].nonzero().flatten().tolist())
        torch.testing.assert_close(g[e][valid[e]], gate[idx[e][valid[e]], e])
    assert (g[~valid] == 0).all()


def test_global_expert_choice_on_the_local_pool_is_expert_choice():
    probs = torch.randn(64, E).softmax(-1)
    C = 16
    idx, gate = expert_choice(probs, 1, C)
    gidx, ggate, valid, cut = global_expert_choice(probs, probs, C, slots=2 * C)
    assert valid.sum(1).tolist() == [C] * E
    for e in range(E):
        assert set(gidx[e][valid[e]].tolist()) == set(idx[e].tolist())
    torch.testing.assert_close(ggate.sum(1), gate.sum(1))


def test_diffmoe_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.moe.global_pool"):
        get_preset("tiny-ec", moe=dict(global_pool=True))  # group is "tokens"
    with pytest.raises(ConfigError, match="model.moe.inference_group"):
        get_preset("tiny-ec", moe=dict(inference_group="everything"))
    with pytest.raises(ConfigError, match="model.moe.group"):
        get_preset("tiny-ec", moe=dict(group="dynamic"))  # dynamic is inference only
    with pytest.raises(ConfigError, match="model.moe.threshold_decay"):
        get_preset("tiny-diffmoe", moe=dict(threshold_decay=1.0))
