//! Issue 11, part B (and issue 9's NUL and search-length items): bad input is answered as
//! FastAPI answers it — every problem listed, empty form fields absent, authorization before
//! validation, one message per kind of problem, NUL characters refused on both backends.

mod common;
use common::*;

/// The `(loc, type)` of every item of a 422 (panics on anything else).
fn problems(
    what: &str,
    (status, _, body): (StatusCode, reqwest::header::HeaderMap, Value),
) -> Vec<(Value, String)> {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: detail is not a list: {body}"))
        .iter()
        .map(|item| {
            assert!(item["msg"].is_string(), "{what}: {item}");
            (
                item["loc"].clone(),
                item["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn locs(what: &str, response: (StatusCode, reqwest::header::HeaderMap, Value)) -> Vec<Value> {
    problems(what, response)
        .into_iter()
        .map(|(loc, _)| loc)
        .collect()
}

fn assert_locs(what: &str, got: &[Value], expected: &[Value]) {
    for loc in expected {
        assert!(
            got.contains(loc),
            "{what}: no problem at {loc}; got {got:?}"
        );
    }
}

fn json_request(
    request: reqwest::blocking::RequestBuilder,
    body: &str,
) -> reqwest::blocking::RequestBuilder {
    request
        .header("content-type", "application/json")
        .body(body.to_string())
}

fn task(srv: &Server, token: &str) -> i64 {
    let (status, _, body) = send(
        srv.post("/api/me/tasks")
            .bearer_auth(token)
            .json(&json!({"title": "a task"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_i64().unwrap()
}

fn every_problem_is_reported(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("many@example.com");
    let id = task(&srv, &token);

    let body = r#"{"title": "", "completed": "perhaps"}"#;
    for (what, request) in [
        ("POST task", srv.post("/api/me/tasks")),
        ("PUT task", srv.put(&format!("/api/me/tasks/{id}"))),
        ("PATCH task", srv.patch(&format!("/api/me/tasks/{id}"))),
    ] {
        let got = locs(what, send(json_request(request.bearer_auth(&token), body)));
        assert_locs(
            what,
            &got,
            &[json!(["body", "title"]), json!(["body", "completed"])],
        );
    }

    let got = locs(
        "register",
        send(json_request(
            srv.post("/api/auth/register"),
            r#"{"email": "not-an-email", "password": "short", "name": 5}"#,
        )),
    );
    assert_locs(
        "register",
        &got,
        &[
            json!(["body", "email"]),
            json!(["body", "password"]),
            json!(["body", "name"]),
        ],
    );

    let got = locs(
        "/token with neither field",
        send(
            srv.post("/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=password"),
        ),
    );
    assert_locs(
        "/token with neither field",
        &got,
        &[json!(["body", "username"]), json!(["body", "password"])],
    );

    let got = locs(
        "list query",
        send(
            srv.get("/api/me/tasks?limit=0&offset=-1&status=bogus")
                .bearer_auth(&token),
        ),
    );
    assert_locs(
        "list query",
        &got,
        &[
            json!(["query", "limit"]),
            json!(["query", "offset"]),
            json!(["query", "status"]),
        ],
    );
}

fn empty_form_fields_are_absent(backend: &Backend) {
    let srv = start(backend);
    srv.register("form@example.com", PASSWORD);
    let form = |body: String| {
        send(
            srv.post("/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
        )
    };
    let password = PASSWORD.replace(' ', "+");
    let (status, _, body) = form(format!(
        "grant_type=&scope=&client_id=&client_secret=&username=form%40example.com&password={password}"
    ));
    assert_eq!(status, StatusCode::OK, "empty optional fields: {body}");
    let got = problems(
        "empty username",
        form(format!("username=&password={password}")),
    );
    assert_eq!(
        got,
        vec![(json!(["body", "username"]), "missing".to_string())],
        "an empty username is a missing one"
    );
}

/// `/token` also takes its form as `multipart/form-data`, as a browser's `FormData` sends it and
/// FastAPI reads it; a malformed one is FastAPI's 400.
fn token_form_may_be_multipart(backend: &Backend) {
    let srv = start(backend);
    srv.register("multipart@example.com", PASSWORD);
    let multipart = |body: String| {
        send(
            srv.post("/token")
                .header("content-type", "multipart/form-data; boundary=XyZ")
                .body(body),
        )
    };
    let part = |name: &str, value: &str| {
        format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
    };
    let form = [
        part("username", "multipart@example.com"),
        part("password", PASSWORD),
        part("grant_type", ""),
        "--XyZ--\r\n".to_string(),
    ];
    let (status, _, token) = multipart(form.concat());
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["token_type"], "bearer");

    let (status, _, body) = multipart(part("username", "multipart@example.com") + "--XyZ--\r\n");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "password"]));

    let (status, _, body) = multipart("--XyZ\r\nnot a part header".into());
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body,
        json!({"detail": "There was an error parsing the body"})
    );
}

/// A JSON body may start with a UTF-8 byte order mark, as Python's `json.loads` (which FastAPI
/// reads bodies with) allows; anywhere else it is malformed JSON.
fn a_byte_order_mark_before_json_is_allowed(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("bom@example.com");
    let post = |body: &[u8]| {
        send(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(body.to_vec()),
        )
    };
    let (status, _, task) = post(b"\xEF\xBB\xBF{\"title\": \"with a BOM\"}");
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["title"], "with a BOM");
    let got = problems("BOM inside", post(b"{\xEF\xBB\xBF\"title\": \"x\"}"));
    assert_eq!(got, vec![(json!(["body"]), "json_invalid".to_string())]);
}

fn authorization_comes_before_validation(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("me@example.com");
    let (other, other_token) = srv.user("other@example.com");
    let other_id = other["id"].as_str().unwrap();
    let id = task(&srv, &other_token);

    for body in [r#"{"title": ""}"#, "not json", r#"{"completed": null}"#] {
        for (what, request) in [
            ("POST", srv.post(&format!("/api/{other_id}/tasks"))),
            ("PUT", srv.put(&format!("/api/{other_id}/tasks/{id}"))),
            ("PATCH", srv.patch(&format!("/api/{other_id}/tasks/{id}"))),
        ] {
            let (status, _, answer) = send(json_request(request.bearer_auth(&token), body));
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{what} on another user's tasks with {body}: {answer}"
            );
        }
    }
    // Whatever the body's type, too.
    let (status, _, answer) = send(
        srv.post(&format!("/api/{other_id}/tasks"))
            .bearer_auth(&token)
            .header("content-type", "text/plain")
            .body("title"),
    );
    assert_eq!(status, StatusCode::FORBIDDEN, "text body: {answer}");
    // And whatever the query.
    let (status, _, answer) = send(
        srv.get(&format!("/api/{other_id}/tasks?limit=0&status=bogus"))
            .bearer_auth(&token),
    );
    assert_eq!(status, StatusCode::FORBIDDEN, "bad query: {answer}");
    // The owner still gets the 422.
    let (status, _, answer) = send(json_request(
        srv.post(&format!("/api/{other_id}/tasks"))
            .bearer_auth(&other_token),
        r#"{"title": ""}"#,
    ));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
}

fn a_token_without_a_user_is_401_whatever_the_body(backend: &Backend) {
    let srv = start(backend);
    // Signed right, but its user does not exist (deleted, say): found out only by a lookup.
    let token = hs256_token(&json!({"sub": "ghost", "exp": now_secs() + 600}));
    for body in [r#"{"email": null, "new_password": 5}"#, "not json"] {
        for (what, request) in [
            ("PATCH /api/users/me", srv.patch("/api/users/me")),
            (
                "PUT /api/users/me/password",
                srv.put("/api/users/me/password"),
            ),
            ("POST /api/me/tasks", srv.post("/api/me/tasks")),
        ] {
            let (status, _, answer) = send(json_request(request.bearer_auth(&token), body));
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{what} with {body}: {answer}"
            );
        }
    }
}

fn null_and_wrong_values_get_the_same_message(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("null@example.com");
    let id = task(&srv, &token);
    let item = |what: &str, request: reqwest::blocking::RequestBuilder, body: Value| {
        let (status, _, answer) = send(request.bearer_auth(&token).json(&body));
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {answer}");
        let item = answer["detail"][0].clone();
        (item["msg"].clone(), item["type"].clone())
    };
    let patch = format!("/api/me/tasks/{id}");
    for (route, field, wrong, msg, kind) in [
        (
            "PATCH",
            "title",
            json!(5),
            "Input should be a valid string",
            "string_type",
        ),
        (
            "PATCH",
            "completed",
            json!("x"),
            "Input should be a valid boolean",
            "bool_type",
        ),
        (
            "POST",
            "completed",
            json!("x"),
            "Input should be a valid boolean",
            "bool_type",
        ),
        (
            "ME",
            "email",
            json!(5),
            "Input should be a valid string",
            "string_type",
        ),
    ] {
        let request = || match route {
            "PATCH" => srv.patch(&patch),
            "POST" => srv.post("/api/me/tasks"),
            _ => srv.patch("/api/users/me"),
        };
        let mut null_body = json!({"title": "t"});
        null_body[field] = Value::Null;
        let mut wrong_body = json!({"title": "t"});
        wrong_body[field] = wrong;
        let what = format!("{route} {field}");
        let expected = (json!(msg), json!(kind));
        assert_eq!(
            item(&format!("{what}: null"), request(), null_body),
            expected
        );
        assert_eq!(
            item(&format!("{what}: wrong type"), request(), wrong_body),
            expected
        );
    }
}

fn nul_characters_are_refused(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("nul@example.com");
    let id = task(&srv, &token);
    let task_url = format!("/api/me/tasks/{id}");
    let nul = "a\u{0}b";
    let nul_email = "nul\u{0}@example.com";
    let nul_password = "long\u{0}password";
    let auth = |request: reqwest::blocking::RequestBuilder| request.bearer_auth(&token);

    // (what, request, field): every string field of every JSON body, form and query.
    let mut cases = Vec::new();
    for field in ["title", "description"] {
        let mut body = json!({"title": "t"});
        body[field] = json!(nul);
        cases.push((
            "POST task",
            auth(srv.post("/api/me/tasks")).json(&body),
            field,
        ));
        cases.push(("PUT task", auth(srv.put(&task_url)).json(&body), field));
        cases.push(("PATCH task", auth(srv.patch(&task_url)).json(&body), field));
    }
    let register = |body: Value| srv.post("/api/auth/register").json(&body);
    let login = |body: Value| srv.post("/api/auth/login").json(&body);
    let token_form = |form: [(&str, &str); 2]| srv.post("/token").form(&form);
    let me = |body: Value| auth(srv.patch("/api/users/me")).json(&body);
    let password = |body: Value| auth(srv.put("/api/users/me/password")).json(&body);
    cases.extend([
        (
            "register",
            register(json!({"email": nul_email, "password": PASSWORD})),
            "email",
        ),
        (
            "register",
            register(json!({"email": "x@example.com", "password": nul_password})),
            "password",
        ),
        (
            "register",
            register(json!({"email": "y@example.com", "password": PASSWORD, "name": nul})),
            "name",
        ),
        (
            "login",
            login(json!({"email": nul_email, "password": PASSWORD})),
            "email",
        ),
        (
            "login",
            login(json!({"email": "nul@example.com", "password": nul_password})),
            "password",
        ),
        (
            "/token",
            token_form([("username", nul_email), ("password", PASSWORD)]),
            "username",
        ),
        (
            "/token",
            token_form([("username", "nul@example.com"), ("password", nul_password)]),
            "password",
        ),
        ("PATCH me", me(json!({"name": nul})), "name"),
        ("PATCH me", me(json!({"email": nul_email})), "email"),
        (
            "PUT password",
            password(json!({"current_password": nul_password, "new_password": PASSWORD})),
            "current_password",
        ),
        (
            "PUT password",
            password(json!({"current_password": PASSWORD, "new_password": nul_password})),
            "new_password",
        ),
    ]);
    for (what, request, field) in cases {
        let got = problems(&format!("{what} {field}"), send(request));
        assert!(
            got.contains(&(json!(["body", field]), "string_nul".to_string())),
            "{what}: expected string_nul at [body, {field}], got {got:?}"
        );
    }
    let got = problems("search", send(auth(srv.get("/api/me/tasks?q=a%00b"))));
    assert_eq!(got, vec![(json!(["query", "q"]), "string_nul".to_string())]);

    // Nothing was stored: the account still has its one task, and its login still works.
    let (status, headers, _) = send(auth(srv.get("/api/me/tasks")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-total-count"], "1");
    srv.login("nul@example.com", PASSWORD);
}

fn search_is_at_most_200_characters(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("search@example.com");
    let list = |q: &str| send(srv.get(&format!("/api/me/tasks?q={q}")).bearer_auth(&token));
    let (status, _, body) = list(&"a".repeat(200));
    assert_eq!(status, StatusCode::OK, "200 characters: {body}");
    for q in ["a".repeat(201), "_".repeat(25_000)] {
        let got = problems(&format!("q of {} characters", q.len()), list(&q));
        assert_eq!(
            got,
            vec![(json!(["query", "q"]), "string_too_long".to_string())]
        );
    }
}

on_both_backends!(
    token_form_may_be_multipart,
    a_byte_order_mark_before_json_is_allowed,
    every_problem_is_reported,
    empty_form_fields_are_absent,
    authorization_comes_before_validation,
    a_token_without_a_user_is_401_whatever_the_body,
    null_and_wrong_values_get_the_same_message,
    nul_characters_are_refused,
    search_is_at_most_200_characters,
);
