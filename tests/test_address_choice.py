"""Which address an agent advertises: a pure rule over interface facts (no dependence on this host's
interfaces or name), the Linux fact readers over fake /proc and /sys files, and one check in a network
namespace with a default route next to a link-local interface that is down."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.discovery.addresses import (
    InterfaceAddress,
    choose_address,
    default_route_interfaces,
    interface_is_up,
    resolve_advertise,
)

pytest_plugins = ["tests.netns"]
pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


def fact(interface: str, address: str, up: bool = True, default: bool = False) -> InterfaceAddress:
    return InterfaceAddress(interface=interface, address=address, is_up=up, has_default_route=default)


LAPTOP = [
    fact("lo", "127.0.0.1"),
    fact("docker0", "172.17.0.1"),
    fact("eth0", "169.254.10.2"),  # a cable with no DHCP server: link-local
    fact("wlan0", "192.168.1.20", default=True),
]


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (LAPTOP, "192.168.1.20"),
        # The default route wins over name order and over other usable interfaces.
        ([fact("aaa0", "10.9.0.5"), fact("eth1", "10.0.0.7", default=True)], "10.0.0.7"),
        # ... but never when it is down, loopback or link-local.
        ([fact("eth0", "10.0.0.7", up=False, default=True), fact("eth1", "10.1.0.7")], "10.1.0.7"),
        ([fact("eth0", "169.254.3.3", default=True), fact("eth1", "10.1.0.7")], "10.1.0.7"),
        # No default route: the first up, routable, non-bridge address by interface name.
        ([fact("lo", "127.0.0.1"), fact("virbr0", "192.168.122.1"), fact("enp3s0", "10.2.0.4")], "10.2.0.4"),
        (
            [fact("dummy0", "169.254.1.1"), fact("ens5", "10.3.0.4", up=False), fact("ens6", "10.3.0.5")],
            "10.3.0.5",
        ),
        # A bridge holding the default route (a hypervisor's br0, or a compose network) is the LAN.
        ([fact("br-1a2b", "172.18.0.3", default=True)], "172.18.0.3"),
        # The first default route (lowest metric, as host_interface_addresses orders them) wins.
        ([fact("eth0", "10.0.0.1", default=True), fact("eth1", "10.0.1.1", default=True)], "10.0.0.1"),
    ],
)
def test_auto_picks_the_default_route_interface_and_never_loopback_link_local_or_down(
    facts: list[InterfaceAddress], expected: str
) -> None:
    assert choose_address(facts) == expected


@pytest.mark.parametrize(
    "facts",
    [
        [],
        [fact("lo", "127.0.0.1")],
        [fact("lo", "127.0.0.1"), fact("eth0", "169.254.7.7"), fact("eth1", "10.0.0.2", up=False)],
        [fact("docker0", "172.17.0.1")],  # only a container bridge, no default route
    ],
)
def test_no_dialable_address_is_an_error_naming_the_flags(facts: list[InterfaceAddress]) -> None:
    wildcard = r"^--listen 0\.0\.0\.0:5000 without --advertise: .*--advertise HOST:PORT"
    with pytest.raises(ValueError, match=wildcard):
        resolve_advertise(None, "0.0.0.0", 5000, None, facts=facts)
    with pytest.raises(ValueError, match=r"^--advertise auto: .*--interface"):
        resolve_advertise("auto", "0.0.0.0", 5000, None, facts=facts)


def test_interface_names_an_interface_or_one_of_its_addresses() -> None:
    extra = [fact("eth2", "10.5.0.2"), fact("eth2", "169.254.5.5"), fact("eth3", "10.6.0.2", up=False)]
    facts = [*LAPTOP, *extra]
    assert choose_address(facts, "docker0") == "172.17.0.1"  # explicit beats every rule but down
    assert choose_address(facts, "eth0") == "169.254.10.2"
    assert choose_address(facts, "eth2") == "10.5.0.2"
    assert choose_address(facts, "10.5.0.2") == "10.5.0.2"
    with pytest.raises(ValueError, match="--interface 'eth3' is down"):
        choose_address(facts, "eth3")
    with pytest.raises(ValueError, match="--interface: no interface or IPv4 address 'eth9'"):
        choose_address(facts, "eth9")


def test_resolve_advertise() -> None:
    facts = LAPTOP
    assert resolve_advertise("hosta:5000", "0.0.0.0", 5000, None, facts=facts) == "hosta:5000"
    assert resolve_advertise(None, "0.0.0.0", 5000, None, facts=facts) == "192.168.1.20:5000"
    assert resolve_advertise(None, "::", 5000, None, facts=facts) == "192.168.1.20:5000"
    assert resolve_advertise("auto", "127.0.0.1", 5001, None, facts=facts) == "192.168.1.20:5001"
    assert resolve_advertise(None, "127.0.0.1", 5002, None, facts=facts) == "127.0.0.1:5002"
    assert resolve_advertise(None, "fd00::1", 5003, None, facts=facts) == "[fd00::1]:5003"
    assert resolve_advertise(None, "0.0.0.0", 5004, "docker0", facts=facts) == "172.17.0.1:5004"


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
tun0\t00000000\t00000000\t0000\t0\t0\t50\t00000000\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_default_route_interfaces_from_proc_net_route() -> None:
    # tun0's default route is not up (flags 0); eth0 has the lower metric.
    assert default_route_interfaces(ROUTES) == ["eth0", "wlan0"]
    assert default_route_interfaces(ROUTES.splitlines()[0]) == []
    assert default_route_interfaces("") == []


@pytest.mark.parametrize(
    ("flags", "operstate", "up"),
    [
        ("0x1003", "up", True),
        ("0x1003", "unknown", True),  # dummy, tun, lo: no carrier notion
        ("0x1002", "down", False),  # administratively down
        ("0x1003", "down", False),  # up but no carrier (cable out)
        ("0x1003", "lowerlayerdown", False),
        ("0x1002", "unknown", False),
    ],
)
def test_interface_state_from_sys_class_net(tmp_path: Path, flags: str, operstate: str, up: bool) -> None:
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "flags").write_text(flags + "\n")
    (tmp_path / "eth0" / "operstate").write_text(operstate + "\n")
    assert interface_is_up("eth0", tmp_path) is up
    assert interface_is_up("absent0", tmp_path) is True  # nothing says it is down


@pytest.mark.multihost
def test_auto_in_a_namespace_picks_the_default_route_over_a_down_link_local_interface(netns_cluster) -> None:
    cluster = netns_cluster(1, subnet="10.78.0.0/24")
    host = cluster.hosts[0]
    for argv in (
        # veth pairs (every kernel that runs these tests has them; not every one has dummy).
        ["ip", "link", "add", "aaa0", "type", "veth", "peer", "name", "aaa1"],  # sorts first, DOWN
        ["ip", "addr", "add", "169.254.9.9/16", "dev", "aaa0"],  # and link-local
        ["ip", "link", "add", "aab0", "type", "veth", "peer", "name", "aab1"],  # up, routable, no default
        ["ip", "addr", "add", "10.99.0.5/24", "dev", "aab0"],
        ["ip", "link", "set", "aab0", "up"],
        ["ip", "link", "set", "aab1", "up"],
        ["ip", "route", "replace", "default", "dev", host.interface],
    ):
        cluster.exec(host, argv)
    code = "from agent.discovery.addresses import resolve_advertise as r; print(r(None, '0.0.0.0', 5000, ''))"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)}
    result = cluster.exec(host, [sys.executable, "-c", code], env=env)
    assert result.stdout.strip() == f"{host.address}:5000"
    cluster.exec(host, ["ip", "route", "del", "default"])
    result = cluster.exec(host, [sys.executable, "-c", code], env=env)
    assert result.stdout.strip() == "10.99.0.5:5000"  # no default route: first usable by name
