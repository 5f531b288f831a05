"""Several hosts for real (tests/multihost/cluster.py: network namespaces on a bridge, each with its own
address): `launch/multinode_torchrun.sh` on each host rendezvouses with host 0 by address, binds gloo to
the interface facing it, trains like one host, survives a lost host (frozen, or its link cut) at a smaller
world and takes it back, crawls over a throttled link as `launch/plan.py` predicts and puts on the wire the
bytes it plans."""

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
from nodes import StepProbe, node_env, per_step, start_nodes, wait_all  # noqa: E402
from test_app import BASE, losses  # noqa: E402
from test_elastic_resume import remaining, shapes_shards  # noqa: E402

SHARD, SHARDS = 32, 8
ARGS = [*BASE, "train.wandb_mode=disabled", "train.sample_prompts=[]", "train.ckpt_every=1000"]
PORTS = itertools.count(29610)  # a fresh rendezvous port per launch

RATE_MBIT = 1.0  # the throttled link
THROTTLED_STEPS = 4
DIAGNOSIS = "another rank stopped responding or died"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return shapes_shards(tmp_path_factory, SHARD, SHARDS)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else f"({path} missing)"


def test_a_wrong_master_addr_or_interface_fails_within_the_init_timeout_naming_it(cluster, tmp_path):
    unreachable = f"{cluster.subnet}.9"  # on the hosts' subnet, held by none
    cases = [({"MASTER_ADDR": unreachable}, f"MASTER_ADDR:MASTER_PORT={unreachable}:"),
             ({"MASTER_ADDR": "no-such-host.invalid"}, "MASTER_ADDR=no-such-host.invalid does not resolve"),
             ({"MASTER_ADDR": cluster.address(0), "SOCKET_IFNAME": "eth9"}, "SOCKET_IFNAME=eth9 is not an interface")]
    for env, says in cases:
        t0 = time.monotonic()
        proc = cluster.run(1, ["bash", "launch/multinode_torchrun.sh", "train.steps=1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env=node_env(NNODES="2", NODE_RANK="1", NPROC="1", INIT_TIMEOUT="3", **env))
        elapsed = time.monotonic() - t0
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (env, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (env, proc.stderr)
        assert elapsed < 3 + 5, (env, elapsed)  # INIT_TIMEOUT and a margin; no torch was imported


MODEL = ["model.dim=32", "parallel=fsdp_ep", f"train.steps={THROTTLED_STEPS}"]


@pytest.fixture(scope="module")
def throttled(cluster, data, tmp_path_factory) -> dict:
    """One fsdp_ep run (ep 2) twice: on one host (2 processes, unthrottled), then on two hosts (1 process each)
    with host 1's link throttled to RATE_MBIT. Each run's rows as they appeared (StepProbe.seen)."""
    root = tmp_path_factory.mktemp("throttled")
    args = [*ARGS, *MODEL, data]
    with open(root / "one.log", "w") as log:
        one = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "train", *args, f"train.run_dir={root / 'one'}"], cwd=ROOT, env=node_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    probe_one = StepProbe(None, root / "one")
    try:
        probe_one.wait(lambda: one.poll() is not None, 300)
    finally:
        one.kill()  # a no-op after its end
    assert one.returncode == 0, _tail(root / "one.log")
    cluster.throttle(1, f"{RATE_MBIT:g}mbit")
    try:
        procs = start_nodes(cluster, [0, 1], [*args, f"train.run_dir={root / 'two'}"], root, NNODES="2",
                            MASTER_PORT=str(next(PORTS)))
        probe = StepProbe(cluster, root / "two")
        probe.wait(lambda: all(p.poll() is not None for p in procs.values()), 600)
    finally:
        cluster.throttle(1, None)
    return {"root": root, "args": args, "codes": {i: p.returncode for i, p in procs.items()},
            "one": probe_one.seen, "two": probe.seen}


def _plan(args: list[str], out: Path, **options) -> dict:
    """launch/plan.py's row for `args` on 2 nodes x 1 GPU over gloo (its JSON written to `out`)."""
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run([sys.executable, "launch/plan.py", "--nodes", "2", "--gpus-per-node", "1", "--backend",
                           "gloo", *flags, "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())[0]


def test_two_hosts_train_like_one_host(throttled, cluster):
    root = throttled["root"]
    assert throttled["codes"] == {0: 0, 1: 0}, _tail(root / "node0.log") + _tail(root / "node1.log")
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(two) == sorted(one) == list(range(1, THROTTLED_STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one, two)
    node0, node1 = ((root / f"node{i}.log").read_text() for i in (0, 1))
    rdzv = f"rendezvous {cluster.address(0)}:"
    assert f"on {cluster.address(0)} (eth0), {rdzv}" in node0 and "(hosted here)" in node0
    assert f"on {cluster.address(1)} (eth0), {rdzv}" in node1 and "(hosted here)" not in node1


@pytest.fixture(scope="module")
def planned(throttled) -> dict:
    """launch/plan.py's row for the throttled run: its compute term calibrated on the one-host run (that run's
    step time at an effective peak), its link term the inter-node bytes at RATE_MBIT."""
    from launch.plan import run_config
    from model.flops import train_step_flops
    cfg, _, images, _ = run_config(throttled["args"], 2)
    ref_s, _ = per_step(throttled["one"], 2, THROTTLED_STEPS)
    peak_tflops = train_step_flops(cfg, images, text_len=cfg.text_len) / ref_s / 1e12
    row = _plan(throttled["args"], throttled["root"] / "plan.json", peak_tflops=peak_tflops, efficiency=1,
                inter_gbps=RATE_MBIT / 1000)
    return {**row, "reference_s": ref_s, "images": images}


def test_bytes_on_the_wire_match_the_plan(throttled, planned):
    plan = 2 * sum(planned["comm_bytes_per_step"].values())  # host 1's link carries its sends and receives
    _, measured = per_step(throttled["two"], 2, THROTTLED_STEPS)
    print(f"bytes per step on host 1's link: measured {measured / 1e6:.3f} MB, plan {plan / 1e6:.3f} MB, "
          f"ratio {measured / plan:.3f}")
    assert 0.75 <= measured / plan <= 1.25


def test_a_throttled_link_trains_slower_as_the_plan_predicts(throttled, planned):
    ref_s, plan_s = planned["reference_s"], planned["step_s"]
    step_s, _ = per_step(throttled["two"], 2, THROTTLED_STEPS)
    print(f"step time: one host {ref_s:.3f} s; two hosts over {RATE_MBIT:g} Mbit/s {step_s:.3f} s "
          f"({2 * planned['images'] / step_s:.2f} images/s), plan {plan_s:.3f} s, ratio {step_s / plan_s:.3f}")
    assert step_s > 3 * ref_s
    assert 0.7 <= step_s / plan_s <= 1.3


def test_the_deepspeed_launcher_across_hosts_without_ssh_trains_like_one_host(cluster, data, tmp_path):
    """launch/deepspeed.sh with NODE_RANK / MASTER_ADDR on each host (DeepSpeed's --no_ssh): ZeRO-2 with
    expert parallelism across the hosts; the losses of `deepspeed --num_gpus 2` on one host."""
    args = [*ARGS, data, "parallel=deepspeed_zero2", "parallel.ep=2", "train.steps=3"]
    one = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                          str(next(PORTS)), "train/__main__.py", *args, f"train.run_dir={tmp_path / 'one'}"],
                         cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    before, port, procs = cluster.link_bytes(1), str(next(PORTS)), {}
    for i in (0, 1):
        with open(tmp_path / f"node{i}.log", "w") as log:
            procs[i] = cluster.popen(i, ["bash", "launch/deepspeed.sh", *args, f"train.run_dir={tmp_path / 'two'}"],
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env=node_env(NNODES="2", NODE_RANK=str(i), MASTER_ADDR=cluster.address(0),
                                                  NUM_GPUS="1", MASTER_PORT=port))
    assert wait_all(procs, 300) == {0: 0, 1: 0}, _tail(tmp_path / "node0.log") + _tail(tmp_path / "node1.log")
    assert cluster.link_bytes(1) - before > 1e6  # the collectives crossed host 1's link
    assert f"on {cluster.address(1)} (eth0), store {cluster.address(0)}:" in (tmp_path / "node1.log").read_text()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (a, b)


LOST_HOST = [*ARGS, "parallel=fsdp", "train.ckpt_every=3", "parallel.timeout_s=10", "parallel.init_timeout_s=60"]
# A lost node leaves the rendezvous after keep_alive_interval x keep_alive_max_attempt seconds without a
# heartbeat; a round with fewer than the most nodes waits last_call_timeout for more (long enough for both
# nodes of a fresh launch to join the first round).
ELASTIC = {"NNODES": "1:2", "MAX_RESTARTS": "3",
           "RDZV_CONF": "keep_alive_interval=2,keep_alive_max_attempt=3,last_call_timeout=10"}
MARGIN_S = 60  # after parallel.timeout_s: leaving the rendezvous, a new round, a new worker's imports and load


def _lose_host(cluster, procs, probe, log: Path, after_step: int, how: str) -> dict:
    """Once step `after_step` is logged, lose host 1 (`how`: "freeze" its processes or "cut" its link); wait for
    host 0's diagnosis and its first step after the loss. Times in seconds from the loss."""
    probe.wait(lambda: any(r["step"] >= after_step for r, _, _ in probe.seen), 300, procs)
    before = log.read_text().count(DIAGNOSIS)
    t0 = time.monotonic()
    if how == "freeze":
        cluster.signal(1, signal.SIGSTOP)
    else:
        cluster.cut(1)
    host0 = {0: procs[0]}
    diagnosed = probe.wait(lambda: log.read_text().count(DIAGNOSIS) > before, 10 + MARGIN_S, host0) - t0
    resumed = probe.wait(lambda: probe.since(t0), 10 + MARGIN_S, host0) - t0
    first = probe.since(t0)[0]["step"]
    print(f"host 1 lost ({how}) after step {after_step}: host 0 diagnosed it after {diagnosed:.1f} s and logged "
          f"step {first} {resumed:.1f} s after the loss")
    return {"diagnosed_s": diagnosed, "resumed_s": resumed, "first_step": first}


def test_a_lost_host_costs_a_timeout_and_a_restart_and_the_epoch_stays_exactly_once(cluster, data, tmp_path):
    """Three launches on one run dir: host 1 frozen (SIGSTOP: its kernel still answers TCP) after step 4 of 12,
    host 0 goes on alone; both again, host 1's link cut after step 16 of 24, host 0 goes on alone; the link
    restored, both again to step 30. Every sample delivered is a distinct one of the epoch."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    log0 = logs / "node0.log"
    events = []
    for steps, lose in ((12, ("freeze", 4)), (24, ("cut", 16)), (30, None)):
        args = [*LOST_HOST, data, f"train.steps={steps}", f"train.run_dir={run}"]
        procs = start_nodes(cluster, [0, 1], args, logs, MASTER_PORT=str(next(PORTS)), **ELASTIC)
        try:
            if lose:
                events.append(_lose_host(cluster, procs, StepProbe(cluster, run), log0, lose[1], lose[0]))
            codes = wait_all(procs if not lose else {0: procs[0]}, 300)  # a lost host's launcher never ends
        finally:
            cluster.signal(1, signal.SIGKILL)  # a lost host's processes (a no-op after a clean end)
            cluster.restore(1)
        assert codes[0] == 0, _tail(log0)
        assert lose or codes[1] == 0, _tail(logs / "node1.log")
    text = log0.read_text()
    for e in events:
        assert e["diagnosed_s"] <= 10 + MARGIN_S and e["resumed_s"] <= 10 + MARGIN_S, events
    assert text.count(DIAGNOSIS) >= 2
    resumes = [tuple(map(int, m)) for m in re.findall(r"at step (\d+), saved by (\d) ranks: the data stream "
                                                      r"continues its epoch over (\d) ranks", text)]
    assert [(saved, now) for _, saved, now in resumes] == [(2, 1), (1, 2), (2, 1), (1, 2)], resumes
    (lost1, _, _), (_, _, _), (lost2, _, _), _ = resumes
    assert resumes[1][0] == 12 and resumes[3][0] == 24 and 3 <= lost1 < 12 and 15 <= lost2 < 24, resumes
    final = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert final.name == "step_00000030"
    states = [json.loads(f.read_text()) for f in sorted((final / "train").glob("rank*.json"))]
    assert len(states) == 2
    delivered = states[0]["samples_seen"]
    # 4 samples per rank and step: world 2 to the checkpoint before each loss, world 1 from there to the
    # launch's end, world 2 from 24 to 30.
    assert delivered == 4 * (2 * lost1 + (12 - lost1) + 2 * (lost2 - 12) + (24 - lost2) + 2 * 6), resumes
    assert SHARD * SHARDS - remaining(states, SHARD, SHARDS) == delivered  # each delivered sample a distinct one
    steps = sorted({r["step"] for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())})
    assert steps == list(range(1, 31))


def test_a_lossy_or_slow_link_trains_or_fails_in_bounded_time(cluster, data, tmp_path):
    """20% packet loss, then 200 ms delay, on host 1's link: 3 steps finish, or the run stops with the diagnosis;
    never a wait beyond the timeouts."""
    if not cluster.has_netem():
        pytest.skip("this kernel has no netem qdisc (`tc qdisc add ... netem` fails): the loss and delay cases")
    for netem in (("loss", "20%"), ("delay", "200ms")):
        run = tmp_path / netem[0]
        args = [*ARGS, *MODEL, data, "train.steps=3", "parallel.timeout_s=30", f"train.run_dir={run}"]
        cluster.impair(1, *netem)
        t0 = time.monotonic()
        try:
            procs = start_nodes(cluster, [0, 1], args, run, NNODES="2", MASTER_PORT=str(next(PORTS)),
                                MAX_RESTARTS="0", INIT_TIMEOUT="60")
            codes = wait_all(procs, 60 + 3 * 30 + 120)  # TimeoutError: a hang beyond the timeouts
        finally:
            cluster.signal(0, signal.SIGKILL)
            cluster.signal(1, signal.SIGKILL)
            cluster.impair(1)
        log = (run / "node0.log").read_text() + (run / "node1.log").read_text()
        if codes == {0: 0, 1: 0}:
            print(f"{' '.join(netem)}: 3 steps in {time.monotonic() - t0:.1f} s")
            assert sorted(losses(run)) == [1, 2, 3]
        else:
            assert DIAGNOSIS in log, (netem, log[-3000:])
