#!/usr/bin/env bash
# Installs the system packages Switchyard builds and tests with, only those that are missing.
# protoc: gRPC codegen; cmake + libclang: HiGHS (good_lp) build and bindgen; etcd: tests;
# OpenBLAS: CPU GEMM; python3-venv: the Helm chart test tools (venv under target/py).
# Safe to run repeatedly.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
# etcd-client's protos import google/protobuf/*.proto (well-known types).
[[ -e /usr/include/google/protobuf/descriptor.proto ]] || need+=(libprotobuf-dev)
command -v cmake >/dev/null || need+=(cmake)
[[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* 2>/dev/null)" ]] || need+=(libclang-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v openssl >/dev/null || need+=(openssl)  # the TLS test makes its CA with it
[[ -e /usr/include/x86_64-linux-gnu/cblas.h || -e /usr/include/cblas.h || -n "$(ls /usr/include/*/openblas*/cblas.h 2>/dev/null)" ]] || need+=(libopenblas-dev)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Python tools, pinned, in a venv under target/py; skipped when already there: the Helm chart
# test's (render + lint with the Helm Go library, manifest schema validation), and the API
# clients tests/python/ drives against a running cluster (the `openai` package; grpcio with its
# v1alpha reflection client and protobuf for a client built from reflection alone).
PY_TOOLS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 openai==3.51.0 grpcio==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2)
cd "$(dirname "$0")/.."
if ! target/py/bin/python -c 'import helm_python, kubernetes_validate, openai, grpc, grpc_reflection, google.protobuf' 2>/dev/null; then
  echo "installing python tools into target/py: ${PY_TOOLS[*]}" >&2
  rm -rf target/py
  python3 -m venv target/py
  target/py/bin/pip install -q --disable-pip-version-check "${PY_TOOLS[@]}"
fi
