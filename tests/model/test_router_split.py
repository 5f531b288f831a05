"""The split router equals the monolithic one it replaced (tests/model/_old_routing.py) on fixed inputs."""

import copy

import pytest
import torch

from model.config import MoEConfig
from model.routing import InferenceRouting, LoadMeter, Router
from tests.model import _old_routing as old

D, E = 16, 4


class TwoRankPool:
    """A pool of two 'ranks' in one process: the other rank's scores are a fixed function of ours."""

    world = 2

    def gather(self, scores_TE):
        return torch.cat([scores_TE, scores_TE.flip(0) * 0.9])

    def mean(self, t):
        return t * 0.75


def _pair(router, seed=0, pool=False, **kw):
    cfg = MoEConfig(num_experts=E, router=router, group="tokens", group_size=32, inference_group_size=32,
                    global_pool=pool, **kw)
    torch.manual_seed(seed)
    new = Router(D, cfg)
    new.init_weights()
    if new.predictor is not None:
        new.predictor.init_weights()
    with torch.no_grad():
        new.weight.normal_(0, 1.0)
    ref = old.Router(D, cfg)
    ref.load_state_dict(new.state_dict())
    if pool:
        new.pool, ref.pool = TwoRankPool(), TwoRankPool()
    return new, ref


def _same_plan(a, b):
    torch.testing.assert_close(a.idx_EX, b.idx_EX, rtol=0, atol=0)
    torch.testing.assert_close(a.gate_EX, b.gate_EX, rtol=0, atol=0)
    assert (a.valid_EX is None) == (b.valid_EX is None)
    if a.valid_EX is not None:
        assert torch.equal(a.valid_EX, b.valid_EX)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=0)
    assert a.num_tokens == b.num_tokens
    assert list(a.stats) == list(b.stats)
    for k in a.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], rtol=0, atol=0, msg=k)


def _inputs(seed, B=4, S=16):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("router,pool", [("expert_choice", False), ("token_choice", False), ("diffmoe", False),
                                         ("diffmoe", True), ("expert_choice", True)])
def test_training_plans_thresholds_and_losses_match(router, pool):
    new, ref = _pair(router, pool=pool, top_k=2)
    new.double(), ref.double()
    for step in range(4):
        x = _inputs(step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        a, b = new(x, collect_stats=step != 2), ref(x_ref, collect_stats=step != 2)
        _same_plan(a, b)
        torch.testing.assert_close(new.threshold_E, ref.threshold_E, rtol=0, atol=0)
        assert float(new.threshold_updates) == float(ref.threshold_updates)
        (a.gate_EX.sum() + a.aux_loss).backward()
        (b.gate_EX.sum() + b.aux_loss).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for (n, p), (_, q) in zip(new.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "diffmoe"])
@pytest.mark.parametrize("mode,size,mult", [("tokens", None, None), ("tokens", 16, None), ("sample", None, None),
                                            ("batch", None, None), ("dynamic", None, None), ("dynamic", None, 1.3)])
def test_inference_plans_and_load_match(router, mode, size, mult):
    new, ref = _pair(router, top_k=2)
    new.double(), ref.double()
    with torch.no_grad():
        for step in range(3):  # thresholds
            new(_inputs(10 + step)), ref(_inputs(10 + step))
    new.eval(), ref.eval()
    meter = LoadMeter(1)
    ref.set_inference_group(mode, size, mult)
    ref.load_meter = []
    routing = InferenceRouting(mode, size, mult, meter)
    with torch.no_grad():
        for seed, B in ((0, 4), (1, 2)):
            a, b = new(_inputs(seed, B), routing), ref(_inputs(seed, B))
            _same_plan(a, b)
            meter.record(0, a)
    assert [(r, float(u), t) for r, u, t in meter.records[0]] == [(r, float(u), t) for r, u, t in ref.load_meter]


def test_default_inference_routing_is_the_config():
    new, ref = _pair("expert_choice", inference_group="sample")
    new.eval(), ref.eval()
    x = _inputs(3)
    _same_plan(new(x), ref(x))
    _same_plan(new(x, InferenceRouting("sample")), copy.deepcopy(ref)(x))
