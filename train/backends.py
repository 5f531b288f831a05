"""The trainer's two engines behind one interface: optimizer step, LR schedule, and checkpoints.

* `TorchBackend`: the model as parallelized by parallel/ (FSDP2 + expert parallelism, or plain
  replicas), torch optimizer + LambdaLR, EMA, DCP checkpoints (train/checkpoint.py).
* `DeepSpeedBackend`: `deepspeed.initialize` with ZeRO 2/3 (parallel/deepspeed.py; ZeRO-2 also with
  expert parallelism): DeepSpeed owns the optimizer (AdamW), the warmup schedule, gradient clipping and
  accumulation (one DeepSpeed step per trainer step, skipped when a micro-batch was non-finite), and its
  checkpoints (published when meta.json is written, last); the EMA is kept here (under ZeRO-3 of each
  rank's fp32 partitions: parallel/deepspeed.py ema_params), updated like the torch engine's and saved
  with DeepSpeed's checkpoint.

Both save through one `Checkpointer` (train/checkpoint.py), which owns the step directories, their file
records and publishing: the torch engine with its DCP storage, DeepSpeed with `DeepSpeedStorage`, a writer /
reader pair of DeepSpeed's own checkpoint. `make_backend` builds the configured one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.distributed._composable.replicate import DDP as Replicated
from torch.optim.swa_utils import get_ema_multi_avg_fn

from parallel.distributed import clip_grad_norm_

from .checkpoint import Checkpointer, saved_train_states
from .weights import saved_ema_names


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The multi-tensor (foreach) implementation on every device: torch picks it only on CUDA by default, but
    on CPU it is the same arithmetic with one DTensor dispatch per op instead of one per parameter (the
    quickstart's step: 1.62 -> 1.71 step/s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=True)


def lr_schedule(opt: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of both engines (DeepSpeed is handed this scheduler): update k (1, 2, ...) uses
    lr * k / warmup_steps during the warmup, then lr (constant) or a cosine from lr towards min_lr_ratio * lr
    (update k at progress (k - 1 - warmup_steps) / (steps - warmup_steps): the floor comes after the last)."""
    warm, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], named_params, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for every (name, param): torch's multi-tensor EMA
    (`torch.optim.swa_utils.get_ema_multi_avg_fn`, one foreach lerp, so one DTensor dispatch per step
    instead of one per parameter)."""
    pairs = [(ema[n], p.detach().to(ema[n].dtype)) for n, p in named_params]
    if pairs:
        get_ema_multi_avg_fn(decay)([e for e, _ in pairs], [p for _, p in pairs], None)


def last_update_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the last optimizer update used (what both engines log)."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](max(0, sched.last_epoch - 1))


class TorchBackend:
    def __init__(self, model, opt, sched, ema: dict | None, ckpt: Checkpointer, grad_clip: float | None):
        self.net, self.opt, self.sched, self.ema, self.ckpt = model, opt, sched, ema, ckpt
        self.grad_clip = grad_clip or 0.0  # optim.grad_clip (0: measure the norm only)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def sync_grads(self, enabled: bool) -> None:
        """Whether the backward of the next forward reduces gradients across DDP replicas: only the last
        micro-batch of an accumulation does. (FSDP2 reduce-scatters every micro-batch, which keeps its
        gradients sharded.)"""
        if isinstance(self.net, Replicated):
            self.net.set_requires_gradient_sync(enabled)

    def micro_step(self, loss: torch.Tensor, accum: int) -> torch.Tensor:
        """Backward of this micro-batch's share; whether its loss is finite (a bool tensor)."""
        (loss / accum).backward()
        return torch.isfinite(loss.detach())

    def clip_grads(self) -> torch.Tensor:
        """Clip the accumulated (data-parallel reduced) gradients; their global norm, not read."""
        return clip_grad_norm_(self.net.parameters(), self.grad_clip)

    def apply(self, ema_decay: float) -> None:
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            ema_update(self.ema, self.net.named_parameters(), ema_decay)

    def lr(self) -> float:
        return last_update_lr(self.sched)

    def save(self, step: int, train_state: dict, config: dict) -> None:
        train_state["schedule"] = self.sched.state_dict()
        self.ckpt.save(step, self.net, self.opt, train_state=train_state, config=config,
                       extra={"ema": self.ema} if self.ema is not None else None)

    def load(self, path: Path) -> dict | None:
        """Model, optimizer, schedule and EMA; an EMA switched on at this resume (the checkpoint has none)
        starts from the loaded weights."""
        has_ema = self.ema is not None and bool(saved_ema_names(path))
        saved = self.ckpt.load(path, self.net, self.opt, extra={"ema": self.ema} if has_ema else None)
        if self.ema is not None and not has_ema:
            with torch.no_grad():
                for n, p in self.net.named_parameters():
                    self.ema[n].copy_(p.detach())
        # At another world size: the schedule is the same on every rank; take rank 0's.
        self.sched.load_state_dict((saved or saved_train_states(path)[0])["schedule"])
        return saved

    def wait(self) -> None:
        self.ckpt.wait()


