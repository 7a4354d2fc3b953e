//! Issue 4: the tasks API (`/api/{user_id}/tasks…`), on both backends.
//!
//! Every route of the contract, ownership on every operation, the list query (filters, sorting,
//! pagination, search, `X-Total-Count`), validation, timestamps, and concurrency (atomic
//! toggles, concurrent creates).
mod common;
use common::*;

use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Barrier;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

const FORBIDDEN: &str = "Not allowed to access another user's tasks";
const NOT_FOUND: &str = "Task not found";
/// A task id that no test ever reaches.
const MISSING_ID: i64 = 987_654_321;

type Resp = (StatusCode, HeaderMap, Value);
/// A request to replay, for tests that run several kinds of write the same way.
type Write<'a> = Box<dyn Fn() -> Resp + 'a>;

/// One logged-in user of one server.
struct Api<'a> {
    srv: &'a Server,
    token: String,
    id: String,
}

impl<'a> Api<'a> {
    fn new(srv: &'a Server, email: &str) -> Self {
        let (user, token) = srv.user(email);
        let id = user["id"]
            .as_str()
            .expect("user id is a string")
            .to_string();
        Api { srv, token, id }
    }

    fn get(&self, path: &str) -> Resp {
        send(self.srv.get(path).bearer_auth(&self.token))
    }
    fn get_query(&self, path: &str, query: &[(&str, &str)]) -> Resp {
        send(self.srv.get(path).query(query).bearer_auth(&self.token))
    }
    fn post(&self, path: &str, body: &Value) -> Resp {
        send(self.srv.post(path).json(body).bearer_auth(&self.token))
    }
    fn put(&self, path: &str, body: &Value) -> Resp {
        send(self.srv.put(path).json(body).bearer_auth(&self.token))
    }
    fn patch(&self, path: &str, body: &Value) -> Resp {
        send(self.srv.patch(path).json(body).bearer_auth(&self.token))
    }
    fn delete(&self, path: &str) -> Resp {
        send(self.srv.delete(path).bearer_auth(&self.token))
    }
    fn toggle(&self, path: &str) -> Resp {
        send(self.srv.patch(path).bearer_auth(&self.token))
    }

    /// `POST /api/me/tasks`, asserting 201.
    fn create(&self, body: Value) -> Value {
        let (status, _, task) = self.post("/api/me/tasks", &body);
        assert_eq!(status, StatusCode::CREATED, "create {body}: {task}");
        task
    }

    /// `GET /api/me/tasks` with a query, asserting 200: (tasks, X-Total-Count).
    fn list(&self, query: &[(&str, &str)]) -> (Vec<Value>, u64) {
        let (status, headers, body) = self.get_query("/api/me/tasks", query);
        assert_eq!(status, StatusCode::OK, "list {query:?}: {body}");
        let tasks = body
            .as_array()
            .unwrap_or_else(|| panic!("list is not an array: {body}"));
        (tasks.clone(), total_count(&headers))
    }

    /// The stored task, asserting 200.
    fn fetch(&self, id: i64) -> Value {
        let (status, _, task) = self.get(&format!("/api/me/tasks/{id}"));
        assert_eq!(status, StatusCode::OK, "get task {id}: {task}");
        task
    }
}

fn total_count(headers: &HeaderMap) -> u64 {
    headers
        .get("x-total-count")
        .expect("X-Total-Count header")
        .to_str()
        .unwrap()
        .parse()
        .expect("X-Total-Count is an integer")
}

