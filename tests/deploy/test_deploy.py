"""Offline validation of everything under deploy/.

- docker-compose.yml: against the vendored Compose Specification schema, plus structure
  (`docker compose config` too when the CLI plugin is there);
- k8s manifests: against the Kubernetes OpenAPI schemas bundled by kubernetes-validate (strict),
  plus cross-references (selectors, Secret/ConfigMap/PVC names, probes, non-root);
- Grafana dashboard: JSON, panels, and every query uses only the service's metric names;
- Prometheus config and rules: structure, plus `promtool check`/`promtool test rules` when a
  promtool binary is found (deploy/scripts/fetch-tools.sh fetches one);
- nginx: upstreams match the compose replicas, plus `nginx -t` when an nginx binary is found;
- Dockerfile and entrypoint: non-root, no torch, HEALTHCHECK, argument handling.

No network, no Docker engine; the whole module runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
TOOLS = DEPLOY / ".tools"

# The service's metrics (name -> labels). Histograms also expose _bucket/_sum/_count.
METRICS = {
    "mixer_requests_total": {"route", "method", "status"},
    "mixer_request_duration_seconds": {"route"},
    "mixer_tokens_served_total": {"job", "source"},
    "mixer_batches_served_total": {"job"},
    "mixer_repetition_count": {"job", "source", "quantile"},
    "mixer_schedule_version": {"job"},
    "mixer_store_up": set(),
    "mixer_trained_step": {"job"},
    "mixer_served_high_water": {"job"},
    "mixer_faults_total": {"fault"},
    "mixer_shard_cache": {"stat"},
    "mixer_forecast_steps_to_overfit": {"job", "source"},
}
HISTOGRAMS = {"mixer_request_duration_seconds"}
SERIES_NAMES = {name for name in METRICS if name not in HISTOGRAMS} | {
    f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
REPETITION_CAP = 64
REPLICAS = ("mixer-1", "mixer-2")
K8S_MIN_VERSION = (1, 29)


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def find_tool(name: str, env_var: str, extracted: str) -> str | None:
    """A tool from $ENV_VAR, PATH, or deploy/.tools (see deploy/scripts/fetch-tools.sh)."""
    candidates = [os.environ.get(env_var), shutil.which(name), str(TOOLS / extracted)]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# PromQL helpers


PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}


def promql_series_names(expr: str) -> set[str]:
    """Metric (series) names referenced by a PromQL expression.

    Removes string literals, label matchers, range/subquery brackets, grouping clauses,
    Grafana variables and durations; what is left that is an identifier not followed by "(" and
    not a keyword is a metric name.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        ident, call = match.group(1), match.group(2)
        if call or ident.lower() in PROMQL_KEYWORDS:
            continue
        names.add(ident)
    return names


def promql_label_matchers(expr: str) -> list[tuple[str, str]]:
    """(metric, label) pairs for every `metric{label...}` selector."""
    pairs = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)):
            pairs.append((match.group(1), label))
    return pairs


def test_promql_helpers():
    expr = (
        "histogram_quantile(0.99, sum by (route, le) "
        '(rate(mixer_request_duration_seconds_bucket{route=~"$r"}[$__rate_interval]))) > 0.05'
    )
    assert promql_series_names(expr) == {"mixer_request_duration_seconds_bucket"}
    assert promql_series_names('max without (instance) (up{job="x"}) and on(job) foo') == {"up", "foo"}
    assert promql_label_matchers('mixer_repetition_count{job=~"$job", quantile="1"}') == [
        ("mixer_repetition_count", "job"),
        ("mixer_repetition_count", "quantile"),
    ]


def base_metric(series: str) -> str:
    for h in HISTOGRAMS:
        if series.startswith(h):
            return h
    return series


# --------------------------------------------------------------------------------------------
# docker compose


@pytest.fixture(scope="module")
def compose():
    return load_yaml(DEPLOY / "docker-compose.yml")


def parse_volume(spec: str) -> tuple[str, str, str]:
    """Short-syntax volume "SOURCE:TARGET[:MODE]" -> (source, target, mode); SOURCE may hold ${VAR:-x}."""
    vars_ = re.findall(r"\$\{[^}]*\}", spec)
    masked = re.sub(r"\$\{[^}]*\}", "\x00", spec)
    parts = masked.split(":")
    assert 2 <= len(parts) <= 3, spec
    it = iter(vars_)
    source = re.sub("\x00", lambda _: next(it), parts[0])
    return source, parts[1], parts[2] if len(parts) == 3 else "rw"


