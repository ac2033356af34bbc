"""Meeting across hosts: the rendezvous address, the network interface, and who has arrived.

Three things break multi-node launches that one-node runs never see, each handled here:

- The rendezvous address. The first node's *name* is what schedulers hand out; on many
  machines a host resolves its own name to loopback (Debian's /etc/hosts maps it to 127.0.1.1),
  so every rank resolves the name to an IPv4 address once (`resolve_host`) and a multi-node job
  refuses a loopback answer on any node but the first.
- The interface each rank advertises. gloo (and NCCL's bootstrap) pick the address to announce
  from the host name unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name an interface; a rank
  that announces 127.0.0.1 makes its peers connect to themselves ("connectFullMesh failed").
  `interface_environ` names the interface the kernel routes the rendezvous address through (or
  the one `cluster.network_interface` forces) and refuses loopback.
- Who is missing. torch's static rendezvous waits for every host and then fails with a timeout
  that names no one. `join` runs first, on the same address and port: every host checks in under
  its node rank, and after `cluster.join_timeout_s` every host that did arrive fails with one
  line naming the node ranks that did not.

Linux only (interface addresses come from the SIOCGIFADDR ioctl), like the rest of cluster/.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

_SIOCGIFADDR = 0x8915  # linux/sockios.h: the IPv4 address of an interface


class RendezvousError(RuntimeError):
    """Hosts cannot meet. `str()` is one line naming the key, the problem and the fix;
    `user_error` is True where the input is wrong (exit code 2)."""

    def __init__(self, message: str, user_error: bool = True):
        super().__init__(message)
        self.user_error = user_error


# ----------------------------------------------------------------------------- addresses


def resolve_host(name: str) -> str:
    """The IPv4 address `name` resolves to here (an address is returned unchanged)."""
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RendezvousError(f"cluster.master_addr={name!r}: cannot resolve this host name ({exc.strerror}); "
                              "fix: give the first node's IP address or a name every node resolves") from None
    return str(infos[0][4][0])


def is_loopback(address: str) -> bool:
    return ipaddress.IPv4Address(address).is_loopback


def interface_addresses() -> dict[str, str]:
    """{interface name: IPv4 address} for every interface of this network namespace that has one."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def route_source(address: str) -> str:
    """The local address the kernel would send from to reach `address` (no packet is sent:
    connecting a UDP socket only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError as exc:
            raise RendezvousError(f"cluster.master_addr={address}: no route to it from this host ({exc.strerror}); "
                                  "fix: give an address of the first node on a network every node shares") from None
        return str(sock.getsockname()[0])


def interface_environ(master_addr: str, network_interface: str | None) -> tuple[str, dict[str, str]]:
    """(interface name, the variables that make gloo and NCCL use it) for a multi-host job.

    Forced with `network_interface`; otherwise the interface that holds the local address routed
    to `master_addr` (on the first node itself that is the interface carrying master_addr)."""
    addresses = interface_addresses()
    if network_interface:
        if network_interface not in addresses:
            have = ", ".join(f"{n} ({a})" for n, a in sorted(addresses.items())) or "none"
            raise RendezvousError(f"cluster.network_interface={network_interface!r}: no such interface with an "
                                  f"IPv4 address on {socket.gethostname()}; fix: use one of {have}")
        name = network_interface
    else:
        source = route_source(master_addr)
        names = [n for n, a in addresses.items() if a == source]
        if not names:
            raise RendezvousError(f"cluster.network_interface=null: no interface holds {source}, the address "
                                  f"this host would use to reach {master_addr}; fix: set cluster.network_interface")
        name = names[0]
    if is_loopback(addresses[name]):
        raise RendezvousError(f"cluster.network_interface={name!r}: a loopback interface ({addresses[name]}) "
                              f"cannot reach other hosts (master_addr={master_addr}); fix: set "
                              "cluster.network_interface to the interface of the network the nodes share, or "
                              "make the first node's name resolve to its address on that network", False)
    return name, {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}


# ----------------------------------------------------------------------------- placement


def placement(hostnames: Sequence[str], tasks_per_node: Sequence[int]) -> str:
    """'node1 ranks 0-1, node2 ranks 2-3': which node holds which global ranks (Slurm's default
    block distribution, which is also torchrun's: node i holds a contiguous block)."""
    parts, start = [], 0
    for host, count in zip(hostnames, tasks_per_node):
        end = start + count - 1
        parts.append(f"{host} rank{'s' if count > 1 else ''} {start}" + (f"-{end}" if count > 1 else ""))
        start = end + 1
    return ", ".join(parts)


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('2(x3),1') as a list ([2, 2, 2, 1])."""
    out = []
    for part in value.split(","):
        count, _, repeat = part.partition("(x")
        out += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return out


# ----------------------------------------------------------------------------- joining


def check_port_free(port: int) -> None:
    """Refuse a port another process already listens on (the rendezvous store binds all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the store does: connections of an earlier run in TIME_WAIT do not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise RendezvousError(f"cluster.master_port={port}: already in use on {socket.gethostname()}; "
                                  "fix: pick a free port (the same one on every host)") from None


def join(master_addr: str, master_port: int, nnodes: int, node_rank: int, timeout_s: float) -> None:
    """Wait until all `nnodes` hosts have checked in at master_addr:master_port, or fail within
    `timeout_s` with one line naming the node ranks that never arrived. Node rank 0 hosts the
    store (and must be started on master_addr); it closes it once every host has left, so that
    torch's static rendezvous can bind the same port next."""
    from torch.distributed import TCPStore

    deadline = time.monotonic() + timeout_s
    where = f"{master_addr}:{master_port}"
    if node_rank:
        # Reach the port quietly first: torch's client logs a C++ stack trace for each retry.
        _wait_reachable(master_addr, master_port, deadline)
    try:
        store = TCPStore(master_addr, master_port, None, node_rank == 0,
                         timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as exc:  # torch raises DistNetworkError / RuntimeError subclasses
        if node_rank == 0:
            raise RendezvousError(f"cluster.master_port={master_port}: node_rank 0 cannot listen on it "
                                  f"({_first_line(exc)}); fix: pick a free port", True) from None
        raise _unreachable(master_addr, master_port, timeout_s) from None
    store.set(f"peerlab/join/{node_rank}", socket.gethostname())
    keys = [f"peerlab/join/{r}" for r in range(nnodes)]
    while time.monotonic() < deadline:
        if store.check(keys):
            break
        time.sleep(0.1)
    else:
        arrived = [r for r in range(nnodes) if store.check([keys[r]])]
        missing = [r for r in range(nnodes) if r not in arrived]
        names = ", ".join(f"{r} ({store.get(keys[r]).decode()})" for r in arrived)
        raise RendezvousError(
            f"cluster.join_timeout_s={timeout_s:g}: node_rank {', '.join(map(str, missing))} of cluster.nodes={nnodes} "
            f"never joined the rendezvous at {where} (arrived: {names}); fix: start the same command with "
            f"cluster.node_rank={missing[0]} on the missing host, or check that it can reach {where}", False)
    store.set(f"peerlab/left/{node_rank}", "1")
    end = time.monotonic() + timeout_s
    if node_rank == 0:
        left = [f"peerlab/left/{r}" for r in range(nnodes)]
        while not store.check(left) and time.monotonic() < end:
            time.sleep(0.05)
        del store  # closes the server and frees the port for torch's static rendezvous
        return
    # Wait until node 0 has closed this store: a client that connected to it instead of to the
    # static rendezvous' new one would be cut off. The next store's client retries until it binds.
    try:
        while time.monotonic() < end:
            store.check(keys)
            time.sleep(0.05)
    except Exception:  # the server went away: what we waited for (DistNetworkError and kin)
        pass
    del store


def _wait_reachable(address: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise _unreachable(address, port, None) from None
            time.sleep(0.2)


def _unreachable(address: str, port: int, timeout_s: float | None) -> RendezvousError:
    within = f" within cluster.join_timeout_s={timeout_s:g}" if timeout_s is not None else " within cluster.join_timeout_s"
    return RendezvousError(f"cluster.master_addr={address}: no rendezvous at {address}:{port}{within} (node_rank 0 "
                           "never came up there, or that is not its address); fix: start node_rank 0 on that "
                           "host, or correct cluster.master_addr / cluster.master_port")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- several hosts, no scheduler


@dataclass(frozen=True)
class HostSpec:
    """A launch started once per host (the torchrun convention), from the `cluster` section."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    join_timeout_s: float
    network_interface: str | None = None

    @classmethod
    def from_cluster(cls, cluster: Mapping[str, Any]) -> HostSpec | None:
        """None for one host (or for Slurm, which places ranks itself)."""
        if cluster.get("kind") != "local" or int(cluster.get("nodes") or 1) <= 1:
            return None
        return cls(int(cluster["nodes"]), int(cluster["node_rank"]), str(cluster["master_addr"]),
                   int(cluster["master_port"]), float(cluster["join_timeout_s"]), cluster.get("network_interface"))


def prepare_hosts(spec: HostSpec) -> dict[str, str]:
    """Everything before torch's static rendezvous on spec.master_addr:master_port: the address
    resolved, the port free (node_rank 0), the interface chosen, every host arrived. Returns the
    variables for the workers (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, MASTER_ADDR as an address)."""
    address = resolve_host(spec.master_addr)
    if is_loopback(address):
        raise RendezvousError(f"cluster.master_addr={spec.master_addr!r}: resolves to loopback ({address}), "
                              "which other hosts cannot reach; fix: give the node_rank 0 host's address on the "
                              "network the hosts share")
    if spec.node_rank == 0:
        if address not in interface_addresses().values():
            raise RendezvousError(f"cluster.master_addr={spec.master_addr}: not an address of this host "
                                  f"({socket.gethostname()}), but cluster.node_rank=0 hosts the rendezvous; fix: "
                                  "start node_rank 0 on the host that has master_addr, or correct master_addr")
        check_port_free(spec.master_port)
    _, environ = interface_environ(address, spec.network_interface)
    join(address, spec.master_port, spec.nnodes, spec.node_rank, spec.join_timeout_s)
    return environ