fn id_of(task: &Value) -> i64 {
    task["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("task id is not an integer: {task}"))
}

fn ids(tasks: &[Value]) -> Vec<i64> {
    tasks.iter().map(id_of).collect()
}

fn time(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {value}"));
    assert!(text.ends_with('Z'), "time {text:?} does not end in Z");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("time {text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// A task has exactly the contract's keys, with the contract's types.
fn assert_task_shape(task: &Value) {
    let object = task
        .as_object()
        .unwrap_or_else(|| panic!("task is not an object: {task}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "completed",
            "created_at",
            "description",
            "id",
            "title",
            "updated_at",
            "user_id"
        ],
        "task keys: {task}"
    );
    assert!(task["id"].is_i64(), "id is not an integer: {task}");
    assert!(
        task["user_id"].is_string(),
        "user_id is not a string: {task}"
    );
    assert!(task["title"].is_string(), "title is not a string: {task}");
    assert!(
        task["description"].is_string() || task["description"].is_null(),
        "description is neither string nor null: {task}"
    );
    assert!(
        task["completed"].is_boolean(),
        "completed is not a boolean: {task}"
    );
    time(&task["created_at"]);
    time(&task["updated_at"]);
}

/// A 422 whose first error is at `loc`, in FastAPI's shape.
fn assert_422_at(response: &Resp, loc: &[&str], what: &str) {
    let (status, _, body) = response;
    assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    let detail = body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: detail is not a list: {body}"));
    assert!(!detail.is_empty(), "{what}: empty detail");
    for item in detail {
        assert!(item["msg"].is_string(), "{what}: error without msg: {body}");
        assert!(
            item["type"].is_string(),
            "{what}: error without type: {body}"
        );
    }
    assert_eq!(detail[0]["loc"], json!(loc), "{what}: {body}");
}

/// A 422 whose first error's loc starts with `place` ("path", "body", "query").
fn assert_422_in(response: &Resp, place: &str, what: &str) {
    let (status, _, body) = response;
    assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    let detail = body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: detail is not a list: {body}"));
    assert!(!detail.is_empty(), "{what}: empty detail");
    assert_eq!(detail[0]["loc"][0], json!(place), "{what}: {body}");
}

fn assert_not_found(response: &Resp, what: &str) {
    let (status, _, body) = response;
    assert_eq!(*status, StatusCode::NOT_FOUND, "{what}: {body}");
    assert_eq!(*body, json!({"detail": NOT_FOUND}), "{what}");
}

fn assert_forbidden(response: &Resp, what: &str) {
    let (status, _, body) = response;
    assert_eq!(*status, StatusCode::FORBIDDEN, "{what}: {body}");
    assert_eq!(*body, json!({"detail": FORBIDDEN}), "{what}");
}

fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// Create: 201, the task's shape and defaults, `Location` with the real user id (also when the
/// request said `me`), and the stored task reads back identically under `me` and the real id.
fn create_returns_201_with_location(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");

    let (status, headers, task) = alice.post("/api/me/tasks", &json!({"title": "Buy milk"}));
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_task_shape(&task);
    let id = id_of(&task);
    assert_eq!(task["user_id"], json!(alice.id));
    assert_eq!(task["title"], json!("Buy milk"));
    assert_eq!(
        task["description"],
        Value::Null,
        "omitted description is null"
    );
    assert_eq!(
        task["completed"],
        json!(false),
        "omitted completed is false"
    );
    let created = time(&task["created_at"]);
    let skew = (Utc::now() - created).num_seconds().abs();
    assert!(
        skew < 300,
        "created_at {created} is not the current UTC time"
    );
    let location = headers
        .get("location")
        .expect("Location header")
        .to_str()
        .unwrap();
    assert_eq!(
        location,
        format!("/api/{}/tasks/{id}", alice.id),
        "Location after POST /api/me/tasks"
    );

    // The Location is a working address, and `me` and the real id name the same task.
    let (status, _, by_location) = alice.get(location);
    assert_eq!(status, StatusCode::OK, "{by_location}");
    assert_eq!(
        by_location, task,
        "GET Location returns the created task unchanged"
    );
    assert_eq!(alice.fetch(id), task);

    // Created through the real user id, with every field given.
    let path = format!("/api/{}/tasks", alice.id);
    let body = json!({"title": "Write report", "description": "Q3 numbers", "completed": true});
    let (status, headers, second) = alice.post(&path, &body);
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_task_shape(&second);
    assert_eq!(second["title"], json!("Write report"));
    assert_eq!(second["description"], json!("Q3 numbers"));
    assert_eq!(second["completed"], json!(true));
    assert_eq!(second["user_id"], json!(alice.id));
    assert_ne!(id_of(&second), id);
    let location = headers
        .get("location")
        .expect("Location header")
        .to_str()
        .unwrap();
    assert_eq!(
        location,
        format!("/api/{}/tasks/{}", alice.id, id_of(&second))
    );

    // Both appear in the list, under `me` and the real id alike.
    let (tasks, total) = alice.list(&[]);
    assert_eq!(total, 2);
    let mut listed = ids(&tasks);
    listed.sort_unstable();
    let mut expected = vec![id, id_of(&second)];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for listed_task in &tasks {
        assert_task_shape(listed_task);
    }
    let (status, headers, by_id) = alice.get(&path);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(total_count(&headers), 2);
    assert_eq!(
        by_id,
        json!(tasks),
        "the list under the real id equals the list under me"
    );
}

/// PUT is a full replace: omitted `description` → null, omitted `completed` → false.
fn put_replaces_the_whole_task(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "old", "description": "old text", "completed": true}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}");

    let (status, _, replaced) = alice.put(&path, &json!({"title": "new"}));
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_task_shape(&replaced);
    assert_eq!(replaced["id"], json!(id));
    assert_eq!(replaced["user_id"], json!(alice.id));
    assert_eq!(replaced["title"], json!("new"));
    assert_eq!(
        replaced["description"],
        Value::Null,
        "PUT without description clears it"
    );
    assert_eq!(
        replaced["completed"],
        json!(false),
        "PUT without completed sets false"
    );
    assert_eq!(replaced["created_at"], task["created_at"]);
    assert_eq!(
        alice.fetch(id),
        replaced,
        "the stored task is the PUT response"
    );

    let full = json!({"title": "newer", "description": "details", "completed": true});
    let path_by_id = format!("/api/{}/tasks/{id}", alice.id);
    let (status, _, replaced) = alice.put(&path_by_id, &full);
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["title"], json!("newer"));
    assert_eq!(replaced["description"], json!("details"));
    assert_eq!(replaced["completed"], json!(true));
    assert_eq!(alice.fetch(id), replaced);

    // PUT needs a title.
    let response = alice.put(&path, &json!({"description": "no title"}));
    assert_422_at(&response, &["body", "title"], "PUT without title");
    assert_eq!(alice.fetch(id), replaced, "a rejected PUT changes nothing");
}

/// PATCH is partial: an absent key leaves a field, `"description": null` clears it, and a null
/// `title` or `completed` is 422.
fn patch_updates_only_given_fields(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "title", "description": "desc", "completed": false}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}");

    let (status, _, patched) = alice.patch(&path, &json!({"completed": true}));
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_task_shape(&patched);
    assert_eq!(patched["title"], json!("title"), "absent title left alone");
    assert_eq!(
        patched["description"],
        json!("desc"),
        "absent description left alone"
    );
    assert_eq!(patched["completed"], json!(true));
    assert_eq!(patched["created_at"], task["created_at"]);

    let (status, _, patched) = alice.patch(&path, &json!({"title": "  renamed  "}));
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["title"], json!("renamed"), "PATCH trims the title");
    assert_eq!(patched["description"], json!("desc"));
    assert_eq!(
        patched["completed"],
        json!(true),
        "absent completed left alone"
    );

    let (status, _, patched) = alice.patch(&path, &json!({"description": "new desc"}));
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["description"], json!("new desc"));
    assert_eq!(patched["title"], json!("renamed"));

    let (status, _, patched) = alice.patch(&path, &json!({"description": null}));
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(
        patched["description"],
        Value::Null,
        "description: null clears it"
    );
    assert_eq!(patched["title"], json!("renamed"));
    assert_eq!(patched["completed"], json!(true));
    assert_eq!(
        alice.fetch(id),
        patched,
        "the stored task is the PATCH response"
    );

    let response = alice.patch(&path, &json!({"title": null}));
    assert_422_at(&response, &["body", "title"], "PATCH title: null");
    let response = alice.patch(&path, &json!({"completed": null}));
    assert_422_at(&response, &["body", "completed"], "PATCH completed: null");
    assert_eq!(alice.fetch(id), patched, "a rejected PATCH changes nothing");

    // Through the real user id as well.
    let (status, _, patched) = alice.patch(
        &format!("/api/{}/tasks/{id}", alice.id),
        &json!({"completed": false, "description": "back"}),
    );
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["completed"], json!(false));
    assert_eq!(patched["description"], json!("back"));
    assert_eq!(patched["title"], json!("renamed"));
}

