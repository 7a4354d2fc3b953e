//! SQLite's write-ahead log stays bounded under sustained writes.
//!
//! With writes arriving all the time, the log never has a moment in which SQLite can start it
//! over, so unless the server resets it, it grows for as long as the writes go on (a gigabyte in
//! half a minute under load) until the disk is full. This test writes without pause, reads
//! beside the writes, and watches the size of the `-wal` file.
mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Where the server resets the log: `WAL_RESET_PAGES` in `src/main.rs`, 4096 pages of 4 KiB.
const RESET_AT: u64 = 16 * MIB;
/// Time enough for a slow machine to write what the test needs (a debug build on two cores
/// writes about 4 MiB a second into the log, and takes about 12 s).
const TIME_LIMIT: Duration = Duration::from_secs(60);
const WRITERS: usize = 6;

/// The largest log the test accepts when the writes add `bytes_per_second` to it: the reset
/// size, plus what the writes add between two looks of the checkpointer (a second), plus two
/// seconds more for a look that comes late on a busy machine (a slow fsync, a reset that a
/// reader made wait).
fn largest_allowed(bytes_per_second: f64) -> u64 {
    RESET_AT + (3.0 * bytes_per_second) as u64
}

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
    let (largest, written, resets, allowed) = std::thread::scope(|scope| {
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

        // The log's size, looked at often enough to catch it at its largest before a reset.
        // What the writes put into it is the sum of its growths: a reset empties the file.
        let (mut largest, mut written, mut resets, mut last) = (0, 0, 0, 0);
        let mut allowed = RESET_AT;
        // Until the writes have put well more than is allowed into the log, so that a log
        // that is never reset ends up clearly over the limit.
        while written < allowed + RESET_AT && started.elapsed() < TIME_LIMIT {
            std::thread::sleep(Duration::from_millis(20));
            let size = wal_size();
            largest = largest.max(size);
            if size >= last {
                written += size - last;
            } else {
                resets += 1;
            }
            last = size;
            allowed = largest_allowed(written as f64 / started.elapsed().as_secs_f64());
        }
        done.store(true, Ordering::Relaxed);
        (largest, written, resets, allowed)
    });
    let elapsed = started.elapsed();
    let writes = writes.load(Ordering::Relaxed);
    eprintln!(
        "{writes} writes in {elapsed:.1?}: {} MiB into the WAL, largest {} MiB (allowed {} MiB), \
         {resets} resets",
        written / MIB,
        largest / MIB,
        allowed / MIB,
    );
    assert!(
        written >= allowed + RESET_AT,
        "too slow to tell: only {} MiB written into the WAL in {elapsed:.0?}",
        written / MIB
    );
    // What the server's checkpointer said, to tell a reset that failed from one never tried.
    let checkpointer: Vec<String> = srv
        .log()
        .lines()
        .filter(|line| line.contains("SQLite"))
        .map(String::from)
        .collect();
    eprintln!("{}", checkpointer.join("\n"));
    assert!(
        largest <= allowed,
        "the WAL grew to {} MiB (allowed: {} MiB); the checkpointer said:\n{}",
        largest / MIB,
        allowed / MIB,
        checkpointer.join("\n")
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
