//! Issue 11: a client generated from `/openapi.json` works, as frontends use one.
//!
//! Starts the server, writes its document to a temporary directory, lints it with Redocly's
//! recommended rules (0 errors), generates TypeScript types with openapi-typescript, compiles
//! `tests/ts-client/walk.ts` with `tsc` (`strict`, no `any`, no casts) against them and runs it
//! with node: it walks every route through openapi-fetch and checks the answers.
//!
//! The tools are the exact versions pinned in `tests/ts-client/package-lock.json`; `.ci/run`
//! installs them with `npm ci` and sets `TEST_REQUIRE_NODE=1`. Without `node_modules` (and
//! without that variable) the test says it was skipped.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ts_client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ts-client")
}

/// Runs a command in `dir`, panicking with its output unless it succeeds; returns stdout.
fn run(what: &str, dir: &Path, command: &mut Command) -> String {
    let output = command
        .current_dir(dir)
        // Redocly's CLI reports usage to its vendor and checks for updates unless told not to.
        .env("REDOCLY_TELEMETRY", "off")
        .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true")
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

#[test]
fn a_generated_typescript_client_walks_every_route() {
    let tools = ts_client_dir();
    let bin = tools.join("node_modules/.bin");
    if !bin.join("tsc").exists() {
        assert!(
            std::env::var("TEST_REQUIRE_NODE").as_deref() != Ok("1"),
            "TEST_REQUIRE_NODE=1 but {} has no node_modules (run `npm ci` there)",
            tools.display()
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** generated_client SKIPPED: run `npm ci` in tests/ts-client (node 20+) ***\n"
        );
        return;
    }

    // The program proves the types only if it does not opt out of them.
    let program = std::fs::read_to_string(tools.join("walk.ts")).unwrap();
    for line in program
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
    {
        for escape in [" as ", "any", "@ts-ignore", "@ts-nocheck", "!."] {
            assert!(!line.contains(escape), "walk.ts uses {escape:?}: {line}");
        }
    }

    let srv = start(&Backend::Sqlite);
    let (status, _, document) = send(srv.get("/openapi.json"));
    assert_eq!(status, StatusCode::OK);

    // A scratch project: the document, the generated types, the program and its config, and
    // the pinned tools through a link (module resolution follows it).
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    std::fs::write(
        work.join("openapi.json"),
        serde_json::to_vec_pretty(&document).unwrap(),
    )
    .unwrap();
    for file in ["walk.ts", "tsconfig.json"] {
        std::fs::copy(tools.join(file), work.join(file)).unwrap();
    }
    std::fs::write(work.join("package.json"), r#"{"type": "module"}"#).unwrap();
    std::os::unix::fs::symlink(tools.join("node_modules"), work.join("node_modules")).unwrap();

    run(
        "redocly lint (recommended rules)",
        work,
        Command::new(bin.join("redocly")).args([
            "lint",
            "--extends=recommended",
            "--format=summary",
            "openapi.json",
        ]),
    );
    run(
        "openapi-typescript",
        work,
        Command::new(bin.join("openapi-typescript")).args(["openapi.json", "-o", "api.d.ts"]),
    );
    run(
        "tsc (strict)",
        work,
        Command::new(bin.join("tsc")).args(["-p", "."]),
    );
    let walked = run(
        "the generated client's walk",
        work,
        Command::new("node").args(["build/walk.js", &srv.base_url]),
    );
    assert!(walked.contains("walked every route"), "{walked}");
}