/// DELETE answers 204; the task is then gone for every route.
fn delete_removes_the_task(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let keep = alice.create(json!({"title": "keep"}));
    let gone = alice.create(json!({"title": "gone"}));
    let path = format!("/api/me/tasks/{}", id_of(&gone));

    let (status, _, body) = alice.delete(&path);
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(body, Value::Null, "204 has no body");

    assert_not_found(&alice.get(&path), "GET after DELETE");
    assert_not_found(&alice.delete(&path), "DELETE twice");
    assert_not_found(
        &alice.put(&path, &json!({"title": "x"})),
        "PUT after DELETE",
    );
    assert_not_found(
        &alice.patch(&path, &json!({"title": "x"})),
        "PATCH after DELETE",
    );
    assert_not_found(
        &alice.toggle(&format!("{path}/complete")),
        "toggle after DELETE",
    );

    let (tasks, total) = alice.list(&[]);
    assert_eq!(total, 1);
    assert_eq!(ids(&tasks), vec![id_of(&keep)]);

    // Delete through the real user id.
    let path = format!("/api/{}/tasks/{}", alice.id, id_of(&keep));
    let (status, _, _) = alice.delete(&path);
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (tasks, total) = alice.list(&[]);
    assert_eq!((tasks.len(), total), (0, 0));
}

/// A missing task is 404 `{"detail": "Task not found"}` on every route.
fn missing_task_is_404_everywhere(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let path = format!("/api/me/tasks/{MISSING_ID}");
    assert_not_found(&alice.get(&path), "GET");
    assert_not_found(&alice.put(&path, &json!({"title": "x"})), "PUT");
    assert_not_found(&alice.patch(&path, &json!({"title": "x"})), "PATCH");
    assert_not_found(&alice.delete(&path), "DELETE");
    assert_not_found(&alice.toggle(&format!("{path}/complete")), "toggle");
}

/// `PATCH …/complete` toggles; twice returns to the original.
fn toggle_flips_completed(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "toggle me", "description": "stays"}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}/complete");

    let (status, _, once) = alice.toggle(&path);
    assert_eq!(status, StatusCode::OK, "{once}");
    assert_task_shape(&once);
    assert_eq!(once["completed"], json!(true));
    assert_eq!(once["title"], json!("toggle me"));
    assert_eq!(once["description"], json!("stays"));
    assert_eq!(alice.fetch(id)["completed"], json!(true));

    let (status, _, twice) = alice.toggle(&format!("/api/{}/tasks/{id}/complete", alice.id));
    assert_eq!(status, StatusCode::OK, "{twice}");
    assert_eq!(
        twice["completed"],
        json!(false),
        "two toggles return to the original"
    );
    assert_eq!(twice["title"], json!("toggle me"));
    assert_eq!(twice["description"], json!("stays"));
    assert_eq!(twice["created_at"], task["created_at"]);
    assert_eq!(alice.fetch(id), twice);

    // Starting from completed.
    let done = alice.create(json!({"title": "done", "completed": true}));
    let path = format!("/api/me/tasks/{}/complete", id_of(&done));
    assert_eq!(alice.toggle(&path).2["completed"], json!(false));
    assert_eq!(alice.toggle(&path).2["completed"], json!(true));
}

// ---------------------------------------------------------------------------------------------
// Ownership
// ---------------------------------------------------------------------------------------------

/// Two users cannot see, change or delete each other's tasks; another user's task is
/// indistinguishable from a missing one; another user's id in the path is 403.
fn users_cannot_touch_each_others_tasks(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let bob = Api::new(&srv, "bob@example.com");
    let a_task = alice.create(json!({"title": "alice's", "description": "private"}));
    let b_task = bob.create(json!({"title": "bob's"}));

    for (me, other, theirs) in [(&bob, &alice, &a_task), (&alice, &bob, &b_task)] {
        let theirs_id = id_of(theirs);
        let path = format!("/api/me/tasks/{theirs_id}");
        let missing = format!("/api/me/tasks/{MISSING_ID}");
        let body = json!({"title": "hijacked", "description": null, "completed": true});

        // Their task under my own id: exactly like a missing task.
        let pairs = [
            ("GET", me.get(&path), me.get(&missing)),
            ("PUT", me.put(&path, &body), me.put(&missing, &body)),
            ("PATCH", me.patch(&path, &body), me.patch(&missing, &body)),
            (
                "toggle",
                me.toggle(&format!("{path}/complete")),
                me.toggle(&format!("{missing}/complete")),
            ),
            ("DELETE", me.delete(&path), me.delete(&missing)),
        ];
        for (what, theirs_response, missing_response) in pairs {
            assert_not_found(&theirs_response, &format!("{what} another user's task"));
            assert_eq!(
                (theirs_response.0, &theirs_response.2),
                (missing_response.0, &missing_response.2),
                "{what}: another user's task must look exactly like a missing one"
            );
        }
        let (mine, total) = me.list(&[]);
        assert_eq!(total, 1, "only my own task is listed");
        assert!(!ids(&mine).contains(&theirs_id));

        // Their user id in the path: 403 on every route, whatever the task id.
        let base = format!("/api/{}/tasks", other.id);
        let with_id = format!("{base}/{theirs_id}");
        let missing_under_them = format!("{base}/{MISSING_ID}");
        assert_forbidden(&me.get(&base), "list another user's tasks");
        assert_forbidden(
            &me.get_query(&base, &[("status", "all"), ("limit", "10")]),
            "list another user's tasks with a query",
        );
        assert_forbidden(
            &me.post(&base, &json!({"title": "planted"})),
            "create for another user",
        );
        assert_forbidden(&me.get(&with_id), "GET under another user's id");
        assert_forbidden(
            &me.get(&missing_under_them),
            "GET missing under another user's id",
        );
        assert_forbidden(&me.put(&with_id, &body), "PUT under another user's id");
        assert_forbidden(&me.patch(&with_id, &body), "PATCH under another user's id");
        assert_forbidden(
            &me.toggle(&format!("{with_id}/complete")),
            "toggle under another user's id",
        );
        assert_forbidden(&me.delete(&with_id), "DELETE under another user's id");
        assert_forbidden(
            &me.get("/api/not-a-user/tasks"),
            "list under an unknown user id",
        );
    }

    // Nothing changed.
    assert_eq!(
        alice.fetch(id_of(&a_task)),
        a_task,
        "alice's task untouched"
    );
    assert_eq!(bob.fetch(id_of(&b_task)), b_task, "bob's task untouched");
    let (tasks, total) = alice.list(&[]);
    assert_eq!(
        (ids(&tasks), total),
        (vec![id_of(&a_task)], 1),
        "nothing planted for alice"
    );
    let (tasks, total) = bob.list(&[]);
    assert_eq!(
        (ids(&tasks), total),
        (vec![id_of(&b_task)], 1),
        "nothing planted for bob"
    );
}

