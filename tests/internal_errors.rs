//! A database error is a 500 `{"detail": "Internal Server Error"}`: the cause goes to the log,
//! never into the response.
mod common;
use common::*;

/// Only the users' email being taken reads as "Email already registered" (409); any other
/// unique constraint that trips is a server fault (500), not the client's.
fn only_the_email_constraint_is_a_conflict(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("unique@example.com");
    srv.execute_sql("CREATE UNIQUE INDEX tasks_title_unique ON tasks (title)");
    let create = || {
        send(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .json(&json!({"title": "same title"})),
        )
    };
    assert_eq!(create().0, StatusCode::CREATED);
    let (status, _, body) = create();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body, json!({"detail": "Internal Server Error"}));
    // The email's own constraint still reads as a conflict.
    let (status, _, body) = send(
        srv.post("/api/auth/register")
            .json(&json!({"email": "unique@example.com", "password": PASSWORD})),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body, json!({"detail": "Email already registered"}));
}

fn database_error_is_a_bare_500(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("broken@example.com");
    let (status, _, _) = send(
        srv.post("/api/me/tasks")
            .bearer_auth(&token)
            .json(&json!({"title": "before"})),
    );
    assert_eq!(status, StatusCode::CREATED);

    srv.execute_sql(if srv.db.sqlite_path().is_some() {
        "DROP TABLE tasks"
    } else {
        "DROP TABLE tasks CASCADE"
    });

    for request in [
        srv.get("/api/me/tasks").bearer_auth(&token),
        srv.post("/api/me/tasks")
            .bearer_auth(&token)
            .json(&json!({"title": "after"})),
    ] {
        let response = request.send().unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let body = response.text().unwrap();
        assert_eq!(body, r#"{"detail":"Internal Server Error"}"#);
    }

    // The server still answers what does not need the table, and the cause was logged.
    let (status, _, me) = send(srv.get("/api/users/me").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["email"], "broken@example.com");
    let log = srv.log();
    assert!(log.contains("internal error: database error"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

on_both_backends!(
    database_error_is_a_bare_500,
    only_the_email_constraint_is_a_conflict
);
