//! Issue 11, part A: `/openapi.json` says exactly what the server does, so that clients generated
//! from it (openapi-typescript, openapi-python-client) get the right types. One test per point of
//! the issue; `tests/generated_client.rs` then runs a generated client against the server.
//!
//! The document does not depend on the database, so these run on SQLite only.

mod common;
use common::*;

/// The document of a fresh server.
fn document() -> Value {
    let srv = start(&Backend::Sqlite);
    let (status, _, doc) = send(srv.get("/openapi.json"));
    assert_eq!(status, StatusCode::OK);
    doc
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no component schema {name}"))
}

fn required(schema: &Value) -> Vec<&str> {
    schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether a property schema admits `null` (OpenAPI 3.1 `type: [..., "null"]`, or a
/// `oneOf`/`anyOf` with a null branch).
fn admits_null(property: &Value) -> bool {
    let type_has_null = match &property["type"] {
        Value::String(t) => t == "null",
        Value::Array(types) => types.iter().any(|t| t == "null"),
        _ => false,
    };
    type_has_null
        || ["oneOf", "anyOf"].iter().any(|key| {
            property[key]
                .as_array()
                .is_some_and(|branches| branches.iter().any(admits_null))
        })
}

/// Every operation as (METHOD, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
    }
    out
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    doc.pointer(&format!(
        "/paths/{}/{}",
        path.replace('~', "~0").replace('/', "~1"),
        method.to_lowercase()
    ))
    .unwrap_or_else(|| panic!("no operation {method} {path}"))
}

#[test]
fn always_sent_nullable_fields_are_required_and_nullable() {
    let doc = document();
    for (component, field) in [("Task", "description"), ("User", "name")] {
        let schema = schema(&doc, component);
        assert!(
            required(schema).contains(&field),
            "{component}.{field} is always sent, so it must be in `required`: {schema}"
        );
        assert!(
            admits_null(&schema["properties"][field]),
            "{component}.{field} is null when unset: {schema}"
        );
    }
}

#[test]
fn patch_fields_that_refuse_null_are_optional_but_not_nullable() {
    let doc = document();
    for (component, field, nullable) in [
        ("TaskPatch", "title", false),
        ("TaskPatch", "completed", false),
        ("TaskPatch", "description", true),
        ("UserUpdate", "email", false),
        ("UserUpdate", "name", true),
    ] {
        let schema = schema(&doc, component);
        assert!(
            !required(schema).contains(&field),
            "{component}.{field} may be left out: {schema}"
        );
        assert_eq!(
            admits_null(&schema["properties"][field]),
            nullable,
            "{component}.{field}: null is {} by the server: {schema}",
            if nullable { "accepted" } else { "a 422" }
        );
    }
}

#[test]
fn json_routes_declare_413_and_415() {
    let doc = document();
    for (method, path) in [
        ("POST", "/api/auth/register"),
        ("POST", "/api/auth/login"),
        ("POST", "/api/{user_id}/tasks"),
        ("PUT", "/api/{user_id}/tasks/{id}"),
        ("PATCH", "/api/{user_id}/tasks/{id}"),
        ("PATCH", "/api/users/me"),
        ("PUT", "/api/users/me/password"),
    ] {
        let responses = &operation(&doc, method, path)["responses"];
        for status in ["413", "415"] {
            assert!(
                responses.get(status).is_some(),
                "{method} {path} does not declare {status}: {responses}"
            );
        }
    }
    let token = &operation(&doc, "POST", "/token")["responses"];
    assert!(token.get("413").is_some(), "/token declares 413: {token}");
}

#[test]
fn headers_the_server_always_sends_are_declared_required() {
    let doc = document();
    let total = &operation(&doc, "GET", "/api/{user_id}/tasks")["responses"]["200"]["headers"]
        ["X-Total-Count"];
    assert_eq!(total["required"], true, "X-Total-Count: {total}");
    let location =
        &operation(&doc, "POST", "/api/{user_id}/tasks")["responses"]["201"]["headers"]["Location"];
    assert_eq!(location["required"], true, "Location: {location}");

    let mut seen = (0, 0);
    for (method, path, operation) in operations(&doc) {
        for (status, header) in [("401", "WWW-Authenticate"), ("429", "Retry-After")] {
            if let Some(response) = operation["responses"].get(status) {
                let declared = &response["headers"][header];
                assert_eq!(
                    declared["required"], true,
                    "{method} {path} {status} must declare a required {header}: {response}"
                );
                if status == "401" {
                    seen.0 += 1
                } else {
                    seen.1 += 1
                }
            }
        }
    }
    assert!(seen.0 >= 13 && seen.1 >= 2, "401s and 429s seen: {seen:?}");
}

#[test]
fn list_query_parameters_declare_their_defaults() {
    let doc = document();
    let parameters = operation(&doc, "GET", "/api/{user_id}/tasks")["parameters"]
        .as_array()
        .expect("parameters");
    for (name, default) in [("status", "all"), ("sort", "created"), ("order", "desc")] {
        let parameter = parameters
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        assert_eq!(
            parameter["schema"]["default"], default,
            "{name}: {parameter}"
        );
        assert_eq!(parameter["schema"]["type"], "string", "{name}: {parameter}");
        assert!(
            parameter["schema"]["enum"]
                .as_array()
                .is_some_and(|values| values.iter().any(|v| v == default)),
            "{name}: {parameter}"
        );
    }
}

#[test]
fn fixed_string_values_are_enums() {
    let doc = document();
    assert_eq!(
        schema(&doc, "TokenResponse")["properties"]["token_type"]["enum"],
        json!(["bearer"])
    );
    assert_eq!(
        schema(&doc, "Health")["properties"]["status"]["enum"],
        json!(["ok", "unavailable"])
    );
}

