"""Static checks of the deployment files (no Docker, no network).

They prove that the files parse, that everything they reference exists, that the ports and names
the files share agree (compose <-> Envoy <-> Prometheus <-> Grafana <-> Dockerfile <-> k8s), and
that the Dockerfile has the structure we promise (multi-stage, non-root, health-checked).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    ALERTS,
    ALERTS_TEST,
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    ENVOY,
    GRAFANA,
    HEALTHCHECK,
    K8S,
    PROMETHEUS,
    ROOT,
    dashboard_expressions,
    dashboard_panels,
    dockerfile_stages,
    dockerignored,
    exec_form,
    k8s_docs,
    load_yaml,
    load_yaml_all,
    promql_label_matchers,
    promql_metric_names,
    rule_expressions,
)

DATASOURCE_UID = "kvpack-prometheus"


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def kvpack_services() -> dict[str, dict[str, Any]]:
    """Compose services built from deploy/Dockerfile (the kvpack replicas)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("build"), dict)
        and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port of a compose service's ``ports``."""
    out = {}
    for spec in svc.get("ports", []):
        host, container = str(spec).rsplit(":", 1) if ":" in str(spec) else (spec, spec)
        out[int(str(container).split("/")[0])] = int(str(host).rsplit(":", 1)[-1])
    return out


def bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount (sources starting with . or /)."""
    out = []
    for spec in svc.get("volumes", []):
        source, target = str(spec).split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((ROOT / source).resolve(), target))
    return out


def envoy_cluster() -> dict[str, Any]:
    (cluster,) = [
        c for c in load_yaml(ENVOY)["static_resources"]["clusters"] if c["name"] == "kvpack"
    ]
    return cluster


def envoy_listener_port() -> int:
    (listener,) = load_yaml(ENVOY)["static_resources"]["listeners"]
    return int(listener["address"]["socket_address"]["port_value"])


def dockerfile_final() -> tuple[list[str], Any]:
    head, stages = dockerfile_stages(DOCKERFILE.read_text())
    return [i.args for i in head], stages


# -- parsing and references -----------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = [COMPOSE, ENVOY, PROMETHEUS, ALERTS, ALERTS_TEST, *sorted(GRAFANA.rglob("*.yml"))]
    files += sorted(K8S.glob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = load_yaml_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    json.loads(DASHBOARD.read_text())


def test_compose_references_existing_files() -> None:
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if isinstance(build, dict):
            context = (ROOT / build.get("context", ".")).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert (context / "pyproject.toml").is_file(), f"{name}: context must be the repo root"
        for source, target in bind_mounts(svc):
            assert source.exists(), f"{name}: bind mount source {source} is missing"
            assert target.startswith("/"), (name, target)
    prom = compose()["services"]["prometheus"]
    mounts = dict((target, source) for source, target in bind_mounts(prom))
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    for rule_file in load_yaml(PROMETHEUS)["rule_files"]:
        assert (mounts["/etc/prometheus"] / rule_file).is_file(), rule_file


def test_compose_runs_two_replicas_on_one_redis_with_health_gates() -> None:
    services = compose()["services"]
    replicas = kvpack_services()
    assert len(replicas) == 2, sorted(replicas)
    envs = [env_of(svc) for svc in replicas.values()]
    for env in envs:
        assert env["KVPACK_STORE"] == "redis"
        assert re.fullmatch(r"redis://redis:6379/\d+", env["KVPACK_REDIS_URL"])
    # Same store, same key prefix: an entry written through one replica is found by the other.
    assert len({(e["KVPACK_REDIS_URL"], e.get("KVPACK_REDIS_PREFIX")) for e in envs}) == 1
    assert len({svc["image"] for svc in replicas.values()}) == 1
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must state conditions"
        for dep, cond in depends.items():
            assert cond["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep], f"{dep} has no healthcheck for {name} to wait on"
    for name in replicas:
        assert replicas[name]["healthcheck"]["test"] == ["CMD", "kvpack-healthcheck"]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("envoy", "prometheus"):
        assert set(services[name]["depends_on"]) == set(replicas), name


def test_ports_agree_across_compose_envoy_prometheus_and_dockerfile() -> None:
    services = compose()["services"]
    replicas = kvpack_services()
    grpc_ports = {n: int(env_of(s)["KVPACK_PORT"]) for n, s in replicas.items()}
    metrics_ports = {n: int(env_of(s)["KVPACK_METRICS_PORT"]) for n, s in replicas.items()}
    for name, svc in replicas.items():
        assert {int(p) for p in svc["expose"]} == {grpc_ports[name], metrics_ports[name]}

    # Envoy balances over exactly the replicas, on their gRPC port.
    endpoints = {
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            int(e["endpoint"]["address"]["socket_address"]["port_value"]),
        )
        for group in envoy_cluster()["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }
    assert endpoints == set(grpc_ports.items())
    assert envoy_listener_port() in published(services["envoy"])
    admin_port = int(load_yaml(ENVOY)["admin"]["address"]["socket_address"]["port_value"])

    # Prometheus scrapes exactly the replicas' metrics ports, and Envoy's admin port.
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS)["scrape_configs"]}
    targets = {t for sc in jobs["kvpack"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{p}" for n, p in metrics_ports.items()}
    assert {t for sc in jobs["envoy"]["static_configs"] for t in sc["targets"]} == {
        f"envoy:{admin_port}"
    }

    # Grafana's datasource is the compose Prometheus on its port.
    (ds_file,) = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    (ds,) = load_yaml(ds_file)["datasources"]
    assert ds["url"] == f"http://prometheus:{next(iter(published(services['prometheus'])))}"

    # The image exposes and defaults to the same ports.
    _, stages = dockerfile_final()
    final = stages[-1]
    exposed = {int(p) for e in final.all("EXPOSE") for p in e.args.split()}
    assert exposed == set(grpc_ports.values()) | set(metrics_ports.values())
    env_text = " ".join(e.args for e in final.all("ENV"))
    assert f"KVPACK_PORT={next(iter(grpc_ports.values()))}" in env_text
    assert f"KVPACK_METRICS_PORT={next(iter(metrics_ports.values()))}" in env_text


def test_envoy_balances_grpc_per_request_with_health_checks() -> None:
    cluster = envoy_cluster()
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    assert cluster["type"] == "STRICT_DNS"  # compose service names resolve through DNS
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == ""
    (listener,) = load_yaml(ENVOY)["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    assert hcm["typed_config"]["codec_type"] == "HTTP2"
    (route,) = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    # Envoy's default 15 s route timeout would cut long Compress/Fetch streams.
    assert route["route"]["timeout"] == "0s"
    assert route["route"]["cluster"] == "kvpack"


# -- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_and_health_checked() -> None:
    head, stages = dockerfile_final()
    assert len(stages) >= 2, "builder + runtime"
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    assert builder.base == final.base == "${BASE_IMAGE}"
    assert any(a.startswith("BASE_IMAGE=python:") and "slim" in a for a in head)
    assert any(a == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" for a in head)
    assert any(a == "TORCH_VERSION=2.13.0" for a in head)
    runs = " ".join(r.args for r in builder.all("RUN"))
    assert 'torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    assert "pip wheel" in runs and "/wheels/kvpack-" in runs
    # The runtime copies the built venv and nothing from the build context but the probe.
    copies = final.all("COPY")
    assert any("--from=builder" in c.args and "/opt/kvpack" in c.args for c in copies)
    assert not any(r.args for r in final.all("RUN") if "pip install" in r.args)
    (user,) = final.all("USER")
    assert user.args.split(":")[0] not in {"root", "0"}
    assert final.instructions.index(user) > max(final.instructions.index(c) for c in copies)
    (health,) = final.all("HEALTHCHECK")
    assert "CMD" in health.args
    assert exec_form(health.args.split("CMD", 1)[1]) == ["kvpack-healthcheck"]
    assert any(
        c.args.endswith("deploy/healthcheck.py /usr/local/bin/kvpack-healthcheck") for c in copies
    )
    (entry,) = final.all("ENTRYPOINT")
    assert exec_form(entry.args) == ["kvpack", "serve", "--host", "0.0.0.0"]


def test_dockerfile_copies_exist_and_survive_dockerignore() -> None:
    _, stages = dockerfile_final()
    sources = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if "--from=" not in copy.args:
                sources += words[:-1]
    assert "pyproject.toml" in sources and "kvpack/" in sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: missing in the build context"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    # Every folder kvpack/ links in must reach the builder, or the wheel has dangling links.
    for link in (ROOT / "kvpack").iterdir():
        if link.is_symlink():
            target = link.resolve().relative_to(ROOT).as_posix() + "/"
            assert target in sources, f"kvpack/{link.name} links {target}, which is not copied"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/deploy/deploy_support.py"):
        assert dockerignored(heavy), heavy


# -- Grafana --------------------------------------------------------------------------------------


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    (ds_file,) = (provisioning / "datasources").glob("*.yml")
    (ds,) = load_yaml(ds_file)["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus"
    (prov_file,) = (provisioning / "dashboards").glob("*.yml")
    (provider,) = load_yaml(prov_file)["providers"]
    dash_dir = mounts[provider["options"]["path"]]
    assert (dash_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()

    dash = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == DATASOURCE_UID


def test_dashboard_covers_the_promised_panels() -> None:
    by_metric: dict[str, list[str]] = {}
    for _where, expr in dashboard_expressions():
        for name in promql_metric_names(expr):
            by_metric.setdefault(name, []).append(expr)
    fleet = "sum(rate(kvpack_input_bytes_total"
    ratio = [e for e in by_metric["kvpack_input_bytes_total"] if "kvpack_output_bytes_total" in e]
    assert any(e.startswith(fleet) for e in ratio), "fleet compression ratio"
    assert any("sum by (policy)" in e for e in ratio), "per-policy compression ratio"
    for metric in (
        "kvpack_kept_bytes_total",
        "kvpack_fetch_bytes_total",
        "kvpack_compression_ratio_bucket",
        "kvpack_reconstruction_error_bucket",
        "kvpack_stage_duration_seconds_bucket",
        "kvpack_store_bytes",
        "kvpack_store_entries",
        "kvpack_store_budget_bytes",
        "kvpack_store_evictions_total",
        "kvpack_store_errors_total",
        "kvpack_inflight_streams",
        "kvpack_build_info",
    ):
        assert metric in by_metric, metric
    requests = by_metric["kvpack_requests_total"]
    assert any("sum by (method, code)" in e for e in requests), "request rate by status"
    assert any('code!="OK"' in e for e in requests), "errors"
    latency = by_metric["kvpack_request_duration_seconds_bucket"]
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}, sum by (le, method)" in e for e in latency), q


# -- Kubernetes -----------------------------------------------------------------------------------


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def kvpack_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    every = spec.get("containers", []) + spec.get("initContainers", [])
    return [c for c in every if str(c.get("image", "")).startswith("kvpack:")]


def test_k8s_manifests_are_well_formed() -> None:
    docs = k8s_docs()
    kinds = {(p.name, d["kind"]) for p, d in docs}
    assert ("shared-service.yaml", "Deployment") in kinds
    assert ("shared-service.yaml", "Service") in kinds
    assert ("shared-service.yaml", "Secret") in kinds
    assert ("sidecar.yaml", "Deployment") in kinds
    assert ("prometheus-scrape.yaml", "ConfigMap") in kinds
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"]["name"], path
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), (path, doc["metadata"]["name"])


@pytest.mark.parametrize("manifest", ["shared-service.yaml", "sidecar.yaml"])
def test_k8s_kvpack_containers_probe_limit_and_annotate(manifest: str) -> None:
    (deployment,) = [d for p, d in k8s_docs() if p.name == manifest and d["kind"] == "Deployment"]
    spec = pod_spec(deployment)
    (container,) = kvpack_containers(spec)
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["containerPort"] for p in container["ports"]}
    grpc_port, metrics_port = int(env["KVPACK_PORT"]), int(env["KVPACK_METRICS_PORT"])
    assert ports == {grpc_port, metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container.get("args") is None and container.get("command") is None, (
        "options come from KVPACK_* env; the image entrypoint stays `kvpack serve`"
    )


def test_k8s_shared_service_wires_secrets_services_and_redis() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for p, d in k8s_docs()
        if p.name == "shared-service.yaml"
    }
    deployment = docs[("Deployment", "kvpack")]
    spec = pod_spec(deployment)
    (container,) = kvpack_containers(spec)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert deployment["spec"]["replicas"] >= 2
    assert env["KVPACK_STORE"] == "redis"
    redis_host, redis_port = re.fullmatch(
        r"redis://([\w-]+):(\d+)/\d+", env["KVPACK_REDIS_URL"]
    ).groups()  # type: ignore[union-attr]
    redis_svc = docs[("Service", redis_host)]
    assert int(redis_svc["spec"]["ports"][0]["port"]) == int(redis_port)
    assert ("StatefulSet", redis_host) in docs
    # The token file lives in a mounted Secret that the manifest defines.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    token_dir = str(Path(env["KVPACK_AUTH_TOKENS_FILE"]).parent)
    secret_name = volumes[mounts[token_dir]]["secret"]["secretName"]
    secret = docs[("Secret", secret_name)]
    assert Path(env["KVPACK_AUTH_TOKENS_FILE"]).name in secret["stringData"]
    tls_volume = next(v for v in volumes.values() if v["name"] == "tls")
    tls_secret = docs[("Secret", tls_volume["secret"]["secretName"])]
    assert {"tls.crt", "tls.key", "ca.crt"} <= tls_secret["stringData"].keys()
    # Both Services select the Deployment's pods and target its named gRPC port.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    for name in ("kvpack", "kvpack-headless"):
        svc = docs[("Service", name)]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert docs[("Service", "kvpack-headless")]["spec"]["clusterIP"] == "None"


def test_k8s_sidecar_shares_the_pod_over_localhost() -> None:
    ((_, deployment),) = [
        (p, d) for p, d in k8s_docs() if p.name == "sidecar.yaml" and d["kind"] == "Deployment"
    ]
    spec = pod_spec(deployment)
    (kvpack,) = kvpack_containers(spec)
    assert kvpack in spec["initContainers"] and kvpack["restartPolicy"] == "Always"
    others = [c for c in spec["containers"] if c is not kvpack]
    assert others, "an inference container beside kvpack"
    grpc_port = int({e["name"]: e["value"] for e in kvpack["env"]}["KVPACK_PORT"])
    addresses = [
        e["value"] for c in others for e in c.get("env", []) if e["name"] == "KVPACK_ADDRESS"
    ]
    assert addresses == [f"127.0.0.1:{grpc_port}"]


def _relabel(configs: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' keep/replace relabelling (the subset the scrape config uses)."""
    labels = dict(labels)
    for cfg in configs:
        value = cfg.get("separator", ";").join(labels.get(s, "") for s in cfg["source_labels"])
        regex = re.compile(cfg.get("regex", "(.*)"))
        m = regex.fullmatch(value)
        action = cfg.get("action", "replace")
        if action == "keep":
            if not m:
                return None
        elif action == "replace" and m:
            replacement = re.sub(r"\$(\d+)", r"\\\1", cfg.get("replacement", "$1"))
            labels[cfg["target_label"]] = m.expand(replacement)
    return labels


