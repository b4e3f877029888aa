"""The one place for gRPC channel/server options and chunk-size limits used by the transport.

Everything that tunes how bytes move between peers lives here, so client and server cannot disagree.
"""

from __future__ import annotations

from typing import Final

KIB: Final = 1 << 10
MIB: Final = 1 << 20

# Payload bytes per VectorChunk. 1 MiB keeps per-message overhead negligible while bounding how
# much a single gRPC message pins in memory; the receiver enforces the same bounds on the peer's value.
DEFAULT_CHUNK_BYTES: Final = 1 * MIB
MIN_CHUNK_BYTES: Final = 64 * KIB
MAX_CHUNK_BYTES: Final = 16 * MIB

# Message size limit on both ends. Chunks are at most MAX_CHUNK_BYTES plus a small header, so this
# leaves ample headroom while still refusing a peer that tries to send one giant message.
MAX_MESSAGE_BYTES: Final = 64 * MIB

# LAN keepalive: detect a dead peer (pulled cable, killed VM) within ~30 s instead of the TCP default
# of hours, so a gossip round does not keep waiting on a connection that will never deliver.
CLIENT_KEEPALIVE_TIME_MS: Final = 20_000
CLIENT_KEEPALIVE_TIMEOUT_MS: Final = 10_000
SERVER_KEEPALIVE_TIME_MS: Final = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS: Final = 20_000
# The server must tolerate the client's ping rate or it answers with GOAWAY "too_many_pings";
# half the client interval leaves margin for timer jitter.
SERVER_MIN_PING_INTERVAL_MS: Final = CLIENT_KEEPALIVE_TIME_MS // 2

ChannelOption = tuple[str, int | str]


def validate_chunk_bytes(chunk_bytes: int) -> int:
    """Return `chunk_bytes` if it is an int in [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES], else raise ValueError."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise ValueError(f"chunk_bytes must be an int, got {type(chunk_bytes).__name__}")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(
            f"chunk_bytes={chunk_bytes} is outside the allowed range "
            f"[{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}] (64 KiB to 16 MiB)"
        )
    return chunk_bytes


def _message_size_options() -> list[ChannelOption]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options() -> list[ChannelOption]:
    """Options for `grpc.aio.server(options=...)`."""
    return [
        *_message_size_options(),
        # gRPC sets SO_REUSEPORT by default on Linux, which lets a second agent bind the same port
        # and silently steal half the connections. Turning it off makes a port clash fail at bind.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def channel_options() -> list[ChannelOption]:
    """Options for `grpc.aio.insecure_channel(target, options=...)`."""
    return [
        *_message_size_options(),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        # Idle channels between iterations must stay warm: pinging without calls keeps NAT/conntrack
        # entries alive and surfaces a dead peer before the next push rather than during it.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # One channel per neighbour, never shared with another PeerClient: avoids gRPC's global
        # subchannel pool silently multiplexing two clients onto one TCP connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
