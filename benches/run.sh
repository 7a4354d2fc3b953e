#!/usr/bin/env bash
# Hand-started benchmark: this server (release build) against a minimal Python original
# (benches/python_original: FastAPI + SQLModel + PyJWT + bcrypt under uvicorn, one worker),
# measured in the same run, interleaved, so that the ratios mean something on a noisy machine.
#
# Scenarios (wrk, keep-alive, bearer token):
#   reads   GET  /api/me/tasks?limit=20   for a user with 50 tasks (Python: the real user id)
#   me      GET  /api/users/me
#   writes  POST /api/me/tasks            small JSON body, a separate user (so reads stay at 50)
# Each scenario runs REPS times per server (Rust, then Python, alternating); the table shows
# the median requests/s and the median p99 latency, plus the sum of non-2xx responses and
# socket errors over all repetitions. Then idle RSS (after startup) and peak RSS (VmHWM,
# after all scenarios) of each server process.
#
# A full run (default options) takes about 5 minutes after the build.
# Only 127.0.0.1 is targeted. Both servers are stopped on exit. Needs: cargo, curl, python3,
# wrk (installed with apt-get when missing and running as root), psql for --postgres.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/run.sh [options]
  --rust-only              skip the Python original
  --duration D             wrk duration per run, e.g. 10s, 30s, 1m (default 10s)
  --connections N          wrk connections (default 64)
  --python-connections N   wrk connections for the Python side (default: 10, at most --connections).
                           The typical app deadlocks above ~15: sync endpoints and sync `yield`
                           dependencies share AnyIO's 40-thread pool while SQLAlchemy's pool has
                           5+10 connections, so at 64 connections every thread waits for a
                           connection whose release needs a free thread, until the 30 s pool
                           timeout turns them into 500s (fastapi/fastapi#3205, #12066).
  --threads N              wrk threads (default 2)
  --reps N                 repetitions per scenario and server, 1..9 (default 3; median reported)
  --postgres URL           run against PostgreSQL: a fresh database is created on the server at
                           URL (host must be 127.0.0.1/localhost) for each side and dropped after;
                           the Python side then uses PostgreSQL too (psycopg)
  --python-wal             put the Python side's SQLite in WAL + synchronous=NORMAL, as the Rust
                           server does (default: SQLite's defaults, as the typical app leaves them)
  --status-codes           have wrk count responses per status code (costs client CPU)
  --no-build               do not run `cargo build --release` (use the existing binary)
  --keep                   keep the temporary directory (databases, server logs, wrk outputs)
  -h, --help               this text
EOF
}

DURATION=10s
CONNS=64
PY_CONNS=""
THREADS=2
REPS=3
RUST_ONLY=0
PG_URL=""
PY_WAL=0
STATUS_CODES=0
BUILD=1
KEEP=0

while [ $# -gt 0 ]; do
    case "$1" in
        --rust-only) RUST_ONLY=1 ;;
        --duration) DURATION="${2:?--duration needs a value}"; shift ;;
        --connections) CONNS="${2:?--connections needs a value}"; shift ;;
        --python-connections) PY_CONNS="${2:?--python-connections needs a value}"; shift ;;
        --threads) THREADS="${2:?--threads needs a value}"; shift ;;
        --reps) REPS="${2:?--reps needs a value}"; shift ;;
        --postgres) PG_URL="${2:?--postgres needs a URL}"; shift ;;
        --python-wal) PY_WAL=1 ;;
        --status-codes) STATUS_CODES=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$PY_CONNS" ]; then
    PY_CONNS=10
    [ "$CONNS" -lt 10 ] 2>/dev/null && PY_CONNS="$CONNS"
fi

die() { echo "run.sh: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Duration in seconds (wrk accepts s/m/h suffixes); bounded to keep the run finite.
case "$DURATION" in
    *[!0-9smh]*|"") die "--duration: expected e.g. 10s, 30s, 2m" ;;
esac
dur_num="${DURATION%[smh]}"
case "$DURATION" in
    *m) DUR_S=$((dur_num * 60)) ;;
    *h) DUR_S=$((dur_num * 3600)) ;;
    *) DUR_S=$dur_num ;;
esac
[ "$DUR_S" -ge 1 ] && [ "$DUR_S" -le 600 ] || die "--duration must be between 1s and 10m"
for v in CONNS PY_CONNS THREADS REPS; do
    case "${!v}" in ''|*[!0-9]*) die "$v must be a positive integer" ;; esac
