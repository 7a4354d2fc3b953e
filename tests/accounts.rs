//! Issue 3: accounts (register, login, /token, /api/users/me) and the JWT guard, including
//! failed-login throttling, account enumeration and secrets in logs. Black-box, on both backends.
mod common;
use common::*;

use std::time::{Duration, Instant};

use reqwest::blocking::RequestBuilder;
use reqwest::header::HeaderMap;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const LOGIN_FAILED: &str = "Incorrect email or password";
const TOO_MANY: &str = "Too many login attempts";

/// Base64url without padding (the JWT encoding), for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Signs `claims` with `alg` (an HMAC algorithm) and `secret`.
fn sign(alg: jsonwebtoken::Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A correctly signed HS256 token with the test secret.
fn good_token(claims: &Value) -> String {
    sign(jsonwebtoken::Algorithm::HS256, claims, TEST_SECRET)
}

/// An unsigned `alg: none` token.
fn alg_none_token(claims: &Value, signature: &str) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.{signature}")
}

/// Verifies a token issued by the server with `TEST_SECRET` (HS256 only) and returns its claims.
fn verified_claims(token: &str) -> Value {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let key = jsonwebtoken::DecodingKey::from_secret(TEST_SECRET.as_bytes()).unwrap();
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap_or_else(|e| panic!("issued token does not verify with JWT_SECRET/HS256: {e}"))
        .claims
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn bearer(request: RequestBuilder, token: &str) -> RequestBuilder {
    request.header("Authorization", format!("Bearer {token}"))
}

fn me(srv: &Server, token: &str) -> (StatusCode, HeaderMap, Value) {
    send(bearer(srv.get("/api/users/me"), token))
}

fn login_json(srv: &Server, email: &str, password: &str) -> (StatusCode, HeaderMap, Value) {
    send(
        srv.post("/api/auth/login")
            .json(&json!({"email": email, "password": password})),
    )
}

fn login_form(srv: &Server, email: &str, password: &str) -> (StatusCode, HeaderMap, Value) {
    send(
        srv.post("/token")
            .form(&[("username", email), ("password", password)]),
    )
}

fn login_json_from(
    srv: &Server,
    xff: &str,
    email: &str,
    password: &str,
) -> (StatusCode, HeaderMap, Value) {
    send(
        srv.post("/api/auth/login")
            .header("X-Forwarded-For", xff)
            .json(&json!({"email": email, "password": password})),
    )
}

fn login_form_from(
    srv: &Server,
    xff: &str,
    email: &str,
    password: &str,
) -> (StatusCode, HeaderMap, Value) {
    send(
        srv.post("/token")
            .header("X-Forwarded-For", xff)
            .form(&[("username", email), ("password", password)]),
    )
}

fn register_raw(srv: &Server, body: &Value) -> (StatusCode, HeaderMap, Value) {
    send(srv.post("/api/auth/register").json(body))
}

/// A 401 from the guard or the login routes: `WWW-Authenticate: Bearer` and `{"detail": "..."}`.
fn assert_401(response: &(StatusCode, HeaderMap, Value), context: &str) {
    let (status, headers, body) = response;
    assert_eq!(
        *status,
        StatusCode::UNAUTHORIZED,
        "{context}: expected 401, got {status} {body}"
    );
    let www = header_str(headers, "www-authenticate")
        .unwrap_or_else(|| panic!("{context}: 401 without WWW-Authenticate"));
    assert!(
        www.starts_with("Bearer"),
        "{context}: WWW-Authenticate is {www:?}, expected Bearer"
    );
    assert!(
        body["detail"].is_string(),
        "{context}: 401 body is not {{\"detail\": str}}: {body}"
    );
    assert!(
        header_str(headers, "content-type").is_some_and(|c| c.starts_with("application/json")),
        "{context}: 401 is not JSON: {headers:?}"
    );
}

/// A FastAPI-shaped 422: `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`.
fn assert_422(response: &(StatusCode, HeaderMap, Value), context: &str) {
    let (status, _, body) = response;
    assert_eq!(
        *status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{context}: expected 422, got {status} {body}"
    );
    let items = body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{context}: 422 detail is not a list: {body}"));
    assert!(!items.is_empty(), "{context}: empty 422 detail list");
    for item in items {
        assert!(
            item["loc"].is_array(),
            "{context}: 422 item without loc list: {body}"
        );
        assert!(
            item["msg"].is_string(),
            "{context}: 422 item without msg: {body}"
        );
        assert!(
            item["type"].is_string(),
            "{context}: 422 item without type: {body}"
        );
    }
}

/// A 422 whose `loc` names `field` somewhere.
fn assert_422_names(response: &(StatusCode, HeaderMap, Value), field: &str, context: &str) {
    assert_422(response, context);
    let named = response.2["detail"]
        .as_array()
        .unwrap()
        .iter()
        .any(|item| item["loc"].as_array().unwrap().iter().any(|p| p == field));
    assert!(
        named,
        "{context}: no 422 item's loc names {field:?}: {}",
        response.2
    );
}

fn assert_429(response: &(StatusCode, HeaderMap, Value), context: &str) {
    let (status, headers, body) = response;
    assert_eq!(
        *status,
        StatusCode::TOO_MANY_REQUESTS,
        "{context}: expected 429, got {status} {body}"
    );
    assert_eq!(body, &json!({"detail": TOO_MANY}), "{context}: 429 body");
    let retry = header_str(headers, "retry-after")
        .unwrap_or_else(|| panic!("{context}: 429 without Retry-After"));
    let seconds: u64 = retry
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{context}: Retry-After {retry:?} is not a number of seconds"));
    assert!(
        (1..=60).contains(&seconds),
        "{context}: Retry-After {seconds} not in 1..=60"
    );
}

fn assert_login_ok(response: &(StatusCode, HeaderMap, Value), context: &str) -> String {
    let (status, _, body) = response;
    assert_eq!(
        *status,
        StatusCode::OK,
        "{context}: expected 200, got {status} {body}"
    );
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no access_token: {body}"))
        .to_string()
}

fn assert_login_failed(response: &(StatusCode, HeaderMap, Value), context: &str) {
    assert_401(response, context);
    assert_eq!(
        response.2,
        json!({"detail": LOGIN_FAILED}),
        "{context}: body"
    );
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, l)| p.len() == l && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn assert_time(value: &Value, context: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{context}: time is not a string: {value}"));
    assert!(
        text.ends_with('Z'),
        "{context}: time {text:?} does not end with Z"
    );
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{context}: time {text:?} is not RFC 3339: {e}"))
}

/// The user JSON: exactly id, email, name, created_at, updated_at; never a hash.
fn assert_user(user: &Value, email: &str, name: Option<&str>, context: &str) {
    let object = user
        .as_object()
        .unwrap_or_else(|| panic!("{context}: user is not an object: {user}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["created_at", "email", "id", "name", "updated_at"],
        "{context}: user has other fields: {user}"
    );
    let id = user["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: id is not a string: {user}"));
    assert!(is_uuid(id), "{context}: id {id:?} is not a UUID");
    assert_eq!(user["email"], json!(email), "{context}: email");
    assert_eq!(user["name"], json!(name), "{context}: name");
    let created = assert_time(&user["created_at"], context);
    let updated = assert_time(&user["updated_at"], context);
    assert!(
        updated >= created,
        "{context}: updated_at before created_at: {user}"
    );
    let text = user.to_string();
    assert!(
        !text.contains("$2"),
        "{context}: something like a bcrypt hash in {text}"
    );
}

fn assert_token_response(
    response: &(StatusCode, HeaderMap, Value),
    user_id: &str,
    lifetime: i64,
    context: &str,
) {
    let (status, headers, body) = response;
    assert_eq!(
        *status,
        StatusCode::OK,
        "{context}: expected 200, got {status} {body}"
    );
    assert_eq!(
        header_str(headers, "cache-control")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("no-store"),
        "{context}: Cache-Control"
    );
    assert_eq!(
        header_str(headers, "x-content-type-options"),
        Some("nosniff"),
        "{context}: nosniff"
    );
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("{context}: not an object: {body}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["access_token", "expires_in", "token_type"],
        "{context}: token response {body}"
    );
    assert_eq!(body["token_type"], json!("bearer"), "{context}: token_type");
    assert_eq!(body["expires_in"], json!(lifetime), "{context}: expires_in");
    let token = body["access_token"].as_str().unwrap();
    let claims = verified_claims(token);
    assert_eq!(claims["sub"], json!(user_id), "{context}: sub");
    let iat = claims["iat"]
        .as_i64()
        .unwrap_or_else(|| panic!("{context}: iat not an integer: {claims}"));
    let exp = claims["exp"]
        .as_i64()
        .unwrap_or_else(|| panic!("{context}: exp not an integer: {claims}"));
    assert!(
        (iat - now_secs()).abs() <= 60,
        "{context}: iat {iat} is not now ({})",
        now_secs()
    );
    assert_eq!(exp - iat, lifetime, "{context}: exp - iat");
}

fn valid_claims(sub: &str) -> Value {
    let now = now_secs();
    json!({"sub": sub, "iat": now, "exp": now + 600})
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

fn guard_rejects_missing_header_and_other_schemes(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("guard@example.com");
    assert_eq!(
        me(&srv, &token).0,
        StatusCode::OK,
        "control: the real token works"
    );

    assert_401(
        &send(srv.get("/api/users/me")),
        "GET me without Authorization",
    );
    assert_401(
        &send(srv.patch("/api/users/me").json(&json!({"name": "x"}))),
        "PATCH me without Authorization",
    );
    assert_401(
        &send(
            srv.put("/api/users/me/password")
                .json(&json!({"current_password": PASSWORD, "new_password": "another password"})),
        ),
        "PUT password without Authorization",
    );
    assert_401(
        &send(srv.delete("/api/users/me")),
        "DELETE me without Authorization",
    );

    for value in [
        "Basic Z3VhcmRAZXhhbXBsZS5jb206Y29ycmVjdCBob3JzZSBiYXR0ZXJ5".to_string(),
        format!("Basic {token}"),
        format!("Token {token}"),
        format!("Digest {token}"),
        token.clone(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        "Bearer garbage".to_string(),
        "Bearer a.b.c".to_string(),
        "Bearer not.a-jwt.at-all!".to_string(),
        format!("Bearer {token}x"),
        format!("Bearer {}", &token[..token.len() - 3]),
        "Bearer eyJhbGciOiJIUzI1NiJ9".to_string(),
    ] {
        assert_401(
            &send(
                srv.get("/api/users/me")
                    .header("Authorization", value.as_str()),
            ),
            &format!("Authorization: {value:?}"),
        );
    }

    // Nothing above deleted or changed the user.
    let (status, _, body) = me(&srv, &token);
    assert_eq!(status, StatusCode::OK, "user still there: {body}");
    assert_eq!(
        body["name"],
        Value::Null,
        "PATCH without a token changed nothing"
    );
    srv.login("guard@example.com", PASSWORD);
}

fn guard_rejects_forged_tokens(backend: &Backend) {
    let srv = start(backend);
    let (user, _) = srv.user("forge@example.com");
    let id = user["id"].as_str().unwrap();
    let now = now_secs();

    // Control: a token forged the right way is accepted, so the rejections below are meaningful.
    let (status, _, body) = me(&srv, &good_token(&valid_claims(id)));
    assert_eq!(
        status,
        StatusCode::OK,
        "a correctly forged HS256 token is accepted: {body}"
    );
    assert_eq!(body["id"], json!(id));

    let real = good_token(&valid_claims(id));
    let real_signature = real.rsplit('.').next().unwrap().to_string();
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong secret",
            sign(
                jsonwebtoken::Algorithm::HS256,
                &valid_claims(id),
                "another-secret-that-is-at-least-32-bytes-long",
            ),
        ),
        (
            "alg none, no signature",
            alg_none_token(&valid_claims(id), ""),
        ),
        (
            "alg none, a real signature",
            alg_none_token(&valid_claims(id), &real_signature),
        ),
        (
            "HS512 with the right secret",
            sign(
                jsonwebtoken::Algorithm::HS512,
                &valid_claims(id),
                TEST_SECRET,
            ),
        ),
        (
            "HS384 with the right secret",
            sign(
                jsonwebtoken::Algorithm::HS384,
                &valid_claims(id),
                TEST_SECRET,
            ),
        ),
        (
            "expired 65 s ago",
            good_token(&json!({"sub": id, "iat": now - 1000, "exp": now - 65})),
        ),
        (
            "expired an hour ago",
            good_token(&json!({"sub": id, "iat": now - 7200, "exp": now - 3600})),
        ),
        (
            "exp as a string",
            good_token(&json!({"sub": id, "iat": now, "exp": (now + 600).to_string()})),
        ),
        (
            "exp as a word",
            good_token(&json!({"sub": id, "iat": now, "exp": "never"})),
        ),
        ("no exp", good_token(&json!({"sub": id, "iat": now}))),
        ("no sub", good_token(&json!({"iat": now, "exp": now + 600}))),
        ("empty sub", good_token(&valid_claims(""))),
        (
            "sub of no user",
            good_token(&valid_claims("6f1c1a3e-3f5b-4b8e-9a51-1d2f0c9e7b42")),
        ),
        (
            "sub is the email",
            good_token(&valid_claims("forge@example.com")),
        ),
        ("claims tampered after signing", {
            let other = good_token(&valid_claims("6f1c1a3e-3f5b-4b8e-9a51-1d2f0c9e7b42"));
            let mut parts: Vec<&str> = other.split('.').collect();
            let payload = b64url(valid_claims(id).to_string().as_bytes());
            parts[1] = &payload;
            parts.join(".")
        }),
    ];
    for (name, token) in &cases {
        assert_401(&me(&srv, token), &format!("forged token: {name}"));
    }
    // The same failures on a route that writes.
    assert_401(
        &send(bearer(srv.patch("/api/users/me"), &cases[1].1).json(&json!({"name": "pwned"}))),
        "PATCH me with alg none",
    );
    assert_401(
        &send(bearer(srv.delete("/api/users/me"), &cases[3].1)),
        "DELETE me with HS512",
    );
    let (status, _, body) = me(&srv, &real);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], Value::Null, "forged tokens changed nothing");
}

