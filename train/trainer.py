"""The training loop: data -> frozen encoders -> masked rectified-flow loss -> backward -> clip ->
optimizer -> LR schedule -> EMA, with exact resume, non-finite-loss handling and signal-driven
checkpoints (SIGTERM / SIGUSR1: save and exit cleanly, for slurm requeue). `run` validates, joins the
process group and runs a `Trainer` (`fit`: the loop; `train_step`: one optimizer step).

Everything that can be validated is validated before the process group is created (train/config.py).
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data import FrozenEncoders, TooManyBadSamples, make_loader
from data.shards import BAD_REASONS, check_shard_list, saved_counts
from launch.requeue import read_status
from model.config import ConfigError, config_to_dict
from model.dit import DiT, build_model
from model.flops import train_step_flops
from model.flow import flow_loss
from parallel.mesh import build_mesh
from parallel.compile import compile_blocks
from parallel.fsdp import apply_activation_checkpointing
from parallel.parallelize import parallelize
from parallel.replicas import diverged
from parallel.routing_pool import install_routing_pool

from .backends import DeepSpeedBackend, TorchBackend, deepspeed_config, lr_schedule
from .checkpoint import Checkpointer, capture_rng, decode_state, encode_state, restore_rng, saved_train_states
from .config import AppConfig, to_container, validate_app
from .metrics import Metrics, Progress, device_peak_flops, moe_scalar_tensors
from .state import TrainState
from .watchdog import (StepWatchdog, dump_stacks, flight_recorder_env, frame_where, is_comm_failure,
                       set_collective_timeout)


class StopTraining(RuntimeError):
    """A condition that ends the run with a clear message (non-finite losses, too many bad samples), and
    that a restart would meet again."""


class CollectiveFailure(RuntimeError):
    """A collective failed because another rank stopped responding or died (its stacks are in
    run_dir/stalls/); a restart from the latest checkpoint can get past it."""


def _log0(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[train] {msg}", flush=True)


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The multi-tensor (foreach) implementation on every device: torch picks it only on CUDA by default, but
    on CPU it is the same arithmetic with one DTensor dispatch per op instead of one per parameter (the
    quickstart's step: 1.62 -> 1.71 step/s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=True)


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to a global L2 norm of `max_norm` (0: only measure); returns that
    norm as a tensor (not read here), equal on every rank and to the one-process norm.

    DTensor gradients (FSDP2, expert parallelism) are grouped by device mesh, since one norm cannot mix
    meshes: dense weights live on the data-parallel mesh, expert weights on ("dp_shard_mod_ep", "ep").
    `get_total_norm` of a group is a DTensor that `full_tensor()` reduces over its mesh; the groups
    combine as the root of their squared sum. Plain gradients (one process, or replicas after DDP's
    all-reduce) are already the same on every rank."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def step_flags(loss_sum: torch.Tensor, stop: bool, dry: bool, counts: torch.Tensor, world: int) -> torch.Tensor:
    """[sum of the ranks' losses, ranks with a non-finite loss, ranks asked to stop, ranks whose data ran
    out, *sum of `counts`] (float64, so that counts stay exact), summed over the ranks in one all-reduce."""
    dev = loss_sum.device
    flags = torch.cat([torch.stack([loss_sum.detach().double(), (~torch.isfinite(loss_sum)).double(),
                                    torch.tensor(float(stop), dtype=torch.float64, device=dev),
                                    torch.tensor(float(dry), dtype=torch.float64, device=dev)]),
                       counts.to(dev, torch.float64)])
    if world > 1:
        dist.all_reduce(flags)
    return flags


def _threads(cfg) -> int:
    if cfg.train.threads > 0:
        return cfg.train.threads
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 1) // local_world)


class StepBatches:
    """The micro-batches of each optimizer step, fetched one step ahead: a rank whose finite stream has
    ended says so in the step's all-reduce (`step_flags`), so every rank stops after the same step instead
    of one rank leaving a collective the others wait in. `data_state` is the loader's position after the
    batches handed out by `take` (what a checkpoint records), not after the ones fetched ahead."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum
        self.batches = iter(loader)
        self.data_state = loader.state_dict()
        self.ahead: list = []
        self.dry = False  # the stream ended before a whole step's micro-batches
        self.fetch()

    def fetch(self) -> None:
        """Fetch the next step's micro-batches (`dry` when the stream ends first)."""
        self.ahead = []
        for _ in range(self.accum):
            try:
                self.ahead.append(next(self.batches))
            except StopIteration:
                self.dry = True
                return
            except TooManyBadSamples as e:
                raise StopTraining(str(e)) from e

    def take(self) -> list:
        """The fetched micro-batches of this step (the loader's position moves past them)."""
        batches, self.ahead = self.ahead, []
        self.data_state = self.loader.state_dict()
        return batches

    def unread(self) -> int:
        """Good samples of this rank's stream that no step trained on: fetched ahead, in a last partial batch
        (data.drop_last), or not yet read (read now, without the loader's transform, to count them)."""
        self.loader.transform = None
        for _ in self.batches:
            pass
        return self.loader.stats()["good"] - saved_counts(self.data_state)["good"]


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def run(cfg: AppConfig) -> dict:
    """Train as configured; returns a summary (paths, first/last loss, steps). A run that fails records
    why in run_dir/status.json (`failed`, and whether a restart can help) before the error propagates."""
    rank = int(os.environ.get("RANK", 0))
    run_dir = Path(cfg.train.run_dir)
    try:
        summary = _run(cfg, rank, run_dir)
    except (ConfigError, StopTraining) as e:
        write_status(run_dir, "failed", error=str(e), retry=False, rank=rank)
        raise
    except CollectiveFailure as e:
        write_status(run_dir, "failed", error=str(e), retry=True, rank=rank)
        raise
    if rank == 0:
        write_status(run_dir, **summary["status"])
    return summary


