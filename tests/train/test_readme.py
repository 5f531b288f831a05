"""The README's command lines, pasted into bash as they are written (quotes and brace patterns included),
with tiny sizes appended: every `.venv/bin/...` command of a ```bash block either runs here or is listed in
SKIPPED with the reason, so a new or changed README command cannot go untested silently."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model.depth=2", "model.dim=64", "model.heads=2", "model.kv_heads=1", "model.moe.num_experts=4",
              "model.moe.group_size=256", "model.moe.inference_group_size=256"]
TINY_TRAIN = [*TINY_MODEL, "train.steps=2", "train.log_every=1", "train.ckpt_every=2", "data.batch_size=4",
              "data.shuffle_buffer=50", "train.sample_steps=1", "train.sample_prompts=[a red circle]",
              "train.threads=1"]
TINY_EVAL = ["--num-prompts", "2", "--samples-per-prompt", "1", "--steps", "1"]

# README command prefix -> (text substitutions, extra arguments), in README order where they depend on
# each other (the 2-process run writes runs/cpu-small, which sample/evaluate/export read).
RUN = {
    ".venv/bin/python -m train experiment=cpu_small parallel=single": ({}, [*TINY_TRAIN, "train.name=readme-single"]),
    ".venv/bin/torchrun --standalone --nproc_per_node=2 -m train experiment=cpu_small": ({}, TINY_TRAIN),
    ".venv/bin/python -m train.sample --checkpoint runs/cpu-small/checkpoints": ({}, ["--steps", "1"]),
    ".venv/bin/python -m train.evaluate --checkpoint runs/cpu-small/checkpoints --routing dynamic": ({}, TINY_EVAL),
    ".venv/bin/python -m train.export --checkpoint runs/cpu-small/checkpoints": ({}, []),
    ".venv/bin/python bench/params.py": ({}, []),
    ".venv/bin/python launch/plan.py": ({}, []),
    ".venv/bin/python -m data.synthetic --out shapes/": ({"--num-samples 5000": "--num-samples 320 --shard-size 64"}, []),
    ".venv/bin/python -m data.precompute --input 'shapes/": ({}, []),
    ".venv/bin/python -m train data=latent_shards": (
        {"latents/{000000..099999}.tar": "latents/shapes-{000000..000004}.tar"},
        [*TINY_TRAIN, "train.name=readme-latent"]),
    ".venv/bin/python -m train.evaluate --checkpoint runs/cpu-small/checkpoints                  # held-out": (
        {}, TINY_EVAL),
    ".venv/bin/python -m train.evaluate --checkpoint runs/cpu-small/checkpoints --split train": ({}, TINY_EVAL),
}
SKIPPED = {
    ".venv/bin/python -m train model=ec-xl-8e": "a placeholder (data.shards=...), 8-way EP of a 2.5B model",
    ".venv/bin/python -m train.sample --checkpoint ...": "a placeholder checkpoint",
    ".venv/bin/torchrun --nproc_per_node=8 -m data.precompute": "8 processes, T5 and a KL VAE at /models",
    ".venv/bin/python bench/step.py": "a benchmark of minutes; tests/bench runs it with tiny sizes",
    ".venv/bin/python bench/data.py": "a benchmark of minutes",
    ".venv/bin/python bench/data_scale.py": "a benchmark of minutes; tests/bench runs it with tiny sizes",
    ".venv/bin/python bench/study.py": "the routing study, ~90 minutes; tests/bench/test_study.py runs it tiny",
}


def _strip_comment(line: str) -> str:
    """The line without its trailing `# comment` (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands() -> list[str]:
    """The `.venv/bin/` command lines of the README's bash blocks, continuations joined, comments kept."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        out += [line for line in joined.splitlines() if line.startswith(".venv/bin/")]
    return out


def _match(line: str, table: dict) -> str | None:
    hits = [k for k in table if line.startswith(k)]
    return max(hits, key=len) if hits else None


def _workspace(tmp: Path) -> Path:
    """A directory laid out like the repository root for the commands: .venv/bin/python and torchrun run
    this interpreter, bench/ and launch/ are the repository's, and runs/shapes-quickstart is the quickstart's data."""
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, cmd in (("python", sys.executable), ("torchrun", f"{sys.executable} -m torch.distributed.run")):
        (bin_dir / name).write_text(f"#!/bin/sh\nexec {cmd} \"$@\"\n")
        (bin_dir / name).chmod(0o755)
    for name in ("bench", "launch"):
        (tmp / name).symlink_to(ROOT / name)
    subprocess.run([sys.executable, "-m", "data.synthetic", "--out", "runs/shapes-quickstart", "--mix", "quickstart",
                    "--num-samples", "256", "--shard-size", "64"], cwd=tmp, check=True, capture_output=True, env=_env())
    return tmp


def _env() -> dict:
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert len(commands) >= 15
    unhandled = [c for c in commands if _match(c, RUN) is None and _match(c, SKIPPED) is None]
    assert not unhandled, f"README commands neither run nor skipped by tests/train/test_readme.py: {unhandled}"
    unused = [k for k in (*RUN, *SKIPPED) if not any(c.startswith(k) for c in commands)]
    assert not unused, f"entries that match no README command: {unused}"


@pytest.mark.distributed
def test_readme_commands_run_when_pasted(tmp_path):
    work = _workspace(tmp_path)
    ran = []
    for line in readme_commands():
        key = _match(line, RUN)
        if key is None or _match(line, SKIPPED) is not None:
            continue
        subs, extra = RUN[key]
        cmd = _strip_comment(line)
        for old, new in subs.items():
            assert old in cmd, (old, cmd)
            cmd = cmd.replace(old, new)
        cmd = f"{cmd} {shlex.join(extra)}".strip()
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, cmd
        ran.append(key)
    assert ran == list(RUN), ran  # every RUN entry ran, once, in this order
    assert (work / "runs" / "cpu-small" / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert (work / "runs" / "readme-latent" / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert (work / "export" / "model.safetensors").is_file()
    assert len(list((work / "latents").glob("shapes-*.tar"))) == 5
