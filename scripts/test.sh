#!/usr/bin/env bash
# Runs Mailroom's whole test suite on a fresh Debian machine: installs what is
# missing (PostgreSQL and Redis binaries, openssl, the Python SMTP server,
# the Standard Webhooks library, dkimpy and schemathesis), then checks formatting and lints and runs every
# test. The suite starts its own Postgres, Redis, SMTP and webhook servers on
# free ports; it never uses the machine's shared instances.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip python3-venv)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

PY_DEPS=(aiosmtpd standardwebhooks trustme dkimpy pynacl "schemathesis>=4,<5")
if ! python3 -c "import aiosmtpd, standardwebhooks, trustme, dkim, nacl, schemathesis" 2>/dev/null; then
  echo "== installing ${PY_DEPS[*]} from PyPI"
  python3 -m pip install --quiet "${PY_DEPS[@]}" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "${PY_DEPS[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test (unit tests, then the integration suite on both stacks)"
cargo test --all-targets -- --test-threads="${MAILROOM_TEST_THREADS:-4}"
