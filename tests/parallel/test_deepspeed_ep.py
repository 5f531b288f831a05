"""DeepSpeed ZeRO-2 with expert parallelism equals one process; it resumes bit-exactly; its EMA is the
hand-computed one and loads for inference; the same for ZeRO-3's EMA of each rank's partitions; a
non-finite micro-batch makes exactly one skipped step.

Every run goes through the trainer's engine interface (train/backends.py DeepSpeedBackend, whose
micro-step is parallel/deepspeed.py micro_step). Reference (in the test process, no DeepSpeed): torch
AdamW on the same initial weights; each step's loss is the mean of the ranks' flow losses (per-rank
batches and noise generators), with the same clipping. EP = 2 on 2 processes (each rank its own experts)
and on 4 (each expert on two expert-data-parallel replicas).
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tests.parallel.helpers import run_workers

pytestmark = pytest.mark.distributed

EP, STEPS, MICRO, LR, CLIP, DECAY = 2, 4, 2, 1e-2, 1.0, 0.7
EPS = 0.1  # Adam's eps: the update depends on the gradient's scale (see test_deepspeed.py)
# float32. Measured (2 and 4 processes, both dispatchers): losses and gradient norms within 1.2e-7
# relative, weights within 3e-8 absolute.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)
NORM_RTOL = 1e-6
WEIGHT_TOL = dict(rtol=1e-6, atol=1e-7)
SKIP = ("threshold_E", "threshold_updates")  # routers' EMA statistics of observed cut-offs, not weights


def _model():
    from tests.model.helpers import tiny_model
    # Per-sample routing groups: a rank's routing does not depend on the other ranks' images.
    return tiny_model("tiny-ec", seed=0, dtype=torch.float32, moe=dict(group="sample"))


def _batch(cfg, rank, step, micro=0):
    from tests.model.helpers import tiny_batch
    seed = 1000 * step + 100 * micro + rank
    x, _, ctx, mask = tiny_batch(cfg, MICRO, seed=seed, dtype=torch.float32)
    return x, ctx, mask, torch.Generator().manual_seed(7 + seed)


def _reference(world, steps, decay=DECAY):
    """(losses, 1-process gradient norms, weights after every step, EMA after every step)."""
    from model.flow import FlowConfig, flow_loss
    model, cfg = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, norms, weights, emas = [], [], [], []
    for step in range(steps):
        loss = 0.0
        for r in range(world):
            x, ctx, mask, g = _batch(cfg, r, step)
            loss = loss + flow_loss(model, x, ctx, mask, FlowConfig(), generator=g)["loss"] / world
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            ema[n].lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        weights.append(_weights(model.state_dict()))
        emas.append({n: t.clone() for n, t in ema.items()})
    return losses, norms, weights, emas


def _weights(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if not k.endswith(SKIP)}


def _backend(model, root, dispatcher="alltoall", ema=True, grad_accum=1, stage=2):
    """The trainer's DeepSpeed engine on `model`, expert-parallel (EP) under ZeRO-2 with several ranks."""
    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()),
                      WORLD_SIZE=str(dist.get_world_size()))  # what DeepSpeed's launcher would set
    from parallel.deepspeed import apply_expert_parallel_zero, ds_config
    from parallel.mesh import ParallelConfig, build_mesh
    from parallel.parallelize import make_dispatcher_factory
    from train.backends import DeepSpeedBackend, lr_schedule
    world = dist.get_world_size()
    if world > 1 and stage == 2:
        pcfg = ParallelConfig(ep=EP, fsdp=False, engine="deepspeed").resolved(world, model.cfg.moe.num_experts)
        apply_expert_parallel_zero(model, build_mesh(pcfg, world)["ep"],
                                   make_dispatcher=make_dispatcher_factory(dispatcher))
    conf = ds_config(stage, micro_batch=MICRO, grad_accum=grad_accum, lr=LR, eps=EPS, grad_clip=CLIP)
    sched = _Constant()
    return DeepSpeedBackend(model, conf, Path(root), keep_last=10, schedule=lambda opt: lr_schedule(opt, sched, 100),
                            ema=ema)


