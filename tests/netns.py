"""Network namespaces on a private Linux bridge: N "hosts" on one LAN, for multi-host tests on one machine.

Each host is a network namespace with ``lo`` up and one interface ``eth0`` (a veth) addressed in a /24,
plus a route for multicast. The other end of every veth is a port of bridge ``br0``, which lives in its
own "switch" namespace, so nothing is added to the machine's own namespace (unless ``attach_root=True``)
and deleting the namespaces removes every link. Multicast (mDNS) crosses the bridge like on a real LAN.
Names carry this process's pid and a random tag, so concurrent runs never collide, and namespaces left
by a killed run are removed by the next one (``remove_stale_namespaces``).

Usage::

    with NetnsCluster(3) as cluster:              # hosts h0, h1, h2 at 10.77.0.11, .12, .13
        agent = cluster.popen("h0", [sys.executable, "-m", "agent.cli", ...], cwd=repo, stdout=PIPE)
        result = cluster.exec("h1", [sys.executable, "-c", "..."])   # CompletedProcess, text output
        cluster.set_rate("h1", 20)                 # 20 Mbit/s token bucket each way on h1's link
        cluster.multicast(False)                   # mDNS stops crossing the bridge; unicast still does
        cluster.link("h2", up=False)               # h2 drops off the LAN (a partition, not a crash)
        cluster.set_names("h0", {"dpgan": ["10.77.0.11", "10.77.0.12"]})  # a per-namespace /etc/hosts

Commands run with ``ip netns exec``: the same file system, environment and Python, only the network
differs (so pass ``cwd``/``PYTHONPATH`` for code from the checkout). ``close()`` (or leaving the
``with``) kills whatever still runs in the namespaces, then deletes them.

In pytest, ``pytest_plugins = ["tests.netns"]`` (in the test module or the root conftest) provides the
``netns_cluster`` fixture: ``netns_cluster(3, subnet=...)`` builds a cluster that is torn down after the
test, even a failing one, and skips the test where namespaces cannot be built (not root, no ``ip``).
Mark such tests ``multihost``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

NAMESPACE_PREFIX = "dpgtest"
_NAMESPACE_PATTERN = re.compile(rf"^{NAMESPACE_PREFIX}-(\d+)-[0-9a-f]+-")
HOST_INTERFACE = "eth0"
# `ip netns exec NS` bind-mounts each file under /etc/netns/NS/ over its namesake in /etc.
PER_NAMESPACE_ETC = Path("/etc/netns")
BRIDGE = "br0"
COMMAND_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """A namespace, link or qdisc command failed; the message carries the command and its stderr."""


@dataclass(frozen=True)
class Host:
    name: str  # logical name used in the API: "h0", "h1", ...
    namespace: str  # network namespace name, as `ip netns exec` takes it
    address: str  # IPv4 address of eth0, e.g. "10.77.0.11"
    prefix_length: int  # e.g. 24
    switch_port: str  # the veth end on the bridge, inside the switch namespace

    @property
    def interface(self) -> str:
        return HOST_INTERFACE


def _run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _ip(namespace: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``ip`` in ``namespace`` (None: this process's own namespace)."""
    return _run(["ip", *(["-n", namespace] if namespace is not None else []), *args])


