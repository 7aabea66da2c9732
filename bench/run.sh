#!/usr/bin/env bash
# Mailroom's benchmark: same-run baselines, then Mailroom on both stacks.
#
#   bench/run.sh            full run (about 3 minutes after the build)
#   bench/run.sh --quick    a few seconds per phase (smoke test)
#
# Starts its own durable Postgres (synchronous_commit=on, WAL segments
# written once before measuring, as on a server that has been running),
# Redis and Postfix smtp-sink on free ports; measures the raw baselines
# (pgbench single-row INSERT at 32 clients; smtp-source -> smtp-sink with 32
# sessions, each over one connection); then runs mailroom-bench open-loop
# (1000/s, after a 2 s warm-up) and closed-loop (32 clients) against
# Postgres+Redis, then each path alone there (`mailroom api` taking the
# closed loop, then `mailroom worker` draining it), then the embedded stack,
# and prints a table with each figure's ratio to its baseline. Everything is
# torn down at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0; [ "${1:-}" = "--quick" ] && QUICK=1
if [ $QUICK = 1 ]; then DUR=3s; BASE_DUR=3; SMTP_N=5000; else DUR=20s; BASE_DUR=15; SMTP_N=100000; fi
RATE=${BENCH_RATE:-1000}
CLIENTS=${BENCH_CLIENTS:-32}
# Concurrent deliveries per Mailroom process: the product's default unless
# BENCH_WORKERS is given.
WORKERS_ENV=(); [ -n "${BENCH_WORKERS:-}" ] && WORKERS_ENV=(MAILROOM_WORKERS="$BENCH_WORKERS")

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v pgbench >/dev/null || need+=(postgresql-contrib)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
export PATH="$PATH:/usr/sbin"

echo "== building release binaries" >&2
cargo build --release --bins --quiet

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# CPU seconds of a process and its children (reaped or alive), from /proc.
tree_cpu() {
  python3 - "$1" <<'PY'
import os, sys
pid = sys.argv[1]
def fields(p):
    try:
        return open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
own = fields(pid)
total = sum(int(v) for v in own[11:15])
for p in filter(str.isdigit, os.listdir("/proc")):
    f = fields(p)
    if f and f[1] == pid:
        total += int(f[11]) + int(f[12])
print(total / os.sysconf("SC_CLK_TCK"))
PY
}
# Runs a command (its output to $1) and prints the CPU seconds it used, from
# its rusage: a baseline's client shares the cores as the load generator does.
client_cpu() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    subprocess.run(sys.argv[2:], stdout=out, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_utime + r.ru_stime)
PY
}

