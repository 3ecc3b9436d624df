"""Security: bearer tokens on every method, tenant isolation on every store, TLS and mTLS with
certificates made here, and no unsafe deserialisation anywhere in the package."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpack import codec, errors
from kvpack.client import TLS, AsyncKVPackClient
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests import certs
from tests.server.server_support import fetch, put_requests

TOKENS = "alpha:tok-alpha,beta:tok-beta"
SERVICE = pb.DESCRIPTOR.services_by_name["KVPack"]
ROOT = Path(__file__).resolve().parents[2]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def blob() -> bytes:
    k = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(5))
    return codec.encode([k], [k])


async def call_method(
    channel: aio.Channel, method: Any, metadata: Any, timeout: float = 5
) -> grpc.StatusCode:
    """Call ``method`` (a service descriptor method) with a default request; its status code."""
    request_cls = getattr(pb, method.input_type.name)
    response_cls = getattr(pb, method.output_type.name)
    path = f"/{SERVICE.full_name}/{method.name}"
    kw = {
        "request_serializer": request_cls.SerializeToString,
        "response_deserializer": response_cls.FromString,
    }
    request = request_cls()
    try:
        if method.client_streaming and method.server_streaming:
            async for _ in channel.stream_stream(path, **kw)(iter([request]), metadata=metadata):
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **kw)(iter([request]), metadata=metadata)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **kw)(request, metadata=metadata):
                pass
        else:
            await channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=timeout)
    except aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_every_method_needs_a_token(start_server: Any, channels: Any) -> None:
    server = await start_server(auth_tokens=TOKENS)
    channel = channels(server.address)
    methods = list(SERVICE.methods)
    assert {m.name for m in methods} >= {"Compress", "Fetch", "Put", "Delete", "Stat", "List"}
    bad_metadata: list[Any] = [
        None,
        bearer("wrong"),
        bearer("tok-alpha" + "x"),
        bearer("tok-alph"),
        (("authorization", "tok-alpha"),),  # no scheme
        (("authorization", "Basic tok-alpha"),),
        (("authorization", "Bearer "),),
    ]
    for method in methods:
        for md in bad_metadata:
            code = await call_method(channel, method, md)
            assert code == grpc.StatusCode.UNAUTHENTICATED, f"{method.name} with {md}: {code}"
        # With a valid token the call gets past auth (whatever the empty request then earns).
        code = await call_method(channel, method, bearer("tok-alpha"))
        assert code != grpc.StatusCode.UNAUTHENTICATED, method.name
    # Health stays open (load balancers probe without tokens).
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Nothing was stored by any of the rejected calls.
    assert (await server.store.usage()).entries == 0


@pytest.fixture(params=["memory", "disk", pytest.param("redis", marks=pytest.mark.redis)])
async def isolated(request: pytest.FixtureRequest, start_server: Any, tmp_path: Path) -> Any:
    """A server with two tenants on each store kind."""
    store = request.param
    extra: dict[str, Any] = {}
    if store == "disk":
        extra["disk_path"] = str(tmp_path / "store")
    if store == "redis":
        extra["redis_prefix"] = request.getfixturevalue("redis_prefix")
    return await start_server(store=store, auth_tokens=TOKENS, **extra)


async def test_tenants_cannot_reach_each_other(isolated: Any, channels: Any) -> None:
    stub = pb_grpc.KVPackStub(channels(isolated.address))
    a, b = bearer("tok-alpha"), bearer("tok-beta")
    data = blob()
    await stub.Put(put_requests(data, "secret/one"), metadata=a, timeout=10)
    await stub.Put(put_requests(data, "same-name"), metadata=a, timeout=10)

    async def status(aw: Any) -> tuple[grpc.StatusCode, str]:
        try:
            await aw
        except aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    for key, shown in (("secret/one", "secret/one"), ("never-written", "never-written")):
        results = [
            await status(fetch(stub, key, metadata=b, timeout=5)),
            await status(stub.Stat(pb.StatRequest(key=key), metadata=b, timeout=5)),
            await status(stub.Delete(pb.DeleteRequest(key=key), metadata=b, timeout=5)),
        ]
        for code, details in results:
            assert code == grpc.StatusCode.NOT_FOUND
            # Exactly like a missing key: same message shape, no tenant named.
            assert details == f"no entry {shown!r}", details
            assert "alpha" not in details
    # Keys that look like paths into another namespace stay in the caller's own.
    for sneaky in ("../alpha/secret/one", "alpha/secret/one", "/alpha/secret/one", "./secret/one"):
        code, _ = await status(fetch(stub, sneaky, metadata=b, timeout=5))
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), sneaky
    for prefix in ("", "secret", "alpha", "../", "s"):
        listed = await stub.List(pb.ListRequest(prefix=prefix), metadata=b, timeout=5)
        assert list(listed.entries) == [], prefix
    # b's own entry of the same name is separate; a's entries are untouched by b's attempts.
    await stub.Put(put_requests(blob(), "same-name"), metadata=b, timeout=10)
    await stub.Delete(pb.DeleteRequest(key="same-name"), metadata=b, timeout=5)
    listed = await stub.List(pb.ListRequest(), metadata=a, timeout=5)
    assert [e.key for e in listed.entries] == ["same-name", "secret/one"]
    assert await fetch(stub, "secret/one", metadata=a, timeout=5) == data


# -- TLS / mTLS ----------------------------------------------------------------------------------


class PKI:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a second
    (untrusted) CA with its own client certificate; PEM files under ``dir``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        ca = certs.issue("kvpack-test-ca", ca=True)
        rogue = certs.issue("rogue-ca", ca=True)
        server = certs.issue("localhost", issuer=ca)
        client = certs.issue("client", issuer=ca)
        rogue_client = certs.issue("client", issuer=rogue)
        self.files: dict[str, str] = {}
        for name, content in {
            "ca.pem": certs.pem(ca[0]),
            "rogue-ca.pem": certs.pem(rogue[0]),
            "server.pem": certs.pem(server[0]),
            "server.key": certs.pem(server[0], server[1]),
            "client.pem": certs.pem(client[0]),
            "client.key": certs.pem(client[0], client[1]),
            "rogue-client.pem": certs.pem(rogue_client[0]),
            "rogue-client.key": certs.pem(rogue_client[0], rogue_client[1]),
        }.items():
            (directory / name).write_bytes(content)
            self.files[name] = str(directory / name)

    def tls(self, root: str = "ca.pem", client: str | None = None) -> TLS:
        if client is None:
            return TLS(root_ca=self.files[root])
        return TLS(
            root_ca=self.files[root],
            cert=self.files[f"{client}.pem"],
            key=self.files[f"{client}.key"],
        )


async def info_error(target: str, **kw: Any) -> errors.KVPackError | None:
    """The typed error of an Info call through the real client (None when it succeeds)."""
    async with AsyncKVPackClient(target, timeout=3, retries=0, **kw) as client:
        try:
            await client.info()
        except errors.KVPackError as e:
            return e
    return None


async def test_tls(start_server: Any, tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    server = await start_server(
        tls_cert=pki.files["server.pem"], tls_key=pki.files["server.key"], auth_tokens=TOKENS
    )
    target_ip, target_name = server.address, f"localhost:{server.port}"
    assert await info_error(target_ip, tls=pki.tls(), token="tok-alpha") is None
    assert await info_error(target_name, tls=pki.tls(), token="tok-alpha") is None
    # TLS does not replace the token.
    assert isinstance(await info_error(target_ip, tls=pki.tls()), errors.Unauthenticated)
    # A server certificate from a CA the client does not trust, or plaintext: no connection.
    assert isinstance(
        await info_error(target_ip, tls=pki.tls("rogue-ca.pem"), token="tok-alpha"),
        errors.Unavailable,
    )
    assert isinstance(await info_error(target_ip, token="tok-alpha"), errors.Unavailable)


async def test_mtls(start_server: Any, tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    server = await start_server(
        tls_cert=pki.files["server.pem"],
        tls_key=pki.files["server.key"],
        tls_client_ca=pki.files["ca.pem"],
    )
    target = server.address
    assert await info_error(target, tls=pki.tls(client="client")) is None
    # No client certificate, one from an untrusted CA, or plaintext: the handshake fails.
    for kw in ({"tls": pki.tls()}, {"tls": pki.tls(client="rogue-client")}, {}):
        err = await info_error(target, **kw)
        assert isinstance(err, errors.Unavailable), (kw, err)
    # The server is still fine for a proper client.
    async with AsyncKVPackClient(target, tls=pki.tls(client="client"), timeout=5) as client:
        key = await client.put(blob(), key="mtls/one")
        assert (await client.stat(key)).num_layers == 1


# -- no unsafe deserialisation ------------------------------------------------------------------


def package_sources() -> Iterator[Path]:
    """Every .py file of the kvpack package (following its links to codec/, server/, ...),
    except the generated protobuf modules."""
    package = ROOT / "kvpack"
    for path in sorted(package.rglob("*.py")):
        if "v1" in path.relative_to(package).parts[:1]:
            continue
        yield path
    for linked in sorted(p for p in package.iterdir() if p.is_symlink() and p.is_dir()):
        yield from sorted(linked.resolve().rglob("*.py"))


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _const_kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unsafe_uses(path: Path) -> list[str]:
    """Unsafe deserialisation in one source file, as ``file:line: what`` strings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "") in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec") or name.endswith(("pickle.loads", "pickle.load")):
                found.append(f"{where}: {name}()")
            elif name == "torch.load":
                if _const_kw(node, "weights_only") is not True:
                    found.append(f"{where}: torch.load without weights_only=True")
            elif last == "load" and name.endswith(("np.load", "numpy.load")):
                if _const_kw(node, "allow_pickle") not in (None, False):
                    found.append(f"{where}: numpy.load(allow_pickle=...)")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where}: {name}() (use yaml.safe_load)")
            elif name.endswith("from_pretrained") and _const_kw(node, "use_safetensors") is False:
                found.append(f"{where}: from_pretrained(use_safetensors=False)")
    return found


def test_scanner_catches_unsafe_code(tmp_path: Path) -> None:
    """The scanner itself: each pattern it looks for is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, marshal\nfrom shelve import open\nimport torch, numpy as np, yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "yaml.load('x')\neval('1')\n"
    )
    assert len(unsafe_uses(bad)) == 8
    good = tmp_path / "good.py"
    good.write_text("import torch, json\ntorch.load('x', weights_only=True)\njson.loads('{}')\n")
    assert unsafe_uses(good) == []


def test_package_never_deserialises_unsafely() -> None:
    sources = list(package_sources())
    names = {p.parent.name for p in sources}
    assert {"codec", "server", "client"} <= names, names  # the links were followed
    found = [use for path in sources for use in unsafe_uses(path)]
    assert not found, "\n".join(found)
