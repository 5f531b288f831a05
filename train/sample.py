"""Generate images from a trained EC-DiT: classifier-free guidance + Euler steps of the rectified flow.

    python -m train.sample --checkpoint runs/x/checkpoints --prompts "a red circle" "two blue squares"
    python -m train.sample --checkpoint export/ --prompt-file prompts.txt --steps 30 --guidance 4 --out samples/

`--checkpoint` is a `step_*` directory written by train/checkpoint.py (the model is built from its
config.json["model_resolved"], or ["model"] when that is a full DiTConfig dict), a run's checkpoint root (its latest complete step is used), or a safetensors
export folder (model.safetensors + config.json). Writes `000_<slug>.png` per prompt (native
resolution), `grid.png` (captioned, upscaled) and `samples.json`; `--heatmap` adds `experts.png`
(per image and MoE layer, how many experts processed each token: the paper's Fig. 6).

Weights: `--weights ema` (the default; the sampler, evaluator, routing study and export all load through
`load_model`) takes the EMA of the parameters that the torch engine saves with train.ema_decay > 0 and
falls back to the raw weights, with a printed note, when the checkpoint has none; `--weights raw` takes
the trained parameters. Buffers, the routers' dynamic-inference thresholds among them, come from the raw
model state either way (the EMA covers parameters only). samples.json records which weights were used.

Determinism: the noise of prompt i comes from a generator seeded with (seed, i). With the default
`--routing sample` every image is routed on its own, so an image does not depend on the batch size
or on the other prompts. `tokens` (fixed groups of --group-size tokens, as in training) and `batch`
route across the images of a batch (and across the conditional/unconditional halves of CFG).

From Python (e.g. periodic sample grids in the trainer):

    images = generate(model, text_encoder, vae, prompts, steps=20, guidance=4.0, seed=0)  # [N, 3, H, W]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from model.config import INFERENCE_MODES, ConfigError, DiTConfig, config_from_dict
from model.dit import DiT, build_model
from model.flops import sample_flops_per_image
from model.flow import cfg_velocity, euler_sample, interpolate
from model.routing import InferenceRouting, LoadMeter
from train.checkpoint import STEP_PREFIX, exported_weights, load_exported, load_weights, saved_ema_names
from train.visualize import expert_heatmap_layers, image_grid, moe_layer_names, save_png

# DataConfig fields the sampler takes from a run's config.json["data"] (encoders only; no shards).
DATA_KEYS = ("text_encoder", "text_encoder_path", "max_text_len", "vae", "vae_path", "image_size", "encoder_dtype")


class SampleError(ValueError):
    """Bad sampler input; the message names the option."""


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


# ---- loading ------------------------------------------------------------------------------------

def _step_dirs(root: Path) -> list[Path]:
    """Complete `step_*` checkpoints under `root`, oldest first (listing only: no Checkpointer, whose
    constructor would clean a live run's in-progress saves)."""
    found = [p for p in root.glob(STEP_PREFIX + "*")
             if (p / "meta.json").is_file() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("export" | "step", folder) for a --checkpoint argument."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"--checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "export", path.parent
        raise SampleError(f"--checkpoint {path} is a file; give a step_* directory, a checkpoint root or an "
                          f"export folder")
    if (path / "model.safetensors").is_file():
        return "export", path
    if (path / "meta.json").is_file():
        return "step", path
    steps = _step_dirs(path)
    if steps:
        return "step", steps[-1]
    raise SampleError(f"--checkpoint {path} holds no complete step_* checkpoint (with meta.json) and no "
                      f"model.safetensors export")


WEIGHTS = ("ema", "raw")


def pick_weights(kind: str, folder: Path, weights: str, log: Callable[[str], None] = print) -> str:
    """The weights to load for --weights: "ema" when the checkpoint holds them, else "raw" with a printed
    note; an export holds one set, and asking it for raw weights it does not hold is an error."""
    if weights not in WEIGHTS:
        raise SampleError(f"--weights {weights!r} must be one of {WEIGHTS}")
    held = ({exported_weights(folder)} if kind == "export"
            else {"raw", "ema"} if saved_ema_names(folder) else {"raw"})
    if weights in held:
        return weights
    if weights == "raw":
        raise SampleError(f"--weights raw: the export {folder} holds EMA weights only; export the checkpoint "
                          f"again with --weights raw")
    log(f"--weights ema: {folder} holds no EMA weights (trained with train.ema_decay=0 or by "
        f"DeepSpeed); using the raw weights")
    return "raw"


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema",
               log: Callable[[str], None] = print) -> tuple[DiT, dict, Path, str]:
    """(model in eval mode, run config dict ({} for an export), resolved folder, weights loaded: "ema" or
    "raw") for --checkpoint and --weights (see `pick_weights`; buffers such as the routers' thresholds
    come from the raw model state: `train.checkpoint.load_weights`)."""
    kind, folder = resolve_checkpoint(path)
    if kind == "export":
        if not (folder / "config.json").is_file():
            raise SampleError(f"--checkpoint {folder}: export has model.safetensors but no config.json")
        used = pick_weights(kind, folder, weights, log)
        return load_exported(folder, device=device).eval(), {}, folder, used
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise SampleError(f"--checkpoint {folder} has no config.json (the run config with the model under "
                          f"'model'); save with Checkpointer.save(..., config=...)")
    run_cfg = json.loads(cfg_file.read_text())
    # The training app stores its model group (preset + overrides) under "model" and the full DiTConfig
    # under "model_resolved"; a plain run config holds the DiTConfig under "model".
    key = "model_resolved" if isinstance(run_cfg, dict) and "model_resolved" in run_cfg else "model"
    if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get(key), dict):
        raise SampleError(f"--checkpoint {folder}: config.json has no 'model_resolved' or 'model' section")
    try:
        cfg = config_from_dict(run_cfg[key])
    except (ConfigError, TypeError) as e:
        raise SampleError(f"--checkpoint {folder}: config.json[{key!r}] is not a model config: {e}") from None
    used = pick_weights(kind, folder, weights, log)
    model = build_model(cfg, device=device)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            load_weights(folder, model, ema=used == "ema")
        except ValueError as e:
            raise SampleError(f"--weights ema: {e}") from None
    return model.eval(), run_cfg, folder, used


