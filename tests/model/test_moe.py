"""Routing and MoE layer: expert choice, token choice, identity with the dense FFN, gradients."""


import pytest
import torch
import torch.nn.functional as F

from model.config import MoEConfig
from model.layers import FeedForward
from model.moe import GroupedExperts, MoEFeedForward
from model.routing import expert_choice, load_balancing_loss, routing_groups, token_choice

D, HID = 16, 32


def make_moe(cfg: MoEConfig, dtype=torch.float64, seed=0, bias=True) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(D, HID, cfg, bias).to(dtype)
    for m in moe.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    with torch.no_grad():  # larger router weights: well separated affinities (no near-ties)
        moe.router.weight.normal_(0, 1.0)
        if bias:
            moe.experts.b1.normal_(0, 0.1)
            moe.experts.b2.normal_(0, 0.1)
    return moe


def rand_inputs(B, S, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g, dtype=dtype), torch.randn(B, S, D, generator=g, dtype=dtype)


# ---- identity with the dense FFN ----------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_identical_experts_with_full_capacity_equal_the_dense_ffn(router, bias):
    E = 4
    # C = G: expert choice with f_c = E, token choice with top_k = E and room for every token.
    cfg = MoEConfig(num_experts=E, router=router, capacity_factor=E, top_k=E, tc_capacity_factor=1.0,
                    aux_loss_weight=0.0, group="tokens", group_size=24)
    moe = make_moe(cfg, bias=bias)
    dense = FeedForward(D, HID, bias).double()
    dense.init_weights()
    with torch.no_grad():
        if bias:
            dense.fc1.bias.normal_(0, 0.1)
            dense.fc2.bias.normal_(0, 0.1)
        moe.experts.w1.copy_(dense.fc1.weight.T.expand(E, D, HID))
        moe.experts.w2.copy_(dense.fc2.weight.T.expand(E, HID, D))
        if bias:
            moe.experts.b1.copy_(dense.fc1.bias.expand(E, HID))
            moe.experts.b2.copy_(dense.fc2.bias.expand(E, D))
    h, r = rand_inputs(3, 8)
    out, plan = moe(h, r)
    assert plan.stats["experts_per_token_frac"][E] == 1.0  # every expert took every token
    torch.testing.assert_close(out, dense(h), rtol=1e-12, atol=1e-12)


def test_grouped_experts_equal_a_loop_over_experts():
    ex = GroupedExperts(3, D, HID).double()
    ex.init_weights()
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    looped = torch.stack([F.gelu(x[e] @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]
                          for e in range(3)])
    torch.testing.assert_close(ex(x), looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_mm_experts_equal_bmm_forward_and_backward(bias):
    torch.manual_seed(0)
    ref, ex = GroupedExperts(3, D, HID, bias), GroupedExperts(3, D, HID, bias, matmul="grouped_mm")
    ref.init_weights()
    ex.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, D, requires_grad=True)
    w_EXD = torch.randn(3, 5, D)  # a loss with a real gradient (the combine's gate product)
    outs, grads = [], []
    for m in (ref, ex):
        y = m(x)
        (y * w_EXD).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad for p in m.parameters()])
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_ex, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_ex, g_ref, rtol=1e-5, atol=1e-5)


