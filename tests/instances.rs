//! Several instances on one database (a rolling deploy, `replicas: 4`) may start at the same
//! moment: the migrations run once, under a lock, and every instance comes up and serves.
mod common;
use common::*;

use std::sync::{Arc, Barrier};

const INSTANCES: usize = 4;

fn instances_started_together_all_come_up(backend: &Backend) {
    for round in 1..=3 {
        let db = Arc::new(backend.fresh_database());
        let ready = Arc::new(Barrier::new(INSTANCES));
        let starting: Vec<_> = (0..INSTANCES)
            .map(|_| {
                let (db, ready) = (db.clone(), ready.clone());
                std::thread::spawn(move || {
                    ready.wait();
                    server_on(db).start()
                })
            })
            .collect();
        let servers: Vec<Server> = starting
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| panic!("round {round}: an instance did not start"))
            })
            .collect();
        // Every instance serves, on the one schema: an account made on one signs in on all.
        servers[0].register("shared@example.com", PASSWORD);
        for (i, srv) in servers.iter().enumerate() {
            let (status, _, body) = send(srv.get("/health"));
            assert_eq!(
                status,
                StatusCode::OK,
                "round {round}, instance {i}: {body}"
            );
            srv.login("shared@example.com", PASSWORD);
        }
        let migrated: usize = servers
            .iter()
            .map(|srv| {
                let log = srv.log();
                let line = log
                    .lines()
                    .find(|l| l.contains("migrations applied now"))
                    .unwrap_or_else(|| panic!("no migration line in the log:\n{log}"))
                    .to_string();
                let count = line.split('(').nth(1).and_then(|l| l.split(' ').next());
                count.and_then(|n| n.parse().ok()).unwrap_or(0)
            })
            .sum();
        let migrations = std::fs::read_dir("migrations/sqlite").unwrap().count();
        assert_eq!(
            migrated, migrations,
            "round {round}: the migrations ran once in all, not once per instance"
        );
    }
}

on_both_backends!(instances_started_together_all_come_up);