fn guard_leeway_is_at_most_60_seconds(backend: &Backend) {
    let srv = start(backend);
    let (user, _) = srv.user("leeway@example.com");
    let id = user["id"].as_str().unwrap();
    let now = now_secs();
    let recent = good_token(&json!({"sub": id, "iat": now - 1000, "exp": now - 30}));
    let (status, _, body) = me(&srv, &recent);
    assert_eq!(
        status,
        StatusCode::OK,
        "a token expired 30 s ago is within the leeway: {body}"
    );
    assert_eq!(body["id"], json!(id));
    let old = good_token(&json!({"sub": id, "iat": now - 1000, "exp": now - 65}));
    assert_401(&me(&srv, &old), "a token expired 65 s ago");
}

fn guard_ignores_token_in_query_string(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("query@example.com");
    for param in ["token", "access_token", "jwt", "auth"] {
        let path = format!("/api/users/me?{param}={token}");
        assert_401(
            &send(srv.get(&path)),
            &format!("GET {param}= without a header"),
        );
    }
    assert_401(
        &send(srv.get(&format!("/api/me/tasks?access_token={token}"))),
        "tasks with ?access_token=",
    );
    // With the header, a query string does not hurt.
    let (status, _, _) = send(bearer(srv.get("/api/users/me?token=whatever"), &token));
    assert_eq!(status, StatusCode::OK);
}

fn guard_accepts_hs256_with_iss_and_aud(backend: &Backend) {
    // JWT_ISSUER / JWT_AUDIENCE unset: a shared-secret token carrying iss and aud (as Better Auth
    // sends) and extra claims is accepted.
    let srv = start(backend);
    let (user, _) = srv.user("aud@example.com");
    let id = user["id"].as_str().unwrap();
    let now = now_secs();
    let token = good_token(&json!({
        "sub": id, "iat": now, "exp": now + 600,
        "iss": "http://localhost:3000", "aud": "http://localhost:3000",
        "email": "aud@example.com", "name": "Someone", "nbf": now - 5,
    }));
    let (status, _, body) = me(&srv, &token);
    assert_eq!(status, StatusCode::OK, "HS256 token with iss/aud: {body}");
    assert_eq!(body["id"], json!(id));
    let token = good_token(&json!({"sub": id, "iat": now, "exp": now + 600, "aud": ["a", "b"]}));
    let (status, _, body) = me(&srv, &token);
    assert_eq!(
        status,
        StatusCode::OK,
        "HS256 token with an aud list: {body}"
    );
    // Only exp and sub are required: a token without iat is accepted.
    let token = good_token(&json!({"sub": id, "exp": now + 600}));
    let (status, _, body) = me(&srv, &token);
    assert_eq!(status, StatusCode::OK, "HS256 token without iat: {body}");
}

