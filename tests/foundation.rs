//! Issue 2, "Foundation": health, migrations, configuration (environment and `.env`),
//! `sqlite::memory:`, database outages, graceful shutdown and dropped requests.
//!
//! Every test starts the real binary; the PostgreSQL variants run when `TEST_DATABASE_URL` is
//! set. The outage test starts a private PostgreSQL instance of its own (never the shared one).

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

on_both_backends!(
    health_reports_ok,
    fresh_database_is_migrated_and_usable,
    restart_on_already_migrated_database_keeps_data,
    bad_database_url_is_refused,
    bad_port_is_refused,
    short_jwt_secret_is_refused,
    jwt_secret_of_32_bytes_is_accepted,
    non_number_bcrypt_cost_is_refused,
    non_number_token_lifetime_is_refused,
    dotenv_sets_variables_the_environment_lacks,
    environment_wins_over_dotenv,
    invalid_value_in_dotenv_is_refused,
    dotenv_jwt_secret_is_used_when_environment_has_none,
    unset_jwt_secret_starts_with_warning_and_random_key,
    better_auth_secret_is_an_alias_for_jwt_secret,
    sigterm_lets_in_flight_request_finish,
    sigint_lets_in_flight_request_finish,
    dropped_and_malformed_requests_do_not_break_server,
);

/// A secret of at least 32 bytes that differs from `TEST_SECRET`.
const OTHER_SECRET: &str = "another-secret-that-is-also-32-bytes-or-more";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The claims of `token` if it is a valid HS256 token signed with `secret`, else `None`.
fn verify_with(token: &str, secret: &str) -> Option<Value> {
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .ok()
        .map(|data| data.claims)
}

/// Logs in through the JSON route and returns the whole body.
fn login_body(srv: &Server, email: &str) -> Value {
    let (status, _, body) = send(
        srv.post("/api/auth/login")
            .json(&json!({"email": email, "password": PASSWORD})),
    );
    assert_eq!(status, StatusCode::OK, "login {email}: {body}");
    body
}

fn me_status(srv: &Server, token: &str) -> StatusCode {
    send(srv.get("/api/users/me").bearer_auth(token)).0
}

fn assert_health_ok(srv: &Server) {
    let (status, headers, body) = send(srv.get("/health"));
    assert_eq!(status, StatusCode::OK, "GET /health: {body}");
    assert_eq!(body, json!({"status": "ok", "database": "ok"}));
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        content_type.starts_with("application/json"),
        "GET /health content type: {content_type:?}"
    );
}

fn assert_no_panic(srv: &Server) {
    let log = srv.log();
    assert!(
        !log.contains("panicked"),
        "the server panicked; log:\n{log}"
    );
}

/// Checks how a server that refused its configuration ended: non-zero exit, exactly one line
/// naming `variable`, no panic or backtrace.
fn assert_refused(status: std::process::ExitStatus, output: &str, variable: &str) {
    assert!(
        !status.success(),
        "the server should refuse a bad {variable} and exit non-zero; it exited with {status}; \
         output:\n{output}"
    );
    let naming: Vec<&str> = output.lines().filter(|l| l.contains(variable)).collect();
    assert_eq!(
        naming.len(),
        1,
        "expected one line naming {variable}; output:\n{output}"
    );
    assert!(
        !output.contains("panicked"),
        "refusing a bad {variable} must not panic; output:\n{output}"
    );
    assert!(
        !output.to_lowercase().contains("backtrace"),
        "refusing a bad {variable} must not print a backtrace; output:\n{output}"
    );
}

fn refuse(backend: &Backend, variable: &str, value: &str) {
    let (status, output) = server(backend).env(variable, value).expect_exit();
    assert_refused(status, &output, variable);
}

/// A working directory holding a `.env` file with `contents`.
fn dir_with_dotenv(contents: &str) -> Arc<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), contents).unwrap();
    Arc::new(dir)
}