done
[ "$REPS" -ge 1 ] && [ "$REPS" -le 9 ] || die "--reps must be 1..9"
[ "$THREADS" -ge 1 ] && [ "$THREADS" -le "$CONNS" ] && [ "$THREADS" -le "$PY_CONNS" ] \
    || die "--threads must be between 1 and the number of connections"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/benches"
BIN="$ROOT/target/release/todo-api"
VENV="$BENCH/.venv"
export BENCH_LUA_DIR="$BENCH/wrk"
SCENARIOS=(reads me writes)

# ---- state and cleanup ----------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/todo-bench.XXXXXX")"
RUST_PID=""
PY_PID=""
PG_DBS=()

stop_pid() { # pid: SIGTERM (graceful), then SIGKILL after ~5 s
    local pid="$1" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$RUST_PID"
    stop_pid "$PY_PID"
    local db
    for db in "${PG_DBS[@]+"${PG_DBS[@]}"}"; do
        psql "$PG_URL" -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
            || echo "run.sh: could not drop database $db" >&2
    done
    if [ "$KEEP" = 1 ]; then
        echo "kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- prerequisites --------------------------------------------------------------------------
command -v curl >/dev/null || die "curl is required"
command -v python3 >/dev/null || die "python3 is required"
if ! command -v wrk >/dev/null; then
    [ "$(id -u)" = 0 ] || die "wrk is missing (apt-get install wrk)"
    log "installing wrk"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi

if [ -n "$PG_URL" ]; then
    command -v psql >/dev/null || die "--postgres needs psql"
    pg_host="$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).hostname or "")' "$PG_URL")"
    case "$pg_host" in
        127.0.0.1|localhost|::1) ;;
        *) die "--postgres: only a local server (127.0.0.1) is allowed, got host '$pg_host'" ;;
    esac
    psql "$PG_URL" -X -q -tAc 'select 1' >/dev/null || die "--postgres: cannot connect to $PG_URL"
fi

if [ "$BUILD" = 1 ]; then
    log "cargo build --release (a few minutes from clean)"
    (cd "$ROOT" && cargo build --release --bin todo-api) >"$TMP/build.log" 2>&1 \
        || { tail -n 30 "$TMP/build.log" >&2; die "release build failed"; }
fi
[ -x "$BIN" ] || die "no release binary at $BIN (run without --no-build)"

if [ "$RUST_ONLY" = 0 ]; then
    if [ ! -x "$VENV/bin/uvicorn" ] || ! "$VENV/bin/python" -c 'import fastapi, sqlmodel, jwt, bcrypt, psycopg' 2>/dev/null; then
        log "creating $VENV (pip install -r benches/python_original/requirements.txt)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip >/dev/null
        "$VENV/bin/pip" install -q -r "$BENCH/python_original/requirements.txt"
    fi
fi

# ---- helpers --------------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pg_create_db() { # tag scheme -> sets PG_NEW_URL (the given URL with a fresh database name)
    local name="todo_bench_$1_$$_$RANDOM"
    psql "$PG_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$name\"" >/dev/null \
        || die "--postgres: cannot create database $name"
    PG_DBS+=("$name")
    PG_NEW_URL="$(python3 - "$PG_URL" "$name" "$2" <<'PY'
import sys, urllib.parse as u
url, name, scheme = sys.argv[1], sys.argv[2], sys.argv[3]
p = u.urlsplit(url)
print(u.urlunsplit((scheme or p.scheme, p.netloc, "/" + name, p.query, "")))
PY
)"
}

rss_kb() { # pid field(VmRSS|VmHWM)
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

wait_ready() { # name pid url: up to 60 s
    local name="$1" pid="$2" url="$3" i
    for i in $(seq 1 120); do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$TMP/$name.log" >&2; die "$name server exited at startup"; }
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    tail -n 30 "$TMP/$name.log" >&2
    die "$name server not ready after 60 s"
}

api() { # method url token body expected_status -> prints the body
    local method="$1" url="$2" token="$3" body="$4" want="$5" code
    local args=(-sS --max-time 30 -o "$TMP/api.out" -w '%{http_code}' -X "$method" -H 'Accept: application/json')
    [ -n "$token" ] && args+=(-H "Authorization: Bearer $token")
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data "$body")
    code="$(curl "${args[@]}" "$url")" || die "$method $url: curl failed"
    [ "$code" = "$want" ] || die "$method $url: HTTP $code (expected $want): $(head -c 300 "$TMP/api.out")"
    cat "$TMP/api.out"
}