/// A body can never set id, user_id, created_at or updated_at: extra keys are ignored or
/// rejected with 422, but the stored values are the server's.
fn body_cannot_set_server_fields(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let bob = Api::new(&srv, "bob@example.com");
    let forged = |title: &str| {
        json!({
            "title": title,
            "id": 4242,
            "user_id": bob.id,
            "created_at": "2000-01-01T00:00:00Z",
            "updated_at": "2000-01-01T00:00:00Z",
        })
    };
    let year_2000: DateTime<Utc> = "2000-01-02T00:00:00Z".parse().unwrap();

    let (status, _, created) = alice.post("/api/me/tasks", &forged("forged create"));
    match status {
        StatusCode::CREATED => {
            assert_task_shape(&created);
            assert_ne!(id_of(&created), 4242, "the body chose the id");
            assert_eq!(
                created["user_id"],
                json!(alice.id),
                "the body chose the owner"
            );
            assert!(
                time(&created["created_at"]) > year_2000,
                "the body chose created_at"
            );
            assert!(
                time(&created["updated_at"]) > year_2000,
                "the body chose updated_at"
            );
            assert_eq!(alice.fetch(id_of(&created)), created);
        }
        StatusCode::UNPROCESSABLE_ENTITY => {}
        other => panic!("POST with server fields: unexpected {other}: {created}"),
    }

    let task = alice.create(json!({"title": "honest"}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}");
    let writes: Vec<(&str, Write)> = vec![
        ("PUT", Box::new(|| alice.put(&path, &forged("forged put")))),
        (
            "PATCH",
            Box::new(|| alice.patch(&path, &forged("forged patch"))),
        ),
    ];
    for (what, write) in writes {
        let response = write();
        let (status, _, body) = &response;
        assert!(
            *status == StatusCode::OK || *status == StatusCode::UNPROCESSABLE_ENTITY,
            "{what} with server fields: unexpected {status}: {body}"
        );
        let stored = alice.fetch(id);
        assert_eq!(stored["id"], json!(id), "{what} changed the id");
        assert_eq!(
            stored["user_id"],
            json!(alice.id),
            "{what} changed the owner"
        );
        assert_eq!(
            stored["created_at"], task["created_at"],
            "{what} changed created_at"
        );
        assert!(
            time(&stored["updated_at"]) > year_2000,
            "{what} set updated_at"
        );
        if *status == StatusCode::OK {
            assert_eq!(*body, stored, "{what} response is the stored task");
        }
    }

    assert_not_found(
        &alice.get("/api/me/tasks/4242"),
        "no task got the forged id",
    );
    let (tasks, total) = bob.list(&[]);
    assert_eq!((tasks.len(), total), (0, 0), "nothing was given to bob");
}

/// The task routes require a token: 401 with `WWW-Authenticate: Bearer` without one, or with a
/// bad one; nothing is created or changed.
fn task_routes_require_a_token(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "mine"}));
    let id = id_of(&task);

    for user in ["me", alice.id.as_str()] {
        let base = format!("/api/{user}/tasks");
        let item = format!("{base}/{id}");
        let body = json!({"title": "anonymous"});
        let requests = || {
            vec![
                ("list", srv.get(&base)),
                ("create", srv.post(&base).json(&body)),
                ("get", srv.get(&item)),
                ("put", srv.put(&item).json(&body)),
                ("patch", srv.patch(&item).json(&body)),
                ("toggle", srv.patch(&format!("{item}/complete"))),
                ("delete", srv.delete(&item)),
            ]
        };
        let variants: [(&str, Option<&str>); 3] = [
            ("no token", None),
            ("garbage token", Some("Bearer not-a-jwt")),
            ("wrong scheme", Some("Basic YWxpY2U6cGFzc3dvcmQ=")),
        ];
        for (variant, header) in variants {
            for (what, request) in requests() {
                let request = match header {
                    Some(value) => request.header("Authorization", value),
                    None => request,
                };
                let (status, headers, body) = send(request);
                let what = format!("{what} {base} with {variant}");
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
                let challenge = headers
                    .get("www-authenticate")
                    .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
                    .to_str()
                    .unwrap();
                assert!(
                    challenge.starts_with("Bearer"),
                    "{what}: WWW-Authenticate {challenge:?}"
                );
                assert!(body["detail"].is_string(), "{what}: {body}");
            }
        }
    }

    assert_eq!(
        alice.fetch(id),
        task,
        "unauthenticated requests changed nothing"
    );
    let (_, total) = alice.list(&[]);
    assert_eq!(total, 1, "unauthenticated requests created nothing");
}

// ---------------------------------------------------------------------------------------------
// Validation and timestamps
// ---------------------------------------------------------------------------------------------

