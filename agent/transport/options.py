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

# Stream hygiene (GossipServer, PeerClient.fetch_state). A stream that delivers no chunk for the stall
# limit is aborted and its receive buffer released at once. The default equals the agent's default
# --round-timeout (the agent passes its own): a push that has not progressed for a whole round can no
# longer be mixed into it.
DEFAULT_STALL_TIMEOUT_S: Final = 10.0
# Concurrent PushVector streams. A sender needs one stream per round in flight (a couple at most, with
# pushes retried while a neighbour catches up); 4 leaves margin. Each admitted stream may hold one
# receive buffer of the vector's size, so these caps bound receive memory at
# min(MAX_PUSH_STREAMS, MAX_PUSH_STREAMS_PER_PEER x handshaken peers) x vector bytes, however many
# streams are opened; extra streams are refused with RESOURCE_EXHAUSTED. The total leaves room for a
# complete graph of ~128 nodes, each pushing one round at a time.
MAX_PUSH_STREAMS_PER_PEER: Final = 4
MAX_PUSH_STREAMS: Final = 256

# Connection lifetime on the server (HTTP/2 GOAWAY; a client channel reconnects on its next call):
# - idle: a connection with no RPC in flight for 5 min is closed. An agent's neighbours call every
#   round and the peer registry probes every few seconds, so only connections of peers that left (or
#   of clients that opened one and walked away) are closed; their sockets and HTTP/2 state are freed.
#   Keepalive pings do not count as activity.
# - age: every connection is renewed after ~1 h (gRPC adds +-10% jitter), so per-connection state
#   (flow-control windows grown by BDP probing, HPACK tables, a route through a NAT that changed)
#   cannot live forever; costs one reconnect per neighbour per hour.
# - age grace: in-flight RPCs on an aged connection get this long to finish before it is closed; a
#   state download by a late joiner is the longest RPC, so it is generous.
SERVER_MAX_CONNECTION_IDLE_MS: Final = 5 * 60_000
SERVER_MAX_CONNECTION_AGE_MS: Final = 60 * 60_000
SERVER_MAX_CONNECTION_AGE_GRACE_MS: Final = 5 * 60_000

# PushStream (one long-lived push stream per neighbour, PeerClient): a stream older than this is closed
# and replaced before the next vector. An aged connection (above) admits no new streams and is closed
# when its grace ends, killing a stream still open on it; replacing streams well within the grace moves
# them to the new connection between two vectors instead of failing a push once an hour. Costs one
# stream setup (~1 ms) per neighbour per minute. The server ends a stream idle between vectors for the
# connection idle limit (so idle connections are still closed).
PUSH_STREAM_MAX_AGE_S: Final = 60.0

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


def server_options(*, max_connection_idle_ms: int = SERVER_MAX_CONNECTION_IDLE_MS) -> list[ChannelOption]:
    """Options for `grpc.aio.server(options=...)`; `max_connection_idle_ms` is a parameter for tests."""
    idle = max_connection_idle_ms
    if isinstance(idle, bool) or not isinstance(idle, int) or idle <= 0:
        raise ValueError(f"max_connection_idle_ms must be an int > 0, got {idle!r}")
    return [
        *_message_size_options(),
        # gRPC sets SO_REUSEPORT by default on Linux, which lets a second agent bind the same port
        # and silently steal half the connections. Turning it off makes a port clash fail at bind.
        ("grpc.so_reuseport", 0),
        # Server pings every idle connection each minute and drops it if no answer within 20 s: a
        # client that vanished without closing its socket is noticed even when it holds no RPC.
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping every 20 s even without calls; accept that rate (with margin) and answer a
        # client that pings faster (2 strikes) with GOAWAY, so pings cannot be used to flood us.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        # Connection lifetime (see SERVER_MAX_CONNECTION_* above).
        ("grpc.max_connection_idle_ms", max_connection_idle_ms),
        ("grpc.max_connection_age_ms", SERVER_MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", SERVER_MAX_CONNECTION_AGE_GRACE_MS),
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
