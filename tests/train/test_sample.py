"""Sampler: matches a hand-rolled CFG Euler loop, is batch-independent with per-sample routing (and
batch-dependent with token groups spanning images, so the check means something); the CLI end to end
on a DCP step checkpoint and on a safetensors export; one-line errors on bad input."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data.encoders import PixelVAE
from model.flow import cfg_velocity, euler_sample
from model.routing import InferenceRouting, LoadMeter
from tests.model.helpers import tiny_model
from tests.train.helpers import FakeText, save_tiny_checkpoints
from train.cli import slug
from train.generate import SampleError, generate, inference_routing, noise_seed, prompt_noise
from train.inference_model import check_compatible, load_model, resolve_checkpoint
from train.sample import main

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow diamond", "three cyan circles"]


@pytest.fixture(scope="module")
def tiny():
    model, cfg = tiny_model("tiny-ec", in_channels=3)  # fp64, random non-zero weights, 4x4 tokens, 4 experts
    return model.eval(), cfg


def _gen(model, prompts, **kw):
    kw = {"steps": 3, "guidance": 4.0, "seed": 0, "batch_size": 8, "routing": "sample", **kw}
    return generate(model, FakeText(), PixelVAE(), prompts, **kw)


def test_generate_equals_a_hand_rolled_cfg_euler_loop(tiny):
    model, cfg = tiny
    emb, mask = FakeText()(PROMPTS)
    noise = torch.stack([prompt_noise(7, i, (3, 8, 8)) for i in range(len(PROMPTS))]).double()
    net = functools.partial(model, routing=InferenceRouting("sample"))
    ref = euler_sample(cfg_velocity(net, emb.double(), mask, 3.0), noise, steps=4).clamp(-1, 1)
    out = _gen(model, PROMPTS, steps=4, guidance=3.0, seed=7)
    assert out.shape == (4, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-6)
    assert out.std() > 0.1 and out.abs().max() <= 1.0
    # text conditioning and seed matter; the same seed reproduces
    assert (out[0] - out[1]).abs().max() > 1e-2
    assert (out - _gen(model, PROMPTS, steps=4, guidance=3.0, seed=8)).abs().max() > 1e-2
    assert torch.equal(out, _gen(model, PROMPTS, steps=4, guidance=3.0, seed=7))


def test_noise_depends_only_on_seed_and_index():
    a = prompt_noise(0, 3, (3, 4, 4))
    assert torch.equal(a, prompt_noise(0, 3, (3, 4, 4)))
    assert not torch.equal(a, prompt_noise(0, 2, (3, 4, 4))) and not torch.equal(a, prompt_noise(1, 3, (3, 4, 4)))
    assert len({noise_seed(s, i) for s in range(5) for i in range(5)}) == 25


def test_sample_routing_is_batch_independent_and_token_groups_are_not(tiny):
    model, cfg = tiny
    full = _gen(model, PROMPTS, batch_size=4)
    for bs in (1, 3):
        torch.testing.assert_close(_gen(model, PROMPTS, batch_size=bs), full, rtol=0, atol=1e-6)
    alone = _gen(model, PROMPTS[:1])  # prompt 0 alone in its batch
    torch.testing.assert_close(alone[0], full[0], rtol=0, atol=1e-6)
    # Token groups of 64 = 4 images (S = 16): with 4 prompts per batch, images share routing groups
    # (the CFG batch of 8 images splits into 2 groups); alone, an image routes only with its own CFG pair.
    tok_full = _gen(model, PROMPTS, batch_size=4, routing="tokens", group_size=64)
    tok_alone = _gen(model, PROMPTS, batch_size=1, routing="tokens", group_size=64)
    assert (tok_full - tok_alone).abs().max() > 1e-3
    assert (tok_full - full).abs().max() > 1e-3
    # the model's mode is restored
    assert not model.training


@pytest.mark.parametrize("name", ["tiny-diffmoe", "tiny-ec"])
def test_dynamic_generation_is_batch_independent_metered_and_counted(name):
    from torch.utils.flop_counter import FlopCounterMode

    from model.flops import sample_flops_per_image
    from tests.model.helpers import tiny_batch
    model, cfg = tiny_model(name, in_channels=3)
    with torch.no_grad():  # thresholds from a few training-mode forwards
        for seed in range(3):
            model.train()(*tiny_batch(cfg, 4, seed=20 + seed))
    model.eval()
    meter = LoadMeter(cfg.num_moe_blocks)
    full = _gen(model, PROMPTS, routing="dynamic", batch_size=4, meter=meter)
    load = meter.summary()
    for bs in (1, 3):  # every image alone in its batch, or with others
        torch.testing.assert_close(_gen(model, PROMPTS, routing="dynamic", batch_size=bs), full, rtol=0, atol=1e-6)
    assert len(load["experts_per_token"]) == cfg.num_moe_blocks
    assert all(0 < e <= cfg.moe.num_experts for e in load["experts_per_token"])
    assert all(r >= e for r, e in zip(load["slots_run_per_token"], load["experts_per_token"]))
    # The multiplier trades tokens for FLOPs.
    meter = LoadMeter(cfg.num_moe_blocks)
    _gen(model, PROMPTS, routing="dynamic", multiplier=1.5, meter=meter)
    fewer = meter.summary()
    assert sum(fewer["experts_per_token"]) < sum(load["experts_per_token"])
    # One CFG step on one image: the FLOP formula with the measured slots equals what runs.
    emb, mask = FakeText()(PROMPTS[:1])
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    meter = LoadMeter(cfg.num_moe_blocks)
    with inference_routing(model, "dynamic", meter=meter) as net, FlopCounterMode(display=False) as fc, \
            torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
        cfg_velocity(net, emb.double(), mask, 4.0)(x, torch.full((1,), 0.5, dtype=torch.float64))
    one = meter.summary()
    assert sample_flops_per_image(cfg, "dynamic", one["slots_run_per_token"], text_len=8) == fc.get_total_flops()


def test_generate_rejects_bad_arguments(tiny):
    model, _ = tiny
    with pytest.raises(SampleError, match="routing='experts'"):
        _gen(model, PROMPTS, routing="experts")
    with pytest.raises(SampleError, match="no prompts"):
        _gen(model, [])
    with pytest.raises(SampleError, match="group_size=48"):  # 2 * 4 * 16 = 128 tokens
        _gen(model, PROMPTS, batch_size=4, routing="tokens", group_size=48)
    with pytest.raises(SampleError, match="steps=0"):
        _gen(model, PROMPTS, steps=0)


def test_check_compatible_names_the_mismatch(tiny):
    _, cfg = tiny
    dcfg = SimpleNamespace(text_encoder="minilm", vae="pixel")
    with pytest.raises(SampleError, match="384-dim.*text_dim=32"):
        check_compatible(cfg, SimpleNamespace(dim=384), PixelVAE(), dcfg)
    with pytest.raises(SampleError, match="4 latent channels.*in_channels=3"):
        check_compatible(cfg, SimpleNamespace(dim=32), SimpleNamespace(latent_channels=4), dcfg)
    check_compatible(cfg, SimpleNamespace(dim=32), PixelVAE(), dcfg)


def test_slug():
    assert slug("Two RED circles, left of a square!") == "two_red_circles_left_of_a_square"
    assert slug("!!!") == "prompt"


# ---- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny EC model for the embedded encoders (MiniLM 384-dim, pixel VAE 3 channels), saved as two DCP
    step checkpoints (the CLI picks the latest) and as a safetensors export."""
    root = save_tiny_checkpoints(tmp_path_factory.mktemp("sample_cli"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:3]) + "\n\n")
    return root