// ---------------------------------------------------------------------------------------------
// Register
// ---------------------------------------------------------------------------------------------

fn register_returns_the_user(backend: &Backend) {
    let srv = start(backend);
    let (status, headers, body) = register_raw(
        &srv,
        &json!({"email": "plain@example.com", "password": PASSWORD}),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        header_str(&headers, "content-type").is_some_and(|c| c.starts_with("application/json")),
        "{headers:?}"
    );
    assert_eq!(
        header_str(&headers, "x-content-type-options"),
        Some("nosniff")
    );
    assert_user(&body, "plain@example.com", None, "register without name");
    assert!(
        !body.to_string().contains(PASSWORD),
        "register echoes the password"
    );

    let (status, _, named) = register_raw(
        &srv,
        &json!({"email": "  Named.Person@Example.COM ", "password": PASSWORD, "name": "Ada Lovelace"}),
    );
    assert_eq!(status, StatusCode::CREATED, "{named}");
    assert_user(
        &named,
        "named.person@example.com",
        Some("Ada Lovelace"),
        "register with name",
    );
    assert_ne!(named["id"], body["id"], "distinct ids");

    let (status, _, null_name) = register_raw(
        &srv,
        &json!({"email": "nullname@example.com", "password": PASSWORD, "name": null}),
    );
    assert_eq!(status, StatusCode::CREATED, "{null_name}");
    assert_user(
        &null_name,
        "nullname@example.com",
        None,
        "register with name null",
    );

    // The stored (normalized) email logs in, in any case.
    let token = srv.login("named.person@example.com", PASSWORD);
    let (status, _, me_body) = me(&srv, &token);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me_body, named, "GET me returns what register returned");
    srv.login("NAMED.PERSON@example.com", PASSWORD);
}

fn register_conflict_is_case_insensitive(backend: &Backend) {
    let srv = start(backend);
    srv.register("taken@example.com", PASSWORD);
    for email in [
        "taken@example.com",
        "TAKEN@Example.com",
        "  taken@example.com  ",
        "Taken@EXAMPLE.COM ",
    ] {
        let (status, _, body) = register_raw(
            &srv,
            &json!({"email": email, "password": "some other password"}),
        );
        assert_eq!(status, StatusCode::CONFLICT, "register {email:?}: {body}");
        assert!(body["detail"].is_string(), "409 body: {body}");
    }
    // The original password still works, and the conflicting attempts did not replace it.
    srv.login("taken@example.com", PASSWORD);
    assert_login_failed(
        &login_json(&srv, "taken@example.com", "some other password"),
        "no overwrite",
    );
    // Registered first in upper case: a lower-case attempt conflicts too.
    srv.register("UPPER@EXAMPLE.COM", PASSWORD);
    let (status, _, body) = register_raw(
        &srv,
        &json!({"email": "upper@example.com", "password": PASSWORD}),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

fn register_validates_input(backend: &Backend) {
    let srv = start(backend);
    for email in [
        "",
        "not-an-email",
        "a@",
        "@example.com",
        "a b@example.com",
        "two@@example.com",
        "   ",
    ] {
        let response = register_raw(&srv, &json!({"email": email, "password": PASSWORD}));
        assert_422_names(&response, "email", &format!("invalid email {email:?}"));
    }
    let bad_passwords = [
        "".to_string(),
        "short".to_string(),
        "1234567".to_string(),          // 7 characters
        "ééééééé".to_string(),          // 7 characters (14 bytes)
        "x".repeat(73),                 // 73 bytes
        format!("{}é", "x".repeat(71)), // 72 characters, 73 bytes
        "y".repeat(200),
    ];
    for password in &bad_passwords {
        let response = register_raw(
            &srv,
            &json!({"email": "valid@example.com", "password": password}),
        );
        assert_422_names(
            &response,
            "password",
            &format!("password of {} bytes", password.len()),
        );
        if password.len() >= 7 {
            assert!(
                !response.2.to_string().contains(password.as_str()),
                "422 echoes the password: {}",
                response.2
            );
        }
    }
    assert_422(
        &register_raw(&srv, &json!({"password": PASSWORD})),
        "missing email",
    );
    assert_422(
        &register_raw(&srv, &json!({"email": "valid@example.com"})),
        "missing password",
    );
    assert_422(&register_raw(&srv, &json!({})), "empty object");
    assert_422(
        &register_raw(&srv, &json!({"email": 5, "password": PASSWORD})),
        "email a number",
    );
    assert_422(
        &register_raw(
            &srv,
            &json!({"email": "valid@example.com", "password": 12345678}),
        ),
        "password a number",
    );
    assert_422(
        &register_raw(&srv, &json!(["valid@example.com", PASSWORD])),
        "array body",
    );
    assert_422(
        &send(
            srv.post("/api/auth/register")
                .header("Content-Type", "application/json")
                .body("{\"email\": \"valid@example.com\", "),
        ),
        "malformed JSON",
    );
    // None of the refused attempts created the account.
    srv.register("valid@example.com", PASSWORD);
    // Exactly 8 characters is enough.
    srv.register("eight@example.com", "12345678");
    srv.login("eight@example.com", "12345678");
}

fn register_password_72_byte_boundary(backend: &Backend) {
    let srv = start(backend);
    let p72 = format!("{}{}", "Ab1-".repeat(17), "wxyz"); // 72 bytes
    assert_eq!(p72.len(), 72);
    let p73 = format!("{p72}!");
    assert_422_names(
        &register_raw(
            &srv,
            &json!({"email": "seventy3@example.com", "password": p73}),
        ),
        "password",
        "73-byte password",
    );
    let (status, _, body) = register_raw(
        &srv,
        &json!({"email": "seventy2@example.com", "password": p72}),
    );
    assert_eq!(status, StatusCode::CREATED, "72-byte password: {body}");
    assert_user(&body, "seventy2@example.com", None, "72-byte register");

    assert_login_ok(
        &login_json(&srv, "seventy2@example.com", &p72),
        "JSON login with 72 bytes",
    );
    assert_login_ok(
        &login_form(&srv, "seventy2@example.com", &p72),
        "/token with 72 bytes",
    );
    // Never truncated: 72 bytes + extra is another password.
    for extra in ["!", "extra characters"] {
        let longer = format!("{p72}{extra}");
        assert_login_failed(
            &login_json(&srv, "seventy2@example.com", &longer),
            "JSON login with 72+ bytes",
        );
        assert_login_failed(
            &login_form(&srv, "seventy2@example.com", &longer),
            "/token with 72+ bytes",
        );
    }
    // The 73-byte attempt created nothing.
    assert_login_failed(
        &login_json(&srv, "seventy3@example.com", &p72),
        "refused account does not exist",
    );
}

// ---------------------------------------------------------------------------------------------
// Login and /token
// ---------------------------------------------------------------------------------------------

fn login_json_issues_a_token(backend: &Backend) {
    let srv = start(backend);
    let user = srv.register("json@example.com", PASSWORD);
    let id = user["id"].as_str().unwrap();
    let response = login_json(&srv, "json@example.com", PASSWORD);
    assert_token_response(&response, id, 1800, "JSON login");
    assert!(
        !response.2.to_string().contains(PASSWORD),
        "token response echoes the password"
    );
    let token = response.2["access_token"].as_str().unwrap();
    let (status, _, body) = me(&srv, token);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, user);

    let upper = login_json(&srv, "JSON@Example.COM", PASSWORD);
    assert_token_response(&upper, id, 1800, "JSON login with an upper-case email");

    // A JSON route given a form is 415; missing or mistyped fields are 422.
    let (status, _, body) = send(
        srv.post("/api/auth/login")
            .form(&[("email", "json@example.com"), ("password", PASSWORD)]),
    );
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "form on the JSON login: {body}"
    );
    assert!(body["detail"].is_string(), "415 body: {body}");
    assert_422(
        &send(
            srv.post("/api/auth/login")
                .json(&json!({"email": "json@example.com"})),
        ),
        "JSON login without password",
    );
    assert_422(
        &send(
            srv.post("/api/auth/login")
                .json(&json!({"password": PASSWORD})),
        ),
        "JSON login without email",
    );
}