/// Titles are trimmed and 1..=200 characters (not bytes); descriptions at most 1000
/// characters; errors are FastAPI-shaped 422s with loc ["body", field].
fn title_and_description_are_validated(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");

    let task = alice.create(json!({"title": "  padded title \t"}));
    assert_eq!(task["title"], json!("padded title"), "title is trimmed");

    let e200 = "é".repeat(200);
    let task = alice.create(json!({"title": e200}));
    assert_eq!(
        task["title"],
        json!(e200),
        "200 two-byte characters are a valid title"
    );
    assert_eq!(alice.fetch(id_of(&task))["title"], json!(e200));
    let task = alice.create(json!({"title": format!("  {e200}  ")}));
    assert_eq!(
        task["title"],
        json!(e200),
        "the length is checked after trimming"
    );
    let task = alice.create(json!({"title": "a"}));
    assert_eq!(task["title"], json!("a"));

    let e201 = "é".repeat(201);
    let d1000 = "ü".repeat(1000);
    let d1001 = "ü".repeat(1001);
    let task = alice.create(json!({"title": "long description", "description": d1000}));
    assert_eq!(
        task["description"],
        json!(d1000),
        "1000 characters are a valid description"
    );

    let (_, before) = alice.list(&[]);
    let bad_creates = [
        (json!({"title": e201}), "title", "201-character title"),
        (
            json!({"title": "a".repeat(201)}),
            "title",
            "201-character ASCII title",
        ),
        (json!({"title": "   "}), "title", "blank title"),
        (json!({"title": ""}), "title", "empty title"),
        (json!({"description": "no title"}), "title", "missing title"),
        (json!({"title": null}), "title", "null title"),
        (json!({"title": 12}), "title", "numeric title"),
        (
            json!({"title": "ok", "description": d1001}),
            "description",
            "1001-character description",
        ),
    ];
    for (body, field, what) in &bad_creates {
        assert_422_at(
            &alice.post("/api/me/tasks", body),
            &["body", field],
            &format!("POST {what}"),
        );
    }
    let (_, after) = alice.list(&[]);
    assert_eq!(after, before, "rejected creates stored nothing");

    // The same rules on PUT and PATCH.
    let task = alice.create(json!({"title": "target", "description": "d"}));
    let path = format!("/api/me/tasks/{}", id_of(&task));
    for (body, field, what) in &bad_creates {
        assert_422_at(
            &alice.put(&path, body),
            &["body", field],
            &format!("PUT {what}"),
        );
    }
    let bad_patches = [
        (json!({"title": e201}), "title", "201-character title"),
        (json!({"title": "   "}), "title", "blank title"),
        (json!({"title": ""}), "title", "empty title"),
        (
            json!({"description": d1001}),
            "description",
            "1001-character description",
        ),
    ];
    for (body, field, what) in &bad_patches {
        assert_422_at(
            &alice.patch(&path, body),
            &["body", field],
            &format!("PATCH {what}"),
        );
    }
    assert_eq!(
        alice.fetch(id_of(&task)),
        task,
        "rejected writes changed nothing"
    );

    let (status, _, patched) = alice.patch(&path, &json!({"title": format!(" {e200} ")}));
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["title"], json!(e200));
    let (status, _, put) = alice.put(&path, &json!({"title": "  put  ", "description": d1000}));
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["title"], json!("put"));
    assert_eq!(put["description"], json!(d1000));
}

/// A task id that is not an integer is 422 with loc ["path", …] on every item route.
fn non_integer_task_id_is_422(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    alice.create(json!({"title": "exists"}));
    let body = json!({"title": "x"});
    for bad in ["abc", "1.5"] {
        let path = format!("/api/me/tasks/{bad}");
        assert_422_in(&alice.get(&path), "path", &format!("GET {path}"));
        assert_422_in(&alice.put(&path, &body), "path", &format!("PUT {path}"));
        assert_422_in(&alice.patch(&path, &body), "path", &format!("PATCH {path}"));
        assert_422_in(&alice.delete(&path), "path", &format!("DELETE {path}"));
        let toggle = format!("{path}/complete");
        assert_422_in(&alice.toggle(&toggle), "path", &format!("PATCH {toggle}"));
    }
    let (_, total) = alice.list(&[]);
    assert_eq!(total, 1);
}

/// `updated_at` moves on every write (PUT, PATCH, toggle); `created_at` never does.
fn updated_at_moves_on_every_write(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "clock"}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}");
    let created_at = task["created_at"].clone();
    assert!(time(&task["updated_at"]) >= time(&created_at), "{task}");
    let mut last = time(&task["updated_at"]);

    let writes: Vec<(&str, Write)> = vec![
        (
            "PUT",
            Box::new(|| alice.put(&path, &json!({"title": "clock 2"}))),
        ),
        (
            "PATCH title",
            Box::new(|| alice.patch(&path, &json!({"title": "clock 3"}))),
        ),
        (
            "PATCH description",
            Box::new(|| alice.patch(&path, &json!({"description": "d"}))),
        ),
        (
            "PATCH completed",
            Box::new(|| alice.patch(&path, &json!({"completed": true}))),
        ),
        (
            "toggle",
            Box::new(|| alice.toggle(&format!("{path}/complete"))),
        ),
        (
            "toggle again",
            Box::new(|| alice.toggle(&format!("{path}/complete"))),
        ),
    ];
    for (what, write) in writes {
        pause();
        let (status, _, body) = write();
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        let updated = time(&body["updated_at"]);
        assert!(
            updated > last,
            "{what}: updated_at {updated} did not move past {last}"
        );
        assert_eq!(body["created_at"], created_at, "{what} changed created_at");
        let stored = alice.fetch(id);
        assert_eq!(
            stored["updated_at"], body["updated_at"],
            "{what}: stored updated_at"
        );
        assert_eq!(stored["created_at"], created_at);
        last = updated;
    }
}

// ---------------------------------------------------------------------------------------------
// The list query
// ---------------------------------------------------------------------------------------------

/// Invalid or malformed query values are 422 with loc ["query", param]; the limits are inclusive.
fn list_query_is_validated(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    for i in 0..3 {
        alice.create(json!({"title": format!("t{i}"), "completed": i == 0}));
    }
    let bad = [
        ("limit", "0"),
        ("limit", "1001"),
        ("limit", "-1"),
        ("limit", "abc"),
        ("limit", "1.5"),
        ("offset", "-1"),
        ("offset", "abc"),
        ("status", "done"),
        ("sort", "x"),
        ("order", "up"),
    ];
    for (param, value) in bad {
        let response = alice.get_query("/api/me/tasks", &[(param, value)]);
        assert_422_at(&response, &["query", param], &format!("{param}={value}"));
    }

    // (param, value, tasks returned, X-Total-Count: after filters, before limit/offset)
    let good: [(&str, &str, usize, u64); 12] = [
        ("limit", "1", 1, 3),
        ("limit", "1000", 3, 3),
        ("offset", "0", 3, 3),
        ("offset", "2", 1, 3),
        ("offset", "3", 0, 3),
        ("offset", "500", 0, 3),
        ("status", "all", 3, 3),
        ("status", "pending", 2, 2),
        ("status", "completed", 1, 1),
        ("sort", "title", 3, 3),
        ("order", "asc", 3, 3),
        ("sort", "updated", 3, 3),
    ];
    for (param, value, expected, expected_total) in good {
        let (tasks, total) = alice.list(&[(param, value)]);
        assert_eq!(tasks.len(), expected, "{param}={value}");
        assert_eq!(total, expected_total, "X-Total-Count with {param}={value}");
    }
}

