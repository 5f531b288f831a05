"""WebDataset loader: complete and deterministic epochs, exact mid-epoch resume, bad samples skipped and counted."""

import json
import os
import pickle
import shutil
import tarfile

import pytest
import torch
import webdataset as wds

from data.config import DataConfig
from data.shards import TooManyBadSamples, make_image_loader
from data.synthetic import encode_sample


def cfg_for(pattern, **kw):
    base = dict(shards=pattern, batch_size=16, num_workers=0, shuffle_buffer=64, epochs=1, seed=0)
    return DataConfig(**{**base, **kw})


def keys_of(loader, n_batches=None):
    out = []
    for i, b in enumerate(loader):
        if n_batches is not None and i == n_batches:
            break
        out.append(list(b["key"]))
    return out


def flat(batches):
    return [k for b in batches for k in b]


def test_config_errors_name_the_field():
    for kw, name in ((dict(batch_size=0), "batch_size"), (dict(kind="video"), "kind"), (dict(vae="kl"), "vae_path"),
                     (dict(text_encoder="t5"), "text_encoder_path"), (dict(max_bad_fraction=2.0), "max_bad_fraction"),
                     (dict(epochs=0), "epochs")):
        with pytest.raises(ValueError, match=f"data.{name}="):
            DataConfig(**kw)


def test_epoch_is_complete_shuffled_and_deterministic(shapes_dir):
    a = flat(keys_of(make_image_loader(cfg_for(shapes_dir["pattern"], drop_last=False))))
    assert sorted(a) == sorted(shapes_dir["keys"]) and len(a) == len(set(a))
    assert a == flat(keys_of(make_image_loader(cfg_for(shapes_dir["pattern"], drop_last=False))))
    b = flat(keys_of(make_image_loader(cfg_for(shapes_dir["pattern"], drop_last=False, seed=1))))
    assert sorted(b) == sorted(a) and b != a
    assert a != sorted(a)  # shuffled
    two = flat(keys_of(make_image_loader(cfg_for(shapes_dir["pattern"], epochs=2, batch_size=20))))
    e0, e1 = two[:320], two[320:]
    assert sorted(e0) == sorted(e1) == sorted(a) and e0 != e1  # each epoch complete, reshuffled


def test_batch_contents(shapes_dir):
    from data.synthetic import generate_sample

    batch = next(iter(make_image_loader(cfg_for(shapes_dir["pattern"], batch_size=4))))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    for i, key in enumerate(batch["key"]):
        img, caption, prompt = generate_sample(int(key), 0, 32)
        expect = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch["image"][i], expect)
        assert batch["caption"][i] == caption and batch["meta"][i]["groups"] == prompt["groups"]
    assert batch["text_mask"].shape == batch["text_ids"].shape == (4, 32)
    assert (batch["text_ids"][~batch["text_mask"]] == 0).all() and batch["text_mask"][:, :3].all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(shapes_dir, workers):
    cfg = cfg_for(shapes_dir["pattern"], epochs=None, num_workers=workers, batch_size=12)
    full = keys_of(make_image_loader(cfg), 40)  # 480 samples: crosses the 320-sample epoch boundary
    first = make_image_loader(cfg)
    it = iter(first)
    for _ in range(7):  # odd: with 2 workers the next batch comes from worker 1
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    del it
    resumed = make_image_loader(cfg)
    resumed.load_state_dict(state)
    assert keys_of(resumed, 33) == full[7:40]
    with pytest.raises(ValueError, match="num_workers"):
        make_image_loader(cfg.replace(num_workers=workers + 2)).load_state_dict(state)


def test_pipe_urls_and_too_few_shards(shapes_dir, tmp_path):
    path = os.path.join(shapes_dir["dir"], "shapes-000003.tar")
    keys = flat(keys_of(make_image_loader(cfg_for(f"pipe:cat {path}", drop_last=False))))
    assert sorted(keys) == [f"{i:09d}" for i in range(120, 160)]
    with pytest.raises(ValueError, match="data.shards: 1 shards < 1 ranks x 2 workers"):
        make_image_loader(cfg_for(path, num_workers=2))