fn create_task(srv: &Server, token: &str, title: &str) -> Value {
    let (status, _, task) = send(
        srv.post("/api/me/tasks")
            .bearer_auth(token)
            .json(&json!({"title": title})),
    );
    assert_eq!(status, StatusCode::CREATED, "create task {title:?}: {task}");
    task
}

fn list_titles(srv: &Server, token: &str) -> Vec<String> {
    let (status, _, body) = send(srv.get("/api/me/tasks").bearer_auth(token));
    assert_eq!(status, StatusCode::OK, "list tasks: {body}");
    body.as_array()
        .unwrap_or_else(|| panic!("task list is not an array: {body}"))
        .iter()
        .map(|t| t["title"].as_str().unwrap().to_string())
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Health and migrations

fn health_reports_ok(backend: &Backend) {
    let srv = start(backend);
    assert_health_ok(&srv);
    // No authentication needed, and asking twice gives the same answer.
    assert_health_ok(&srv);
    assert_no_panic(&srv);
}

fn fresh_database_is_migrated_and_usable(backend: &Backend) {
    let srv = start(backend);
    if let Some(path) = srv.db.sqlite_path() {
        assert!(
            path.exists(),
            "the SQLite file {path:?} should have been created"
        );
    }
    let (user, token) = srv.user("fresh@example.com");
    let task = create_task(&srv, &token, "first task");
    assert_eq!(task["user_id"], user["id"]);
    let (status, _, read) = send(
        srv.get(&format!("/api/me/tasks/{}", task["id"]))
            .bearer_auth(&token),
    );
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["title"], "first task");
    assert_eq!(list_titles(&srv, &token), vec!["first task".to_string()]);
    assert_no_panic(&srv);
}

fn restart_on_already_migrated_database_keeps_data(backend: &Backend) {
    let mut first = start(backend);
    let (user, token) = first.user("keep@example.com");
    let task = create_task(&first, &token, "survives a restart");
    let db = first.db.clone();
    first.sigterm();
    let status = first.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "first server exited with {status}");
    drop(first);

    // A second server on the same, already migrated database starts and sees the data.
    let second = server_on(db.clone()).start();
    assert_health_ok(&second);
    // The old token still works: same secret, same user.
    let (status, _, me) = send(second.get("/api/users/me").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["id"], user["id"]);
    let token2 = second.login("keep@example.com", PASSWORD);
    assert_eq!(
        list_titles(&second, &token2),
        vec!["survives a restart".to_string()]
    );
    // The unique email survived too, and new rows get new ids.
    let (status, _, body) = send(
        second
            .post("/api/auth/register")
            .json(&json!({"email": "keep@example.com", "password": PASSWORD})),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let newer = create_task(&second, &token2, "after the restart");
    assert!(
        newer["id"].as_i64().unwrap() > task["id"].as_i64().unwrap(),
        "task ids must keep growing: {task} then {newer}"
    );
    assert_no_panic(&second);
    drop(second);

    // And a third start is just as uneventful.
    let third = server_on(db).start();
    assert_health_ok(&third);
    assert_eq!(list_titles(&third, &token2).len(), 2);
    assert_no_panic(&third);
}