class _Constant:
    warmup_steps, min_lr_ratio, schedule = 0, 1.0, "constant"


def _step(backend, cfg, rank, step, micro=0, poison=False):
    """One micro-batch through the trainer's path; (the mean loss over the ranks, whether it was finite)."""
    from model.flow import FlowConfig, flow_loss
    x, ctx, mask, g = _batch(cfg, rank, step, micro)
    if poison:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    loss = flow_loss(backend.net, x, ctx, mask, FlowConfig(), generator=g)["loss"]
    finite = backend.micro_step(loss, 1)
    out = loss.detach().clone()
    dist.all_reduce(out)
    return out.item() / dist.get_world_size(), bool(finite)


def _local_state(backend) -> dict:
    """This rank's weights (its experts only) and EMA, and its expert-parallel rank: rank % EP, as the
    layout of parallel/mesh.py (ep innermost) has it."""
    from parallel.deepspeed import expert_params
    experts = set(expert_params(backend.engine.module))
    ep_rank = dist.get_rank() % EP if experts else 0
    return {"weights": _weights(backend.engine.module.state_dict()), "experts": sorted(experts),
            "ep_rank": ep_rank, "ema": {n: t.clone() for n, t in (backend.ema or {}).items()}}


def _parity_worker(rank, world, tmp, dispatcher, resume):
    model, cfg = _model()
    backend = _backend(model, f"{tmp}/ckpt", dispatcher)
    losses, norms, states = [], [], []
    for step in range(STEPS if resume else 3):
        losses.append(_step(backend, cfg, rank, step)[0])
        norms.append(float(backend.clip_grads()))
        backend.apply(DECAY)
        states.append(_local_state(backend))
        if resume and step + 1 == 2:
            backend.save(2, {}, {"model_resolved": _model_dict(cfg)})
    torch.save({"losses": losses, "norms": norms, "states": states}, f"{tmp}/run{rank}.pt")
    if not resume:
        return
    # A fresh engine on other weights (every rank's experts among them) resumes from step 2.
    model, cfg = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backend = _backend(model, f"{tmp}/ckpt2", dispatcher)
    backend.load(Path(f"{tmp}/ckpt/step_00000002"))
    resumed = [_local_state(backend)]
    r_losses = []
    for step in range(2, STEPS):
        r_losses.append(_step(backend, cfg, rank, step)[0])
        backend.apply(DECAY)
        resumed.append(_local_state(backend))
    torch.save({"losses": r_losses, "states": resumed}, f"{tmp}/resumed{rank}.pt")


def _model_dict(cfg):
    from model.config import config_to_dict
    return config_to_dict(cfg)


def _check_against_reference(local: dict, ref: dict, ep: int, tol: dict, what: str):
    """A rank's weights equal the reference: dense ones whole, experts as the rank's slice."""
    for k, v in ref.items():
        if k in local["experts"]:
            n = v.shape[0] // ep
            v = v[local["ep_rank"] * n:(local["ep_rank"] + 1) * n]
        torch.testing.assert_close(local[what][k] if what == "ema" else local["weights"][k], v, **tol,
                                   msg=lambda m: f"{k}: {m}")


def _run_parity(tmp_path, world, dispatcher, resume=False):
    run_workers(_parity_worker, world, tmp_path, str(tmp_path), dispatcher, resume)
    ref_losses, ref_norms, ref_weights, ref_emas = _reference(world, STEPS)
    runs = [torch.load(tmp_path / f"run{r}.pt", weights_only=True) for r in range(world)]
    n = len(runs[0]["losses"])
    torch.testing.assert_close(torch.tensor(runs[0]["losses"], dtype=torch.float64),
                               torch.tensor(ref_losses[:n], dtype=torch.float64), **LOSS_TOL)
    # The global gradient norm DeepSpeed clips with is the one-process norm (dense and expert parts).
    assert runs[0]["norms"] == pytest.approx(ref_norms[:n], rel=NORM_RTOL)
    assert ref_norms[0] > CLIP  # clipping is active
    for r, run in enumerate(runs):
        state = run["states"][2]  # after 3 steps
        assert state["experts"], "no expert parameters declared to DeepSpeed"
        assert state["weights"][state["experts"][0]].shape[0] == _model()[1].moe.num_experts // EP
        _check_against_reference(state, ref_weights[2], EP, WEIGHT_TOL, "weights")
        _check_against_reference(state, ref_emas[2], EP, WEIGHT_TOL, "ema")
        for k, v in state["weights"].items():  # replicas identical: dense on all ranks, experts per ep rank
            twin = runs[r % EP if k in state["experts"] else 0]["states"][2]["weights"][k]
            assert torch.equal(v, twin), f"rank {r}: {k} differs from its replica"
    return runs, ref_weights, ref_emas


