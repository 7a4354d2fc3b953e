//! Black-box test harness: every test starts the real `todo-api` binary on a free port with a
//! fresh database and talks HTTP to it, the way a client of the Python original would.
//!
//! - `Backend::Sqlite` gives each server its own database file in a temporary directory.
//! - `Backend::Postgres` creates a fresh database per server on the PostgreSQL named by
//!   `TEST_DATABASE_URL` and drops it afterwards. When that variable is unset the PostgreSQL
//!   variants say plainly that they were skipped; with `TEST_REQUIRE_POSTGRES=1` (as `.ci/run`
//!   sets) they fail instead, so CI can never pass by skipping them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

pub use reqwest::blocking::Client;
pub use reqwest::StatusCode;
pub use serde_json::{json, Value};

/// The HS256 secret every test server signs with, so tests can forge and verify tokens.
pub const TEST_SECRET: &str = "test-secret-that-is-at-least-32-bytes-long!";
pub const PASSWORD: &str = "correct horse battery";

/// Generates one `#[test]` per backend for each named function `fn name(backend: &Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&$crate::common::Backend::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() {
                if let Some(backend) = $crate::common::Backend::postgres() { super::$name(&backend) }
            } )*
        }
    };
}

#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    /// The admin URL from `TEST_DATABASE_URL`; each server gets a new database on it.
    Postgres(String),
}

impl Backend {
    /// The PostgreSQL backend, or `None` (with a message that bypasses test output capture)
    /// when `TEST_DATABASE_URL` is not set.
    pub fn postgres() -> Option<Backend> {
        match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ => {
                if std::env::var("TEST_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    panic!("TEST_REQUIRE_POSTGRES=1 but TEST_DATABASE_URL is not set");
                }
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n*** PostgreSQL tests SKIPPED: TEST_DATABASE_URL is not set ***\n"
                    );
                });
                None
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// A fresh, empty database for one server.
    pub fn fresh_database(&self) -> TestDatabase {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                TestDatabase {
                    url,
                    dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres(admin_url) => {
                let name = format!("todo_test_{}", uuid_like());
                let mut admin = postgres::Client::connect(admin_url, postgres::NoTls)
                    .expect("connect to TEST_DATABASE_URL");
                // UTF-8 with a Unicode-aware ctype, so lower() folds non-ASCII letters as SQLite's
                // registered lower() does.
                admin
                    .batch_execute(&format!(
                        "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
                         LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
                    ))
                    .expect("create test database");
                let url = replace_database_name(admin_url, &name);
                TestDatabase {
                    url,
                    dir: None,
                    postgres: Some((admin_url.clone(), name)),
                }
            }
        }
    }
}

/// A database that lives as long as the test: a temp directory, or a PostgreSQL database that
/// is dropped at the end.
pub struct TestDatabase {
    pub url: String,
    dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    /// A directory that lives as long as the database (SQLite only; a new one for PostgreSQL).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("test.db"))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = &self.postgres {
            if let Ok(mut admin) = postgres::Client::connect(admin_url, postgres::NoTls) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

pub fn replace_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running server process. Killed when dropped.
pub struct Server {
    pub child: Child,
    pub base_url: String,
    pub port: u16,
    log: Arc<Mutex<String>>,
    pub client: Client,
    /// Kept last so the database outlives the process.
    pub db: Arc<TestDatabase>,
    pub workdir: Arc<tempfile::TempDir>,
}

/// How to start a server: a backend plus extra environment.
pub struct ServerBuilder {
    db: Arc<TestDatabase>,
    env: Vec<(String, String)>,
    workdir: Option<Arc<tempfile::TempDir>>,
}

impl ServerBuilder {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Run in this working directory (e.g. one holding a `.env` file).
    pub fn workdir(mut self, dir: Arc<tempfile::TempDir>) -> Self {
        self.workdir = Some(dir);
        self
    }

    pub fn start(self) -> Server {
        try_start(self.db, self.env, self.workdir)
            .unwrap_or_else(|failure| panic!("server did not start: {failure}"))
    }

