"""Router golden values: plans, losses, thresholds, statistics and load of fixed-seed routing problems
(expert choice, token choice, diffmoe; training with and without a two-rank pool, every inference mode).

The values were recorded when the router was split into pieces, from a run checked equal (bit for bit,
gradients included) to the monolithic router it replaced. Each plan is summarised order-independently:
its dense combine matrix [T, E] (sum of the gates of a token's slots at each expert) and its slot counts,
both weighted by fixed random [T, E] weights."""

import pytest
import torch

from model.config import MoEConfig
from model.routing import InferenceRouting, LoadMeter, Router

D, E, T = 16, 4, 64


class TwoRankPool:
    """A pool of two 'ranks' in one process: the other rank's scores are a fixed function of ours."""

    world = 2

    def gather(self, scores_TE):
        return torch.cat([scores_TE, scores_TE.flip(0) * 0.9])

    def mean(self, t):
        return t * 0.75


def make_router(router: str, pool: bool = False) -> Router:
    cfg = MoEConfig(num_experts=E, router=router, group="tokens", group_size=32, inference_group_size=32,
                    global_pool=pool, top_k=2)
    torch.manual_seed(0)
    r = Router(D, cfg)
    r.init_weights()
    if r.predictor is not None:
        r.predictor.init_weights()
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    if pool:
        r.pool = TwoRankPool()
    return r.double()


