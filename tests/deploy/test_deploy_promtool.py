"""promtool on the shipped Prometheus files: config and rules valid, alerts fire as intended, and
every dashboard expression parses with Prometheus' own PromQL parser.

promtool comes from Debian's `prometheus` package; the `promtool` fixture installs it when it is
missing and the tests run as root, and skips these tests with the install hint otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_support import (  # promtool_fixture provides the `promtool` fixture
    ALERTS,
    ALERTS_TEST,
    K8S,
    PROMETHEUS,
    dashboard_expressions,
    grafana_to_promql,
    load_yaml_all,
    promtool_fixture,  # noqa: F401
    run_promtool,
)


@pytest.fixture(autouse=True)
def _needs_promtool(promtool: str) -> None:
    """Every test here runs promtool (installed or skipped by the fixture)."""


def _ok(result: object) -> None:
    out = f"{getattr(result, 'stdout', '')}{getattr(result, 'stderr', '')}"
    assert getattr(result, "returncode", 1) == 0, out


def test_promtool_check_config_and_rules() -> None:
    _ok(run_promtool("check", "config", str(PROMETHEUS)))
    result = run_promtool("check", "rules", str(ALERTS))
    _ok(result)
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alert_rules_fire_as_intended() -> None:
    """`promtool test rules`: synthetic series make each alert fire (or stay quiet) as stated."""
    _ok(run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent))


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Each dashboard query, Grafana variables substituted, as a recording rule promtool parses."""
    rules = [
        {"record": f"kvpack:dashboard_expr_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_expressions())
        if not expr.startswith("label_values(")  # Grafana's own function, not PromQL
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    _ok(result)
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_k8s_scrape_config(tmp_path: Path) -> None:
    """The Prometheus config embedded in deploy/k8s/prometheus-scrape.yaml, with its rules."""
    (configmap,) = load_yaml_all(K8S / "prometheus-scrape.yaml")
    (tmp_path / "prometheus.yml").write_text(configmap["data"]["prometheus.yml"])
    (tmp_path / "rules").mkdir()
    shutil.copy(ALERTS, tmp_path / "rules" / "alerts.yml")
    result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    if "field kubernetes_sd_configs not found" in result.stderr + result.stdout:
        pytest.skip(
            "this promtool was built without Kubernetes service discovery (Debian's package "
            "drops it); the relabelling is checked in test_deploy_files.py instead"
        )
    _ok(result)