fn token_form_flow(backend: &Backend) {
    let srv = start(backend);
    let user = srv.register("form@example.com", PASSWORD);
    let id = user["id"].as_str().unwrap();

    let response = login_form(&srv, "form@example.com", PASSWORD);
    assert_token_response(&response, id, 1800, "/token");
    let token = response.2["access_token"].as_str().unwrap();
    assert_eq!(me(&srv, token).0, StatusCode::OK);

    let with_grant = send(srv.post("/token").form(&[
        ("grant_type", "password"),
        ("username", "form@example.com"),
        ("password", PASSWORD),
        ("scope", ""),
    ]));
    assert_token_response(
        &with_grant,
        id,
        1800,
        "/token with grant_type=password and empty scope",
    );
    let with_scope = send(srv.post("/token").form(&[
        ("grant_type", "password"),
        ("username", "Form@Example.com"),
        ("password", PASSWORD),
        ("scope", "read write"),
        ("client_id", "swagger"),
    ]));
    assert_token_response(&with_scope, id, 1800, "/token with scopes and client_id");

    let wrong = login_form(&srv, "form@example.com", "wrong password!");
    assert_login_failed(&wrong, "/token with a wrong password");
    assert_eq!(
        header_str(&wrong.1, "x-content-type-options"),
        Some("nosniff")
    );
}

fn token_form_rejects_json_and_missing_fields(backend: &Backend) {
    let srv = start(backend);
    srv.register("strict@example.com", PASSWORD);
    assert_422(
        &send(
            srv.post("/token")
                .json(&json!({"username": "strict@example.com", "password": PASSWORD})),
        ),
        "/token with a JSON body",
    );
    assert_422_names(
        &send(srv.post("/token").form(&[("password", PASSWORD)])),
        "username",
        "/token without username",
    );
    assert_422_names(
        &send(
            srv.post("/token")
                .form(&[("username", "strict@example.com")]),
        ),
        "password",
        "/token without password",
    );
    assert_422(&send(srv.post("/token")), "/token with no body");
    // FastAPI's OAuth2PasswordRequestForm accepts only grant_type=password.
    assert_422(
        &send(srv.post("/token").form(&[
            ("grant_type", "client_credentials"),
            ("username", "strict@example.com"),
            ("password", PASSWORD),
        ])),
        "/token with grant_type=client_credentials",
    );
    // Forms are limited to 4 KiB.
    let big = "p".repeat(5000);
    let (status, _, body) = send(srv.post("/token").form(&[
        ("username", "strict@example.com"),
        ("password", big.as_str()),
    ]));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "5 KB form: {body}");
    assert!(body["detail"].is_string(), "413 body: {body}");
    // After all that, the account logs in.
    assert_login_ok(
        &login_form(&srv, "strict@example.com", PASSWORD),
        "/token after refusals",
    );
}

fn token_lifetime_follows_config(backend: &Backend) {
    let srv = server(backend)
        .env("ACCESS_TOKEN_EXPIRE_MINUTES", "5")
        .start();
    let user = srv.register("short@example.com", PASSWORD);
    let id = user["id"].as_str().unwrap();
    assert_token_response(
        &login_json(&srv, "short@example.com", PASSWORD),
        id,
        300,
        "JSON, 5 minutes",
    );
    assert_token_response(
        &login_form(&srv, "short@example.com", PASSWORD),
        id,
        300,
        "/token, 5 minutes",
    );
}

// ---------------------------------------------------------------------------------------------
// Account enumeration
// ---------------------------------------------------------------------------------------------

fn login_failures_are_indistinguishable(backend: &Backend) {
    let srv = start(backend);
    srv.register("exists@example.com", PASSWORD);
    let cases = [
        ("unknown email", "nobody@example.com", PASSWORD.to_string()),
        (
            "unknown email 2",
            "ghost@example.com",
            "whatever password".to_string(),
        ),
        (
            "wrong password",
            "exists@example.com",
            "not the password".to_string(),
        ),
        (
            "too short password",
            "exists@example.com",
            "abc".to_string(),
        ),
        ("too long password", "exists@example.com", "z".repeat(100)),
        ("empty password", "exists@example.com", String::new()),
    ];
    let mut seen: Vec<(StatusCode, Value, Option<String>)> = Vec::new();
    for (name, email, password) in &cases {
        let mut routes = vec![("JSON", login_json(&srv, email, password))];
        // An empty form field is an absent one, as FastAPI has it: `password=` is a 422
        // (checked below), whether or not the account exists.
        if !password.is_empty() {
            routes.push(("/token", login_form(&srv, email, password)));
        }
        for (route, response) in routes {
            let context = format!("{route} {name}");
            assert_login_failed(&response, &context);
            if password.len() >= 5 {
                assert!(
                    !response.2.to_string().contains(password.as_str()),
                    "{context}: echoes password"
                );
            }
            seen.push((
                response.0,
                response.2.clone(),
                header_str(&response.1, "www-authenticate").map(String::from),
            ));
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "responses differ: {seen:?}"
    );
    for email in ["exists@example.com", "nobody@example.com"] {
        let (status, _, body) = login_form(&srv, email, "");
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "/token {email} password=: {body}"
        );
        assert_eq!(
            body["detail"][0]["loc"],
            json!(["body", "password"]),
            "{body}"
        );
        assert_eq!(body["detail"][0]["type"], "missing", "{body}");
    }
    srv.login("exists@example.com", PASSWORD);
}

fn login_timing_does_not_reveal_accounts(backend: &Backend) {
    // BCRYPT_COST=10 so the hash dominates. Per-email and per-address failures stay under the
    // throttling limits: 2 + 16 failures in all, at most 5 per email.
    let srv = server(backend).env("BCRYPT_COST", "10").start();
    let users = ["timing1@example.com", "timing2@example.com"];
    for email in users {
        srv.register(email, PASSWORD);
    }
    // Warm-up.
    assert_login_failed(
        &login_json(&srv, "warmup-unknown@example.com", PASSWORD),
        "warm-up unknown",
    );
    assert_login_failed(
        &login_json(&srv, users[0], "wrong password"),
        "warm-up wrong",
    );

    let runs = 8;
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    for run in 0..runs {
        let unknown_email = format!("unknown{run}@example.com");
        let known_email = users[run % 2];
        let measure = |email: &str| {
            let started = Instant::now();
            let response = login_json(&srv, email, "wrong password");
            let elapsed = started.elapsed().as_secs_f64();
            assert_login_failed(&response, &format!("timing run {run} {email}"));
            elapsed
        };
        if run % 2 == 0 {
            unknown.push(measure(&unknown_email));
            wrong.push(measure(known_email));
        } else {
            wrong.push(measure(known_email));
            unknown.push(measure(&unknown_email));
        }
    }
    let (m_unknown, m_wrong) = (median(&mut unknown), median(&mut wrong));
    let ratio = m_unknown / m_wrong;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "login time reveals accounts: median unknown email {:.1} ms, wrong password {:.1} ms \
         (ratio {ratio:.2}); unknown {unknown:?}, wrong {wrong:?}",
        m_unknown * 1000.0,
        m_wrong * 1000.0
    );
    // The accounts still work (not throttled).
    for email in users {
        srv.login(email, PASSWORD);
    }
}

// ---------------------------------------------------------------------------------------------
// Failed-login throttling
// ---------------------------------------------------------------------------------------------

fn throttle_per_email(backend: &Backend) {
    let srv = start(backend);
    srv.register("victim@example.com", PASSWORD);
    srv.register("bystander@example.com", PASSWORD);
    for i in 0..10 {
        let response = if i % 2 == 0 {
            login_json(&srv, "victim@example.com", &format!("guess number {i}"))
        } else {
            login_form(&srv, "victim@example.com", &format!("guess number {i}"))
        };
        assert_login_failed(&response, &format!("failure {} of 10", i + 1));
    }
    // After 10 failures within a minute: 429, even for the right password, on both routes.
    assert_429(
        &login_json(&srv, "victim@example.com", PASSWORD),
        "JSON login, right password",
    );
    assert_429(
        &login_form(&srv, "victim@example.com", PASSWORD),
        "/token, right password",
    );
    assert_429(
        &login_json(&srv, "VICTIM@example.com", PASSWORD),
        "JSON login, other case",
    );
    assert_429(
        &login_form(&srv, "victim@example.com", "guess again"),
        "/token, wrong password",
    );
    // Another email keeps working, from the same address.
    assert_login_ok(
        &login_json(&srv, "bystander@example.com", PASSWORD),
        "other email, JSON",
    );
    assert_login_ok(
        &login_form(&srv, "bystander@example.com", PASSWORD),
        "other email, /token",
    );
    // Tokens issued before still work: throttling is about logins only.
    let token = srv.login("bystander@example.com", PASSWORD);
    assert_eq!(me(&srv, &token).0, StatusCode::OK);
}

