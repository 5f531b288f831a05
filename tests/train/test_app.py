"""The training app end to end through `python -m train`: single process and 2 processes, exact
resume after SIGTERM, and bad overrides that fail naming the field."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = ["train.steps=4", "train.log_every=1", "train.ckpt_every=2", "data.batch_size=4", "data.shuffle_buffer=50",
        "model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1", "model.moe.num_experts=4",
        "model.moe.group_size=256", "model.moe.inference_group_size=256", "train.sample_steps=2",
        "train.sample_prompts=[a red circle,two blue squares]", "train.threads=1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(out), "--num-samples", "256",
                    "--shard-size", "64"], cwd=ROOT, check=True, capture_output=True)
    return f"data.shards='{out}/shapes-{{000000..000003}}.tar'"  # quoted: braces are Hydra syntax


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def train(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def check_run(run_dir: Path, steps: int, num_experts: int = 4):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{steps:08d}"
    saved = json.loads((run_dir / "checkpoints" / ckpts[-1] / "config.json").read_text())
    assert saved["model_resolved"]["moe"]["num_experts"] == num_experts  # the resolved config travels with it
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "moe/layer0/load/e0", "moe/layer0/tokens_by_0_experts"} <= set(rows[-1])
    wandb_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(wandb_files) == 1
    blob = Path(wandb_files[0]).read_bytes()  # history records name their keys in plain bytes
    for key in (b"loss", b"moe/layer0/load/e3", b"moe/layer0/router_entropy"):
        assert key in blob, key
    assert (run_dir / "samples").is_dir() and list((run_dir / "samples").glob("grid_step*.png"))


def test_single_process_end_to_end(tmp_path, shapes):
    proc = train([*BASE, shapes, f"train.run_dir={tmp_path}/run", "train.sample_every=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path / "run", 4)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["experts_step00000002.png", "experts_step00000004.png",
                       "grid_step00000002.png", "grid_step00000004.png"]
    assert "[train] done" in proc.stdout and "resume:" in proc.stdout


@pytest.fixture(scope="module")
def quickstart_shapes(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shapes-quickstart")
    subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(out), "--mix", "quickstart",
                    "--num-samples", "256", "--shard-size", "64"], cwd=ROOT, check=True, capture_output=True)
    return f"data.shards='{out}/shapes-{{000000..000003}}.tar'"


@pytest.mark.distributed
def test_quickstart_recipe_trains_with_two_processes_and_expert_parallelism(tmp_path, quickstart_shapes):
    """The README main job's config (experiment=cpu_small, its model and schedule as they are) on the
    quickstart's set, for 4 steps instead of 1000."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "experiment=cpu_small", quickstart_shapes, "train.steps=4", "train.log_every=1", "train.ckpt_every=2",
           "train.sample_steps=2", "train.threads=1", f"train.run_dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks, ep 2" in proc.stdout
    check_run(tmp_path / "run", 4, num_experts=8)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "config.json").read_text())
    model = saved["model_resolved"]
    assert (model["input_size"], model["patch_size"], model["mask_ratio"], model["depth"], model["dim"]) == (16, 2, 0.0, 4, 128)
    assert model["moe"]["router"] == "expert_choice" and saved["flow"]["t_mean"] == 1.0
    assert (saved["data"]["batch_size"], saved["optim"]["schedule"], model["moe"]["group_size"]) == (16, "cosine", 512)
    assert all(v < 2.0 for v in losses(tmp_path / "run").values())  # finite and in range
    # Only rank 0 writes Hydra's files and the metrics.
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()