def data_config(run_cfg: dict, model_cfg: DiTConfig, **overrides):
    """DataConfig for the encoders: the run's config.json["data"] (encoder fields only), else the
    DataConfig defaults with max_text_len = the model's text_len; non-None `overrides` win."""
    from data.config import DataConfig

    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    kw = {k: data[k] for k in DATA_KEYS if k in data}
    kw.setdefault("max_text_len", model_cfg.text_len)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DataConfig(**kw)
    except ValueError as e:
        raise SampleError(f"data options: {e}") from None


def check_compatible(cfg: DiTConfig, text_encoder, vae, dcfg) -> None:
    """The encoders must produce what the model was built for."""
    dim = getattr(text_encoder, "dim", None)
    if dim is not None and dim != cfg.text_dim:
        raise SampleError(f"--text-encoder {dcfg.text_encoder} gives {dim}-dim embeddings but the model has "
                          f"text_dim={cfg.text_dim}; pass the run's --text-encoder / --text-encoder-path")
    ch = getattr(vae, "latent_channels", None)
    if ch is not None and ch != cfg.in_channels:
        raise SampleError(f"--vae {dcfg.vae} has {ch} latent channels but the model has "
                          f"in_channels={cfg.in_channels}; pass the run's --vae / --vae-path")


# ---- CLI ----------------------------------------------------------------------------------------

