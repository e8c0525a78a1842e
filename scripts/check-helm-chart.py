#!/usr/bin/env python3
"""Renders helm/switchyard with several value sets (Helm Go library via helm-python-sdk), lints it
strictly, validates every rendered manifest against the Kubernetes 1.30 schemas with
kubernetes-validate --strict, checks that invalid values are refused, and checks the rendered
commands against the real binary: every `--flag` a `switchyard <sub>` container passes must be in
`switchyard <sub> --help`, every SWITCHYARD_*/OTEL_* variable it sets must be one the binary reads,
the subcommand's required flags must be given, and every $(VAR) in its args must be defined.

Run with the venv that scripts/install-deps.sh creates:
  target/py/bin/python scripts/check-helm-chart.py [--switchyard-bin target/release/switchyard]
(default: $SWITCHYARD_BIN, else target/release/switchyard). Exit status 0 when every check
passes; prints one line per check, and a summary of the flags the binary lacks.
"""
import argparse
import os
import re
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
        "workers": {"replicas": 8, "gpusPerWorker": 2, "gpu": 1, "transportTimeoutSeconds": 600,
                    "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "model": {"volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
        "placement": {"fixed": "{\"format\": \"switchyard.placement.v1\"}"},
        "telemetry": {"otlpEndpoint": "http://otel-collector:4317"},
        "coordinator": {"service": {"type": "LoadBalancer"}, "expectedWorkers": 8, "leaseTtlSeconds": 10},
    },
    "cpu": {"transport": "tcp", "workers": {"gpusPerWorker": 0}},
    "no-http": {"coordinator": {"httpPort": None}},
}

# Values that the schema (or the templates) must refuse.
INVALID = {
    "replicas-not-int": {"coordinator": {"replicas": "two"}},
    "unknown-key": {"workers": {"gpus": 1}},
    "removed-key": {"workers": {"device": "cuda"}},
    "bad-transport": {"transport": "rdma"},
    "external-etcd-without-endpoints": {"etcd": {"enabled": False}},
    "tls-without-cert": {"tls": {"enabled": True}},
    "tls-without-ca": {"tls": {"enabled": True, "cert": PEM_CERT, "key": PEM_KEY}},
    "bad-port": {"coordinator": {"grpcPort": 70000}},
}

# A value set with a flag no binary has: the flag check must catch it (a check that can fail).
BOGUS_FLAG = {"coordinator": {"extraArgs": ["--no-such-flag=1"]}, "workers": {"extraArgs": ["--id=$(POD_NAME)"]}}

# Read by the binary's tracing setup (telemetry::LOG_ENV), not a clap argument.
EXTRA_ENV = {"SWITCHYARD_LOG"}

failures = []
missing_flags = {}  # subcommand -> flags the chart passes that the binary's --help lacks


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


def env_names(container):
    return [e["name"] for e in container.get("env", [])]