def _tc(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(["ip", "netns", "exec", namespace, "tc", *args])


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None when they can (root, ``ip`` present, netns works)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{NAMESPACE_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetnsError, OSError, subprocess.TimeoutExpired) as error:
        return f"cannot create a network namespace: {error}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        _run(["ip", "netns", "del", probe])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces this module created in runs whose process is gone (a run killed mid-test)."""
    listing = _run(["ip", "netns", "list"]).stdout
    removed = []
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAMESPACE_PATTERN.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(NetnsError, subprocess.TimeoutExpired):
                _run(["ip", "netns", "del", name])
                removed.append(name)
    if PER_NAMESPACE_ETC.is_dir():
        for folder in PER_NAMESPACE_ETC.iterdir():
            match = _NAMESPACE_PATTERN.match(folder.name)
            if match and not _pid_alive(int(match.group(1))):
                shutil.rmtree(folder, ignore_errors=True)
    return removed


class NetnsCluster:
    """``count`` hosts on one bridge. Build with ``with`` (or ``start()``/``close()``); ``close()`` is
    idempotent and kills every process started with ``popen`` or still running in the namespaces."""

    def __init__(
        self,
        count: int,
        *,
        subnet: str = "10.77.0.0/24",
        first_host: int = 11,
        attach_root: bool = False,
    ) -> None:
        """``attach_root`` also puts this (the test) process's namespace on the bridge at the subnet's
        ``.1`` so the test itself can dial the hosts; give concurrent clusters different subnets then."""
        network = ipaddress.IPv4Network(subnet)
        if count < 1:
            raise ValueError(f"a cluster needs at least one host, got {count}")
        if first_host + count >= network.num_addresses - 1 or first_host < 2:
            raise ValueError(f"{count} hosts from .{first_host} do not fit in {subnet}")
        self.tag = f"{NAMESPACE_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.network = network
        self.hosts: list[Host] = [
            Host(
                name=f"h{index}",
                namespace=f"{self.tag}-h{index}",
                address=str(network.network_address + first_host + index),
                prefix_length=network.prefixlen,
                switch_port=f"port{index}",
            )
            for index in range(count)
        ]
        self.switch_namespace = f"{self.tag}-switch"
        self.root_interface: str | None = f"dpg{self.tag[-6:]}" if attach_root else None
        self.root_address: str | None = str(network.network_address + 1) if attach_root else None
        self._processes: list[subprocess.Popen[Any]] = []
        self._created_namespaces: list[str] = []
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        try:
            self._build()
        except BaseException:
            # A half-built cluster must not outlive a failed start.
            self.close()
            raise

    def _build(self) -> None:
        switch = self.switch_namespace
        self._add_namespace(switch)
        _ip(switch, "link", "add", BRIDGE, "type", "bridge")
        # Snooping would stop flooding groups nobody joined via IGMP; mDNS must reach every port.
        _ip(switch, "link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _ip(switch, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._add_namespace(host.namespace)
            _ip(host.namespace, "link", "set", "lo", "up")
            # Created inside the switch namespace so the port names never clash with the machine's.
            _ip(
                switch,
                "link",
                "add",
                host.switch_port,
                "type",
                "veth",
                "peer",
                HOST_INTERFACE,
                "netns",
                host.namespace,
            )
            _ip(switch, "link", "set", host.switch_port, "master", BRIDGE, "up")
            _ip(host.namespace, "addr", "add", f"{host.address}/{host.prefix_length}", "dev", HOST_INTERFACE)
            _ip(host.namespace, "link", "set", HOST_INTERFACE, "up")
            # Without a default route a socket that does not pick an interface cannot send to a group.
            _ip(host.namespace, "route", "add", "224.0.0.0/4", "dev", HOST_INTERFACE)
        if self.root_interface is not None:
            _ip(None, "link", "add", self.root_interface, "type", "veth", "peer", "rootport", "netns", switch)
            _ip(switch, "link", "set", "rootport", "master", BRIDGE, "up")
            _ip(
                None,
                "addr",
                "add",
                f"{self.root_address}/{self.network.prefixlen}",
                "dev",
                self.root_interface,
            )
            _ip(None, "link", "set", self.root_interface, "up")

    def _add_namespace(self, name: str) -> None:
        _ip(None, "netns", "add", name)
        self._created_namespaces.append(name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            _stop_process(process)
        for name in self._created_namespaces:
            # Grandchildren of popen'd commands would keep a namespace (and its veth) alive.
            with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
                for pid_text in _ip(None, "netns", "pids", name).stdout.split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid_text), signal.SIGKILL)
        if self.root_interface is not None:
            with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
                _ip(None, "link", "del", self.root_interface)
        errors = []
        for name in reversed(self._created_namespaces):
            try:
                _ip(None, "netns", "del", name)
            except (NetnsError, OSError, subprocess.TimeoutExpired) as error:
                errors.append(str(error))
            shutil.rmtree(PER_NAMESPACE_ETC / name, ignore_errors=True)
        self._created_namespaces.clear()
        if errors:
            raise NetnsError("teardown left namespaces behind: " + "; ".join(errors))

    # -- running commands ----------------------------------------------------------------------------

    def host(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            return host
        for candidate in self.hosts:
            if candidate.name == host:
                return candidate
        raise KeyError(f"no host {host!r} in this cluster (hosts: {[h.name for h in self.hosts]})")

    def command(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside the host's namespace (for callers that spawn it themselves)."""
        return ["ip", "netns", "exec", self.host(host).namespace, *argv]

    def exec(
        self,
        host: Host | str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion in the host's namespace, capturing text output; ``check`` raises NetnsError."""
        result = subprocess.run(
            self.command(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv)} on {self.host(host).name} failed ({result.returncode}):"
                f" {result.stderr.strip()}"
            )
        return result

    def popen(self, host: Host | str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start in the host's namespace; the process is killed at ``close()`` if it is still running."""
        process = subprocess.Popen(self.command(host, argv), **popen_kwargs)
        self._processes.append(process)
        return process

    # -- shaping the network ----------------------------------------------------------------------------

    def set_rate(
        self, host: Host | str, mbit: float | None, *, burst_kbit: int = 32, latency_ms: int = 400
    ) -> None:
        """Limit the host's link to ``mbit`` Mbit/s in each direction (token bucket); None removes it.

        Shaped on both veth ends because a qdisc only shapes what leaves an interface: eth0 limits the
        host's uploads, the bridge port its downloads.
        """
        target = self.host(host)
        for namespace, interface in (
            (target.namespace, HOST_INTERFACE),
            (self.switch_namespace, target.switch_port),
        ):
            if mbit is None:
                # Deleting the root qdisc when none was added is an error we do not care about.
                with contextlib.suppress(NetnsError):
                    _tc(namespace, "qdisc", "del", "dev", interface, "root")
                continue
            if mbit <= 0:
                raise ValueError(f"rate must be positive, got {mbit} Mbit/s")
            shape = ["rate", f"{mbit}mbit", "burst", f"{burst_kbit}kbit", "latency", f"{latency_ms}ms"]
            _tc(namespace, "qdisc", "replace", "dev", interface, "root", "tbf", *shape)

    def segmentation_offload(self, host: Host | str, enabled: bool) -> None:
        """Let the host's TCP hand 64 KB segments (GSO) to both veth ends (the kernel's default), or make it
        send wire-size packets (``gso_max_segs 1``), as they sit in a real router's queue.

        With offload, a token bucket on a veth queues a whole 64 KB segment at once: at 20 Mbit/s the ACKs a
        host sends behind it wait ~26 ms (docs/benchmarks.md measures what that does to BBR)."""
        target = self.host(host)
        segments = "65535" if enabled else "1"
        _ip(target.namespace, "link", "set", "dev", HOST_INTERFACE, "gso_max_segs", segments)
        _ip(self.switch_namespace, "link", "set", "dev", target.switch_port, "gso_max_segs", segments)

    def multicast(self, enabled: bool, hosts: Sequence[Host | str] | None = None) -> None:
        """Let multicast (mDNS) reach the given hosts (default: all), or stop the bridge flooding it to
        them; unicast is unaffected, so static and DNS discovery keep working."""
        state = "on" if enabled else "off"
        for host in hosts if hosts is not None else self.hosts:
            port = self.host(host).switch_port
            _run(["bridge", "-n", self.switch_namespace, "link", "set", "dev", port, "mcast_flood", state])

    def set_names(self, host: Host | str, names: Mapping[str, Sequence[str]]) -> None:
        """Make ``names`` (name -> addresses) resolve inside the host's namespace, as a compose service
        or a Kubernetes headless Service would; an empty mapping leaves only ``localhost``.

        This writes the namespace's own hosts file, ``/etc/netns/<namespace>/hosts``, which ``ip netns
        exec`` mounts over ``/etc/hosts``; the machine's ``/etc/hosts`` is never touched. Processes started
        before the first call for a host do not see the file; later calls rewrite it in place, so
        running processes see every change at their next lookup.
        """
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, addresses in names.items() for address in addresses]
        path = PER_NAMESPACE_ETC / self.host(host).namespace / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Truncate and write rather than replace: the mounts in running processes pin the inode.
        with path.open("a+") as hosts_file:
            hosts_file.truncate(0)
            hosts_file.write("\n".join(lines) + "\n")

    def link(self, host: Host | str, *, up: bool) -> None:
        """Take the host's bridge port down or up: the host vanishes from the LAN without any goodbye."""
        port = self.host(host).switch_port
        _ip(self.switch_namespace, "link", "set", port, "up" if up else "down")


def _stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture
def netns_cluster() -> Iterator[Callable[..., NetnsCluster]]:
    """Factory fixture: ``netns_cluster(3, subnet=...)`` builds and starts a cluster that is torn down
    after the test, even when the test fails. Skips when namespaces cannot be built here."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    remove_stale_namespaces()
    clusters: list[NetnsCluster] = []

    def make(count: int, **options: Any) -> NetnsCluster:
        cluster = NetnsCluster(count, **options)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make
    errors = []
    for cluster in clusters:
        try:
            cluster.close()
        except NetnsError as error:
            errors.append(str(error))
    assert not errors, errors
