"""Diffusers export (`python -m train.export --format diffusers`): ECDiTPipeline.from_pretrained of the folder
draws the image train.sample draws (same prompt, seed, steps, guidance, shift, routing; atol 1e-6 on images in
[-1, 1], bitwise in practice) for expert choice (per-sample, dynamic, token groups, batch), token choice
(per-sample, dynamic), DiffMoE (per-sample, dynamic) and dense, through a KL VAE with per-channel latent
statistics and the identity pixel VAE; export -> load -> export gives the same tensors; a folder of another
export version is refused with one line. Stock diffusers (`DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` in a Python where this repository cannot be imported) draws the same images from the
folder's generated code files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data.config import DataConfig
from data.encoders import load_text_encoder, load_vae
from tests.model.helpers import tiny_batch, tiny_model
from train.weights import export_safetensors
from train.export import main as export_main
from train.generate import generate, generate_latents
from train.inference_model import load_model

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow diamond"]
ATOL = 1e-6  # images in [-1, 1], fp32 on CPU
STEPS, GUIDANCE, SEED = 3, 4.0, 3
# model preset -> VAE of its run; the KL VAE has 4 latent channels at half resolution (the tiny presets'
# 8x8x4 latents), the pixel VAE needs in_channels 3.
VARIANTS = {"tiny-ec": "kl", "tiny-tc": "kl", "tiny-diffmoe": "kl", "tiny-dense": "pixel"}


def _tiny_vae(path: Path) -> str:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, scaling_factor=0.7,
                            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
    vae.save_pretrained(path)
    return str(path)


def _data(enc: dict, vae: str) -> dict:
    return {"text_encoder": "t5", "text_encoder_path": enc["t5"], "max_text_len": 8, "vae": vae,
            "vae_path": enc["kl"] if vae == "kl" else ""}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per variant: a safetensors export of a tiny fp32 model with trained routing thresholds and its
    diffusers export (train.export's CLI, the encoders given by flags), plus the encoders."""
    from data.encoders import save_random_t5

    root = tmp_path_factory.mktemp("dx")
    enc = {"t5": save_random_t5(str(root / "t5"), PROMPTS + ["three cyan circles"], d_model=32),
           "kl": _tiny_vae(root / "vae")}
    out = {}
    for i, (name, vae) in enumerate(VARIANTS.items()):
        model, cfg = tiny_model(name, seed=i, dtype=torch.float32, in_channels=4 if vae == "kl" else 3)
        with torch.no_grad():  # routing thresholds from a few training-mode forwards
            for s in range(3):
                model.train()(*tiny_batch(cfg, 4, seed=10 + s, dtype=torch.float32))
        plain, dx = root / f"{name}-st", root / f"{name}-dx"
        export_safetensors(model.eval(), plain)
        d = _data(enc, vae)
        args = ["--checkpoint", str(plain), "--format", "diffusers", "--out", str(dx), "--text-encoder", "t5",
                "--text-encoder-path", d["text_encoder_path"], "--max-text-len", "8", "--vae", vae]
        assert export_main(args + (["--vae-path", enc["kl"]] if vae == "kl" else [])) == 0
        out[name] = {"plain": plain, "dx": dx, "data": d}
    return out


@pytest.fixture(scope="module")
def pipes(exports):
    from train.diffusers_pipeline import ECDiTPipeline

    return {name: ECDiTPipeline.from_pretrained(str(e["dx"])) for name, e in exports.items()}


def _reference(export: dict, prompts, latents=False, **kw):
    """train.sample's path: load_model of the safetensors export, the run's encoders, generate()."""
    model, _, _, _ = load_model(export["plain"], "cpu", "raw")
    dcfg = DataConfig(**export["data"], shards="ignored", image_size=8 if export["data"]["vae"] == "pixel" else 16)
    text = load_text_encoder(dcfg, "cpu")
    kw = {"steps": STEPS, "guidance": GUIDANCE, "seed": SEED, **kw}
    if latents:
        return generate_latents(model, text, prompts, **kw)
    return generate(model, text, load_vae(dcfg, "cpu"), prompts, **kw)


