//! Issue 5: every failure path answers JSON in the contract's shape, the security headers,
//! CORS for browsers, and the OpenAPI document / Swagger UI (README, "The API": "Errors",
//! "Limits", "/docs and /openapi.json").

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use reqwest::header::HeaderMap;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends a request and returns (status, headers, raw body text).
fn send_raw(request: reqwest::blocking::RequestBuilder) -> (StatusCode, HeaderMap, String) {
    let response = request.send().expect("request failed");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().unwrap_or_default();
    (status, headers, text)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// A comma-separated header as a set of lower-cased, trimmed items.
fn header_list(headers: &HeaderMap, name: &str) -> BTreeSet<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_nosniff(what: &str, headers: &HeaderMap) {
    assert_eq!(
        header(headers, "x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}: X-Content-Type-Options must be nosniff; headers: {headers:?}"
    );
}

/// Checks an error response: the expected status, `application/json`, nosniff, a JSON body.
fn expect_error(
    what: &str,
    (status, headers, text): (StatusCode, HeaderMap, String),
    expected: u16,
) -> Value {
    assert_eq!(status.as_u16(), expected, "{what}: status; body: {text}");
    let content_type = header(&headers, "content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: errors are application/json, got content-type {content_type:?}; body: {text}"
    );
    assert_nosniff(what, &headers);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text:?}"))
}

/// `{"detail": "<string>"}` with this status; returns the detail.
fn expect_detail(what: &str, response: (StatusCode, HeaderMap, String), expected: u16) -> String {
    let body = expect_error(what, response, expected);
    match body.get("detail") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => panic!("{what}: expected {{\"detail\": \"...\"}}, got {body}"),
    }
}

/// A 422 in FastAPI's shape with at least one item whose `loc` is one of `locs`.
fn expect_422_at(what: &str, response: (StatusCode, HeaderMap, String), locs: &[&[&str]]) -> Value {
    let body = expect_error(what, response, 422);
    let items = body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: 422 detail must be a list, got {body}"));
    assert!(!items.is_empty(), "{what}: 422 detail list is empty");
    for item in items {
        assert!(
            item["loc"].is_array(),
            "{what}: item without a loc list: {item}"
        );
        assert!(
            item["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: item without a msg: {item}"
        );
        assert!(
            item["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{what}: item without a type: {item}"
        );
    }
    let found = items.iter().any(|item| {
        locs.iter().any(|loc| {
            let want: Vec<Value> = loc.iter().map(|s| json!(s)).collect();
            item["loc"] == Value::Array(want)
        })
    });
    assert!(found, "{what}: no error item with loc in {locs:?}: {body}");
    body
}

fn loc_starts_with_body(what: &str, body: &Value) {
    let ok = body["detail"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|item| item["loc"][0] == json!("body"));
    assert!(
        ok,
        "{what}: expected an error item whose loc starts with \"body\": {body}"
    );
}

fn create_task(srv: &Server, token: &str, title: &str) -> i64 {
    let (status, _, body) = send(
        srv.post("/api/me/tasks")
            .bearer_auth(token)
            .json(&json!({"title": title})),
    );
    assert_eq!(status, StatusCode::CREATED, "create task: {body}");
    body["id"].as_i64().expect("task id")
}

fn is_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

// ---------------------------------------------------------------------------------------------
// The contract's routes
// ---------------------------------------------------------------------------------------------

/// Every route of the contract (README, "The API") except the docs routes themselves, as (method, path) with the task id
/// parameter normalized to `{id}`.
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("POST", "/api/auth/register"),
    ("POST", "/token"),
    ("POST", "/api/auth/login"),
    ("GET", "/api/users/me"),
    ("PATCH", "/api/users/me"),
    ("PUT", "/api/users/me/password"),
    ("DELETE", "/api/users/me"),
    ("GET", "/api/{user_id}/tasks"),
    ("POST", "/api/{user_id}/tasks"),
    ("GET", "/api/{user_id}/tasks/{id}"),
    ("PUT", "/api/{user_id}/tasks/{id}"),
    ("PATCH", "/api/{user_id}/tasks/{id}"),
    ("DELETE", "/api/{user_id}/tasks/{id}"),
    ("PATCH", "/api/{user_id}/tasks/{id}/complete"),
];

/// The docs routes; the document may or may not describe itself.
const DOCS_ROUTES: &[(&str, &str)] = &[("GET", "/openapi.json"), ("GET", "/docs")];

/// Statuses each route can return per the contract (the document may list more).
fn contract_statuses(method: &str, path: &str) -> &'static [&'static str] {
    match (method, path) {
        ("GET", "/health") => &["200", "503"],
        ("POST", "/api/auth/register") => &["201", "409", "422"],
        ("POST", "/token") | ("POST", "/api/auth/login") => &["200", "401", "422", "429"],
        ("GET", "/api/users/me") => &["200", "401"],
        ("PATCH", "/api/users/me") => &["200", "401", "409", "422"],
        ("PUT", "/api/users/me/password") => &["204", "400", "401", "422"],
        ("DELETE", "/api/users/me") => &["204", "401"],
        ("GET", "/api/{user_id}/tasks") => &["200", "401", "403", "422"],
        ("POST", "/api/{user_id}/tasks") => &["201", "401", "403", "422"],
        ("GET", "/api/{user_id}/tasks/{id}")
        | ("PUT", "/api/{user_id}/tasks/{id}")
        | ("PATCH", "/api/{user_id}/tasks/{id}")
        | ("PATCH", "/api/{user_id}/tasks/{id}/complete") => &["200", "401", "403", "404", "422"],
        ("DELETE", "/api/{user_id}/tasks/{id}") => &["204", "401", "403", "404", "422"],
        _ => panic!("no contract statuses for {method} {path}"),
    }
}

fn contract_tag(path: &str) -> &'static str {
    if path == "/health" {
        "health"
    } else if path.starts_with("/api/auth/") || path == "/token" {
        "auth"
    } else if path.starts_with("/api/users/") {
        "users"
    } else if path.starts_with("/api/{user_id}/tasks") {
        "tasks"
    } else {
        panic!("no tag for {path}")
    }
}

fn is_public(path: &str) -> bool {
    matches!(contract_tag(path), "health" | "auth")
}

/// Normalizes the task id parameter's name: any `{...}` segment right after `tasks` → `{id}`.
fn normalize_path(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 && segments[i - 1] == "tasks" && seg.starts_with('{') && seg.ends_with('}') {
            out.push("{id}".to_string());
        } else {
            out.push(seg.to_string());
        }
    }
    out.join("/")
}

const HTTP_METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// (METHOD, normalized path) → (original path, operation object).
fn doc_operations(doc: &Value) -> BTreeMap<(String, String), (String, Value)> {
    let mut ops = BTreeMap::new();
    let paths = doc["paths"].as_object().expect("document has paths");
    for (path, item) in paths {
        let item = item.as_object().expect("path item is an object");
        for (method, op) in item {
            if HTTP_METHODS.contains(&method.as_str()) {
                ops.insert(
                    (method.to_ascii_uppercase(), normalize_path(path)),
                    (path.clone(), op.clone()),
                );
            }
        }
    }
    ops
}