json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# Seeds one server: a reader with 50 tasks and a writer with none. Sets <NAME>_READ_TOKEN,
# <NAME>_READ_ID, <NAME>_WRITE_TOKEN, <NAME>_WRITE_ID.
seed() { # NAME base_url
    local name="$1" base="$2" role email token id i
    for role in READ WRITE; do
        email="bench-${role,,}@example.com"
        api POST "$base/api/auth/register" "" "{\"email\":\"$email\",\"password\":\"bench-password-1\",\"name\":\"Bench $role\"}" 201 >/dev/null
        token="$(api POST "$base/api/auth/login" "" "{\"email\":\"$email\",\"password\":\"bench-password-1\"}" 200 | json_field access_token)"
        id="$(api GET "$base/api/users/me" "$token" "" 200 | json_field id)"
        printf -v "${name}_${role}_TOKEN" '%s' "$token"
        printf -v "${name}_${role}_ID" '%s' "$id"
    done
    local rtoken="${name}_READ_TOKEN" rid="${name}_READ_ID"
    for i in $(seq 1 50); do
        api POST "$base/api/${!rid}/tasks" "${!rtoken}" \
            "{\"title\":\"Seeded task $i\",\"description\":\"Task number $i, seeded for the read benchmark\",\"completed\":$([ $((i % 3)) = 0 ] && echo true || echo false)}" \
            201 >/dev/null
    done
    local count
    count="$(curl -sS --max-time 10 -D - -o /dev/null -H "Authorization: Bearer ${!rtoken}" "$base/api/${!rid}/tasks?limit=20" \
        | tr -d '\r' | awk -F': ' 'tolower($1) == "x-total-count" { print $2 }')"
    [ "$count" = 50 ] || die "$name: X-Total-Count is '$count' after seeding, expected 50"
}

# Results: RPS[name.scenario], P99[...], NON2XX[...], SOCKERR[...]
declare -A RPS P99 NON2XX SOCKERR STATUSES WARM_ERR

to_ms() { # wrk time (e.g. 812.00us, 1.20ms, 2.00s, 1.00m) -> milliseconds
    awk -v t="$1" 'BEGIN {
        v = t + 0; u = t; sub(/^[0-9.]+/, "", u)
        if (u == "us") v = v / 1000; else if (u == "s") v = v * 1000; else if (u == "m") v = v * 60000;
        else if (u == "h") v = v * 3600000;
        printf "%.2f", v }'
}

run_wrk() { # name scenario rep base_url path token conns [warmup]
    local name="$1" scen="$2" rep="$3" base="$4" path="$5" token="$6" conns="$7" warm="${8:-}"
    local script=auth_get.lua dur="$DURATION" out
    [ "$scen" = writes ] && script=auth_post_task.lua
    local tag="$name.$scen"
    if [ -n "$warm" ]; then
        dur=2s
        out="$TMP/wrk.$tag.warmup.txt"
    else
        out="$TMP/wrk.$tag.$rep.txt"
    fi
    BENCH_TOKEN="$token" BENCH_STATUS="$STATUS_CODES" \
        timeout --kill-after=5 $((DUR_S + 60)) \
        wrk -t"$THREADS" -c"$conns" -d"$dur" --timeout 5s --latency -s "$BENCH/wrk/$script" "$base$path" \
        >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed ($tag)"; }
    local rps p99 non2xx sockerr
    rps="$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")"
    p99="$(awk '$1 == "99%" { print $2 }' "$out")"
    p99="$(to_ms "${p99:-0ms}")"
    non2xx="$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 + 0 }' "$out")"
    sockerr="$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")"
    if [ -n "$warm" ]; then
        # Not in the table, but failures during the warm-up are problems too.
        WARM_ERR[$tag]=$(( ${non2xx:-0} + ${sockerr:-0} ))
        [ "${WARM_ERR[$tag]}" = 0 ] || log "  $name $scen warm-up: non-2xx ${non2xx:-0}, socket errors ${sockerr:-0}"
        return 0
    fi
    RPS[$tag]="${RPS[$tag]:-} ${rps:-0}"
    P99[$tag]="${P99[$tag]:-} $p99"
    NON2XX[$tag]=$(( ${NON2XX[$tag]:-0} + ${non2xx:-0} ))
    SOCKERR[$tag]=$(( ${SOCKERR[$tag]:-0} + ${sockerr:-0} ))
    if [ "$STATUS_CODES" = 1 ]; then
        # "status 200: 646" lines -> "200=646,500=3"
        STATUSES[$tag]="${STATUSES[$tag]:-} $(awk '/^status [0-9]+:/ { sub(/:$/, "", $2); printf "%s%s=%s", sep, $2, $3; sep = "," }' "$out")"
    fi
    log "  $name $scen #$rep: ${rps:-0} req/s, p99 ${p99} ms, non-2xx ${non2xx:-0}, socket errors ${sockerr:-0}"
}

