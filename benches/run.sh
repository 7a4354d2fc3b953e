#!/usr/bin/env bash
# Hand-started benchmark of issues 10 and 19 (never run from CI). One run prints, for a user with 20
# tasks and wrk -t1 -c64 beside the servers (release build), interleaved so that the ratios mean
# something on a noisy machine:
#
#   this server on SQLite and on PostgreSQL, five scenarios:
#       GET /api/users/me, GET /api/{id}/tasks/{tid}, GET /api/{id}/tasks (20 tasks),
#       POST /api/{id}/tasks (on a second user), PATCH /api/{id}/tasks/{tid}/complete;
#   the ceilings they are measured against:
#       SQLite      benches/bare_route.rs, a bare actix-web route that only verifies the HS256
#                   bearer token with the server's jsonwebtoken settings and answers small JSON;
#       PostgreSQL  pgbench -M prepared -c10 running, per scenario, the statements the server
#                   sent for one such request, captured in the same run from PostgreSQL's log
#                   (log_statement = 'all' on the scratch database while the server is seeded
#                   and each request is sent five times; the server then restarts without it);
#   the Python original (benches/python_original: FastAPI + SQLModel under uvicorn, 1 worker)
#       on both backends, at -c10 (the typical sync app deadlocks above ~15 connections);
#   a login flood: 16 connections on POST /token (bcrypt 12, right password) beside the list,
#       its throughput as a share of the idle list and its p99. The flood rotates over fresh
#       accounts, each with its own X-Forwarded-For address (the server runs with
#       TRUSTED_PROXIES=127.0.0.1): logins cut off when wrk stops keep their throttle slots;
#   requests/s, p50, p99, non-2xx, socket errors, the ratio to the ceiling next to the targets,
#   and each server's RSS after startup and peak (VmHWM from /proc/PID/status).
#
# Default: 5 s per run, 2 runs per scenario and target (median), 2 s warm-ups: about 6 minutes
# after the build. --quick: 2 s, 1 run, 1 s warm-ups: about 2 minutes. See --help for the rest.
#
# PostgreSQL: --postgres URL names an existing database on a LOCAL server (127.0.0.1 only) that
# can create databases; default $BENCH_POSTGRES_URL, else
# postgres://postgres:postgres@127.0.0.1:5432/postgres. Scratch databases todo_bench_* are
# created there and dropped on exit. Capturing the statements reads the server's log (default
# the newest /var/log/postgresql/postgresql-*-main.log, else --pg-log FILE; its lines must show
# user@database, as Debian's log_line_prefix '%m [%p] %q%u@%d ' does), so run as root or as a
# user who can read it. --no-postgres runs SQLite only.
#
# Only 127.0.0.1 is targeted. Every server and wrk started here is stopped on exit (SIGTERM,
# then SIGKILL). Needs: cargo, python3, wrk, psql and pgbench (installed with apt-get
# when missing and running as root: wrk, postgresql-client, postgresql-contrib); the Python
# original's packages go into benches/.venv (pip, benches/python_original/requirements.txt).
#
# The orchestration is benches/run.py (Python standard library only); this script is the entry
# point.
set -euo pipefail
command -v python3 >/dev/null || { echo "run.sh: python3 is required" >&2; exit 1; }
exec python3 "$(cd "$(dirname "$0")" && pwd)/run.py" "$@"
