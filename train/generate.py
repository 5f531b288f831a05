"""The generation library: classifier-free guidance + Euler steps of the rectified flow, per-prompt noise,
MoE inference routing, VAE decoding and per-token expert counts (the sampler, evaluator, study and trainer
call it).

Determinism: the noise of prompt i comes from a generator seeded with (seed, i). With the default
routing "sample" every image is routed on its own, so an image does not depend on the batch size
or on the other prompts. "tokens" (fixed groups of `group_size` tokens, as in training) and "batch"
route across the images of a batch (and across the conditional/unconditional halves of CFG).

    images = generate(model, text_encoder, vae, prompts, steps=20, guidance=4.0, seed=0)  # [N, 3, H, W]
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch

from model.config import INFERENCE_MODES, DiTConfig
from model.dit import DiT
from model.flow import cfg_velocity, euler_sample, interpolate
from model.routing import InferenceRouting, LoadMeter


class SampleError(ValueError):
    """Bad generation, loading or command-line input; the message names the option."""


# ---- noise and routing --------------------------------------------------------------------------

def noise_seed(seed: int, index: int) -> int:
    """64-bit generator seed of prompt `index` under run seed `seed` (NumPy SeedSequence of the pair)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1, np.uint64)[0])


def prompt_noise(seed: int, index: int, shape_CHW: Sequence[int]) -> torch.Tensor:
    """Initial noise [C, H, W] (fp32, CPU) of prompt `index`: independent of the batch it is in."""
    g = torch.Generator().manual_seed(noise_seed(seed, index))
    return torch.randn(tuple(shape_CHW), generator=g)


def _check_routing(routing: str, multiplier: float | None) -> None:
    if routing not in INFERENCE_MODES:
        raise SampleError(f"routing={routing!r} must be one of {INFERENCE_MODES}")
    if multiplier is not None and multiplier <= 0:
        raise SampleError(f"dynamic multiplier={multiplier} must be > 0")


@contextmanager
def inference_routing(model: DiT, routing: str, group_size: int | None = None, multiplier: float | None = None,
                      meter: LoadMeter | None = None):
    """Eval mode; yields the model as a callable whose forwards route the MoE layers by `routing`
    (InferenceRouting: tokens (the paper's G), sample (per image), batch, dynamic (thresholds)), with
    `meter` recording their expert work. The model's train/eval mode is restored after."""
    _check_routing(routing, multiplier)
    was_training = model.training
    model.eval()
    try:
        yield functools.partial(model, routing=InferenceRouting(routing, group_size, multiplier, meter))
    finally:
        model.train(was_training)


def _check_group_size(routing: str, group_size: int | None, batch_sizes: set[int], tokens: int) -> None:
    """In "tokens" mode the 2*b*S tokens of a CFG batch of b prompts must split into whole groups."""
    if routing != "tokens" or group_size is None:
        return
    for b in sorted(batch_sizes):
        total = 2 * b * tokens
        if total > group_size and total % group_size:
            raise SampleError(
                f"group_size={group_size} must divide the {total} tokens of a batch of {b} prompts "
                f"(x2 for CFG, {tokens} tokens per image); change --group-size or --batch-size")


# ---- generation ---------------------------------------------------------------------------------