CASES = [("tiny-ec", {"routing": "sample"}), ("tiny-ec", {"routing": "dynamic"}),
         ("tiny-ec", {"routing": "dynamic", "multiplier": 1.3, "shift": 3.0}),
         ("tiny-ec", {"routing": "tokens", "group_size": 64, "batch_size": 2}), ("tiny-ec", {"routing": "batch"}),
         ("tiny-tc", {"routing": "sample"}), ("tiny-tc", {"routing": "dynamic"}),
         ("tiny-diffmoe", {"routing": "sample"}), ("tiny-diffmoe", {"routing": "dynamic"}),
         ("tiny-dense", {})]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'dense'}" for n, k in CASES])
def test_pipeline_image_equals_train_sample(exports, pipes, name, kw):
    ref = _reference(exports[name], PROMPTS, **kw)  # [N, 3, H, W] in [-1, 1]
    call = {"routing": kw.get("routing", "sample"), "dynamic_multiplier": kw.get("multiplier"),
            "group_size": kw.get("group_size"), "batch_size": kw.get("batch_size", 8), "shift": kw.get("shift")}
    out = pipes[name](PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="pt",
                      **call).images  # [N, 3, H, W] in [0, 1]
    assert out.shape == ref.shape
    torch.testing.assert_close(out * 2 - 1, ref, rtol=0, atol=ATOL)
    assert ref.std() > 0.05 and (ref[0] - ref[1]).abs().max() > 1e-2  # a real, prompt-dependent image


def test_routing_modes_differ_and_thresholds_are_exported(exports, pipes):
    """The modes compared above draw different images, so each comparison checks its own mode."""
    pipe = pipes["tiny-ec"]
    kw = {"num_inference_steps": STEPS, "seed": SEED, "output_type": "latent"}
    lat = {r: pipe(PROMPTS, routing=r, **kw).images for r in ("sample", "dynamic", "batch")}
    lat["x1.3"] = pipe(PROMPTS, routing="dynamic", dynamic_multiplier=1.3, **kw).images
    keys = list(lat)
    assert all((lat[a] - lat[b]).abs().max() > 1e-3 for i, a in enumerate(keys) for b in keys[i + 1:])
    model, _, _, _ = load_model(exports["tiny-ec"]["plain"], "cpu", "raw")
    for mine, theirs in zip(pipe.transformer.dit.routers(), model.routers()):
        assert torch.equal(mine.threshold_E, theirs.threshold_E) and theirs.threshold_updates > 0


def test_pil_output_equals_train_sample_png(exports, pipes, tmp_path):
    from train.sample import main as sample_main

    e = exports["tiny-ec"]
    d = e["data"]
    assert sample_main(["--checkpoint", str(e["plain"]), "--prompts", PROMPTS[0], "--steps", str(STEPS),
                        "--seed", str(SEED), "--routing", "dynamic", "--text-encoder", "t5", "--text-encoder-path",
                        d["text_encoder_path"], "--max-text-len", "8", "--vae", "kl", "--vae-path", d["vae_path"],
                        "--out", str(tmp_path)]) == 0
    png = np.asarray(Image.open(tmp_path / "000_a_red_circle.png").convert("RGB"))
    img = pipes["tiny-ec"](PROMPTS[0], num_inference_steps=STEPS, seed=SEED, routing="dynamic").images[0]
    assert np.array_equal(np.asarray(img), png)