median() { # numbers... -> the median (lower middle for an even count)
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print 0; else print a[int((NR + 1) / 2)] }'
}

# ---- start the servers ----------------------------------------------------------------------
SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

RUST_PORT="$(free_port)"
if [ -n "$PG_URL" ]; then
    pg_create_db rust ""
    RUST_DB="$PG_NEW_URL"
    BACKEND="PostgreSQL"
else
    RUST_DB="sqlite://$TMP/bench.db"
    BACKEND="SQLite"
fi
log "starting Rust server on 127.0.0.1:$RUST_PORT ($BACKEND)"
# From the temporary directory, so no .env of the project is read; default BCRYPT_COST and
# pool size (they are removed from the environment).
(
    cd "$TMP"
    exec env -u BCRYPT_COST -u DATABASE_POOL_SIZE -u HOST -u CORS_ORIGINS -u JWT_JWKS_URL \
        -u BETTER_AUTH_SECRET -u TRUSTED_PROXIES \
        DATABASE_URL="$RUST_DB" HOST=127.0.0.1 PORT="$RUST_PORT" JWT_SECRET="$SECRET" \
        RUST_LOG=warn ACCESS_TOKEN_EXPIRE_MINUTES=600 "$BIN"
) >"$TMP/rust.log" 2>&1 &
RUST_PID=$!
wait_ready rust "$RUST_PID" "http://127.0.0.1:$RUST_PORT/health"
RUST_IDLE_KB="$(rss_kb "$RUST_PID" VmRSS)"

if [ "$RUST_ONLY" = 0 ]; then
    PY_PORT="$(free_port)"
    if [ -n "$PG_URL" ]; then
        pg_create_db python postgresql+psycopg
        PY_DB="$PG_NEW_URL"
    else
        PY_DB="sqlite:///$TMP/python.db"
    fi
    log "starting Python original on 127.0.0.1:$PY_PORT (uvicorn, 1 worker, $BACKEND$([ "$PY_WAL" = 1 ] && echo ', WAL'))"
    (
        cd "$TMP"
        exec env PYTHONDONTWRITEBYTECODE=1 DATABASE_URL="$PY_DB" JWT_SECRET="$SECRET" ACCESS_TOKEN_EXPIRE_MINUTES=600 \
            BENCH_SQLITE_WAL="$PY_WAL" \
            "$VENV/bin/python" -m uvicorn app:app --app-dir "$BENCH/python_original" \
            --host 127.0.0.1 --port "$PY_PORT" --log-level warning
    ) >"$TMP/python.log" 2>&1 &
    PY_PID=$!
    wait_ready python "$PY_PID" "http://127.0.0.1:$PY_PORT/openapi.json"
    PY_IDLE_KB="$(rss_kb "$PY_PID" VmRSS)"
fi

log "seeding (bcrypt cost 12 on register and login, so a few seconds)"
seed RUST "http://127.0.0.1:$RUST_PORT"
[ "$RUST_ONLY" = 0 ] && seed PY "http://127.0.0.1:$PY_PORT"

# ---- run ------------------------------------------------------------------------------------
servers=(rust)
[ "$RUST_ONLY" = 0 ] && servers+=(python)
log "wrk -t$THREADS -c$CONNS$([ "$RUST_ONLY" = 0 ] && echo " (python: -c$PY_CONNS)") -d$DURATION --latency, $REPS run(s) per scenario and server"

