"""The network facts one node of a multi-node launch needs, and a bounded wait for the rendezvous.

    python launch/node_net.py MASTER_ADDR MASTER_PORT [--ifname IF] [--timeout S]

prints `IFNAME ADDRESS IS_HOST`: the interface and address that face MASTER_ADDR (the route to it, or the
interface that holds it on the node that hosts the rendezvous), and whether this node holds MASTER_ADDR
(`true` / `false`; `auto` for a loopback address, which every node of a one-machine rehearsal holds: torch
then lets the first node host and the others join).
A node that does not host the rendezvous waits until MASTER_ADDR:MASTER_PORT accepts a connection, at most
--timeout seconds; a name that does not resolve, no route, an unknown --ifname or no answer in time is one
line on stderr naming the address, and exit 2.

torchrun's own checks cannot do this: it matches the rendezvous host by hostname, which network namespaces
and containers share, and binds gloo / NCCL to the first interface it finds unless told. Torch-free, so
the launchers run it before any import of torch; it reads iproute2's `ip -o` output (Linux).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time


def _ip(*args: str) -> list[str]:
    out = subprocess.run(["ip", "-o", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise LookupError(out.stderr.strip() or f"ip -o {' '.join(args)} failed")
    return out.stdout.splitlines()


def local_addresses() -> dict[str, str]:
    """IPv4 address -> interface, for every address of this node."""
    found = {}
    for line in _ip("-4", "addr", "show"):
        words = line.split()
        found[words[words.index("inet") + 1].split("/")[0]] = words[1]
    return found


def route_to(address: str) -> tuple[str, str]:
    """(interface, source address) of the route to `address`."""
    words = _ip("route", "get", address)[0].split()
    return words[words.index("dev") + 1], words[words.index("src") + 1]


def facing(master: str, ifname: str | None) -> tuple[str, str, bool]:
    """(interface, own address, hosts the rendezvous) towards `master`; LookupError naming what is wrong."""
    try:
        address = socket.gethostbyname(master)
    except OSError as e:
        raise LookupError(f"MASTER_ADDR={master} does not resolve: {e}") from None
    own = local_addresses()
    is_host = address in own
    if is_host:
        dev, src = own[address], address
    else:
        try:
            dev, src = route_to(address)
        except LookupError as e:
            raise LookupError(f"no route from this node to MASTER_ADDR={master} ({address}): {e}") from None
    if ifname:
        by_dev = {d: a for a, d in own.items()}
        if ifname not in by_dev:
            raise LookupError(f"SOCKET_IFNAME={ifname} is not an interface with an IPv4 address on this node "
                              f"(it has {', '.join(sorted(by_dev))})")
        dev, src = ifname, by_dev[ifname]
    return dev, src, is_host


def wait_for(address: str, port: int, timeout_s: float) -> None:
    """Return once `address:port` accepts a TCP connection; TimeoutError with the last refusal after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(last)
        try:
            with socket.create_connection((address, port), timeout=min(left, 5.0)):
                return
        except OSError as e:
            last = e.strerror or str(e) or type(e).__name__
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("master")
    p.add_argument("port", type=int)
    p.add_argument("--ifname", default=None, help="the interface to use (SOCKET_IFNAME); default: the route's")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rendezvous (INIT_TIMEOUT)")
    args = p.parse_args(argv)
    try:
        dev, src, is_host = facing(args.master, args.ifname)
        if not is_host:
            wait_for(args.master, args.port, args.timeout)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(f"error: the rendezvous at MASTER_ADDR:MASTER_PORT={args.master}:{args.port} did not answer within "
              f"{args.timeout:g} s (INIT_TIMEOUT) from {src} ({dev}): {e}", file=sys.stderr)
        return 2
    loopback = socket.gethostbyname(args.master).startswith("127.")
    print(dev, src, "auto" if loopback else "true" if is_host else "false")
    return 0


if __name__ == "__main__":
    sys.exit(main())
