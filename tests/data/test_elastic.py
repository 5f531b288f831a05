"""Elastic resume (data/stream.py through the loader): every sample once per epoch across restarts at other
ranks x workers, no fully consumed shard re-read, epochs crossed; web-grade bad data; shard-list checks."""

import itertools
import json
import os
import tarfile

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

import data.shards as shards
from data.config import DataConfig
from data.shardlist import check_shard_list
from data.shards import TooManyBadSamples, make_image_loader, saved_counts
from data.stream import merge_states
from data.synthetic import encode_sample
from data.webshards import write_web_shards


def cfg_for(pattern, **kw):
    base = dict(shards=pattern, batch_size=8, num_workers=0, shuffle_buffer=32, epochs=1, seed=0, drop_last=False)
    return DataConfig(**{**base, **kw})


def take(loader, n=None) -> list[str]:
    """The keys of the next n batches (all when None); the loader's position is right after them."""
    return [k for batch in itertools.islice(loader, n) for k in batch["key"]]


def json_round_trip(states):
    return json.loads(json.dumps(states))  # what a checkpoint stores


def test_restore_at_the_same_topology_is_exact(shapes_dir):
    cfg = cfg_for(shapes_dir["pattern"], epochs=None, num_workers=2, batch_size=12)
    straight = [make_image_loader(cfg, rank=r, world_size=2) for r in range(2)]
    full = [take(lo, 30) for lo in straight]
    first = [make_image_loader(cfg, rank=r, world_size=2) for r in range(2)]
    head = [take(lo, 9) for lo in first]
    states = json_round_trip([lo.state_dict() for lo in first])
    resumed = [make_image_loader(cfg, rank=r, world_size=2) for r in range(2)]
    assert [lo.restore(states) for lo in resumed] == ["exact", "exact"]
    assert [h + take(lo, 21) for h, lo in zip(head, resumed)] == full  # crosses the epoch boundary too


def test_elastic_chain_delivers_every_sample_once_in_process(shapes_dir):
    """4 ranks x 2 workers -> 2 x 3 -> 3 x 1 (ranks in one process, workers real), to the epoch's end."""
    cfg = cfg_for(shapes_dir["pattern"])
    delivered, states = [], None
    for world, workers, batches in ((4, 2, 3), (2, 3, 4), (3, 1, None)):
        loaders = [make_image_loader(cfg.replace(num_workers=workers), rank=r, world_size=world) for r in range(world)]
        if states is not None:
            assert {lo.restore(states) for lo in loaders} == {"elastic"}
        for lo in loaders:
            delivered += take(lo, batches)
        states = json_round_trip([lo.state_dict() for lo in loaders])
    assert len(delivered) == len(set(delivered)) and set(delivered) == shapes_dir["keys"]


