//! Hardening: what an attacker tries from outside. Password guessing in parallel, across server
//! instances and restarts; guessing the current password with a stolen token; tokens that
//! outlive a password change or carry odd claims; requests racing an account's deletion;
//! clients that send slowly or never finish, or never read what they asked for.
mod common;
use common::*;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const TOO_MANY: &str = "Too many login attempts";

fn login_status(srv: &Server, email: &str, password: &str) -> StatusCode {
    send(
        srv.post("/api/auth/login")
            .json(&json!({"email": email, "password": password})),
    )
    .0
}

fn me_status(srv: &Server, token: &str) -> StatusCode {
    send(srv.get("/api/users/me").bearer_auth(token)).0
}

/// Runs `n` copies of `request` at the same moment (released together by a barrier) and counts
/// the statuses they get.
fn at_once(
    n: usize,
    request: impl Fn() -> StatusCode + Send + Sync + 'static,
) -> HashMap<u16, usize> {
    let request = Arc::new(request);
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (request, barrier) = (request.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                request().as_u16()
            })
        })
        .collect();
    let mut counts = HashMap::new();
    for handle in handles {
        *counts.entry(handle.join().unwrap()).or_default() += 1;
    }
    counts
}

fn assert_429(response: &(StatusCode, reqwest::header::HeaderMap, Value), context: &str) {
    let (status, headers, body) = response;
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS, "{context}: {body}");
    assert_eq!(body, &json!({"detail": TOO_MANY}), "{context}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{context}: Retry-After {retry}");
}

// ---------------------------------------------------------------------------------------------
// The login throttle
// ---------------------------------------------------------------------------------------------

/// 40 simultaneous wrong guesses for one email from one address: each takes its slot before
/// bcrypt runs, so exactly 10 are checked (401) and 30 are refused (429).
fn throttle_holds_under_a_concurrent_burst(backend: &Backend) {
    // A bcrypt slow enough that the guesses overlap, as they do at the default cost.
    let srv = Arc::new(server(backend).env("BCRYPT_COST", "8").start());
    srv.register("burst@example.com", PASSWORD);
    let target = srv.clone();
    let counts = at_once(40, move || {
        login_status(&target, "burst@example.com", "wrong guess")
    });
    assert_eq!(
        (counts.get(&401), counts.get(&429), counts.len()),
        (Some(&10), Some(&30), 2),
        "statuses of 40 simultaneous wrong guesses: {counts:?}"
    );
    assert_429(
        &send(
            srv.post("/api/auth/login")
                .json(&json!({"email": "burst@example.com", "password": PASSWORD})),
        ),
        "the right password after the burst",
    );
}

/// Two server processes on one database share the limit: 5 failures on each make the 11th
/// attempt a 429 on both, whichever instance it reaches.
fn throttle_is_shared_by_instances_on_one_database(backend: &Backend) {
    let first = start(backend);
    let second = server_on(first.db.clone()).start();
    first.register("shared@example.com", PASSWORD);
    for (i, srv) in [&first, &second].into_iter().cycle().take(10).enumerate() {
        assert_eq!(
            login_status(srv, "shared@example.com", "wrong guess"),
            StatusCode::UNAUTHORIZED,
            "failure {}",
            i + 1
        );
    }
    for (name, srv) in [("first", &first), ("second", &second)] {
        assert_429(
            &send(
                srv.post("/api/auth/login")
                    .json(&json!({"email": "shared@example.com", "password": PASSWORD})),
            ),
            &format!("right password on the {name} instance after 10 failures"),
        );
    }
}

/// A restart keeps the count: 10 failures, a new process on the same database, still 429.
fn throttle_survives_a_restart(backend: &Backend) {
    let before = start(backend);
    before.register("restart@example.com", PASSWORD);
    for _ in 0..10 {
        assert_eq!(
            login_status(&before, "restart@example.com", "wrong guess"),
            StatusCode::UNAUTHORIZED
        );
    }
    let db = before.db.clone();
    drop(before);
    let after = server_on(db).start();
    assert_429(
        &send(
            after
                .post("/token")
                .form(&[("username", "restart@example.com"), ("password", PASSWORD)]),
        ),
        "right password after a restart",
    );
}

