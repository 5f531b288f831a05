"""The training loop: data -> frozen encoders -> masked rectified-flow loss -> backward -> clip ->
optimizer -> LR schedule -> EMA, with exact resume, non-finite-loss handling and signal-driven
checkpoints. `Trainer.fit` runs the loop, `Trainer.train_step` one optimizer step; train/lifecycle.py
starts and ends the process around it.

The parts it wires: the model as parallel/parallelize.py builds and wraps it, the engine
(train/backends.py: optimizer, schedule, EMA, checkpoints through train/checkpoint.py), the data stream
(data/steps.py), the step's distributed arithmetic (parallel/distributed.py), metrics and the watchdog.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from data import make_loader
from data.encoders import online_encoders
from data.steps import StepBatches, data_counts, named_counts
from model.dit import DiT
from model.flops import train_step_flops
from model.flow import flow_loss
from parallel.distributed import over_ranks, reduce_step, sum_over_ranks
from parallel.parallelize import build_parallel
from parallel.replicas import diverged

from .backends import make_backend
from .checkpoint import capture_rng, decode_state, encode_state, restore_rng, saved_train_states
from .config import AppConfig
from .failures import StopTraining
from .generate import training_samples
from .metrics import Metrics, Progress, device_peak_flops, moe_scalar_tensors
from .rundir import CHECKPOINTS
from .state import TrainState
from .watchdog import StepWatchdog, set_collective_timeout


def log0(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[train] {msg}", flush=True)


def build_network(mcfg, pcfg, tc, world: int, device: torch.device) -> DiT:
    """The run's model, built, parallelized and initialised as train.seed / meta_init / compile say."""
    return build_parallel(mcfg, pcfg, world, device, seed=tc.seed, meta_init=tc.meta_init, torch_compile=tc.compile)


