#!/usr/bin/env python3
"""The benchmark behind benches/run.sh (see its header, or --help). Standard library only.

One run measures, side by side and interleaved (so that ratios mean something on a noisy
machine), for a user with 20 tasks:

  this server (release build) on SQLite and on PostgreSQL,
  its ceilings: SQLite - a bare actix-web route that only verifies the token (benches/bare_route.rs);
                PostgreSQL - pgbench -M prepared running the very statements the server sent
                for each scenario, captured from PostgreSQL's log in this run,
  the Python original (benches/python_original) on both backends,
  a login flood (POST /token, bcrypt 12) beside the 20-task list,

and prints requests/s, p50, p99, non-2xx, socket errors, the ratio to the ceiling with the
floors of issue 19, and each server's peak RSS (VmHWM). Only 127.0.0.1 is ever targeted.
"""

import argparse
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benches")
LUA = os.path.join(BENCH, "wrk")
VENV = os.path.join(BENCH, ".venv")
PASSWORD = "bench-password-1"
TASKS = 20

SCENARIOS = ["me", "task", "list", "create", "toggle"]
LABEL = {
    "me": "GET /api/users/me",
    "task": "GET /api/{id}/tasks/{tid}",
    "list": "GET /api/{id}/tasks (20)",
    "create": "POST /api/{id}/tasks",
    "toggle": "PATCH .../{tid}/complete",
}
# Issue 19's floors: the share of the ceiling measured in the same run.
SQLITE_TARGET = {"me": 0.50, "task": 0.40, "list": 0.20, "create": 0.15, "toggle": 0.15}
PG_TARGET = {"me": 0.50, "task": 0.50, "list": 0.50, "create": 0.50, "toggle": 0.50}
WRITE_P99_MS = 25.0  # SQLite create/toggle
RSS_TARGET_KB = 30 * 1024
FLOOD_SHARE_TARGET = 0.50
FLOOD_P99_MS = 25.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Fail(Exception):
    pass


def parse_args():
    p = argparse.ArgumentParser(
        prog="benches/run.sh",
        description="Benchmark this server against its ceilings and the Python original (issues 10 and 19).",
    )
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 rep, 1 s warm-ups (about 2 minutes)")
    p.add_argument("--duration", type=int, default=None, help="seconds per wrk/pgbench run (default 5)")
    p.add_argument("--reps", type=int, default=None, help="runs per scenario and target, median reported (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per scenario and target (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--python-connections", type=int, default=10,
        help="wrk connections for the Python original (default 10: the typical sync FastAPI app "
        "deadlocks above ~15, its 40 worker threads waiting on a 5+10 connection pool)",
    )
    p.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres"),
        help="an existing database on a local PostgreSQL server, used to create and drop scratch "
        "databases (default: $BENCH_POSTGRES_URL or postgres://postgres:postgres@127.0.0.1:5432/postgres)",
    )
    p.add_argument("--pg-log", default=None, help="PostgreSQL's server log, read to capture the statements "
                   "(default: /var/log/postgresql/postgresql-*-main.log, the newest)")
    p.add_argument("--pgbench-clients", type=int, default=10, help="pgbench clients (default 10)")
    p.add_argument("--pgbench-jobs", type=int, default=1, help="pgbench threads (default 1, as wrk -t1)")
    p.add_argument("--flood-connections", type=int, default=16, help="login flood connections (default 16)")
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    p.add_argument("--no-python", action="store_true", help="skip the Python original")
    p.add_argument("--no-flood", action="store_true", help="skip the login flood")
    p.add_argument("--status-codes", action="store_true", help="have wrk count responses per status code")
    p.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, wrk/pgbench outputs, scripts)")
    a = p.parse_args()
    if a.quick:
        a.duration = a.duration or 2
        a.reps = a.reps or 1
        a.warmup = a.warmup if a.warmup is not None else 1
    a.duration = a.duration or 5
    a.reps = a.reps or 2
    a.warmup = a.warmup if a.warmup is not None else 2
    if not 1 <= a.duration <= 120:
        p.error("--duration must be 1..120 seconds")
    if not 1 <= a.reps <= 9:
        p.error("--reps must be 1..9")
    if not 0 <= a.warmup <= 30:
        p.error("--warmup must be 0..30 seconds")
    if not 1 <= a.flood_connections * a.reps <= 250:
        p.error("--flood-connections times --reps must be 1..250 (one account and address each)")
    if not 1 <= a.threads <= min(a.connections, a.python_connections):
        p.error("--threads must be between 1 and the number of connections")
    return a


# ---- processes and cleanup --------------------------------------------------------------------

PROCS = {}  # name -> Popen (servers and background wrk)