def inputs(seed: int, B: int = 4, S: int = 16) -> torch.Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def digest(plan) -> tuple[float, float, float, float]:
    """(weighted combine matrix, weighted slot counts, aux loss, sum of all statistics)."""
    w_TE = torch.rand(plan.num_tokens, E, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    valid_EX = torch.ones_like(plan.idx_EX, dtype=torch.bool) if plan.valid_EX is None else plan.valid_EX
    e_EX = torch.arange(E).view(E, 1).expand_as(plan.idx_EX)
    combine_TE = torch.zeros(plan.num_tokens, E, dtype=torch.float64).index_put(
        (plan.idx_EX[valid_EX], e_EX[valid_EX]), plan.gate_EX[valid_EX].detach().double(), accumulate=True)
    count_TE = torch.zeros(plan.num_tokens, E, dtype=torch.float64).index_put(
        (plan.idx_EX[valid_EX], e_EX[valid_EX]), torch.ones(int(valid_EX.sum()), dtype=torch.float64),
        accumulate=True)
    stats = sum((float(v.double().sum()) for v in plan.stats.values()), 0.0)
    return float((combine_TE * w_TE).sum()), float((count_TE * w_TE).sum()), float(plan.aux_loss.detach()), stats


TRAIN = {  # per step: digest, threshold sum, threshold updates, input-gradient sum
    ('expert_choice', False): [
        (32.587422374245, 67.368549189077, 0.0, 273.556374725206, 0.368966418491, 1.0, -0.173190051455),
        (33.140452521264, 63.722258821873, 0.0, 273.475358281314, 0.366834144424, 2.0, 0.79842150833),
        (35.385248933985, 69.101643062004, 0.0, 0.0, 0.36613281466, 3.0, 0.303978344671),
        (32.872647100093, 67.09642799052, 0.0, 273.44248339951, 0.363412695326, 4.0, 0.44790510277),
    ],
    ('token_choice', False): [
        (31.737340707544, 58.029541385821, 0.01071754101, 249.568600661594, 0.0, 0.0, -0.711524553212),
        (33.203817163247, 63.224145504169, 0.010694757393, 257.4568445026, 0.0, 0.0, 1.743598103454),
        (35.128776431727, 62.999389398849, 0.010690623688, 0.0, 0.0, 0.0, -0.844661478853),
        (33.346877214533, 65.481019738149, 0.010880824835, 261.409386050513, 0.0, 0.0, 0.532027365852),
    ],
    ('diffmoe', False): [
        (33.308527452663, 66.512927375775, 0.73979961601, 275.201313565686, 2.13753691973, 1.0, 0.024473331682),
        (32.060705395352, 62.870422845002, 0.74505107948, 275.225626035553, 2.138925528488, 2.0, 1.152934910755),
        (31.412685628678, 64.093020581568, 0.676400079017, 0.0, 2.139271357527, 3.0, 0.45312884604),
        (31.787612282993, 64.530234059521, 0.721134083468, 275.161654065028, 2.138260204611, 4.0, 0.766304710029),
    ],
    ('diffmoe', True): [
        (33.364709312037, 67.694863153466, 0.735521836163, 327.170258702779, 1.999178587494, 1.0, 0.020084953112),
        (32.171050119228, 65.334784840057, 0.748494142503, 327.186698435473, 2.000692876075, 2.0, 0.729026130967),
        (31.529528979188, 66.208503335479, 0.68678768703, 0.0, 2.001175931717, 3.0, 0.266421425442),
        (32.004206909877, 66.612340284947, 0.718629422295, 323.124675571685, 2.000364875929, 4.0, -0.299625511819),
    ],
    ('expert_choice', True): [
        (32.867815383306, 68.532075685445, 0.0, 327.501624894668, 0.149967096337, 1.0, 0.071528912943),
        (33.327977980842, 65.846843283713, 0.0, 325.421058772415, 0.149636108828, 2.0, 0.508245526554),
        (35.477717453069, 70.004175338543, 0.0, 0.0, 0.149648564611, 3.0, -0.000662002183),
        (32.926144530064, 68.915596094707, 0.0, 327.388885430637, 0.149020819835, 4.0, 0.355601509605),
    ],
}

INFER = {  # (router, mode, group size, multiplier) -> per batch: digest, slots run, slots used, tokens
    ('expert_choice', 'tokens', None, None): [
        (32.587422374245, 67.368549189077, 0.0, 273.464133120584, 128.0, 128.0, 64.0),
        (17.298087901426, 32.007230404246, 0.0, 145.379287975037, 64.0, 64.0, 32.0),
    ],
    ('expert_choice', 'tokens', 16, None): [
        (32.266309720588, 66.928930481211, 0.0, 265.464133120584, 128.0, 128.0, 64.0),
        (17.195603835074, 32.745354829672, 0.0, 137.379287975037, 64.0, 64.0, 32.0),
    ],
    ('expert_choice', 'sample', None, None): [
        (32.266309720588, 66.928930481211, 0.0, 265.464133120584, 128.0, 128.0, 64.0),
        (17.195603835074, 32.745354829672, 0.0, 137.379287975037, 64.0, 64.0, 32.0),
    ],
    ('expert_choice', 'batch', None, None): [
        (32.845041103583, 67.504157508048, 0.0, 289.464133120584, 128.0, 128.0, 64.0),
        (17.298087901426, 32.007230404246, 0.0, 145.379287975037, 64.0, 64.0, 32.0),
    ],
    ('expert_choice', 'dynamic', None, None): [
        (32.41381948332, 59.721815043504, 0.0, 253.464133120584, 136.0, 112.0, 64.0),
        (16.967650210986, 26.001097684954, 0.0, 118.379287975037, 56.0, 52.0, 32.0),
    ],
    ('expert_choice', 'dynamic', None, 1.3): [
        (32.091851347274, 57.332955676091, 0.0, 244.464133120584, 132.0, 108.0, 64.0),
        (16.726106938884, 25.022052255353, 0.0, 111.629287975037, 56.0, 49.0, 32.0),
    ],
    ('token_choice', 'tokens', None, None): [
        (31.737340707544, 58.029541385821, 0.01071754101, 249.568600661594, 128.0, 116.0, 64.0),
        (17.452940918553, 31.826740817362, 0.0105293581, 137.452317333137, 64.0, 60.0, 32.0),
    ],
    ('token_choice', 'tokens', 16, None): [
        (31.376583339186, 58.059603160079, 0.011933161781, 237.585441282365, 128.0, 114.0, 64.0),
        (17.28715542761, 31.535457288011, 0.0105293581, 125.483567333137, 64.0, 58.0, 32.0),
    ],
    ('token_choice', 'sample', None, None): [
        (31.376583339186, 58.059603160079, 0.011933161781, 237.585441282365, 128.0, 114.0, 64.0),
        (17.28715542761, 31.535457288011, 0.0105293581, 125.483567333137, 64.0, 58.0, 32.0),
    ],
    ('token_choice', 'batch', None, None): [
        (32.097907744922, 60.700071357392, 0.010465476635, 271.544911097218, 128.0, 119.0, 64.0),
        (17.452940918553, 31.826740817362, 0.0105293581, 137.452317333137, 64.0, 60.0, 32.0),
    ],
    ('token_choice', 'dynamic', None, None): [
        (32.654764971852, 64.803178567816, 0.0, 289.464133120584, 164.0, 128.0, 64.0),
        (17.539122757777, 33.4399174198, 0.0, 145.379287975037, 72.0, 64.0, 32.0),
    ],
    ('token_choice', 'dynamic', None, 1.3): [
        (32.654764971852, 64.803178567816, 0.0, 289.464133120584, 164.0, 128.0, 64.0),
        (17.539122757777, 33.4399174198, 0.0, 145.379287975037, 72.0, 64.0, 32.0),
    ],
    ('diffmoe', 'tokens', None, None): [
        (33.308527452663, 66.512927375775, 0.0, 273.388067219743, 128.0, 128.0, 64.0),
        (16.007083111464, 30.591972865943, 0.0, 145.420515843207, 64.0, 64.0, 32.0),
    ],
    ('diffmoe', 'tokens', 16, None): [
        (33.045967750488, 66.26631015859, 0.0, 265.388067219743, 128.0, 128.0, 64.0),
        (16.002360647277, 30.653222435459, 0.0, 137.420515843207, 64.0, 64.0, 32.0),
    ],
    ('diffmoe', 'sample', None, None): [
        (33.045967750488, 66.26631015859, 0.0, 265.388067219743, 128.0, 128.0, 64.0),
        (16.002360647277, 30.653222435459, 0.0, 137.420515843207, 64.0, 64.0, 32.0),
    ],
    ('diffmoe', 'batch', None, None): [
        (33.340487530323, 66.255053976035, 0.0, 289.388067219743, 128.0, 128.0, 64.0),
        (16.007083111464, 30.591972865943, 0.0, 145.420515843207, 64.0, 64.0, 32.0),
    ],
    ('diffmoe', 'dynamic', None, None): [
        (18.71507780643, 71.787973604365, 0.0, 307.388067219743, 152.0, 136.0, 64.0),
        (9.050991157171, 38.039445042363, 0.0, 167.920515843207, 80.0, 74.0, 32.0),
    ],
    ('diffmoe', 'dynamic', None, 1.3): [
        (6.905489963373, 25.342330085444, 0.0, 100.388067219743, 68.0, 44.0, 64.0),
        (2.722287476108, 14.012402145593, 0.0, 62.170515843207, 48.0, 27.0, 32.0),
    ],
}


def run_training(router: str, pool: bool) -> list[tuple[float, ...]]:
    r = make_router(router, pool)
    out = []
    for step in range(4):
        x = inputs(step).requires_grad_()
        plan = r(x, collect_stats=step != 2)
        (plan.gate_EX.sum() + plan.aux_loss).backward()
        out.append((*digest(plan), float(r.threshold_E.sum()), float(r.threshold_updates), float(x.grad.sum())))
    return out


def run_inference(router: str, mode: str, size, mult) -> list[tuple[float, ...]]:
    r = make_router(router)
    with torch.no_grad():
        for step in range(3):  # thresholds
            r(inputs(10 + step))
        r.eval()
        meter = LoadMeter(1)
        routing = InferenceRouting(mode, size, mult, meter)
        out = []
        for seed, B in ((0, 4), (1, 2)):
            plan = r(inputs(seed, B), routing)
            meter.record(0, plan)
            run, used, tokens = meter.records[0][-1]
            out.append((*digest(plan), float(run), float(used), float(tokens)))
    return out


@pytest.mark.parametrize("router,pool", list(TRAIN))
def test_training_matches_the_golden_values(router, pool):
    torch.testing.assert_close(torch.tensor(run_training(router, pool)), torch.tensor(TRAIN[router, pool]),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(INFER))
def test_inference_matches_the_golden_values(case):
    torch.testing.assert_close(torch.tensor(run_inference(*case)), torch.tensor(INFER[case]), rtol=1e-9, atol=1e-9)


def test_default_inference_routing_is_the_config():
    r = make_router("expert_choice").eval()
    x = inputs(3)
    assert digest(r(x)) == digest(r(x, InferenceRouting("tokens", 32, 1.0)))
    r.cfg.inference_group = "sample"
    assert digest(r(x)) == digest(r(x, InferenceRouting("sample")))
    assert digest(r(x)) != digest(r(x, InferenceRouting("batch")))