fn fetch_openapi(srv: &Server) -> Value {
    let (status, headers, text) = send_raw(srv.get("/openapi.json"));
    assert_eq!(status, StatusCode::OK, "GET /openapi.json: {text}");
    assert!(
        header(&headers, "content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "/openapi.json content-type: {headers:?}"
    );
    assert_nosniff("GET /openapi.json", &headers);
    serde_json::from_str(&text).expect("/openapi.json is JSON")
}

/// Follows local `$ref`s (`#/components/...`).
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..20 {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("non-local $ref {reference}"));
                schema = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {reference}"));
            }
            None => return schema,
        }
    }
    panic!("$ref loop")
}

/// The properties of an object schema (through `$ref` and `allOf`/`oneOf`/`anyOf`).
fn properties(doc: &Value, schema: &Value) -> BTreeMap<String, Value> {
    let schema = resolve(doc, schema);
    let mut out = BTreeMap::new();
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            out.insert(k.clone(), v.clone());
        }
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for sub in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.extend(properties(doc, sub));
        }
    }
    out
}

/// Finds a numeric keyword (e.g. `maxLength`) in a property schema, looking through `$ref`
/// and `allOf`/`oneOf`/`anyOf` (for nullable wrappers).
fn find_keyword(doc: &Value, schema: &Value, keyword: &str) -> Option<u64> {
    let schema = resolve(doc, schema);
    if let Some(n) = schema.get(keyword).and_then(Value::as_u64) {
        return Some(n);
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for sub in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = find_keyword(doc, sub, keyword) {
                return Some(n);
            }
        }
    }
    None
}

fn request_schema<'a>(doc: &'a Value, op: &'a Value, content_type: &str, what: &str) -> &'a Value {
    let schema = op
        .pointer(&format!(
            "/requestBody/content/{}/schema",
            content_type.replace('/', "~1")
        ))
        .unwrap_or_else(|| panic!("{what}: no {content_type} request body schema: {op}"));
    resolve(doc, schema)
}

fn response_schema<'a>(doc: &'a Value, op: &'a Value, status: &str, what: &str) -> &'a Value {
    let schema = op
        .pointer(&format!(
            "/responses/{status}/content/application~1json/schema"
        ))
        .unwrap_or_else(|| panic!("{what}: no application/json schema for {status}: {op}"));
    resolve(doc, schema)
}

// ---------------------------------------------------------------------------------------------
// Errors: extractor failures → 422 with loc
// ---------------------------------------------------------------------------------------------

