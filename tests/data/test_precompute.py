"""precompute -> latent shards -> latent loader round trip; resumable per shard; bad latent samples skipped."""

import os

import pytest
import safetensors.torch
import torch
import webdataset as wds

from data import precompute
from data.config import DataConfig
from data.encoders import FrozenEncoders, load_text_encoder, load_vae
from data.manifest import apply_manifest
from data.shardlist import expand_shards
from data.shards import make_image_loader, make_latent_loader
from data.synthetic import generate_sample


def _cfg(shards, tiny_t5, **kw):
    return DataConfig(shards=shards, text_encoder="t5", text_encoder_path=tiny_t5, max_text_len=12, batch_size=16,
                      shuffle_buffer=0, shuffle_shards=False, epochs=1, drop_last=False, **kw)


def _inputs(shapes_dir, n=3):
    return expand_shards(shapes_dir["pattern"])[:n]


@pytest.fixture(scope="module")
def emb_run(shapes_dir, tiny_t5, tmp_path_factory):
    """The first 3 shapes shards precomputed with the tiny T5's embeddings stored: (cfg, summary)."""
    cfg = _cfg("", tiny_t5)
    out = str(tmp_path_factory.mktemp("emb"))
    return cfg, precompute.precompute(cfg, _inputs(shapes_dir), out, storage="emb", progress=False)


def test_round_trip_pixel_vae_and_t5_embeddings(emb_run, tiny_t5):
    cfg, s = emb_run
    assert s["shards"] == 3 and s["samples"] == s["last_run"]["new_samples"] == 120 and s["bad"] == {}
    assert s["bytes_per_sample_emb"] > s["bytes_per_sample_ids"] > s["latent_bytes"] == 3 * 32 * 32 * 4
    assert (s["latent_shape"], s["latent_dtype"], s["text_storage"], s["text_dim"]) == ([3, 32, 32], "fp32", "emb", 64)
    resolved = apply_manifest(DataConfig(kind="latent", shards=s["pattern"]))
    assert (resolved.text_storage, resolved.text_encoder_path, resolved.max_text_len) == ("emb", tiny_t5, 12)
    loader = make_latent_loader(cfg.replace(shards=s["pattern"]))
    text, vae, seen = load_text_encoder(cfg), load_vae(cfg), []
    for b in loader:
        assert b["latent"].shape[1:] == (3, 32, 32) and b["text_emb"].shape[1:] == (12, 64)
        images = ((vae.decode(b["latent"]) + 1) * 127.5).round().to(torch.uint8)  # [B, 3, 32, 32]
        fresh_emb, fresh_mask = text(b["caption"])
        for i, key in enumerate(b["key"]):
            img, caption, _ = generate_sample(int(key), 0, 32)
            assert torch.equal(images[i], torch.from_numpy(img.copy()).permute(2, 0, 1))  # pixel VAE: exact
            assert b["caption"][i] == caption
        assert torch.equal(b["text_mask"], fresh_mask)  # truncated to the caption length, re-padded
        torch.testing.assert_close(b["text_emb"].float(), fresh_emb, rtol=2e-2, atol=2e-2)  # stored in bf16
        assert b["text_emb"].dtype == torch.bfloat16 and (b["text_emb"][~b["text_mask"]] == 0).all()
        seen += b["key"]
    assert sorted(seen) == [f"{i:09d}" for i in range(120)]


def test_stored_text_embeddings_are_the_online_encoders_rounded_to_bf16(emb_run, shapes_dir):
    """Each stored bf16 embedding is within half a bf16 ulp (relative 2^-8, plus 1e-6 for fp32 differences
    between batchings) of the fp32 embedding the trainer computes online for the same caption from the
    image shards (data/encoders.py `online_encoders`)."""
    from data.encoders import online_encoders as _frozen_encoders

    cfg, s = emb_run
    image_cfg = cfg.replace(shards="::".join(_inputs(shapes_dir)), batch_size=7)  # other batches than precompute's
    online = {}
    for b in make_image_loader(image_cfg, transform=_frozen_encoders(image_cfg, torch.device("cpu"), False)):
        assert b["text_emb"].dtype == torch.float32
        online.update({k: (b["caption"][i], b["text_emb"][i], b["text_mask"][i]) for i, k in enumerate(b["key"])})
    stored = {}
    for b in make_latent_loader(cfg.replace(shards=s["pattern"])):
        assert b["text_emb"].dtype == torch.bfloat16
        stored.update({k: (b["caption"][i], b["text_emb"][i], b["text_mask"][i]) for i, k in enumerate(b["key"])})
    assert len(online) == 120 and stored.keys() == online.keys()
    for key, (caption, emb, mask) in online.items():
        caption_s, emb_s, mask_s = stored[key]
        assert caption_s == caption and torch.equal(mask_s, mask) and mask.any()
        err = (emb_s.float() - emb).abs()
        bound = emb.abs() * 2.0 ** -8 + 1e-6
        assert bool((err <= bound).all()), (key, (err / bound).max().item())