def _run(cfg: AppConfig, rank: int, run_dir: Path) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    mcfg, pcfg = validate_app(cfg, world)  # before any process group
    check_shard_list(cfg.data, world)
    _refuse_repeated_failure(run_dir)
    torch.set_num_threads(_threads(cfg))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        for key, value in flight_recorder_env(run_dir).items():
            os.environ.setdefault(key, value)
        _join("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=pcfg.init_timeout_s))
    config_dict = to_container(cfg)
    config_dict["model_resolved"] = config_to_dict(mcfg)
    signals = _Signals()
    trainer, group_failed = None, False
    try:
        trainer = Trainer(cfg, mcfg, pcfg, world, rank, device, run_dir, config_dict, signals)
        summary = trainer.fit()
    except Exception as e:
        if not (distributed and is_comm_failure(e)):
            raise
        group_failed = True  # its teardown could wait on the peer that failed
        step = trainer.state.step if trainer is not None else 0
        line = (f"rank {rank}: a collective failed after step {step}, in {frame_where(e.__traceback__)}: "
                f"{str(e).strip().splitlines()[0][-160:]} (parallel.timeout_s={pcfg.timeout_s:g}, "
                f"init_timeout_s={pcfg.init_timeout_s:g}): another rank stopped responding or died")
        path = dump_stacks(run_dir, rank, f"{line}\n\n{traceback.format_exc()}")
        raise CollectiveFailure(f"{line}; stacks in {path}") from None
    finally:
        if distributed and dist.is_initialized() and not group_failed:
            dist.destroy_process_group()
    return summary


def _join(backend: str, timeout: timedelta) -> None:
    """`init_process_group` with the start-up timeout. Under torchrun with restarts, a restarted worker group
    can read the previous attempt's addresses from the agent's shared store and fail to connect (seen with
    torch 2.13): the launchers set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each round); a bare
    torchrun without it gets one line saying so."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
        _log0("torchrun --max-restarts with the agent's shared store: a restarted group may fail to reconnect; "
              "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/local.sh and the other launchers do)")
    dist.init_process_group(backend, timeout=timeout)


def _refuse_repeated_failure(run_dir: Path) -> None:
    """Under torchrun's in-job restarts (TORCHELASTIC_RESTART_COUNT > 0): stop at once when the previous
    attempt failed with an error that a restart repeats (status.json `failed`, retry false)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        return
    status = read_status(run_dir)
    if status.get("state") == "failed" and not status.get("retry", True):
        raise StopTraining(f"not retrying: the previous attempt failed with an error a restart repeats: "
                           f"{status.get('error')}")


def write_status(run_dir: Path, state: str, rank: int = 0, **fields) -> Path:
    """`run_dir/status.json`, written atomically: `finished` (the last step is done, or the finite data
    stream ended), `stopped` (a signal ended the run early, after its checkpoint), or `failed` (with
    `error` and `retry`: whether a restart from the latest checkpoint can help). Launchers read it to
    decide whether to requeue (launch/requeue.py)."""
    path = Path(run_dir) / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{rank}")
    tmp.write_text(json.dumps({"state": state, **fields}) + "\n")
    os.replace(tmp, path)
    return path


def _build(mcfg, pcfg, tc, world, device) -> DiT:
    model = _build_parallel(mcfg, pcfg, tc, world, device)
    if tc.compile:  # blocks not yet compiled by parallelize (which compiles before FSDP)
        compile_blocks(model)
    if world > 1:  # expert thresholds (and DiffMoE's global pool) span the data-parallel ranks
        install_routing_pool(model)
    return model


def _build_parallel(mcfg, pcfg, tc, world, device) -> DiT:
    if pcfg.engine == "deepspeed":  # DeepSpeed shards (ZeRO) inside deepspeed.initialize
        model = build_model(mcfg, device=device, seed=tc.seed)
        if pcfg.ep > 1:
            from parallel.deepspeed import apply_expert_parallel_zero
            from parallel.parallelize import make_dispatcher_factory
            apply_expert_parallel_zero(model, build_mesh(pcfg, world, device.type)["ep"], pcfg.zero_stage,
                                       make_dispatcher_factory(pcfg.dispatcher))
        return model
    mesh = build_mesh(pcfg, world, device.type) if world > 1 else None
    if tc.meta_init:
        with torch.device("meta"):
            model = DiT(mcfg)
        _parallelize(model, mesh, pcfg, tc)
        model.to_empty(device=device)
        torch.manual_seed(tc.seed)
        model.init_weights()
        return model
    model = build_model(mcfg, device=device, seed=tc.seed)  # same weights on every rank
    _parallelize(model, mesh, pcfg, tc)
    return model


def _parallelize(model: DiT, mesh, pcfg, tc) -> None:
    """parallel/parallelize.py over `mesh`; in one process (no mesh) only the activation checkpointing."""
    if mesh is not None:
        parallelize(model, mesh, pcfg, torch_compile=tc.compile)
    elif pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)