fn json_body_errors_are_422_with_loc(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("loc@example.com");
    let post_task = |body: &str| {
        send_raw(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
    };

    expect_422_at("missing title", post_task("{}"), &[&["body", "title"]]);
    expect_422_at(
        "title of the wrong type",
        post_task(r#"{"title": 5}"#),
        &[&["body", "title"]],
    );
    expect_422_at(
        "completed of the wrong type",
        post_task(r#"{"title": "t", "completed": "yes"}"#),
        &[&["body", "completed"]],
    );
    let long = "x".repeat(201);
    expect_422_at(
        "title over 200 characters",
        post_task(&json!({ "title": long }).to_string()),
        &[&["body", "title"]],
    );
    expect_422_at(
        "blank title",
        post_task(r#"{"title": "   "}"#),
        &[&["body", "title"]],
    );
    let long_description = "d".repeat(1001);
    expect_422_at(
        "description over 1000 characters",
        post_task(&json!({"title": "t", "description": long_description}).to_string()),
        &[&["body", "description"]],
    );

    // Malformed JSON and a body of the wrong type: 422, loc starting with "body".
    for (what, body) in [
        ("truncated JSON", r#"{"title": "#),
        ("not JSON at all", "title=hello"),
        ("trailing garbage", r#"{"title": "t"} }"#),
        ("an array instead of an object", r#"["t"]"#),
        (
            "an array holding the fields in order",
            r#"["t", null, false]"#,
        ),
        ("a string instead of an object", r#""t""#),
        ("empty body", ""),
    ] {
        let body = expect_error(what, post_task(body), 422);
        let items = body["detail"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: 422 detail must be a list: {body}"));
        assert!(!items.is_empty(), "{what}: empty detail list");
        loc_starts_with_body(what, &body);
    }

    // The same on a public JSON route.
    let register = |body: &str| {
        send_raw(
            srv.post("/api/auth/register")
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
    };
    expect_422_at(
        "register without email",
        register(r#"{"password": "long enough password"}"#),
        &[&["body", "email"]],
    );
    expect_422_at(
        "register with a numeric email",
        register(r#"{"email": 12, "password": "long enough password"}"#),
        &[&["body", "email"]],
    );
    expect_422_at(
        "register with an invalid email",
        register(r#"{"email": "not-an-email", "password": "long enough password"}"#),
        &[&["body", "email"]],
    );
    let body = expect_error(
        "register with an array body",
        register(r#"["array@example.com", "long enough password", null]"#),
        422,
    );
    loc_starts_with_body("register with an array body", &body);
    expect_422_at(
        "register with a short password",
        register(r#"{"email": "short@example.com", "password": "1234567"}"#),
        &[&["body", "password"]],
    );
}

fn query_errors_are_422_with_loc(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("query@example.com");
    let list = |query: &str| {
        send_raw(
            srv.get(&format!("/api/me/tasks?{query}"))
                .bearer_auth(&token),
        )
    };

    for (query, name) in [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("limit=1.5", "limit"),
        ("offset=abc", "offset"),
        ("offset=-1", "offset"),
        ("status=bogus", "status"),
        ("sort=bogus", "sort"),
        ("order=sideways", "order"),
    ] {
        expect_422_at(
            &format!("GET /api/me/tasks?{query}"),
            list(query),
            &[&["query", name]],
        );
    }

    // Sanity: the valid edges are accepted.
    for query in [
        "limit=1",
        "limit=1000",
        "offset=0",
        "status=pending",
        "sort=title&order=asc",
    ] {
        let (status, _, text) = list(query);
        assert_eq!(status, StatusCode::OK, "GET /api/me/tasks?{query}: {text}");
    }
}

fn path_errors_are_422_with_loc(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("path@example.com");
    // The task id parameter may be called `id` or `task_id`.
    let task_id_locs: &[&[&str]] = &[&["path", "id"], &["path", "task_id"]];

    for (method, path) in [
        ("GET", "/api/me/tasks/abc"),
        ("GET", "/api/me/tasks/1.5"),
        ("GET", "/api/me/tasks/99999999999999999999999"),
        ("PUT", "/api/me/tasks/abc"),
        ("PATCH", "/api/me/tasks/abc"),
        ("DELETE", "/api/me/tasks/abc"),
        ("PATCH", "/api/me/tasks/abc/complete"),
    ] {
        let request = srv
            .client
            .request(method.parse().unwrap(), srv.url(path))
            .bearer_auth(&token);
        let request = if method == "PUT" || (method == "PATCH" && !path.ends_with("/complete")) {
            request.json(&json!({"title": "valid"}))
        } else {
            request
        };
        expect_422_at(&format!("{method} {path}"), send_raw(request), task_id_locs);
    }
}

fn form_errors_are_422_with_loc(backend: &Backend) {
    let srv = start(backend);
    srv.register("form@example.com", PASSWORD);
    let token_form = |body: &str| {
        send_raw(
            srv.post("/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.to_string()),
        )
    };
    expect_422_at(
        "/token without password",
        token_form("username=form%40example.com"),
        &[&["body", "password"]],
    );
    expect_422_at(
        "/token without username",
        token_form("password=whatever-it-is"),
        &[&["body", "username"]],
    );
    expect_422_at(
        "/token with an empty form",
        token_form(""),
        &[&["body", "username"], &["body", "password"]],
    );
    // The form works when complete (so the 422s above are about the missing fields).
    let (status, _, text) = token_form(&format!(
        "grant_type=password&username=form%40example.com&password={}",
        PASSWORD.replace(' ', "+")
    ));
    assert_eq!(
        status,
        StatusCode::OK,
        "/token with a complete form: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: secrets are never echoed
// ---------------------------------------------------------------------------------------------

fn errors_do_not_echo_secrets(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("echo@example.com");
    const CANARY: &str = "S3cretLeakCanary42xyz";

    let json_post = |path: &str, body: String, auth: bool| {
        let mut request = srv
            .post(path)
            .header("content-type", "application/json")
            .body(body);
        if auth {
            request = request.bearer_auth(&token);
        }
        send_raw(request)
    };

    let cases: Vec<(&str, &str, String)> = vec![
        (
            "malformed JSON (truncated)",
            "/api/auth/register",
            format!(r#"{{"email": "leak@example.com", "password": "{CANARY}", "#),
        ),
        (
            "malformed JSON (double comma)",
            "/api/auth/register",
            format!(r#"{{"email": "leak@example.com", "password": "{CANARY}",, "name": "x"}}"#),
        ),
        (
            "invalid escape inside the password",
            "/api/auth/register",
            format!(r#"{{"email": "leak@example.com", "password": "{CANARY}\q"}}"#),
        ),
        (
            "bare word where the password's quote should be",
            "/api/auth/register",
            format!(r#"{{"email": "leak@example.com", "password": {CANARY}}}"#),
        ),
        (
            "wrong type for email next to a password",
            "/api/auth/register",
            format!(r#"{{"email": 12, "password": "{CANARY}"}}"#),
        ),
        (
            "password of the wrong type",
            "/api/auth/register",
            format!(r#"{{"email": "leak@example.com", "password": ["{CANARY}"]}}"#),
        ),
        (
            "invalid email next to a password",
            "/api/auth/register",
            format!(r#"{{"email": "not-an-email", "password": "{CANARY}"}}"#),
        ),
        (
            "password under 8 characters",
            "/api/auth/register",
            r#"{"email": "leak@example.com", "password": "Ca7!xQz"}"#.to_string(),
        ),
        (
            "password over 72 bytes",
            "/api/auth/register",
            format!(
                r#"{{"email": "leak@example.com", "password": "{CANARY}{}"}}"#,
                "p".repeat(60)
            ),
        ),
        (
            "malformed login",
            "/api/auth/login",
            format!(r#"{{"email": "echo@example.com", "password": "{CANARY}""#),
        ),
        (
            "login without email",
            "/api/auth/login",
            format!(r#"{{"password": "{CANARY}"}}"#),
        ),
    ];
    for (what, path, body) in cases {
        let secret = if what == "password under 8 characters" {
            "Ca7!xQz".to_string()
        } else if what == "password over 72 bytes" {
            format!("{CANARY}{}", "p".repeat(60))
        } else {
            CANARY.to_string()
        };
        let (status, headers, text) = json_post(path, body, false);
        assert!(
            status.is_client_error(),
            "{what} ({path}): expected a 4xx, got {status}: {text}"
        );
        let _ = expect_error(what, (status, headers, text.clone()), status.as_u16());
        assert!(
            !text.contains(&secret),
            "{what} ({path}): response echoes the password: {text}"
        );
        assert!(
            !text.contains(CANARY),
            "{what} ({path}): response echoes the password: {text}"
        );
    }

    // Changing the password with a malformed body / wrong types.
    for body in [
        format!(r#"{{"current_password": "{PASSWORD}", "new_password": "{CANARY}""#),
        format!(r#"{{"current_password": 5, "new_password": "{CANARY}"}}"#),
        format!(r#"{{"current_password": "{CANARY}", "new_password": "short"}}"#),
    ] {
        let (status, _, text) = send_raw(
            srv.put("/api/users/me/password")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.clone()),
        );
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "PUT password {body}: {text}"
        );
        assert!(
            !text.contains(CANARY),
            "PUT password echoes a password: {text}"
        );
        assert!(
            !text.contains("\"short\""),
            "PUT password echoes the new password: {text}"
        );
    }

    // The OAuth2 form: missing username next to a password.
    let (status, _, text) = send_raw(
        srv.post("/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("password={CANARY}")),
    );
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "/token without username: {text}"
    );
    assert!(
        !text.contains(CANARY),
        "/token 422 echoes the password: {text}"
    );

    // A wrong token is not echoed either.
    let bogus_token = format!("eyJhbGciOiJIUzI1NiJ9.{CANARY}.sig");
    let (status, _, text) = send_raw(srv.get("/api/users/me").bearer_auth(&bogus_token));
    assert_eq!(status, StatusCode::UNAUTHORIZED, "bogus token: {text}");
    assert!(!text.contains(CANARY), "401 echoes the token: {text}");

    // Nor is anything of it logged.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = srv.log();
    assert!(
        !log.contains(CANARY),
        "the server log contains a submitted secret:\n{log}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the server log contains a password:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: content type, size limits, router errors
// ---------------------------------------------------------------------------------------------

fn wrong_content_type_is_415(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("ctype@example.com");
    let body = r#"{"email": "ctype2@example.com", "password": "long enough password"}"#;

    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/html",
    ] {
        let response = send_raw(
            srv.post("/api/auth/register")
                .header("content-type", content_type)
                .body(body),
        );
        expect_detail(&format!("register as {content_type}"), response, 415);
    }
    let response = send_raw(
        srv.post("/api/auth/login")
            .header("content-type", "text/plain")
            .body(r#"{"email": "ctype@example.com", "password": "x"}"#),
    );
    expect_detail("login as text/plain", response, 415);
    let response = send_raw(
        srv.post("/api/me/tasks")
            .bearer_auth(&token)
            .header("content-type", "text/plain")
            .body(r#"{"title": "t"}"#),
    );
    expect_detail("create task as text/plain", response, 415);
    let response = send_raw(
        srv.put("/api/me/tasks/1")
            .bearer_auth(&token)
            .header("content-type", "multipart/form-data; boundary=x")
            .body("--x--"),
    );
    expect_detail("replace task as multipart", response, 415);

    // A JSON content type with parameters is still JSON.
    let (status, _, text) = send_raw(
        srv.post("/api/auth/register")
            .header("content-type", "application/json; charset=utf-8")
            .body(body),
    );
    assert_eq!(
        status,
        StatusCode::CREATED,
        "register with charset parameter: {text}"
    );
}

fn oversized_bodies_are_413(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("big@example.com");

    // JSON over 64 KiB → 413, on a public and on a protected route.
    let big_name = "n".repeat(70 * 1024);
    let response = send_raw(
        srv.post("/api/auth/register")
            .json(&json!({"email": "big2@example.com", "password": PASSWORD, "name": big_name})),
    );
    expect_detail("register with a 70 KiB body", response, 413);
    let response = send_raw(
        srv.post("/api/me/tasks")
            .bearer_auth(&token)
            .json(&json!({"title": "t", "description": "d".repeat(65 * 1024 + 10)})),
    );
    expect_detail("create task with a 65 KiB body", response, 413);

    // JSON just under 64 KiB is read (here: valid, padded with whitespace).
    let padded = format!(r#"{{"title": "padded"{}}}"#, " ".repeat(60 * 1024));
    let (status, _, text) = send_raw(
        srv.post("/api/me/tasks")
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(padded),
    );
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a 60 KiB JSON body is within the limit: {text}"
    );

    // Forms over 4 KiB on /token → 413; just under is read (and fails as a wrong password).
    let form = |password_len: usize| {
        send_raw(
            srv.post("/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!(
                    "username=big%40example.com&password={}",
                    "p".repeat(password_len)
                )),
        )
    };
    expect_detail("/token with a 5 KiB form", form(5 * 1024), 413);
    let detail = expect_detail("/token with a 3.5 KiB form", form(3500), 401);
    assert_eq!(detail, "Incorrect email or password");
}

fn unknown_route_is_404_json(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("nf@example.com");
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/api"),
        ("GET", "/api/auth"),
        ("POST", "/api/nope"),
        ("GET", "/api/me/tasks/1/nope"),
        ("DELETE", "/api/users/me/nope"),
        ("GET", "/nope/"),
        ("GET", "/api/me/tasks/1/nope/"),
    ] {
        for auth in [false, true] {
            let mut request = srv.client.request(method.parse().unwrap(), srv.url(path));
            if auth {
                request = request.bearer_auth(&token);
            }
            let what = format!("{method} {path} (token: {auth})");
            let body = expect_error(&what, send_raw(request), 404);
            assert_eq!(body, json!({"detail": "Not Found"}), "{what}");
        }
    }
}

/// A known path with a trailing slash is redirected to the path without it (307: method and
/// body kept), query string and all, as FastAPI (Starlette's `redirect_slashes`) does.
fn trailing_slash_redirects_like_fastapi(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("slash@example.com");
    let task = create_task(&srv, &token, "t");
    let no_redirects = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (method, path, location) in [
        ("GET", "/health/".to_string(), "/health".to_string()),
        (
            "GET",
            "/api/me/tasks/?limit=5&q=a%20b".into(),
            "/api/me/tasks?limit=5&q=a%20b".into(),
        ),
        ("POST", "/api/me/tasks/".into(), "/api/me/tasks".into()),
        (
            "DELETE",
            format!("/api/me/tasks/{task}/"),
            format!("/api/me/tasks/{task}"),
        ),
        ("POST", "/token/".into(), "/token".into()),
    ] {
        let request = no_redirects.request(method.parse().unwrap(), srv.url(&path));
        let response = request.bearer_auth(&token).send().unwrap();
        assert_eq!(
            response.status(),
            StatusCode::TEMPORARY_REDIRECT,
            "{method} {path}"
        );
        assert_eq!(
            response.headers()["location"],
            location.as_str(),
            "{method} {path}"
        );
    }
    // Followed (as reqwest and browsers do), the redirect reaches the route, body and all.
    let (status, _, created) = send(
        reqwest::blocking::Client::new()
            .post(srv.url("/api/me/tasks/"))
            .bearer_auth(&token)
            .json(&json!({"title": "through the redirect"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["title"], "through the redirect");
}

fn wrong_method_is_405_with_allow(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("method@example.com");
    let task = create_task(&srv, &token, "t");
    let task_path = format!("/api/me/tasks/{task}");
    let complete_path = format!("{task_path}/complete");

    let cases: Vec<(&str, String, &[&str])> = vec![
        ("DELETE", "/api/auth/register".into(), &["POST"]),
        ("GET", "/api/auth/register".into(), &["POST"]),
        ("GET", "/api/auth/login".into(), &["POST"]),
        ("GET", "/token".into(), &["POST"]),
        ("POST", "/health".into(), &["GET"]),
        ("DELETE", "/health".into(), &["GET"]),
        ("PUT", "/api/me/tasks".into(), &["GET", "POST"]),
        ("DELETE", "/api/me/tasks".into(), &["GET", "POST"]),
        (
            "POST",
            task_path.clone(),
            &["GET", "PUT", "PATCH", "DELETE"],
        ),
        ("GET", complete_path.clone(), &["PATCH"]),
        ("POST", "/api/users/me".into(), &["GET", "PATCH", "DELETE"]),
        ("GET", "/api/users/me/password".into(), &["PUT"]),
        ("POST", "/openapi.json".into(), &["GET"]),
    ];
    for (method, path, allowed) in cases {
        for auth in [false, true] {
            let mut request = srv.client.request(method.parse().unwrap(), srv.url(&path));
            if auth {
                request = request.bearer_auth(&token);
            }
            let what = format!("{method} {path} (token: {auth})");
            let (status, headers, text) = send_raw(request);
            let body = expect_error(&what, (status, headers.clone(), text), 405);
            assert_eq!(body, json!({"detail": "Method Not Allowed"}), "{what}");
            let allow = header_list(&headers, "allow");
            let expected: BTreeSet<String> =
                allowed.iter().map(|m| m.to_ascii_lowercase()).collect();
            // HEAD (with GET) and OPTIONS are tolerated as extras.
            let extra: BTreeSet<String> = allow
                .difference(&expected)
                .filter(|m| {
                    !(m.as_str() == "options" || m.as_str() == "head" && expected.contains("get"))
                })
                .cloned()
                .collect();
            assert!(
                expected.is_subset(&allow) && extra.is_empty(),
                "{what}: Allow should list {allowed:?}, got {:?}",
                header(&headers, "allow")
            );
        }
    }
}

fn nosniff_on_every_response(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("sniff@example.com");
    let task = create_task(&srv, &token, "t");

    let mut checks: Vec<(String, StatusCode, HeaderMap)> = Vec::new();
    let mut check = |what: &str, request: reqwest::blocking::RequestBuilder| {
        let (status, headers, _) = send_raw(request);
        checks.push((what.to_string(), status, headers));
    };
    check("200 health", srv.get("/health"));
    check("200 me", srv.get("/api/users/me").bearer_auth(&token));
    check(
        "201 register",
        srv.post("/api/auth/register")
            .json(&json!({"email": "sniff2@example.com", "password": PASSWORD})),
    );
    check(
        "200 token",
        srv.post("/token")
            .form(&[("username", "sniff@example.com"), ("password", PASSWORD)]),
    );
    check("401 no token", srv.get("/api/users/me"));
    check("404 unknown", srv.get("/nope"));
    check(
        "404 task",
        srv.get("/api/me/tasks/987654").bearer_auth(&token),
    );
    check("405", srv.post("/health"));
    check(
        "422",
        srv.get("/api/me/tasks?limit=abc").bearer_auth(&token),
    );
    check(
        "415",
        srv.post("/api/auth/register")
            .header("content-type", "text/plain")
            .body("{}"),
    );
    check(
        "409",
        srv.post("/api/auth/register")
            .json(&json!({"email": "sniff@example.com", "password": PASSWORD})),
    );
    check(
        "403",
        srv.get("/api/someone-else/tasks").bearer_auth(&token),
    );
    check("openapi", srv.get("/openapi.json"));
    check("docs", srv.get("/docs"));
    check("docs/", srv.get("/docs/"));
    check(
        "204 delete task",
        srv.delete(&format!("/api/me/tasks/{task}"))
            .bearer_auth(&token),
    );
    let expected = [
        ("200 health", 200),
        ("200 me", 200),
        ("201 register", 201),
        ("200 token", 200),
        ("401 no token", 401),
        ("404 unknown", 404),
        ("404 task", 404),
        ("405", 405),
        ("422", 422),
        ("415", 415),
        ("409", 409),
        ("403", 403),
        ("openapi", 200),
        ("204 delete task", 204),
    ];
    for (what, status, headers) in &checks {
        if let Some((_, code)) = expected.iter().find(|(name, _)| name == what) {
            assert_eq!(status.as_u16(), *code, "{what}: status");
        }
        assert_nosniff(what, headers);
    }
}

fn unauthorized_carries_www_authenticate(backend: &Backend) {
    let srv = start(backend);
    let (user, _) = srv.user("www@example.com");
    let expired = hs256_token(&json!({
        "sub": user["id"], "iat": now_secs() - 7200, "exp": now_secs() - 3600
    }));
    let cases: Vec<(&str, reqwest::blocking::RequestBuilder)> = vec![
        ("no token", srv.get("/api/users/me")),
        (
            "garbage token",
            srv.get("/api/users/me").bearer_auth("garbage"),
        ),
        (
            "basic auth instead of bearer",
            srv.get("/api/me/tasks")
                .basic_auth("www@example.com", Some(PASSWORD)),
        ),
        (
            "expired token",
            srv.get("/api/me/tasks").bearer_auth(&expired),
        ),
        (
            "wrong password on /token",
            srv.post("/token").form(&[
                ("username", "www@example.com"),
                ("password", "wrong password!"),
            ]),
        ),
        (
            "wrong password on /api/auth/login",
            srv.post("/api/auth/login")
                .json(&json!({"email": "www@example.com", "password": "wrong password!"})),
        ),
        (
            "unknown email on /api/auth/login",
            srv.post("/api/auth/login")
                .json(&json!({"email": "nobody@example.com", "password": PASSWORD})),
        ),
    ];
    for (what, request) in cases {
        let (status, headers, text) = send_raw(request);
        expect_detail(what, (status, headers.clone(), text), 401);
        let www = header(&headers, "www-authenticate").unwrap_or_default();
        assert!(
            www.to_ascii_lowercase().starts_with("bearer"),
            "{what}: 401 must carry WWW-Authenticate: Bearer, got {www:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------------

/// Every route and method the API has, with concrete paths (task id 1).
const CORS_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/me/tasks"),
    ("POST", "/api/me/tasks"),
    ("GET", "/api/me/tasks/1"),
    ("PUT", "/api/me/tasks/1"),
    ("PATCH", "/api/me/tasks/1"),
    ("DELETE", "/api/me/tasks/1"),
    ("PATCH", "/api/me/tasks/1/complete"),
    ("GET", "/api/users/me"),
    ("PATCH", "/api/users/me"),
    ("DELETE", "/api/users/me"),
    ("PUT", "/api/users/me/password"),
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/login"),
    ("POST", "/token"),
    ("GET", "/health"),
];

fn preflight(
    srv: &Server,
    origin: &str,
    method: &str,
    path: &str,
) -> (StatusCode, HeaderMap, String) {
    send_raw(
        srv.client
            .request(reqwest::Method::OPTIONS, srv.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            ),
    )
}

fn cors_closed_by_default(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("cors0@example.com");
    for origin in ["http://localhost:3000", "http://app.example", "null"] {
        for (method, path) in CORS_ROUTES {
            let (_, headers, _) = preflight(&srv, origin, method, path);
            assert!(
                header(&headers, "access-control-allow-origin").is_none(),
                "CORS_ORIGINS unset: preflight {method} {path} from {origin} must not be allowed: {headers:?}"
            );
        }
        let (status, headers, text) = send_raw(
            srv.get("/api/me/tasks")
                .bearer_auth(&token)
                .header("origin", origin),
        );
        assert_eq!(status, StatusCode::OK, "GET with Origin {origin}: {text}");
        assert!(
            header(&headers, "access-control-allow-origin").is_none(),
            "CORS_ORIGINS unset: GET from {origin} got {headers:?}"
        );
    }
}

fn cors_open_to_configured_origins(backend: &Backend) {
    let allowed = ["http://localhost:3000", "http://app.example"];
    let srv = server(backend)
        .env("CORS_ORIGINS", "http://localhost:3000,http://app.example")
        .start();
    let (_, token) = srv.user("cors@example.com");

    for origin in allowed {
        for (method, path) in CORS_ROUTES {
            let what = format!("preflight {method} {path} from {origin}");
            let (status, headers, text) = preflight(&srv, origin, method, path);
            assert!(status.is_success(), "{what}: status {status}: {text}");
            assert_eq!(
                header(&headers, "access-control-allow-origin").as_deref(),
                Some(origin),
                "{what}: Access-Control-Allow-Origin; headers: {headers:?}"
            );
            let methods = header_list(&headers, "access-control-allow-methods");
            assert!(
                methods.contains(&method.to_ascii_lowercase()) || methods.contains("*"),
                "{what}: Access-Control-Allow-Methods {methods:?}"
            );
            let allow_headers = header_list(&headers, "access-control-allow-headers");
            // `*` does not cover Authorization (Fetch standard), so it must be named.
            assert!(
                allow_headers.contains("authorization"),
                "{what}: Access-Control-Allow-Headers must name authorization: {allow_headers:?}"
            );
            assert!(
                allow_headers.contains("content-type") || allow_headers.contains("*"),
                "{what}: Access-Control-Allow-Headers must allow content-type: {allow_headers:?}"
            );
        }

        // Actual responses: the origin is allowed and X-Total-Count / Location are exposed.
        let (status, headers, text) = send_raw(
            srv.get("/api/me/tasks")
                .bearer_auth(&token)
                .header("origin", origin),
        );
        assert_eq!(status, StatusCode::OK, "GET tasks from {origin}: {text}");
        assert_eq!(
            header(&headers, "access-control-allow-origin").as_deref(),
            Some(origin),
            "GET tasks from {origin}: {headers:?}"
        );
        let exposed = header_list(&headers, "access-control-expose-headers");
        assert!(
            exposed.contains("x-total-count") && exposed.contains("location"),
            "GET tasks from {origin}: Access-Control-Expose-Headers {exposed:?}"
        );
        let (status, headers, text) = send_raw(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .header("origin", origin)
                .json(&json!({"title": "from the browser"})),
        );
        assert_eq!(
            status,
            StatusCode::CREATED,
            "POST task from {origin}: {text}"
        );
        assert_eq!(
            header(&headers, "access-control-allow-origin").as_deref(),
            Some(origin),
            "POST task from {origin}: {headers:?}"
        );
        let exposed = header_list(&headers, "access-control-expose-headers");
        assert!(
            exposed.contains("location") && exposed.contains("x-total-count"),
            "POST task from {origin}: Access-Control-Expose-Headers {exposed:?}"
        );
        // Errors carry the CORS headers too (a browser must be able to read a 401).
        let (status, headers, _) = send_raw(srv.get("/api/users/me").header("origin", origin));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            header(&headers, "access-control-allow-origin").as_deref(),
            Some(origin),
            "401 from {origin}: {headers:?}"
        );
    }

    // Any other origin gets nothing, including look-alikes.
    for origin in [
        "http://evil.example",
        "http://localhost:3001",
        "https://localhost:3000",
        "http://localhost:3000.evil.example",
        "http://app.example.evil",
        "null",
    ] {
        for (method, path) in CORS_ROUTES {
            let (_, headers, _) = preflight(&srv, origin, method, path);
            assert!(
                header(&headers, "access-control-allow-origin").is_none(),
                "preflight {method} {path} from {origin} must not be allowed: {headers:?}"
            );
        }
        // As FastAPI does, the server still answers (the browser enforces CORS).
        let (status, headers, text) = send_raw(srv.get("/health").header("origin", origin));
        assert_eq!(status, StatusCode::OK, "GET /health from {origin}: {text}");
        assert!(
            header(&headers, "access-control-allow-origin").is_none(),
            "GET /health from {origin}: {headers:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Docs
// ---------------------------------------------------------------------------------------------

fn openapi_document_describes_the_contract(backend: &Backend) {
    let srv = start(backend);
    let doc = fetch_openapi(&srv);

    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "OpenAPI version: {version:?}");
    assert!(doc["info"]["title"].is_string(), "info.title");

    // Top-level tags.
    let top_tags: BTreeSet<&str> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for tag in ["health", "auth", "users", "tasks"] {
        assert!(
            top_tags.contains(tag),
            "top-level tags {top_tags:?} lack {tag}"
        );
    }

    // The set of routes equals the contract's (docs routes tolerated).
    let ops = doc_operations(&doc);
    let documented: BTreeSet<(String, String)> = ops
        .keys()
        .filter(|(m, p)| !DOCS_ROUTES.contains(&(m.as_str(), p.as_str())))
        .cloned()
        .collect();
    let contract: BTreeSet<(String, String)> = CONTRACT_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = contract.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&contract).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "documented routes differ from the contract: undocumented {missing:?}, not in the contract {extra:?}"
    );

    // Security schemes.
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("components.securitySchemes");
    let bearer_name = schemes
        .iter()
        .find(|(_, s)| {
            s["type"] == "http"
                && s["scheme"]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case("bearer"))
        })
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| panic!("no http bearer scheme in {schemes:?}"));
    let oauth_name = schemes
        .iter()
        .find(|(_, s)| s["type"] == "oauth2" && s["flows"]["password"]["tokenUrl"] == "/token")
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| {
            panic!("no oauth2 password flow with tokenUrl \"/token\" in {schemes:?}")
        });

    let global_security = doc.get("security").cloned();
    for ((method, path), (_, op)) in &ops {
        if DOCS_ROUTES.contains(&(method.as_str(), path.as_str())) {
            continue;
        }
        let what = format!("{method} {path}");

        // Tag.
        let tags: Vec<&str> = op["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let tag = contract_tag(path);
        assert!(
            tags.contains(&tag),
            "{what}: tags {tags:?} should include {tag}"
        );

        // Statuses.
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: no responses"));
        for status in contract_statuses(method, path) {
            assert!(
                responses.contains_key(*status),
                "{what}: response {status} is not documented (has {:?})",
                responses.keys().collect::<Vec<_>>()
            );
        }

        // Security.
        let security = op.get("security").cloned().or(global_security.clone());
        let requirements: Vec<Value> = security
            .as_ref()
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let names: BTreeSet<String> = requirements
            .iter()
            .filter_map(Value::as_object)
            .flat_map(|o| o.keys().cloned())
            .collect();
        if is_public(path) {
            let optional = requirements.is_empty()
                || requirements
                    .iter()
                    .any(|r| r.as_object().is_some_and(|o| o.is_empty()));
            assert!(
                optional,
                "{what} is public but the document requires auth: {security:?}"
            );
        } else {
            assert!(
                names.contains(&bearer_name) && names.contains(&oauth_name),
                "{what}: security should offer {bearer_name} and {oauth_name}, got {security:?}"
            );
            assert!(
                !requirements
                    .iter()
                    .any(|r| r.as_object().is_some_and(|o| o.is_empty())),
                "{what}: auth is required, not optional: {security:?}"
            );
        }
    }

    let op = |method: &str, path: &str| -> &Value {
        &ops.get(&(method.to_string(), path.to_string()))
            .unwrap_or_else(|| panic!("{method} {path} is not documented"))
            .1
    };

    // Request schemas with limits.
    for (method, path) in [
        ("POST", "/api/{user_id}/tasks"),
        ("PUT", "/api/{user_id}/tasks/{id}"),
    ] {
        let what = format!("{method} {path} request");
        let schema = request_schema(&doc, op(method, path), "application/json", &what);
        let props = properties(&doc, schema);
        let title = props
            .get("title")
            .unwrap_or_else(|| panic!("{what}: no title: {schema}"));
        assert_eq!(
            find_keyword(&doc, title, "maxLength"),
            Some(200),
            "{what}: title maxLength"
        );
        assert_eq!(
            find_keyword(&doc, title, "minLength"),
            Some(1),
            "{what}: title minLength"
        );
        let description = props
            .get("description")
            .unwrap_or_else(|| panic!("{what}: no description: {schema}"));
        assert_eq!(
            find_keyword(&doc, description, "maxLength"),
            Some(1000),
            "{what}: description maxLength"
        );
        assert!(props.contains_key("completed"), "{what}: no completed");
        let required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            required.contains(&"title"),
            "{what}: title must be required: {schema}"
        );
    }
    {
        let what = "PATCH task request";
        let schema = request_schema(
            &doc,
            op("PATCH", "/api/{user_id}/tasks/{id}"),
            "application/json",
            what,
        );
        let props = properties(&doc, schema);
        let title = props
            .get("title")
            .unwrap_or_else(|| panic!("{what}: no title: {schema}"));
        assert_eq!(
            find_keyword(&doc, title, "maxLength"),
            Some(200),
            "{what}: title maxLength"
        );
        assert!(
            props.contains_key("description") && props.contains_key("completed"),
            "{what}"
        );
    }
    {
        let what = "register request";
        let schema = request_schema(
            &doc,
            op("POST", "/api/auth/register"),
            "application/json",
            what,
        );
        let props = properties(&doc, schema);
        let password = props
            .get("password")
            .unwrap_or_else(|| panic!("{what}: no password"));
        assert_eq!(
            find_keyword(&doc, password, "minLength"),
            Some(8),
            "{what}: password minLength"
        );
        assert!(
            props.contains_key("email") && props.contains_key("name"),
            "{what}: {schema}"
        );
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            required.contains("email") && required.contains("password"),
            "{what}: email and password are required: {schema}"
        );
    }
    {
        let what = "change password request";
        let schema = request_schema(
            &doc,
            op("PUT", "/api/users/me/password"),
            "application/json",
            what,
        );
        let props = properties(&doc, schema);
        assert!(props.contains_key("current_password"), "{what}: {schema}");
        let new_password = props
            .get("new_password")
            .unwrap_or_else(|| panic!("{what}: no new_password: {schema}"));
        assert_eq!(
            find_keyword(&doc, new_password, "minLength"),
            Some(8),
            "{what}: minLength"
        );
    }
    {
        let what = "login request";
        let schema = request_schema(
            &doc,
            op("POST", "/api/auth/login"),
            "application/json",
            what,
        );
        let props = properties(&doc, schema);
        assert!(
            props.contains_key("email") && props.contains_key("password"),
            "{what}: {schema}"
        );
    }
    {
        let what = "/token request";
        let schema = request_schema(
            &doc,
            op("POST", "/token"),
            "application/x-www-form-urlencoded",
            what,
        );
        let props = properties(&doc, schema);
        for field in ["username", "password"] {
            assert!(props.contains_key(field), "{what}: no {field}: {schema}");
        }
    }
    {
        let what = "PATCH /api/users/me request";
        let schema = request_schema(&doc, op("PATCH", "/api/users/me"), "application/json", what);
        let props = properties(&doc, schema);
        assert!(
            props.contains_key("name") && props.contains_key("email"),
            "{what}: {schema}"
        );
    }

    // Response schemas.
    let user_fields = ["id", "email", "name", "created_at", "updated_at"];
    for (method, path, status) in [
        ("GET", "/api/users/me", "200"),
        ("PATCH", "/api/users/me", "200"),
        ("POST", "/api/auth/register", "201"),
    ] {
        let what = format!("{method} {path} {status} response");
        let props = properties(&doc, response_schema(&doc, op(method, path), status, &what));
        for field in user_fields {
            assert!(props.contains_key(field), "{what}: no {field} in {props:?}");
        }
        assert!(
            !props
                .keys()
                .any(|k| k.contains("password") || k.contains("hash")),
            "{what}: a user never carries a password or hash: {props:?}"
        );
    }
    let task_fields = [
        "id",
        "user_id",
        "title",
        "description",
        "completed",
        "created_at",
        "updated_at",
    ];
    for (method, path, status) in [
        ("POST", "/api/{user_id}/tasks", "201"),
        ("GET", "/api/{user_id}/tasks/{id}", "200"),
        ("PUT", "/api/{user_id}/tasks/{id}", "200"),
        ("PATCH", "/api/{user_id}/tasks/{id}", "200"),
        ("PATCH", "/api/{user_id}/tasks/{id}/complete", "200"),
    ] {
        let what = format!("{method} {path} {status} response");
        let props = properties(&doc, response_schema(&doc, op(method, path), status, &what));
        for field in task_fields {
            assert!(props.contains_key(field), "{what}: no {field} in {props:?}");
        }
    }
    {
        let what = "GET tasks 200 response";
        let schema = response_schema(&doc, op("GET", "/api/{user_id}/tasks"), "200", what);
        assert_eq!(schema["type"], "array", "{what}: {schema}");
        let props = properties(&doc, &schema["items"]);
        for field in task_fields {
            assert!(
                props.contains_key(field),
                "{what}: items lack {field}: {schema}"
            );
        }
    }
    for (path, status) in [("/token", "200"), ("/api/auth/login", "200")] {
        let what = format!("POST {path} {status} response");
        let props = properties(&doc, response_schema(&doc, op("POST", path), status, &what));
        for field in ["access_token", "token_type", "expires_in"] {
            assert!(props.contains_key(field), "{what}: no {field} in {props:?}");
        }
    }
    {
        let what = "GET /health 200 response";
        let props = properties(
            &doc,
            response_schema(&doc, op("GET", "/health"), "200", what),
        );
        assert!(
            props.contains_key("status") && props.contains_key("database"),
            "{what}: {props:?}"
        );
    }
    // An error response documents the {"detail": ...} shape.
    {
        let what = "GET task 404 response";
        let props = properties(
            &doc,
            response_schema(&doc, op("GET", "/api/{user_id}/tasks/{id}"), "404", what),
        );
        assert!(props.contains_key("detail"), "{what}: {props:?}");
        let what = "POST task 422 response";
        let props = properties(
            &doc,
            response_schema(&doc, op("POST", "/api/{user_id}/tasks"), "422", what),
        );
        assert!(props.contains_key("detail"), "{what}: {props:?}");
    }
}

fn documented_routes_exist(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("routes@example.com");
    let task = create_task(&srv, &token, "a task");
    let doc = fetch_openapi(&srv);
    let ops = doc_operations(&doc);

    // DELETEs last (they remove the task / the user), the user's own DELETE at the very end.
    let mut order: Vec<_> = ops.iter().collect();
    order.sort_by_key(
        |((method, path), _)| match (method.as_str(), path.as_str()) {
            ("DELETE", "/api/users/me") => 2,
            ("DELETE", _) => 1,
            _ => 0,
        },
    );
    assert!(!order.is_empty(), "the document lists no operations");
    for ((method, _), (raw_path, op)) in order {
        // Fill path parameters.
        let mut path = String::new();
        for (i, seg) in raw_path.split('/').enumerate() {
            if i > 0 {
                path.push('/');
            }
            if seg.starts_with('{') && seg.ends_with('}') {
                if seg == "{user_id}" {
                    path.push_str("me");
                } else {
                    path.push_str(&task.to_string());
                }
            } else {
                path.push_str(seg);
            }
        }
        let mut request = srv
            .client
            .request(method.parse().unwrap(), srv.url(&path))
            .bearer_auth(&token);
        if op
            .pointer("/requestBody/content/application~1x-www-form-urlencoded")
            .is_some()
        {
            request = request.form(&[("username", "routes@example.com"), ("password", "x")]);
        } else if op.get("requestBody").is_some() {
            request = request.json(&json!({}));
        }
        let (status, _, text) = send_raw(request);
        let what = format!("{method} {raw_path} (as {path})");
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{what}: documented but 405: {text}"
        );
        if status == StatusCode::NOT_FOUND {
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert_ne!(
                body,
                json!({"detail": "Not Found"}),
                "{what}: documented but the router does not know it"
            );
        }
    }
}

fn openapi_document_validates(backend: &Backend) {
    let srv = start(backend);
    let doc = fetch_openapi(&srv);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();

    let available = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !available {
        assert!(
            !is_ci(),
            "CI=true but python3 with openapi-spec-validator is missing (pip install openapi-spec-validator)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** openapi_document_validates SKIPPED: python3 -m openapi_spec_validator is not \
             available (pip install openapi-spec-validator) ***\n"
        );
        return;
    }
    let output = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run openapi_spec_validator");
    if !output.status.success() {
        // The validator quotes the whole document; the start says what is wrong.
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cut: String = report.chars().take(1500).collect();
        panic!(
            "the OpenAPI document does not validate (python3 -m openapi_spec_validator):\n{cut}"
        );
    }
}

/// GETs a URL, following same-origin redirects; returns (final URL, status, headers, body).
fn get_following(srv: &Server, path: &str) -> (reqwest::Url, StatusCode, HeaderMap, String) {
    let mut url = reqwest::Url::parse(&srv.url(path)).unwrap();
    for _ in 0..5 {
        let (status, headers, text) = send_raw(srv.client.get(url.clone()));
        if status.is_redirection() {
            let location = header(&headers, "location").expect("redirect without Location");
            let next = url.join(&location).unwrap();
            assert_eq!(
                next.origin(),
                url.origin(),
                "{path} redirects off-site to {next}"
            );
            url = next;
            continue;
        }
        return (url, status, headers, text);
    }
    panic!("{path}: too many redirects");
}

/// Values of `attr="..."` / `attr='...'` in an HTML page.
fn attribute_values(html: &str, attr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = html.to_ascii_lowercase();
    for quote in ['"', '\''] {
        let needle = format!("{attr}={quote}");
        let mut from = 0;
        while let Some(i) = lower[from..].find(&needle) {
            let start = from + i + needle.len();
            // The attribute name must start a word (so `data-src` is not `src`).
            let before = lower[..from + i].chars().last();
            if let Some(end) = html[start..].find(quote) {
                if before.is_none_or(|c| c.is_whitespace()) {
                    out.push(html[start..start + end].to_string());
                }
                from = start + end;
            } else {
                break;
            }
        }
    }
    out
}

const CDN_MARKERS: &[&str] = &[
    "unpkg",
    "jsdelivr",
    "cdnjs",
    "googleapis",
    "cloudflare",
    "cdn.",
];

fn docs_page_is_served_by_the_binary(backend: &Backend) {
    let srv = start(backend);
    let (url, status, headers, html) = get_following(&srv, "/docs");
    assert_eq!(status, StatusCode::OK, "GET /docs (at {url}): {html}");
    assert!(
        header(&headers, "content-type")
            .unwrap_or_default()
            .starts_with("text/html"),
        "/docs content-type: {headers:?}"
    );
    assert_nosniff("GET /docs", &headers);
    // Not to be framed by another site (clickjacking the Authorize form).
    assert_eq!(header(&headers, "x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(
        header(&headers, "content-security-policy").as_deref(),
        Some("frame-ancestors 'none'")
    );
    assert!(
        html.to_ascii_lowercase().contains("swagger-ui"),
        "/docs is not Swagger UI: {html}"
    );
    for marker in CDN_MARKERS {
        assert!(
            !html.contains(marker),
            "/docs HTML references a CDN ({marker}): {html}"
        );
    }

    let mut assets: Vec<String> = attribute_values(&html, "src");
    assets.extend(
        attribute_values(&html, "href")
            .into_iter()
            .filter(|h| h.ends_with(".css") || h.ends_with(".js") || h.ends_with(".png")),
    );
    let scripts: Vec<&String> = assets.iter().filter(|a| a.ends_with(".js")).collect();
    assert!(!scripts.is_empty(), "/docs loads no scripts: {html}");
    assert!(
        assets.iter().any(|a| a.ends_with(".css")),
        "/docs loads no stylesheet: {html}"
    );
    let mut saw_initializer = false;
    let mut saw_bundle = false;
    for asset in &assets {
        let asset_url = url.join(asset).unwrap();
        assert_eq!(
            asset_url.origin(),
            url.origin(),
            "/docs loads {asset} from another origin"
        );
        let (status, headers, text) = send_raw(srv.client.get(asset_url.clone()));
        assert_eq!(status, StatusCode::OK, "asset {asset_url}: status");
        assert_nosniff(&format!("asset {asset_url}"), &headers);
        let content_type = header(&headers, "content-type").unwrap_or_default();
        if asset.ends_with(".js") {
            assert!(
                content_type.contains("javascript"),
                "{asset_url}: content-type {content_type}"
            );
        }
        if asset.ends_with(".css") {
            assert!(
                content_type.starts_with("text/css"),
                "{asset_url}: content-type {content_type}"
            );
        }
        if asset.contains("swagger-ui-bundle") {
            saw_bundle = true;
            assert!(
                text.len() > 100_000,
                "{asset_url} is too small to be Swagger UI's bundle"
            );
        }
        if asset.contains("initializer") {
            saw_initializer = true;
            for marker in CDN_MARKERS {
                assert!(
                    !text.contains(marker),
                    "{asset_url} references a CDN ({marker}): {text}"
                );
            }
            assert!(
                text.contains("/openapi.json"),
                "{asset_url} does not load /openapi.json: {text}"
            );
        }
    }
    assert!(
        saw_bundle,
        "/docs does not load swagger-ui-bundle.js: {assets:?}"
    );
    // The initializer may be inline; then the page itself points at /openapi.json.
    if !saw_initializer {
        assert!(
            html.contains("/openapi.json"),
            "/docs does not point Swagger UI at /openapi.json"
        );
    }
}

on_both_backends!(
    json_body_errors_are_422_with_loc,
    query_errors_are_422_with_loc,
    path_errors_are_422_with_loc,
    form_errors_are_422_with_loc,
    errors_do_not_echo_secrets,
    wrong_content_type_is_415,
    oversized_bodies_are_413,
    unknown_route_is_404_json,
    trailing_slash_redirects_like_fastapi,
    wrong_method_is_405_with_allow,
    nosniff_on_every_response,
    unauthorized_carries_www_authenticate,
    cors_closed_by_default,
    cors_open_to_configured_origins,
    openapi_document_describes_the_contract,
    documented_routes_exist,
    openapi_document_validates,
    docs_page_is_served_by_the_binary,
);