def _write(path, samples):
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


class _Exploit:  # unpickling this would run a shell command that creates a marker file
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate_in_sample(src, dst, j):
    """Copy a tar, cut in the middle of the data of sample j's first member (samples before j survive intact)."""
    with tarfile.open(src) as tf:
        member = [m for m in tf.getmembers()][3 * j]  # 3 entries per sample: png, txt, json
        cut = member.offset_data + member.size // 2
    with open(src, "rb") as f:
        data = f.read()[:cut]
    with open(dst, "wb") as f:
        f.write(data)


def test_corrupt_shards_are_skipped_and_counted(shapes_dir, tmp_path):
    marker = tmp_path / "PWNED"
    good_keys = set()
    for s in range(3):  # three intact shards
        shutil.copy(os.path.join(shapes_dir["dir"], f"shapes-{s:06d}.tar"), tmp_path / f"c-{s}.tar")
        good_keys |= {f"{i:09d}" for i in range(40 * s, 40 * s + 40)}
    _truncate_in_sample(os.path.join(shapes_dir["dir"], "shapes-000003.tar"), tmp_path / "c-3.tar", 25)
    good_keys |= {f"{i:09d}" for i in range(120, 145)}
    bad = [dict(encode_sample(1000, 0, 32), png=b"\x89PNG garbage"),  # undecodable image
           {k: v for k, v in encode_sample(1001, 0, 32).items() if k != "txt"},  # missing caption
           dict(encode_sample(1002, 0, 32), pyd=pickle.dumps(_Exploit(marker)))]  # pickle entry
    fine = [encode_sample(i, 0, 32) for i in range(1003, 1010)]
    _write(tmp_path / "c-4.tar", bad + fine)
    good_keys |= {f"{i:09d}" for i in range(1003, 1010)}
    cfg = cfg_for(str(tmp_path / "c-{0..4}.tar"), num_workers=2, drop_last=False, max_bad_fraction=0.5)
    loader = make_image_loader(cfg)
    keys = flat(keys_of(loader))
    assert sorted(keys) == sorted(good_keys)  # every good sample arrives exactly once
    assert loader.stats() == dict(good=len(good_keys), bad=dict(tar=1, image=1, caption=1, pickle=1))
    assert not marker.exists()  # the pickle was never loaded
    assert "4 bad" in loader.report()


def test_too_many_bad_samples_stop_with_a_clear_message(tmp_path):
    samples = [encode_sample(i, 0, 32) for i in range(40)]
    for s in samples[::2]:
        s["png"] = b"not an image"
    _write(tmp_path / "b-0.tar", samples)
    cfg = cfg_for(str(tmp_path / "b-0.tar"), max_bad_fraction=0.2, min_samples_for_bad_check=10, batch_size=4)
    with pytest.raises(TooManyBadSamples, match=r"max_bad_fraction=20.0%.*'image'"):
        keys_of(make_image_loader(cfg))
    ok = make_image_loader(cfg.replace(max_bad_fraction=0.6))
    assert len(flat(keys_of(ok))) == 20 and ok.stats()["bad"] == {"image": 20}


def test_explicit_ranks_split_and_resampled_streams(shapes_dir):
    cfg = cfg_for(shapes_dir["pattern"], drop_last=False)
    r0, r1 = (flat(keys_of(make_image_loader(cfg, rank=r, world_size=2))) for r in (0, 1))
    assert not set(r0) & set(r1) and set(r0) | set(r1) == shapes_dir["keys"]
    res = cfg.replace(resampled=True, epochs=3)  # each "epoch" draws 8 / 2 = 4 shards with replacement per rank
    a0, a1 = (flat(keys_of(make_image_loader(res, rank=r, world_size=2))) for r in (0, 1))
    assert len(a0) == len(a1) == 3 * 4 * 40 and a0 != a1
    assert len(set(a0)) < len(a0)  # with replacement: some shard drawn twice over three rounds
    assert a0 == flat(keys_of(make_image_loader(res, rank=0, world_size=2)))  # deterministic in the seed