fn throttle_per_email_counts_every_address_and_case(backend: &Backend) {
    let srv = server(backend).env("TRUSTED_PROXIES", "127.0.0.1").start();
    srv.register("target@example.com", PASSWORD);
    srv.register("other@example.com", PASSWORD);
    let spellings = [
        "target@example.com",
        "TARGET@example.com",
        "Target@Example.Com",
        "target@EXAMPLE.COM",
    ];
    for i in 0..10 {
        let xff = format!("10.0.1.{}", i + 1);
        let email = spellings[i % spellings.len()];
        let response = if i % 2 == 0 {
            login_json_from(&srv, &xff, email, "bad guess")
        } else {
            login_form_from(&srv, &xff, email, "bad guess")
        };
        assert_login_failed(
            &response,
            &format!("failure {} of 10 from {xff} as {email}", i + 1),
        );
    }
    assert_429(
        &login_json_from(&srv, "10.0.2.1", "target@example.com", PASSWORD),
        "right password from a fresh address",
    );
    assert_429(
        &login_form_from(&srv, "10.0.2.2", "target@example.com", PASSWORD),
        "/token, right password from a fresh address",
    );
    assert_login_ok(
        &login_json_from(&srv, "10.0.2.1", "other@example.com", PASSWORD),
        "other email",
    );
}

fn throttle_per_client_address(backend: &Backend) {
    let srv = server(backend).env("TRUSTED_PROXIES", "127.0.0.1").start();
    srv.register("real@example.com", PASSWORD);
    srv.register("second@example.com", PASSWORD);
    let attacker = "10.0.0.1";
    for i in 0..30 {
        let email = format!("spray{i}@example.com");
        let response = if i % 2 == 0 {
            login_json_from(&srv, attacker, &email, "Password1!")
        } else {
            login_form_from(&srv, attacker, &email, "Password1!")
        };
        assert_login_failed(
            &response,
            &format!("failure {} of 30 from {attacker}", i + 1),
        );
    }
    // The address is throttled for any email, even with the right password.
    assert_429(
        &login_json_from(&srv, attacker, "real@example.com", PASSWORD),
        "throttled address, JSON",
    );
    assert_429(
        &login_form_from(&srv, attacker, "real@example.com", PASSWORD),
        "throttled address, /token",
    );
    // Spoofing addresses in front of the real one does not help: the client address is the last
    // X-Forwarded-For entry that is not a trusted proxy.
    assert_429(
        &login_json_from(
            &srv,
            "203.0.113.9, 10.0.0.1",
            "second@example.com",
            PASSWORD,
        ),
        "spoofed first X-Forwarded-For entry",
    );
    assert_429(
        &login_json_from(&srv, "10.0.0.1, 127.0.0.1", "second@example.com", PASSWORD),
        "trusted proxy after the client in X-Forwarded-For",
    );
    // Other addresses keep working, for the same and other emails.
    assert_login_ok(
        &login_json_from(&srv, "10.0.0.2", "real@example.com", PASSWORD),
        "other address, JSON",
    );
    assert_login_ok(
        &login_form_from(&srv, "10.0.0.2", "second@example.com", PASSWORD),
        "other address, /token",
    );
    assert_login_ok(
        &login_json_from(&srv, "10.0.0.1, 10.0.0.3", "second@example.com", PASSWORD),
        "last untrusted entry is another address",
    );
}

/// Fails 30 logins (the per-address limit) from `xff(i)`, each for an email of its own.
fn spray(srv: &Server, xff: impl Fn(usize) -> String) {
    for i in 0..30 {
        let (xff, email) = (xff(i), format!("spray{i}@example.com"));
        let response = login_json_from(srv, &xff, &email, "Password1!");
        assert_login_failed(&response, &format!("failure {} from {xff}", i + 1));
    }
}

/// An IPv6 client is counted per /64 (one holds billions of addresses), and an IPv4 address
/// written as IPv6 (`::ffff:10.9.9.9`) is the same client as `10.9.9.9`.
fn throttle_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4(backend: &Backend) {
    let srv = server(backend).env("TRUSTED_PROXIES", "127.0.0.1").start();
    srv.register("real@example.com", PASSWORD);
    spray(&srv, |i| format!("2001:db8:1:2::{:x}", i + 1));
    let same_64 = login_json_from(&srv, "2001:db8:1:2:ffff::1", "real@example.com", PASSWORD);
    assert_429(&same_64, "another address of the same /64");
    let other_64 = login_json_from(&srv, "2001:db8:1:3::1", "real@example.com", PASSWORD);
    assert_login_ok(&other_64, "an address of another /64");

    spray(&srv, |_| "::ffff:10.9.9.9".to_string());
    let plain = login_json_from(&srv, "10.9.9.9", "real@example.com", PASSWORD);
    assert_429(&plain, "10.9.9.9 after failures as ::ffff:10.9.9.9");
}

/// A server listening on `::` sees an IPv4 peer as `::ffff:127.0.0.1`: that is still the
/// trusted proxy 127.0.0.1, so each forwarded client keeps a bucket of its own (were the proxy
/// not recognised, every client behind it would share the proxy's, and anyone could lock out
/// every login behind it).
fn trusted_proxy_is_recognised_on_a_dual_stack_listener(backend: &Backend) {
    let srv = server(backend)
        .env("HOST", "::")
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .start();
    // Over IPv4, to the IPv6 socket.
    let login_from = |xff: &str, email: &str, password: &str| {
        let url = format!("http://127.0.0.1:{}/api/auth/login", srv.port);
        let body = json!({"email": email, "password": password});
        send(
            srv.client
                .post(url)
                .header("X-Forwarded-For", xff)
                .json(&body),
        )
    };
    srv.register("real@example.com", PASSWORD);
    for i in 0..30 {
        let (xff, email) = (format!("10.1.0.{}", i + 1), format!("spray{i}@example.com"));
        let response = login_from(&xff, &email, "Password1!");
        assert_login_failed(&response, &format!("failure {} from {xff}", i + 1));
    }
    let fresh = login_from("10.1.1.1", "real@example.com", PASSWORD);
    assert_login_ok(&fresh, "a fresh client behind the same proxy");
}

fn throttle_ignores_untrusted_forwarded_for(backend: &Backend) {
    // Without TRUSTED_PROXIES, and with TRUSTED_PROXIES not naming the peer, X-Forwarded-For is
    // ignored: spoofing it does not escape the per-address limit.
    for trusted in [None, Some("192.0.2.10")] {
        let builder = server(backend);
        let builder = match trusted {
            Some(list) => builder.env("TRUSTED_PROXIES", list),
            None => builder,
        };
        let srv = builder.start();
        srv.register("real@example.com", PASSWORD);
        for i in 0..30 {
            let xff = format!("10.3.{}.{}", i / 200, i % 200 + 1);
            let email = format!("spray{i}@example.com");
            let response = login_json_from(&srv, &xff, &email, "Password1!");
            assert_login_failed(
                &response,
                &format!("TRUSTED_PROXIES={trusted:?}: failure {} from {xff}", i + 1),
            );
        }
        assert_429(
            &login_json_from(&srv, "10.4.0.1", "real@example.com", PASSWORD),
            &format!("TRUSTED_PROXIES={trusted:?}: fresh spoofed X-Forwarded-For"),
        );
        assert_429(
            &login_form_from(&srv, "10.4.0.2, 10.4.0.3", "real@example.com", PASSWORD),
            &format!("TRUSTED_PROXIES={trusted:?}: spoofed chain on /token"),
        );
        assert_429(
            &login_json(&srv, "real@example.com", PASSWORD),
            &format!("TRUSTED_PROXIES={trusted:?}: no X-Forwarded-For"),
        );
    }
}

fn throttle_is_not_permanent(backend: &Backend) {
    let srv = start(backend);
    srv.register("patient@example.com", PASSWORD);
    for i in 0..10 {
        assert_login_failed(
            &login_json(&srv, "patient@example.com", "nope nope"),
            &format!("failure {}", i + 1),
        );
    }
    let blocked = login_json(&srv, "patient@example.com", PASSWORD);
    assert_429(&blocked, "after 10 failures");
    let retry: u64 = header_str(&blocked.1, "retry-after")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_secs(retry + 2));
    assert_login_ok(
        &login_json(&srv, "patient@example.com", PASSWORD),
        "after Retry-After elapsed",
    );
    assert_login_ok(
        &login_form(&srv, "patient@example.com", PASSWORD),
        "/token after Retry-After elapsed",
    );
}