def slug(text: str, max_len: int = 40) -> str:
    """File-name-safe lowercase slug of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "prompt"


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    out = [p for p in (prompts or []) if p.strip()]
    if prompt_file is not None:
        f = Path(prompt_file)
        if not f.is_file():
            raise SampleError(f"--prompt-file {f} does not exist")
        lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
        if not lines:
            raise SampleError(f"--prompt-file {f} has no prompts (one per line)")
        out += lines
    if not out:
        raise SampleError("no prompts: pass --prompts \"a red circle\" ... or --prompt-file FILE")
    return out


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --weights (sampler, evaluator, export)."""
    p.add_argument("--checkpoint", required=True,
                   help="a step_* checkpoint dir, a run's checkpoint root (latest step), or a safetensors export folder")
    p.add_argument("--weights", choices=WEIGHTS, default="ema",
                   help="the EMA of the parameters or the raw ones; ema falls back to raw, with a note, when the "
                        "checkpoint has no EMA")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the sampler and the evaluator: checkpoint, Euler/CFG settings, MoE routing."""
    add_checkpoint_args(p)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule (>1: more steps at high noise)")
    p.add_argument("--seed", type=int, default=0, help="noise of image i is seeded with (seed, i)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (x2 with CFG)")
    p.add_argument("--routing", choices=INFERENCE_MODES, default="sample",
                   help="MoE inference routing: sample = capacity per image, dynamic = per-expert thresholds "
                        "(both batch-independent), tokens = groups of --group-size tokens across the batch")
    p.add_argument("--dynamic-multiplier", type=float, default=None,
                   help="--routing dynamic: threshold multiplier (>1 fewer tokens per expert, <1 more; "
                        "default the model's, 1.0)")
    p.add_argument("--group-size", type=int, default=None,
                   help="tokens per routing group with --routing tokens (default: the model's inference_group_size)")
    p.add_argument("--device", default="cpu")


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (default: the run's config.json 'data', else the DataConfig defaults)")
    g.add_argument("--text-encoder", choices=("minilm", "t5"), default=None)
    g.add_argument("--text-encoder-path", default=None)
    g.add_argument("--max-text-len", type=int, default=None)
    g.add_argument("--vae", choices=("pixel", "kl"), default=None)
    g.add_argument("--vae-path", default=None)


def check_generation_args(args: argparse.Namespace) -> None:
    if args.group_size is not None and args.routing != "tokens":
        raise SampleError(f"--group-size is only used with --routing tokens (got --routing {args.routing})")
    if args.dynamic_multiplier is not None and (args.routing != "dynamic" or args.dynamic_multiplier <= 0):
        raise SampleError(f"--dynamic-multiplier={args.dynamic_multiplier} needs --routing dynamic and a value > 0")
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None) -> int:
    """Parse and run; bad input (SampleError, ConfigError, a missing file) is one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (SampleError, ConfigError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m train.sample", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generation_args(p)
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to sample")
    p.add_argument("--prompt-file", default=None, help="text file with one prompt per line")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--nrow", type=int, default=8, help="images per row of grid.png")
    p.add_argument("--heatmap", action="store_true",
                   help="also write experts.png: experts per token of each MoE layer (Fig. 6), routed per sample")
    p.add_argument("--heatmap-t", type=float, default=0.5, help="noise level t of the heatmap forward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (one graph per block; not with --routing dynamic)")
    add_encoder_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    check_generation_args(args)
    for name in ("nrow",):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not 0.0 <= args.heatmap_t <= 1.0:
        raise SampleError(f"--heatmap-t={args.heatmap_t} must be in [0, 1]")
    if args.compile and args.routing == "dynamic":
        raise SampleError("--compile needs a fixed routing group: --routing dynamic sizes each expert's "
                          "work from the data (a host sync); drop --compile or pick another --routing")
    prompts = read_prompts(args.prompts, args.prompt_file)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SampleError(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {args.device}: CUDA is not available on this machine")

    t0 = time.perf_counter()
    model, run_cfg, folder, weights = load_model(args.checkpoint, device, args.weights)
    cfg: DiTConfig = model.cfg
    if args.compile:
        from parallel.compile import compile_blocks
        compile_blocks(model)
    print(f"[sample] model {cfg.name} from {folder}, {weights} weights ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, {cfg.num_moe_blocks} MoE layers) in {time.perf_counter() - t0:.1f}s")
    dcfg = data_config(run_cfg, cfg, text_encoder=args.text_encoder, text_encoder_path=args.text_encoder_path,
                       max_text_len=args.max_text_len, vae=args.vae, vae_path=args.vae_path)
    from data.encoders import load_text_encoder, load_vae

    text_encoder, vae = load_text_encoder(dcfg, device), load_vae(dcfg, device)
    check_compatible(cfg, text_encoder, vae, dcfg)
    print(f"[sample] {len(prompts)} prompts, text encoder {dcfg.text_encoder}, vae {dcfg.vae}, {args.steps} steps, "
          f"guidance {args.guidance}, routing {args.routing}, seed {args.seed}")

    meter = LoadMeter(cfg.num_moe_blocks)
    latents = generate_latents(model, text_encoder, prompts, args.steps, args.guidance, args.seed,
                               args.batch_size, args.routing, args.group_size, args.shift, log=print,
                               multiplier=args.dynamic_multiplier, meter=meter)
    load = meter.summary()
    images = decode(vae, latents, args.batch_size)  # [N, 3, H, W]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        name = f"{i:03d}_{slug(prompt)}.png"
        save_png(image_grid(img[None], nrow=1, pad=0, scale=1), out / name)
        records.append({"index": i, "prompt": prompt, "file": name, "seed": args.seed})
    save_png(image_grid(images, nrow=args.nrow, captions=prompts), out / "grid.png")
    files = [out / "grid.png"]
    if args.heatmap and cfg.moe is not None:
        counts = []
        for s in range(0, len(prompts), args.batch_size):
            counts.append(routing_maps(model, text_encoder, prompts[s:s + args.batch_size],
                                       latents[s:s + args.batch_size], args.heatmap_t, args.seed, "sample"))
        per_layer = [torch.cat([c[li] for c in counts]) for li in range(len(counts[0]))]
        heat = expert_heatmap_layers(per_layer, len(prompts), cfg.grid, cfg.moe.num_experts, images,
                                     layer_names=moe_layer_names(len(per_layer), cfg.moe_every))
        files.append(save_png(heat, out / "experts.png"))
    meta = {"checkpoint": str(folder), "weights": weights, "model": cfg.name, "steps": args.steps, "guidance": args.guidance,
            "shift": args.shift, "seed": args.seed, "routing": args.routing, "group_size": args.group_size,
            "dynamic_multiplier": args.dynamic_multiplier, "experts_per_token": load.get("experts_per_token"),
            # per image and Euler step (cond + uncond): with the expert slots computed, and the useful ones
            "flops_per_image_step": sample_flops_per_image(cfg, args.routing, load.get("slots_run_per_token")),
            "useful_flops_per_image_step": sample_flops_per_image(cfg, args.routing, load.get("experts_per_token")),
            "data": {k: getattr(dcfg, k) for k in DATA_KEYS}, "samples": records}
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    files.append(out / "samples.json")
    print(f"[sample] wrote {len(records)} images to {out}/ ({', '.join(f.name for f in files)}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
