#!/usr/bin/env python3
"""Container health probe: exit 0 when kvpack's grpc.health.v1 service answers SERVING, else 1.

Installed in the image as ``kvpack-healthcheck`` (Dockerfile HEALTHCHECK, Kubernetes exec probes
when TLS is on: kubelet's built-in gRPC probe speaks plaintext only). Uses grpcio and
grpcio-health-checking, which kvpack already depends on, so the image needs no extra binary.

Environment (all optional):
  KVPACK_HEALTHCHECK_ADDR     target, default 127.0.0.1:$KVPACK_PORT (50051)
  KVPACK_HEALTHCHECK_TIMEOUT  seconds, default 3
  KVPACK_TLS_CERT             when set, the probe uses TLS; the server certificate is trusted
                              from KVPACK_HEALTHCHECK_CA (default: KVPACK_TLS_CERT itself, i.e. a
                              self-signed certificate)
  KVPACK_TLS_CLIENT_CA        when set (mTLS), the probe presents KVPACK_HEALTHCHECK_CERT/_KEY
                              (default: the server's own KVPACK_TLS_CERT/KVPACK_TLS_KEY)
  KVPACK_HEALTHCHECK_SERVER_NAME  TLS name to verify, default "localhost"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _channel(env: Mapping[str, str]) -> grpc.Channel:
    target = env.get("KVPACK_HEALTHCHECK_ADDR") or f"127.0.0.1:{env.get('KVPACK_PORT', '50051')}"
    cert = env.get("KVPACK_TLS_CERT", "")
    if not cert:
        return grpc.insecure_channel(target)
    root = _read(env.get("KVPACK_HEALTHCHECK_CA") or cert)
    chain = key = None
    if env.get("KVPACK_TLS_CLIENT_CA"):
        chain = _read(env.get("KVPACK_HEALTHCHECK_CERT") or cert)
        key = _read(env.get("KVPACK_HEALTHCHECK_KEY") or env["KVPACK_TLS_KEY"])
    creds = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=chain)
    name = env.get("KVPACK_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])


def check(env: Mapping[str, str]) -> int:
    """0 if the overall health status ("" service) is SERVING, 1 otherwise (message on stderr)."""
    timeout = float(env.get("KVPACK_HEALTHCHECK_TIMEOUT", "3"))
    try:
        with _channel(env) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except (grpc.RpcError, OSError, KeyError, ValueError) as e:
        print(f"kvpack-healthcheck: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"kvpack-healthcheck: status {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(check(os.environ))