@pytest.mark.parametrize("world", [2, 4])
def test_zero2_ep2_matches_single_process(tmp_path, world):
    _run_parity(tmp_path, world, "alltoall")


def test_zero2_ep2_megatron_dispatcher_matches_single_process(tmp_path):
    _run_parity(tmp_path, 2, "megatron_alltoall")


def test_zero2_ep2_resumes_exactly_with_ema_and_loads_for_inference(tmp_path):
    runs, ref_weights, ref_emas = _run_parity(tmp_path, 2, "alltoall", resume=True)
    for r in range(2):
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        run = runs[r]
        assert resumed["losses"] == run["losses"][2:], f"rank {r}: resumed losses differ"
        for i, state in enumerate(resumed["states"]):  # at load (step 2), after steps 3 and 4
            for what in ("weights", "ema"):
                for k, v in state[what].items():
                    assert torch.equal(v, run["states"][i + 1][what][k]), f"rank {r} step {i + 2} {what} {k}"
    # The EMA after N steps is the hand-computed one (every step applied, as in the reference).
    for r in range(2):
        _check_against_reference(runs[r]["states"][3], ref_emas[3], EP, WEIGHT_TOL, "ema")

    from train.inference_model import load_model
    step2 = tmp_path / "ckpt" / "step_00000002"
    ema_model, _, _, used = load_model(step2, weights="ema", log=lambda m: None)
    raw_model, _, _, used_raw = load_model(step2, weights="raw", log=lambda m: None)
    assert (used, used_raw) == ("ema", "raw")
    full = {what: _assemble([runs[r]["states"][1] for r in range(2)], what) for what in ("weights", "ema")}
    ema_sd, raw_sd = _weights(ema_model.state_dict()), _weights(raw_model.state_dict())
    assert set(ema_sd) == set(full["weights"])
    for k in full["ema"]:
        assert torch.equal(ema_sd[k], full["ema"][k]), k
        assert torch.equal(raw_sd[k], full["weights"][k]), k
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in full["ema"])


def _assemble(states: list[dict], what: str) -> dict:
    """The unsharded tensors of the ranks' `_local_state`s (experts concatenated in ep-rank order)."""
    out = {}
    for k, v in states[0][what].items():
        out[k] = torch.cat([s[what][k] for s in states]) if k in states[0]["experts"] else v
    return out