#[test]
fn sqlite_memory_database_works() {
    let srv = server(&Backend::Sqlite)
        .env("DATABASE_URL", "sqlite::memory:")
        .start();
    assert_health_ok(&srv);
    let (user, token) = srv.user("memory@example.com");
    let (status, _, me) = send(srv.get("/api/users/me").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["id"], user["id"]);
    assert_eq!(me["email"], "memory@example.com");
    // A second registration sees the first one (one database, not one per connection).
    let (status, _, body) = send(
        srv.post("/api/auth/register")
            .json(&json!({"email": "memory@example.com", "password": PASSWORD})),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Concurrent writers and readers all land in the same database.
    create_task(&srv, &token, "before");
    let srv = Arc::new(srv);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let srv = srv.clone();
            let token = token.clone();
            thread::spawn(move || {
                for i in 0..5 {
                    create_task(&srv, &token, &format!("worker {w} task {i}"));
                    list_titles(&srv, &token);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let (status, headers, tasks) = send(srv.get("/api/me/tasks").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK, "{tasks}");
    assert_eq!(tasks.as_array().unwrap().len(), 21, "{tasks}");
    assert_eq!(
        headers.get("x-total-count").and_then(|v| v.to_str().ok()),
        Some("21")
    );
    assert_no_panic(&srv);
}

#[test]
fn postgresql_scheme_is_accepted() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let first = start(&backend);
    let db = first.db.clone();
    drop(first);
    let url = db.url.replacen("postgres://", "postgresql://", 1);
    assert!(url.starts_with("postgresql://"), "{url}");
    let srv = server_on(db.clone()).env("DATABASE_URL", &url).start();
    assert_health_ok(&srv);
    srv.user("scheme@example.com");
    assert_no_panic(&srv);
}

// ---------------------------------------------------------------------------------------------
// Configuration refused at startup

fn bad_database_url_is_refused(backend: &Backend) {
    for value in [
        "mysql://localhost/todo",
        "not a url",
        "postgres://postgres@127.0.0.1:notaport/todo",
    ] {
        let (status, output) = server(backend).env("DATABASE_URL", value).expect_exit();
        assert_refused(status, &output, "DATABASE_URL");
    }
    // A URL too malformed to parse still has its password kept out of the message.
    for value in [
        "postgres://postgres:S3cretPW@127.0.0.1:99999/todo",
        "postgres://postgres:S3cretPW@[::1/todo",
    ] {
        let (status, output) = server(backend).env("DATABASE_URL", value).expect_exit();
        assert_refused(status, &output, "DATABASE_URL");
        assert!(
            !output.contains("S3cretPW"),
            "the database password must not be printed; output:\n{output}"
        );
    }
}

fn bad_port_is_refused(backend: &Backend) {
    for value in ["abc", "70000", "-1"] {
        refuse(backend, "PORT", value);
    }
}

fn short_jwt_secret_is_refused(backend: &Backend) {
    for value in ["tooshort-secret", &"x".repeat(31)] {
        let (status, output) = server(backend).env("JWT_SECRET", value).expect_exit();
        assert_refused(status, &output, "JWT_SECRET");
        assert!(
            !output.contains(value),
            "the refused secret must not be printed; output:\n{output}"
        );
    }
}

fn jwt_secret_of_32_bytes_is_accepted(backend: &Backend) {
    let secret = "0123456789abcdef0123456789abcdef";
    assert_eq!(secret.len(), 32);
    let srv = server(backend).env("JWT_SECRET", secret).start();
    let (_, token) = srv.user("secret32@example.com");
    assert!(
        verify_with(&token, secret).is_some(),
        "token not signed with JWT_SECRET"
    );
    assert_no_panic(&srv);
}

fn non_number_bcrypt_cost_is_refused(backend: &Backend) {
    for value in ["abc", "12x", "twelve"] {
        refuse(backend, "BCRYPT_COST", value);
    }
}

fn non_number_token_lifetime_is_refused(backend: &Backend) {
    for value in ["abc", "30m", "ten"] {
        refuse(backend, "ACCESS_TOKEN_EXPIRE_MINUTES", value);
    }
}

// ---------------------------------------------------------------------------------------------
// `.env` and secrets

fn dotenv_sets_variables_the_environment_lacks(backend: &Backend) {
    let dir = dir_with_dotenv("# token lifetime for the test\nACCESS_TOKEN_EXPIRE_MINUTES=7\n");
    let srv = server(backend).workdir(dir).start();
    srv.register("dotenv@example.com", PASSWORD);
    let body = login_body(&srv, "dotenv@example.com");
    assert_eq!(body["expires_in"], 420, "{body}");
    let claims = verify_with(body["access_token"].as_str().unwrap(), TEST_SECRET)
        .expect("token signed with JWT_SECRET");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!((419..=421).contains(&lifetime), "exp - iat = {lifetime}");
    // The OAuth2 form route uses the same setting.
    let (status, _, form) = send(
        srv.post("/token")
            .form(&[("username", "dotenv@example.com"), ("password", PASSWORD)]),
    );
    assert_eq!(status, StatusCode::OK, "{form}");
    assert_eq!(form["expires_in"], 420, "{form}");
    assert_no_panic(&srv);
}

fn environment_wins_over_dotenv(backend: &Backend) {
    let dir = dir_with_dotenv(&format!(
        "ACCESS_TOKEN_EXPIRE_MINUTES=7\nJWT_SECRET={OTHER_SECRET}\nBCRYPT_COST=lots\n"
    ));
    // BCRYPT_COST=lots in .env is never seen: the environment's BCRYPT_COST=4 wins, so the
    // server starts.
    let srv = server(backend)
        .env("ACCESS_TOKEN_EXPIRE_MINUTES", "9")
        .workdir(dir)
        .start();
    srv.register("wins@example.com", PASSWORD);
    let body = login_body(&srv, "wins@example.com");
    assert_eq!(body["expires_in"], 540, "{body}");
    let token = body["access_token"].as_str().unwrap();
    // The harness sets JWT_SECRET in the environment: it wins over the .env one.
    assert!(
        verify_with(token, TEST_SECRET).is_some(),
        "token should be signed with the environment's JWT_SECRET"
    );
    assert!(verify_with(token, OTHER_SECRET).is_none());
    assert_no_panic(&srv);
}

fn invalid_value_in_dotenv_is_refused(backend: &Backend) {
    let dir = dir_with_dotenv("ACCESS_TOKEN_EXPIRE_MINUTES=soon\n");
    let (status, output) = server(backend).workdir(dir).expect_exit();
    assert_refused(status, &output, "ACCESS_TOKEN_EXPIRE_MINUTES");

    let dir = dir_with_dotenv("DATABASE_POOL_TIMEOUT=never\n");
    let (status, output) = server(backend).workdir(dir).expect_exit();
    assert_refused(status, &output, "DATABASE_POOL_TIMEOUT");
}

fn dotenv_jwt_secret_is_used_when_environment_has_none(backend: &Backend) {
    let dir = dir_with_dotenv(&format!("JWT_SECRET={OTHER_SECRET}\n"));
    let srv = server(backend).workdir(dir).start_with(|cmd| {
        cmd.env_remove("JWT_SECRET");
    });
    let (_, token) = srv.user("dotenv-secret@example.com");
    assert!(
        verify_with(&token, OTHER_SECRET).is_some(),
        "token should be signed with the .env JWT_SECRET"
    );
    assert!(verify_with(&token, TEST_SECRET).is_none());
    assert_no_panic(&srv);
}

fn unset_jwt_secret_starts_with_warning_and_random_key(backend: &Backend) {
    let srv = server(backend).start_with(|cmd| {
        cmd.env_remove("JWT_SECRET");
    });
    assert_health_ok(&srv);
    let log = srv.log();
    assert!(
        log.lines()
            .any(|l| l.contains("JWT_SECRET") && l.to_lowercase().contains("warn")),
        "expected a warning naming JWT_SECRET; log:\n{log}"
    );
    // Tokens still work, signed with a key of this process's own.
    let (user, token) = srv.user("random-key@example.com");
    assert_eq!(me_status(&srv, &token), StatusCode::OK);
    assert!(verify_with(&token, TEST_SECRET).is_none());
    let forged = hs256_token(&json!({
        "sub": user["id"], "iat": now_secs(), "exp": now_secs() + 600
    }));
    assert_eq!(me_status(&srv, &forged), StatusCode::UNAUTHORIZED);

    // Another process without JWT_SECRET picks another key: the first one's tokens fail there.
    let db = srv.db.clone();
    drop(srv);
    let other = server_on(db).start_with(|cmd| {
        cmd.env_remove("JWT_SECRET");
    });
    assert_eq!(me_status(&other, &token), StatusCode::UNAUTHORIZED);
    let token2 = other.login("random-key@example.com", PASSWORD);
    assert_eq!(me_status(&other, &token2), StatusCode::OK);
    assert_no_panic(&other);
}

fn better_auth_secret_is_an_alias_for_jwt_secret(backend: &Backend) {
    let srv = server(backend)
        .env("BETTER_AUTH_SECRET", OTHER_SECRET)
        .start_with(|cmd| {
            cmd.env_remove("JWT_SECRET");
        });
    let (user, token) = srv.user("alias@example.com");
    assert!(
        verify_with(&token, OTHER_SECRET).is_some(),
        "token should be signed with BETTER_AUTH_SECRET"
    );
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user["id"], "iat": now_secs(), "exp": now_secs() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(OTHER_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(me_status(&srv, &forged), StatusCode::OK);
    assert_no_panic(&srv);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

fn sigterm_lets_in_flight_request_finish(backend: &Backend) {
    in_flight_request_finishes_after(backend, "TERM");
}

/// Ctrl-C in a terminal: as graceful as SIGTERM.
fn sigint_lets_in_flight_request_finish(backend: &Backend) {
    in_flight_request_finishes_after(backend, "INT");
}

fn in_flight_request_finishes_after(backend: &Backend, signal: &str) {
    let mut srv = server(backend).env("BCRYPT_COST", "12").start();
    let port = srv.port;
    // Everything before the in-flight request goes over one keep-alive connection, so one
    // worker serves it all, and the in-flight request arrives on a new connection (the next
    // worker). On PostgreSQL, first cut the server's database connections so that the pool
    // replaces them while serving requests on that first worker: the in-flight request must
    // still get a working connection once that worker goes idle and stops at SIGTERM.
    let first = Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let register = |email: &str| {
        send(
            first
                .post(srv.url("/api/auth/register"))
                .json(&json!({"email": email, "password": PASSWORD})),
        )
    };
    let (status, _, body) = register("warmup@example.com");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    if let Backend::Postgres(admin_url) = backend {
        let name = srv.db.url.rsplit('/').next().unwrap();
        let name = name.split('?').next().unwrap().to_string();
        let mut admin = ::postgres::Client::connect(admin_url, ::postgres::NoTls).unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap();
        // The pool may answer 503 while it finds its connections dead; then it recovers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut recovered = 0;
        while recovered < 5 {
            let (status, _, body) = send(first.get(srv.url("/health")));
            if status == StatusCode::OK {
                recovered += 1;
            } else {
                assert!(Instant::now() < deadline, "no recovery: {status} {body}");
            }
        }
    }
    // Measure how long one registration takes at this cost, to send SIGTERM well inside the next.
    let started = Instant::now();
    let (status, _, body) = register("measure@example.com");
    let one_hash = started.elapsed();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    drop(first);
    thread::sleep(Duration::from_millis(100));

    let client = Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = srv.url("/api/auth/register");
    let request = thread::spawn(move || {
        let response = client
            .post(url)
            .json(&json!({"email": "inflight@example.com", "password": PASSWORD}))
            .send();
        let finished = Instant::now();
        response.map(|r| {
            let status = r.status();
            (status, r.json::<Value>().unwrap_or(Value::Null), finished)
        })
    });
    thread::sleep((one_hash / 5).clamp(Duration::from_millis(50), Duration::from_secs(2)));
    let sigterm_at = Instant::now();
    srv.signal(signal);

    let (status, body, finished) = request
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed after SIGTERM: {e}"));
    assert_eq!(
        status,
        StatusCode::CREATED,
        "in-flight register after SIG{signal}: {body}; log:\n{}",
        srv.log()
    );
    assert_eq!(body["email"], "inflight@example.com");
    assert!(
        finished > sigterm_at,
        "the request finished before SIGTERM was sent, so it was not in flight \
         (one hash took {one_hash:?})"
    );

    let exit = srv.wait_exit(Duration::from_secs(60));
    assert!(
        exit.success(),
        "server exited with {exit}; log:\n{}",
        srv.log()
    );
    assert_no_panic(&srv);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections after the server exited"
    );

    // The registration that was in flight was committed.
    let db = srv.db.clone();
    drop(srv);
    let again = server_on(db).start();
    let token = again.login("inflight@example.com", PASSWORD);
    assert_eq!(me_status(&again, &token), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Dropped requests (a handler future dropped mid-query must not break the server)

fn raw_request(port: u16, request: &str) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.write_all(request.as_bytes()).expect("write");
    // Close at once, without reading the answer.
    drop(stream);
}

fn dropped_and_malformed_requests_do_not_break_server(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("dropper@example.com");
    let auth = format!("Authorization: Bearer {token}\r\n");

    // A valid token next to a malformed body: the JSON extractor fails while the token's user
    // is being loaded.
    for i in 0..200 {
        let (status, _, body) = send(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(r#"{"title": "broken"#),
        );
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed body #{i}: {body}"
        );
    }

    // Clients that send a request and hang up at once, or in the middle of the body.
    for i in 0..40 {
        let body = format!(r#"{{"title": "hang-up {i}"}}"#);
        raw_request(
            srv.port,
            &format!(
                "POST /api/me/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        raw_request(
            srv.port,
            &format!("GET /api/me/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"),
        );
        raw_request(
            srv.port,
            &format!(
                "POST /api/me/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{{\"title\": \"par"
            ),
        );
        raw_request(
            srv.port,
            &format!("GET /api/users/me HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"),
        );
    }

    // The same, from several threads at once.
    let srv = Arc::new(srv);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let srv = srv.clone();
            let token = token.clone();
            let auth = auth.clone();
            thread::spawn(move || {
                for _ in 0..25 {
                    let (status, _, body) = send(
                        srv.post("/api/me/tasks")
                            .bearer_auth(&token)
                            .header("content-type", "application/json")
                            .body("{not json"),
                    );
                    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
                    raw_request(
                        srv.port,
                        &format!("GET /api/me/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"),
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }

    // Give anything that would go wrong time to show, then check the server is healthy.
    thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        assert_health_ok(&srv);
        let task = create_task(&srv, &token, "after the hang-ups");
        let (status, _, read) = send(
            srv.get(&format!("/api/me/tasks/{}", task["id"]))
                .bearer_auth(&token),
        );
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(me_status(&srv, &token), StatusCode::OK);
        assert!(list_titles(&srv, &token).contains(&"after the hang-ups".to_string()));
    }
    // A complete raw request still gets a full answer on a fresh connection.
    let mut stream = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    thread::sleep(Duration::from_millis(200));
    assert_no_panic(&srv);
    let mut srv = srv;
    let srv = Arc::get_mut(&mut srv).expect("the workers are done");
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "the server process exited; log:\n{}",
        srv.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Database outage on a private PostgreSQL instance

/// A PostgreSQL instance of this test's own, in a temporary directory, on a free port.
/// Stopped (immediately) when dropped.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres_user: bool,
}

impl PrivatePostgres {
    fn new() -> PrivatePostgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let as_postgres_user = running_as_root();
        if as_postgres_user {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the private PostgreSQL directory");
        }
        let pg = PrivatePostgres {
            bin,
            dir,
            port: free_port(),
            as_postgres_user,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        pg.start();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres_user {
            let runuser = if Path::new("/usr/sbin/runuser").exists() {
                "/usr/sbin/runuser"
            } else {
                "runuser"
            };
            let mut cmd = Command::new(runuser);
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd.current_dir("/");
            cmd
        } else {
            Command::new(program)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    fn stop(&self, mode: &str) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "stop",
            ],
        );
    }
}

impl PrivatePostgres {
    /// Sends `signal` (`STOP`, `CONT`) to every process of this instance: the postmaster and
    /// the backends serving connections.
    fn signal_all(&self, signal: &str) {
        let Ok(pid_file) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        // The postmaster first: stopped, it forks no new backend (a pool reconnecting in the
        // background) between the listing of its children below and their signal.
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(postmaster.to_string())
            .status();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            let ppid = after_comm.split_whitespace().nth(1).unwrap_or("");
            if ppid == postmaster.to_string() {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // Best effort: a backend may exit between the listing and the signal.
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .status();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.signal_all("CONT"); // a frozen instance cannot stop
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/*/bin` that has `initdb` and `pg_ctl`.
fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("TEST_DATABASE_URL is set but no /usr/lib/postgresql/*/bin/initdb was found")
}

/// One GET /health, with how long it took.
fn timed_health(srv: &Server) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let (status, _, body) = send(srv.get("/health"));
    (status, body, started.elapsed())
}

#[test]
fn postgres_health_follows_database_outage() {
    // Runs with the PostgreSQL variants (same skip rules), on an instance of its own.
    let Some(_) = Backend::postgres() else {
        return;
    };
    let pg = PrivatePostgres::new();
    let srv = server(&Backend::Sqlite)
        .env("DATABASE_URL", &pg.url())
        .env("DATABASE_POOL_TIMEOUT", "1")
        .start();
    assert_health_ok(&srv);
    let (_, token) = srv.user("outage@example.com");
    create_task(&srv, &token, "kept through the outage");

    pg.stop("fast");
    // "Quickly": with DATABASE_POOL_TIMEOUT=1 each answer should take about a second; allow
    // a wide margin on a busy machine.
    let quick = Duration::from_secs(8);
    for _ in 0..3 {
        let (status, body, took) = timed_health(&srv);
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "GET /health with the database stopped: {body}"
        );
        assert_eq!(body["status"], "unavailable", "{body}");
        // Generic: nothing about the database, its host or its user.
        let reason = body["database"].as_str().unwrap_or("");
        assert!(
            ["cannot connect", "timed out"].contains(&reason),
            "database should say why, in general words: {body}"
        );
        assert!(
            took < quick,
            "GET /health took {took:?} with the database down"
        );
    }
    // Other routes answer 503 {"detail": ...} after the pool timeout, too.
    let started = Instant::now();
    let (status, _, body) = send(srv.get("/api/users/me").bearer_auth(&token));
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["detail"].is_string(), "{body}");
    assert!(
        took < quick,
        "GET /api/users/me took {took:?} with the database down"
    );

    // Back up: the same server process recovers without a restart.
    pg.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = timed_health(&srv);
        if status == StatusCode::OK {
            assert_eq!(body, json!({"status": "ok", "database": "ok"}));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET /health still {status} {body} 30 s after PostgreSQL came back"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(me_status(&srv, &token), StatusCode::OK);
    assert_eq!(
        list_titles(&srv, &token),
        vec!["kept through the outage".to_string()]
    );
    let mut srv = srv;
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "the server must not exit during the outage"
    );
    assert_no_panic(&srv);
}

/// Reads on PostgreSQL share one connection per worker thread. When the server closes it (a
/// restart, a failover, an administrator ending sessions), the next reads are answered at once
/// on a new connection: not a 503, and not a broken connection kept for good.
#[test]
fn postgres_reads_outlive_their_connection() {
    let Some(Backend::Postgres(admin_url)) = Backend::postgres() else {
        return;
    };
    let srv = start(&Backend::Postgres(admin_url.clone()));
    let (_, token) = srv.user("reconnect@example.com");
    create_task(&srv, &token, "read again");
    let name = srv.db.url.rsplit('/').next().unwrap();
    let name = name.split('?').next().unwrap().to_string();
    let mut admin = ::postgres::Client::connect(&admin_url, ::postgres::NoTls).unwrap();
    // A new connection for each request, so both worker threads (and their readers) are asked.
    let fresh = Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let me_status =
        |srv: &Server, token: &str| send(fresh.get(srv.url("/api/users/me")).bearer_auth(token)).0;
    for round in 0..3 {
        for _ in 0..8 {
            assert_eq!(me_status(&srv, &token), StatusCode::OK, "round {round}");
        }
        let ended = admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap();
        assert!(ended > 0, "round {round}: the server held no connection");
        thread::sleep(Duration::from_millis(300)); // the server's side sees them closed
        for _ in 0..8 {
            assert_eq!(
                me_status(&srv, &token),
                StatusCode::OK,
                "round {round}: a read after the server closed its connections"
            );
            assert_eq!(list_titles(&srv, &token), vec!["read again".to_string()]);
        }
    }
    assert_no_panic(&srv);
}

/// Requests during an outage get their 503 quickly with the default settings: at once when the
/// server refuses connections, within about 3 s when it is frozen (SIGSTOP: connections open,
/// nothing answers); after either, the same server process recovers within 5 s.
#[test]
fn postgres_outage_answers_fast() {
    let Some(_) = Backend::postgres() else {
        return;
    };
    let pg = PrivatePostgres::new();
    let srv = server(&Backend::Sqlite)
        .env("DATABASE_URL", &pg.url())
        .start();
    let (_, token) = srv.user("fast@example.com");
    let timed_me = || {
        let started = Instant::now();
        let (status, _, body) = send(srv.get("/api/users/me").bearer_auth(&token));
        (status, body, started.elapsed())
    };
    let wait_for_recovery = |what: &str| {
        let started = Instant::now();
        while timed_me().0 != StatusCode::OK {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "not recovered 5 s after {what}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    };

    pg.stop("fast");
    let mut refused = Duration::ZERO;
    for attempt in 0..5 {
        let (status, body, took) = timed_me();
        refused = refused.max(took);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "refused: {body}");
        assert!(
            took < Duration::from_secs(1),
            "refused, attempt {attempt}: 503 after {took:?}"
        );
        let (status, body, took) = timed_health(&srv);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "refused: {body}");
        assert!(
            took < Duration::from_secs(1),
            "refused, /health: 503 after {took:?}"
        );
    }
    pg.start();
    let recovered = wait_for_recovery("a restart of PostgreSQL");

    pg.signal_all("STOP");
    let mut frozen = Duration::ZERO;
    for attempt in 0..3 {
        let (status, body, took) = timed_me();
        frozen = frozen.max(took);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "frozen: {body}");
        assert!(
            took < Duration::from_millis(4000),
            "frozen, attempt {attempt}: 503 after {took:?}"
        );
    }
    pg.signal_all("CONT");
    let thawed = wait_for_recovery("SIGCONT");
    eprintln!(
        "outage: 503 within {refused:?} when refused, {frozen:?} when frozen; \
         recovered {recovered:?} after a restart, {thawed:?} after a freeze"
    );
    assert_no_panic(&srv);
}

/// The access log: a line per request (address, method and path, status, size, time) when
/// `RUST_LOG` lets its info through, none when it does not. (The server then leaves the
/// middleware out instead of rendering lines nobody writes; that saving is the benchmark's.)
#[test]
fn access_log_follows_the_log_level() {
    let quiet = "info,actix_web::middleware::logger=warn";
    for (level, logged) in [("info", true), (quiet, false)] {
        let srv = server(&Backend::Sqlite).env("RUST_LOG", level).start();
        assert_health_ok(&srv);
        assert_health_ok(&srv);
        std::thread::sleep(Duration::from_millis(200));
        let log = srv.log();
        let lines = log
            .lines()
            .filter(|l| l.contains("\"GET /health\" 200"))
            .count();
        assert_eq!(
            lines,
            if logged { 2 } else { 0 },
            "access log lines at RUST_LOG={level}:\n{log}"
        );
    }
}

/// The access log quotes the method and path: a `"` (or a control character) sent raw in the
/// path is escaped there, so a client cannot forge the fields that follow it on its line.
#[test]
fn access_log_escapes_what_it_quotes() {
    use std::io::{Read, Write};
    let srv = server(&Backend::Sqlite).env("RUST_LOG", "info").start();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    // No space can be sent raw in a path, but a quote can: `"GET /forged" 200 1 0.1ms"` is what
    // the line would have said with `%20`s decoded; raw, the forgery uses quotes alone.
    let request = "GET /forged\"200\"-\" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    std::thread::sleep(Duration::from_millis(200));
    let log = srv.log();
    let line = log
        .lines()
        .find(|l| l.contains("/forged"))
        .unwrap_or_else(|| panic!("no access log line for the request ({answer:?}):\n{log}"));
    assert!(
        line.contains(r#""GET /forged\"200\"-\"" 404"#),
        "the path's quotes are escaped: {line}"
    );
}