// ---------------------------------------------------------------------------------------------
// /api/users/me
// ---------------------------------------------------------------------------------------------

fn me_returns_the_user(backend: &Backend) {
    let srv = start(backend);
    let (user, token) = srv.user("me@example.com");
    assert_user(&user, "me@example.com", None, "register");
    let (status, headers, body) = me(&srv, &token);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        header_str(&headers, "x-content-type-options"),
        Some("nosniff")
    );
    assert_user(&body, "me@example.com", None, "GET me");
    assert_eq!(body, user);
    // Another user's token sees the other user.
    let (other, other_token) = srv.user("other@example.com");
    let (_, _, body) = me(&srv, &other_token);
    assert_eq!(body, other);
    assert_ne!(other["id"], user["id"]);
}

fn patch_me(backend: &Backend) {
    let srv = start(backend);
    let (user, token) = srv.user("patch@example.com");
    srv.register("someone@example.com", PASSWORD);
    let patch = |body: Value| send(bearer(srv.patch("/api/users/me"), &token).json(&body));

    let (status, _, named) = patch(json!({"name": "Grace Hopper"}));
    assert_eq!(status, StatusCode::OK, "{named}");
    assert_user(
        &named,
        "patch@example.com",
        Some("Grace Hopper"),
        "PATCH name",
    );
    assert_eq!(named["id"], user["id"]);
    assert_eq!(
        named["created_at"], user["created_at"],
        "created_at never changes"
    );
    assert!(assert_time(&named["updated_at"], "") >= assert_time(&user["updated_at"], ""));
    assert_eq!(me(&srv, &token).2, named, "PATCH persisted");

    let (status, _, same) = patch(json!({}));
    assert_eq!(status, StatusCode::OK, "{same}");
    assert_eq!(
        same["name"],
        json!("Grace Hopper"),
        "an absent key leaves the name"
    );
    assert_eq!(same["email"], json!("patch@example.com"));

    let (status, _, cleared) = patch(json!({"name": null}));
    assert_eq!(status, StatusCode::OK, "{cleared}");
    assert_user(&cleared, "patch@example.com", None, "name null clears");
    assert_eq!(me(&srv, &token).2["name"], Value::Null);

    assert_422_names(&patch(json!({"email": null})), "email", "email null");
    assert_422_names(
        &patch(json!({"email": "not-an-email"})),
        "email",
        "invalid email",
    );
    assert_422(&patch(json!({"name": 5})), "name a number");
    for taken in ["someone@example.com", " SomeOne@Example.com "] {
        let (status, _, body) = patch(json!({"email": taken}));
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "PATCH email to taken {taken:?}: {body}"
        );
        assert!(body["detail"].is_string(), "{body}");
    }
    let (status, _, body) = patch(json!({"email": "patch@example.com"}));
    assert_eq!(status, StatusCode::OK, "PATCH to one's own email: {body}");
    assert_eq!(
        me(&srv, &token).2["email"],
        json!("patch@example.com"),
        "refused PATCHes changed nothing"
    );

    let (status, _, moved) = patch(json!({"email": "  New.Address@Example.COM ", "name": "G. H."}));
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_user(
        &moved,
        "new.address@example.com",
        Some("G. H."),
        "PATCH email",
    );
    assert_eq!(moved["id"], user["id"], "id unchanged");
    // The token still works (sub is the id), the new email logs in, the old one does not.
    assert_eq!(me(&srv, &token).2, moved);
    srv.login("new.address@example.com", PASSWORD);
    assert_login_failed(
        &login_json(&srv, "patch@example.com", PASSWORD),
        "old email",
    );
    // The old email is free again; the new one is taken.
    srv.register("patch@example.com", PASSWORD);
    let (status, _, body) = register_raw(
        &srv,
        &json!({"email": "NEW.ADDRESS@example.com", "password": PASSWORD}),
    );
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

fn change_password(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("pw@example.com");
    let put = |body: Value| send(bearer(srv.put("/api/users/me/password"), &token).json(&body));
    let new_password = "a brand new passphrase";

    let (status, _, body) =
        put(json!({"current_password": "not my password", "new_password": new_password}));
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "wrong current password: {body}"
    );
    assert!(body["detail"].is_string(), "{body}");
    assert!(
        !body.to_string().contains(new_password),
        "400 echoes the new password"
    );
    srv.login("pw@example.com", PASSWORD);

    for bad in [
        "short".to_string(),
        "ééééééé".to_string(),
        "q".repeat(73),
        format!("{}é", "q".repeat(71)),
    ] {
        let response = put(json!({"current_password": PASSWORD, "new_password": bad}));
        assert_422_names(
            &response,
            "new_password",
            &format!("new password of {} bytes", bad.len()),
        );
        if bad.len() > 5 {
            assert!(
                !response.2.to_string().contains(bad.as_str()),
                "422 echoes the new password"
            );
        }
    }
    assert_422(
        &put(json!({"current_password": PASSWORD})),
        "missing new_password",
    );
    assert_422(
        &put(json!({"new_password": new_password})),
        "missing current_password",
    );
    srv.login("pw@example.com", PASSWORD);

    let response = bearer(srv.put("/api/users/me/password"), &token)
        .json(&json!({"current_password": PASSWORD, "new_password": new_password}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.text().unwrap().is_empty(), "204 has no body");

    assert_login_failed(
        &login_json(&srv, "pw@example.com", PASSWORD),
        "old password, JSON",
    );
    assert_login_failed(
        &login_form(&srv, "pw@example.com", PASSWORD),
        "old password, /token",
    );
    assert_login_ok(
        &login_json(&srv, "pw@example.com", new_password),
        "new password, JSON",
    );
    assert_login_ok(
        &login_form(&srv, "pw@example.com", new_password),
        "new password, /token",
    );

    // The change ended the old token; the client logs in again.
    assert_401(&me(&srv, &token), "the token from before the change");
    let token = srv.login("pw@example.com", new_password);
    // The 72-byte limit applies to the new password exactly as to registration.
    let p72 = "k".repeat(72);
    let (status, _, body) = send(
        bearer(srv.put("/api/users/me/password"), &token)
            .json(&json!({"current_password": new_password, "new_password": p72})),
    );
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "72-byte new password: {body}"
    );
    assert_login_ok(
        &login_json(&srv, "pw@example.com", &p72),
        "72-byte password",
    );
    assert_login_failed(
        &login_json(&srv, "pw@example.com", &format!("{p72}k")),
        "73 bytes not truncated",
    );
}

/// `PUT /api/users/me/password` with `token`; the status.
fn put_password(srv: &Server, token: &str, current: &str, new: &str) -> StatusCode {
    let body = json!({"current_password": current, "new_password": new});
    send(bearer(srv.put("/api/users/me/password"), token).json(&body)).0
}

/// Sleeps until just after the next whole second, so that what follows (a few milliseconds at
/// the harness's BCRYPT_COST=4) happens within one second.
fn wait_for_a_new_second() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let into_second = now.unwrap().subsec_millis() as u64;
    std::thread::sleep(Duration::from_millis(1000 - into_second + 5));
}

/// Two changes within one second: the tokens issued between them end with the second change,
/// including the one that made it. (Revocation by the second of `iat` dated them like the
/// second change and let them live.)
fn password_changes_within_one_second(backend: &Backend) {
    let srv = start(backend);
    let email = "twice@example.com";
    let (_, token) = srv.user(email);
    let (second, third) = ("the second passphrase", "the third passphrase");
    wait_for_a_new_second();
    assert_eq!(
        put_password(&srv, &token, PASSWORD, second),
        StatusCode::NO_CONTENT
    );
    let a = srv.login(email, second);
    let b = srv.login(email, second);
    assert_eq!(
        put_password(&srv, &b, second, third),
        StatusCode::NO_CONTENT
    );
    assert_401(&me(&srv, &a), "token A, issued between the two changes");
    assert_401(&me(&srv, &b), "token B, which made the second change");
    assert_401(&me(&srv, &token), "the token from before both changes");
    let c = srv.login(email, third);
    assert_eq!(me(&srv, &c).0, StatusCode::OK, "a token after the changes");
}