def _nan_worker(rank, world, tmp, stages):
    import deepspeed
    for stage in stages:
        model, cfg = _model()
        backend = _backend(model, f"{tmp}/ckpt", ema=False, grad_accum=2, stage=stage)
        engine = backend.engine
        out = []
        for step in range(3):
            finite = [_step(backend, cfg, rank, step, micro, poison=(step, micro) == (1, 0))[1] for micro in range(2)]
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
                weights = _weights(engine.module.state_dict())
            out.append({"finite": finite, "global_steps": engine.global_steps, "skipped": engine.skipped_steps,
                        "lr_steps": engine.lr_scheduler.last_epoch, "weights": weights})
        torch.save(out, f"{tmp}/nan{stage}.pt")


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan")
    run_workers(_nan_worker, 1, tmp, str(tmp), (2, 3))
    return tmp


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_micro_batch_skips_exactly_one_step(nan_runs, stage):
    """grad_accum=2, a NaN in step 2's first micro-batch: 3 trainer steps are 3 DeepSpeed steps, the second
    skipped (no update, no LR step); step 3 equals a reference that trains on steps 1 and 3 only."""
    out = torch.load(nan_runs / f"nan{stage}.pt", weights_only=True)
    assert [o["finite"] for o in out] == [[True, True], [False, True], [True, True]]
    assert [o["global_steps"] for o in out] == [1, 2, 3]
    assert [o["skipped"] for o in out] == [0, 1, 1]
    assert [o["lr_steps"] for o in out] == [1, 1, 2]
    for k, v in out[0]["weights"].items():
        assert torch.equal(out[1]["weights"][k], v), f"the skipped step changed {k}"

    from model.flow import FlowConfig, flow_loss
    model, cfg = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    for step in (0, 2):
        loss = sum(flow_loss(model, *_batch(cfg, 0, step, m)[:3], FlowConfig(), generator=_batch(cfg, 0, step, m)[3])
                   ["loss"] for m in range(2)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    for k, v in _weights(model.state_dict()).items():
        torch.testing.assert_close(out[2]["weights"][k], v, **WEIGHT_TOL, msg=lambda m: f"{k}: {m}")


def _full_fp32(backend) -> dict:
    """The full fp32 master weights of a ZeRO-3 engine (gathered from every rank's partition)."""
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).clone() for n, p in backend.engine.module.named_parameters()}


def _zero3_state(backend, hand: dict) -> dict:
    from parallel.deepspeed import partition_layout
    params = dict(backend.engine.module.named_parameters())
    return {"weights": _full_fp32(backend), "hand_ema": {n: t.clone() for n, t in hand.items()},
            "ema": {n: t.clone() for n, t in backend.ema.items()},
            "layout": {n: partition_layout(params[n]) for n in backend.ema}}


def _zero3_ema_worker(rank, world, tmp):
    """ZeRO-3 with an EMA, 4 steps (saved after 2); the EMA hand-computed from the gathered fp32 weights
    after every step; then a fresh engine on other weights resumes from step 2 and trains steps 3 and 4."""
    model, cfg = _model()
    backend = _backend(model, f"{tmp}/ckpt", stage=3)
    hand = _full_fp32(backend)
    losses, states = [], [_zero3_state(backend, hand)]
    for step in range(STEPS):
        losses.append(_step(backend, cfg, rank, step)[0])
        backend.apply(DECAY)
        for n, w in _full_fp32(backend).items():
            hand[n].lerp_(w, 1 - DECAY)
        states.append(_zero3_state(backend, hand))
        if step + 1 == 2:
            backend.save(2, {}, {"model_resolved": _model_dict(cfg)})
    torch.save({"losses": losses, "states": states}, f"{tmp}/zero3_run{rank}.pt")
    model, cfg = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backend = _backend(model, f"{tmp}/ckpt2", stage=3)
    backend.load(Path(f"{tmp}/ckpt/step_00000002"))
    resumed, r_losses = [{n: t.clone() for n, t in backend.ema.items()}], []
    for step in range(2, STEPS):
        r_losses.append(_step(backend, cfg, rank, step)[0])
        backend.apply(DECAY)
        resumed.append({n: t.clone() for n, t in backend.ema.items()})
    torch.save({"losses": r_losses, "ema": resumed}, f"{tmp}/zero3_resumed{rank}.pt")


def _assemble_pieces(runs: list[dict], i: int) -> dict:
    """Step i's full EMA tensors from the ranks' pieces: ZeRO-3's layout is the flat parameter cut into
    equal pieces in rank order (the padding at the end is not kept)."""
    first = runs[0]["states"][i]
    return {n: torch.cat([run["states"][i]["ema"][n] for run in runs]).view(first["layout"][n]["shape"])
            for n in first["ema"]}


