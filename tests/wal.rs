//! SQLite's write-ahead log stays bounded under sustained writes.
//!
//! With writes arriving all the time and reads beside them, SQLite must still find moments to
//! start its log over, or the log grows for as long as the writes go on until the disk is full.
//! The server leaves this to SQLite's own checkpoints (`wal_autocheckpoint`, every 1,000 pages:
//! about 4 MiB). This test writes without pause, reads beside the writes, and watches the size
//! of the `-wal` file while many times that much goes through it.
mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The largest log accepted: four times the size at which SQLite checkpoints.
const LARGEST_ALLOWED: u64 = 16 * MIB;
/// Task data the writes must put through the log: many times the largest log allowed.
const TO_WRITE: u64 = 2 * LARGEST_ALLOWED;
/// Time enough for a slow machine (a debug build on two cores writes about 1 MiB of tasks a
/// second).
const TIME_LIMIT: Duration = Duration::from_secs(120);
const WRITERS: usize = 6;

#[test]
fn wal_stays_bounded_under_sustained_writes() {
    let srv = start(&Backend::Sqlite);
    let (_, token) = srv.user("writer@example.com");
    let wal = srv.db.sqlite_path().unwrap().with_extension("db-wal");
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());

    // The largest tasks the API takes, so each write adds as much to the log as it can.
    let title = "t".repeat(200);
    let description = "d".repeat(1000);
    let done = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let started = Instant::now();
    let (largest, written) = std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let (status, _, body) = send(
                        srv.post("/api/me/tasks")
                            .bearer_auth(&token)
                            .json(&json!({"title": title, "description": description})),
                    );
                    assert_eq!(status, StatusCode::CREATED, "{body}");
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Reads beside the writes, as a real load has them: a reader uses the log while it
        // reads, which is one of the things that keeps SQLite from starting it over.
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let (status, _, body) = send(srv.get("/api/me/tasks?limit=5").bearer_auth(&token));
                assert_eq!(status, StatusCode::OK, "{body}");
            }
        });

        // The log's size, looked at often enough to catch it at its largest.
        let mut largest = 0;
        let task_bytes = (title.len() + description.len()) as u64;
        while writes.load(Ordering::Relaxed) * task_bytes < TO_WRITE
            && started.elapsed() < TIME_LIMIT
        {
            std::thread::sleep(Duration::from_millis(20));
            largest = largest.max(wal_size());
        }
        done.store(true, Ordering::Relaxed);
        (largest, writes.load(Ordering::Relaxed) * task_bytes)
    });
    let elapsed = started.elapsed();
    let writes = writes.load(Ordering::Relaxed);
    eprintln!(
        "{writes} writes in {elapsed:.1?}: {} MiB of tasks, largest WAL {} MiB",
        written / MIB,
        largest / MIB,
    );
    assert!(
        written >= TO_WRITE,
        "too slow to tell: only {} MiB of tasks written in {elapsed:.0?}",
        written / MIB
    );
    assert!(
        largest <= LARGEST_ALLOWED,
        "the WAL grew to {} MiB while {} MiB of tasks were written",
        largest / MIB,
        written / MIB
    );

    // Every acknowledged write survives the resets and then a crash (SIGKILL).
    let db = srv.db.clone();
    let mut srv = srv;
    srv.child.kill().expect("SIGKILL the server");
    srv.child.wait().unwrap();
    drop(srv);
    let restarted = server_on(db).start();
    let token = restarted.login("writer@example.com", PASSWORD);
    let (status, headers, body) = send(restarted.get("/api/me/tasks?limit=1").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-total-count"], writes.to_string().as_str());
}