/// A login that read the old password's hash before a change commits, and signs its token after
/// it (bcrypt takes a while), gets a token that dies with the change: someone who knows the old
/// password cannot keep a session by looping logins while the owner changes it.
///
/// The race is set up with bcrypt costs. The old password is hashed at a high cost, so checking
/// it takes seconds; the change runs on a second server (same database) whose own cost is the
/// harness's 4, so it commits the new password the moment it has checked the old one. A login
/// started partway through that check reads the old hash before the commit and signs its token
/// more than a second after it. Timing can miss on a busy machine, so it is tried a few times.
fn login_racing_a_password_change(backend: &Backend) {
    let slow = server(backend).env("BCRYPT_COST", "13").start();
    let srv = server_on(slow.db.clone()).start();
    for attempt in 0..3 {
        let email = format!("raced{attempt}@example.com");
        slow.register(&email, PASSWORD);
        if race_a_login_against_a_change(&slow, &srv, &email) {
            return;
        }
    }
    panic!("the race was not set up in 3 attempts: the machine is too busy");
}

/// One attempt of `login_racing_a_password_change`: whether the race was set up (the login
/// read the old hash and signed its token in a later second than the change answered in).
/// The first login goes to `slow`, whose cost is the hash's: on `srv` it would make the hash
/// again at `srv`'s cost, and checking it would no longer be slow.
fn race_a_login_against_a_change(slow: &Server, srv: &Server, email: &str) -> bool {
    let started = Instant::now();
    let token = slow.login(email, PASSWORD);
    let check = started.elapsed().as_secs_f64();
    assert!(
        check > 1.5,
        "checking a cost-13 hash took {check:.2} s; raise the cost"
    );
    // The change commits about `check` after it starts; the login must read the hash before
    // that and sign at least a second after it.
    let head_start = Duration::from_secs_f64(1.3 + (check - 1.3) / 3.0);
    let (changed, raced) = std::thread::scope(|s| {
        let change = s.spawn(|| {
            let status = put_password(srv, &token, PASSWORD, "the owner's new passphrase");
            (status, now_secs())
        });
        std::thread::sleep(head_start);
        let raced = login_json(srv, email, PASSWORD);
        (change.join().unwrap(), raced)
    });
    let (status, answered_at) = changed;
    assert_eq!(status, StatusCode::NO_CONTENT, "the change");
    assert_401(&me(srv, &token), "the token that made the change");
    if raced.0 != StatusCode::OK {
        return false; // the login read the new hash: it started too late
    }
    let raced = assert_login_ok(&raced, "a login that read the hash before the change");
    assert_401(
        &me(srv, &raced),
        "the token of a login that checked the old password",
    );
    verified_claims(&raced)["iat"].as_i64().unwrap() > answered_at
}

/// Two changes sent together with the same right `current_password`: one wins (204) and the
/// other is told the password is no longer the current one (400), so no client believes in a
/// password that does not work.
fn simultaneous_password_changes(backend: &Backend) {
    // At cost 10 each change spends a good 100 ms between reading the hash and writing the
    // new one, so two requests sent together both check the same current password.
    let srv = server(backend).env("BCRYPT_COST", "10").start();
    let email = "racing@example.com";
    let (_, token) = srv.user(email);
    let candidates = ["the first new passphrase", "the second new passphrase"];
    let together = std::sync::Barrier::new(candidates.len());
    let statuses: Vec<StatusCode> = std::thread::scope(|s| {
        let changes: Vec<_> = (candidates.iter())
            .map(|new| {
                let (srv, token, together) = (&srv, &token, &together);
                s.spawn(move || {
                    together.wait();
                    put_password(srv, token, PASSWORD, new)
                })
            })
            .collect();
        changes.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let winners: Vec<&str> = (candidates.iter().zip(&statuses))
        .filter(|(_, status)| **status == StatusCode::NO_CONTENT)
        .map(|(new, _)| *new)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one change wins: {statuses:?}");
    assert!(
        statuses.contains(&StatusCode::BAD_REQUEST),
        "the other is refused: {statuses:?}"
    );
    for new in candidates {
        let response = login_json(&srv, email, new);
        if new == winners[0] {
            assert_login_ok(&response, "the password of the change that won");
        } else {
            assert_login_failed(&response, "the password of the change that lost");
        }
    }
    assert_login_failed(&login_json(&srv, email, PASSWORD), "the old password");
}

/// Upgrading from revocation by time (`tokens_not_before`): tokens issued before, which carry
/// no `gen`, keep working for an account whose password never changed and are refused for one
/// whose password did (its holders log in once more).
fn tokens_from_before_generations(backend: &Backend) {
    let srv = start(backend);
    let (kept, _) = srv.user("kept@example.com");
    let (changed, _) = srv.user("changed@example.com");
    let now = now_secs();
    // The schema as the previous version left it, after one password change.
    srv.execute_sql(&format!(
        "ALTER TABLE users ADD COLUMN tokens_not_before BIGINT NOT NULL DEFAULT 0; \
         ALTER TABLE users DROP COLUMN token_generation; \
         UPDATE users SET tokens_not_before = {} WHERE email = 'changed@example.com'; \
         DELETE FROM __diesel_schema_migrations WHERE version = '20261204000000';",
        now - 60
    ));
    let db = srv.db.clone();
    drop(srv);
    let srv = server_on(db).start();
    let old_token =
        |user: &Value| hs256_token(&json!({"sub": user["id"], "iat": now, "exp": now + 600}));
    let (status, _, body) = me(&srv, &old_token(&kept));
    assert_eq!(status, StatusCode::OK, "password never changed: {body}");
    assert_401(&me(&srv, &old_token(&changed)), "password changed before");
    let token = srv.login("changed@example.com", PASSWORD);
    assert_eq!(me(&srv, &token).0, StatusCode::OK, "a new login");
}

fn delete_me(backend: &Backend) {
    let srv = start(backend);
    let (user, token) = srv.user("leaving@example.com");
    let (_, other_token) = srv.user("staying@example.com");
    for title in ["first", "second"] {
        let (status, _, body) =
            send(bearer(srv.post("/api/me/tasks"), &token).json(&json!({"title": title})));
        assert_eq!(status, StatusCode::CREATED, "create task: {body}");
    }
    let (status, _, body) =
        send(bearer(srv.post("/api/me/tasks"), &other_token).json(&json!({"title": "keep"})));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, _, tasks) = send(bearer(srv.get("/api/me/tasks"), &token));
    assert_eq!(tasks.as_array().map(Vec::len), Some(2), "{tasks}");

    let response = bearer(srv.delete("/api/users/me"), &token).send().unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.text().unwrap().is_empty(), "204 has no body");

    // The token stops working at once, everywhere.
    assert_401(&me(&srv, &token), "GET me after delete");
    assert_401(
        &send(bearer(srv.get("/api/me/tasks"), &token)),
        "tasks after delete",
    );
    assert_401(
        &send(bearer(srv.post("/api/me/tasks"), &token).json(&json!({"title": "ghost"}))),
        "create task after delete",
    );
    assert_401(
        &send(bearer(srv.delete("/api/users/me"), &token)),
        "DELETE again",
    );
    assert_login_failed(
        &login_json(&srv, "leaving@example.com", PASSWORD),
        "login after delete",
    );

    // Other users are untouched.
    let (status, headers, tasks) = send(bearer(srv.get("/api/me/tasks"), &other_token));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tasks.as_array().map(Vec::len), Some(1), "{tasks}");
    assert_eq!(header_str(&headers, "x-total-count"), Some("1"));

    // The email is free; the new account is a different user with no tasks.
    let (again, new_token) = srv.user("leaving@example.com");
    assert_ne!(again["id"], user["id"], "a new account gets a new id");
    let (status, headers, tasks) = send(bearer(srv.get("/api/me/tasks"), &new_token));
    assert_eq!(status, StatusCode::OK, "{tasks}");
    assert_eq!(tasks, json!([]), "the deleted user's tasks are gone");
    assert_eq!(header_str(&headers, "x-total-count"), Some("0"));
    // The old token names the old id: still refused.
    assert_401(&me(&srv, &token), "old token after re-registration");
}

// ---------------------------------------------------------------------------------------------
// Secrets never reach the log
// ---------------------------------------------------------------------------------------------