def _phase(rank, world, init_file, cfg_kw, batches, states_in, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = make_image_loader(DataConfig(**cfg_kw))  # rank and world size from the process group
        if states_in:
            loader.restore(json.load(open(states_in)))
        keys = take(loader, batches)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(keys=keys, state=loader.state_dict()), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_elastic_chain_with_real_processes(shapes_dir, tmp_path):
    """Saved at 4 ranks x 2 workers, resumed at 2 x 3, saved again, resumed at 3 x 1 (gloo ranks): the keys
    delivered over the epoch are its key set, none twice."""
    delivered, states_in = [], None
    for phase, (world, workers, batches) in enumerate(((4, 2, 3), (2, 3, 4), (3, 1, None))):
        out = tmp_path / f"phase{phase}"
        out.mkdir()
        kw = dict(shards=shapes_dir["pattern"], batch_size=8, num_workers=workers, shuffle_buffer=32, epochs=1,
                  seed=0, drop_last=False)
        mp.start_processes(_phase, args=(world, str(out / "init"), kw, batches, states_in, str(out)), nprocs=world,
                           join=True, start_method="fork")  # fork: the children skip the imports
        results = [json.load(open(out / f"rank{r}.json")) for r in range(world)]
        delivered += [k for r in results for k in r["keys"]]
        states_in = str(out / "states.json")
        with open(states_in, "w") as f:
            json.dump([r["state"] for r in results], f)
    assert len(delivered) == len(set(delivered)) and set(delivered) == shapes_dir["keys"]


def test_elastic_resume_reads_no_fully_consumed_shard(shapes_dir, monkeypatch):
    cfg = cfg_for(shapes_dir["pattern"], shuffle_buffer=16)
    first = make_image_loader(cfg, rank=0, world_size=1)
    head = take(first, 24)  # 192 of 320 samples
    states = json_round_trip([first.state_dict()])
    consumed = {int(k) // 40 for k in head if sum(int(h) // 40 == int(k) // 40 for h in head) == 40}
    assert len(consumed) >= 2  # some shards fully delivered
    opened = []
    real = shards.shard_samples
    monkeypatch.setattr(shards, "shard_samples", lambda url, *a: opened.append(url) or real(url, *a))
    rest = []
    for rank in range(2):
        lo = make_image_loader(cfg, rank=rank, world_size=2)
        assert lo.restore(states) == "elastic"
        rest += take(lo)
    assert sorted(head + rest) == sorted(shapes_dir["keys"]) and len(set(head) & set(rest)) == 0
    names = {os.path.basename(u) for u in opened}
    assert not names & {f"shapes-{s:06d}.tar" for s in consumed}, (names, consumed)


def _uneven_shards(tmp_path):
    sizes = [6, 50, 6, 50, 6, 50]
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(tmp_path / f"u-{s}.tar"), encoder=False) as w:
            for i in range(n):
                w.write(encode_sample(1000 * s + i, 0, 32))
    return str(tmp_path / "u-{0..5}.tar"), {f"{1000 * s + i:09d}" for s, n in enumerate(sizes) for i in range(n)}


def test_elastic_resume_across_epochs_with_readers_in_different_epochs(tmp_path):
    """Readers with small shards run an epoch ahead; restored at 3 ranks, both epochs stay exact."""
    pattern, keys = _uneven_shards(tmp_path)
    cfg = cfg_for(pattern, epochs=2, shuffle_shards=False, shuffle_buffer=4, batch_size=4)
    first = [make_image_loader(cfg.replace(num_workers=2), rank=r, world_size=1) for r in range(1)]
    head = take(first[0], 20)
    states = json_round_trip([lo.state_dict() for lo in first])
    epochs = {json.dumps(p["reader"]["epoch"]) for p in states[0]["workers"].values()}
    assert epochs == {"0", "1"}  # one worker has started epoch 1, the other is still in epoch 0
    rest = []
    for rank in range(3):
        lo = make_image_loader(cfg, rank=rank, world_size=3)
        lo.restore(states)
        rest += take(lo)
    delivered = head + rest
    assert sorted(delivered) == sorted(list(keys) * 2)  # every sample exactly once in each epoch


def test_merge_refuses_another_shard_list(shapes_dir):
    lo = make_image_loader(cfg_for(shapes_dir["pattern"]), rank=0, world_size=1)
    take(lo, 2)
    readers = [p["reader"] for p in lo.state_dict()["workers"].values()]
    with pytest.raises(ValueError, match="shards"):
        merge_states(readers, 9, True)
    other = make_image_loader(cfg_for(shapes_dir["pattern"].replace("000007", "000006")), rank=0, world_size=2)
    with pytest.raises(ValueError, match="data.shards"):
        other.restore([lo.state_dict()])


# ----------------------------------------------------------------------------------------- web-grade bad data


def test_ten_percent_bad_trains_with_exact_counts(tmp_path):
    pattern, truth = write_web_shards(str(tmp_path), 4, 60, size=32, bad_fraction=0.1, seed=1)
    assert 15 <= sum(truth["bad"].values()) <= 35
    loader = make_image_loader(cfg_for(pattern, num_workers=2))  # the defaults judge the bad fraction
    keys = take(loader)
    assert sorted(keys) == sorted(truth["good"])
    assert loader.stats() == dict(good=len(truth["good"]), bad=truth["bad"])


def test_half_bad_stops_with_one_message(tmp_path):
    pattern, truth = write_web_shards(str(tmp_path), 4, 60, size=32, bad_fraction=0.5, seed=2)
    with pytest.raises(TooManyBadSamples, match=r"data \(rank 0\): \d+ of 2\d\d samples were bad .* > "
                                                r"data.max_bad_fraction=25.0%"):
        take(make_image_loader(cfg_for(pattern, num_workers=2)))


def test_shard_cut_inside_a_header_is_counted_as_tar(shapes_dir, tmp_path):
    src = os.path.join(shapes_dir["dir"], "shapes-000001.tar")
    with tarfile.open(src) as tf:
        last_json = [m for m in tf.getmembers()][-1]  # the last sample's json header
    with open(src, "rb") as f:
        data = f.read()[: last_json.offset + 100]  # inside the header
    (tmp_path / "cut.tar").write_bytes(data)
    loader = make_image_loader(cfg_for(str(tmp_path / "cut.tar")))
    keys = take(loader)
    assert sorted(keys) == [f"{i:09d}" for i in range(40, 79)]  # the last sample (79) is dropped
    assert loader.stats()["bad"] == {"tar": 1}


def test_shard_list_checks_name_the_field(shapes_dir, tmp_path):
    for shards_value, message in (("", "data.shards is empty"),
                                  (shapes_dir["dir"], r"is a directory: give the shard files as a brace pattern such as"),
                                  (str(tmp_path / "x-{0..3}.tar"), "data.shards: 4 of 4 shards do not exist"),
                                  (shapes_dir["pattern"], r"data.shards: 8 shards < 3 ranks x 3 workers")):
        with pytest.raises(ValueError, match=message):
            check_shard_list(DataConfig(shards=shards_value, num_workers=3), world_size=3)


def test_epoch_end_counts_match_the_trained_keys_over_an_elastic_chain(tmp_path):
    """3 ranks x 1 worker -> 2 x 2 -> 1 x 2 to the end of a finite epoch (drop_last, ranks in one process,
    lockstep steps as the trainer runs them). The keys recorded where batches reach the loss (`StepBatches.take`,
    the trainer's forward_backward input) are distinct; the closing counts (train/trainer.py `summary`:
    `StepBatches.trained` / `unread` summed over ranks) are exactly those trained and the rest of the epoch,
    partial last batches of two readers included."""
    from data.synthetic import write_shards
    from data.steps import StepBatches

    epoch = 8 * 25  # shards of 25 samples: the last run's two readers each end in a partial batch of 8
    cfg = cfg_for(write_shards(str(tmp_path), epoch, 25, 16, seed=0, progress=False), shuffle_buffer=16,
                  drop_last=True)
    trained, states = [], None
    for world, workers, steps in ((3, 1, 4), (2, 2, 5), (1, 2, None)):
        loaders = [make_image_loader(cfg.replace(num_workers=workers), rank=r, world_size=world) for r in range(world)]
        if states is not None:
            assert {lo.restore(states) for lo in loaders} == {"elastic"}
        ranks = [StepBatches(lo, 1) for lo in loaders]
        step = 0
        while not any(b.out_of_data for b in ranks) and step != steps:
            for b in ranks:
                trained += [k for batch in b.take() for k in batch["key"]]
                b.fetch()
            step += 1
        states = json_round_trip([b.data_state for b in ranks])
    delivered, unread = sum(b.trained() for b in ranks), sum(b.unread() for b in ranks)
    last = [p["counts"]["dropped"] for p in ranks[0].loader.positions.values()]  # this run's two readers
    assert len(trained) == len(set(trained))
    assert (delivered, unread) == (len(trained), epoch - len(trained))
    assert all(last) and unread == saved_counts(ranks[0].loader.state_dict())["dropped"]  # partial last batches (earlier runs' too)
