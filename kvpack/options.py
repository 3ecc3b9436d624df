"""gRPC channel and server options, in one place so both ends agree.

Use :func:`channel_options` for every client channel and :func:`server_options` for every server.
"""

from __future__ import annotations

#: Largest single gRPC message either end accepts or sends (bytes). Tensors travel in
#: ``kvpack.wire.CHUNK_BYTES`` (1 MiB) chunks, so 8 MiB leaves room for headers and token ids
#: while keeping a runaway message from being buffered whole. gRPC's default receive limit is 4 MiB.
MAX_MESSAGE_BYTES = 8 << 20

#: Client keepalive: ping after 60 s without activity, drop the connection if no ack in 20 s.
#: Long Compress streams through load balancers and NATs otherwise die silently.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options() -> list[tuple[str, int | str]]:
    """Options for a client channel (sync or aio)."""
    return [
        # Same finite limits as the server, so an oversized message fails on the sender.
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Detect dead peers on long-lived streams (see KEEPALIVE_TIME_MS).
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Keep pinging an idle channel so the first call after a pause does not hit a dead one;
        # the server permits this (see server_options).
        ("grpc.keepalive_permit_without_calls", 1),
        # 0 = no cap on pings sent without data; the default (2) would stop keepalive on idle
        # channels.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(*, reuse_port: bool = False) -> list[tuple[str, int | str]]:
    """Options for a server.

    ``reuse_port`` stays off by default: with SO_REUSEPORT two servers (e.g. two tests, or a stale
    process) could bind the same port and split traffic silently; off, the second bind fails.
    """
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Accept the clients' 60 s keepalive pings (also without calls) instead of answering them
        # with GOAWAY "too_many_pings": the minimum interval must be below the client's 60 s.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        # The server also pings idle clients every 2 minutes so half-open connections get freed.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