def test_zero3_ema_is_hand_computed_resumes_exactly_and_loads_for_inference(tmp_path):
    """2 processes: the EMA of each rank's ZeRO-3 partitions equals the EMA of the gathered fp32 weights
    (bit-exact) and the one-process reference's EMA (float tolerance); resume restores it bit-exactly;
    load_model assembles the ranks' pieces (EMA) and DeepSpeed's partitions (raw)."""
    run_workers(_zero3_ema_worker, 2, tmp_path, str(tmp_path))
    ref_losses, _, ref_weights, ref_emas = _reference(2, STEPS)
    runs = [torch.load(tmp_path / f"zero3_run{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.tensor(runs[0]["losses"], dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), **LOSS_TOL)
    layout = runs[1]["states"][0]["layout"]
    assert any(0 < at["length"] < at["numel"] for at in layout.values()), "the EMA is not partitioned"
    for i in range(STEPS + 1):
        full = _assemble_pieces(runs, i)
        for n, t in runs[0]["states"][i]["hand_ema"].items():
            assert torch.equal(full[n], t), f"step {i}: EMA {n} is not the EMA of the gathered weights"
    for i in (1, STEPS):
        for k, v in ref_emas[i - 1].items():
            torch.testing.assert_close(runs[0]["states"][i]["hand_ema"][k], v, **WEIGHT_TOL, msg=lambda m: f"{k}: {m}")
        for k, v in ref_weights[i - 1].items():
            if k in runs[0]["states"][i]["weights"]:
                torch.testing.assert_close(runs[0]["states"][i]["weights"][k], v, **WEIGHT_TOL,
                                           msg=lambda m: f"{k}: {m}")

    for r in range(2):
        resumed = torch.load(tmp_path / f"zero3_resumed{r}.pt", weights_only=True)
        assert resumed["losses"] == runs[r]["losses"][2:], f"rank {r}: resumed losses differ"
        for i, ema in enumerate(resumed["ema"]):  # at load (step 2), after steps 3 and 4
            for n, t in ema.items():
                assert torch.equal(t, runs[r]["states"][i + 2]["ema"][n]), f"rank {r} step {i + 2} EMA {n}"

    from train.inference_model import load_model
    step2 = tmp_path / "ckpt" / "step_00000002"
    ema_model, _, _, used = load_model(step2, weights="ema", log=lambda m: None)
    raw_model, _, _, used_raw = load_model(step2, weights="raw", log=lambda m: None)
    assert (used, used_raw) == ("ema", "raw")
    ema_sd, raw_sd = dict(ema_model.named_parameters()), dict(raw_model.named_parameters())
    state = runs[0]["states"][2]
    assert set(ema_sd) == set(state["hand_ema"])
    for n in ema_sd:
        assert torch.equal(ema_sd[n].detach(), state["hand_ema"][n]), n
        assert torch.equal(raw_sd[n].detach(), state["weights"][n]), n
    assert any(not torch.equal(ema_sd[n], raw_sd[n]) for n in ema_sd)


def test_zero3_ema_pieces_assemble_in_offset_order_or_are_refused(tmp_path):
    """9 elements over 2 ranks (pieces of 5, the second padded, kept without its padding): the pieces give the
    tensor whatever the file order; a piece at the wrong offset is an error, not a silently shifted tensor."""
    from parallel.deepspeed import EMA_RANK_FILE, WEIGHTS_DIR, assemble_ema_partitions
    full = torch.arange(9.0).view(3, 3)
    (tmp_path / WEIGHTS_DIR).mkdir()

    def write(offsets):
        for rank, offset in enumerate(offsets):
            piece = full.reshape(-1)[offset:offset + 5]
            torch.save({"w": {"ema": piece, "shape": [3, 3], "numel": 9, "offset": offset, "length": len(piece)}},
                       tmp_path / WEIGHTS_DIR / EMA_RANK_FILE.format(rank))
    write([5, 0])
    assert torch.equal(assemble_ema_partitions(tmp_path)["w"], full)
    write([0, 4])
    with pytest.raises(ValueError, match="do not tile"):
        assemble_ema_partitions(tmp_path)


def test_zero3_with_ep_is_refused():
    from parallel.deepspeed import ZERO3_EP_REASON, apply_expert_parallel_zero

    class _Mesh:
        def size(self):
            return 2
    with pytest.raises(ValueError, match="parallel.ep=2 with parallel.zero_stage=3: ZeRO-3 would partition"):
        apply_expert_parallel_zero(None, _Mesh(), zero_stage=3)
    assert "expert" in ZERO3_EP_REASON