/// Creates `n` tasks with a few threads; returns them in index order.
fn create_many(api: &Api, n: usize, body: impl Fn(usize) -> Value + Sync) -> Vec<Value> {
    const THREADS: usize = 5;
    let body = &body;
    let mut created: Vec<(usize, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (t..n)
                        .step_by(THREADS)
                        .map(|i| (i, api.create(body(i))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("creator thread"))
            .collect()
    });
    created.sort_by_key(|(i, _)| *i);
    created.into_iter().map(|(_, task)| task).collect()
}

/// The contract's order: by the sort key, ties by id, both in the requested direction.
fn contract_order(a: &Value, b: &Value, sort: &str, order: &str) -> Ordering {
    let key = match sort {
        "created" => time(&a["created_at"]).cmp(&time(&b["created_at"])),
        "updated" => time(&a["updated_at"]).cmp(&time(&b["updated_at"])),
        "title" => a["title"]
            .as_str()
            .unwrap()
            .cmp(b["title"].as_str().unwrap()),
        _ => unreachable!(),
    };
    let ascending = key.then(id_of(a).cmp(&id_of(b)));
    if order == "asc" {
        ascending
    } else {
        ascending.reverse()
    }
}

/// 250 tasks with repeating titles: every sort and order gives the contract's order, and
/// walking it in pages of 40 never repeats or skips a task; status filters and defaults too.
fn pagination_walks_every_sort_without_gaps(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let bob = Api::new(&srv, "bob@example.com");
    bob.create(json!({"title": "title 3"}));
    const N: usize = 250;
    let created = create_many(&alice, N, |i| {
        json!({
            "title": format!("title {}", i % 10),
            "description": format!("task number {i}"),
            "completed": i % 3 == 0,
        })
    });
    let all_ids: HashSet<i64> = created.iter().map(id_of).collect();
    assert_eq!(all_ids.len(), N, "every create got its own id");

    // Make the updated order differ from the created order.
    for task in created.iter().rev().step_by(4) {
        let (status, _, body) = alice.patch(
            &format!("/api/me/tasks/{}", id_of(task)),
            &json!({"description": "edited"}),
        );
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let (everything, total) = alice.list(&[("limit", "1000")]);
    assert_eq!(total, N as u64);
    assert_eq!(everything.len(), N);
    assert_eq!(
        everything.iter().map(id_of).collect::<HashSet<_>>(),
        all_ids,
        "only alice's tasks"
    );

    for sort in ["created", "updated", "title"] {
        for order in ["asc", "desc"] {
            let mut expected = everything.clone();
            expected.sort_by(|a, b| contract_order(a, b, sort, order));
            let expected = ids(&expected);

            let (full, total) = alice.list(&[("sort", sort), ("order", order), ("limit", "1000")]);
            assert_eq!(total, N as u64);
            assert_eq!(
                ids(&full),
                expected,
                "sort={sort}&order={order}: not in the contract's order"
            );

            let mut walked = Vec::new();
            for page in 0..N.div_ceil(40) {
                let offset = (page * 40).to_string();
                let query = [
                    ("sort", sort),
                    ("order", order),
                    ("limit", "40"),
                    ("offset", &offset),
                ];
                let (tasks, total) = alice.list(&query);
                assert_eq!(
                    total, N as u64,
                    "X-Total-Count on page {page} of {sort} {order}"
                );
                assert_eq!(
                    tasks.len(),
                    40.min(N - page * 40),
                    "page {page} of {sort} {order}"
                );
                walked.extend(ids(&tasks));
            }
            assert_eq!(
                walked, expected,
                "pages of sort={sort}&order={order} repeat or skip tasks"
            );
            let offset = N.to_string();
            let (past_end, total) =
                alice.list(&[("sort", sort), ("order", order), ("offset", &offset)]);
            assert_eq!((past_end.len(), total), (0, N as u64));
        }
    }

    // Defaults: sort=created, order=desc, limit=100.
    let mut expected = everything.clone();
    expected.sort_by(|a, b| contract_order(a, b, "created", "desc"));
    let (default_page, total) = alice.list(&[]);
    assert_eq!(total, N as u64);
    assert_eq!(
        ids(&default_page),
        ids(&expected[..100]),
        "default list: created desc, first 100"
    );
    let (desc_by_default, _) = alice.list(&[("sort", "title"), ("limit", "1000")]);
    let mut by_title = everything.clone();
    by_title.sort_by(|a, b| contract_order(a, b, "title", "desc"));
    assert_eq!(
        ids(&desc_by_default),
        ids(&by_title),
        "order defaults to desc"
    );
    let (created_by_default, _) = alice.list(&[("order", "asc"), ("limit", "1000")]);
    let mut by_created = everything.clone();
    by_created.sort_by(|a, b| contract_order(a, b, "created", "asc"));
    assert_eq!(
        ids(&created_by_default),
        ids(&by_created),
        "sort defaults to created"
    );

    // Status filters, also paged.
    let completed: Vec<&Value> = everything
        .iter()
        .filter(|t| t["completed"] == json!(true))
        .collect();
    assert_eq!(completed.len(), N.div_ceil(3));
    for (status, want_completed) in [("completed", true), ("pending", false)] {
        let mut expected: Vec<Value> = everything
            .iter()
            .filter(|t| t["completed"] == json!(want_completed))
            .cloned()
            .collect();
        expected.sort_by(|a, b| contract_order(a, b, "title", "asc"));
        let expected = ids(&expected);
        let mut walked = Vec::new();
        for page in 0..expected.len().div_ceil(40) {
            let offset = (page * 40).to_string();
            let query = [
                ("status", status),
                ("sort", "title"),
                ("order", "asc"),
                ("limit", "40"),
                ("offset", &offset),
            ];
            let (tasks, total) = alice.list(&query);
            assert_eq!(
                total,
                expected.len() as u64,
                "X-Total-Count with status={status}"
            );
            assert!(
                tasks
                    .iter()
                    .all(|t| t["completed"] == json!(want_completed)),
                "status={status}"
            );
            walked.extend(ids(&tasks));
        }
        assert_eq!(
            walked, expected,
            "pages of status={status} repeat or skip tasks"
        );
    }
    let (_, total) = alice.list(&[("status", "all"), ("limit", "1")]);
    assert_eq!(total, N as u64);
}

/// `q` is a case-insensitive, Unicode-aware substring of title or description, where `%`, `_`
/// and `\` are literal characters.
fn search_is_literal_and_unicode_aware(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let bob = Api::new(&srv, "bob@example.com");
    bob.create(json!({"title": "100% done by bob", "description": "äpfel"}));

    let tasks = [
        ("100% done", None, false),
        ("1000 done", None, true),
        ("snake_case name", None, false),
        ("snakeXcase name", None, false),
        (r"C:\temp\file", None, false),
        ("C:tempfile", None, false),
        ("Äpfel kaufen", None, false),
        ("Obst", Some("frische äpfel vom Markt"), false),
        ("Café besuchen", None, false),
        ("ÉCOLE", None, false),
        ("ПРИВЕТ мир", None, false),
        ("ΟΔΟΣ", None, false),
        ("İstanbul gezisi", None, false),
        ("plain task", Some("Nothing Special"), true),
    ];
    for (title, description, completed) in tasks {
        alice.create(json!({"title": title, "description": description, "completed": completed}));
    }

    let search = |q: &str, extra: &[(&str, &str)]| -> Vec<String> {
        let mut query = vec![("q", q), ("limit", "1000")];
        query.extend_from_slice(extra);
        let (found, total) = alice.list(&query);
        assert_eq!(total, found.len() as u64, "X-Total-Count for q={q:?}");
        let mut titles: Vec<String> = found
            .iter()
            .map(|t| t["title"].as_str().unwrap().to_string())
            .collect();
        titles.sort();
        titles
    };
    let cases: &[(&str, &[&str])] = &[
        ("%", &["100% done"]),
        ("0%", &["100% done"]),
        ("%%", &[]),
        ("_", &["snake_case name"]),
        ("e_c", &["snake_case name"]),
        ("\\", &[r"C:\temp\file"]),
        ("\\t", &[r"C:\temp\file"]),
        ("DONE", &["100% done", "1000 done"]),
        ("Snake", &["snakeXcase name", "snake_case name"]),
        ("ä", &["Obst", "Äpfel kaufen"]),
        ("Ä", &["Obst", "Äpfel kaufen"]),
        ("ÄPFEL", &["Obst", "Äpfel kaufen"]),
        ("é", &["Café besuchen", "ÉCOLE"]),
        ("É", &["Café besuchen", "ÉCOLE"]),
        ("CAFÉ", &["Café besuchen"]),
        ("école", &["ÉCOLE"]),
        ("привет", &["ПРИВЕТ мир"]),
        ("МИР", &["ПРИВЕТ мир"]),
        // A title is found by itself, whatever the database's lower-casing rules make of it.
        ("ΟΔΟΣ", &["ΟΔΟΣ"]),
        ("İstanbul", &["İstanbul gezisi"]),
        ("nothing special", &["plain task"]),
        ("markt", &["Obst"]),
        ("zzz", &[]),
    ];
    for (q, expected) in cases {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(search(q, &[]), expected, "q={q:?}");
    }

    // Combined with the status filter and pagination.
    assert_eq!(
        search("done", &[("status", "completed")]),
        vec!["1000 done".to_string()]
    );
    assert_eq!(
        search("done", &[("status", "pending")]),
        vec!["100% done".to_string()]
    );
    let (page, total) = alice.list(&[
        ("q", "e"),
        ("sort", "title"),
        ("order", "asc"),
        ("limit", "2"),
    ]);
    assert_eq!(page.len(), 2);
    let all_e = search("e", &[]);
    assert_eq!(
        total,
        all_e.len() as u64,
        "X-Total-Count with q counts every match"
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// Two concurrent toggles always leave the task where it started (20 pairs): no lost update.
fn concurrent_toggles_are_atomic(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    let task = alice.create(json!({"title": "contended"}));
    let id = id_of(&task);
    let path = format!("/api/me/tasks/{id}/complete");

    for pair in 0..20 {
        let barrier = Barrier::new(2);
        let results: Vec<Resp> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        alice.toggle(&path)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("toggle thread"))
                .collect()
        });
        let mut seen = Vec::new();
        for (status, _, body) in &results {
            assert_eq!(
                *status,
                StatusCode::OK,
                "pair {pair}: {body}\nserver log:\n{}",
                srv.log()
            );
            seen.push(body["completed"].as_bool().expect("completed"));
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            vec![false, true],
            "pair {pair}: both toggles saw the same state (lost update)"
        );
        assert_eq!(
            alice.fetch(id)["completed"],
            json!(false),
            "pair {pair}: two concurrent toggles must return the task to where it started"
        );
    }
}