def _frozen_encoders(dcfg, device, use_bf16: bool) -> FrozenEncoders | None:
    """The encoders the data needs online, in the run's autocast dtype (encoder_dtype=auto): text + VAE for
    image shards, the text encoder for latent shards with token ids (text_storage ids, or unknown)."""
    if dcfg.kind == "latent" and dcfg.text_storage == "emb":
        return None
    if dcfg.encoder_dtype == "auto":
        dcfg = dcfg.replace(encoder_dtype="bf16" if use_bf16 else "fp32")
    return FrozenEncoders(dcfg, device, vae=dcfg.kind == "image")


class Trainer:
    """One run on this rank: the model as parallelized, its engine (optimizer, schedule, EMA,
    checkpoints), the data stream, metrics and the loss's RNG; `fit` runs the loop, `train_step` one
    optimizer step."""

    def __init__(self, cfg: AppConfig, mcfg, pcfg, world: int, rank: int, device: torch.device, run_dir: Path,
                 config_dict: dict, signals: _Signals):
        self.cfg, self.mcfg, self.pcfg, self.tc = cfg, mcfg, pcfg, cfg.train
        self.world, self.rank, self.device, self.run_dir = world, rank, device, run_dir
        self.config_dict, self.signals = config_dict, signals
        self.model = _build(mcfg, pcfg, self.tc, world, device)
        self.use_bf16 = self.tc.precision == "bf16" or (self.tc.precision == "auto" and device.type == "cuda")
        self.backend, self.autocast = self._engine()
        self.net = self.backend.net  # what the loss calls forward on
        self.loader = make_loader(cfg.data, rank=rank, world_size=world,
                                  transform=_frozen_encoders(cfg.data, device, self.use_bf16))
        self.metrics = Metrics(run_dir, config_dict, enabled=rank == 0, wandb_mode=self.tc.wandb_mode,
                               project=self.tc.wandb_project, name=self.tc.name)
        self.state = TrainState()
        torch.manual_seed(self.tc.seed * 1_000_003 + rank)
        # The loss's own RNG (noise, timesteps, MaskDiT masks, text dropout): a dedicated generator, so
        # nothing else that draws from the global RNG (e.g. a DataLoader iterator's base seed) shifts it.
        # Ranks draw differently.
        self.flow_gen = torch.Generator(device=device).manual_seed(self.tc.seed * 1_000_003 + rank)
        self.images_per_step = cfg.data.batch_size * world * self.tc.grad_accum
        self.flops = train_step_flops(mcfg, self.images_per_step, text_len=mcfg.text_len)
        self.peak = device_peak_flops(device, self.tc.peak_tflops)
        self.progress = Progress(self.tc.steps, 0)
        self.first_loss = self.last_loss = None
        self.batches: StepBatches | None = None
        self.watchdog = StepWatchdog(self.tc.stall_timeout_s, run_dir, rank)

    def _engine(self):
        """(backend, autocast context) of parallel.engine."""
        cfg, tc = self.cfg, self.tc
        checkpoints = self.run_dir / "checkpoints"
        if self.pcfg.engine == "deepspeed":
            backend = DeepSpeedBackend(self.model, deepspeed_config(cfg, self.pcfg, self.use_bf16), checkpoints,
                                       tc.keep_last, schedule=lambda opt: lr_schedule(opt, cfg.optim, tc.steps),
                                       ema=tc.ema_decay > 0)
            return backend, nullcontext()  # DeepSpeed casts the module itself (bf16 config)
        model = self.model
        opt = _optimizer(model, cfg.optim)
        ema = {n: p.detach().clone() for n, p in model.named_parameters()} if tc.ema_decay > 0 else None
        backend = TorchBackend(model, opt, lr_schedule(opt, cfg.optim, tc.steps), ema,
                               Checkpointer(checkpoints, keep_last=tc.keep_last, async_save=tc.async_ckpt),
                               lambda: clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()
        return backend, autocast

    def resume(self) -> Path | None:
        """Load train.resume (auto: the newest whole checkpoint); the checkpoint resumed from, or None. Nothing
        is loaded from a damaged checkpoint (train/checkpoint.py verify): auto falls back to an older whole one
        with one line naming the damage, and stops when there is none; a damaged train.resume path stops."""
        from .checkpoint import latest_whole, verify
        tc = self.tc
        if tc.resume == "none":
            return None
        if tc.resume == "auto":
            path, damaged = latest_whole(self.backend.checkpoints())
            damage = "; ".join(f"checkpoint {p} is damaged ({why})" for p, why in damaged)
            if damaged and path is None:
                raise StopTraining(f"{damage}: no whole checkpoint to resume from (train.resume=none starts afresh)")
            if damaged:
                _log0(f"{damage}: resuming from {path}")
            if path is None:
                return None
        else:
            path = Path(tc.resume)
            why = verify(path)
            if why is not None:
                raise StopTraining(f"checkpoint {path} is damaged ({why})")
        saved = self.backend.load(Path(path))
        if saved is None:  # saved at another world size: rank 0's counters, every rank's data position
            states = saved_train_states(path)
            self.state = TrainState.from_dict({**states[0], "rng": {}})
            self.loader.restore([s["data"] for s in states])
            _log0(f"resumed from {path} at step {self.state.step}, saved by {len(states)} ranks: the data "
                  f"stream continues its epoch over {self.world} ranks; RNG starts afresh")
        else:
            self.state = TrainState.from_dict(saved)
            self.loader.load_state_dict(self.state.data)
            _log0(f"resumed from {path} at step {self.state.step}")
        if self.state.rng:
            restore_rng(self.state.rng)
            self.flow_gen.set_state(decode_state(self.state.rng["flow"]))
        return Path(path)

    def save(self) -> None:
        """Checkpoint the engine with this rank's train state (RNG, data position)."""
        self.state.rng = {**capture_rng(), "flow": encode_state(self.flow_gen.get_state().cpu())}
        self.state.data = self.batches.data_state if self.batches is not None else self.loader.state_dict()
        self.backend.save(self.state.step, self.state.to_dict(), self.config_dict)

    def forward_backward(self, batches: list, collect_stats: bool) -> tuple[torch.Tensor, list]:
        """Loss and backward of the step's train.grad_accum micro-batches: (the mean flow loss, NaN if any
        micro-batch's loss was non-finite; the last micro-batch's MoE statistics)."""
        accum = self.tc.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        stats: list = []
        dt = torch.bfloat16 if getattr(self.backend, "bf16", False) else None
        for micro, batch in enumerate(batches):
            self.backend.sync_grads(micro == accum - 1)
            x0 = batch["latent"].to(self.device, dtype=dt, non_blocking=True)
            ctx = batch["text_emb"].to(self.device, dtype=x0.dtype, non_blocking=True)
            mask = batch["text_mask"].to(self.device)
            with self.autocast:
                out = flow_loss(self.net, x0, ctx, mask, self.cfg.flow, generator=self.flow_gen,
                                collect_stats=collect_stats)
            finite = self.backend.micro_step(out["loss"], accum)  # a non-finite one makes the step skipped
            loss_sum += torch.where(finite, out["flow_loss"].float(), float("nan")) / accum
            stats = out["out"].moe_stats
        return loss_sum, stats

    def train_step(self, batches: StepBatches) -> tuple[bool, int]:
        """One optimizer step (or one skipped step, if any rank's loss was non-finite), logged every
        train.log_every steps; (whether a rank was asked to stop by a signal, how many ranks have no data
        for the next step)."""
        tc, state, backend = self.tc, self.state, self.backend
        backend.zero_grad()
        logging_step = (state.step + 1) % tc.log_every == 0 or state.step + 1 == tc.steps
        loss_sum, stats = self.forward_backward(batches.take(), collect_stats=logging_step)
        if state.step + 1 < tc.steps:
            batches.fetch()
        moe_names, moe_values = moe_scalar_tensors(stats) if logging_step else ([], torch.zeros(0))
        counts = _data_counts(self.loader, self.device) if logging_step else torch.zeros(0)
        flags = step_flags(loss_sum, self.signals.received is not None, batches.dry, counts, self.world)
        grad_norm_t = backend.clip_grads()  # clipped even if a loss was non-finite: the update is skipped below
        # The step's one host sync, unavoidable: whether to update and whether to stop are host branches
        # that every rank must take alike. A logged step's values come with it.
        values = torch.cat([grad_norm_t.reshape(1).to(flags), flags, moe_values.to(flags)]).tolist()
        grad_norm, loss_total, nonfinite, stop, dry = values[:5]
        state.step += 1
        state.samples_seen += self.images_per_step
        if nonfinite > 0:
            self._skip_update()
            return stop > 0, int(dry)
        state.nan_streak = 0
        backend.apply(tc.ema_decay)
        self.first_loss = loss_total / self.world if self.first_loss is None else self.first_loss
        self.last_loss = loss_total / self.world
        if logging_step:
            logged = values[5:]  # data counts, then the MoE scalars
            self._log(grad_norm, {**_data_named(logged[:counts.numel()]),
                                  **dict(zip(moe_names, logged[counts.numel():]))})
        return stop > 0, int(dry)

    def _skip_update(self) -> None:
        """A non-finite step: no update; stop after train.max_nan_steps in a row."""
        state, tc = self.state, self.tc
        state.nan_streak += 1
        state.nan_total += 1
        self.backend.zero_grad()
        _log0(f"step {state.step}: non-finite loss, update skipped ({state.nan_streak} in a row)")
        if state.nan_streak >= tc.max_nan_steps:
            self.backend.wait()  # publish a pending async checkpoint (every rank stops here together)
            raise StopTraining(f"{state.nan_streak} non-finite losses in a row (train.max_nan_steps="
                               f"{tc.max_nan_steps}); last good checkpoint: {self.backend.latest()}")

    def _log(self, grad_norm: float, extra: dict) -> None:
        """metrics.jsonl / wandb and the console line of a logged step."""
        state = self.state
        self.metrics.log({"loss": self.last_loss, "lr": self.backend.lr(), "grad_norm": grad_norm,
                          "samples_seen": state.samples_seen, "nan_total": state.nan_total, **extra}, state.step)
        _log0(self.progress.line(state.step, self.last_loss, self.images_per_step,
                                 self.images_per_step * self.mcfg.kept_tokens, self.flops, self.peak))

    def fit(self) -> dict:
        """Resume, train to train.steps (or until a signal), checkpoint, check the replicas, sample; the
        run's summary."""
        tc = self.tc
        resumed = self.resume()
        state = self.state
        self.progress = Progress(tc.steps, state.step)
        _log0(f"{self.mcfg.name}: {sum(getattr(p, 'ds_numel', p.numel()) for p in self.model.parameters())} params, {self.world} "
              f"ranks, ep {self.pcfg.ep}, engine {self.pcfg.engine}, {self.images_per_step} images/step, run dir "
              f"{self.run_dir}")
        # Each node's agent counts only the restarts its own workers' failures caused: the most of them.
        restarts = _over_ranks(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), dist.ReduceOp.MAX, self.world,
                               self.device)
        if restarts:
            _log0(f"worker group restart {restarts} (torchrun --max-restarts): "
                  + (f"continuing from {resumed}" if resumed is not None else "no checkpoint yet, from the start"))
        last_saved = state.step if resumed is not None else -1
        dry = 0
        if state.step < tc.steps:
            self.batches = StepBatches(self.loader, tc.grad_accum)
            # A resumed stream may have ended: how many ranks have no data for a first step.
            dry = _over_ranks(self.batches.dry, dist.ReduceOp.SUM, self.world, self.device)
        timeout_set = self.world == 1
        self.watchdog.start(state.step)
        while state.step < tc.steps and not dry:
            stop, dry = self.train_step(self.batches)
            if not timeout_set:  # start-up is over: the training timeout from here on
                set_collective_timeout(self.pcfg.timeout_s)
                timeout_set = True
            if state.step % tc.ckpt_every == 0 or state.step == tc.steps or stop or dry:
                self.save()
                last_saved = state.step
            self.watchdog.beat(state.step)
            if stop:
                _log0(f"signal received: checkpoint saved at step {state.step}; exiting (resume: same command)")
                break
            if tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps and not dry:
                self.sample_outputs()
        self.watchdog.stop()
        self.backend.wait()
        if last_saved != state.step:
            self.save()
            self.backend.wait()
        if tc.check_replicas:
            _check_replicas(self.net)
        return self.summary(dry)

    def summary(self, dry: int = 0) -> dict:
        """Paths, losses, steps, data counts and end state (`status`: what run_dir/status.json records) of
        the run; the final samples once it is finished."""
        state, tc = self.state, self.tc
        out = {"run_dir": str(self.run_dir), "checkpoints": str(self.run_dir / "checkpoints"), "step": state.step,
               "first_loss": self.first_loss, "last_loss": self.last_loss, "wandb_dir": self.metrics.wandb_dir,
               "stopped_by_signal": self.signals.received is not None,
               "data": _data_totals(self.loader, self.world > 1, self.device)}
        finished = self.signals.received is None and (state.step >= tc.steps or dry > 0)
        out["status"] = {"state": "finished" if finished else "stopped", "step": state.step, "steps": tc.steps}
        if dry:
            out["status"].update(reason="data exhausted", **self._exhausted(dry))
            out["data_exhausted"] = out["status"]
        if finished:
            out.update(self.sample_outputs())
        self.metrics.close()
        return out

    def _exhausted(self, dry: int) -> dict:
        """The end of a finite stream (collective): samples delivered by all ranks (over every run of this
        stream), and those no step trained on (left by the ranks that still had data when the first ran dry,
        or in a last partial batch); logged."""
        counts = torch.tensor([saved_counts(self.batches.data_state)["good"], self.batches.unread()],
                              dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(counts)
        delivered, unread = (int(v) for v in counts.tolist())
        _log0(f"data exhausted after step {self.state.step}: {dry} of {self.world} ranks had no data for "
              f"another step (data.epochs={self.cfg.data.epochs}); {delivered} samples delivered, {unread} not "
              f"trained on (left by the ranks that still had data, or in a last partial batch); every rank "
              f"stopped after the same step; final checkpoint saved")
        return {"samples_delivered": delivered, "samples_unread": unread, "ranks_dry": dry}

    def sample_outputs(self) -> dict:
        """The sample grid and expert heatmap at this step (collective); none without train.sample_prompts."""
        if not self.tc.sample_prompts:
            return {}
        return _sample_outputs(self.cfg, self.model, self.metrics, self.run_dir, self.rank, self.state.step,
                               self.device)


def _over_ranks(value: float, op, world: int, device: torch.device) -> int:
    """`value` reduced with `op` (a dist.ReduceOp) over the ranks: one all-reduce."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=op)
    return int(t.item())


def _check_replicas(net: torch.nn.Module) -> None:
    """Stop with the names of the replicated tensors whose copies differ between ranks (a wrong gradient
    reduction); log that they agree otherwise."""
    bad = diverged(net)
    if bad:
        raise StopTraining(f"{len(bad)} replicated weights or buffers differ between ranks (first: {bad[0]}): "
                           f"the ranks trained apart; the checkpoints of this run keep one copy only")
    if dist.is_initialized() and dist.get_world_size() > 1:
        _log0("replicas: every copy of every replicated weight and buffer is identical across ranks")


def _data_counts(loader, device: torch.device) -> torch.Tensor:
    """This rank's good and bad (by reason, BAD_REASONS order) samples read so far."""
    stats = loader.stats()
    return torch.tensor([stats["good"]] + [stats["bad"].get(r, 0) for r in BAD_REASONS], dtype=torch.float64,
                        device=device)


def _data_named(values: list[float]) -> dict:
    """All ranks' `_data_counts` as {"data/good": n, "data/bad/<reason>": n}."""
    values = [int(v) for v in values]
    return {"data/good": values[0], **{f"data/bad/{r}": v for r, v in zip(BAD_REASONS, values[1:])}}


def _data_totals(loader, distributed: bool, device: torch.device) -> dict:
    """Good and bad (by reason) samples read so far by all ranks."""
    counts = _data_counts(loader, device)
    if distributed:
        dist.all_reduce(counts)
    return _data_named(counts.tolist())


def _sample_outputs(cfg, model, metrics, run_dir, rank, step, device) -> dict:
    """Sample grid for the fixed prompts and the expert-count heatmap of the paper's Fig. 6 (every rank
    computes, since the sharded model's forward is collective; rank 0 writes)."""
    from data import load_text_encoder, load_vae

    from .generate import decode, generate_latents, routing_maps
    from .visualize import expert_heatmap_layers, image_grid, moe_layer_names, save_png
    prompts = list(cfg.train.sample_prompts)
    text = load_text_encoder(cfg.data, device)
    latents = generate_latents(model, text, prompts, steps=cfg.train.sample_steps, guidance=cfg.train.guidance,
                               seed=cfg.train.seed, batch_size=len(prompts), routing="sample")
    images = decode(load_vae(cfg.data, device), latents)
    maps = routing_maps(model, text, prompts, latents, t=0.5, seed=cfg.train.seed) if model.cfg.moe else []
    if rank != 0:
        return {}
    out = {}
    grid = image_grid(images, nrow=len(prompts), captions=prompts)
    out["sample_grid"] = str(save_png(grid, run_dir / "samples" / f"grid_step{step:08d}.png"))
    metrics.log_image("samples", grid, step, caption=" | ".join(prompts))
    if maps:
        heat = expert_heatmap_layers(maps, batch=len(prompts), grid=model.cfg.grid,
                                     num_experts=model.cfg.moe.num_experts, images=images,
                                     layer_names=moe_layer_names(model.cfg.num_moe_blocks, model.cfg.moe_every))
        out["expert_heatmap"] = str(save_png(heat, run_dir / "samples" / f"experts_step{step:08d}.png"))
        metrics.log_image("expert_heatmap", heat, step)
    return out