WORK=$(mktemp -d /tmp/mailroom-bench.XXXXXX); chmod 755 "$WORK"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGPORT=$(free_port); REDISPORT=$(free_port); SINKPORT=$(free_port); HTTPPORT=$(free_port); HOOKPORT=$(free_port)
PIDS=()
pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting Postgres, Redis, smtp-sink" >&2
mkdir -p "$WORK/pg"; [ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
pg "$PGBIN/initdb" -A trust -U postgres -D "$WORK/pg" >/dev/null
pg "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/log" -w -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c synchronous_commit=on -c max_connections=200 -c shared_buffers=256MB -c min_wal_size=1GB" start >/dev/null
PSQL="psql -h 127.0.0.1 -p $PGPORT -U postgres -q"
$PSQL -c "CREATE DATABASE baseline" -c "CREATE DATABASE mailroom"
# A fresh cluster has one WAL segment and creates (zero-fills and fsyncs)
# each next 16 MB segment when it needs it: at 1,000 sends/s that is one
# every few seconds, each a ~100 ms stall of every commit on this disk
# (1,000/s accept p99 60-80 ms, against 8-24 ms with segments to recycle).
# A server that has been running recycles its old segments instead; so
# does this one once ~600 MB of WAL has been written and checkpointed
# (min_wal_size keeps them for reuse). Both baselines and Mailroom run on it.
echo "== warming Postgres's WAL segments" >&2
$PSQL -c "CREATE TABLE walwarm AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 600000)" -c "DROP TABLE walwarm" -c "CHECKPOINT"
redis-server --port "$REDISPORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & REDIS_PID=$!; PIDS+=($REDIS_PID)
SINK_USER=(); [ "$(id -u)" = 0 ] && SINK_USER=(-u postfix)
smtp-sink "${SINK_USER[@]}" 127.0.0.1:$SINKPORT 1024 & SINK_PID=$!; PIDS+=($SINK_PID)
wait_port $REDISPORT; wait_port $SINKPORT

echo "== baseline: pgbench single-row INSERT, 32 clients, ${BASE_DUR}s" >&2
$PSQL baseline -c "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)"
echo "INSERT INTO t (body) VALUES ('hello');" > "$WORK/insert.sql"
# With the CPU each side spent per insert (Postgres: the postmaster's tree;
# the client: pgbench, from its rusage), to set beside Mailroom's.
PG_CPU0=$(tree_cpu "$(head -1 "$WORK/pg/postmaster.pid")")
PGBENCH_CPU=$(client_cpu "$WORK/pgbench.out" pgbench -n -c 32 -j 2 -T "$BASE_DUR" -f "$WORK/insert.sql" -h 127.0.0.1 -p "$PGPORT" -U postgres baseline)
PG_CPU1=$(tree_cpu "$(head -1 "$WORK/pg/postmaster.pid")")
PG_TPS=$(awk '/^tps/ {print $3; exit}' "$WORK/pgbench.out")
PG_TX=$(awk '/actually processed/ {print $NF; exit}' "$WORK/pgbench.out")
PGBENCH_US=$(python3 -c "print(f'{($PG_CPU1-$PG_CPU0)/$PG_TX*1e6:.0f} {$PGBENCH_CPU/$PG_TX*1e6:.0f}')")

# pgbench's rows are not Mailroom's to vacuum and write back: drop them and
# flush before Mailroom is measured.
$PSQL -c "DROP DATABASE baseline" -c "CHECKPOINT"; sync

echo "== baseline: smtp-source -> smtp-sink, 32 pooled sessions, $SMTP_N messages" >&2
SINK_CPU0=$(tree_cpu "$SINK_PID")
T0=$(date +%s.%N)
# -d: each session sends its messages over one connection, as Mailroom's
# pooled relay connections do (without it smtp-source connects, greets and
# quits for every message, about half the rate).
SOURCE_CPU=$(client_cpu /dev/null smtp-source -d -s 32 -m "$SMTP_N" -l 4000 -f bench@acme.test -t sink@example.com 127.0.0.1:$SINKPORT)
T1=$(date +%s.%N)
SINK_CPU1=$(tree_cpu "$SINK_PID")
SMTP_RATE=$(python3 -c "print($SMTP_N/($T1-$T0))")
SMTP_US=$(python3 -c "print(f'{($SINK_CPU1-$SINK_CPU0)/$SMTP_N*1e6:.0f} {$SOURCE_CPU/$SMTP_N*1e6:.0f}')")

run_mailroom() { # $1 = label, rest = env assignments
  local label=$1; shift
  local data="$WORK/data-$label"; mkdir -p "$data"
  env "$@" MAILROOM_LISTEN=127.0.0.1:$HTTPPORT MAILROOM_DATA_DIR="$data" \
    MAILROOM_RELAYS="smtp://127.0.0.1:$SINKPORT?tls=none&pool=32" "${WORKERS_ENV[@]}" \
    MAILROOM_WEBHOOK_ALLOW_PRIVATE=true MAILROOM_LOG_FORMAT=json RUST_LOG=warn ./target/release/mailroom serve > "$WORK/$label.log" 2>&1 &
  local pid=$!; PIDS+=($pid)
  wait_port $HTTPPORT
  local key; key=$(cat "$data/admin-key")
  # Postgres's CPU per message too, when it is the store.
  local store=(); [ "$label" = postgres ] && store=(--store-pid "$(head -1 "$WORK/pg/postmaster.pid")" --queue-pid "$REDIS_PID")
  # The steady rate first, then saturation: right after a saturating burst
  # the store is busy with its aftermath (autovacuum of the burst's rows,
  # writeback) for about a minute, which is not the steady rate's tail
  # (docs/performance.md measures both). The steady rate comes after a 2 s
  # warm-up at that rate, measured apart: a fresh server's first second
  # (connections opened, statements prepared and templates compiled under
  # load) is a cold start, reported on its own below the table.
  ./target/release/mailroom-bench --base http://127.0.0.1:$HTTPPORT --key "$key" --pid $pid "${store[@]}" --mode open --rate "$RATE" --warmup 2s --duration "$DUR" > "$WORK/$label-open.json"
  ./target/release/mailroom-bench --base http://127.0.0.1:$HTTPPORT --key "$key" --pid $pid "${store[@]}" --mode closed --concurrency "$CLIENTS" --duration "$DUR" > "$WORK/$label-closed.json"
  # The same closed loop with everything a production send carries: a send
  # key with a rate limit, quotas and a per-recipient cap (checked in the
  # limiter on every send, none of them reached), an Idempotency-Key per
  # request, and a webhook for message.delivered that the generator receives.
  local api="http://127.0.0.1:$HTTPPORT/v1"
  local limited; limited=$(curl -sf "$api/keys" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"name":"bench-full","scopes":["send","read"],"rate_per_second":1000000,"burst":1000000,"daily_quota":1000000000,"monthly_quota":1000000000,"per_recipient_hourly":100}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  curl -sf "$api/webhooks" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "{\"url\":\"http://127.0.0.1:$HOOKPORT/hook\",\"events\":[\"message.delivered\"]}" > /dev/null
  ./target/release/mailroom-bench --base http://127.0.0.1:$HTTPPORT --key "$limited" --pid $pid "${store[@]}" --mode closed --concurrency "$CLIENTS" --duration "$DUR" \
    --idempotency --webhook-listen 127.0.0.1:$HOOKPORT > "$WORK/$label-full.json"
  kill $pid; wait $pid 2>/dev/null || true
}


# Each path alone on Postgres + Redis: `mailroom api` takes the closed loop
# with nothing delivering, then `mailroom worker` drains what it accepted
# with nothing accepting.
run_paths() {
  local data="$WORK/data-paths"; mkdir -p "$data"
  local env=(DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/paths" REDIS_URL="redis://127.0.0.1:$REDISPORT"
    MAILROOM_REDIS_PREFIX=paths MAILROOM_DATA_DIR="$data" MAILROOM_RELAYS="smtp://127.0.0.1:$SINKPORT?tls=none&pool=32"
    "${WORKERS_ENV[@]}" MAILROOM_LOG_FORMAT=json RUST_LOG=warn)
  local postmaster; postmaster=$(head -1 "$WORK/pg/postmaster.pid")
  $PSQL -c "CREATE DATABASE paths"
  env "${env[@]}" MAILROOM_LISTEN=127.0.0.1:$HTTPPORT ./target/release/mailroom api > "$WORK/paths-api.log" 2>&1 &
  local pid=$!; PIDS+=($pid)
  wait_port $HTTPPORT
  ./target/release/mailroom-bench --base http://127.0.0.1:$HTTPPORT --key "$(cat "$data/admin-key")" --pid $pid --store-pid "$postmaster" --queue-pid "$REDIS_PID" \
    --mode closed --concurrency "$CLIENTS" --duration "$DUR" --no-drain > "$WORK/paths-accept.json"
  kill $pid; wait $pid 2>/dev/null || true
  local waiting="SELECT count(*) FROM messages WHERE next_attempt_at IS NOT NULL"
  local total; total=$($PSQL -At paths -c "$waiting")
  local pg0; pg0=$(tree_cpu "$postmaster")
  local others0; others0="$(tree_cpu "$REDIS_PID") $(tree_cpu "$SINK_PID")"
  local t0; t0=$(date +%s.%N)
  env "${env[@]}" ./target/release/mailroom worker > "$WORK/paths-worker.log" 2>&1 &
  pid=$!; PIDS+=($pid)
  # Polled with EXISTS on the due-work index: counting a 100,000-message
  # backlog four times a second cost Postgres ~80 ms a time, a third of a
  # core charged to the worker's drain.
  local any="SET enable_seqscan = off; SELECT EXISTS (SELECT 1 FROM messages WHERE next_attempt_at IS NOT NULL)"
  for _ in $(seq 1 1200); do
    [ "$($PSQL -At paths -c "$any" | tail -1)" = f ] && break
    sleep 0.25
  done
  local t1; t1=$(date +%s.%N)
  local worker_cpu; worker_cpu=$(tree_cpu $pid)
  local pg1; pg1=$(tree_cpu "$postmaster")
  local others1; others1="$(tree_cpu "$REDIS_PID") $(tree_cpu "$SINK_PID")"
  local left; left=$($PSQL -At paths -c "$waiting")
  kill $pid; wait $pid 2>/dev/null || true
  python3 - "$total" "$left" "$t0" "$t1" "$worker_cpu" "$pg0" "$pg1" "$others0" "$others1" > "$WORK/paths-deliver.json" <<'PY'
import json, sys
total, left, t0, t1, worker, pg0, pg1, others0, others1 = sys.argv[1:]
(redis0, sink0), (redis1, sink1) = (map(float, o.split()) for o in (others0, others1))
done, secs = int(total) - int(left), float(t1) - float(t0)
per = lambda cpu: cpu / max(done, 1) * 1e6
print(json.dumps({"delivered": done, "left": int(left), "seconds": secs, "delivered_per_s": done / secs,
                  "server_cpu_us_per_message": per(float(worker)),
                  "store_cpu_us_per_message": per(float(pg1) - float(pg0)),
                  "queue_cpu_us_per_message": per(redis1 - redis0),
                  "relay_cpu_us_per_message": per(sink1 - sink0)}))
PY
}

echo "== Mailroom on Postgres + Redis" >&2
run_mailroom postgres DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/mailroom" REDIS_URL="redis://127.0.0.1:$REDISPORT"
echo "== each path alone: mailroom api, then mailroom worker" >&2
# As after pgbench: the burst's rows are not the next phase's to vacuum.
$PSQL -c "DROP DATABASE mailroom" -c "CHECKPOINT"; sync
run_paths
# The embedded stack needs neither: stop them (Postgres's shutdown
# checkpoint writes out the burst) so their aftermath does not run under the
# embedded measurements.
pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null
kill "$REDIS_PID"; sync
echo "== Mailroom embedded (SQLite + in-process queue)" >&2
run_mailroom embedded

python3 - "$WORK" "$PG_TPS" "$SMTP_RATE" "$CLIENTS" "$RATE" "$PGBENCH_US" "$SMTP_US" <<'PY'
import json, os, platform, subprocess, sys, datetime
work, pg_tps, smtp_rate, clients, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
pgbench_pg_us, pgbench_client_us = map(float, sys.argv[6].split())
sink_us, source_us = map(float, sys.argv[7].split())
us = lambda v: "–" if v is None else f"{v:.0f}"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"\nMailroom benchmark — {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, commit {commit}, {os.cpu_count()} cores, {platform.platform()}")
print(f"\nBaselines (same run): pgbench single-row INSERT, 32 clients: {pg_tps:,.0f} tps; smtp-source -> smtp-sink, 32 pooled sessions: {smtp_rate:,.0f} msg/s\n")
print("| stack | load | accepted/s | vs pgbench | accept p50 / p95 / p99 / max (ms) | delivered/s | vs smtp-sink | 202→250 p50 / p99 (ms) | errors | peak RSS MB | CPU % | CPU µs/msg Mailroom / Postgres |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
def paths():
    a = json.load(open(f"{work}/paths-accept.json")); l = a["accept_ms"]
    print(f"| postgres | accept alone (`mailroom api`), closed, {clients} clients | {a['accepted_per_s']:,.0f} | {a['accepted_per_s']/pg_tps:.2f}× | {l['p50']:.1f} / {l['p95']:.1f} / {l['p99']:.1f} / {l['max']:.0f} | – | – | – | {({k: v for k, v in a['statuses'].items() if k != '202'}) or 'none'} | {a['server_peak_rss_mb'] or 0:.0f} | {a['server_cpu_percent'] or 0:.0f} | {us(a.get('server_cpu_us_per_message'))} / {us(a.get('store_cpu_us_per_message'))} |")
    d = json.load(open(f"{work}/paths-deliver.json"))
    left = f" ({d['left']} left)" if d["left"] else ""
    print(f"| postgres | delivery alone (`mailroom worker` drains {d['delivered']:,}{left}) | – | – | – | {d['delivered_per_s']:,.0f} | {d['delivered_per_s']/smtp_rate:.2f}× | – | – | – | – | {us(d['server_cpu_us_per_message'])} / {us(d['store_cpu_us_per_message'])} |")
def budget():
    a = json.load(open(f"{work}/paths-accept.json"))
    parts = [("load generator", a.get("load_generator_cpu_us_per_message")), ("Mailroom", a.get("server_cpu_us_per_message")),
             ("Postgres", a.get("store_cpu_us_per_message")), ("Redis", a.get("queue_cpu_us_per_message"))]
    total = sum(v or 0 for _, v in parts)
    cores = os.cpu_count()
    print(f"\nCPU per message, all processes on the same {cores} cores (µs):")
    print(f"- pgbench single-row INSERT: Postgres {pgbench_pg_us:.0f} + pgbench {pgbench_client_us:.0f} = {pgbench_pg_us + pgbench_client_us:.0f}")
    print(f"- Mailroom accept alone: " + " + ".join(f"{n} {us(v)}" for n, v in parts) + f" = {total:.0f}")
    print(f"- 0.6× of pgbench ({0.6 * pg_tps:,.0f}/s) leaves {cores * 1e6 / (0.6 * pg_tps):.0f} µs per message for all of them; "
          f"at {total:.0f} µs the {cores} cores would be busy at {cores * 1e6 / total:,.0f}/s ({cores * 1e6 / total / pg_tps:.2f}×)")
    d = json.load(open(f"{work}/paths-deliver.json"))
    parts = [("Mailroom", d["server_cpu_us_per_message"]), ("Postgres", d["store_cpu_us_per_message"]),
             ("Redis", d["queue_cpu_us_per_message"]), ("smtp-sink", d["relay_cpu_us_per_message"])]
    total = sum(v for _, v in parts)
    print(f"- smtp-source -> smtp-sink: smtp-sink {sink_us:.0f} + smtp-source {source_us:.0f} = {sink_us + source_us:.0f}")
    print(f"- Mailroom delivery alone: " + " + ".join(f"{n} {us(v)}" for n, v in parts) + f" = {total:.0f}")
    print(f"- 0.35× of the sink ({0.35 * smtp_rate:,.0f}/s) leaves {cores * 1e6 / (0.35 * smtp_rate):.0f} µs per message; "
          f"at {total:.0f} µs the {cores} cores would be busy at {cores * 1e6 / total:,.0f}/s ({cores * 1e6 / total / smtp_rate:.2f}×)")
for stack in ("postgres", "embedded"):
    for mode in ("closed", "full", "open"):
        r = json.load(open(f"{work}/{stack}-{mode}.json"))
        load = {"closed": f"closed, {clients} clients", "full": f"closed, {clients} clients, every feature (below)", "open": f"open, {rate}/s"}[mode]
        a = r["accept_ms"]; t = r["to_relay_ms"]
        errors = {k: v for k, v in r["statuses"].items() if k != "202"}
        print(f"| {stack} | {load} | {r['accepted_per_s']:,.0f} | {r['accepted_per_s']/pg_tps:.2f}× | {a['p50']:.1f} / {a['p95']:.1f} / {a['p99']:.1f} / {a['max']:.0f} | {r['delivered_per_s']:,.0f} | {r['delivered_per_s']/smtp_rate:.2f}× | {t['p50']:.0f} / {t['p99']:.0f} | {errors or 'none'} | {r['server_peak_rss_mb'] or 0:.0f} | {r['server_cpu_percent'] or 0:.0f} | {us(r.get('server_cpu_us_per_message'))} / {us(r.get('store_cpu_us_per_message'))} |")
    if stack == "postgres":
        paths()
print(f"\nOpen loop at {rate}/s, beyond the table:")
for stack in ("postgres", "embedded"):
    r = json.load(open(f"{work}/{stack}-open.json"))
    w = r.get("warmup_accept_ms")
    if w:
        print(f"- {stack}: cold start (the first {w['seconds']:.0f} s after the server started, not in the table): accept p50 / p99 / max {w['p50']:.1f} / {w['p99']:.1f} / {w['max']:.0f} ms")
    worst = ", ".join(f"s{x['second']} p99 {x['p99_ms']:.0f} / max {x['max_ms']:.0f}" for x in r["accept_ms"].get("worst_seconds", []))
    print(f"- {stack}: the measured run's worst seconds (ms): {worst}")
print("\nEvery feature: a send key with a rate limit, daily and monthly quotas and a per-recipient hourly cap (none reached), an Idempotency-Key per request, and a webhook for message.delivered received by the generator:")
for stack in ("postgres", "embedded"):
    w = json.load(open(f"{work}/{stack}-full.json")).get("webhooks") or {}
    lat = w.get("from_202_ms") or {}
    print(f"- {stack}: {w.get('received', 0):,} webhooks received, {w.get('per_s', 0):,.0f}/s from the first send to the last webhook; 202 → webhook p50 / p99 {lat.get('p50', 0):,.0f} / {lat.get('p99', 0):,.0f} ms")
budget()
PY
