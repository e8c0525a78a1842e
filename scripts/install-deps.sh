#!/usr/bin/env bash
# Installs the system packages Switchyard builds and tests with, only those that are missing.
# protoc: gRPC codegen; cmake + libclang: HiGHS (good_lp) build and bindgen; etcd: tests;
# OpenBLAS: CPU GEMM. Safe to run repeatedly.
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v cmake >/dev/null || need+=(cmake)
[[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* 2>/dev/null)" ]] || need+=(libclang-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
[[ -e /usr/include/x86_64-linux-gnu/cblas.h || -e /usr/include/cblas.h || -n "$(ls /usr/include/*/openblas*/cblas.h 2>/dev/null)" ]] || need+=(libopenblas-dev)
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