fn logs_never_contain_passwords_or_tokens(backend: &Backend) {
    let srv = server(backend).env("RUST_LOG", "trace").start();
    let password = "Zq8-unique-Passw0rd-in-logs";
    let wrong = "Wr0ng-unique-Passw0rd-in-logs";
    let new_password = "N3w-unique-Passw0rd-in-logs";
    let too_long = format!("T00-long-{}", "L".repeat(80));
    let email = "logged@example.com";

    let (status, _, body) = register_raw(
        &srv,
        &json!({"email": email, "password": password, "name": "Log"}),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _, _) = register_raw(
        &srv,
        &json!({"email": "long@example.com", "password": too_long}),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let json_token = assert_login_ok(&login_json(&srv, email, password), "JSON login");
    let form_token = assert_login_ok(&login_form(&srv, email, password), "/token");
    assert_login_failed(&login_json(&srv, email, wrong), "wrong password");
    assert_login_failed(&login_form(&srv, email, wrong), "wrong password, /token");
    assert_eq!(me(&srv, &json_token).0, StatusCode::OK);
    assert_eq!(me(&srv, &form_token).0, StatusCode::OK);
    assert_401(&me(&srv, &format!("{json_token}x")), "tampered token");
    let (status, _, _) = send(
        bearer(srv.put("/api/users/me/password"), &json_token)
            .json(&json!({"current_password": wrong, "new_password": new_password})),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = send(
        bearer(srv.put("/api/users/me/password"), &json_token)
            .json(&json!({"current_password": password, "new_password": new_password})),
    );
    assert_eq!(status, StatusCode::NO_CONTENT);
    let last_token = assert_login_ok(
        &login_json(&srv, email, new_password),
        "login with the new password",
    );
    assert_eq!(me(&srv, &last_token).0, StatusCode::OK);

    std::thread::sleep(Duration::from_millis(500));
    let log = srv.log();
    assert!(
        !log.trim().is_empty(),
        "the server logged nothing at RUST_LOG=trace"
    );
    for secret in [password, wrong, new_password, too_long.as_str()] {
        assert!(
            !log.contains(secret),
            "the log contains a password ({secret:?}):\n{log}"
        );
    }
    for token in [&json_token, &form_token, &last_token] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(token.as_str()),
            "the log contains a token:\n{log}"
        );
        assert!(
            !log.contains(signature),
            "the log contains a token's signature:\n{log}"
        );
    }
}

/// An email is one account however its letters are composed (NFC), and one that holds an
/// invisible or bidirectional control character (which would make it look like another
/// account's) is refused.
fn emails_are_nfc_and_refuse_invisible_characters(backend: &Backend) {
    let srv = start(backend);
    let composed = "jos\u{e9}@example.com"; // é
    let decomposed = "jose\u{301}@example.com"; // e + combining acute accent
    let created = srv.register(decomposed, PASSWORD);
    assert_eq!(created["email"], composed, "stored in NFC: {created}");
    let again = register_raw(&srv, &json!({"email": composed, "password": PASSWORD}));
    assert_eq!(
        again.0,
        StatusCode::CONFLICT,
        "the same address, composed: {}",
        again.2
    );
    assert_login_ok(
        &login_json_from(&srv, "10.0.0.1", composed, PASSWORD),
        "log in with the other composition",
    );
    for (invisible, what) in [
        ("a\u{200B}b@example.com", "zero-width space"),
        ("\u{202E}moc.elpmaxe@ab", "right-to-left override"),
        ("ab@exa\u{2066}mple.com", "left-to-right isolate"),
        ("a\u{AD}b@example.com", "soft hyphen"),
        ("a\u{FEFF}b@example.com", "zero-width no-break space"),
    ] {
        let response = register_raw(&srv, &json!({"email": invisible, "password": PASSWORD}));
        assert_422_names(&response, "email", what);
    }
}

/// The password hash stored for `email`, read from the database itself.
fn stored_hash(srv: &Server, email: &str) -> String {
    let sql = "SELECT password_hash FROM users WHERE email = $1";
    match srv.db.sqlite_path() {
        Some(path) => {
            use diesel::{Connection, RunQueryDsl};
            #[derive(diesel::QueryableByName)]
            struct Row {
                #[diesel(sql_type = diesel::sql_types::Text)]
                password_hash: String,
            }
            let mut db = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
            let query =
                diesel::sql_query(sql.replace("$1", "?")).bind::<diesel::sql_types::Text, _>(email);
            query.get_result::<Row>(&mut db).unwrap().password_hash
        }
        None => {
            let mut db = ::postgres::Client::connect(&srv.db.url, ::postgres::NoTls).unwrap();
            db.query_one(sql, &[&email]).unwrap().get(0)
        }
    }
}

/// After `BCRYPT_COST` changes, a successful login hashes the password again at the new cost,
/// so the account's wrong passwords take as long as an unknown email's (whose dummy hash has
/// the new cost). A failed login changes nothing.
fn login_rehashes_at_a_new_bcrypt_cost(backend: &Backend) {
    let srv = server(backend).env("BCRYPT_COST", "4").start();
    srv.register("old@example.com", PASSWORD);
    assert!(stored_hash(&srv, "old@example.com").starts_with("$2b$04$"));
    let db = srv.db.clone();
    drop(srv);
    let srv = server_on(db).env("BCRYPT_COST", "5").start();
    let failed = login_json_from(&srv, "10.0.0.1", "old@example.com", "not the password");
    assert_login_failed(&failed, "wrong password");
    assert!(stored_hash(&srv, "old@example.com").starts_with("$2b$04$"));
    assert_login_ok(
        &login_json_from(&srv, "10.0.0.1", "old@example.com", PASSWORD),
        "right password",
    );
    let rehashed = stored_hash(&srv, "old@example.com");
    assert!(
        rehashed.starts_with("$2b$05$"),
        "rehashed at cost 5: {rehashed}"
    );
    // The new hash is the same password, and tokens issued before stay good (no generation).
    let token = srv.login("old@example.com", PASSWORD);
    assert_eq!(me(&srv, &token).0, StatusCode::OK);
}

/// Registrations are throttled per client address (each one costs a bcrypt hash): past
/// `REGISTRATIONS_PER_MINUTE`, 429 with `Retry-After`, while other addresses go on.
fn registrations_are_throttled_per_client_address(backend: &Backend) {
    let srv = server(backend)
        .env("REGISTRATIONS_PER_MINUTE", "3")
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .start();
    let register_from = |xff: &str, email: &str| {
        let body = json!({"email": email, "password": PASSWORD});
        send(
            srv.post("/api/auth/register")
                .header("X-Forwarded-For", xff)
                .json(&body),
        )
    };
    for i in 0..3 {
        let created = register_from("10.0.0.1", &format!("new{i}@example.com"));
        assert_eq!(
            created.0,
            StatusCode::CREATED,
            "registration {}: {}",
            i + 1,
            created.2
        );
    }
    let refused = register_from("10.0.0.1", "new3@example.com");
    assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS, "{}", refused.2);
    assert_eq!(refused.2, json!({"detail": "Too many registrations"}));
    let wait: u64 = refused.1["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    let other = register_from("10.0.0.2", "new3@example.com");
    assert_eq!(other.0, StatusCode::CREATED, "another address: {}", other.2);
    // Logins are not registrations: the throttled address still signs in.
    assert_login_ok(
        &login_json_from(&srv, "10.0.0.1", "new0@example.com", PASSWORD),
        "login from the throttled address",
    );
}

on_both_backends!(
    registrations_are_throttled_per_client_address,
    login_rehashes_at_a_new_bcrypt_cost,
    emails_are_nfc_and_refuse_invisible_characters,
    guard_rejects_missing_header_and_other_schemes,
    guard_rejects_forged_tokens,
    guard_leeway_is_at_most_60_seconds,
    guard_ignores_token_in_query_string,
    guard_accepts_hs256_with_iss_and_aud,
    register_returns_the_user,
    register_conflict_is_case_insensitive,
    register_validates_input,
    register_password_72_byte_boundary,
    login_json_issues_a_token,
    token_form_flow,
    token_form_rejects_json_and_missing_fields,
    token_lifetime_follows_config,
    login_failures_are_indistinguishable,
    login_timing_does_not_reveal_accounts,
    throttle_per_email,
    throttle_per_email_counts_every_address_and_case,
    throttle_per_client_address,
    throttle_ignores_untrusted_forwarded_for,
    throttle_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4,
    trusted_proxy_is_recognised_on_a_dual_stack_listener,
    throttle_is_not_permanent,
    me_returns_the_user,
    patch_me,
    change_password,
    password_changes_within_one_second,
    login_racing_a_password_change,
    simultaneous_password_changes,
    tokens_from_before_generations,
    delete_me,
    logs_never_contain_passwords_or_tokens,
);