def _config(path: Path) -> dict:
    """A config file without the folder it was loaded from."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_name_or_path"}


def _tensors(folder: Path) -> dict:
    return {f"{f.parent.name}/{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}


def test_export_load_export_gives_the_same_tensors(exports, pipes, tmp_path):
    from train.diffusers_pipeline import ECDiTPipeline

    e = exports["tiny-ec"]
    pipes["tiny-ec"].save_pretrained(tmp_path / "again")
    ECDiTPipeline.from_pretrained(str(tmp_path / "again")).save_pretrained(tmp_path / "third")
    first = _tensors(e["dx"])
    assert {k.split("/")[0] for k in first} == {"transformer", "text_encoder", "vae"}
    for folder in (tmp_path / "again", tmp_path / "third"):
        again = _tensors(folder)
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
        for f in ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json"):
            assert _config(folder / f) == _config(e["dx"] / f)
    # the transformer holds exactly the safetensors export's weights (thresholds included)
    export_safetensors(pipes["tiny-ec"].transformer.dit, tmp_path / "st")
    plain, st = load_file(e["plain"] / "model.safetensors"), load_file(tmp_path / "st" / "model.safetensors")
    assert plain.keys() == st.keys() and all(torch.equal(plain[k], st[k]) for k in plain)
    assert any(k.endswith("threshold_E") for k in plain)


@pytest.mark.parametrize("file,version", [("model_index.json", 0), ("model_index.json", 1),
                                          ("transformer/config.json", 1), ("model_index.json", None)])
def test_other_export_version_is_refused_with_one_line(exports, tmp_path, file, version):
    from train.diffusers_pipeline import EXPORT_VERSION, ECDiTPipeline, ECDiTTransformer2DModel, ExportVersionError

    dx = tmp_path / "old"
    shutil.copytree(exports["tiny-dense"]["dx"], dx)
    conf = json.loads((dx / file).read_text())
    if version is None:
        del conf["export_version"]
    else:
        conf["export_version"] = version
    (dx / file).write_text(json.dumps(conf))
    with pytest.raises(ExportVersionError) as err:
        ECDiTPipeline.from_pretrained(str(dx))
    msg = str(err.value)
    assert "\n" not in msg and f"export_version {version} (this code reads export_version {EXPORT_VERSION})" in msg
    if file.startswith("transformer"):
        with pytest.raises(ExportVersionError, match=f"export_version {version} "):
            ECDiTTransformer2DModel.from_pretrained(str(dx), subfolder="transformer")


def test_bad_call_arguments_are_one_line(pipes):
    from train.generate import SampleError

    pipe = pipes["tiny-ec"]
    for kw, field in [({"routing": "experts"}, "routing"), ({"num_inference_steps": 0}, "num_inference_steps"),
                      ({"group_size": 64}, "group_size"), ({"dynamic_multiplier": 0.5}, "dynamic_multiplier"),
                      ({"output_type": "jpg"}, "output_type")]:
        with pytest.raises(SampleError, match=field) as err:
            pipe(PROMPTS[:1], **kw)
        assert "\n" not in str(err.value)
    pipe.scheduler.register_to_config(use_karras_sigmas=True)
    try:
        with pytest.raises(SampleError, match="use_karras_sigmas"):
            pipe(PROMPTS[:1])
    finally:
        pipe.scheduler.register_to_config(use_karras_sigmas=False)


def test_loads_and_samples_without_the_training_stack(exports):
    """The user's path imports torch, diffusers, transformers, safetensors and our model code only: loading
    and sampling imports none of hydra, omegaconf, wandb, deepspeed, megatron, webdataset (all installed here)."""
    code = f"""
import sys
from train.diffusers_pipeline import ECDiTPipeline
pipe = ECDiTPipeline.from_pretrained({str(exports["tiny-dense"]["dx"])!r})
size = pipe("a red circle", num_inference_steps=2).images[0].size
stack = ("hydra", "omegaconf", "wandb", "deepspeed", "megatron", "webdataset")
print(size, sorted({{m.split(".")[0] for m in sys.modules}} & set(stack)))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "(8, 8) []"


# ---- stock diffusers: the folder's generated code, without this repository -------------------------------

STOCK = """
import json, os, sys
repo = sys.argv[1]
for name in ("train", "model", "data", "parallel", "bench", "launch"):
    sys.modules[name] = None  # this repository's packages cannot be imported
sys.path = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != repo]
import torch
from diffusers import AutoModel, DiffusionPipeline

cases = json.loads(sys.argv[2])
out = {}
for key, (folder, call) in cases.items():
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert not type(pipe).__module__.startswith(("train", "model")), type(pipe).__module__
    out[key] = pipe(**call, output_type="pt").images
folder = cases["tiny-ec-sample"][0]
tr = AutoModel.from_pretrained(os.path.join(folder, "transformer"), trust_remote_code=True, torch_dtype=torch.bfloat16)
out["dtypes"] = sorted({(("router" in n.split(".")), str(t.dtype)) for n, t in tr.state_dict().items()
                        if t.is_floating_point()})
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.bfloat16)
out["bf16_finite"] = bool(pipe("a red circle", num_inference_steps=2, output_type="latent").images.isfinite().all())
try:
    DiffusionPipeline.from_pretrained(sys.argv[3], trust_remote_code=True)
except Exception as e:
    out["old"] = f"{type(e).__name__}: {e}"
out["modules"] = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
                        & {"train", "model", "data", "parallel", "bench", "launch", "hydra", "omegaconf", "wandb"})
torch.save(out, sys.argv[4])
"""