class DeepSpeedStorage:
    """DeepSpeed's checkpoint as the Checkpointer's writer / reader pair (parallel/deepspeed.py save / load):
    the ZeRO states, the experts of every expert-parallel rank and the EMA (`extra["ema"]`)."""

    engine = "deepspeed"

    def write(self, folder: Path, engine, optimizer=None, extra: dict | None = None) -> None:
        from parallel.deepspeed import save
        save(engine, folder.parent, folder.name, ema=(extra or {}).get("ema"))

    def read(self, folder: Path, engine, optimizer=None, extra: dict | None = None) -> None:
        """An EMA switched on at this resume (the checkpoint has none) starts from the loaded weights."""
        from parallel.deepspeed import load
        load(engine, folder.parent, folder.name, ema=(extra or {}).get("ema"))


class DeepSpeedBackend:
    def __init__(self, model, conf: dict, root: Path, keep_last: int, schedule, ema: bool = False):
        """`schedule(optimizer) -> LR scheduler`: DeepSpeed steps it after every update and checkpoints it.
        `ema`: keep an fp32 EMA of what `ema_params` gives (ZeRO-2: every rank's full dense parameters and
        its experts; ZeRO-3: its own partitions)."""
        from parallel.deepspeed import build_engine, ema_params
        self.engine = build_engine(model, conf, lr_scheduler=schedule)
        self.net = self.engine
        self.ema = {n: t.detach().float().clone() for n, t in ema_params(self.engine)} if ema else None
        self.ckpt = Checkpointer(root, keep_last, storage=DeepSpeedStorage())
        self.bf16 = self.engine.bfloat16_enabled()

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes the gradients at its accumulation boundary

    def sync_grads(self, enabled: bool) -> None:
        pass  # DeepSpeed reduces at its accumulation boundary

    def micro_step(self, loss: torch.Tensor, accum: int) -> torch.Tensor:
        """parallel/deepspeed.py micro_step (DeepSpeed scales by its own accumulation count)."""
        from parallel.deepspeed import micro_step
        return micro_step(self.engine, loss)

    def clip_grads(self) -> torch.Tensor:
        """The global gradient norm of the last update (DeepSpeed clipped inside its step)."""
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def apply(self, ema_decay: float) -> None:
        """DeepSpeed stepped at its accumulation boundary (micro_step); the EMA follows the new weights."""
        from parallel.deepspeed import ema_params
        if self.ema is not None:
            ema_update(self.ema, ema_params(self.engine), ema_decay)

    def lr(self) -> float:
        return last_update_lr(self.engine.lr_scheduler)

    def save(self, step: int, train_state: dict, config: dict) -> None:
        self.ckpt.save(step, self.engine, train_state=train_state, config=config,
                       extra={"ema": self.ema} if self.ema is not None else None)

    def load(self, path: Path) -> dict | None:
        """Model, optimizer, schedule and EMA; this rank's train state, or None when saved at another world
        size."""
        return self.ckpt.load(path, self.engine, extra={"ema": self.ema} if self.ema is not None else None)

    def wait(self) -> None:
        pass


def make_backend(cfg, model: torch.nn.Module, pcfg, device: torch.device, use_bf16: bool, root: Path):
    """(backend, autocast context) of parallel.engine for a parallelized `model`, checkpointing under `root`.
    DeepSpeed's JSON config comes from ours (ZeRO stage, micro batch, accumulation, AdamW, clipping, bf16);
    its LR schedule is this module's `lr_schedule`, handed over as a scheduler."""
    tc, o = cfg.train, cfg.optim
    if pcfg.engine == "fsdp":
        opt = make_optimizer(model, o)
        ema = {n: p.detach().clone() for n, p in model.named_parameters()} if tc.ema_decay > 0 else None
        backend = TorchBackend(model, opt, lr_schedule(opt, o, tc.steps), ema,
                               Checkpointer(root, keep_last=tc.keep_last, async_save=tc.async_ckpt), o.grad_clip)
        return backend, torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    from parallel.deepspeed import ds_config
    schedule = partial(lr_schedule, cfg=o, total_steps=tc.steps)
    # DeepSpeed casts the module itself (bf16 config): no autocast
    return DeepSpeedBackend(model, ds_config(stage=pcfg.zero_stage, micro_batch=cfg.data.batch_size,
                                             grad_accum=tc.grad_accum, lr=o.lr, bf16=use_bf16,
                                             grad_clip=o.grad_clip or None, weight_decay=o.weight_decay,
                                             betas=tuple(o.betas), eps=o.eps),
                            root, tc.keep_last, schedule=schedule, ema=tc.ema_decay > 0), nullcontext()


__all__ = ["TorchBackend", "DeepSpeedBackend", "DeepSpeedStorage", "ema_update", "make_backend",
           "make_optimizer"]