@torch.no_grad()
def generate_latents(model: DiT, text_encoder: Callable, prompts: Sequence[str], steps: int = 20,
                     guidance: float = 4.0, seed: int = 0, batch_size: int = 8, routing: str = "sample",
                     group_size: int | None = None, shift: float = 1.0,
                     log: Callable[[str], None] | None = None, multiplier: float | None = None,
                     meter: LoadMeter | None = None) -> torch.Tensor:
    """Latents [N, C, h, w] (fp32, CPU) for `prompts` (see `generate`)."""
    _check_routing(routing, multiplier)
    if not prompts:
        raise SampleError("no prompts to sample")
    if batch_size < 1:
        raise SampleError(f"batch_size={batch_size} must be >= 1")
    if steps < 1:
        raise SampleError(f"steps={steps} must be >= 1")
    if group_size is not None and group_size < 1:
        raise SampleError(f"group_size={group_size} must be >= 1")
    cfg: DiTConfig = model.cfg
    N = len(prompts)
    if routing == "tokens" and cfg.moe is not None:
        G = group_size if group_size is not None else cfg.moe.inference_group_size
        _check_group_size(routing, G, {min(batch_size, N), N % batch_size or batch_size}, cfg.num_tokens)
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out: list[torch.Tensor] = []
    with inference_routing(model, routing, group_size, multiplier, meter) as net:
        for start in range(0, N, batch_size):
            batch = list(prompts[start:start + batch_size])
            t0 = time.perf_counter()
            emb_BLD, mask_BL = text_encoder(batch)
            emb_BLD, mask_BL = emb_BLD.to(device, dtype), mask_BL.to(device)
            noise_BCHW = torch.stack([prompt_noise(seed, start + j, shape) for j in range(len(batch))])
            x = euler_sample(cfg_velocity(net, emb_BLD, mask_BL, guidance), noise_BCHW.to(device, dtype),
                             steps, shift)
            out.append(x.float().cpu())
            if log is not None:
                log(f"[sample] {start + len(batch)}/{N} prompts ({steps} steps, {time.perf_counter() - t0:.1f}s)")
    return torch.cat(out)


@torch.no_grad()
def generate(model: DiT, text_encoder: Callable, vae, prompts: Sequence[str], steps: int = 20,
             guidance: float = 4.0, seed: int = 0, batch_size: int = 8, routing: str = "sample",
             group_size: int | None = None, shift: float = 1.0,
             log: Callable[[str], None] | None = None, multiplier: float | None = None,
             meter: LoadMeter | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] (fp32, CPU) for `prompts`, with CFG scale `guidance` and
    `steps` Euler steps; prompt i starts from `prompt_noise(seed, i)`.

    text_encoder(captions) -> (emb [B, L, text_dim], mask [B, L]); vae.decode(latents) -> images.
    `routing` is the MoE inference routing ("sample": capacity per image, batch-independent; "tokens"
    with `group_size`, default the model's inference_group_size: the paper's; "batch"; "dynamic":
    per-expert thresholds scaled by `multiplier`, batch-independent); `meter` records the expert work.
    The model's train/eval mode is restored afterwards.
    """
    latents = generate_latents(model, text_encoder, prompts, steps, guidance, seed, batch_size, routing,
                               group_size, shift, log, multiplier, meter)
    return decode(vae, latents, batch_size)


@torch.no_grad()
def decode(vae, latents_NCHW: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE-decode in batches -> images [N, 3, H, W] in [-1, 1] (fp32, CPU)."""
    return torch.cat([vae.decode(latents_NCHW[i:i + batch_size]).float().cpu()
                      for i in range(0, latents_NCHW.shape[0], batch_size)])


@torch.no_grad()
def routing_maps(model: DiT, text_encoder: Callable, prompts: Sequence[str], latents_NCHW: torch.Tensor,
                 t: float = 0.5, seed: int = 0, routing: str = "sample", group_size: int | None = None,
                 multiplier: float | None = None) -> list[torch.Tensor]:
    """Per MoE layer, expert_count [N*S] (experts that took each token) of one conditional forward on
    the noised latents x_t = (1 - t) * latents + t * noise (noise of prompt i as in `generate`)."""
    p = next(model.parameters())
    with inference_routing(model, routing, group_size, multiplier) as net:
        N = latents_NCHW.shape[0]
        emb_BLD, mask_BL = text_encoder(list(prompts))
        noise = torch.stack([prompt_noise(seed, i, latents_NCHW.shape[1:]) for i in range(N)])
        x_t = interpolate(latents_NCHW.float(), noise, torch.full((N,), float(t)))
        out = net(x_t.to(p.device, p.dtype), torch.full((N,), float(t), device=p.device, dtype=p.dtype),
                  emb_BLD.to(p.device, p.dtype), mask_BL.to(p.device), collect_stats=True)
    return [s["expert_count"].cpu() for s in out.moe_stats]


def training_samples(cfg, model, metrics, run_dir, rank, step, device) -> dict:
    """Sample grid for the fixed prompts and the expert-count heatmap of the paper's Fig. 6 (every rank
    computes, since the sharded model's forward is collective; rank 0 writes)."""
    from data import load_text_encoder, load_vae

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