def test_stock_diffusers_loads_the_folder_without_this_repository(exports, tmp_path):
    """The export's layout (pipeline_ecdit.py, transformer/modeling_ecdit.py named in model_index.json, a
    model card), loaded in a subprocess where none of this repository's packages import: every variant and
    routing mode draws train.sample's image; torch_dtype=bfloat16 keeps the routers fp32; an export of the
    previous version is refused with one line."""
    from train.diffusers_pipeline import EXPORT_VERSION, code_files

    dx = exports["tiny-ec"]["dx"]
    index = json.loads((dx / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ecdit", "ECDiTPipeline"]
    assert index["transformer"] == ["modeling_ecdit", "ECDiTTransformer2DModel"]
    for rel, code in code_files().items():  # generated from this repository's source as it is now
        assert (dx / rel).read_text() == code
    card = (dx / "README.md").read_text()
    assert "library_name: diffusers" in card and "tiny-ec" in card and "trust_remote_code=True" in card
    old = tmp_path / "old"
    shutil.copytree(exports["tiny-dense"]["dx"], old)
    conf = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**conf, "export_version": EXPORT_VERSION - 1}))

    cases = {f"{name}-{'-'.join(map(str, kw.values())) or 'dense'}": (name, kw) for name, kw in CASES}
    calls = {key: (str(exports[name]["dx"]), {
        "prompt": PROMPTS, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "seed": SEED,
        "routing": kw.get("routing", "sample"), "dynamic_multiplier": kw.get("multiplier"),
        "group_size": kw.get("group_size"), "batch_size": kw.get("batch_size", 8), "shift": kw.get("shift")})
        for key, (name, kw) in cases.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = subprocess.run([sys.executable, "-c", STOCK, str(ROOT), json.dumps(calls), str(old), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for key, (name, kw) in cases.items():
        ref = _reference(exports[name], PROMPTS, **kw)
        torch.testing.assert_close(out[key] * 2 - 1, ref, rtol=0, atol=ATOL, msg=key)
    assert out["dtypes"] == [(False, "torch.bfloat16"), (True, "torch.float32")]
    assert out["bf16_finite"]
    assert out["old"].startswith("ExportVersionError: ") and "\n" not in out["old"]
    assert f"export_version {EXPORT_VERSION - 1} (this code reads export_version {EXPORT_VERSION})" in out["old"]
    assert out["modules"] == []


def test_generated_code_refuses_what_is_not_self_contained():
    from train.diffusers_code import CodegenError, check_self_contained

    check_self_contained("import torch\n\ndef f(x):\n    return torch.relu(x) + len(x)\n")
    for code, why in [("def f(x):\n    return g(x)\n", "no definition of g"),
                      ("from model.dit import DiT\n", "imports model.dit"),
                      ("from .modeling import X\n", "imports .modeling")]:
        with pytest.raises(CodegenError, match=why):
            check_self_contained(code)


def test_generator_refuses_collisions_and_imports_it_cannot_inline(tmp_path, monkeypatch):
    import train.diffusers_code as dc

    pkg = tmp_path / "zzpkg"
    pkg.mkdir()
    files = {"__init__.py": "", "a.py": "def f():\n    return 1\n", "b.py": "def f():\n    return 2\n\n\ndef k():\n    return f()\n",
             "c.py": "from zzpkg.a import f\nfrom zzpkg.b import k\n\n\ndef h():\n    return f() + k()\n",
             "d.py": "def h():\n    from zzpkg.a import f\n    return f()\n",
             "e.py": "from zzpkg.a import f as g\n\n\ndef h():\n    return g()\n",
             "ok.py": "import math\n\nfrom zzpkg.b import k\n\n\nclass C:\n    def m(self):\n        return k()\n\n"
                      "    def gone(self):\n        return undefined_name\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dc, "PROJECT", dc.PROJECT + ("zzpkg",))
    for module, why in [("zzpkg.c", "`f` is defined in both zzpkg.a and zzpkg.b"), ("zzpkg.d", "inside its body"),
                        ("zzpkg.e", "aliased project import")]:
        with pytest.raises(dc.CodegenError, match=why):
            dc.generate([(module, "h")])
    with pytest.raises(dc.CodegenError, match="no definition of undefined_name"):
        dc.generate([("zzpkg.ok", "C")])
    with pytest.raises(dc.CodegenError, match="not found"):
        dc.generate([("zzpkg.ok", "C")], drop={"C.missing"})
    code = dc.generate([("zzpkg.ok", "C")], drop={"C.gone"})
    ns = {}
    exec(code, ns)
    assert ns["C"]().m() == 2 and "import math" not in code and "zzpkg" not in code.split("# ----", 1)[0]
