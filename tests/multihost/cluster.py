"""A cluster of real hosts on one Linux machine: network namespaces on a bridge, to rehearse a multi-node launch.

    sudo python tests/multihost/cluster.py up --hosts 2          # prints each host's name and address
    sudo ip netns exec ecmh1 env NNODES=2 NODE_RANK=1 MASTER_ADDR=10.77.0.1 bash launch/multinode_torchrun.sh ...
    sudo python tests/multihost/cluster.py down

Each host has its own network stack: an `eth0` with its own address (10.77.0.1, .2, ...) on one bridge,
reached from the bridge through a veth whose far end is the host's `eth0`; the file system and the processes
are the machine's, so the hosts share the run directory as cluster nodes share a file system. From the
outside, `cut` / `restore` take a host's link down and up (its peers see nothing at all, as when a node
vanishes), `throttle` rate-limits it both ways with tbf, `impair` adds netem loss or delay, and `link_bytes` reads the bytes that crossed it.
Needs root and iproute2; the kernel's netem qdisc (delay, loss) is optional (`has_netem`).

Written here because no library makes namespaced hosts: this is `ip netns` / `ip link` / `tc`, nothing more.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


class Cluster:
    """`hosts` namespaced hosts `{prefix}0..`, addresses `{subnet}.1..`/24 on the bridge `{prefix}br`."""

    def __init__(self, hosts: int, prefix: str = "ecmh", subnet: str = "10.77.0"):
        if len(prefix) > 10:
            raise ValueError(f"prefix={prefix!r}: at most 10 characters (interface names have 15)")
        self.hosts, self.prefix, self.subnet = hosts, prefix, subnet
        self.bridge = f"{prefix}br"

    def ns(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def veth(self, i: int) -> str:
        """The bridge-side end of host i's link."""
        return f"{self.prefix}v{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def up(self) -> "Cluster":
        self.down()
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(self.hosts):
                ns, veth = self.ns(i), self.veth(i)
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "link", "set", veth, "master", self.bridge, "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def existing(self) -> list[int]:
        """The hosts of this prefix that exist now (any number, made by any Cluster)."""
        names = _run("ip", "netns", "list", check=False).stdout.split()
        return sorted(int(n[len(self.prefix):]) for n in names
                      if n.startswith(self.prefix) and n[len(self.prefix):].isdigit())

    def down(self) -> None:
        """Kill every process left in this prefix's hosts, remove them and the bridge (idempotent)."""
        for i in sorted(set(range(self.hosts)) | set(self.existing())):
            self.signal(i, signal.SIGKILL)
            _run("ip", "netns", "del", self.ns(i), check=False)  # takes its veth pair with it
            _run("ip", "link", "del", self.veth(i), check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> "Cluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` on host i (its own network stack; the machine's files and environment)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kwargs)

    def run(self, i: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` on host i to its end."""
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *argv], **kwargs)

    def pids(self, i: int) -> list[int]:
        proc = _run("ip", "netns", "pids", self.ns(i), check=False)
        return [int(p) for p in proc.stdout.split()]

    def signal(self, i: int, sig: int) -> None:
        """Send `sig` to every process of host i (SIGSTOP freezes the host, SIGCONT thaws it)."""
        for pid in self.pids(i):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def cut(self, i: int) -> None:
        """Take host i's link down: packets to and from it vanish; its processes go on."""
        _run("ip", "link", "set", self.veth(i), "down")

    def restore(self, i: int) -> None:
        _run("ip", "link", "set", self.veth(i), "up")

    def throttle(self, i: int, rate: str | None, burst: str = "16kb", latency: str = "1s") -> None:
        """Limit host i's link to `rate` (tc's units, e.g. 1mbit) in both directions with tbf; None lifts it."""
        for dev, where in ((self.veth(i), []), ("eth0", ["-n", self.ns(i)])):
            _run("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                _run("tc", *where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                     "latency", latency)

    def impair(self, i: int, *netem: str) -> None:
        """Degrade host i's link both ways with netem (e.g. "loss", "20%" or "delay", "200ms"); none lifts it.
        Needs the kernel's netem (`has_netem`)."""
        for dev, where in ((self.veth(i), []), ("eth0", ["-n", self.ns(i)])):
            _run("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)
            if netem:
                _run("tc", *where, "qdisc", "add", "dev", dev, "root", "netem", *netem)

    def link_bytes(self, i: int) -> int:
        """Bytes that crossed host i's link so far, both directions (Ethernet frames)."""
        stats = Path("/sys/class/net") / self.veth(i) / "statistics"
        return sum(int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes"))

    def has_netem(self) -> bool:
        """Whether the kernel has the netem qdisc (delay, loss)."""
        ok = _run("tc", "qdisc", "add", "dev", self.bridge, "root", "netem", "delay", "1ms", check=False)
        if ok.returncode == 0:
            _run("tc", "qdisc", "del", "dev", self.bridge, "root", check=False)
        return ok.returncode == 0


def can_make_namespaces() -> str | None:
    """None where network namespaces can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        probe = Cluster(1, prefix=f"ecprobe{os.getpid() % 1000}", subnet="10.76.255")
        probe.up()
        probe.down()
    except FileNotFoundError:
        return "iproute2 (`ip`) is not installed"
    except RuntimeError as e:
        return f"cannot make a network namespace: {e}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--prefix", default="ecmh")
    p.add_argument("--subnet", default="10.77.0", help="the first three octets of the hosts' addresses")
    args = p.parse_args(argv)
    cluster = Cluster(args.hosts, args.prefix, args.subnet)
    if args.action == "down":
        cluster.down()
        return 0
    cluster.up()
    for i in range(args.hosts):
        print(f"{cluster.ns(i)} {cluster.address(i)}  (ip netns exec {cluster.ns(i)} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