def env_of(container, name):
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def semantic_checks(name, objs):
    kinds = [o["kind"] for _, o in objs]
    cargs, coord = container_args(objs, "Deployment", "-coordinator")
    wargs, workers = container_args(objs, "StatefulSet", "-worker")
    cc = coord["spec"]["template"]["spec"]["containers"][0]
    wc = workers["spec"]["template"]["spec"]["containers"][0]
    vals = VALUE_SETS[name]
    check(f"{name}: coordinator Deployment has 2 replicas", coord["spec"]["replicas"] == 2)
    check(f"{name}: commands are switchyard coordinator/worker", cargs[:2] == ["switchyard", "coordinator"] and wargs[:2] == ["switchyard", "worker"])
    store = [a for a in cargs if a.startswith("--store=etcd://")]
    check(f"{name}: coordinator gets --store etcd://", len(store) == 1, str(cargs))
    check(f"{name}: worker gets the same --store", store and store[0] in wargs)
    check(f"{name}: coordinator --model is model.path, workers get no --model",
          f"--model={vals.get('model', {}).get('path', '/models/mixtral-8x7b')}" in cargs and not any(a.startswith("--model") for a in wargs))
    check(f"{name}: coordinator --transport", f"--transport={vals.get('transport', 'nccl')}" in cargs, str(cargs))
    want_workers = vals.get("coordinator", {}).get("expectedWorkers") or vals.get("workers", {}).get("replicas", 2)
    check(f"{name}: coordinator --workers", f"--workers={want_workers}" in cargs, str(cargs))
    check(f"{name}: coordinator advertises its pod IP", "--advertise=$(POD_IP):50051" in cargs, str(cargs))
    tok = env_of(cc, "SWITCHYARD_ADMIN_TOKEN")
    want_secret = vals.get("adminToken", {}).get("existingSecret") or "sy-switchyard-admin"
    check(f"{name}: admin token from the Secret as SWITCHYARD_ADMIN_TOKEN, not in args",
          tok is not None and tok.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == want_secret
          and not any("admin-token" in a for a in cargs), str(tok))
    check(f"{name}: log filter as SWITCHYARD_LOG", all(env_of(c, "SWITCHYARD_LOG") for c in (cc, wc)) and not any(env_of(c, "RUST_LOG") for c in (cc, wc)))
    check(f"{name}: worker --coordinator is the coordinator Service", "--coordinator=sy-switchyard.serving.svc:50051" in wargs, str(wargs))
    check(f"{name}: worker advertises its pod DNS name (gRPC and transport)",
          "--advertise=$(POD_NAME).sy-switchyard-worker.serving.svc:50061" in wargs
          and "--transport-advertise=$(POD_NAME).sy-switchyard-worker.serving.svc:50062" in wargs, str(wargs))
    fixed = bool(vals.get("placement", {}).get("fixed"))
    check(f"{name}: --placement from the ConfigMap iff placement.fixed",
          ("--placement=/etc/switchyard/config/placement.json" in cargs) == fixed and ("ConfigMap" in kinds) == fixed)
    wv = vals.get("workers", {})
    gpus = wv.get("gpusPerWorker", 1)
    res = wc["resources"]
    if gpus:
        check(f"{name}: workers request {gpus} GPU(s)", res["limits"].get("nvidia.com/gpu") == gpus and res["requests"].get("nvidia.com/gpu") == gpus, str(res))
        check(f"{name}: worker --gpu", f"--gpu={wv.get('gpu', 0)}" in wargs, str(wargs))
    else:
        check(f"{name}: CPU workers request no GPU", "nvidia.com/gpu" not in res.get("limits", {}) and not any(a.startswith("--gpu") for a in wargs))
    check(f"{name}: workers carry node topology (--node from spec.nodeName)",
          "--node=$(NODE_NAME)" in wargs and env_of(wc, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    check(f"{name}: metrics listen on the scraped ports",
          "--metrics-listen=0.0.0.0:9090" in cargs and "--metrics-listen=0.0.0.0:9091" in wargs)
    http_port = vals.get("coordinator", {}).get("httpPort", 8000)
    client_svc = [o for _, o in objs if o["kind"] == "Service" and any(p["name"] == "grpc" for p in o["spec"]["ports"]) and o["spec"].get("selector", {}).get("app.kubernetes.io/component") == "coordinator"]
    svc_http = [p for svc in client_svc for p in svc["spec"]["ports"] if p["name"] == "http"]
    if http_port:
        check(f"{name}: the OpenAI HTTP API listens and is on the client Service",
              f"--http-listen=0.0.0.0:{http_port}" in cargs and len(svc_http) == 1 and svc_http[0]["port"] == http_port, str(svc_http))
    else:
        check(f"{name}: no HTTP API when httpPort is null", not any(a.startswith("--http-listen") for a in cargs) and not svc_http)
    if vals.get("etcd", {}).get("enabled", True):
        check(f"{name}: bundled etcd StatefulSet", any(o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd") for _, o in objs))
    else:
        check(f"{name}: no bundled etcd with external endpoints", not any(o["metadata"]["name"].endswith("-etcd") for _, o in objs))
        check(f"{name}: external endpoints in --store", "etcd-a.infra:2379,etcd-b.infra:2379/prod/switchyard" in store[0])
    check(f"{name}: ServiceMonitor iff enabled", ("ServiceMonitor" in kinds) == vals.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False))
    tls = vals.get("tls", {}).get("enabled", False)
    for flag in ("--tls-cert=", "--tls-key=", "--tls-ca="):
        check(f"{name}: {flag[:-1]} iff TLS", any(a.startswith(flag) for a in cargs) == tls and any(a.startswith(flag) for a in wargs) == tls)
    probes = [c[p] for c in (cc, wc) for p in ("readinessProbe", "livenessProbe")]
    check(f"{name}: probes are {'TCP' if tls else 'gRPC health'}",
          all(("tcpSocket" in p) if tls else "grpc" in p for p in probes), str(probes))
    if not tls:
        # Readiness of a coordinator is the leader's switchyard.v1.Control (standbys report it
        # NOT_SERVING); every other probe checks the process (""), so a standby stays alive.
        want = [("switchyard.v1.Control" if (c is cc and p == "readinessProbe") else None)
                for c in (cc, wc) for p in ("readinessProbe", "livenessProbe")]
        got = [c[p]["grpc"].get("service") for c in (cc, wc) for p in ("readinessProbe", "livenessProbe")]
        check(f"{name}: only the coordinator's readiness checks switchyard.v1.Control", got == want, str(probes))
    otlp = vals.get("telemetry", {}).get("otlpEndpoint")
    check(f"{name}: --otlp-endpoint iff telemetry.otlpEndpoint",
          all((f"--otlp-endpoint={otlp}" in a) if otlp else not any(x.startswith("--otlp-endpoint") for x in a) for a in (cargs, wargs)))
    check(f"{name}: admin Secret (or existing)", "Secret" in kinds or vals.get("adminToken", {}).get("existingSecret"))


# ---- the rendered commands against the binary ------------------------------------------------

_help_cache = {}


def binary_help(binary, sub):
    """(flags, env vars, required flags) of `switchyard <sub> --help`, or None if it cannot run."""
    if sub not in _help_cache:
        try:
            r = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, timeout=60)
            text = r.stdout if r.returncode == 0 else None
        except OSError:
            text = None
        if text is None:
            _help_cache[sub] = None
        else:
            # Options are the lines that start (after indentation) with `--name` or `-x, --name`;
            # the lines up to the next option are its description ([env: NAME] may wrap there).
            blocks = {}
            current = None
            for line in text.splitlines():
                m = re.match(r"\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", line)
                if m:
                    current = m.group(1)
                    blocks[current] = line
                elif current and line.startswith(" "):
                    blocks[current] += " " + line.strip()
                else:
                    current = None
            flags = set(blocks)
            envs = {e for b in blocks.values() for e in re.findall(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)", b)}
            usage = next((l for l in text.splitlines() if l.startswith("Usage:")), "")
            # `Usage: switchyard worker [OPTIONS] --coordinator <COORDINATOR>`: the flags outside [].
            required = set(re.findall(r"(?<![\[\w-])(--[a-z0-9][a-z0-9-]*)", re.sub(r"\[[^\]]*\]", "", usage)))
            env_of_flag = {f: (re.findall(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)", b) or [None])[0] for f, b in blocks.items()}
            _help_cache[sub] = (flags, envs, {f: env_of_flag.get(f) for f in required})
    return _help_cache[sub]


def switchyard_containers(objs):
    for _, o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            cmd = list(c.get("command", [])) + list(c.get("args", []))
            if cmd[:1] == ["switchyard"] or (cmd and cmd[0].endswith("/switchyard")):
                yield f"{o['kind']}/{o['metadata']['name']}:{c['name']}", c, cmd


def command_problems(binary, objs):
    """[(container, subcommand, problem)] for every switchyard container of the manifests."""
    problems = []
    seen = 0
    for where, c, cmd in switchyard_containers(objs):
        seen += 1
        if len(cmd) < 2 or cmd[1].startswith("-"):
            problems.append((where, "?", f"no subcommand in {cmd}"))
            continue
        sub = cmd[1]
        info = binary_help(binary, sub)
        if info is None:
            problems.append((where, sub, f"`{binary} {sub} --help` failed (unknown subcommand?)"))
            continue
        flags, envs, required = info
        args = cmd[2:]
        given = set()
        for a in args:
            if a.startswith("--"):
                f = a.split("=", 1)[0]
                given.add(f)
                if f not in flags:
                    problems.append((where, sub, f"flag {f} is not in `switchyard {sub} --help`"))
        env = set(env_names(c))
        for e in env:
            if (e.startswith("SWITCHYARD_") or e.startswith("OTEL_")) and e not in envs and e not in EXTRA_ENV:
                problems.append((where, sub, f"environment variable {e} is not read by `switchyard {sub}` (not in its --help)"))
        for f, e in sorted(required.items()):
            if f not in given and not (e and e in env):
                problems.append((where, sub, f"required flag {f} missing"))
        for a in cmd:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                if ref not in env:
                    problems.append((where, sub, f"$({ref}) in {a!r} is not an env var of the container (Kubernetes leaves it unexpanded)"))
    if not seen:
        problems.append(("-", "-", "no switchyard containers found"))
    return problems


def flag_checks(name, binary, objs):
    problems = command_problems(binary, objs)
    for sub in ("coordinator", "worker"):
        mine = [p for p in problems if p[1] == sub]
        check(f"{name}: `switchyard {sub}` args and env are the binary's (--help of {os.path.relpath(binary, ROOT)})",
              not mine, "; ".join(f"{w}: {p}" for w, _, p in mine))
        for _, _, p in mine:
            m = re.match(r"flag (--[a-z0-9-]+) is not in", p)
            if m:
                missing_flags.setdefault(sub, set()).add(m.group(1))
    other = [p for p in problems if p[1] not in ("coordinator", "worker")]
    check(f"{name}: every switchyard container runs a known subcommand", not other, str(other))


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switchyard-bin", default=os.environ.get("SWITCHYARD_BIN") or os.path.join(ROOT, "target", "release", "switchyard"),
                    help="the switchyard binary whose --help the rendered args are checked against")
    binary = os.path.abspath(ap.parse_args().switchyard_bin)
    check(f"switchyard binary {binary} runs", binary_help(binary, "coordinator") is not None and binary_help(binary, "worker") is not None)
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
        check(f"{name}: NOTES.txt renders", any(p.endswith("NOTES.txt") and re.search(r"switchyard (--tls-ca \S+ )?generate --endpoint", t) for p, t in manifests.items()))
        objs = objects(manifests)
        validate(name, objs)
        try:
            semantic_checks(name, objs)
        except (AssertionError, KeyError, IndexError, TypeError) as e:
            check(f"{name}: semantic checks", False, repr(e))
        flag_checks(name, binary, objs)
    # The flag check itself: flags and $(VAR)s that no binary has must be reported.
    bogus = command_problems(binary, objects(chart.render(BOGUS_FLAG, name="sy", namespace="serving", is_install=True)))
    text = " ".join(p for _, _, p in bogus)
    check("flag check catches unknown flags and undefined $(VAR)s",
          "flag --no-such-flag is not in `switchyard coordinator --help`" in text and "flag --id is not in `switchyard worker --help`" in text
          and "$(POD_NAME)" not in text, text)
    undefined = command_problems(binary, [("x", {"kind": "Pod", "metadata": {"name": "x"}, "spec": {"template": {"spec": {"containers": [
        {"name": "w", "command": ["switchyard", "worker"], "args": ["--node=$(NODE_NAME)"], "env": [{"name": "SWITCHYARD_NO_SUCH", "value": "1"}]}]}}}})])
    text = " ".join(p for _, _, p in undefined)
    check("flag check catches undefined $(VAR)s, unknown env vars and missing required flags",
          "$(NODE_NAME)" in text and "SWITCHYARD_NO_SUCH" in text and "required flag --coordinator missing" in text, text)
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
    for sub, flags in sorted(missing_flags.items()):
        print(f"flags missing from `switchyard {sub}`: {' '.join(sorted(flags))}")
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all helm chart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