def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(tmp_path, shapes):
    args = [*BASE, shapes, "train.steps=10", "train.ckpt_every=100"]
    straight = train([*args, f"train.run_dir={tmp_path}/a"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, f"train.run_dir={run_b}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not ((run_b / "metrics.jsonl").exists() and len((run_b / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    stopped_at = max(losses(run_b))
    assert 3 <= stopped_at < 10
    assert [p.name for p in (run_b / "checkpoints").glob("step_*")] == [f"step_{stopped_at:08d}"]
    assert json.loads((run_b / "status.json").read_text()) == {"state": "stopped", "step": stopped_at, "steps": 10}
    resumed = train([*args, f"train.run_dir={run_b}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(run_b) == losses(tmp_path / "a")  # every step's loss, bit for bit
    assert json.loads((run_b / "status.json").read_text())["state"] == "finished"


BAD_OVERRIDES = [
    ("model.moe.num_experts=3", "2", "model.moe.num_experts=3 must be divisible by parallel.ep=2"),
    ("model=ec-xl-9e", "2", "error: model=ec-xl-9e: In 'config': Could not find 'model/ec-xl-9e' (options: dense-3xl,"),
    ("model.num_experts=4", "2", "error: model.num_experts=4: Key 'num_experts' not in 'ModelSpec'"),
    ("model=small-dense model.moe.top_k=1", "1", "error: model.moe.top_k=1: model.moe is null here"),
    ("model.input_size=16", "2", "error: model.input_size=16 disagrees with the data, which gives 32"),
    ("optim.lr=-1", "2", "optim.lr=-1.0 must be > 0"),
    ("optim.lrr=1", "2", "lrr"),
    ("parallel.ep=3", "2", "parallel.ep=3 must divide parallel.dp_shard=2"),
    ("parallel.fsdp=false", "2", "parallel.ep=2 needs parallel.fsdp=true"),
    ("data.batch_size=0", "2", "error: data.batch_size=0 must be a positive integer"),
    ("flow.t_mean=nan", "2", "error: flow.t_mean=nan must be a finite number"),
    ("data.text_encoder=t5 data.text_encoder_path=google/t5-v1_1-xxl", "2",
     "error: data.text_encoder_path='google/t5-v1_1-xxl' has no config.json and cannot be fetched (HF_HUB_OFFLINE=1)"),
    ("data.shards='/nonexistent/x-{0..3}.tar'", "2", "data.shards: 4 of 4 shards do not exist (first: /nonexistent/x-0.tar)"),
    (f"data.shards={ROOT / 'conf'}", "2", "is a directory: give the shard files as a brace pattern"),
]


@pytest.fixture(scope="module")
def bad_override_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """`python -m train parallel=fsdp_ep <override>` for every case of BAD_OVERRIDES, with WORLD_SIZE as a
    launcher would set it; each forked from one process that paid the imports (tests/train/forked_runs.py)."""
    root = tmp_path_factory.mktemp("bad_overrides")
    cases = [{"args": ["parallel=fsdp_ep", *override.split(), f"train.run_dir={root}/{i}/run"],
              "env": {"WORLD_SIZE": world, "RANK": "0"}} for i, (override, world, _) in enumerate(BAD_OVERRIDES)]
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train" / "forked_runs.py"), str(root / "cases.json"),
                           str(root / "runs.json")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, json.loads((root / "runs.json").read_text())


@pytest.mark.parametrize("override, world, message", BAD_OVERRIDES)
def test_bad_overrides_fail_naming_the_field(bad_override_runs, override, world, message):
    # Validation happens before any process group exists.
    root, runs = bad_override_runs
    i = BAD_OVERRIDES.index((override, world, message))
    proc = runs[i]
    assert proc["returncode"] != 0
    assert message in proc["stderr"], proc["stderr"][-2000:]
    assert "Traceback" not in proc["stderr"]
    assert not (root / str(i) / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("model.heads=5", "model.heads=5 must divide model.dim=192"),
    ("model.moe.router=hash", "model.moe.router='hash' must be one of"),
    ("model.moe.capacity_factor=0", "model.moe.capacity_factor=0.0 must be in (0, num_experts=8]"),
    ("model.mask_ratio=1.0", "model.mask_ratio=1.0 must be in [0, 1)"),
    ("data.vae=vqgan", "data.vae='vqgan' must be one of ('pixel', 'kl')"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction=2.0 must be in [0, 1]"),
    ("flow.t_std=0", "flow.t_std=0.0 must be > 0"),
    ("parallel.zero_stage=1", "parallel.zero_stage=1 must be 2 or 3"),
    ("parallel.dispatcher=nccl", "parallel.dispatcher='nccl' must be one of"),
    ("optim.schedule=linear", "optim.schedule='linear' must be 'constant' or 'cosine'"),
    ("train.precision=fp8", "train.precision='fp8' must be auto, fp32 or bf16"),
    ("train.ema_decay=1", "train.ema_decay=1.0 must be in [0, 1)"),
    ("data.batch_size=5", "model.moe.group_size=512 must divide the 640 tokens a rank routes per micro-batch"),
    ("train.sample_steps=0", "train.sample_steps=0 must be >= 1"),
    ("train.sample_every=5 train.sample_prompts=[]", "train.sample_every=5 needs train.sample_prompts"),
    ("train.guidance=-1", "train.guidance=-1.0 must be >= 0"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two values in [0, 1)"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] must be two values in [0, 1)"),
    ("train.stall_timeout_s=-1", "train.stall_timeout_s=-1.0 must be >= 0"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0"),
    ("parallel.init_timeout_s=-5", "parallel.init_timeout_s=-5.0 must be > 0"),
    ("parallel=deepspeed_zero2 parallel.activation_checkpointing=true",
     "parallel.activation_checkpointing=true needs parallel.engine=fsdp"),
])
def test_bad_values_are_one_config_error_naming_the_field(override, message):
    from model.config import ConfigError
    from train.config import compose_app, validate_app
    with pytest.raises(ConfigError) as err:
        validate_app(compose_app(override.split()), 1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert err.value.field == message.split("=")[0] and override.split("=")[0] in str(err.value)


def test_an_experiment_cannot_turn_a_dense_preset_into_an_moe_silently():
    """cpu_small sets model.moe fields; merged into a dense preset's null moe they would build an MoE."""
    from model.config import ConfigError
    from train.config import compose_app, validate_app
    with pytest.raises(ConfigError) as err:
        validate_app(compose_app(["experiment=cpu_small", "model=small-dense"]), 2)
    assert err.value.field == "model.moe" and "model=small-dense is a dense preset" in str(err.value)
    mcfg, _ = validate_app(compose_app(["experiment=cpu_small"]), 2)
    assert mcfg.moe.router == "expert_choice" and mcfg.num_tokens == 64


@pytest.mark.parametrize("parallel, world, message", [
    (dict(engine="deepspeed"), 1, "train.compile=true needs parallel.engine=fsdp"),
    (dict(ep=2), 2, "train.compile=true needs parallel.ep=1"),
    (dict(ep=2, dispatcher="megatron_alltoall"), 2, "train.compile=true needs parallel.ep=1"),
])
def test_compile_is_refused_where_the_block_cannot_be_one_graph(parallel, world, message):
    from model.config import ConfigError
    from train.config import AppConfig, validate_app
    cfg = AppConfig()
    cfg.train.compile = True
    validate_app(cfg, world)  # the default engine and dispatcher compile
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_app(cfg, world)


def test_train_compile_compiles_every_block_of_the_built_model():
    import torch

    from train.config import AppConfig, validate_app
    from train.trainer import build_network as _build
    cfg = AppConfig()
    cfg.model.depth = 2
    cfg.train.compile = True
    mcfg, pcfg = validate_app(cfg, 1)
    model = _build(mcfg, pcfg, cfg.train, 1, torch.device("cpu"))  # compiles lazily: nothing traced yet
    assert all(getattr(blk, "_ecdit_compiled", False) for blk in model.blocks)
    cfg.train.compile = False
    eager = _build(mcfg, pcfg, cfg.train, 1, torch.device("cpu"))
    assert not any(hasattr(blk, "_ecdit_compiled") for blk in eager.blocks)


@pytest.mark.distributed
def test_multinode_script_two_nodes_on_localhost(tmp_path, shapes):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*BASE, shapes, "parallel=fsdp_ep", f"train.run_dir={tmp_path}/run"]
    env = _env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC="1",
               PYTHON=sys.executable)
    nodes = [subprocess.Popen(["bash", "launch/multinode_torchrun.sh", *args], cwd=ROOT,
                              env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    assert "2 ranks, ep 2" in outs[0][0]
    check_run(tmp_path / "run", 4)


@pytest.mark.distributed
def test_deepspeed_launcher_zero2_trains_and_resumes_exactly(tmp_path, shapes):
    """`deepspeed --num_gpus 2 train/__main__.py parallel=deepspeed_zero2` (CPU accelerator, gloo):
    trains, checkpoints, and a run stopped at step 2 and resumed matches the uninterrupted losses."""
    import socket

    def launch(run_dir, steps):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "train/__main__.py", "parallel=deepspeed_zero2", "model.moe.num_experts=4", *BASE, shapes,
               f"train.steps={steps}", f"train.run_dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    out = launch(tmp_path / "a", 4)
    assert "engine deepspeed" in out.stdout
    check_run(tmp_path / "a", 4)
    launch(tmp_path / "b", 2)
    resumed = launch(tmp_path / "b", 4)
    assert "resumed from" in resumed.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def _float_fields(cfg, prefix=""):
    """Dotted names of every float field of a config tree, and of those holding a tuple or list of floats."""
    import dataclasses
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", None
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
            yield f"{prefix}{f.name}", len(value)


def test_every_float_field_refuses_nan_and_inf():
    """Each float of the config tree (found from the dataclasses, so that a new field is covered as it comes),
    set to nan, inf or -inf, is one ConfigError naming the field, before anything is built (through
    `python -m train`: BAD_OVERRIDES' flow.t_mean=nan)."""
    import copy
    import functools

    from model.config import ConfigError
    from train.config import compose_app, validate_app
    base = compose_app(["experiment=cpu_small"])
    fields = list(_float_fields(base))
    assert {"flow.t_mean", "optim.lr", "model.moe.capacity_factor", "parallel.timeout_s", "optim.betas"} <= \
        {name for name, _ in fields}
    for name, length in fields:
        for bad in (float("nan"), float("inf"), float("-inf")):
            cfg = copy.deepcopy(base)
            *parents, leaf = name.split(".")
            owner = functools.reduce(getattr, parents, cfg)
            setattr(owner, leaf, [bad] * length if length else bad)
            with pytest.raises(ConfigError, match=f"^{name}=.*must be a finite number$"):
                validate_app(cfg, 2)