def stop(name):
    proc = PROCS.pop(name, None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def http(method, url, token=None, body=None, form=None, want=None):
    headers = {"Accept": "application/json"}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    if form is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        data = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    if want is not None and status != want:
        raise Fail(f"{method} {url}: HTTP {status} (expected {want}): {raw[:300]!r}")
    return json.loads(raw) if raw else None


class Server:
    """A server process on 127.0.0.1 with its seeded users."""

    def __init__(self, name, kind, backend, cmd, env, cwd, tmp, ready_path):
        self.name, self.kind, self.backend = name, kind, backend
        self.cmd, self.env, self.cwd, self.tmp, self.ready_path = cmd, env, cwd, tmp, ready_path
        self.port = None
        self.pid = None
        self.idle_kb = 0

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Starts the server in a session of its own, as a service manager would. With the
        kernel's autogroup scheduling (sched_autogroup_enabled, the default on desktops and on
        this machine), CPU time is shared between sessions first: a server left in this script's
        session would share its slice with wrk, and the nice 10 its bcrypt threads run at would
        only order it within that group. PostgreSQL, a daemon, has a session of its own; under
        a login flood its backends then waited behind the group of server and wrk, and the list
        read beside the flood had a p99 of 120-280 ms (17 ms with the server in its own session,
        or with autogroup off)."""
        self.port = free_port()
        env = dict(self.env, PORT=str(self.port))
        logf = open(os.path.join(self.tmp, f"{self.name}.log"), "ab")
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        proc = subprocess.Popen(cmd, env=env, cwd=self.cwd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        PROCS[self.name] = proc
        self.pid = proc.pid
        deadline = time.time() + 90
        while time.time() < deadline:
            if proc.poll() is not None:
                raise Fail(f"{self.name} exited at startup:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.base + self.ready_path, timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # answering at all is ready (the bare route answers 401 without a token)
            except OSError:
                time.sleep(0.3)
        else:
            raise Fail(f"{self.name} not ready after 90 s:\n{self.log_tail()}")
        self.idle_kb = rss_kb(self.pid, "VmRSS")

    def log_tail(self, n=30):
        try:
            with open(os.path.join(self.tmp, f"{self.name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def seed(self, flooders=0):
        """A reader with 20 tasks (all reads and the toggle), a writer (creates), and `flooders`
        accounts for the login flood (never logged in before it)."""
        with ThreadPoolExecutor(4) as pool:
            self.flooders = list(pool.map(self.register, [f"bench-flood-{i}@example.com" for i in range(1, flooders + 1)]))
        self.users = {}
        for role in ("reader", "writer"):
            email = self.register(f"bench-{role}@example.com")
            token = http("POST", self.base + "/api/auth/login", body={"email": email, "password": PASSWORD}, want=200)["access_token"]
            uid = http("GET", self.base + "/api/users/me", token=token, want=200)["id"]
            self.users[role] = {"email": email, "token": token, "id": uid}
        r = self.users["reader"]
        ids = []
        for i in range(1, TASKS + 1):
            t = http("POST", f"{self.base}/api/{r['id']}/tasks", token=r["token"], want=201, body={
                "title": f"Seeded task {i}",
                "description": f"Task number {i}, seeded for the read benchmark",
                "completed": i % 3 == 0,
            })
            ids.append(t["id"])
        self.task_id = ids[0]
        page = http("GET", f"{self.base}/api/{r['id']}/tasks", token=r["token"], want=200)
        if len(page) != TASKS:
            raise Fail(f"{self.name}: {len(page)} tasks listed after seeding, expected {TASKS}")

    def register(self, email):
        http("POST", self.base + "/api/auth/register", body={"email": email, "password": PASSWORD, "name": "Bench"}, want=201)
        return email

    def request(self, scen):
        """(method, path, token, lua script) of a scenario."""
        r, w = self.users["reader"], self.users["writer"]
        return {
            "me": ("GET", "/api/users/me", r["token"], "auth_get.lua"),
            "task": ("GET", f"/api/{r['id']}/tasks/{self.task_id}", r["token"], "auth_get.lua"),
            "list": ("GET", f"/api/{r['id']}/tasks", r["token"], "auth_get.lua"),
            "create": ("POST", f"/api/{w['id']}/tasks", w["token"], "auth_post_task.lua"),
            "toggle": ("PATCH", f"/api/{r['id']}/tasks/{self.task_id}/complete", r["token"], "auth_patch.lua"),
        }[scen]


# ---- wrk and pgbench --------------------------------------------------------------------------


def wrk_ms(text):
    m = re.match(r"([0-9.]+)(us|ms|s|m|h)$", text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000, "h": 3600000}[m.group(2)]


def parse_wrk(out):
    r = {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "non2xx": 0, "sockerr": 0, "statuses": ""}
    m = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50%", "p50"), ("99%", "p99")):
        m = re.search(rf"^\s+{re.escape(pct)}\s+(\S+)", out, re.M)
        if m:
            r[key] = wrk_ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["sockerr"] = sum(int(x) for x in m.groups())
    r["statuses"] = ",".join(f"{a}={b}" for a, b in re.findall(r"^status (\d+): (\d+)", out, re.M))
    return r


def wrk_cmd(args, url, script, conns, duration, timeout="5s"):
    return ["wrk", f"-t{min(args.threads, conns)}", f"-c{conns}", f"-d{duration}s", f"--timeout={timeout}",
            "--latency", "-s", os.path.join(LUA, script), url]


def wrk_env(args, token=None, extra=None):
    env = dict(os.environ, BENCH_LUA_DIR=LUA, BENCH_STATUS="1" if args.status_codes else "0")
    if token:
        env["BENCH_TOKEN"] = token
    env.update(extra or {})
    return env


def run_wrk(args, tmp, tag, server, scen, duration, conns):
    _method, path, token, script = server.request(scen)
    return wrk_once(args, tmp, tag, server.base + path, script, token, conns, duration)


def wrk_once(args, tmp, tag, url, script, token, conns, duration):
    """One wrk run, its output kept in tmp; the parsed figures."""
    cmd = wrk_cmd(args, url, script, conns, duration)
    out = subprocess.run(cmd, env=wrk_env(args, token), capture_output=True, text=True, timeout=duration + 60)
    with open(os.path.join(tmp, f"wrk.{tag}.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n" + out.stdout + out.stderr)
    if out.returncode != 0:
        raise Fail(f"wrk failed ({tag}): {out.stdout}{out.stderr}")
    return parse_wrk(out.stdout)


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


def run_pgbench(args, tmp, tag, pg_db_url, script, defines, duration):
    prefix = os.path.join(tmp, f"pgbench.{tag}")
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(args.pgbench_clients), "-j", str(args.pgbench_jobs),
           "-T", str(duration), "-f", script, "-l", f"--log-prefix={prefix}"]
    for k, v in defines.items():
        cmd += ["-D", f"{k}={v}"]
    cmd.append(pg_db_url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, cwd=tmp)
    with open(prefix + ".txt", "w") as f:
        f.write(" ".join(cmd[:-1]) + " <url>\n" + out.stdout + out.stderr)
    if out.returncode != 0:
        raise Fail(f"pgbench failed ({tag}):\n{out.stdout}{out.stderr}")
    r = {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "non2xx": 0, "sockerr": 0, "statuses": ""}
    m = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out.stdout, re.M) or \
        re.search(r"^tps = ([0-9.]+)", out.stdout, re.M)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if m:
        r["non2xx"] = int(m.group(1))
    lat = []
    for path in glob.glob(prefix + ".*"):
        if path.endswith(".txt"):
            continue
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]) / 1000.0)
                elif len(parts) >= 3:
                    r["non2xx"] += 1
        os.unlink(path)  # large; the summary stays
    r["p50"], r["p99"] = percentile(lat, 0.50), percentile(lat, 0.99)
    return r


# ---- PostgreSQL: scratch databases and the statements the server sends -------------------------


def psql(url, sql):
    out = subprocess.run(["psql", url, "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise Fail(f"psql: {sql}: {out.stderr.strip()}")
    return out.stdout.strip()


def with_db(url, name, scheme=None):
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((scheme or p.scheme, p.netloc, "/" + name, p.query, ""))


def find_pg_log(args):
    if args.pg_log:
        return args.pg_log
    logs = sorted(glob.glob("/var/log/postgresql/postgresql-*-main.log"), key=os.path.getmtime)
    if not logs:
        raise Fail("cannot find PostgreSQL's log: pass --pg-log FILE")
    return logs[-1]


PARAM = re.compile(r"\$(\d+) = (NULL|'(?:[^']|'')*')")


def parse_pg_log(text, db):
    """Statements logged for database `db`: a list of [sql, {n: value or None}]."""
    entries = []
    current = None
    line_re = re.compile(r"@" + re.escape(db) + r" (LOG|DETAIL|ERROR|STATEMENT):  (.*)$")
    for line in text.split("\n"):
        m = line_re.search(line)
        if m:
            kind, rest = m.groups()
            current = None
            if kind == "LOG":
                s = re.match(r"(?:execute [^:]*|statement): (.*)$", rest)
                if s:
                    current = [s.group(1), {}]
                    entries.append(current)
            elif kind == "DETAIL" and entries and rest.startswith("parameters: "):
                entries[-1][1] = {
                    int(n): (None if v == "NULL" else v[1:-1].replace("''", "'"))
                    for n, v in PARAM.findall(rest[len("parameters: "):])
                }
                current = entries[-1]
        elif current is not None and line.startswith("\t"):
            if current[1]:
                continue  # continuation of the parameters line: not expected, ignore
            current[0] += "\n" + line[1:]
        elif not re.match(r"^\d{4}-\d\d-\d\d ", line):
            continue
        else:
            current = None
    return entries


def capture_statements(args, tmp, server, admin_url, db, pg_log, reps=5):
    """Runs each scenario `reps` times between marker statements; per scenario, the sequence of
    statements seen most often (so a pool connection's first-use setup does not count)."""
    start = os.path.getsize(pg_log)
    db_url = with_db(admin_url, db)
    for scen in SCENARIOS:
        for i in range(reps):
            psql(db_url, f"SELECT 'bench-capture {scen} {i}'")
            method, path, token, _ = server.request(scen)
            body = {"title": "Benchmark task", "description": "written by wrk", "completed": False} \
                if scen == "create" else None
            http(method, server.base + path, token=token, body=body, want=201 if scen == "create" else 200)
    psql(db_url, "SELECT 'bench-capture end'")
    time.sleep(0.5)
    with open(pg_log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    with open(os.path.join(tmp, "pg-capture.log"), "w") as f:
        f.write(text)
    entries = parse_pg_log(text, db)
    runs, cur = {}, None
    for sql, params in entries:
        m = re.match(r"SELECT 'bench-capture (\w+)(?: \d+)?'$", sql)
        if m:
            cur = None if m.group(1) == "end" else m.group(1)
            if cur:
                runs.setdefault(cur, []).append([])
            continue
        if cur:
            runs[cur][-1].append((sql, params))
    found = {}
    for scen in SCENARIOS:
        seqs = runs.get(scen, [])
        if not seqs or not any(seqs):
            raise Fail(f"no statements captured for {scen} from {pg_log} (is it this server's log, "
                       f"with log_line_prefix showing %d as user@db? see {tmp}/pg-capture.log with --keep)")
        keyed = Counter(tuple(s for s, _ in seq) for seq in seqs)
        best = keyed.most_common(1)[0][0]
        found[scen] = next(seq for seq in reversed(seqs) if tuple(s for s, _ in seq) == best)
    return found


def pgbench_script(tmp, scen, statements):
    """A pgbench script with the captured statements; their parameters become variables
    (-D), so -M prepared sends them as parameters, as the server does."""
    lines, defines = [], {}
    for k, (sql, params) in enumerate(statements, 1):
        def sub(m):
            n = int(m.group(1))
            v = params.get(n)
            if v is None:
                return "NULL"
            defines[f"s{k}p{n}"] = v
            return f":s{k}p{n}"
        text = re.sub(r"\$(\d+)\b", sub, sql).strip().rstrip(";")
        lines.append(" ".join(text.split("\n")) + ";")
    path = os.path.join(tmp, f"pgbench.{scen}.sql")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, defines


# ---- main -------------------------------------------------------------------------------------


def need(cmd, package):
    if shutil.which(cmd):
        return
    if os.geteuid() != 0:
        raise Fail(f"{cmd} is missing: apt-get install -y {package}")
    log(f"installing {package} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", package], env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", package], env=env, capture_output=True, check=True)
    if not shutil.which(cmd):
        raise Fail(f"{cmd} still missing after apt-get install {package}")


def build(args, tmp):
    server_bin = os.path.join(ROOT, "target", "release", "todo-api")
    if args.no_build:
        candidates = [p for p in glob.glob(os.path.join(ROOT, "target", "release", "deps", "bare_route-*"))
                      if os.access(p, os.X_OK) and not p.endswith(".d")]
        if not os.access(server_bin, os.X_OK) or not candidates:
            raise Fail("--no-build: no release build of todo-api and bare_route under target/release")
        return server_bin, max(candidates, key=os.path.getmtime)
    log("cargo build --release (server and benches/bare_route.rs; minutes from clean)")
    blog = os.path.join(tmp, "build.log")
    with open(blog, "w") as f:
        if subprocess.run(["cargo", "build", "--release", "--bin", "todo-api"], cwd=ROOT, stdout=f, stderr=f).returncode:
            raise Fail("release build failed:\n" + open(blog).read()[-3000:])
    out = subprocess.run(["cargo", "build", "--release", "--bench", "bare_route", "--message-format=json"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise Fail("bare_route build failed:\n" + out.stderr[-3000:])
    bare = None
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "bare_route" \
                and msg.get("executable"):
            bare = msg["executable"]
    if not bare:
        raise Fail("cargo did not report the bare_route executable")
    return server_bin, bare


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    ok = os.access(py, os.X_OK) and subprocess.run(
        [py, "-c", "import fastapi, sqlmodel, jwt, bcrypt, psycopg, multipart, uvicorn"], capture_output=True).returncode == 0
    if not ok:
        log(f"creating {VENV} (pip install -r benches/python_original/requirements.txt)")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "-r", os.path.join(BENCH, "python_original", "requirements.txt")], check=True)
    return py


def base_env():
    """A clean environment: none of the caller's server settings leak into the servers."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def median_result(results):
    if not results:
        return None
    return {
        "rps": statistics.median(r["rps"] for r in results),
        "p50": statistics.median(r["p50"] for r in results),
        "p99": statistics.median(r["p99"] for r in results),
        "non2xx": sum(r["non2xx"] for r in results),
        "sockerr": sum(r["sockerr"] for r in results),
        "runs": [round(r["rps"]) for r in results],
        "statuses": " ".join(r["statuses"] for r in results if r["statuses"]),
    }


def main():
    args = parse_args()
    tmp = tempfile.mkdtemp(prefix="todo-bench.")
    dbs = []
    admin = None
    t0 = time.time()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with it ignored, which Python would inherit.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        need("wrk", "wrk")
        use_pg = not args.no_postgres
        if use_pg:
            need("psql", "postgresql-client")
            need("pgbench", "postgresql-contrib")
            admin = args.postgres
            host = urllib.parse.urlsplit(admin).hostname or ""
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise Fail(f"--postgres: only a local server (127.0.0.1) may be used, got host {host!r}")
            psql(admin, "SELECT 1")
            pg_log = find_pg_log(args)
            if not os.access(pg_log, os.R_OK):
                raise Fail(f"cannot read PostgreSQL's log {pg_log} (run as root, or pass --pg-log)")
        server_bin, bare_bin = build(args, tmp)
        py = None if args.no_python else ensure_venv()

        secret = secrets.token_hex(32)
        # TRUSTED_PROXIES: the login flood gives each account its own client address in
        # X-Forwarded-For (see benches/wrk/token_form.lua); nothing else reads it.
        rust_env = dict(base_env(), JWT_SECRET=secret, RUST_LOG="warn", HOST="127.0.0.1",
                        ACCESS_TOKEN_EXPIRE_MINUTES="600", TRUSTED_PROXIES="127.0.0.1")
        py_env = dict(base_env(), JWT_SECRET=secret, ACCESS_TOKEN_EXPIRE_MINUTES="600", PYTHONDONTWRITEBYTECODE="1")
        py_cmd = [py or "python3", "-m", "uvicorn", "app:app", "--app-dir", os.path.join(BENCH, "python_original"),
                  "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]

        servers = {}
        bare = Server("bare", "ceiling", "SQLite", [bare_bin], dict(base_env(), JWT_SECRET=secret), tmp, tmp, "/")
        servers["rust-sqlite"] = Server("rust-sqlite", "rust", "SQLite", [server_bin],
                                        dict(rust_env, DATABASE_URL=f"sqlite://{tmp}/rust.db"), tmp, tmp, "/health")
        pg_stmts = {}
        if use_pg:
            tag = f"{os.getpid()}_{secrets.token_hex(3)}"
            rust_db = f"todo_bench_rust_{tag}"
            psql(admin, f'CREATE DATABASE "{rust_db}"')
            dbs.append(rust_db)
            rust_pg_url = with_db(admin, rust_db)
            servers["rust-pg"] = Server("rust-pg", "rust", "PostgreSQL", [server_bin],
                                        dict(rust_env, DATABASE_URL=rust_pg_url), tmp, tmp, "/health")
        if py:
            servers["py-sqlite"] = Server("py-sqlite", "python", "SQLite", py_cmd,
                                          dict(py_env, DATABASE_URL=f"sqlite:///{tmp}/python.db"), tmp, tmp, "/openapi.json")
            if use_pg:
                py_db = f"todo_bench_python_{tag}"
                psql(admin, f'CREATE DATABASE "{py_db}"')
                dbs.append(py_db)
                servers["py-pg"] = Server("py-pg", "python", "PostgreSQL", py_cmd,
                                          dict(py_env, DATABASE_URL=with_db(admin, py_db, "postgresql+psycopg")),
                                          tmp, tmp, "/openapi.json")

        log("starting the servers and seeding them (bcrypt cost 12 on every register and login)")
        bare.start()
        for name, s in servers.items():
            if name == "rust-pg":
                # This session only: the server's connections log every statement while it is
                # seeded and each scenario is sent a few times; then it restarts without logging.
                psql(admin, f'ALTER DATABASE "{rust_db}" SET log_statement = \'all\'')
            s.start()
            # Fresh flood accounts for each run: a login cut off at the end of a run keeps its
            # throttle slot for a minute.
            s.seed(args.flood_connections * args.reps if s.kind == "rust" and not args.no_flood else 0)
            log(f"  {name}: 127.0.0.1:{s.port}, pid {s.pid}, seeded")
        if use_pg:
            s = servers["rust-pg"]
            pg_stmts = capture_statements(args, tmp, s, admin, rust_db, pg_log)
            stop("rust-pg")
            psql(admin, f'ALTER DATABASE "{rust_db}" RESET log_statement')
            s.start()  # a fresh process, so its peak RSS is the benchmark's
            scripts = {scen: pgbench_script(tmp, scen, pg_stmts[scen]) for scen in SCENARIOS}
            log(f"  captured the statements of each scenario from {pg_log}; rust-pg restarted without logging")

        order = list(servers)
        # ---- scenarios, interleaved ----
        results = {}  # (target, scen) -> [result]
        warm_problems = []
        for scen in SCENARIOS:
            log(f"scenario {scen}: {LABEL[scen]}")
            targets = []
            for name in order:
                targets.append(name)
                if name == "rust-pg":
                    targets.append("pgbench")
            if scen == "me":
                targets.insert(1, "bare")
            if args.warmup:
                for name in targets:
                    if name == "pgbench":
                        continue
                    if name == "bare":
                        r = run_bare(args, tmp, "bare.warmup", bare, servers["rust-sqlite"], args.warmup)
                    else:
                        s = servers[name]
                        conns = args.python_connections if s.kind == "python" else args.connections
                        r = run_wrk(args, tmp, f"{name}.{scen}.warmup", s, scen, args.warmup, conns)
                    if r["non2xx"] or r["sockerr"]:
                        warm_problems.append(f"{name} {scen} warm-up: {r['non2xx']} non-2xx, {r['sockerr']} socket errors")
            for rep in range(1, args.reps + 1):
                for name in targets:
                    time.sleep(0.5)
                    tag = f"{name}.{scen}.{rep}"
                    if name == "pgbench":
                        script, defines = scripts[scen]
                        r = run_pgbench(args, tmp, tag, rust_pg_url, script, defines, args.duration)
                    elif name == "bare":
                        r = run_bare(args, tmp, tag, bare, servers["rust-sqlite"], args.duration)
                    else:
                        s = servers[name]
                        conns = args.python_connections if s.kind == "python" else args.connections
                        r = run_wrk(args, tmp, tag, s, scen, args.duration, conns)
                    results.setdefault((name, scen), []).append(r)
                    log(f"  {name:11} #{rep}: {r['rps']:9.0f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms"
                        f"  non-2xx {r['non2xx']}  socket errors {r['sockerr']}")

        # ---- login flood beside the list ----
        flood = {}
        if not args.no_flood:
            for name in [n for n in order if servers[n].kind == "rust"]:
                s = servers[name]
                log(f"login flood on {name}: {args.flood_connections} connections on POST /token beside the list")
                for rep in range(1, args.reps + 1):
                    first = (rep - 1) * args.flood_connections
                    accounts = s.flooders[first:first + args.flood_connections]
                    f_out = open(os.path.join(tmp, f"wrk.{name}.flood-token.{rep}.txt"), "w")
                    fl_cmd = wrk_cmd(args, s.base + "/token", "token_form.lua", args.flood_connections,
                                     args.duration + 3, timeout="20s")
                    fl = subprocess.Popen(fl_cmd, env=wrk_env(args, extra={
                        "BENCH_USERNAMES": ",".join(accounts),
                        # TEST-NET-1 (RFC 5737): only header text, one client address per account.
                        "BENCH_FORWARDED_FOR": ",".join(f"192.0.2.{first + i + 1}" for i in range(len(accounts))),
                        "BENCH_PASSWORD": PASSWORD}),
                        stdout=f_out, stderr=subprocess.STDOUT)
                    PROCS["flood"] = fl
                    time.sleep(1.5)  # the flood is at full strength
                    r = run_wrk(args, tmp, f"{name}.flood-list.{rep}", s, "list", args.duration, args.connections)
                    fl.wait(timeout=args.duration + 60)
                    PROCS.pop("flood", None)
                    f_out.close()
                    with open(f_out.name) as f:
                        fr = parse_wrk(f.read())
                    flood.setdefault(name, []).append((r, fr))
                    log(f"  {name} #{rep}: list {r['rps']:.0f} req/s p99 {r['p99']:.2f} ms; "
                        f"/token {fr['rps']:.1f} req/s, non-2xx {fr['non2xx']}, socket errors {fr['sockerr']}")

        peaks = {name: rss_kb(s.pid, "VmHWM") for name, s in servers.items()}
        peaks["bare"] = rss_kb(bare.pid, "VmHWM")
        alive = {name: PROCS.get(name) is not None and PROCS[name].poll() is None for name in list(servers) + ["bare"]}
        report(args, servers, bare, results, flood, peaks, alive, pg_stmts, warm_problems, time.time() - t0)
        return 0
    except Fail as e:
        print(f"run.sh: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.sh: interrupted", file=sys.stderr)
        return 130
    finally:
        for name in list(PROCS):
            stop(name)
        for db in dbs:
            try:
                psql(admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except Exception:  # noqa: BLE001 - report and go on cleaning
                print(f"run.sh: could not drop database {db}", file=sys.stderr)
        if args.keep:
            print(f"kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_bare(args, tmp, tag, bare, like, duration):
    """The bare route, sent the real server's /api/users/me request with the real token."""
    token = like.users["reader"]["token"]
    url = bare.base + "/api/users/me"
    return wrk_once(args, tmp, tag, url, "auth_get.lua", token, args.connections, duration)


# ---- the report -------------------------------------------------------------------------------


def fnum(v, nd=0):
    if v is None or v != v:
        return "-"
    return f"{v:,.{nd}f}"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def line(r):
        return " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def report(args, servers, bare, results, flood, peaks, alive, pg_stmts, warm_problems, elapsed):
    med = {k: median_result(v) for k, v in results.items()}
    misses, problems = [], list(warm_problems)
    print()
    print(f"== todo-api benchmark {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ==")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"machine: {os.cpu_count()} cores, load average {load}; run took {elapsed:.0f} s")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency beside the servers "
          f"(Python original: -c{args.python_connections}); pgbench -M prepared -c{args.pgbench_clients} "
          f"-j{args.pgbench_jobs} -T{args.duration}; median of {args.reps} run(s), {args.warmup} s warm-up; "
          f"non-2xx and socket errors summed over the runs")
    print(f"user with {TASKS} tasks; create on a second user; toggle flips one of the {TASKS}")
    print()

    def verdict(ok):
        return "ok" if ok else "MISSED"

    for backend, name, ceiling, targets in (("SQLite", "rust-sqlite", "bare", SQLITE_TARGET),
                                           ("PostgreSQL", "rust-pg", "pgbench", PG_TARGET)):
        if name not in servers:
            continue
        print(f"-- this server on {backend}; ceiling: " + (
            "bare actix-web route that only verifies the HS256 token (benches/bare_route.rs)"
            if ceiling == "bare" else "pgbench running the same statements (below)"))
        rows = []
        for scen in SCENARIOS:
            m = med.get((name, scen))
            c = med.get((ceiling, "me" if ceiling == "bare" else scen))
            ratio = m["rps"] / c["rps"] if m and c and c["rps"] else float("nan")
            goal = targets[scen]
            tgt = f">= {goal:.0%}"
            ok = ratio >= goal
            if backend == "SQLite" and scen in ("create", "toggle"):
                tgt += f", p99 <= {WRITE_P99_MS:.0f} ms"
                ok = ok and m["p99"] <= WRITE_P99_MS
            if m["non2xx"] or m["sockerr"]:
                ok = False
                problems.append(f"{name} {scen}: {m['non2xx']} non-2xx, {m['sockerr']} socket errors")
            if c and (c["non2xx"] or c["sockerr"]):
                problems.append(f"{ceiling} {scen}: {c['non2xx']} failures, {c['sockerr']} socket errors")
            if not ok:
                misses.append(f"{backend} {LABEL[scen]}: {ratio:.0%} of the ceiling (target {tgt})")
            rows.append([LABEL[scen], fnum(m["rps"]), fnum(m["p50"], 2), fnum(m["p99"], 2), m["non2xx"], m["sockerr"],
                         fnum(c["rps"]) if c else "-", fnum(c["p99"], 2) if c else "-",
                         f"{ratio:.0%}" if ratio == ratio else "-", tgt, verdict(ok)])
        print(table(rows, ["scenario", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err",
                           "ceiling/s", "ceil p99", "ratio", "target", ""]))
        print()

    py_names = [n for n in servers if servers[n].kind == "python"]
    if py_names:
        print("-- the Python original (FastAPI + SQLModel, uvicorn, 1 worker), and this server's speed-up")
        rows = []
        for pn in py_names:
            rn = "rust-pg" if servers[pn].backend == "PostgreSQL" else "rust-sqlite"
            for scen in SCENARIOS:
                m, r = med.get((pn, scen)), med.get((rn, scen))
                if m["non2xx"] or m["sockerr"]:
                    problems.append(f"{pn} {scen}: {m['non2xx']} non-2xx, {m['sockerr']} socket errors")
                rows.append([servers[pn].backend, LABEL[scen], fnum(m["rps"]), fnum(m["p50"], 2), fnum(m["p99"], 2),
                             m["non2xx"], m["sockerr"], f"{r['rps'] / m['rps']:.1f}x" if m["rps"] else "-"])
        print(table(rows, ["backend", "scenario", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err", "this server"]))
        print()

    if flood:
        print(f"-- login flood: {args.flood_connections} connections on POST /token (bcrypt 12, right password, "
              f"round-robin over {args.flood_connections} accounts and client addresses) beside the list at -c{args.connections}")
        rows = []
        for name, runs in flood.items():
            idle = med[(name, "list")]
            rps = statistics.median(r["rps"] for r, _ in runs)
            p99 = statistics.median(r["p99"] for r, _ in runs)
            p50 = statistics.median(r["p50"] for r, _ in runs)
            errs = sum(r["non2xx"] + r["sockerr"] for r, _ in runs)
            f_rps = statistics.median(f["rps"] for _, f in runs)
            f_err = sum(f["non2xx"] + f["sockerr"] for _, f in runs)
            share = rps / idle["rps"] if idle["rps"] else float("nan")
            ok = share >= FLOOD_SHARE_TARGET and p99 <= FLOOD_P99_MS and errs == 0 and f_err == 0
            if not ok:
                misses.append(f"{servers[name].backend} login flood: list at {share:.0%} of idle, p99 {p99:.1f} ms")
            if errs or f_err:
                problems.append(f"{name} flood: list {errs} failures, /token {f_err} non-2xx or socket errors")
            rows.append([servers[name].backend, fnum(idle["rps"]), fnum(rps), f"{share:.0%}", fnum(p50, 2), fnum(p99, 2),
                         errs, fnum(f_rps, 1), f_err, f">= {FLOOD_SHARE_TARGET:.0%}, p99 <= {FLOOD_P99_MS:.0f} ms",
                         verdict(ok)])
        print(table(rows, ["backend", "idle list/s", "under flood/s", "share", "p50 ms", "p99 ms", "errors",
                           "/token per s", "/token err", "target", ""]))
        print()

    print("-- memory (VmRSS after startup and seeding; VmHWM, the peak, at the end)")
    rows = []
    for name, s in list(servers.items()) + [("bare", bare)]:
        target = ""
        if s.kind == "rust":
            ok = peaks[name] <= RSS_TARGET_KB
            target = f"<= 30 MB: {verdict(ok)}"
            if not ok:
                misses.append(f"{name} peak RSS {peaks[name] / 1024:.1f} MB")
        if not alive.get(name, True):
            problems.append(f"{name} was no longer running at the end")
        rows.append([name, f"{s.idle_kb / 1024:.1f} MB", f"{peaks[name] / 1024:.1f} MB", target])
    print(table(rows, ["server", "idle RSS", "peak RSS", "target"]))
    print()

    if pg_stmts:
        print("-- pgbench scripts: the statements rust-pg sent for one request of each scenario "
              "(captured with log_statement = 'all' in this run; $n became pgbench variables)")
        for scen in SCENARIOS:
            print(f"{LABEL[scen]}:")
            for sql, _ in pg_stmts[scen]:
                print(f"    {' '.join(sql.split())}")
        print()

    if args.status_codes:
        print("-- status codes per run")
        for (name, scen), m in sorted(med.items()):
            if m["statuses"]:
                print(f"  {name:11} {scen:7} {m['statuses']}")
        print()
    print("runs (req/s): " + "; ".join(f"{n} {s} {m['runs']}" for (n, s), m in med.items()))
    print()
    if misses:
        print("targets missed (this machine is shared and small: read with care):")
        for m in misses:
            print(f"  - {m}")
    else:
        print("all targets met")
    if problems:
        print("PROBLEMS (errors must be zero):")
        for p in problems:
            print(f"  - {p}")
        for name in list(servers) + ["bare"]:
            s = bare if name == "bare" else servers[name]
            tail = s.log_tail(5).strip()
            if tail:
                print(f"  {name} log, last lines:\n    " + tail.replace("\n", "\n    "))
    else:
        print("no errors, no non-2xx")


if __name__ == "__main__":
    sys.exit(main())
