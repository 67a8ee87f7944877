"""deploy/: what can be checked without helm (not installable here: no Debian package, no PyPI
build) and without a cluster: the chart's values against its templates, the alert rules and the
dashboard against the metrics the server really exports, the Dockerfiles against the tree."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
