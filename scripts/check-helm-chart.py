#!/usr/bin/env python3
"""Renders helm/switchyard with several value sets (Helm Go library via helm-python-sdk), lints it
strictly, validates every rendered manifest against the Kubernetes 1.30 schemas with
kubernetes-validate --strict, and checks that invalid values are refused.

Run with the venv that scripts/install-deps.sh creates: target/py/bin/python scripts/check-helm-chart.py
Exit status 0 when every check passes; prints one line per check.
"""
import os
import subprocess
import sys
import tempfile

import yaml
import helm_python as helm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "switchyard")
KUBE = "1.30"
VALIDATE = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"

# name -> (values, checks on the rendered objects)
VALUE_SETS = {
    "defaults": {},
    "external-etcd": {
        "etcd": {"enabled": False},
        "store": {"externalEndpoints": ["etcd-a.infra:2379", "etcd-b.infra:2379"], "prefix": "/prod/switchyard"},
    },
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "tls": {"tls": {"enabled": True, "cert": PEM_CERT, "key": PEM_KEY, "ca": PEM_CERT}},
    "tls-existing-secret": {"tls": {"enabled": True, "existingSecret": "my-tls"}, "adminToken": {"existingSecret": "my-admin"}},
    "large": {
        "etcd": {"replicas": 3, "persistence": {"enabled": False}},
        "workers": {"replicas": 8, "gpusPerWorker": 2, "topologyLabel": "topology.kubernetes.io/zone",
                    "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
        "placement": {"fixed": "{\"ranks\": 8}", "replicas": 16},
        "telemetry": {"otlpEndpoint": "http://otel-collector:4317"},
        "coordinator": {"service": {"type": "LoadBalancer"}},
    },
    "cpu": {"workers": {"gpusPerWorker": 0, "device": "cpu", "transport": "tcp"}},
}

# Values that the schema (or the templates) must refuse.
INVALID = {
    "replicas-not-int": {"coordinator": {"replicas": "two"}},
    "unknown-key": {"workers": {"gpus": 1}},
    "bad-dtype": {"model": {"dtype": "int3"}},
    "external-etcd-without-endpoints": {"etcd": {"enabled": False}},
    "tls-without-cert": {"tls": {"enabled": True}},
    "bad-port": {"coordinator": {"grpcPort": 70000}},
}

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")
    if not ok:
        failures.append(name)


def objects(manifests):
    out = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


def container_args(objs, kind, suffix):
    for _, o in objs:
        if o["kind"] == kind and o["metadata"]["name"].endswith(suffix):
            c = o["spec"]["template"]["spec"]["containers"][0]
            return c.get("command", []) + c.get("args", []), o
    raise AssertionError(f"no {kind} *{suffix}")


def semantic_checks(name, objs):
    kinds = [o["kind"] for _, o in objs]
    cargs, coord = container_args(objs, "Deployment", "-coordinator")
    wargs, workers = container_args(objs, "StatefulSet", "-worker")
    check(f"{name}: coordinator Deployment has 2 replicas", coord["spec"]["replicas"] == 2)
    check(f"{name}: commands are switchyard coordinator/worker", cargs[:2] == ["switchyard", "coordinator"] and wargs[:2] == ["switchyard", "worker"])
    store = [a for a in cargs if a.startswith("--store=etcd://")]
    check(f"{name}: coordinator gets --store etcd://", len(store) == 1, str(cargs))
    check(f"{name}: worker gets the same --store", store and store[0] in wargs)
    vals = VALUE_SETS[name]
    wv = vals.get("workers", {})
    gpus = wv.get("gpusPerWorker", 1)
    res = workers["spec"]["template"]["spec"]["containers"][0]["resources"]
    if gpus:
        check(f"{name}: workers request {gpus} GPU(s)", res["limits"].get("nvidia.com/gpu") == gpus and res["requests"].get("nvidia.com/gpu") == gpus, str(res))
    else:
        check(f"{name}: CPU workers request no GPU", "nvidia.com/gpu" not in res.get("limits", {}))
    check(f"{name}: workers carry node topology (--node)", "--node=$(NODE_NAME)" in wargs)
    if vals.get("etcd", {}).get("enabled", True):
        check(f"{name}: bundled etcd StatefulSet", any(o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd") for _, o in objs))
    else:
        check(f"{name}: no bundled etcd with external endpoints", not any(o["metadata"]["name"].endswith("-etcd") for _, o in objs))
        check(f"{name}: external endpoints in --store", "etcd-a.infra:2379,etcd-b.infra:2379/prod/switchyard" in store[0])
    check(f"{name}: ServiceMonitor iff enabled", ("ServiceMonitor" in kinds) == vals.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False))
    tls = vals.get("tls", {}).get("enabled", False)
    check(f"{name}: --tls-cert iff TLS", any(a.startswith("--tls-cert=") for a in cargs) == tls and any(a.startswith("--tls-cert=") for a in wargs) == tls)
    check(f"{name}: ConfigMap and admin Secret (or existing)", "ConfigMap" in kinds and ("Secret" in kinds or vals.get("adminToken", {}).get("existingSecret")))


def validate(name, objs):
    core = [(p, o) for p, o in objs if o["apiVersion"] != "monitoring.coreos.com/v1"]
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, f"{name}.yaml")
        with open(f, "w") as fh:
            yaml.safe_dump_all([o for _, o in core], fh)
        r = subprocess.run([VALIDATE, "--strict", "-k", KUBE, "--quiet", f], capture_output=True, text=True)
        check(f"{name}: {len(core)} manifests valid for Kubernetes {KUBE} (strict)", r.returncode == 0, r.stdout + r.stderr)
    # The ServiceMonitor is a CRD outside the bundled schemas: check its shape here.
    for _, o in objs:
        if o["kind"] == "ServiceMonitor":
            ep = o["spec"]["endpoints"][0]
            ok = o["apiVersion"] == "monitoring.coreos.com/v1" and ep["port"] == "metrics" and ep["path"] == "/metrics" \
                and o["spec"]["selector"]["matchLabels"].get("switchyard.io/metrics") == "true"
            check(f"{name}: ServiceMonitor shape", ok, str(o))
            scraped = [s for _, s in objs if s["kind"] == "Service" and s["metadata"]["labels"].get("switchyard.io/metrics") == "true"]
            check(f"{name}: ServiceMonitor selects coordinator and worker metrics Services",
                  len(scraped) == 2 and all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in scraped))