/// 50 concurrent creates by one user all land, with distinct ids.
fn concurrent_creates_all_land(backend: &Backend) {
    let srv = start(backend);
    let alice = Api::new(&srv, "alice@example.com");
    const N: usize = 50;
    let barrier = Barrier::new(N);
    let results: Vec<Resp> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let barrier = &barrier;
                let alice = &alice;
                scope.spawn(move || {
                    barrier.wait();
                    alice.post(
                        "/api/me/tasks",
                        &json!({"title": format!("concurrent {i}")}),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("create thread"))
            .collect()
    });
    let mut created = HashSet::new();
    for (status, _, body) in &results {
        assert_eq!(
            *status,
            StatusCode::CREATED,
            "{body}\nserver log:\n{}",
            srv.log()
        );
        assert!(created.insert(id_of(body)), "duplicate id {}", body["id"]);
    }
    assert_eq!(created.len(), N);

    let (tasks, total) = alice.list(&[("limit", "1000")]);
    assert_eq!(
        total, N as u64,
        "X-Total-Count after {N} concurrent creates"
    );
    assert_eq!(tasks.iter().map(id_of).collect::<HashSet<_>>(), created);
    let titles: HashSet<String> = tasks
        .iter()
        .map(|t| t["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        titles,
        (0..N)
            .map(|i| format!("concurrent {i}"))
            .collect::<HashSet<_>>()
    );
}

/// Read-your-writes under load: a read sent after a write was answered sees that write, while
/// other clients keep every worker busy reading (SQLite's readers share a read transaction
/// across the requests of one turn of a worker's event loop; it must never be one that began
/// before a write it should see).
fn reads_see_every_write_answered_before_them(backend: &Backend) {
    let srv = start(backend);
    let clients: Vec<Api> = (0..6)
        .map(|i| Api::new(&srv, &format!("writer{i}@example.com")))
        .collect();
    let reader = Api::new(&srv, "reader@example.com");
    reader.create(json!({"title": "read over and over"}));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    reader.list(&[]);
                }
            });
        }
        let writers: Vec<_> = (clients.iter())
            .map(|api| {
                scope.spawn(move || {
                    for round in 0..30 {
                        let task = api.create(json!({"title": format!("round {round}")}));
                        let id = id_of(&task);
                        assert_eq!(api.fetch(id)["title"], json!(format!("round {round}")));
                        let (_, total) = api.list(&[]);
                        assert_eq!(total, round + 1, "list after create {round}");
                        let (status, _, toggled) =
                            api.toggle(&format!("/api/me/tasks/{id}/complete"));
                        assert_eq!(status, StatusCode::OK, "{toggled}");
                        assert_eq!(
                            api.fetch(id)["completed"],
                            json!(true),
                            "after toggle {round}"
                        );
                        let (status, _, _) = api.delete(&format!("/api/me/tasks/{id}"));
                        assert_eq!(status, StatusCode::NO_CONTENT);
                        let (status, _, _) = api.get(&format!("/api/me/tasks/{id}"));
                        assert_eq!(status, StatusCode::NOT_FOUND, "after delete {round}");
                        api.create(json!({"title": format!("kept {round}")}));
                    }
                })
            })
            .collect();
        let outcome: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for writer in outcome {
            if let Err(panic) = writer {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

on_both_backends!(
    reads_see_every_write_answered_before_them,
    create_returns_201_with_location,
    put_replaces_the_whole_task,
    patch_updates_only_given_fields,
    delete_removes_the_task,
    missing_task_is_404_everywhere,
    toggle_flips_completed,
    users_cannot_touch_each_others_tasks,
    body_cannot_set_server_fields,
    task_routes_require_a_token,
    title_and_description_are_validated,
    non_integer_task_id_is_422,
    updated_at_moves_on_every_write,
    list_query_is_validated,
    pagination_walks_every_sort_without_gaps,
    search_is_literal_and_unicode_aware,
    concurrent_toggles_are_atomic,
    concurrent_creates_all_land,
);

/// Timestamps in a SQLite database written by something other than this server (a `sqlite3`
/// shell, an import, the Python original's SQLModel) are read in every form SQLite's date
/// functions and diesel write, not only in the one this server writes, and sent in the one
/// shape the contract has.
#[test]
fn sqlite_reads_timestamps_written_by_other_tools() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    let srv = start(&Backend::Sqlite);
    let alice = Api::new(&srv, "alice@example.com");
    let (status, _, task) = alice.post("/api/me/tasks", &json!({"title": "imported"}));
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let path = format!("/api/me/tasks/{}", id_of(&task));
    let db_path = srv.db.sqlite_path().unwrap();
    let mut db = diesel::SqliteConnection::establish(db_path.to_str().unwrap()).unwrap();
    for (stored, sent) in [
        ("2026-01-02 03:04:05.123456", "2026-01-02T03:04:05.123456Z"),
        ("2026-01-02 03:04:05.123", "2026-01-02T03:04:05.123000Z"),
        ("2026-01-02 03:04:05", "2026-01-02T03:04:05.000000Z"),
        ("2026-01-02 03:04:05.5", "2026-01-02T03:04:05.500000Z"),
        ("2026-01-02T03:04:05.25", "2026-01-02T03:04:05.250000Z"),
        ("2026-01-02T03:04:05Z", "2026-01-02T03:04:05.000000Z"),
        ("2026-01-02 03:04", "2026-01-02T03:04:00.000000Z"),
        ("1999-12-31 23:59:59.999999", "1999-12-31T23:59:59.999999Z"),
    ] {
        db.batch_execute(&format!(
            "UPDATE tasks SET created_at = '{stored}' WHERE title = 'imported'"
        ))
        .unwrap();
        let (status, _, read) = alice.get(&path);
        assert_eq!(status, StatusCode::OK, "stored as {stored:?}: {read}");
        assert_eq!(read["created_at"], json!(sent), "stored as {stored:?}");
        let (tasks, _) = alice.list(&[]);
        assert_eq!(
            tasks[0]["created_at"],
            json!(sent),
            "listed, stored as {stored:?}"
        );
    }
}

/// A write committed by another process (a second server on the same file, a `sqlite3` shell)
/// is seen by every read that starts after it, while the server's workers are kept busy
/// reading (their readers share read transactions across requests: never one that began
/// before such a write).
#[test]
fn sqlite_reads_see_writes_of_other_processes() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    let srv = start(&Backend::Sqlite);
    let alice = Api::new(&srv, "alice@example.com");
    let id = id_of(&alice.create(json!({"title": "v0"})));
    let db_path = srv.db.sqlite_path().unwrap();
    let mut db = diesel::SqliteConnection::establish(db_path.to_str().unwrap()).unwrap();
    db.batch_execute("PRAGMA busy_timeout = 5000").unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    alice.list(&[]);
                }
            });
        }
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for round in 1..=150 {
                let title = format!("v{round}");
                db.batch_execute(&format!(
                    "UPDATE tasks SET title = '{title}' WHERE id = {id}"
                ))
                .unwrap();
                assert_eq!(alice.fetch(id)["title"], json!(title), "round {round}");
            }
        }));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(panic) = checked {
            std::panic::resume_unwind(panic);
        }
    });
}