// ---------------------------------------------------------------------------------------------
// Password changes
// ---------------------------------------------------------------------------------------------

/// Guessing `current_password` with a stolen token is throttled per user like logins: 10 wrong
/// guesses, then 429 even for the right one. Another user is not affected.
fn password_change_guesses_are_throttled(backend: &Backend) {
    let srv = start(backend);
    let (_, token) = srv.user("victim@example.com");
    let (_, other) = srv.user("bystander@example.com");
    let change = |token: &str, current: &str| {
        send(
            srv.put("/api/users/me/password")
                .bearer_auth(token)
                .json(&json!({"current_password": current, "new_password": "a new passphrase"})),
        )
    };
    for i in 0..10 {
        let (status, _, body) = change(&token, &format!("guess number {i}"));
        assert_eq!(status, StatusCode::BAD_REQUEST, "guess {}: {body}", i + 1);
    }
    assert_429(&change(&token, "guess number 10"), "11th guess");
    assert_429(
        &change(&token, PASSWORD),
        "the right password after 10 guesses",
    );
    assert_eq!(
        change(&other, PASSWORD).0,
        StatusCode::NO_CONTENT,
        "another user"
    );
}

/// A password change ends every token issued before it (issued by this server, or signed with
/// the shared secret, with or without `iat`); the client logs in again and its new token works
/// at once, even within the same second.
fn password_change_ends_older_tokens(backend: &Backend) {
    let srv = start(backend);
    let (user, issued) = srv.user("rotate@example.com");
    let id = user["id"].as_str().unwrap();
    let signed_with_iat =
        hs256_token(&json!({"sub": id, "iat": now_secs(), "exp": now_secs() + 600}));
    let signed_without_iat = hs256_token(&json!({"sub": id, "exp": now_secs() + 600}));
    for token in [&issued, &signed_with_iat, &signed_without_iat] {
        assert_eq!(me_status(&srv, token), StatusCode::OK, "before the change");
    }
    let (status, _, body) = send(
        srv.put("/api/users/me/password")
            .bearer_auth(&issued)
            .json(&json!({"current_password": PASSWORD, "new_password": "a new passphrase"})),
    );
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for (what, token) in [
        ("issued by /api/auth/login", &issued),
        ("shared-secret token with iat", &signed_with_iat),
        ("shared-secret token without iat", &signed_without_iat),
    ] {
        let (status, headers, body) = send(srv.get("/api/users/me").bearer_auth(token));
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer", "{what}");
    }
    let fresh = srv.login("rotate@example.com", "a new passphrase");
    assert_eq!(
        me_status(&srv, &fresh),
        StatusCode::OK,
        "token from the new password"
    );
    let form = send(srv.post("/token").form(&[
        ("username", "rotate@example.com"),
        ("password", "a new passphrase"),
    ]));
    let fresh_form = form.2["access_token"].as_str().unwrap();
    assert_eq!(
        me_status(&srv, fresh_form),
        StatusCode::OK,
        "token from /token"
    );
}

// ---------------------------------------------------------------------------------------------
// Token claims and headers (local tokens; tests/jwks.rs covers tokens from a JWK Set)
// ---------------------------------------------------------------------------------------------