def test_parse_volume():
    assert parse_volume("${X:-../a}:/data/sources:ro") == ("${X:-../a}", "/data/sources", "ro")
    assert parse_volume("vol:/data") == ("vol", "/data", "rw")


def test_compose_matches_compose_spec_schema(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_garbage():
    """Guard that the vendored schema really constrains services."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert not validator.is_valid({"services": {"a": {"image": "x", "no_such_key": 1}}})
    assert not validator.is_valid({"services": {"a": {"ports": "8000:8000"}}})


def test_compose_docker_cli_config_if_available():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip("`docker compose` plugin not available here (validated against the schema instead)")
    env = dict(
        os.environ, MIXER_OPERATOR_TOKEN="t-op", MIXER_READER_TOKEN="t-read", GRAFANA_ADMIN_PASSWORD="pw"
    )
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_and_topology(compose):
    services = compose["services"]
    assert {"redis", *REPLICAS, "lb", "prometheus", "grafana"} <= set(services)

    for name in REPLICAS:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        ).resolve()
        env = svc["environment"]
        assert env["MIXER_REDIS_URL"] == "redis://redis:6379/0", "replicas must share one Redis"
        for token in ("MIXER_OPERATOR_TOKEN", "MIXER_READER_TOKEN"):
            # required from the environment / .env, never a default baked into the file
            assert re.fullmatch(r"\$\{" + token + r":\?[^}]+\}", env[token]), env[token]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "8000" in [str(p) for p in svc.get("expose", [])]
        assert "ports" not in svc, "replicas are reached through the load balancer only"
        targets = {parse_volume(v)[1]: parse_volume(v) for v in svc["volumes"]}
        assert targets["/data/sources"][2] == "ro", "sources must be read-only"
        assert "/v1/ready" in " ".join(svc["healthcheck"]["test"])

    # same sources mount in both replicas; distinct state volumes
    mounts = [{parse_volume(v)[1]: parse_volume(v)[0] for v in services[r]["volumes"]} for r in REPLICAS]
    assert mounts[0]["/data/sources"] == mounts[1]["/data/sources"]
    assert mounts[0]["/data/state"] != mounts[1]["/data/state"]

    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    lb = services["lb"]
    assert lb["image"].startswith("nginx")
    assert any(v.startswith("./nginx/nginx.conf:/etc/nginx/nginx.conf") for v in lb["volumes"])
    assert {r: {"condition": "service_healthy"} for r in REPLICAS} == lb["depends_on"]

    prom = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]

    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert any(
        v.startswith("./grafana/mixer-dashboard.json:/var/lib/grafana/dashboards/mixer/")
        for v in grafana["volumes"]
    )

    named = set(compose.get("volumes", {}))
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = parse_volume(vol)[0]
            if src.startswith((".", "/", "$")):
                if src.startswith("."):
                    assert (DEPLOY / src).exists(), f"bind mount source missing: {src}"
            else:
                assert src in named, f"undeclared named volume {src}"


def test_compose_env_example_covers_required_variables():
    text = (DEPLOY / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = (DEPLOY / ".env.example").read_text()
    defined = set(re.findall(r"^(\w+)=", example, flags=re.M))
    assert required and required <= defined


# --------------------------------------------------------------------------------------------
# nginx


def nginx_conf() -> str:
    return (DEPLOY / "nginx" / "nginx.conf").read_text()


def test_nginx_upstream_lists_both_replicas():
    conf = nginx_conf()
    upstream = re.search(r"upstream\s+mixer\s*\{(.*?)\}", conf, flags=re.S)
    assert upstream
    servers = re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream.group(1), flags=re.M)
    assert sorted(servers) == sorted(f"{r}:8000" for r in REPLICAS)
    assert re.search(r"proxy_pass\s+http://mixer;", conf)
    assert conf.count("{") == conf.count("}")
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    listen = re.search(r"listen\s+(\d+);", conf).group(1)
    assert compose["services"]["lb"]["ports"][0].endswith(f":{listen}")


def test_nginx_config_syntax_with_nginx_t(tmp_path):
    nginx = find_tool("nginx", "NGINX", "usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx binary not found (run deploy/scripts/fetch-tools.sh or set NGINX)")
    # The replica hostnames only resolve inside the compose network: point them at loopback.
    conf = nginx_conf()
    for i, replica in enumerate(REPLICAS):
        conf = conf.replace(f"{replica}:8000", f"127.0.0.1:{18001 + i}")
    conf = conf.replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-e",
            str(tmp_path / "error.log"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if result.returncode != 0 and "-e" in result.stderr and "invalid option" in result.stderr:
        result = subprocess.run(
            [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Kubernetes


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path.name, doc) for doc in load_yaml_all(path))
    return docs


def k8s_versions() -> list[str]:
    kv_utils = pytest.importorskip("kubernetes_validate.utils")

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:2])

    shipped = sorted(set(kv_utils.all_versions()), key=key)
    supported = [v for v in shipped if key(v) >= K8S_MIN_VERSION]
    if not supported:
        pytest.skip(f"kubernetes-validate ships no schemas >= {K8S_MIN_VERSION}: {shipped}")
    return sorted({supported[0], supported[-1]}, key=key)


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


def test_k8s_manifests_validate_against_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= kinds
    failures = []
    for version in k8s_versions():
        for filename, doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError, ...
                failures.append(
                    f"{filename} {doc.get('kind')}/{doc['metadata'].get('name')} @ {version}: "
                    f"{getattr(exc, 'message', exc)}"
                )
    assert not failures, "\n".join(failures)


def test_k8s_validation_catches_errors():
    kv = pytest.importorskip("kubernetes_validate")
    version = k8s_versions()[-1]
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "not-a-number"}]},
    }
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_k8s_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def mixer_deployment() -> dict:
    return by_kind("Deployment")["mixer"]


def test_k8s_mixer_deployment():
    dep = mixer_deployment()
    spec = dep["spec"]
    assert spec["replicas"] == 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert "torch" not in container["image"]
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8000)
    res = container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    for kind in ("requests", "limits"):
        assert re.fullmatch(r"\d+(\.\d+)?m?", str(res[kind]["cpu"])), res[kind]["cpu"]
        assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti|k|M|G|T)?", str(res[kind]["memory"])), res[kind]["memory"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]

    env_from = container["envFrom"]
    secret_refs = {e["secretRef"]["name"] for e in env_from if "secretRef" in e}
    config_refs = {e["configMapRef"]["name"] for e in env_from if "configMapRef" in e}
    secrets, configmaps = by_kind("Secret"), by_kind("ConfigMap")
    assert secret_refs and secret_refs <= set(secrets)
    assert config_refs and config_refs <= set(configmaps)
    provided = set()
    for name in secret_refs:
        provided |= set(secrets[name].get("stringData", {})) | set(secrets[name].get("data", {}))
    for name in config_refs:
        provided |= set(configmaps[name]["data"])
    assert {"MIXER_OPERATOR_TOKEN", "MIXER_READER_TOKEN", "MIXER_REDIS_URL"} <= provided
    # tokens come from the Secret, not the ConfigMap
    for name in config_refs:
        assert not {"MIXER_OPERATOR_TOKEN", "MIXER_READER_TOKEN"} & set(configmaps[name]["data"])

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data/sources"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts["/data/sources"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind("PersistentVolumeClaim")
    if sc.get("readOnlyRootFilesystem"):
        assert "/data/state" in mounts and "/tmp" in mounts, "writable dirs need volumes"


def test_k8s_secret_tokens_are_marked_placeholders():
    secret = by_kind("Secret")["mixer-tokens"]
    for key in ("MIXER_OPERATOR_TOKEN", "MIXER_READER_TOKEN"):
        assert "REPLACE_ME" in secret["stringData"][key]
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text().splitlines()[0]


def test_k8s_services_select_their_pods():
    deployments = by_kind("Deployment")
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        targets = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} deployments"
        (container,) = targets[0]["spec"]["template"]["spec"]["containers"]
        ports = container["ports"]
        port_names = {p["name"] for p in ports} | {p["containerPort"] for p in ports}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    assert by_kind("Service")["mixer"]["spec"]["ports"][0]["port"] == 8000


def test_k8s_redis_and_configmap_agree():
    redis_url = by_kind("ConfigMap")["mixer-config"]["data"]["MIXER_REDIS_URL"]
    match = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", redis_url)
    assert match
    svc = by_kind("Service")[match.group(1)]
    assert int(match.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
    assert "mixer-redis" in by_kind("Deployment")


def test_k8s_hpa_targets_deployment_on_cpu():
    hpa = by_kind("HorizontalPodAutoscaler")["mixer"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "mixer")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]


def test_k8s_sources_pvc():
    pvc = by_kind("PersistentVolumeClaim")["mixer-sources"]
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, "shared by all replicas"


# --------------------------------------------------------------------------------------------
# Grafana


@pytest.fixture(scope="module")
def dashboard():
    return json.loads((GRAFANA / "mixer-dashboard.json").read_text())


def all_panels(dashboard) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_panels_query_only_known_metrics(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels:
        targets = [t for t in panel.get("targets", []) if t.get("expr")]
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            names = promql_series_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            assert names <= SERIES_NAMES, f"{panel['title']}: unknown metrics {names - SERIES_NAMES}"
            for metric, label in promql_label_matchers(target["expr"]):
                assert label in METRICS[base_metric(metric)] | {"instance", "le"}, (metric, label)
        for grid_key in ("h", "w", "x", "y"):
            assert grid_key in panel["gridPos"]


def test_dashboard_covers_required_views(dashboard):
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    joined = "\n".join(exprs)
    assert re.search(r"rate\(mixer_requests_total", joined), "request rate"
    assert re.search(r"histogram_quantile\(0\.5,.*mixer_request_duration_seconds_bucket", joined), "p50"
    assert re.search(r"histogram_quantile\(0\.99,.*mixer_request_duration_seconds_bucket", joined), "p99"
    per_source = [e for e in exprs if "by (source)" in e and "rate(mixer_tokens_served_total" in e]
    assert per_source, "tokens/s per source"
    assert any("mixer_repetition_count" in e and "quantile" in e for e in exprs), "repetition quantiles"
    for metric in ("mixer_schedule_version", "mixer_trained_step", "mixer_store_up"):
        assert metric in joined


def test_dashboard_uses_provisioned_datasource(dashboard):
    provisioning = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = provisioning["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    uid = datasource["uid"]
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match and match.group(1) in SERIES_NAMES
            assert match.group(2) in METRICS[base_metric(match.group(1))]

    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mixer.yml")["providers"]
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    grafana_volumes = compose["services"]["grafana"]["volumes"]
    mounted = [parse_volume(v)[1] for v in grafana_volumes if "mixer-dashboard.json" in v]
    assert any(m.startswith(p["options"]["path"].rstrip("/") + "/") for p in providers for m in mounted)


# --------------------------------------------------------------------------------------------
# Prometheus


@pytest.fixture(scope="module")
def alert_rules() -> dict[str, dict]:
    doc = load_yaml(PROM / "alerts.yml")
    rules = {}
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert rule["alert"] not in rules
            rules[rule["alert"]] = rule
    return rules


def test_prometheus_config_scrapes_both_replicas_and_loads_rules():
    cfg = load_yaml(PROM / "prometheus.yml")
    assert "alerts.yml" in cfg["rule_files"]
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file()
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "mixer"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["honor_labels"] is True, "keep the service's own `job` label"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{r}:8000" for r in REPLICAS)
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    assert set(REPLICAS) <= set(compose["services"])


def test_alert_rules_structure(alert_rules):
    for name, rule in alert_rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        names = promql_series_names(rule["expr"])
        assert names, name
        assert names <= SERIES_NAMES | {"up"}, (name, names)


def test_required_alerts(alert_rules):
    down = alert_rules["MixerReplicaDown"]
    assert re.fullmatch(r'up\{job="mixer"\}\s*==\s*0', down["expr"].strip())

    latency = alert_rules["MixerHighP99Latency"]
    expr = " ".join(latency["expr"].split())
    assert "histogram_quantile(0.99," in expr and "mixer_request_duration_seconds_bucket" in expr
    assert expr.endswith("> 0.05")
    assert latency["for"] == "5m"

    store = alert_rules["MixerStoreUnreachable"]
    assert re.fullmatch(r"mixer_store_up\s*==\s*0", store["expr"].strip())

    rep = alert_rules["MixerRepetitionCapExceeded"]
    assert 'mixer_repetition_count{quantile="1"}' in rep["expr"]
    cap = re.search(r">\s*(\d+)\s*$", rep["expr"].strip())
    assert cap and int(cap.group(1)) == REPETITION_CAP
    assert str(REPETITION_CAP) in rep["annotations"]["description"]
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert f"{REPETITION_CAP}" in docs and "MixerRepetitionCapExceeded" in docs


def test_alert_unit_tests_cover_every_alert(alert_rules):
    tests = load_yaml(PROM / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    assert tested == set(alert_rules)


@pytest.fixture(scope="module")
def promtool():
    path = find_tool("promtool", "PROMTOOL", "usr/bin/promtool")
    if path is None:
        pytest.skip(
            "promtool not found (run deploy/scripts/fetch-tools.sh or set PROMTOOL); "
            "structural checks still ran"
        )
    return path


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(promtool, args):
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30, cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# Dockerfile and entrypoint


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "dangling line continuation"
    out = []
    for line in logical:
        instr, _, rest = line.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile():
    instrs = dockerfile_instructions()
    known = {
        "FROM",
        "ARG",
        "ENV",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "EXPOSE",
        "VOLUME",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
    }
    assert {i for i, _ in instrs} <= known
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*|pip show torch|torch must not", "", text)

    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for i, rest in instrs if i == "ARG" and "=" in rest)
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest).split()[0]
        for i, rest in instrs
        if i == "FROM"
    ]
    assert froms and all(f == "python:3.11-slim" for f in froms)

    runs = " ".join(rest for i, rest in instrs if i == "RUN")
    assert re.search(r"pip install \"?\.\[server\]\"?", runs)

    # instructions of the final stage
    last_from = max(n for n, (i, _) in enumerate(instrs) if i == "FROM")
    final = instrs[last_from:]
    users = [rest for i, rest in final if i == "USER"]
    assert users, "final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert ("EXPOSE", "8000") in final
    (healthcheck,) = [rest for i, rest in final if i == "HEALTHCHECK"]
    assert "/v1/health" in healthcheck and "CMD" in healthcheck
    (entrypoint,) = [rest for i, rest in final if i == "ENTRYPOINT"]
    entry_cmd = json.loads(entrypoint)
    copies = [rest for i, rest in final if i == "COPY" and "deploy/entrypoint.sh" in rest]
    assert copies and copies[0].split()[-1] == entry_cmd[0]


def test_dockerignore_keeps_context_small():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list style"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "mixer_service", "deploy/entrypoint.sh"} <= allowed
    assert not {".venv", ".git", "data"} & allowed


@pytest.fixture()
def fake_mixer(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mixer"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def run_entrypoint(bin_dir: Path, *args: str, redis_url: str | None = None) -> list[str]:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh")
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    if redis_url is not None:
        env["MIXER_REDIS_URL"] = redis_url
    result = subprocess.run(
        [sh, str(DEPLOY / "entrypoint.sh"), *args], capture_output=True, text=True, env=env, timeout=10
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


BASE_ARGS = [
    "serve",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--sources-dir",
    "/data/sources",
    "--state-dir",
    "/data/state",
]


def test_entrypoint_is_executable_and_valid_sh():
    path = DEPLOY / "entrypoint.sh"
    assert path.read_text().startswith("#!/bin/sh")
    assert os.access(path, os.X_OK)
    sh = shutil.which("sh")
    if sh:
        assert subprocess.run([sh, "-n", str(path)], timeout=10).returncode == 0


def test_entrypoint_without_redis(fake_mixer):
    assert run_entrypoint(fake_mixer) == BASE_ARGS
    assert run_entrypoint(fake_mixer, redis_url="") == BASE_ARGS


def test_entrypoint_with_redis_and_extra_options(fake_mixer):
    url = "redis://:p@ss w0rd@redis:6379/0"
    assert run_entrypoint(fake_mixer, redis_url=url) == [*BASE_ARGS, "--redis-url", url]
    assert run_entrypoint(fake_mixer, "--log-level", "debug", redis_url=url) == [
        *BASE_ARGS,
        "--redis-url",
        url,
        "--log-level",
        "debug",
    ]


def test_entrypoint_runs_other_commands(fake_mixer):
    assert run_entrypoint(fake_mixer, "mixer", "--help") == ["--help"]