class Trainer:
    """One run on this rank: the model as parallelized, its engine (optimizer, schedule, EMA,
    checkpoints), the data stream, metrics and the loss's RNG; `fit` runs the loop, `train_step` one
    optimizer step."""

    def __init__(self, cfg: AppConfig, mcfg, pcfg, world: int, rank: int, device: torch.device, config_dict: dict,
                 signals):
        self.cfg, self.mcfg, self.pcfg, self.tc = cfg, mcfg, pcfg, cfg.train
        self.world, self.rank, self.device, self.run_dir = world, rank, device, Path(cfg.train.run_dir)
        self.config_dict, self.signals = config_dict, signals
        self.use_bf16 = self.tc.precision == "bf16" or (self.tc.precision == "auto" and device.type == "cuda")
        self.images_per_step = cfg.data.batch_size * world * self.tc.grad_accum
        self.model = build_network(mcfg, pcfg, self.tc, world, device)  # what sampling and replica checks use
        self.flops = train_step_flops(mcfg, self.images_per_step, text_len=mcfg.text_len)
        self.metrics = Metrics(self.run_dir, config_dict, enabled=rank == 0, wandb_mode=self.tc.wandb_mode,
                               project=self.tc.wandb_project, name=self.tc.name)
        self.peak = device_peak_flops(device, self.tc.peak_tflops)
        self.progress = Progress(self.tc.steps, 0)
        self.watchdog = StepWatchdog(self.tc.stall_timeout_s, self.run_dir, rank)
        self.state = TrainState()
        self.first_loss = self.last_loss = None
        self.batches: StepBatches | None = None
        self.backend, self.autocast = make_backend(cfg, self.model, pcfg, device, self.use_bf16,
                                                   self.run_dir / CHECKPOINTS)
        self.loader = make_loader(cfg.data, rank=rank, world_size=world,
                                  transform=online_encoders(cfg.data, device, self.use_bf16))
        if world > 1:  # the groups made since joining (mesh, megatron, DeepSpeed) start with their backend's default
            set_collective_timeout(pcfg.init_timeout_s)
        torch.manual_seed(self.tc.seed * 1_000_003 + rank)
        # The loss's own RNG (noise, timesteps, MaskDiT masks, text dropout): a dedicated generator, so
        # nothing else that draws from the global RNG (e.g. a DataLoader iterator's base seed) shifts it.
        # Ranks draw differently.
        self.flow_gen = torch.Generator(device=device).manual_seed(self.tc.seed * 1_000_003 + rank)

    def resume(self) -> Path | None:
        """Load train.resume (auto: the newest whole checkpoint, train/checkpoint.py resume_point); the
        checkpoint resumed from, or None."""
        path, damage = self.backend.ckpt.resume_point(self.tc.resume)
        if damage:
            log0(f"{damage}: resuming from {path}")
        if path is None:
            return None
        saved = self.backend.load(path)
        if saved is None:  # saved at another world size: rank 0's counters, every rank's data position
            states = saved_train_states(path)
            self.state = TrainState.from_dict({**states[0], "rng": {}})
            self.loader.restore([s["data"] for s in states])
            log0(f"resumed from {path} at step {self.state.step}, saved by {len(states)} ranks: the data "
                 f"stream continues its epoch over {self.world} ranks; RNG starts afresh")
        else:
            self.state = TrainState.from_dict(saved)
            self.loader.load_state_dict(self.state.data)
            log0(f"resumed from {path} at step {self.state.step}")
        if self.state.rng:
            restore_rng(self.state.rng)
            self.flow_gen.set_state(decode_state(self.state.rng["flow"]))
        return path

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
            with self.autocast:  # the engine's module: DeepSpeed's wrapper, or the parallelized model itself
                out = flow_loss(self.backend.net, x0, ctx, mask, self.cfg.flow, generator=self.flow_gen,
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
        counts = data_counts(self.loader, self.device) if logging_step else torch.zeros(0)
        grad_norm = backend.clip_grads()  # clipped even if a loss was non-finite: the update is skipped below
        totals = reduce_step(grad_norm, loss_sum, self.signals.received is not None, batches.out_of_data, counts,
                             moe_values, self.world)  # the data counts summed over the ranks, the MoE scalars rank 0's
        state.step += 1
        state.samples_seen += self.images_per_step
        if totals.ranks_nonfinite > 0:
            self._skip_update()
            return totals.ranks_stopping > 0, totals.ranks_out_of_data
        state.nan_streak = 0
        backend.apply(tc.ema_decay)
        self.first_loss = totals.loss_sum / self.world if self.first_loss is None else self.first_loss
        self.last_loss = totals.loss_sum / self.world
        if logging_step:
            self._log(totals.grad_norm, {**named_counts(totals.summed), **dict(zip(moe_names, totals.local))})
        return totals.ranks_stopping > 0, totals.ranks_out_of_data

    def _skip_update(self) -> None:
        """A non-finite step: no update; stop after train.max_nan_steps in a row."""
        state, tc = self.state, self.tc
        state.nan_streak += 1
        state.nan_total += 1
        self.backend.zero_grad()
        log0(f"step {state.step}: non-finite loss, update skipped ({state.nan_streak} in a row)")
        if state.nan_streak >= tc.max_nan_steps:
            self.backend.wait()  # publish a pending async checkpoint (every rank stops here together)
            raise StopTraining(f"{state.nan_streak} non-finite losses in a row (train.max_nan_steps="
                               f"{tc.max_nan_steps}); last good checkpoint: {self.backend.ckpt.latest()}")

    def _log(self, grad_norm: float, extra: dict) -> None:
        """metrics.jsonl / wandb and the console line of a logged step."""
        state = self.state
        self.metrics.log({"loss": self.last_loss, "lr": self.backend.lr(), "grad_norm": grad_norm,
                          "samples_seen": state.samples_seen, "nan_total": state.nan_total, **extra}, state.step)
        log0(self.progress.line(state.step, self.last_loss, self.images_per_step,
                                self.images_per_step * self.mcfg.kept_tokens, self.flops, self.peak))

    def _start(self) -> Path | None:
        """Resume and announce the run; the checkpoint resumed from."""
        resumed = self.resume()
        self.progress = Progress(self.tc.steps, self.state.step)
        log0(f"{self.mcfg.name}: {sum(getattr(p, 'ds_numel', p.numel()) for p in self.model.parameters())} params, "
             f"{self.world} ranks, ep {self.pcfg.ep}, engine {self.pcfg.engine}, {self.images_per_step} images/step, "
             f"run dir {self.run_dir}")
        # Each node's agent counts only the restarts its own workers' failures caused: the most of them.
        restarts = over_ranks(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), dist.ReduceOp.MAX, self.world,
                              self.device)
        if restarts:
            log0(f"worker group restart {restarts} (torchrun --max-restarts): "
                 + (f"continuing from {resumed}" if resumed is not None else "no checkpoint yet, from the start"))
        return resumed

    def fit(self) -> dict:
        """Resume, train to train.steps (or until a signal), checkpoint, check the replicas, sample; the
        run's summary."""
        tc = self.tc
        last_saved = self.state.step if self._start() is not None else -1
        state = self.state
        self.watchdog.start(state.step)
        ranks_out_of_data = 0
        if state.step < tc.steps:
            self.batches = StepBatches(self.loader, tc.grad_accum)
            # A resumed stream may have ended: how many ranks have no data for a first step.
            ranks_out_of_data = over_ranks(self.batches.out_of_data, dist.ReduceOp.SUM, self.world, self.device)
        timeout_set = self.world == 1
        while state.step < tc.steps and not ranks_out_of_data:
            stop, ranks_out_of_data = self.train_step(self.batches)
            if not timeout_set:  # start-up is over: the training timeout from here on
                set_collective_timeout(self.pcfg.timeout_s)
                timeout_set = True
            if state.step % tc.ckpt_every == 0 or state.step == tc.steps or stop or ranks_out_of_data:
                self.save()
                last_saved = state.step
            self.watchdog.beat(state.step)
            if stop:
                log0(f"signal received: checkpoint saved at step {state.step}; exiting (resume: same command)")
                break
            sample_now = tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps
            if sample_now and not ranks_out_of_data:
                self.sample_outputs()
        self.watchdog.stop()
        self.backend.wait()
        if last_saved != state.step:
            self.save()
            self.backend.wait()
        if tc.check_replicas:
            _check_replicas(self.backend.net)
        return self.summary(ranks_out_of_data)

    def summary(self, ranks_out_of_data: int = 0) -> dict:
        """Paths, losses, steps, data counts and end state (`status`: what run_dir/status.json records) of
        the run; the final samples once it is finished."""
        state, tc = self.state, self.tc
        out = {"run_dir": str(self.run_dir), "checkpoints": str(self.run_dir / CHECKPOINTS), "step": state.step,
               "first_loss": self.first_loss, "last_loss": self.last_loss, "wandb_dir": self.metrics.wandb_dir,
               "stopped_by_signal": self.signals.received is not None,
               "data": named_counts(sum_over_ranks(data_counts(self.loader, self.device), self.world))}
        finished = self.signals.received is None and (state.step >= tc.steps or ranks_out_of_data > 0)
        out["status"] = {"state": "finished" if finished else "stopped", "step": state.step, "steps": tc.steps}
        if ranks_out_of_data:
            # Over all ranks and every run of this stream: samples in the batches the steps trained on, and
            # those no step trained on (left by the ranks that still had data, fetched ahead, or in a last
            # partial batch that data.drop_last drops).
            counts = torch.tensor([self.batches.trained(), self.batches.unread()], device=self.device)
            trained, unread = sum_over_ranks(counts, self.world)
            end = {"samples_delivered": int(trained), "samples_unread": int(unread)}
            log0(f"data exhausted after step {state.step}: {ranks_out_of_data} of {self.world} ranks had no data "
                 f"for another step (data.epochs={self.cfg.data.epochs}); {end['samples_delivered']} samples "
                 f"trained on, {end['samples_unread']} not (left by the ranks that still had data, or in "
                 f"a last partial batch); every rank stopped after the same step; final checkpoint saved")
            out["status"].update(reason="data exhausted", **end, ranks_dry=ranks_out_of_data)
            out["data_exhausted"] = out["status"]
        if finished:
            out.update(self.sample_outputs())
        self.metrics.close()
        return out

    def sample_outputs(self) -> dict:
        """The sample grid and expert heatmap at this step (collective); none without train.sample_prompts."""
        if not self.tc.sample_prompts:
            return {}
        return training_samples(self.cfg, self.model, self.metrics, self.run_dir, self.rank, self.state.step,
                                self.device)


def _check_replicas(net: torch.nn.Module) -> None:
    """Stop with the names of the replicated tensors whose copies differ between ranks (a wrong gradient
    reduction); log that they agree otherwise."""
    bad = diverged(net)
    if bad:
        raise StopTraining(f"{len(bad)} replicated weights or buffers differ between ranks (first: {bad[0]}): "
                           f"the ranks trained apart; the checkpoints of this run keep one copy only")
    if dist.is_initialized() and dist.get_world_size() > 1:
        log0("replicas: every copy of every replicated weight and buffer is identical across ranks")
