"""Shared helpers of the deployment checks: file locations, YAML/Dockerfile parsing, PromQL names.

No Docker: the deployment files are parsed and cross-checked here, and the topology they describe
is run as real processes by test_deploy_live.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kvpack.json"
HEALTHCHECK = DEPLOY / "healthcheck.py"
K8S = DEPLOY / "k8s"

#: Series Prometheus itself adds to every target; expressions may use them without kvpack
#: exporting them.
KVPACK = Path(sys.executable).with_name("kvpack")

PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest document under deploy/k8s, with its file."""
    return [(p, doc) for p in sorted(K8S.glob("*.yaml")) for doc in load_yaml_all(p)]


# -- Dockerfile --------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are ignored by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages(text: str) -> tuple[list[Instruction], list[Stage]]:
    """(global ARGs before the first FROM, stages in order)."""
    head: list[Instruction] = []
    stages: list[Stage] = []
    for ins in dockerfile_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            head.append(ins)
    return head, stages


def exec_form(args: str) -> list[str]:
    """A JSON exec-form argument list (``["a", "b"]``); shell form is split like a shell."""
    args = args.strip()
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
        return value
    return shlex.split(args)


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) per line of .dockerignore, comments and blanks dropped."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        out.append((neg, line.lstrip("!").strip().strip("/")))
    return out


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes ``path`` (relative to the context) from the build context.

    Docker's rules: the last matching pattern wins; a pattern matching a parent directory
    excludes everything below it; ``**`` matches any number of directories.
    """
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, pattern in dockerignore_patterns():
        regex = _glob_regex(pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not neg
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


# -- PromQL ------------------------------------------------------------------------------------

# Aggregation operators, keywords and literals that look like identifiers but name no series.
_PROMQL_WORDS = frozenset(
    {
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
        *("by", "without", "on", "ignoring", "group_left", "group_right", "bool"),
        *("and", "or", "unless", "offset", "atan2", "inf", "nan"),
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-zA-Z_$]+")
_MATCHERS = re.compile(r"\{[^}]*\}")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (``rate(x_total[5m])`` -> ``{"x_total"}``).

    Lexical, not a full parser: strings, label matchers, ranges, offsets, grouping label lists,
    numbers and Grafana variables are removed; what is left that is not followed by ``(`` (a
    function) and is not a keyword is a metric name. promtool parses the same expressions in
    test_deploy_promtool.py, so a syntax error cannot hide here.
    """
    m = _LABEL_VALUES.match(expr)
    if m:  # Grafana variable query: label_values(metric, label)
        return {m.group(1)}
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name = m.group(0)
        if name in _PROMQL_WORDS or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def promql_label_matchers(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for every label matcher written on a named selector."""
    text = _STRING.sub('""', expr)
    return [
        (m.group(1), label)
        for m in _SELECTOR.finditer(text)
        for label in _MATCHER.findall(m.group(2))
    ]


def dashboard_panels(node: Any) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in node.get("panels", []):
        yield panel
        yield from dashboard_panels(panel)


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and query:
            out.append((f"variable {var['name']!r}", query))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every alerting/recording rule in alerts.yml."""
    out = []
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            out.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """Grafana's template variables replaced by values Prometheus accepts (for promtool)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


# -- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now (the server binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """One running `kvpack serve` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_serving(served: Served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                pytest.fail(
                    f"kvpack serve exited with {served.proc.returncode}:\n{served.output()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    pytest.fail(f"kvpack serve not SERVING after {timeout} s:\n{served.output()}")


class Servers:
    """Starts `kvpack serve` subprocesses on free loopback ports; ``stop()`` ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Served] = []

    def __call__(self, *args: str, replicas: int = 1) -> list[Served]:
        """Start ``replicas`` servers with the same flags (concurrently: torch's import dominates
        start-up) and return once every one's health service answers SERVING."""
        batch = []
        for _ in range(replicas):
            port, metrics_port = free_port(), free_port()
            log = self.logs / f"serve-{len(self.started)}.log"
            cmd = [str(KVPACK), "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--metrics-port", str(metrics_port), "--grace", "1", *args]
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            served = Served(proc, port, metrics_port, log)
            self.started.append(served)
            batch.append(served)
        for served in batch:
            _wait_serving(served, timeout=60)
        return batch

    def stop(self) -> None:
        """SIGTERM every server (they drain for --grace 1 s), then wait; kill stragglers."""
        for served in self.started:
            served.proc.terminate()
        for served in self.started:
            try:
                served.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                served.proc.kill()
                served.proc.wait()


# -- promtool ----------------------------------------------------------------------------------


PROMTOOL_HINT = (
    "promtool is missing: install Debian's `prometheus` package "
    "(apt-get install -y --no-install-recommends prometheus), or run the tests as root so this "
    "fixture installs it"
)


@pytest.fixture(scope="session", name="promtool")
def promtool_fixture() -> str:
    """Path of promtool; installs Debian's `prometheus` package first when missing and root.

    Test modules import this fixture (there is deliberately no tests/deploy/conftest.py: a second
    module named ``conftest`` would shadow the one other test folders import from)."""
    found = shutil.which("promtool")
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(PROMTOOL_HINT)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    found = shutil.which("promtool")
    if not found:
        pytest.fail(f"apt-get install prometheus did not provide promtool:\n{done.stderr[-2000:]}")
    return found


def promtool_path() -> str | None:
    return shutil.which("promtool")


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = promtool_path()
    assert tool is not None
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )
