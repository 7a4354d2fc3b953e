//! PostgreSQL over TLS: `sslmode=require` in DATABASE_URL (as hosted servers such as Neon give
//! it) makes every pooled connection, and the migration connection, use TLS.
mod common;
use common::*;

use std::io::Write;

fn admin(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect to TEST_DATABASE_URL")
}

/// The PostgreSQL backend and its admin URL, when the server under test has TLS turned on.
fn tls_capable_postgres() -> Option<(Backend, String)> {
    let backend = Backend::postgres()?;
    let Backend::Postgres(admin_url) = &backend else {
        unreachable!()
    };
    let admin_url = admin_url.clone();
    let ssl: String = admin(&admin_url).query_one("SHOW ssl", &[]).unwrap().get(0);
    if ssl != "on" {
        let _ = writeln!(
            std::io::stderr(),
            "*** postgres_tls SKIPPED: the PostgreSQL server has ssl = {ssl} ***"
        );
        return None;
    }
    Some((backend, admin_url))
}

#[test]
fn sslmode_require_connects_over_tls() {
    let Some((backend, admin_url)) = tls_capable_postgres() else {
        return;
    };
    let db = backend.fresh_database();
    // The server's certificate names localhost (Debian's snakeoil certificate, trusted through
    // the system store), so connect by that name.
    let tls_url = format!(
        "{}?sslmode=require",
        db.url.replacen("@127.0.0.1", "@localhost", 1)
    );
    let database = db.url.rsplit('/').next().unwrap().to_string();
    let srv = server_on(std::sync::Arc::new(db))
        .env("DATABASE_URL", &tls_url)
        .start();

    let (status, _, body) = send(srv.get("/health"));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, token) = srv.user("tls@example.com");
    let (status, _, _) = send(srv.get("/api/users/me").bearer_auth(&token));
    assert_eq!(status, StatusCode::OK);

    let rows = admin(&admin_url)
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
            &[&database],
        )
        .unwrap();
    assert!(
        !rows.is_empty(),
        "the server holds connections to {database}"
    );
    assert!(
        rows.iter().all(|row| row.get::<_, bool>(0)),
        "every connection of the server uses TLS"
    );
}

#[test]
fn sslmode_require_refuses_an_untrusted_certificate() {
    let Some((backend, _)) = tls_capable_postgres() else {
        return;
    };
    let db = backend.fresh_database();
    // 127.0.0.1 is not the name on the certificate: the handshake must fail, not be waved through.
    let tls_url = format!("{}?sslmode=require", db.url);
    let (status, output) = server_on(std::sync::Arc::new(db))
        .env("DATABASE_URL", &tls_url)
        .expect_exit();
    assert!(!status.success(), "{output}");
    assert!(output.contains("DATABASE_URL"), "{output}");
    assert!(!output.contains("panicked"), "{output}");
}