target() { # name scenario -> "base path token conns"
    local name="$1" scen="$2" base path token conns
    if [ "$name" = rust ]; then
        base="http://127.0.0.1:$RUST_PORT"; conns="$CONNS"
        case "$scen" in
            reads) path="/api/me/tasks?limit=20"; token="$RUST_READ_TOKEN" ;;
            me) path="/api/users/me"; token="$RUST_READ_TOKEN" ;;
            writes) path="/api/me/tasks"; token="$RUST_WRITE_TOKEN" ;;
        esac
    else
        # The original has no `me` alias: the real user id in the path.
        base="http://127.0.0.1:$PY_PORT"; conns="$PY_CONNS"
        case "$scen" in
            reads) path="/api/$PY_READ_ID/tasks?limit=20"; token="$PY_READ_TOKEN" ;;
            me) path="/api/users/me"; token="$PY_READ_TOKEN" ;;
            writes) path="/api/$PY_WRITE_ID/tasks"; token="$PY_WRITE_TOKEN" ;;
        esac
    fi
    echo "$base $path $token $conns"
}

for scen in "${SCENARIOS[@]}"; do
    log "scenario: $scen"
    for name in "${servers[@]}"; do
        read -r base path token conns <<<"$(target "$name" "$scen")"
        run_wrk "$name" "$scen" 0 "$base" "$path" "$token" "$conns" warmup
    done
    for rep in $(seq 1 "$REPS"); do
        for name in "${servers[@]}"; do
            read -r base path token conns <<<"$(target "$name" "$scen")"
            sleep 1
            run_wrk "$name" "$scen" "$rep" "$base" "$path" "$token" "$conns"
        done
    done
done

RUST_PEAK_KB="$(rss_kb "$RUST_PID" VmHWM)"
RUST_NOW_KB="$(rss_kb "$RUST_PID" VmRSS)"
if [ "$RUST_ONLY" = 0 ]; then
    PY_PEAK_KB="$(rss_kb "$PY_PID" VmHWM)"
    PY_NOW_KB="$(rss_kb "$PY_PID" VmRSS)"
fi
kill -0 "$RUST_PID" 2>/dev/null || log "WARNING: the Rust server is no longer running"
[ "$RUST_ONLY" = 1 ] || kill -0 "$PY_PID" 2>/dev/null || log "WARNING: the Python server is no longer running"

# ---- report ---------------------------------------------------------------------------------
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k / 1024 }'; }
label() {
    case "$1" in
        reads) echo "GET /api/me/tasks?limit=20 (50 tasks)" ;;
        me) echo "GET /api/users/me" ;;
        writes) echo "POST /api/me/tasks" ;;
    esac
}

echo
echo "== todo-api benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ) =="
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); backend: $BACKEND"
echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency$([ "$RUST_ONLY" = 0 ] && echo " (python: -c$PY_CONNS)"); median of $REPS run(s); errors = non-2xx + socket errors, summed over runs"
if [ "$RUST_ONLY" = 0 ]; then
    if [ -n "$PG_URL" ]; then
        py_db_desc="PostgreSQL (psycopg, SQLAlchemy's default pool of 5+10)"
    elif [ "$PY_WAL" = 1 ]; then
        py_db_desc="SQLite WAL, synchronous=NORMAL"
    else
        py_db_desc="SQLite defaults (rollback journal, synchronous=FULL)"
    fi
    echo "python: uvicorn app:app, 1 worker (uvloop, httptools), --log-level warning; $py_db_desc"
fi
echo
fmt='%-40s | %10s | %9s | %8s | %10s | %9s | %8s | %7s\n'
printf "$fmt" scenario "rust req/s" "rust p99" "rust err" "py req/s" "py p99" "py err" ratio
printf "$fmt" "$(printf '%.0s-' {1..40})" ---------- --------- -------- ---------- --------- -------- -------
declare -A MED_RPS MED_P99
for scen in "${SCENARIOS[@]}"; do
    # shellcheck disable=SC2086
    r_rps="$(median ${RPS[rust.$scen]})"; r_p99="$(median ${P99[rust.$scen]})"
    r_err=$(( NON2XX[rust.$scen] + SOCKERR[rust.$scen] ))
    MED_RPS[$scen]="$r_rps"; MED_P99[$scen]="$r_p99"
    if [ "$RUST_ONLY" = 0 ]; then
        # shellcheck disable=SC2086
        p_rps="$(median ${RPS[python.$scen]})"; p_p99="$(median ${P99[python.$scen]})"
        p_err=$(( NON2XX[python.$scen] + SOCKERR[python.$scen] ))
        ratio="$(awk -v a="$r_rps" -v b="$p_rps" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "n/a" }')"
        printf "$fmt" "$(label "$scen")" "$r_rps" "$r_p99 ms" "$r_err" "$p_rps" "$p_p99 ms" "$p_err" "$ratio"
    else
        printf "$fmt" "$(label "$scen")" "$r_rps" "$r_p99 ms" "$r_err" - - - -
    fi