def test_ids_storage_with_online_text_encoder_and_resume(shapes_dir, tiny_t5, tmp_path):
    cfg = _cfg("", tiny_t5)
    s = precompute.precompute(cfg, _inputs(shapes_dir, 2), str(tmp_path), storage="ids", progress=False)
    first = os.path.join(tmp_path, "shapes-000000.tar")
    mtime = os.stat(first).st_mtime_ns
    again = precompute.precompute(cfg, _inputs(shapes_dir, 2), str(tmp_path), storage="ids", progress=False)
    assert again["last_run"]["new_samples"] == 0 and os.stat(first).st_mtime_ns == mtime  # finished: skipped
    os.remove(first)
    again = precompute.precompute(cfg, _inputs(shapes_dir, 2), str(tmp_path), storage="ids", progress=False)
    assert again["last_run"]["new_samples"] == 40 and again["samples"] == 80  # only the missing shard is redone
    with pytest.raises(ValueError, match="other settings"):
        precompute.precompute(cfg, _inputs(shapes_dir, 2), str(tmp_path), storage="emb", progress=False)
    enc = FrozenEncoders(cfg, vae=False)
    batch = next(iter(make_latent_loader(cfg.replace(shards=s["pattern"]), transform=enc)))
    assert batch["text_ids"].dtype == torch.long
    emb, mask = enc.text(batch["caption"])
    assert torch.equal(batch["text_mask"], mask)
    torch.testing.assert_close(batch["text_emb"], emb)


def test_bad_latent_samples_are_skipped_and_counted(tiny_t5, tmp_path):
    def rec(key, latent, **extra):
        blob = safetensors.torch.save(dict(latent=latent, text_ids=torch.arange(1, 5, dtype=torch.int32)))
        return {"__key__": key, "safetensors": blob, "txt": b"a square", **extra}

    good = [rec(f"g{i}", torch.randn(3, 32, 32)) for i in range(6)]
    bad = [rec("wrong_shape", torch.randn(3, 16, 16)), rec("int_latent", torch.zeros(3, 32, 32, dtype=torch.int32)),
           rec("pickled", torch.randn(3, 32, 32), pyd=b"\x80\x04K\x01."),
           {"__key__": "npy_pickle", "latent.npy": b"\x93NUMPY garbage", "txt": b"x"}]
    with wds.TarWriter(str(tmp_path / "l-0.tar"), encoder=False) as w:
        for r in good[:3] + bad + good[3:]:
            w.write(r)
    cfg = _cfg(str(tmp_path / "l-0.tar"), tiny_t5, max_bad_fraction=0.5)
    loader = make_latent_loader(cfg, check_text_dim=False)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"g{i}" for i in range(6)]
    assert loader.stats()["bad"] == {"latent": 3, "pickle": 1}


def test_cli_help_and_one_line_errors(shapes_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        precompute.main(["--help"])
    assert e.value.code == 0 and "--text-storage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        precompute.main(["--input", str(tmp_path / "missing-{0..2}.tar"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--input" in err and "missing-0.tar" in err
    with pytest.raises(SystemExit) as e:
        precompute.main(["--input", shapes_dir["pattern"], "--output", str(tmp_path / "o"), "--vae", "kl"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "vae_path" in err


def test_bad_inputs_are_counted_in_the_manifest(shapes_dir, tiny_t5, tmp_path):
    import tarfile

    src = _inputs(shapes_dir, 2)
    with wds.TarWriter(str(tmp_path / "bad-0.tar"), encoder=False) as w:
        for raw in wds.DataPipeline(wds.SimpleShardList(src[:1]), wds.tarfile_to_samples()):
            w.write({k: v for k, v in raw.items() if k in ("__key__", "png", "txt")})
        w.write({"__key__": "garbage", "png": b"not a png", "txt": b"a circle"})
    with tarfile.open(src[1]) as t:
        cut = t.getmembers()[-1].offset + 100  # inside the last member's header
    (tmp_path / "cut-1.tar").write_bytes(open(src[1], "rb").read()[:cut])
    inputs = [str(tmp_path / "bad-0.tar"), str(tmp_path / "cut-1.tar")]
    s = precompute.precompute(_cfg("", tiny_t5), inputs, str(tmp_path / "out"), storage="ids", progress=False)
    assert (s["samples"], s["bad"]) == (40 + 39, {"image": 1, "tar": 1})
    assert s["pattern"] == f"{tmp_path}/out/bad-0.tar::{tmp_path}/out/cut-1.tar"