def test_grouped_mm_experts_under_bf16_autocast_match_bmm():
    torch.manual_seed(0)
    ref, ex = GroupedExperts(2, D, HID), GroupedExperts(2, D, HID, matmul="grouped_mm")
    ref.init_weights()
    ex.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), ex(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_moe_layer_with_grouped_mm_equals_bmm():
    cfg = MoEConfig(num_experts=4, group_size=16)
    ref = make_moe(cfg, dtype=torch.float32)
    moe = make_moe(MoEConfig(num_experts=4, group_size=16, expert_matmul="grouped_mm"), dtype=torch.float32)
    h, r = rand_inputs(2, 8, dtype=torch.float32)
    torch.testing.assert_close(moe(h, r)[0], ref(h, r)[0], rtol=1e-5, atol=1e-6)


# ---- expert choice --------------------------------------------------------------------------------

def test_expert_choice_takes_exactly_C_tokens_per_group_with_affinity_gates():
    E, N, G = 4, 3, 16
    probs = torch.randn(N * G, E, dtype=torch.float64).mul(3).softmax(-1)
    C = 8  # = G * f_c / E with f_c = 2
    idx, gate = expert_choice(probs, N, C)
    assert idx.shape == gate.shape == (E, N * C)
    idx_ENC = idx.view(E, N, C)
    for e in range(E):
        for n in range(N):
            taken = idx_ENC[e, n]
            assert taken.unique().numel() == C  # exactly C distinct tokens ...
            assert ((taken >= n * G) & (taken < (n + 1) * G)).all()  # ... all from group n
            # ... and they are the expert's top-C of the group by affinity.
            group_aff = probs[n * G:(n + 1) * G, e]
            chosen = torch.zeros(G, dtype=torch.bool)
            chosen[taken - n * G] = True
            assert group_aff[chosen].min() > group_aff[~chosen].max()
    torch.testing.assert_close(gate, probs[idx, torch.arange(E)[:, None]])  # gate = affinity


def test_expert_choice_layer_has_no_aux_loss_and_balanced_load():
    cfg = MoEConfig(num_experts=4, capacity_factor=2.0, group="tokens", group_size=16)
    moe = make_moe(cfg)
    h, r = rand_inputs(4, 8)  # 32 tokens -> 2 groups of 16, C = 8
    _, plan = moe(h, r)
    assert plan.aux_loss.item() == 0.0
    assert plan.stats["tokens_per_expert"].tolist() == [16.0] * 4
    frac = plan.stats["experts_per_token_frac"]
    assert frac.sum().item() == pytest.approx(1.0)
    # On average f_c = 2 experts per token.
    assert (frac * torch.arange(5)).sum().item() == pytest.approx(2.0)
    assert plan.stats["expert_count"].sum().item() == 4 * 16


def test_changing_tokens_outside_a_group_leaves_the_group_unchanged():
    cfg = MoEConfig(num_experts=4, capacity_factor=2.0, group="tokens", group_size=16)
    moe = make_moe(cfg)
    h, r = rand_inputs(4, 8)  # tokens 0-15 = group 0 (images 0, 1), 16-31 = group 1 (images 2, 3)
    out, _ = moe(h, r)
    h2, r2 = h.clone(), r.clone()
    h2[2:] = torch.randn_like(h2[2:])
    r2[2:] = torch.randn_like(r2[2:])
    out2, _ = moe(h2, r2)
    assert torch.equal(out[:2], out2[:2])
    assert not torch.allclose(out[2:], out2[2:])
    # Within a group, other tokens do matter (expert choice is a group-level decision).
    h3, r3 = h.clone(), r.clone()
    r3[1] = torch.randn_like(r3[1]) * 5
    out3, _ = moe(h3, r3)
    assert not torch.allclose(out[0], out3[0])


@pytest.mark.parametrize("mode, expected", [("sample", (4, 8)), ("batch", (1, 32)), ("tokens", (2, 16))])
def test_routing_groups(mode, expected):
    assert routing_groups(4, 8, mode, 16) == expected


def test_routing_groups_reject_a_group_size_that_does_not_divide_the_batch():
    with pytest.raises(ValueError, match="group_size=24"):
        routing_groups(4, 8, "tokens", 24)
    assert routing_groups(1, 8, "tokens", 24) == (1, 8)  # a smaller batch is one group


def test_inference_group_is_used_in_eval_mode():
    cfg = MoEConfig(num_experts=4, group="tokens", group_size=32, inference_group="sample")
    moe = make_moe(cfg)
    h, r = rand_inputs(4, 8)
    assert moe.router.group_for(4, 8) == (1, 32)
    moe.eval()
    assert moe.router.group_for(4, 8) == (4, 8)
    _, plan = moe(h, r)
    assert plan.stats["capacity"].item() == 4  # 8 tokens * 2 / 4 experts


# ---- token choice ---------------------------------------------------------------------------------

def test_token_choice_respects_capacity_and_priority():
    E, G, k, cap = 4, 12, 2, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * G, E, generator=g, dtype=torch.float64)
    logits[:, 0] += 5.0  # everyone's first choice is expert 0: it overflows
    probs = logits.softmax(-1)
    idx, gate, valid, keep = token_choice(probs, 2, k, cap)
    assert idx.shape == (E, 2 * cap)
    valid_ENC = valid.view(E, 2, cap)
    assert (valid_ENC.sum(-1) <= cap).all()
    # Expert 0 keeps the first `cap` tokens of each group (first choices, token order), drops the rest.
    for n in range(2):
        assert idx.view(E, 2, cap)[0, n].tolist() == [n * G + i for i in range(cap)]
        assert keep.view(2, G, k)[n, :cap, 0].all() and not keep.view(2, G, k)[n, cap:, 0].any()
    # Kept slots carry the renormalised top-k probability; empty slots have zero gate.
    top_p, top_e = probs.topk(k, -1)
    norm = top_p / top_p.sum(-1, keepdim=True)
    for e in range(E):
        for s in range(2 * cap):
            if valid[e, s]:
                t = idx[e, s]
                j = (top_e[t] == e).nonzero().item()
                assert gate[e, s] == pytest.approx(norm[t, j].item())
            else:
                assert gate[e, s] == 0
    assert keep.sum() == valid.sum()