def leaves(v, path=()):
    # Resource maps are documented as a whole.
    if isinstance(v, dict) and v and path[-1:] != ("resources",):
        for k, x in v.items():
            yield from leaves(x, path + (k,))
    else:
        yield ".".join(path)


def documentation_checks():
    with open(os.path.join(CHART, "values.yaml")) as fh:
        values = yaml.safe_load(fh)
    with open(os.path.join(CHART, "README.md")) as fh:
        readme = fh.read()
    missing = [k for k in leaves(values) if f"| `{k}` |" not in readme]
    check("every value is documented in the chart README", not missing, str(missing))


def main():
    chart = helm.Chart.load(CHART)
    documentation_checks()
    for name, vals in VALUE_SETS.items():
        rep = helm.lint(CHART, vals, strict=True, kube_version="v1.30.0")
        errs = [m for m in rep.get("messages", []) if m.get("severity", 0) >= 2] + rep.get("errors", [])
        check(f"{name}: helm lint --strict", not errs, str(errs))
        try:
            manifests = chart.render(vals, name="sy", namespace="serving", is_install=True)
        except helm.HelmError as e:
            check(f"{name}: render", False, str(e))
            continue
        check(f"{name}: NOTES.txt renders", any(p.endswith("NOTES.txt") and "switchyard generate" in t for p, t in manifests.items()))
        objs = objects(manifests)
        validate(name, objs)
        try:
            semantic_checks(name, objs)
        except (AssertionError, KeyError, IndexError, TypeError) as e:
            check(f"{name}: semantic checks", False, repr(e))
    for name, vals in INVALID.items():
        # Through a values file, as `helm lint -f bad.yaml` would read it.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            yaml.safe_dump(vals, fh)
            fh.flush()
            with open(fh.name) as rd:
                vals = helm.values_from_yaml(rd.read())
        rep = helm.lint(CHART, vals, strict=True, kube_version="v1.30.0")
        errs = [m for m in rep.get("messages", []) if m.get("severity", 0) >= 3] + rep.get("errors", [])
        try:
            chart.render(vals, name="sy", namespace="serving")
            rendered = True
        except helm.HelmError:
            rendered = False
        check(f"invalid values {name}: lint fails and render refuses", bool(errs) and not rendered, str(rep))
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all helm chart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
