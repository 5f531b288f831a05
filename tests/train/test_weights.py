"""Inference weights: `--weights ema` (the default) samples, evaluates and exports the EMA of the parameters
that the torch engine checkpoints, with the raw model's buffers (the routers' thresholds); `--weights raw`
the trained parameters; a checkpoint without an EMA falls back to raw with a note."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data.encoders import load_text_encoder, load_vae
from model.config import config_to_dict
from model.dit import build_model
from tests.model.helpers import tiny_model
from tests.train.helpers import TINY_DATA, save_tiny_checkpoints
from train import evaluate, export
from train.checkpoint import Checkpointer
from train.weights import exported_weights
from train.cli import slug
from train.generate import SampleError, generate
from train.inference_model import data_config, load_model
from train.sample import main
from train.visualize import image_grid, save_png

PROMPTS = ["a red circle", "two blue squares"]
WRAPPED = "_checkpoint_wrapped_module."  # in the trainer's EMA keys when activation checkpointing is on


def _trainer_key(name: str) -> str:
    """The EMA key the trainer writes for parameter `name` of an activation-checkpointed model."""
    head, _, rest = name.partition(".")
    if head != "blocks":
        return name
    i, _, rest = rest.partition(".")
    return f"blocks.{i}.{WRAPPED}{rest}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """root/ema/step_00000003: raw weights with learnt thresholds + an EMA (keyed as the trainer keys it);
    root/ckpt: checkpoints without an EMA (tests/train/helpers.py)."""
    root = save_tiny_checkpoints(tmp_path_factory.mktemp("weights"))
    kw = dict(dtype=torch.float32, text_dim=384, in_channels=3, text_len=8)
    model, cfg = tiny_model("tiny-ec", **kw)
    other, _ = tiny_model("tiny-ec", seed=11, **kw)
    with torch.no_grad():
        for r in model.routers():
            r.threshold_E.uniform_(0.1, 0.3)
            r.threshold_updates.fill_(7)
    ema = {_trainer_key(n): p.detach().lerp(q.detach(), 0.5) for (n, p), q in
           zip(model.named_parameters(), other.parameters())}
    app_cfg = {"model": {"preset": "tiny-ec"}, "model_resolved": config_to_dict(cfg), "data": TINY_DATA}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Checkpointer(root / "ema").save(3, model, config=app_cfg, extra={"ema": ema})
    return root


@pytest.fixture(scope="module")
def by_hand(saved):
    """The model built from the checkpoint's EMA tensors and its raw buffers, read without train/ code."""
    step = saved / "ema" / "step_00000003"
    dcp_to_torch_save(step, saved / "full.pt")
    full = torch.load(saved / "full.pt", weights_only=True)
    cfg = load_model(step, weights="raw")[0].cfg
    model = build_model(cfg)
    params = {k.replace(WRAPPED, ""): v for k, v in full["ema"].items()}
    buffers = {k: v for k, v in full["model"].items() if k not in params}
    model.load_state_dict({**params, **buffers}, strict=True)
    return model.eval()


def _png(path):
    return np.array(Image.open(path).convert("RGB"))


def test_ema_parameters_with_the_raw_buffers(saved, by_hand):
    ema, run_cfg, _, used = load_model(saved / "ema")
    raw, _, _, used_raw = load_model(saved / "ema", weights="raw")
    assert (used, used_raw) == ("ema", "raw")
    sd, ref, sd_raw = ema.state_dict(), by_hand.state_dict(), raw.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    params = dict(ema.named_parameters())
    assert all(not torch.equal(sd[k], sd_raw[k]) for k in params)
    buffers = [k for k in sd if k not in params]
    assert any("threshold_E" in k for k in buffers) and all(torch.equal(sd[k], sd_raw[k]) for k in buffers)
    assert all(float(r.threshold_updates) == 7 for r in ema.routers())


def test_cli_samples_the_ema_by_default(saved, by_hand):
    outs = {w: saved / f"out_{w}" for w in ("default", "raw")}
    for w, out in outs.items():
        extra = [] if w == "default" else ["--weights", w]
        assert main(["--checkpoint", str(saved / "ema"), "--prompts", *PROMPTS, "--steps", "2",
                     "--out", str(out), *extra]) == 0
    assert json.loads((outs["default"] / "samples.json").read_text())["weights"] == "ema"
    dcfg = data_config(json.loads((saved / "ema" / "step_00000003" / "config.json").read_text()), by_hand.cfg)
    images = generate(by_hand, load_text_encoder(dcfg), load_vae(dcfg), PROMPTS, steps=2)
    for i, (prompt, img) in enumerate(zip(PROMPTS, images)):
        name = f"{i:03d}_{slug(prompt)}.png"
        save_png(image_grid(img[None], nrow=1, pad=0, scale=1), saved / name)
        a, b = _png(outs["default"] / name), _png(outs["raw"] / name)
        assert a.std() > 5 and np.abs(a.astype(int) - b).max() > 10
        np.testing.assert_array_equal(a, _png(saved / name))


def test_export_holds_the_ema_and_evaluate_uses_it(saved, by_hand, capsys):
    assert export.main(["--checkpoint", str(saved / "ema"), "--out", str(saved / "export_ema")]) == 0
    assert exported_weights(saved / "export_ema") == "ema"
    ex, _, _, used = load_model(saved / "export_ema")
    assert used == "ema" and all(torch.equal(v, by_hand.state_dict()[k]) for k, v in ex.state_dict().items())
    with pytest.raises(SampleError, match="--weights raw: the export .* holds EMA weights only"):
        load_model(saved / "export_ema", weights="raw")
    capsys.readouterr()
    reports = {}
    for w in ("ema", "raw"):
        out = saved / f"eval_{w}"
        assert evaluate.main(["--checkpoint", str(saved / "ema"), "--weights", w, "--num-prompts", "2",
                              "--steps", "1", "--out", str(out)]) == 0
        reports[w] = json.loads((out / "eval.json").read_text())
    assert [reports[w]["weights"] for w in reports] == ["ema", "raw"]
    assert not np.array_equal(_png(saved / "eval_ema" / "grid.png"), _png(saved / "eval_raw" / "grid.png"))


def test_without_ema_ema_falls_back_to_raw_with_a_note(saved):
    notes = []
    model, _, _, used = load_model(saved / "ckpt", log=notes.append)
    assert used == "raw" and len(notes) == 1 and "holds no EMA weights" in notes[0] and "raw" in notes[0]
    ref = load_model(saved / "ckpt", weights="raw", log=notes.append)[0]
    assert len(notes) == 1 and all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert load_model(saved / "export", log=notes.append)[3] == "raw" and len(notes) == 2  # an older raw export
