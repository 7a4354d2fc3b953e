//! An acknowledged write is never lost: writes answered 2xx survive the server being killed
//! (SIGKILL, no chance to flush anything) right after the answer.
mod common;
use common::*;

use std::sync::Arc;
use std::time::{Duration, Instant};

fn acknowledged_writes_survive_sigkill(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("durable@example.com");

    // Writes from several threads at once, so some commits race each other to the disk.
    let created: Vec<i64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|worker| {
                let (srv, token) = (&srv, &token);
                scope.spawn(move || {
                    (0..25)
                        .map(|i| {
                            let (status, _, body) = send(
                                srv.post("/api/me/tasks")
                                    .bearer_auth(token)
                                    .json(&json!({"title": format!("task {worker}-{i}")})),
                            );
                            assert_eq!(status, StatusCode::CREATED, "{body}");
                            body["id"].as_i64().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    // The last acknowledged write is a toggle: an update must survive too.
    let last = *created.last().unwrap();
    let (status, _, toggled) = send(
        srv.patch(&format!("/api/me/tasks/{last}/complete"))
            .bearer_auth(&token),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(toggled["completed"], json!(true));

    let db = srv.db.clone();
    let mut srv = srv;
    srv.child.kill().expect("SIGKILL the server");
    srv.child.wait().unwrap();
    drop(srv);

    let restarted = server_on(Arc::clone(&db)).start();
    let token = restarted.login("durable@example.com", PASSWORD);
    let (status, headers, tasks) = send(
        restarted
            .get("/api/me/tasks?limit=1000")
            .bearer_auth(&token),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-total-count"], "100");
    let mut found: Vec<i64> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    found.sort_unstable();
    let mut expected = created.clone();
    expected.sort_unstable();
    assert_eq!(found, expected, "every acknowledged task is still there");
    let (_, _, last_task) = send(
        restarted
            .get(&format!("/api/me/tasks/{last}"))
            .bearer_auth(&token),
    );
    assert_eq!(
        last_task["completed"],
        json!(true),
        "the last update survived"
    );
}

on_both_backends!(acknowledged_writes_survive_sigkill);

/// Another process holding SQLite's write lock (a second server on the same file, a `sqlite3`
/// shell in a transaction, a `VACUUM`) makes writes wait, not the worker threads: every other
/// request is still answered at once, and the waiting write lands when the lock is released.
#[test]
fn a_write_lock_held_elsewhere_stalls_only_writes() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    let srv = start(&Backend::Sqlite);
    let (_, token) = srv.user("locked@example.com");
    let path = srv.db.sqlite_path().unwrap();
    let mut other = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
    other.batch_execute("BEGIN IMMEDIATE").unwrap();

    std::thread::scope(|scope| {
        let write = scope.spawn(|| {
            send(
                srv.post("/api/me/tasks")
                    .bearer_auth(&token)
                    .json(&json!({"title": "waits for the lock"})),
            )
        });
        std::thread::sleep(Duration::from_millis(300)); // the write is waiting by now
                                                        // Fresh connections, so both worker threads are asked, the one whose write waits too.
        for _ in 0..8 {
            let started = Instant::now();
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let health = client.get(srv.url("/health")).send().unwrap();
            assert_eq!(health.status(), StatusCode::OK);
            let list = client
                .get(srv.url("/api/me/tasks"))
                .bearer_auth(&token)
                .send()
                .unwrap();
            assert_eq!(list.status(), StatusCode::OK);
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "a read waited {:?} while another process held the write lock",
                started.elapsed()
            );
        }
        other.batch_execute("COMMIT").unwrap();
        let (status, _, body) = write.join().unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
    });
    let (_, headers, _) = send(srv.get("/api/me/tasks").bearer_auth(&token));
    assert_eq!(headers["x-total-count"], "1");
}
