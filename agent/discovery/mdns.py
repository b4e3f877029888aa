"""mDNS/DNS-SD on the local link (``_dpgan._tcp.local.``): advertise this node, browse for the others.

The advertised address is explicit, never guessed from the interfaces: a host with container or VPN
bridges would otherwise announce addresses its peers cannot reach. Records received from the network
are untrusted input: a record that is malformed (no ``node_id``, a TXT that is not UTF-8, absurd sizes,
no IPv4 address) is ignored with one log line per peer and problem.

mDNS says who *might* be there, never who is alive: a crashed peer sends no goodbye and stays in the
other nodes' caches for up to 75 minutes. Liveness comes from the gRPC handshake and probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import ifaddr  # a dependency of zeroconf: the same interface enumeration zeroconf itself uses
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
    service_type_name,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.core.membership import MembershipError, check_node_id
from agent.discovery.base import (
    SOURCE_MDNS,
    Candidate,
    ChangeCallback,
    DiscoveryError,
    format_address,
)
from agent.logs import get_logger

SERVICE_TYPE = "_dpgan._tcp.local."
TXT_NODE_ID = "node_id"
TXT_PROTOCOL = "proto"  # protocol version
TXT_SCHEMA = "schema"  # tensor schema hash
TXT_CONFIG = "config"  # cluster configuration hash

# RFC 6763 §6.2: a TXT record should fit in 1300 bytes so the whole answer fits one packet. The same
# limits apply to what this node advertises, so anything it advertises its peers accept.
MAX_TXT_BYTES = 1300
MAX_TXT_ENTRIES = 32
MAX_TXT_ENTRY_BYTES = 255  # one length byte per entry
MAX_INSTANCE_BYTES = 63  # RFC 6763 §4.1.1
RESOLVE_TIMEOUT_S = 3.0
# How long start() waits for an answer to its one-shot query for its own name (see _name_is_taken). It runs
# while zeroconf probes, which takes over 1 s (a 150-250 ms delay, then probes 500 ms apart), so it adds
# nothing to the start-up time; a defender answers a one-shot query by unicast at once.
NAME_CHECK_TIMEOUT_S = 0.6

_UNSAFE_INSTANCE_CHARACTERS = re.compile(r"[^A-Za-z0-9-]")
_TXT_KEY = re.compile(r"^[\x20-\x3c\x3e-\x7e]+$")  # printable ASCII except '=' (RFC 6763 §6.4)


class MalformedRecord(ValueError):
    """A service record from the network that cannot describe a peer; the message says why."""


def instance_name(node_id: str) -> str:
    """The DNS-SD instance label for a node id: the id itself when it is short and plain; otherwise a
    sanitised prefix plus a hash of the full id, so distinct ids never share a label."""
    label = _UNSAFE_INSTANCE_CHARACTERS.sub("-", node_id)
    if label == node_id and len(label) <= MAX_INSTANCE_BYTES:
        return label
    digest = hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:10]
    return f"{label[: MAX_INSTANCE_BYTES - len(digest) - 1]}-{digest}"


def check_txt(txt: Mapping[str, str]) -> dict[str, str]:
    """Validate TXT entries this node advertises against the limits peers enforce; ValueError if not."""
    entries: dict[str, str] = {}
    total = 0
    for key, value in txt.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"TXT entries must be str: {key!r}={value!r}")
        if not _TXT_KEY.match(key):
            raise ValueError(f"TXT key {key!r}: use printable ASCII without '='")
        if key.lower() in entries:
            raise ValueError(f"TXT key {key!r} given twice (keys are case-insensitive)")
        size = len(key.encode("ascii")) + 1 + len(value.encode("utf-8"))
        if size > MAX_TXT_ENTRY_BYTES:
            raise ValueError(f"TXT entry {key!r} is {size} bytes; the limit is {MAX_TXT_ENTRY_BYTES}")
        entries[key.lower()] = value
        total += 1 + size
    if len(entries) > MAX_TXT_ENTRIES or total > MAX_TXT_BYTES:
        raise ValueError(
            f"TXT record has {len(entries)} entries, {total} bytes;"
            f" the limits are {MAX_TXT_ENTRIES} entries, {MAX_TXT_BYTES} bytes"
        )
    return entries


def parse_txt_record(text: bytes) -> dict[str, str]:
    """Decode TXT rdata (length-prefixed ``key=value`` strings) strictly: keys lower-cased, a key
    without '=' maps to "", later duplicates and empty keys are ignored (RFC 6763 §6.4), anything
    oversized, truncated or not UTF-8 raises MalformedRecord."""
    if len(text) > MAX_TXT_BYTES:
        raise MalformedRecord(f"TXT record is {len(text)} bytes; the limit is {MAX_TXT_BYTES}")
    entries: dict[str, str] = {}
    count = 0
    position = 0
    while position < len(text):
        start = position + 1
        end = start + text[position]
        if end > len(text):
            raise MalformedRecord(f"TXT entry at byte {position} runs past the end of the record")
        entry = text[start:end]
        position = end
        if not entry:
            continue  # RFC 6763 §6.1: an empty record is written as a single zero-length string
        count += 1
        if count > MAX_TXT_ENTRIES:
            raise MalformedRecord(f"TXT record has more than {MAX_TXT_ENTRIES} entries")
        raw_key, _, raw_value = entry.partition(b"=")
        if not raw_key:
            continue
        try:
            key = raw_key.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedRecord(f"TXT key {raw_key!r} is not ASCII") from None
        if not _TXT_KEY.match(key):
            raise MalformedRecord(f"TXT key {raw_key!r} has control characters")
        key = key.lower()
        if key in entries:
            continue
        try:
            entries[key] = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedRecord(f"TXT value of {key!r} is not UTF-8") from None
    return entries


def candidates_from_service(info: AsyncServiceInfo) -> list[Candidate]:
    """One candidate per IPv4 address of a resolved service; MalformedRecord when it is no peer."""
    txt = parse_txt_record(info.text or b"")
    node_id = txt.get(TXT_NODE_ID)
    if not node_id:
        raise MalformedRecord(f"TXT record has no {TXT_NODE_ID}")
    try:
        check_node_id(node_id)
    except MembershipError as error:
        raise MalformedRecord(str(error)) from None
    if not info.port:
        raise MalformedRecord("SRV record has no port")
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        raise MalformedRecord("no IPv4 address record")
    return [
        Candidate(address=format_address(address, info.port), source=SOURCE_MDNS, node_id=node_id, txt=txt)
        for address in addresses
    ]


def resolve_interfaces(items: Sequence[str]) -> list[str]:
    """Turn interface names (``eth0``) and IPv4 addresses into the IPv4 list zeroconf binds to."""
    adapters = {adapter.nice_name: adapter for adapter in ifaddr.get_adapters()}
    resolved: list[str] = []
    for item in items:
        try:
            addresses = [str(ipaddress.IPv4Address(item))]
        except ValueError:
            adapter = adapters.get(item)
            if adapter is None:
                raise ValueError(
                    f"mDNS interface {item!r} is neither an IPv4 address nor an interface here"
                    f" (interfaces: {', '.join(sorted(adapters))})"
                ) from None
            # ifaddr gives IPv4 addresses as str and IPv6 ones as (address, flowinfo, scope) tuples.
            addresses = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
            if not addresses:
                raise ValueError(f"mDNS interface {item!r} has no IPv4 address") from None
        resolved.extend(address for address in addresses if address not in resolved)
    return resolved


class MdnsDiscovery:
    """Advertise ``node_id`` at ``advertise_host:port`` with ``txt`` and browse for the same service.

    ``interfaces`` (names or IPv4 addresses) limits where mDNS runs; None or empty: every interface.
    ``service_type`` other than the default separates unrelated groups on one LAN (tests use it).
    """

    name = SOURCE_MDNS

    def __init__(
        self,
        node_id: str,
        advertise_host: str,
        port: int,
        txt: Mapping[str, str],
        interfaces: Sequence[str] | None = None,
        *,
        service_type: str = SERVICE_TYPE,
        resolve_timeout: float = RESOLVE_TIMEOUT_S,
        log: Any | None = None,
    ) -> None:
        self.node_id = check_node_id(node_id)
        try:
            address = ipaddress.IPv4Address(advertise_host)
        except ValueError:
            raise ValueError(
                f"mDNS advertises an IPv4 address that peers can dial; got {advertise_host!r}"
            ) from None
        if address.is_unspecified:
            raise ValueError(f"mDNS cannot advertise {advertise_host}: peers cannot dial it")
        if not 1 <= port <= 65535:
            raise ValueError(f"mDNS advertised port must be 1-65535, got {port}")
        if txt.get(TXT_NODE_ID, node_id) != node_id:
            raise ValueError(f"TXT {TXT_NODE_ID}={txt[TXT_NODE_ID]!r} differs from the node id {node_id!r}")
        try:
            service_type_name(service_type)
        except BadTypeInNameException as error:
            raise ValueError(f"mDNS service type {service_type!r}: {error}") from None
        self.advertise_host = str(address)
        self.port = port
        self.txt = check_txt({**txt, TXT_NODE_ID: node_id})
        self.interfaces = resolve_interfaces(interfaces) if interfaces else None
        self.service_type = service_type
        self.instance = instance_name(node_id)
        self.service_name = f"{self.instance}.{service_type}"
        self.resolve_timeout = resolve_timeout
        self.log = log if log is not None else get_logger(node=node_id, discovery=SOURCE_MDNS)
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered: AsyncServiceInfo | None = None
        self._on_change: ChangeCallback | None = None
        self._peers: dict[str, list[Candidate]] = {}  # lower-cased service name -> its candidates
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._problems: dict[str, str] = {}  # service name -> the problem last logged for it

    async def start(self, on_change: ChangeCallback) -> None:
        """Bind, browse, and announce; returns once the announcement is on the wire. DiscoveryError
        when mDNS cannot bind or another host already advertises this node id."""
        self._on_change = on_change
        interfaces = self.interfaces if self.interfaces is not None else InterfaceChoice.All
        try:
            self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                hint = (
                    "UDP port 5353 is held exclusively by another mDNS stack (e.g. avahi-daemon with "
                    "disallow-other-stacks=yes): allow other stacks, or use --peers / --dns-name with "
                    "--discovery none"
                )
            else:
                hint = "--interface must name an up interface of this host or one of its IPv4 addresses"
            why = error.strerror or str(error)
            raise DiscoveryError(f"mDNS cannot start on {interfaces}: {why}; {hint}") from error
        try:
            # Browse before announcing so peers that answer our announcement are not missed.
            self._browser = AsyncServiceBrowser(
                self._zeroconf.zeroconf, [self.service_type], handlers=[self._on_service_state_change]
            )
            info = AsyncServiceInfo(
                self.service_type,
                self.service_name,
                port=self.port,
                properties=self.txt,
                server=f"{self.instance}.local.",
                addresses=[socket.inet_aton(self.advertise_host)],
            )
            registering = asyncio.ensure_future(self._zeroconf.async_register_service(info))
            try:
                if await self._name_is_taken(registering):
                    raise NonUniqueNameException
                announced = await registering
            finally:
                registering.cancel()  # no-op once done; retrieves a probe's exception in every case
                with contextlib.suppress(asyncio.CancelledError, NonUniqueNameException):
                    await registering
            self._registered = info
            await announced
        except NonUniqueNameException:
            await self.stop()
            raise DiscoveryError(
                f"another host already advertises node id {self.node_id!r} on mDNS"
                f" ({self.service_name}); node ids must be unique"
            ) from None
        except BaseException:
            await self.stop()
            raise
        self.log.info(
            "mDNS advertising", service=self.service_name, address=f"{self.advertise_host}:{self.port}"
        )

    async def _name_is_taken(self, registering: asyncio.Future[Any]) -> bool:
        """Whether another host answers a one-shot query for this node's service name (RFC 6762 §5.1),
        asked while zeroconf probes for the name.

        zeroconf's probes alone do not find a holder on the same host: they go out from port 5353 and the
        holder answers them by unicast to that address and port 5353, where every mDNS responder of the
        host bound to that address shares one SO_REUSEPORT group, and the kernel hands the answer to one
        of them by a hash seeded per boot and network namespace, often to the holder itself. A one-shot
        query comes from an ephemeral port of its own, so the holder's answer reaches the asker only."""
        interfaces = self.interfaces if self.interfaces is not None else InterfaceChoice.All
        try:
            asker = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only, unicast=True)
        except OSError as error:
            self.log.warning("mDNS one-shot name check not possible", error=repr(error))
            return False
        try:
            found = AsyncServiceInfo(self.service_type, self.service_name)
            if not await found.async_request(asker.zeroconf, NAME_CHECK_TIMEOUT_S * 1000):
                return False
        finally:
            await asker.async_close()
        if not registering.done():
            return True  # this node's own record is not registered yet: the answer came from another host
        # The event loop stalled past zeroconf's probing: the answer may be this node's own record.
        found_at = (found.port, found.parsed_addresses(IPVersion.V4Only))
        return found_at != (self.port, [self.advertise_host])

    async def stop(self) -> None:
        """Withdraw the record (peers see the goodbye at once) and release the sockets. Idempotent."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        resolving = list(self._resolving.values())
        self._resolving.clear()
        for task in resolving:
            task.cancel()
        for task in resolving:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._zeroconf is not None:
            try:
                if self._registered is not None:
                    goodbye = await self._zeroconf.async_unregister_service(self._registered)
                    await goodbye
            except OSError as error:
                # Peers then keep the record until it expires; the sockets must be released regardless.
                self.log.warning("mDNS goodbye not sent", error=repr(error))
            finally:
                self._registered = None
                await self._zeroconf.async_close()
                self._zeroconf = None
        self._peers.clear()

    def candidates(self) -> list[Candidate]:
        return [candidate for candidates in self._peers.values() for candidate in candidates]

    # Called by zeroconf on the event loop; the parameter names are part of zeroconf's handler contract.
    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if key == self.service_name.lower():
            return
        pending = self._resolving.pop(key, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            self._problems.pop(key, None)
            gone = self._peers.pop(key, None)
            if gone is not None:
                self.log.info("mDNS peer withdrawn", service=name, peer=gone[0].node_id)
                self._changed()
            return
        task = asyncio.create_task(self._resolve(service_type, name), name=f"dpgan-mdns-resolve-{key}")
        self._resolving[key] = task
        task.add_done_callback(lambda finished: self._forget_task(key, finished))

    def _forget_task(self, key: str, finished: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is finished:
            del self._resolving[key]

    async def _resolve(self, service_type: str, name: str) -> None:
        key = name.lower()
        if self._zeroconf is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            complete = await info.async_request(self._zeroconf.zeroconf, self.resolve_timeout * 1000)
            if not complete:
                # Lost packets, not a bad record: what was known about the peer stays until it changes.
                problem = f"no complete SRV/TXT/A answer within {self.resolve_timeout} s"
                self._report(key, name, problem, event="mDNS record not resolved")
                return
            candidates = candidates_from_service(info)
            if candidates[0].node_id == self.node_id:
                raise MalformedRecord("advertises this node's own node id (are two agents sharing an id?)")
        except MalformedRecord as problem:
            self._ignore(key, name, str(problem))
            return
        except (OSError, ValueError, BadTypeInNameException) as error:
            # Whatever else the network sends must not kill discovery; name it and carry on.
            self._ignore(key, name, f"{type(error).__name__}: {error}")
            return
        self._problems.pop(key, None)
        if self._peers.get(key) != candidates:
            if key not in self._peers:
                self.log.info(
                    "mDNS peer found",
                    service=name,
                    peer=candidates[0].node_id,
                    addresses=[candidate.address for candidate in candidates],
                )
            self._peers[key] = candidates
            self._changed()

    def _ignore(self, key: str, name: str, problem: str) -> None:
        # A record that turned malformed no longer describes the peer it used to.
        if self._peers.pop(key, None) is not None:
            self._changed()
        self._report(key, name, problem)

    def _report(self, key: str, name: str, problem: str, event: str = "mDNS record ignored") -> None:
        if self._problems.get(key) != problem:
            self._problems[key] = problem
            self.log.warning(event, service=name, problem=problem)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