#[test]
fn token_form_allows_client_credentials() {
    let doc = document();
    let form = schema(&doc, "TokenForm");
    for field in ["client_id", "client_secret"] {
        assert_eq!(
            form["properties"][field]["type"], "string",
            "TokenForm.{field}: {form}"
        );
        assert!(!required(form).contains(&field), "{field} is optional");
    }
    // …and the server takes them (and ignores them).
    let srv = start(&Backend::Sqlite);
    srv.register("client@example.com", PASSWORD);
    let (status, _, body) = send(srv.post("/token").form(&[
        ("username", "client@example.com"),
        ("password", PASSWORD),
        ("client_id", "my-app"),
        ("client_secret", "unused"),
    ]));
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[test]
fn public_operations_say_so_and_a_server_is_declared() {
    let doc = document();
    for (method, path, operation) in operations(&doc) {
        let public = path == "/health" || path == "/token" || path.starts_with("/api/auth/");
        if public {
            assert_eq!(
                operation["security"],
                json!([]),
                "{method} {path} is public: `security: []`"
            );
        } else {
            assert!(
                operation["security"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty()),
                "{method} {path} needs a token: {}",
                operation["security"]
            );
        }
    }
    let servers = doc["servers"].as_array().expect("a servers list");
    assert!(
        servers.iter().any(|s| s["url"].as_str().is_some()),
        "{servers:?}"
    );
}

/// The `detail` of every example of a response (`example` or `examples`).
fn example_details(response: &Value) -> Vec<String> {
    let media = &response["content"]["application/json"];
    let mut values: Vec<&Value> = media.get("example").into_iter().collect();
    if let Some(examples) = media["examples"].as_object() {
        values.extend(examples.values().map(|e| &e["value"]));
    }
    values
        .into_iter()
        .map(|v| match &v["detail"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn each_error_status_shows_its_own_example() {
    let doc = document();
    // The component itself carries no example, or Swagger UI shows it for every status.
    assert!(
        schema(&doc, "ErrorDetail")["properties"]["detail"]
            .get("example")
            .is_none(),
        "ErrorDetail.detail must not carry one example for every error"
    );
    for (method, path, operation) in operations(&doc) {
        for (status, response) in operation["responses"].as_object().unwrap() {
            if !status.starts_with('4') {
                continue;
            }
            let details = example_details(response);
            assert!(
                !details.is_empty(),
                "{method} {path} {status} has no example: {response}"
            );
            let fits = |detail: &String| match status.as_str() {
                "400" if path == "/token" => detail == "There was an error parsing the body",
                "400" => detail == "Incorrect password",
                "401" if path == "/token" || path == "/api/auth/login" => {
                    detail == "Incorrect email or password"
                }
                "401" => {
                    detail == "Not authenticated" || detail == "Could not validate credentials"
                }
                "403" => detail == "Not allowed to access another user's tasks",
                "404" => detail == "Task not found",
                "409" => detail.starts_with("Email already registered"),
                "413" => detail.starts_with("Request body is larger than"),
                "415" => detail.starts_with("Unsupported media type"),
                "422" => detail.contains("\"loc\""),
                "429" if path == "/api/auth/register" => detail == "Too many registrations",
                "429" => detail == "Too many login attempts",
                _ => false,
            };
            for detail in &details {
                assert!(
                    fits(detail),
                    "{method} {path} {status}: example {detail:?} is not what that status says"
                );
            }
        }
    }
    let unauthorized =
        example_details(&operation(&doc, "GET", "/api/users/me")["responses"]["401"]);
    for detail in ["Not authenticated", "Could not validate credentials"] {
        assert!(
            unauthorized.iter().any(|d| d == detail),
            "401 examples: {unauthorized:?}"
        );
    }
    error_examples_match_the_server();
}

/// The examples are what the server really answers.
fn error_examples_match_the_server() {
    let srv = start(&Backend::Sqlite);
    let (_, token) = srv.user("examples@example.com");
    let (_, other) = srv.user("other@example.com");
    let (_, _, me) = send(srv.get("/api/users/me").bearer_auth(&other));
    let other_id = me["id"].as_str().unwrap().to_string();
    let cases =
        [
            (send(srv.get("/api/users/me")), "Not authenticated"),
            (
                send(srv.get("/api/users/me").bearer_auth("nope")),
                "Could not validate credentials",
            ),
            (
                send(
                    srv.get(&format!("/api/{other_id}/tasks"))
                        .bearer_auth(&token),
                ),
                "Not allowed to access another user's tasks",
            ),
            (
                send(srv.get("/api/me/tasks/999").bearer_auth(&token)),
                "Task not found",
            ),
            (
                send(
                    srv.post("/api/auth/register")
                        .json(&json!({"email": "examples@example.com", "password": PASSWORD})),
                ),
                "Email already registered",
            ),
            (
                send(
                    srv.post("/api/me/tasks")
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(vec![b' '; 70 * 1024]),
                ),
                "Request body is larger than 65536 bytes",
            ),
            (
                send(
                    srv.post("/api/me/tasks")
                        .bearer_auth(&token)
                        .header("content-type", "text/plain")
                        .body("title"),
                ),
                "Unsupported media type: expected application/json",
            ),
            (
                send(srv.put("/api/users/me/password").bearer_auth(&token).json(
                    &json!({"current_password": "wrong password", "new_password": PASSWORD}),
                )),
                "Incorrect password",
            ),
        ];
    for ((status, _, body), detail) in cases {
        assert_eq!(body["detail"], detail, "{status}: {body}");
    }
}