done
echo
echo "runs (req/s):"
for scen in "${SCENARIOS[@]}"; do
    for name in "${servers[@]}"; do
        printf '  %-7s %-7s %s\n' "$name" "$scen" "${RPS[$name.$scen]# }"
    done
done
if [ "$STATUS_CODES" = 1 ]; then
    echo "status codes per run (code count):"
    for scen in "${SCENARIOS[@]}"; do
        for name in "${servers[@]}"; do
            printf '  %-7s %-7s %s\n' "$name" "$scen" "${STATUSES[$name.$scen]# }"
        done
    done
fi
echo
mfmt='%-8s | %12s | %14s | %16s\n'
printf "$mfmt" server "idle RSS" "peak RSS (HWM)" "RSS at the end"
printf "$mfmt" -------- ------------ -------------- ----------------
printf "$mfmt" rust "$(mb "$RUST_IDLE_KB")" "$(mb "$RUST_PEAK_KB")" "$(mb "$RUST_NOW_KB")"
if [ "$RUST_ONLY" = 0 ]; then
    printf "$mfmt" python "$(mb "$PY_IDLE_KB")" "$(mb "$PY_PEAK_KB")" "$(mb "$PY_NOW_KB")"
    echo "(python: the uvicorn process; ratio of peaks $(awk -v a="$PY_PEAK_KB" -v b="$RUST_PEAK_KB" 'BEGIN { printf "%.1fx", a / b }'))"
fi

echo
echo "budgets (project guide; this machine is shared, so read misses with care):"
verdict() { if [ "$1" = 1 ]; then echo "ok"; else echo "MISSED"; fi; }
for scen in reads me; do
    ok=$(awk -v r="${MED_RPS[$scen]}" -v p="${MED_P99[$scen]}" 'BEGIN { print (r >= 20000 && p <= 10) ? 1 : 0 }')
    printf '  authenticated reads >= 20,000 req/s with p99 <= 10 ms   %-30s %s req/s, p99 %s ms: %s\n' \
        "[$scen]" "${MED_RPS[$scen]}" "${MED_P99[$scen]}" "$(verdict "$ok")"
done
ok=$(awk -v r="${MED_RPS[writes]}" 'BEGIN { print (r >= 7000) ? 1 : 0 }')
printf '  writes >= 7,000 req/s on SQLite                           %-30s %s req/s: %s%s\n' \
    "[writes]" "${MED_RPS[writes]}" "$(verdict "$ok")" "$([ -n "$PG_URL" ] && echo ' (measured on PostgreSQL)')"
ok=$(awk -v k="$RUST_PEAK_KB" 'BEGIN { print (k <= 30 * 1024) ? 1 : 0 }')
printf '  peak RSS <= 30 MB                                         %-30s %s: %s\n' "[rust]" "$(mb "$RUST_PEAK_KB")" "$(verdict "$ok")"

# Problems: any non-2xx / socket error, and what the servers logged.
problems=0
for scen in "${SCENARIOS[@]}"; do
    for name in "${servers[@]}"; do
        n=$(( NON2XX[$name.$scen] + SOCKERR[$name.$scen] ))
        if [ "$n" -gt 0 ]; then
            problems=1
            echo "PROBLEM: $name $scen: ${NON2XX[$name.$scen]} non-2xx responses, ${SOCKERR[$name.$scen]} socket errors" >&2
        fi
        if [ "${WARM_ERR[$name.$scen]:-0}" -gt 0 ]; then
            problems=1
            echo "PROBLEM: $name $scen warm-up: ${WARM_ERR[$name.$scen]} non-2xx responses or socket errors" >&2
        fi
    done
done
for name in "${servers[@]}"; do
    if [ -s "$TMP/$name.log" ]; then
        echo >&2
        echo "$name server log: $(wc -l <"$TMP/$name.log") lines; the most frequent (timestamps cut):" >&2
        sed -E 's/^\[[^]]*\] ?//' "$TMP/$name.log" | cut -c1-200 | sort | uniq -c | sort -rn | head -n 10 >&2
        echo "first lines:" >&2
        head -n 5 "$TMP/$name.log" | cut -c1-300 >&2
    fi
done
[ "$problems" = 0 ] || echo "(some requests failed: see above; --status-codes shows which codes, --keep keeps the logs)" >&2
exit 0