    /// Start a server that is expected to refuse to start: returns its exit status and output.
    pub fn expect_exit(self) -> (std::process::ExitStatus, String) {
        let workdir = self
            .workdir
            .unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
        let mut cmd = server_command(&self.db.url, &self.env, workdir.path());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn server");
        let output = wait_with_timeout(child, Duration::from_secs(30));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status, text)
    }
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> std::process::Output {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn server(backend: &Backend) -> ServerBuilder {
    ServerBuilder {
        db: Arc::new(backend.fresh_database()),
        env: Vec::new(),
        workdir: None,
    }
}

/// A second server on the same database (e.g. to test a restart).
pub fn server_on(db: Arc<TestDatabase>) -> ServerBuilder {
    ServerBuilder {
        db,
        env: Vec::new(),
        workdir: None,
    }
}

pub fn start(backend: &Backend) -> Server {
    server(backend).start()
}

pub fn server_command(database_url: &str, env: &[(String, String)], workdir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_todo-api"));
    cmd.current_dir(workdir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("JWT_SECRET", TEST_SECRET)
        .env("BCRYPT_COST", "4")
        // The suites register many users from 127.0.0.1; the throttle has tests of its own.
        .env("REGISTRATIONS_PER_MINUTE", "1000000")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn try_start(
    db: Arc<TestDatabase>,
    env: Vec<(String, String)>,
    workdir: Option<Arc<tempfile::TempDir>>,
) -> Result<Server, String> {
    let workdir = workdir.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
    let mut cmd = server_command(&db.url, &env, workdir.path());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let log = Arc::new(Mutex::new(String::new()));
    let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
    for stream in [
        Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().unwrap()),
    ] {
        let log = log.clone();
        let port_tx = port_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Listening on http://").nth(1) {
                    if let Some(port) = rest
                        .split_whitespace()
                        .next()
                        .and_then(|addr| addr.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                    {
                        let _ = port_tx.send(port);
                    }
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
    }
    let port = match port_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(port) => port,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!(
                "no 'Listening on' line; log:\n{}",
                log.lock().unwrap()
            ));
        }
    };
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Ok(Server {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        port,
        log,
        client,
        db,
        workdir,
    })
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Everything the server has printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Send SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Send a signal by name (`TERM`, `INT`, …).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Wait for the process to exit, returning its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.get(self.url(path))
    }
    pub fn post(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.post(self.url(path))
    }
    pub fn put(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.put(self.url(path))
    }
    pub fn patch(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.patch(self.url(path))
    }
    pub fn delete(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.delete(self.url(path))
    }

    /// Registers a user and returns the response body (panics unless 201).
    pub fn register(&self, email: &str, password: &str) -> Value {
        let response = self
            .post("/api/auth/register")
            .json(&json!({"email": email, "password": password}))
            .send()
            .unwrap();
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::CREATED, "register {email}: {body}");
        body
    }

    /// Logs in through the JSON route and returns the access token (panics unless 200).
    pub fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .post("/api/auth/login")
            .json(&json!({"email": email, "password": password}))
            .send()
            .unwrap();
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "login {email}: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    /// Registers `email` with `PASSWORD`, logs in, and returns (user, token).
    pub fn user(&self, email: &str) -> (Value, String) {
        let user = self.register(email, PASSWORD);
        let token = self.login(email, PASSWORD);
        (user, token)
    }
}

impl Server {
    /// Runs `sql` on this server's database behind its back (as an operator, or an older
    /// version of the schema, would leave it).
    pub fn execute_sql(&self, sql: &str) {
        match self.db.sqlite_path() {
            Some(path) => {
                use diesel::connection::SimpleConnection;
                use diesel::Connection;
                let mut conn = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
                conn.batch_execute(&format!("PRAGMA busy_timeout = 5000; {sql}"))
                    .unwrap();
            }
            None => {
                let mut db = ::postgres::Client::connect(&self.db.url, ::postgres::NoTls).unwrap();
                db.batch_execute(sql).unwrap();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a request and returns (status, headers, JSON body or Null).
pub fn send(
    request: reqwest::blocking::RequestBuilder,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = request.send().expect("request failed");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, headers, body)
}

/// Signs an HS256 token with `TEST_SECRET` and these claims.
pub fn hs256_token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// Appended for tests/foundation.rs: starting a server whose command the test adjusts.

impl ServerBuilder {
    /// Like `start`, but lets the test change the command before it runs, e.g. to remove a
    /// variable the harness always sets: `.start_with(|cmd| { cmd.env_remove("JWT_SECRET"); })`.
    pub fn start_with(self, customize: impl FnOnce(&mut Command)) -> Server {
        try_start_customized(self.db, self.env, self.workdir, customize)
            .unwrap_or_else(|failure| panic!("server did not start: {failure}"))
    }
}

/// `try_start` with a hook that adjusts the command before it is spawned.
fn try_start_customized(
    db: Arc<TestDatabase>,
    env: Vec<(String, String)>,
    workdir: Option<Arc<tempfile::TempDir>>,
    customize: impl FnOnce(&mut Command),
) -> Result<Server, String> {
    let workdir = workdir.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
    let mut cmd = server_command(&db.url, &env, workdir.path());
    customize(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let log = Arc::new(Mutex::new(String::new()));
    let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
    for stream in [
        Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().unwrap()),
    ] {
        let log = log.clone();
        let port_tx = port_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Listening on http://").nth(1) {
                    if let Some(port) = rest
                        .split_whitespace()
                        .next()
                        .and_then(|addr| addr.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                    {
                        let _ = port_tx.send(port);
                    }
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
    }
    let port = match port_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(port) => port,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!(
                "no 'Listening on' line; log:\n{}",
                log.lock().unwrap()
            ));
        }
    };
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Ok(Server {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        port,
        log,
        client,
        db,
        workdir,
    })
}