def test_token_choice_dropped_tokens_pass_through():
    E = 4
    cfg = MoEConfig(num_experts=E, router="token_choice", top_k=2, tc_capacity_factor=0.25,
                    group="tokens", group_size=16)  # capacity = ceil(0.25 * 2 * 16 / 4) = 2
    moe = make_moe(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0  # expert 0 first, expert 1 second (tiny logit edge) for all
        moe.router.weight[1, 0] = 25.0
    h, r = rand_inputs(2, 8)
    r[..., 0] = r[..., 0].abs() + 1.0
    out, plan = moe(h, r)
    kept = plan.stats["expert_count"].view(2, 8) > 0
    assert plan.stats["tokens_per_expert"].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert kept.sum() == 2  # tokens 0, 1 of the group got both experts; the others none
    assert (out[~kept] == 0).all()  # dropped: zero MoE output -> the block's residual passes unchanged
    assert (out[kept] != 0).all()
    assert plan.stats["drop_rate"].item() == pytest.approx(1 - 4 / 32)


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    # first choices: e0, e0, e1, e0 -> f = [3/4, 1/4]; mean probs P = [0.6, 0.4]
    # loss = E * sum_e f_e P_e = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert load_balancing_loss(probs, probs.argmax(-1), groups=1).item() == pytest.approx(1.1)
    # two groups of two tokens: (2*(1*0.65+0)) and (2*(0.5*0.55+0.5*0.45)) -> mean(1.3, 1.0) = 1.15
    assert load_balancing_loss(probs, probs.argmax(-1), groups=2).item() == pytest.approx(1.15)


def test_token_choice_layer_reports_weighted_aux_loss():
    cfg = MoEConfig(num_experts=2, router="token_choice", top_k=1, aux_loss_weight=0.5,
                    group="batch", group_size=4)
    moe = MoEFeedForward(2, 4, cfg).double()
    moe.experts.init_weights()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], dtype=torch.float64)
    r = probs.log().view(1, 4, 2)  # logits = log p -> softmax gives p back
    _, plan = moe(torch.randn(1, 4, 2, dtype=torch.float64), r)
    assert plan.aux_loss.item() == pytest.approx(0.5 * 1.1)


# ---- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_gradients_reach_the_router_through_the_gates(router):
    cfg = MoEConfig(num_experts=4, router=router, capacity_factor=2.0, top_k=2, group="tokens",
                    group_size=12, aux_loss_weight=0.0)
    moe = make_moe(cfg)
    h, r = rand_inputs(2, 6)
    weight = moe.router.weight.detach().clone().requires_grad_(True)

    def f(w):
        return torch.func.functional_call(moe, {"router.weight": w}, (h, r))[0]

    # Finite differences agree with autograd (the top-C selection is locally constant).
    assert torch.autograd.gradcheck(f, (weight,), eps=1e-6, atol=1e-6)
    out = f(weight)
    (g,) = torch.autograd.grad(out.square().sum(), weight)
    assert g.abs().sum() > 0


def test_routing_is_batched_not_looped_and_shapes_are_static():
    cfg = MoEConfig(num_experts=8, capacity_factor=2.0, group="tokens", group_size=32)
    moe = make_moe(cfg, dtype=torch.float32)
    for seed in range(3):
        h, r = rand_inputs(4, 16, torch.float32, seed=seed)  # 64 tokens: 2 groups, C = 8
        _, plan = moe(h, r)
        assert plan.idx_EX.shape == (8, 16) and plan.valid_EX is None


def test_routing_stats_under_a_float64_default_dtype():
    from model.routing import routing_stats

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        plan_EX = torch.tensor([[0, 1, 2], [2, 3, 3]])
        stats = routing_stats(plan_EX, torch.tensor([[True, True, True], [True, True, False]]),
                              torch.full((4, 2), 0.5), num_tokens=4)
    finally:
        torch.set_default_dtype(old)
    assert stats["tokens_per_expert"].tolist() == [3.0, 2.0]
    assert stats["expert_count"].tolist() == [1, 1, 2, 1]
    assert stats["experts_per_token_frac"].tolist() == [0.0, 0.75, 0.25]