fn local_token_rules(backend: &Backend) {
    let srv = start(backend);
    let (user, _) = srv.user("claims@example.com");
    let id = user["id"].as_str().unwrap();
    let now = now_secs();
    let token = |extra: Value| {
        let mut claims = json!({"sub": id, "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        hs256_token(&claims)
    };
    for (what, refused) in [
        ("nbf 5 minutes ahead", token(json!({"nbf": now + 300}))),
        ("nbf as a string", token(json!({"nbf": "0"}))),
        ("iat as a string", token(json!({"iat": "now"}))),
        (
            "sub with a newline",
            token(json!({"sub": format!("{id}\nX-Evil: 1")})),
        ),
        ("sub with NUL", token(json!({"sub": format!("{id}\u{0}")}))),
        (
            "sub of 256 characters",
            token(json!({"sub": "u".repeat(256)})),
        ),
    ] {
        let (status, headers, body) = send(srv.get("/api/users/me").bearer_auth(&refused));
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer", "{what}");
    }
    for (what, accepted) in [
        (
            "nbf 30 s ahead (inside the leeway)",
            token(json!({"nbf": now + 30})),
        ),
        ("nbf in the past", token(json!({"nbf": now - 10}))),
        ("fractional iat", token(json!({"iat": now as f64 - 0.5}))),
    ] {
        assert_eq!(me_status(&srv, &accepted), StatusCode::OK, "{what}");
    }
    // A token signed with the right secret is still refused when its header points at a key.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.jku = Some("http://127.0.0.1:9/keys".into());
    let with_jku = jsonwebtoken::encode(
        &header,
        &json!({"sub": id, "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        me_status(&srv, &with_jku),
        StatusCode::UNAUTHORIZED,
        "jku header"
    );
}

// ---------------------------------------------------------------------------------------------
// An account deleted while its own requests are in flight
// ---------------------------------------------------------------------------------------------

/// `DELETE /api/users/me` racing the same user's creates, profile and password changes: every
/// request gets an answer from the contract (201/200/204, or 401 once the user is gone; 404 for
/// a task that went with them; 400 for a password change that another one beat, as its
/// `current_password` is no longer the password), never a 500.
fn requests_racing_account_deletion_never_500(backend: &Backend) {
    let srv = Arc::new(start(backend));
    let mut seen: HashMap<u16, usize> = HashMap::new();
    for round in 0..6 {
        let email = format!("vanishing{round}@example.com");
        let (_, token) = srv.user(&email);
        let barrier = Arc::new(Barrier::new(25));
        let handles: Vec<_> =
            (0..25)
                .map(|i| {
                    let (srv, barrier, token) = (srv.clone(), barrier.clone(), token.clone());
                    thread::spawn(move || {
                        barrier.wait();
                        let request = match i {
                        0 => srv.delete("/api/users/me"),
                        1..=3 => srv.patch("/api/users/me").json(&json!({"name": "Still here"})),
                        4..=6 => srv.put("/api/users/me/password").json(
                            &json!({"current_password": PASSWORD, "new_password": "another one!"}),
                        ),
                        _ => srv.post("/api/me/tasks").json(&json!({"title": format!("t{i}")})),
                    };
                        let (status, _, body) = send(request.bearer_auth(&token));
                        (i, status, body)
                    })
                })
                .collect();
        for handle in handles {
            let (i, status, body) = handle.join().unwrap();
            let beaten = (4..=6).contains(&i)
                && status == StatusCode::BAD_REQUEST
                && body == json!({"detail": "Incorrect password"});
            assert!(
                [200, 201, 204, 401].contains(&status.as_u16()) || beaten,
                "round {round}, request {i}: {status} {body}"
            );
            *seen.entry(status.as_u16()).or_default() += 1;
        }
    }
    assert!(
        seen.contains_key(&401),
        "no request ever lost the race: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------------

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// Whether the server has hung up on `stream` (EOF or reset, after any answer it sent).
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue, // the 408 answer, then EOF
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// 1,500 clients trickle a request body a byte a second and 1,500 more trickle their headers;
/// meanwhile a healthy client keeps getting `/health` and its task list quickly, every slow
/// connection is cut off within its timeout, and none of them holds more than a few kB.
#[test]
fn slow_clients_cannot_starve_others() {
    const SLOW: usize = 1500;
    const BODY_TIMEOUT: u64 = 3;
    const HEAD_TIMEOUT: u64 = 5; // actix-web's client_request_timeout
    let srv = server(&Backend::Sqlite)
        .env("REQUEST_BODY_TIMEOUT", &BODY_TIMEOUT.to_string())
        .env("RUST_LOG", "info,actix_web::middleware::logger=warn")
        .start();
    let pid = srv.child.id();
    let (_, token) = srv.user("healthy@example.com");
    for i in 0..20 {
        let created = send(
            srv.post("/api/me/tasks")
                .bearer_auth(&token)
                .json(&json!({"title": format!("task {i}")})),
        );
        assert_eq!(created.0, StatusCode::CREATED);
    }
    for _ in 0..200 {
        send(srv.get("/api/me/tasks").bearer_auth(&token));
    }
    let baseline_kb = rss_kb(pid);

    let address = format!("127.0.0.1:{}", srv.port);
    let opened = Instant::now();
    let mut slow: Vec<(TcpStream, &[u8])> = Vec::new();
    for i in 0..2 * SLOW {
        let mut stream = TcpStream::connect(&address).expect("connect a slow client");
        let (start, trickle): (&[u8], &[u8]) = if i % 2 == 0 {
            (
                b"POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{",
                b" ",
            )
        } else {
            (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X")
        };
        stream.write_all(start).unwrap();
        slow.push((stream, trickle));
    }
    let all_open = opened.elapsed();

    // The healthy client, on its own thread, while the slow ones trickle.
    let healthy = {
        let (base, token) = (srv.base_url.clone(), token.clone());
        thread::spawn(move || {
            let client = Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut latencies = Vec::new();
            let until = Instant::now() + Duration::from_secs(HEAD_TIMEOUT + 1);
            while Instant::now() < until {
                for path in ["/health", "/api/me/tasks"] {
                    let started = Instant::now();
                    let response = client
                        .get(format!("{base}{path}"))
                        .bearer_auth(&token)
                        .send()
                        .unwrap_or_else(|e| panic!("healthy GET {path}: {e}"));
                    assert_eq!(response.status(), StatusCode::OK, "healthy GET {path}");
                    response.bytes().unwrap();
                    latencies.push(started.elapsed());
                }
                thread::sleep(Duration::from_millis(5));
            }
            latencies
        })
    };
    let mut peak_kb = rss_kb(pid);
    let deadline = opened + all_open + Duration::from_secs(HEAD_TIMEOUT + 2);
    while Instant::now() < deadline {
        for (stream, trickle) in slow.iter_mut() {
            let _ = stream.write(trickle); // fails once the server has hung up
        }
        peak_kb = peak_kb.max(rss_kb(pid));
        thread::sleep(Duration::from_secs(1));
    }
    let still_open = slow
        .iter_mut()
        .map(|(stream, _)| closed_by_server(stream))
        .filter(|closed| !closed)
        .count();
    assert_eq!(
        still_open,
        0,
        "slow connections still open {:?} after the last one started",
        Duration::from_secs(HEAD_TIMEOUT + 2)
    );

    let mut latencies = healthy.join().unwrap();
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    assert!(
        p99 < Duration::from_millis(100),
        "healthy client's p99 {p99:?} over {} requests (max {:?})",
        latencies.len(),
        latencies.last().unwrap()
    );

    drop(slow);
    thread::sleep(Duration::from_secs(2));
    let after_kb = rss_kb(pid);
    eprintln!(
        "slow clients: {} requests, p99 {p99:?}; RSS {baseline_kb} kB -> peak {peak_kb} kB -> {after_kb} kB",
        latencies.len()
    );
    // What the allocator keeps once they are gone is used again by the next burst (see
    // `stalled_readers_are_cut_off`); what is checked here is that each slow connection costs
    // little: its buffers, not a copy of anything it sends.
    let per_connection_kb = (peak_kb - baseline_kb) / (2 * SLOW as u64);
    assert!(
        per_connection_kb <= 32,
        "{per_connection_kb} kB per slow connection: {baseline_kb} kB before, {peak_kb} kB at the \
         peak, {after_kb} kB after"
    );
}

/// Creates `n` tasks of the largest size (every character a control character, which JSON
/// escapes as six bytes), from four threads at once.
fn create_big_tasks(srv: &Arc<Server>, token: &str, n: usize) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (srv, token) = (srv.clone(), token.to_string());
            thread::spawn(move || {
                let task =
                    json!({"title": "\u{1}".repeat(200), "description": "\u{1}".repeat(1000)});
                for _ in (t..n).step_by(4) {
                    let created = send(srv.post("/api/me/tasks").bearer_auth(&token).json(&task));
                    assert_eq!(created.0, StatusCode::CREATED, "{}", created.2);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
}

/// A client socket with a 4 KiB receive buffer (set before connecting, so the TCP window is
/// small from the start) that sends `request` and will never read the answer.
fn stalled_reader(port: u16, request: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    socket.connect(&address.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// Clients that ask for a big response (a 1000-task page, ~7 MB) and never read it: the server
/// drops each connection once its client has taken nothing for RESPONSE_TIMEOUT, and not
/// before; a healthy client is served meanwhile and afterwards (whole pages too); and the memory
/// those responses held is given back. (The server gives up on the connection without a word on
/// the wire, as TCP does on a timeout: what is checked is that its socket is gone.)
#[test]
fn stalled_readers_are_cut_off() {
    const STALLED: usize = 10;
    const TIMEOUT: Duration = Duration::from_secs(2);
    // The timeout runs from each handler's answer, and a debug build takes a quarter of a
    // second of CPU to render each page.
    const SLACK: Duration = Duration::from_secs(5);
    let srv = Arc::new(
        server(&Backend::Sqlite)
            .env("RESPONSE_TIMEOUT", &TIMEOUT.as_secs().to_string())
            .env("RUST_LOG", "info,actix_web::middleware::logger=warn")
            .start(),
    );
    let pid = srv.child.id();
    let (_, token) = srv.user("hoarder@example.com");
    create_big_tasks(&srv, &token, 1000);
    let page = "/api/me/tasks?limit=1000";
    let whole_page = |what: &str| {
        let response = (srv.client.get(srv.url(page)).header("Connection", "close"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{what}");
        let length = response.bytes().unwrap().len();
        assert!(length > 7_000_000, "{what}: a page of {length} bytes");
    };
    whole_page("a page read at once, before");
    thread::sleep(Duration::from_millis(2500)); // the allocator hands back what was freed
    let baseline_kb = rss_kb(pid);
    let baseline_sockets = open_sockets(pid);

    let request =
        format!("GET {page} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    // (A new connection each time: a pooled one may meet the server's keep-alive timeout.)
    let healthy = Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Two rounds: the second must reuse the memory the first one's responses gave back.
    let mut peaks_kb = Vec::new();
    for round in 1..=2 {
        let sent = Instant::now();
        let stalled: Vec<TcpStream> = (0..STALLED)
            .map(|_| stalled_reader(srv.port, &request))
            .collect();
        // Meanwhile a healthy client keeps being answered, and the stalled connections stay
        // open until the timeout (the server holds their responses), then close.
        let (mut peak_kb, mut closed_after) = (baseline_kb, None);
        while closed_after.is_none() && sent.elapsed() < TIMEOUT + SLACK {
            let me = healthy.get(srv.url("/api/users/me")).bearer_auth(&token);
            let (status, _, body) = send(me);
            let elapsed = sent.elapsed();
            assert_eq!(
                status,
                StatusCode::OK,
                "healthy client, {elapsed:?} in: {body}"
            );
            peak_kb = peak_kb.max(rss_kb(pid));
            if open_sockets(pid) <= baseline_sockets {
                closed_after = Some(sent.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let closed_after = closed_after.unwrap_or_else(|| {
            panic!(
                "round {round}: {} of {STALLED} stalled connections still open {:?} after \
                 their requests (RESPONSE_TIMEOUT {TIMEOUT:?})",
                open_sockets(pid).saturating_sub(baseline_sockets),
                sent.elapsed(),
            )
        });
        assert!(
            closed_after >= TIMEOUT,
            "round {round}: closed after {closed_after:?}, before the timeout"
        );
        drop(stalled);
        whole_page("a page read at once, after");
        eprintln!(
            "round {round}: {STALLED} stalled readers closed after {closed_after:?}; \
             RSS {baseline_kb} kB -> peak {peak_kb} kB"
        );
        peaks_kb.push(peak_kb);
    }
    // The first round's responses took ~100 MB; what the allocator keeps of it afterwards
    // (varying from run to run) is used again by the second round rather than added to.
    let first_round_kb = peaks_kb[0] - baseline_kb;
    assert!(
        peaks_kb[1] <= peaks_kb[0] + first_round_kb / 4,
        "memory grew round after round: {baseline_kb} kB before, peaks {peaks_kb:?} kB"
    );
}

/// The server accepts no more than MAX_CONNECTIONS connections at once (the rest wait in the
/// listen queue), and raises its open-files soft limit to the hard limit at startup.
#[test]
fn connections_are_capped_and_the_open_files_limit_raised() {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let srv = server(&Backend::Sqlite)
        .env("MAX_CONNECTIONS", "64")
        .start_with(|cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    rlimit::setrlimit(rlimit::Resource::NOFILE, soft.min(1024), hard)
                });
            }
        });
    let pid = srv.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit raised to the hard one: {limits}"
    );
    assert_eq!(open_files[4], hard.to_string());

    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(("127.0.0.1", srv.port)).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(500));
    let sockets = open_sockets(pid);
    assert!(
        sockets <= 64 + 8,
        "{sockets} sockets open with MAX_CONNECTIONS=64 and 200 idle clients"
    );
    drop(idle);
    let started = Instant::now();
    assert_eq!(send(srv.get("/health")).0, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "health after the idle clients left"
    );
}

/// Each thread of `pid` with its name and its nice value (from /proc/PID/task/TID/stat).
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // `pid (comm) state …`: the comm may hold spaces, so split after its closing paren.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            // Fields after the comm start at field 3; nice is field 19.
            let nice = rest.split_whitespace().nth(19 - 3)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

/// A flood of logins must not starve the requests that only read: bcrypt runs on threads of its
/// own at a lower CPU priority (nice 10) than the threads that serve requests and run SQLite's
/// statements (nice 0), which stay at nice 0 after a hash.
#[test]
fn password_hashing_runs_below_request_priority() {
    // Cost 12: most of a second a hash in a debug build, long enough to catch its thread.
    let srv = Arc::new(server(&Backend::Sqlite).env("BCRYPT_COST", "12").start());
    srv.register("nice@example.com", "correct horse battery");
    let pid = srv.child.id();
    let login = {
        let srv = srv.clone();
        thread::spawn(move || login_status(&srv, "nice@example.com", "correct horse battery"))
    };
    let started = Instant::now();
    let mut hashing = Vec::new();
    while hashing.is_empty() && started.elapsed() < Duration::from_secs(10) {
        let threads = thread_priorities(pid);
        hashing = threads
            .into_iter()
            .filter(|(name, _)| name == "bcrypt")
            .collect();
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !hashing.is_empty(),
        "no bcrypt thread seen while a login ran"
    );
    assert!(
        hashing.iter().all(|(_, nice)| *nice == 10),
        "bcrypt runs at nice 10: {hashing:?}"
    );
    assert_eq!(login.join().unwrap(), StatusCode::OK);
    // Every other thread, the blocking pool's that ran SQLite's statements included, stays at 0.
    let threads = thread_priorities(pid);
    let others: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name != "bcrypt")
        .collect();
    assert!(
        others.iter().all(|(_, nice)| *nice == 0) && others.len() >= 3,
        "the other threads stay at nice 0: {threads:?}"
    );
}

on_both_backends!(
    throttle_holds_under_a_concurrent_burst,
    throttle_is_shared_by_instances_on_one_database,
    throttle_survives_a_restart,
    password_change_guesses_are_throttled,
    password_change_ends_older_tokens,
    local_token_rules,
    requests_racing_account_deletion_never_500,
);
