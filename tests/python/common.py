"""Helpers of the Python client checks (run by tests/tests/openai_api.rs against a real
`switchyard up`): the cluster's active requests from `switchyard status --json`, and a tiny
check runner that names what failed."""
import json
import os
import subprocess
import sys
import time
import traceback


def active_requests(switchyard, grpc):
    """Requests the workers hold (sequences with a KV cache), summed over ranks."""
    out = subprocess.run([switchyard, "status", "--endpoint", f"http://{grpc}", "--json"],
                         capture_output=True, text=True, timeout=30, env=os.environ)
    if out.returncode != 0:
        raise AssertionError(f"switchyard status failed: {out.stderr}")
    return sum(w["active_requests"] for w in json.loads(out.stdout)["workers"])


def wait_active(switchyard, grpc, want, limit_s):
    """Seconds until the active requests equal `want` (fails past `limit_s`)."""
    t0 = time.monotonic()
    while True:
        n = active_requests(switchyard, grpc)
        if n == want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            raise AssertionError(f"{n} active requests after {limit_s} s (want {want})")
        time.sleep(0.05)


def run(checks):
    """Runs every check, prints `ok NAME` or `FAIL NAME` with the traceback; exit 1 on a failure."""
    failed = 0
    for c in checks:
        try:
            c()
            print(f"ok   {c.__name__}", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then the run fails
            failed += 1
            print(f"FAIL {c.__name__}\n{traceback.format_exc()}", flush=True)
    if failed:
        print(f"{failed} of {len(checks)} checks failed", flush=True)
        sys.exit(1)
    print(f"all {len(checks)} checks passed", flush=True)
