"""GPU readiness suite: the CUDA paths of the project and EC-DiT-XL-8E's MFU, in one run of <= 8 minutes.

    bash bench/gpu.sh                                  # on the GPU machine (wheels from .whl/, results in $OUT)
    python bench/gpu_suite.py --out DIR [--stages a c] [--dry-run]

Every stage runs in its own process under its own time limit (STAGES), so a stage that fails or hangs
costs only its own time; within a stage every part is tried even when another fails. Stages, in order:
  a  environment: GPU, torch / CUDA / cuDNN / Triton, the SDPA kernel that runs our self-attention
     (GQA) and cross-attention (padding mask) in bf16 (read from the profiler's op names), and every
     torch API the project's source uses that this torch lacks;
  b  correctness: the megatron-core dispatcher (unpatched on GPU) at EP 1 against the local
     dispatcher, forward + backward; `python -m train` small-ec on the shapes data with a random T5 made
     on the spot, 20 steps in bf16 (torch engine) with a checkpoint at 10 and 20, resumed for 5 more;
     10 steps with the DeepSpeed engine (ZeRO-2, torchrun); 10 steps with train.compile=true (not in a
     dry run);
  c  bench/step.py in bf16: ec-xl-8e vs its dense-eq twin and tc-xl-8e, 128 kept tokens per image,
     text length 120: step time, MFU, EC / dense-eq; bmm vs grouped GEMM; eager vs compiled (with the
     top kernels of the compiled EC step); activation checkpointing on;
  d  sampling: 256 tokens, CFG x2, 20 Euler steps: EC-XL-8E (routing groups of 512 tokens, and per
     image) vs dense XL, wall time per image;
  e  memory: one training step (AdamW, bf16 autocast, no activation checkpointing) of ec-xl-8e at
     growing batches: peak memory and the largest batch that fits; ec-3xl-8e as a 4-block probe
     extrapolated to its 42 blocks (said so in the JSON).
Writes DIR/gpu_suite.json (flat figures, each stage's status and seconds) and DIR/gpu_suite.md (tables),
both rewritten after every stage. `--dry-run` runs every stage on CPU with tiny presets and a few steps.

Python packages the GPU machine lacks travel as wheels in .whl/ (bench/gpu.sh installs them into a
temporary site dir); made with the device README's `pip download` line for cp312 (antlr4 and deepspeed
have no wheel on PyPI: `pip wheel --no-deps` builds their pure-Python wheels), 7.8 MiB in all:
  hydra-core 1.3.8 (165 KiB), omegaconf 2.3.1 (78 KiB), antlr4-python3-runtime 4.9.3 (141 KiB),
  webdataset 1.0.2 (73 KiB), braceexpand 0.1.7 (6 KiB), megatron-core 0.16.1 cp312 (2.5 MiB),
  deepspeed 0.19.8 (2.1 MiB, DS_BUILD_OPS=0), hjson 3.1.0 (53 KiB), pydantic 2.14.4 (483 KiB),
  pydantic-core 2.50.5 cp312 (2.2 MiB), annotated-types 0.8.0 (13 KiB), typing-inspection 0.4.5 (15 KiB).
Not needed there: wandb (train.wandb_mode=disabled), diffusers (pixel VAE), the MiniLM weights (88 MiB:
stage b uses a random T5 instead).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# stage -> (title, seconds on the GPU, seconds in a dry run)
STAGES = {"a": ("environment", 25, 60), "b": ("correctness", 150, 150), "c": ("train step", 210, 150),
          "d": ("sampling", 40, 60), "e": ("memory", 55, 60)}


def log(msg: str) -> None:
    print(f"[gpu-suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- running things under a time limit ------------------------------------------------------------

def run_limited(cmd: list[str], limit_s: float, env: dict | None = None, capture: bool = False
                ) -> tuple[int | None, str]:
    """Run `cmd` in its own process group; kill the whole group after `limit_s`. Returns (exit code,
    or None on timeout; its output when `capture`, else "" (the output goes to ours))."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None)
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit_s))
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