def _cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train.sample", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _png(path):
    return np.array(Image.open(path).convert("RGB"))


def test_load_model_from_both_config_layouts(saved):
    assert resolve_checkpoint(saved / "ckpt") == ("step", saved / "ckpt" / "step_00000002")
    m1, run1, _, _ = load_model(saved / "ckpt" / "step_00000001")
    m2, run2, _, _ = load_model(saved / "ckpt")
    ex, run_ex, _, _ = load_model(saved / "export" / "model.safetensors")
    assert run_ex == {} and "model_resolved" in run2 and "model_resolved" not in run1
    assert m1.cfg == m2.cfg == ex.cfg and not m2.training
    sd1, sd2, sdx = m1.state_dict(), m2.state_dict(), ex.state_dict()
    assert all(torch.equal(sd2[k], sdx[k]) for k in sd2)
    assert any(not torch.equal(sd1[k], sd2[k]) for k in sd2)  # step 1 holds other weights
    bad = saved / "bad_step"
    bad.mkdir(exist_ok=True)
    (bad / "meta.json").write_text("{}")
    (bad / "config.json").write_text(json.dumps({"model": {"preset": "tiny-ec"}}))
    with pytest.raises(SampleError, match="not a model config"):
        load_model(bad)


def test_checkpoint_root_resolves_to_its_latest_numbered_complete_step(tmp_path):
    for name, complete in (("step_00000003", True), ("step_00000010", False), ("step_best", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "meta.json").write_text("{}")
    assert resolve_checkpoint(tmp_path) == ("step", tmp_path / "step_00000003")


def test_cli_checkpoint_and_export_give_the_same_images(saved):
    out_ck, out_ex = saved / "out_ck", saved / "out_ex"
    r = _cli("--checkpoint", str(saved / "ckpt"), "--prompts", *PROMPTS[:3], "--steps", "3", "--seed", "3",
             "--batch-size", "2", "--out", str(out_ck), "--heatmap")
    assert r.returncode == 0, r.stderr
    assert "step_00000002" in r.stdout and str(out_ck) in r.stdout
    r = _cli("--checkpoint", str(saved / "export"), "--prompt-file", str(saved / "prompts.txt"), "--steps", "3",
             "--seed", "3", "--batch-size", "2", "--out", str(out_ex))
    assert r.returncode == 0, r.stderr

    for out in (out_ck, out_ex):
        meta = json.loads((out / "samples.json").read_text())
        assert [s["prompt"] for s in meta["samples"]] == PROMPTS[:3]
        assert [s["file"] for s in meta["samples"]] == [f"{i:03d}_{slug(p)}.png" for i, p in enumerate(PROMPTS[:3])]
        assert all(s["seed"] == 3 for s in meta["samples"]) and meta["steps"] == 3 and meta["routing"] == "sample"
        assert Image.open(out / "grid.png").width >= 3 * 8 * 3  # upscaled tiles
    for s in json.loads((out_ck / "samples.json").read_text())["samples"]:
        a, b = _png(out_ck / s["file"]), _png(out_ex / s["file"])
        assert a.shape == (8, 8, 3) and a.std() > 5
        np.testing.assert_array_equal(a, b)
    a0, a1 = _png(out_ck / "000_a_red_circle.png"), _png(out_ck / f"001_{slug(PROMPTS[1])}.png")
    assert np.abs(a0.astype(int) - a1).max() > 10
    assert (out_ck / "experts.png").is_file() and not (out_ex / "experts.png").exists()


def test_cli_compiled_sampler_gives_the_eager_images(saved):
    outs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        outs[name] = saved / f"out_{name}"
        assert main(["--checkpoint", str(saved / "ckpt"), "--prompts", *PROMPTS[:2], "--steps", "2",
                     "--batch-size", "2", "--out", str(outs[name]), *extra]) == 0
    meta = [json.loads((outs[n] / "samples.json").read_text()) for n in ("eager", "compiled")]
    assert meta[0]["experts_per_token"] == meta[1]["experts_per_token"]  # the meter runs compiled too
    for s in meta[0]["samples"]:
        a, b = _png(outs["eager"] / s["file"]).astype(int), _png(outs["compiled"] / s["file"]).astype(int)
        assert a.std() > 5 and np.abs(a - b).max() <= 1  # float rounding may move a pixel by one level


def test_cli_bad_input_fails_with_one_line(saved, tmp_path, capsys):
    ck = str(saved / "ckpt")
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--prompts", "x"], "--checkpoint"),
        (["--checkpoint", str(tmp_path), "--prompts", "x"], "no complete step_"),
        (["--checkpoint", ck], "no prompts"),
        (["--checkpoint", ck, "--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file"),
        (["--checkpoint", ck, "--prompts", "x", "--routing", "sample", "--group-size", "64"], "--group-size"),
        (["--checkpoint", ck, "--prompts", "x", "--dynamic-multiplier", "1.2"], "--dynamic-multiplier"),
        (["--checkpoint", ck, "--prompts", "x", "--steps", "0"], "--steps"),
        (["--checkpoint", ck, "--prompts", "x", "--device", "tpu9"], "--device"),
        (["--checkpoint", ck, "--prompts", "x", "--routing", "dynamic", "--compile"], "--compile"),
    ]
    (tmp_path / "empty.txt").write_text("\n  \n")
    cases.append((["--checkpoint", ck, "--prompt-file", str(tmp_path / "empty.txt")], "no prompts"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ck, "--prompts", "x", "--routing", "experts"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--routing" in err and "experts" in err and err.count("\n") == 1
    r = _cli("--checkpoint", str(tmp_path / "nope"), "--prompts", "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: --checkpoint {tmp_path / 'nope'} does not exist"]