def test_k8s_scrape_config_keeps_annotated_pods_on_their_metrics_port() -> None:
    ((_, configmap),) = [(p, d) for p, d in k8s_docs() if p.name == "prometheus-scrape.yaml"]
    import yaml

    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "kvpack"  # alerts.yml's up{job="kvpack"}
    relabel = job["relabel_configs"]
    annotated = {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": "9464",
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_namespace": "kvpack",
        "__meta_kubernetes_pod_name": "kvpack-0",
    }
    for container_port in ("50051", "9464", "8000"):
        out = _relabel(relabel, {**annotated, "__address__": f"10.0.0.7:{container_port}"})
        assert out is not None
        assert out["__address__"] == "10.0.0.7:9464" and out["__metrics_path__"] == "/metrics"
    plain = {
        **annotated,
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "",
        "__address__": "10.0.0.8:8080",
    }
    assert _relabel(relabel, plain) is None


# -- the PromQL name extraction the live checks rely on -------------------------------------------


def test_promql_metric_names_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, method) (rate(kvpack_request_duration_seconds_bucket"
        '{instance=~"$instance", code!="OK"}[$__rate_interval])))'
        " / on (method) group_left sum without (x) (up offset 1d) > bool 1e-3"
    )
    assert promql_metric_names(expr) == {"kvpack_request_duration_seconds_bucket", "up"}
    assert promql_label_matchers(expr) == [
        ("kvpack_request_duration_seconds_bucket", "instance"),
        ("kvpack_request_duration_seconds_bucket", "code"),
    ]
    assert promql_metric_names("label_values(kvpack_build_info, instance)") == {"kvpack_build_info"}
    # Every expression shipped names at least one series (an empty set means the lexer broke).
    for where, e in dashboard_expressions() + rule_expressions():
        assert promql_metric_names(e), where


def test_deploy_tree_has_no_stray_files() -> None:
    """Everything under deploy/ is referenced by a check (so nothing ships unchecked)."""
    checked = {
        DOCKERFILE,
        HEALTHCHECK,
        ENVOY,
        PROMETHEUS,
        ALERTS,
        ALERTS_TEST,
        DASHBOARD,
        *GRAFANA.rglob("*.yml"),
        *K8S.glob("*.yaml"),
    }
    present = {p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present <= {p.resolve() for p in checked} | checked, sorted(present - checked)


@pytest.mark.slow
def test_builder_stage_context_builds_the_full_wheel(tmp_path: Path) -> None:
    """The builder's `pip wheel .` from exactly what its COPY lines bring in (after .dockerignore,
    symlinks kept as Docker keeps them) yields a wheel with every sub-package."""
    _, stages = dockerfile_final()
    context = tmp_path / "src"
    context.mkdir()
    for copy in stages[0].all("COPY"):
        if "--from=" in copy.args:
            continue
        words = [w for w in copy.args.split() if not w.startswith("--")]
        for src in words[:-1]:
            source = ROOT / src
            if source.is_dir():

                def ignore(directory: str, names: list[str]) -> set[str]:
                    rel = Path(directory).relative_to(ROOT)
                    return {n for n in names if dockerignored((rel / n).as_posix())}

                shutil.copytree(source, context / src, symlinks=True, ignore=ignore)
            else:
                shutil.copy2(source, context / src)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels")]
    if _has_setuptools(77):  # offline and faster; else pip fetches the build backend
        cmd.append("--no-build-isolation")
    subprocess.run(
        [*cmd, str(context)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "wheels").glob("kvpack-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for module in (
        "kvpack/cli.py",
        "kvpack/server/app.py",
        "kvpack/server/stores/redis.py",
        "kvpack/codec/container.py",
        "kvpack/client/sync.py",
        "kvpack/v1/kvpack_pb2.py",
    ):
        assert module in names, module
    assert not any("__pycache__" in n for n in names)


def _has_setuptools(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except importlib.metadata.PackageNotFoundError:
        return False
