"""Two gloo ranks x two DataLoader workers each read disjoint samples whose union is the whole epoch."""

import json
import os

import pytest
import torch.distributed as dist

from tests.parallel.helpers import spawn


def _rank_main(rank, world, init_file, pattern, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from data.config import DataConfig
        from data.shards import make_image_loader

        cfg = DataConfig(shards=pattern, batch_size=8, num_workers=2, epochs=1, shuffle_buffer=32, seed=3,
                         drop_last=False)
        loader = make_image_loader(cfg)  # rank and world size come from the process group
        keys = [k for b in loader for k in b["key"]]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(keys=keys, state=loader.state_dict()), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(tmp_path, pattern):
    os.environ["OMP_NUM_THREADS"] = "1"
    spawn(_rank_main, (2, str(tmp_path / "init"), pattern, str(tmp_path)), 2)
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_two_workers_disjoint_and_complete(shapes_dir, tmp_path):
    r0, r1 = _run(tmp_path, shapes_dir["pattern"])
    k0, k1 = set(r0["keys"]), set(r1["keys"])
    assert len(k0) == len(r0["keys"]) and len(k1) == len(r1["keys"])  # no sample twice within a rank
    assert not k0 & k1  # disjoint across ranks
    assert k0 | k1 == shapes_dir["keys"]  # union = the whole epoch
    assert r0["state"]["rank"] == 0 and r1["state"]["rank"] == 1 and r0["state"]["world_size"] == 2
    assert set(r0["state"]["workers"]) == {"0", "1"}  # both workers of each rank contributed
