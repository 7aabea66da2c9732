#!/usr/bin/env bash
# Runs Mailroom with its embedded defaults on a fresh Debian machine: SQLite
# store and in-process queue in ./mailroom-data, mail captured (not sent)
# unless MAILROOM_RELAYS is set. Installs a C compiler if there is none;
# Rust itself must come from rustup.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq build-essential;
  else sudo apt-get update -qq && sudo apt-get install -y -qq build-essential; fi
fi
exec cargo run --release -- serve "$@"