class Parts:
    """Collects a stage's figures; `part(name)` runs one part, recording its error instead of raising."""

    def __init__(self, prefix: str):
        self.prefix, self.fig, self.tables = prefix, {}, []

    def put(self, **figures) -> None:
        self.fig.update({f"{self.prefix}_{k}": v for k, v in figures.items()})

    def part(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        log(f"{self.prefix}/{name} ...")
        try:
            out = fn(*args, **kw)
            self.put(**{f"{name}_s": round(time.perf_counter() - t0, 1)})
            log(f"{self.prefix}/{name} done in {time.perf_counter() - t0:.1f}s")
            return out
        except Exception as e:  # a failed part is a result, not the end of the stage
            self.put(**{f"{name}_error": f"{type(e).__name__}: {str(e).strip()[:400]}"})
            log(f"{self.prefix}/{name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
            return None


# ---- stage a: environment ---------------------------------------------------------------------------

def project_torch_names() -> set[str]:
    """Dotted torch names the project's source refers to: `torch.x.y` attribute chains and the names of
    `from torch... import` statements."""
    import ast

    names: set[str] = set()
    for folder in ("model", "parallel", "train", "data", "bench", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
                    names.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    names.update(a.name for a in node.names if a.name.split(".")[0] == "torch")
                elif isinstance(node, ast.Attribute):
                    parts, cur = [], node
                    while isinstance(cur, ast.Attribute):
                        parts.append(cur.attr)
                        cur = cur.value
                    if isinstance(cur, ast.Name) and cur.id == "torch":
                        names.add(".".join(["torch", *reversed(parts)]))
    return names


def resolves(name: str) -> bool:
    """Whether the dotted `name` is importable / reachable as attributes in this torch."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return True
        except AttributeError:
            return False
    return False


# Attributes reached through objects, invisible to the source scan above.
METHOD_APIS = ["torch.distributed.device_mesh.DeviceMesh._flatten", "torch.distributed.tensor.DTensor.from_local",
               "torch.distributed.tensor.DTensor.to_local", "torch.nn.Module.to_empty",
               "torch._dynamo.config.recompile_limit", "torch.compiler.set_stance"]


def missing_torch_apis() -> list[str]:
    """Every torch name the project uses (source scan + METHOD_APIS) that this torch cannot resolve,
    except names the project only uses where they exist (hasattr-guarded)."""
    names = project_torch_names() | set(METHOD_APIS)
    # Leaf names that are instance attributes or tensor methods, not module attributes.
    skip = {"torch.Tensor", "torch.nn.Module"}
    return sorted(n for n in names if n not in skip and not resolves(n))


def sdpa_ops(dev, dtype, preset: str) -> dict:
    """The SDPA op (flash / cudnn / efficient / math) that one block of `preset` runs for self-attention
    (GQA, no mask) and cross-attention (text padding mask), forward and backward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.config import get_preset
    from model.dit import build_model

    cfg = get_preset(preset, depth=1)
    model = build_model(cfg, device=dev, seed=0)
    B, L = 4, cfg.text_len
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
    ctx = torch.randn(B, L, cfg.text_dim, device=dev)
    mask = torch.arange(L, device=dev).expand(B, L) < torch.tensor([L, L // 2, 7, 1], device=dev).view(B, 1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, torch.rand(B, device=dev), ctx, mask, text_drop_B=torch.zeros(B, dtype=torch.bool,
                                                                                           device=dev))
        out.pred.float().square().mean().backward()
    found = {}
    for ev in prof.events():
        op = ev.name.split("::")[-1]
        if "scaled_dot_product" not in op or op == "scaled_dot_product_attention":
            continue
        if op.endswith("_backward"):
            kind = "backward"
        else:  # q [B, H, S, hd] and k [B, KV, S or L, hd]: self-attention when the lengths agree
            q, k = ev.input_shapes[0], ev.input_shapes[1]
            kind = "self_attention" if q[-2] == k[-2] else "cross_attention"
        found.setdefault(kind, set()).add(op)
    return {f"sdpa_{k}_ops": ", ".join(sorted(v)) for k, v in found.items()}


def stage_a(dry: bool, work: Path) -> Parts:
    import torch

    from bench.common import environment

    p = Parts("a")
    dev = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    env = environment(str(dev))
    p.put(**env, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None)
    try:
        import triton
        p.put(triton=triton.__version__)
    except ImportError:
        p.put(triton=None)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        p.put(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
              sm_count=props.multi_processor_count)
    missing = p.part("api_check", missing_torch_apis)
    if missing is not None:
        p.put(missing_torch_apis=", ".join(missing) or "none")
    ops = p.part("sdpa", sdpa_ops, dev, torch.float32 if dry else torch.bfloat16, "tiny-ec" if dry else "ec-xl-8e")
    if ops:
        p.put(**ops)
    rows = [f"| {k} | {v} |" for k, v in p.fig.items()]
    p.tables.append("| environment | |\n| --- | --- |\n" + "\n".join(rows))
    return p


# ---- stage b: correctness ---------------------------------------------------------------------------

def make_shapes_and_t5(work: Path, samples: int) -> tuple[str, str]:
    """The shapes shards and a random T5 (its tokenizer trained on the captions), made on the spot."""
    from data.encoders import save_random_t5
    from data.synthetic import generate_sample, write_shards

    pattern = write_shards(str(work / "shapes"), samples, samples // 4, 32, seed=0, progress=False)
    t5 = save_random_t5(str(work / "t5"), [generate_sample(i, 0, 32)[1] for i in range(300)], d_model=64)
    return pattern, t5


def train_args(pattern: str, t5: str, dry: bool) -> list[str]:
    args = ["model=small-ec", "data=shapes", f"data.shards='{pattern}'", "data.text_encoder=t5",
            f"data.text_encoder_path={t5}", "train.wandb_mode=disabled", "train.log_every=1",
            "train.sample_steps=2", "train.sample_prompts=[a red circle,two blue squares]", "optim.lr=3e-4",
            "data.shuffle_buffer=64"]
    if dry:
        args += ["data.batch_size=4", "model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1",
                 "model.moe.num_experts=4", "model.moe.group_size=256", "model.moe.inference_group_size=256", "train.threads=1"]
    else:
        args += ["data.batch_size=16"]
    return args


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.is_file() else []


def train_run(p: Parts, name: str, args: list[str], limit_s: float, launcher: list[str] | None = None) -> str:
    """`python -m train ARGS` (or under `launcher`); records its seconds; raises on failure."""
    cmd = [*(launcher or [sys.executable]), "-m", "train", *args]
    t0 = time.perf_counter()
    code, out = run_limited(cmd, limit_s, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture=True)
    p.put(**{f"{name}_wall_s": round(time.perf_counter() - t0, 1)})
    tail = "\n".join(out.strip().splitlines()[-12:])
    print(tail, flush=True)
    if code != 0:
        raise RuntimeError(f"{'timed out' if code is None else f'exit {code}'}: {tail[-600:]}")
    return out


def check_losses(p: Parts, name: str, run_dir: Path, steps: int) -> None:
    ls = losses(run_dir)
    if len(ls) < steps:
        raise RuntimeError(f"{name}: {len(ls)} logged losses, expected {steps}")
    k = max(1, len(ls) // 4)
    first, last = sum(ls[:k]) / k, sum(ls[-k:]) / k
    finite = all(v == v and abs(v) != float("inf") for v in ls)
    p.put(**{f"{name}_loss_first": round(ls[0], 4), f"{name}_loss_last": round(ls[-1], 4),
             f"{name}_loss_finite": finite, f"{name}_loss_falling": last < first})
    if not finite:
        raise RuntimeError(f"{name}: non-finite loss {ls}")


def torch_engine(p: Parts, base: list[str], work: Path, steps: int, more: int, limit_s: float) -> None:
    run = work / "run_torch"
    common = [*base, "parallel=single", f"train.run_dir={run}", f"train.ckpt_every={steps // 2}"]
    train_run(p, "torch", [*common, f"train.steps={steps}"], limit_s)
    check_losses(p, "torch", run, steps)
    out = train_run(p, "resume", [*common, f"train.steps={steps + more}"], limit_s)
    resumed = f"at step {steps}" in out and len(losses(run)) == steps + more
    p.put(resume_ok=resumed)
    if not resumed:
        raise RuntimeError(f"no resume from step {steps}: {out[-600:]}")


def compiled_engine(p: Parts, base: list[str], work: Path, steps: int, limit_s: float) -> None:
    run = work / "run_compile"
    train_run(p, "compile", [*base, "parallel=single", "train.compile=true", f"train.run_dir={run}",
                             f"train.steps={steps}", f"train.ckpt_every={steps}"], limit_s)
    check_losses(p, "compile", run, steps)


def deepspeed_engine(p: Parts, base: list[str], work: Path, steps: int, limit_s: float) -> None:
    run = work / "run_ds"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    train_run(p, "deepspeed", [*base, "parallel=deepspeed_zero2", f"train.run_dir={run}", f"train.steps={steps}",
                               f"train.ckpt_every={steps}"], limit_s, launcher)
    check_losses(p, "deepspeed", run, steps)


def megatron_ep1(p: Parts, work: Path, dry: bool) -> None:
    """megatron-core's all-to-all dispatcher on a 1-rank expert-parallel mesh vs the local dispatcher:
    the same loss and gradients (fp32). On GPU megatron runs unpatched (its CUDA streams and buffers)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from model.config import get_preset
    from model.dit import build_model
    from model.flow import FlowConfig, flow_loss
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.megatron_dispatch import MegatronDispatcher

    dev = torch.device("cpu" if dry else "cuda")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if dry else "nccl", init_method=f"file://{work / 'pg_init'}", rank=0,
                                world_size=1)
    mesh = init_device_mesh(dev.type, (1,), mesh_dim_names=("ep",))
    cfg = get_preset("tiny-ec" if dry else "small-ec")
    ref = build_model(cfg, device=dev, seed=0)
    model = copy.deepcopy(ref)
    apply_expert_parallel(model, mesh["ep"], make_dispatcher=lambda m: MegatronDispatcher(m, "alltoall"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev)
    ctx = torch.randn(8, cfg.text_len, cfg.text_dim, generator=g).to(dev)
    outs = []
    for m in (ref, model):
        loss = flow_loss(m, x0, ctx, None, FlowConfig(), generator=torch.Generator(device=dev).manual_seed(1))["loss"]
        loss.backward()
        outs.append(loss.detach())
    grad_diff = max(float((p_m.grad.to_local() if hasattr(p_m.grad, "to_local") else p_m.grad).sub(p_r.grad).abs().max())
                    for p_m, p_r in zip(model.parameters(), ref.parameters()) if p_r.grad is not None)
    loss_diff = float((outs[0] - outs[1]).abs())
    p.put(megatron_loss_diff=loss_diff, megatron_grad_max_diff=grad_diff)
    if loss_diff > 1e-4 or grad_diff > 1e-3:
        raise RuntimeError(f"megatron dispatcher differs: loss {loss_diff:.2e}, grad {grad_diff:.2e}")


def stage_b(dry: bool, work: Path) -> Parts:
    p = Parts("b")
    p.part("megatron_dispatcher", megatron_ep1, p, work, dry)
    made = p.part("data", make_shapes_and_t5, work, 64 if dry else 512)
    if made is not None:  # the slowest and least proven part last
        base = train_args(*made, dry)
        steps, more, short = (4, 2, 2) if dry else (20, 5, 10)
        p.part("torch_engine", torch_engine, p, base, work, steps, more, 60 if dry else 40)
        p.part("deepspeed_engine", deepspeed_engine, p, base, work, short, 90 if dry else 40)
        if dry:  # on 2 CPU cores compiling the training and sampling graphs takes ~50 s
            p.put(compiled_skipped="dry run (the trainer's compile hook: tests/train/test_app.py)")
        else:
            p.part("compiled", compiled_engine, p, base, work, short, 60)
    keys = [k for k in p.fig if not k.endswith("_s")]
    p.tables.append("| correctness | |\n| --- | --- |\n" + "\n".join(f"| {k} | {p.fig[k]} |" for k in keys))
    return p


# ---- stage c: train step ----------------------------------------------------------------------------

def step_bench(p: Parts, name: str, args: list[str], work: Path, limit_s: float) -> None:
    out = work / f"step_{name}.json"
    code, _ = run_limited([sys.executable, str(ROOT / "bench" / "step.py"), *args, "--out", str(out)], limit_s)
    if code != 0:
        raise RuntimeError("timed out" if code is None else f"exit {code}")
    fig = json.loads(out.read_text())
    top = fig.pop("profile_top_kernels", None)
    p.put(**{f"{name}_{k}": v for k, v in fig.items()})
    if top:
        p.tables.append(f"Top kernels of one {fig['profile_row']} step ({name}):\n\n```\n{top}\n```")


def stage_c(dry: bool, work: Path) -> Parts:
    p = Parts("c")
    if dry:
        common = ["--preset", "tiny-ec", "--batch", "4", "--iters", "1", "--warmup", "1", "--device", "cpu"]
    else:
        batch = os.environ.get("GPU_SUITE_BATCH", "128")
        common = ["--preset", "ec-xl-8e", "--batch", batch, "--iters", "10", "--warmup", "3", "--device", "cuda",
                  "--dtype", "bf16"]
    runs = [("eager", ["--models", "dense-eq", "ec", "tc", "--grouped-mm"], 40 if dry else 60),
            ("compiled", ["--models", "dense-eq", "ec", "--compile", "--grouped-mm", "--profile", "ec+compile"],
             90 if dry else 110),
            ("ac", ["--models", "dense-eq", "ec", "--activation-checkpointing"], 40 if dry else 40)]
    for name, extra, limit in runs:
        p.part(name, step_bench, p, name, [*common, *extra], work, limit)
    rows = sorted(k for k in p.fig if k.endswith(("_step_ms", "_mfu", "_ratio")))
    p.tables.insert(0, "| train step | |\n| --- | --- |\n" + "\n".join(f"| {k} | {p.fig[k]} |" for k in rows))
    return p


# ---- stage d: sampling ------------------------------------------------------------------------------

def sample_ms_per_image(preset: str, routing: str, images: int, steps: int, dev, dtype) -> float:
    """Wall time per image of CFG Euler sampling (all tokens, guidance 4) with random text of full length."""
    import torch

    from model.config import get_preset
    from model.dit import build_model
    from model.flow import cfg_velocity, euler_sample
    from train.generate import inference_routing

    cfg = get_preset(preset)
    model = build_model(cfg, device=dev, seed=0).to(dtype)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(images, cfg.text_len, cfg.text_dim, generator=g).to(dev, dtype)
    mask = torch.ones(images, cfg.text_len, dtype=torch.bool, device=dev)
    noise = torch.randn(images, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)

    def run(net, n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        euler_sample(cfg_velocity(net, ctx, mask, 4.0), noise, n)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad(), inference_routing(model, routing if cfg.moe is not None else "sample") as net:
        run(net, 2)  # warm-up
        return run(net, steps) / images * 1e3


def stage_d(dry: bool, work: Path) -> Parts:
    import torch

    p = Parts("d")
    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    dense, ec = ("tiny-dense", "tiny-ec") if dry else ("dense-xl", "ec-xl-8e")
    images, steps = (2, 2) if dry else (32, 20)
    p.put(images=images, steps=steps, tokens=256 if not dry else 16, dtype=str(dtype).removeprefix("torch."))
    ms = {}
    for name, preset, routing in (("dense", dense, "sample"), ("ec_tokens", ec, "tokens"), ("ec_sample", ec, "sample")):
        ms[name] = p.part(name, sample_ms_per_image, preset, routing, images, steps, dev, dtype)
        if ms[name] is not None:
            p.put(**{f"{name}_ms_per_image": round(ms[name], 2)})
    for name in ("ec_tokens", "ec_sample"):
        if ms.get(name) and ms.get("dense"):
            p.put(**{f"{name}_vs_dense_ratio": round(ms[name] / ms["dense"], 4)})
    p.tables.append("| sampling | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in p.fig.items()))
    return p


# ---- stage e: memory --------------------------------------------------------------------------------

def train_step_peak(model, opt, cfg, batch: int, dev) -> int | None:
    """Peak bytes of one AdamW training step at `batch` (None: out of memory; 0: not measurable on CPU)."""
    import torch

    from model.flow import FlowConfig, flow_loss

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = flow_loss(model, x0, ctx, None, FlowConfig(), collect_stats=False)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return None
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0


def largest_batch(preset: str, dev, depth: int | None, max_batch: int) -> dict:
    """Doubling then bisection over the batch of one training step of `preset` (optionally cut to `depth`
    blocks). Returns the largest batch that fits, its peak memory, and the batch-1 peak."""
    import torch

    from model.config import get_preset
    from model.dit import build_model

    cfg = get_preset(preset, **({"depth": depth} if depth else {}))
    model = build_model(cfg, device=dev, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ok, bad, peaks = 0, None, {}
    b = 1
    while b <= max_batch:
        peaks[b] = train_step_peak(model, opt, cfg, b, dev)
        if peaks[b] is None:
            bad = b
            break
        ok = b
        b *= 2
    while bad is not None and bad - ok > max(1, ok // 8):
        mid = (ok + bad) // 2
        peaks[mid] = train_step_peak(model, opt, cfg, mid, dev)
        ok, bad = (mid, bad) if peaks[mid] is not None else (ok, mid)
    return {"depth": cfg.depth, "max_batch": ok, "max_batch_is_search_cap": bad is None,
            "peak_gib_at_max_batch": round((peaks.get(ok) or 0) / 2**30, 2),
            "peak_gib_at_batch_1": round((peaks.get(1) or 0) / 2**30, 2),
            "per_image_gib": round(((peaks.get(ok) or 0) - (peaks.get(1) or 0)) / max(1, ok - 1) / 2**30, 4)}


def extrapolate(probe: dict, preset: str, capacity_gib: float) -> dict:
    """The full-depth largest batch from a block-reduced probe: AdamW state (16 bytes per parameter) of
    the whole model plus the probe's activation memory per image and block times the full depth."""
    from model.config import get_preset
    from model.params import param_counts

    cfg = get_preset(preset)
    static_gib = param_counts(cfg).total * 16 / 2**30
    per_image_gib = probe["per_image_gib"] / probe["depth"] * cfg.depth
    batch = int((capacity_gib - static_gib) / per_image_gib) if per_image_gib > 0 else 0
    return {"static_gib_full_depth": round(static_gib, 1), "max_batch_extrapolated": max(0, batch),
            "note": f"probe of {probe['depth']} blocks, extrapolated to {cfg.depth}"
                    + ("; weights + grads + AdamW exceed one GPU: needs FSDP" if static_gib >= capacity_gib else "")}


def stage_e(dry: bool, work: Path) -> Parts:
    import torch

    p = Parts("e")
    dev = torch.device("cpu" if dry else "cuda")
    cap = 4 if dry else 4096
    capacity = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else 16.0
    full = p.part("ec_xl_8e", largest_batch, "tiny-ec" if dry else "ec-xl-8e", dev, None, cap)
    if full:
        p.put(**{f"ec_xl_8e_{k}": v for k, v in full.items()})
    probe = p.part("ec_3xl_8e_probe", largest_batch, "tiny-ec" if dry else "ec-3xl-8e", dev, 4 if not dry else 2,
                   cap)
    if probe:
        p.put(**{f"ec_3xl_8e_probe_{k}": v for k, v in probe.items()})
        p.put(**{f"ec_3xl_8e_{k}": v for k, v in extrapolate(probe, "tiny-ec" if dry else "ec-3xl-8e",
                                                                 capacity).items()})
    p.tables.append("| memory | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in p.fig.items()))
    return p


STAGE_FNS = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d, "e": stage_e}


# ---- driver -------------------------------------------------------------------------------------------

def write_report(out: Path, figures: dict, tables: list[str]) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
    status = "\n".join(f"| {s} {STAGES[s][0]} | {figures.get(f'stage_{s}_status')} | {figures.get(f'stage_{s}_s')} |"
                       for s in STAGES if f"stage_{s}_status" in figures)
    md = ["# GPU suite" + (" (dry run, CPU)" if figures.get("dry_run") else ""), "",
          "| stage | status | seconds |", "| --- | --- | --- |", status, "", *[t + "\n" for t in tables]]
    (out / "gpu_suite.md").write_text("\n".join(md))


def run_stage(stage: str, dry: bool, work: Path) -> None:
    """Child process: run one stage, write its figures and tables to work/stage_<s>.json."""
    parts = STAGE_FNS[stage](dry, work)
    (work / f"stage_{stage}.json").write_text(json.dumps({"figures": parts.fig, "tables": parts.tables},
                                                         default=str))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny presets")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--stage", choices=list(STAGES), default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="ecdit-gpu-suite-"))
    if args.stage is not None:
        run_stage(args.stage, args.dry_run, work)
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"dry_run": args.dry_run}
    tables: list[str] = []
    for s in args.stages:
        title, limit_gpu, limit_dry = STAGES[s]
        limit = limit_dry if args.dry_run else limit_gpu
        stage_dir = work / s
        stage_dir.mkdir(parents=True, exist_ok=True)
        log(f"stage {s} ({title}): start, limit {limit} s")
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--stage", s,
               "--work", str(stage_dir), *(["--dry-run"] if args.dry_run else [])]
        code, _ = run_limited(cmd, limit)
        result = stage_dir / f"stage_{s}.json"
        if result.is_file():
            data = json.loads(result.read_text())
            figures.update(data["figures"])
            tables += data["tables"]
        errors = [k for k in figures if k.startswith(f"{s}_") and k.endswith("_error")]
        status = ("timeout" if code is None else "failed" if code != 0 or not result.is_file()
                  else "partial" if errors else "ok")
        figures[f"stage_{s}_status"], figures[f"stage_{s}_s"] = status, round(time.perf_counter() - t0, 1)
        log(f"stage {s} ({title}): {status} in {figures[f'stage_{s}_s']} s" + (f" ({', '.join(errors)})" if errors else ""))
        write_report(args.out, figures, tables)
    log(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}")
    return figures


if __name__ == "__main__":
    main()
