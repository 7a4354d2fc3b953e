//! Issue 6: tokens from Better Auth and other external issuers (`JWT_JWKS_URL`; EdDSA, ES256,
//! RS256/PS256 keys chosen by `kid`).
//!
//! Every key is generated inside the test run, and the JWK Set is served by a tiny HTTP server
//! of the test's own on a loopback port, so the tests can rotate keys, serve garbage, go down,
//! hang, and count how often the API server fetches the set.
mod common;
use common::*;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Better Auth's base URL, which it puts in both `iss` and `aud`.
const ISSUER: &str = "http://localhost:3000";
/// Every request to the API server must be answered within this (never a hang).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for the server to pick up a key set that changed (a refetch is
/// rate-limited to "once every few seconds", so this is a wide margin, not a performance bound).
const PICKUP_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("system RNG");
    bytes
}

fn random_hex(len: usize) -> String {
    let bytes: [u8; 16] = random_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len.min(hex.len())].to_string()
}

/// PEM armour around DER, as `openssl` writes it.
fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A signing key of the issuer, with its public JWK.
#[derive(Clone)]
struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key as SubjectPublicKeyInfo DER.
    spki_der: Vec<u8>,
    /// The raw public key bytes: Ed25519 `x`, the uncompressed EC point, or the RSA modulus.
    raw_public: Vec<u8>,
    /// The RSA public key as PKCS#1 DER (RSA only).
    pkcs1_public_der: Option<Vec<u8>>,
}

impl Key {
    /// The same key published without the optional `alg` and `use` members.
    fn bare(mut self) -> Self {
        let object = self.jwk.as_object_mut().unwrap();
        object.remove("alg");
        object.remove("use");
        self
    }

    fn header(&self) -> Header {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header
    }

    fn sign(&self, claims: &Value) -> String {
        sign(&self.header(), claims, &self.encoding)
    }

    /// Signs with another algorithm of the same family (e.g. PS256 with an RSA key).
    fn sign_as(&self, alg: Algorithm, claims: &Value) -> String {
        let mut header = self.header();
        header.alg = alg;
        sign(&header, claims, &self.encoding)
    }

    /// Signs with this key but names another key's `kid` in the header.
    fn sign_claiming_kid(&self, kid: &str, claims: &Value) -> String {
        let mut header = self.header();
        header.kid = Some(kid.to_string());
        sign(&header, claims, &self.encoding)
    }
}

fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).expect("sign token")
}

/// HS256/384/512 token signed with `secret` as the HMAC key.
fn hmac_token(alg: Algorithm, kid: Option<&str>, secret: &[u8], claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    sign(
        &header,
        claims,
        &EncodingKey::from_secret(secret).expect("hmac key"),
    )
}

/// A token assembled by hand: any header, any signature bytes.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(signature)
    )
}

fn ed_key(kid: &str) -> Key {
    let seed: [u8; 32] = random_bytes();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    // PKCS#8 v1 OneAsymmetricKey for Ed25519 (RFC 8410): fixed prefix + 32-byte seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(&public);
    Key {
        kid: kid.to_string(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(&pkcs8),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(&public), "kid": kid,
                    "alg": "EdDSA", "use": "sig"}),
        spki_der: spki,
        raw_public: public.to_vec(),
        pkcs1_public_der: None,
    }
}

fn ec_key(kid: &str) -> Key {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let secret = loop {
        if let Ok(secret) = p256::SecretKey::from_slice(&random_bytes::<32>()) {
            break secret;
        }
    };
    let pkcs8 = secret.to_pkcs8_der().expect("P-256 PKCS#8");
    let spki = secret.public_key().to_public_key_der().expect("P-256 SPKI");
    let spki = spki.as_bytes().to_vec();
    // The SPKI ends with the uncompressed point 0x04 || x || y.
    let point = spki[spki.len() - 65..].to_vec();
    assert_eq!(point[0], 0x04);
    Key {
        kid: kid.to_string(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_bytes()),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": b64url(&point[1..33]),
                    "y": b64url(&point[33..65]), "kid": kid, "alg": "ES256", "use": "sig"}),
        spki_der: spki,
        raw_public: point,
        pkcs1_public_der: None,
    }
}

/// One 2048-bit RSA key per test process: generating it is the slow part.
fn rsa_private() -> &'static rsa::PrivateKey {
    static KEY: OnceLock<rsa::PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).expect("RSA keygen"))
}

fn rsa_key(kid: &str) -> Key {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
    use rsa::pkcs8::EncodePublicKey;
    use rsa::traits::PublicKeyParts;
    let private = rsa_private();
    let pkcs1 = private.to_pkcs1_der().expect("RSA PKCS#1");
    let public = private.to_public_key();
    let spki = public
        .to_public_key_der()
        .expect("RSA SPKI")
        .as_bytes()
        .to_vec();
    let pkcs1_public = public
        .to_pkcs1_der()
        .expect("RSA public PKCS#1")
        .as_bytes()
        .to_vec();
    let n = public.n_bytes().to_vec();
    let e = public.e_bytes().to_vec();
    Key {
        kid: kid.to_string(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(pkcs1.as_bytes()),
        jwk: json!({"kty": "RSA", "n": b64url(&n), "e": b64url(&e), "kid": kid,
                    "alg": "RS256", "use": "sig"}),
        spki_der: spki,
        raw_public: n,
        pkcs1_public_der: Some(pkcs1_public),
    }
}

fn jwk_set(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Claims like Better Auth's: sub, email, name, iat, exp (15 min), iss and aud = its base URL.
/// A random `jti` makes every token distinct even within one second.
fn claims(sub: &str, email: &str, name: &str) -> Value {
    let now = now_secs();
    json!({"sub": sub, "email": email, "name": name, "iat": now, "exp": now + 900,
           "iss": ISSUER, "aud": ISSUER, "jti": random_hex(16)})
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

// ---------------------------------------------------------------------------------------------
// The test's own JWKS server
// ---------------------------------------------------------------------------------------------

/// What the JWKS server answers: an HTTP status and a body, or (status 0) nothing at all.
type Reply = Arc<Mutex<(u16, String)>>;

struct JwksServer {
    port: u16,
    hits: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
    reply: Reply,
}

impl JwksServer {
    fn start(status: u16, body: &str) -> JwksServer {
        Self::start_on(
            TcpListener::bind("127.0.0.1:0").expect("bind JWKS server"),
            status,
            body,
        )
    }

    fn serving(keys: &[&Key]) -> JwksServer {
        Self::start(200, &jwk_set(keys))
    }

    fn start_on(listener: TcpListener, status: u16, body: &str) -> JwksServer {
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let reply: Reply = Arc::new(Mutex::new((status, body.to_string())));
        let (h, p, r) = (hits.clone(), paths.clone(), reply.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (h, p, r) = (h.clone(), p.clone(), r.clone());
                std::thread::spawn(move || handle_jwks_request(stream, &h, &p, &r));
            }
        });
        JwksServer {
            port,
            hits,
            paths,
            reply,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/auth/jwks", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, status: u16, body: &str) {
        *self.reply.lock().unwrap() = (status, body.to_string());
    }

    fn set_keys(&self, keys: &[&Key]) {
        self.set(200, &jwk_set(keys));
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

fn handle_jwks_request(
    stream: TcpStream,
    hits: &AtomicUsize,
    paths: &Mutex<Vec<String>>,
    reply: &Reply,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // a connection that sent nothing is not a fetch
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    paths.lock().unwrap().push(path);
    let (status, body) = reply.lock().unwrap().clone();
    let mut stream = stream;
    if status == 0 {
        // Never answer: hold the connection open until the client gives up.
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port_listener_address() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Talking to the API server
// ---------------------------------------------------------------------------------------------

fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    })
}

/// A client for the one test that tolerates a slower answer (a JWKS server that never answers).
fn slow_client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap()
    })
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

fn call(srv: &Server, request: reqwest::blocking::RequestBuilder, what: &str) -> Answer {
    let started = Instant::now();
    let response = request.send().unwrap_or_else(|e| {
        let log = srv.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{what}: no answer after {:?} (a hang, the client timeout, or a dead server): {e}\n\
             last lines of the server log:\n{}",
            started.elapsed(),
            tail.join("\n")
        )
    });
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

fn me(srv: &Server, token: &str) -> Answer {
    call(
        srv,
        client().get(srv.url("/api/users/me")).bearer_auth(token),
        "GET /api/users/me",
    )
}

fn get(srv: &Server, path: &str, token: &str) -> Answer {
    call(
        srv,
        client().get(srv.url(path)).bearer_auth(token),
        &format!("GET {path}"),
    )
}

fn post_json(srv: &Server, path: &str, token: &str, body: &Value) -> Answer {
    call(
        srv,
        client().post(srv.url(path)).bearer_auth(token).json(body),
        &format!("POST {path}"),
    )
}

fn delete(srv: &Server, path: &str, token: &str) -> Answer {
    call(
        srv,
        client().delete(srv.url(path)).bearer_auth(token),
        &format!("DELETE {path}"),
    )
}

fn assert_401(reply: &Answer, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "{what}: expected 401, got {} {}",
        reply.status,
        reply.body
    );
    assert!(
        reply.body["detail"].is_string(),
        "{what}: 401 body must be {{\"detail\": ...}}: {}",
        reply.body
    );
    let challenge = reply
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        challenge.to_ascii_lowercase().starts_with("bearer"),
        "{what}: 401 must carry WWW-Authenticate: Bearer, got {challenge:?}"
    );
}

/// Sends every token to GET /api/users/me and fails, listing them all, unless each one got a
/// 401 with `{"detail": ...}` and `WWW-Authenticate: Bearer`.
fn assert_all_401(srv: &Server, cases: &[(String, String)]) {
    let mut failures = Vec::new();
    for (what, token) in cases {
        let reply = me(srv, token);
        let challenge = reply
            .headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if reply.status != StatusCode::UNAUTHORIZED
            || !reply.body["detail"].is_string()
            || !challenge.starts_with("bearer")
        {
            failures.push(format!(
                "{what}: {} {} (WWW-Authenticate {challenge:?})",
                reply.status, reply.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} tokens were not a 401 with WWW-Authenticate: Bearer:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

fn assert_me(reply: &Answer, sub: &str, email: &str, name: &str, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{what}: expected 200, got {} {}",
        reply.status,
        reply.body
    );
    assert_eq!(
        reply.body["id"],
        json!(sub),
        "{what}: id must be the token's sub: {}",
        reply.body
    );
    assert_eq!(
        reply.body["email"],
        json!(email),
        "{what}: email: {}",
        reply.body
    );
    assert_eq!(
        reply.body["name"],
        json!(name),
        "{what}: name: {}",
        reply.body
    );
    assert!(reply.body.get("password_hash").is_none() && reply.body.get("password").is_none());
}

/// Polls GET /api/users/me until it answers 200; every answer before that must be a 401.
fn wait_for_200(srv: &Server, token: &str, what: &str) -> Answer {
    let started = Instant::now();
    loop {
        let reply = me(srv, token);
        if reply.status == StatusCode::OK {
            return reply;
        }
        assert_401(
            &reply,
            &format!("{what} (while waiting for the key to be picked up)"),
        );
        assert!(
            started.elapsed() < PICKUP_LIMIT,
            "{what}: still {} after {PICKUP_LIMIT:?}: the server never picked up the new key set",
            reply.status
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The WARN and ERROR lines of the server's log, for failure messages.
fn warnings(srv: &Server) -> String {
    srv.log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn start_with_jwks(backend: &Backend, jwks_url: &str) -> Server {
    server(backend).env("JWT_JWKS_URL", jwks_url).start()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Tokens signed by an Ed25519 (EdDSA), a P-256 (ES256) and an RSA (RS256) key of the set are
/// accepted, with and without the optional `alg`/`use` members in the JWK; the user is created
/// from the claims; local HS256 tokens keep working next to them.
fn accepts_eddsa_es256_rs256_tokens(backend: &Backend) {
    let ed = ed_key("ed-1");
    let ec = ec_key("ec-1");
    let rs = rsa_key("rsa-1");
    let ed_bare = ed_key("ed-bare").bare();
    let ec_bare = ec_key("ec-bare").bare();
    let jwks = JwksServer::serving(&[&ed, &ec, &rs, &ed_bare, &ec_bare]);
    let srv = start_with_jwks(backend, &jwks.url());

    for (key, sub, email, expected_email, name) in [
        (
            &ed,
            "ba_user_123",
            "Alice@Example.com",
            "alice@example.com",
            "Alice",
        ),
        (
            &ec,
            "ba_ec_user",
            "Carol@Example.com",
            "carol@example.com",
            "Carol",
        ),
        (
            &rs,
            "ba_rsa_user",
            "dave@example.com",
            "dave@example.com",
            "Dave",
        ),
        (
            &ed_bare,
            "ba_ed_bare",
            "Erin@example.COM",
            "erin@example.com",
            "Erin",
        ),
        (
            &ec_bare,
            "ba_ec_bare",
            "frank@example.com",
            "frank@example.com",
            "Frank",
        ),
    ] {
        let what = format!("{:?} token, kid {}", key.alg, key.kid);
        let first = me(&srv, &key.sign(&claims(sub, email, name)));
        assert_me(&first, sub, expected_email, name, &what);
        // A later token finds the same user.
        let again = me(&srv, &key.sign(&claims(sub, email, name)));
        assert_me(
            &again,
            sub,
            expected_email,
            name,
            &format!("{what}, second token"),
        );
        assert_eq!(
            again.body["created_at"], first.body["created_at"],
            "{what}: a second user was created"
        );
        // Tasks work for the external user, by id and by `me`.
        let token = key.sign(&claims(sub, email, name));
        let created = post_json(
            &srv,
            &format!("/api/{sub}/tasks"),
            &token,
            &json!({"title": "from the issuer"}),
        );
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{what}: create task: {}",
            created.body
        );
        assert_eq!(created.body["user_id"], json!(sub));
        let listed = get(&srv, "/api/me/tasks", &token);
        assert_eq!(
            listed.status,
            StatusCode::OK,
            "{what}: list tasks: {}",
            listed.body
        );
        assert_eq!(
            listed.body.as_array().map(Vec::len),
            Some(1),
            "{what}: {}",
            listed.body
        );
    }

    // Local accounts and HS256 tokens are unaffected.
    let (user, token) = srv.user("local@example.com");
    let local = me(&srv, &token);
    assert_eq!(
        local.status,
        StatusCode::OK,
        "local token next to JWKS: {}",
        local.body
    );
    assert_eq!(local.body["id"], user["id"]);

    assert!(jwks.hits() >= 1, "the server never fetched the JWK Set");
    assert!(
        jwks.paths().iter().all(|p| p == "/api/auth/jwks"),
        "fetched paths other than the configured one: {:?}",
        jwks.paths()
    );
}

/// "RSA keys → RS256 or PS256": an RSA JWK without `alg` verifies both paddings.
fn rsa_key_without_alg_accepts_rs256_and_ps256(backend: &Backend) {
    let rs = rsa_key("rsa-bare").bare();
    let jwks = JwksServer::serving(&[&rs]);
    let srv = start_with_jwks(backend, &jwks.url());
    let rs256 = me(
        &srv,
        &rs.sign(&claims("ba_rs256", "rs256@example.com", "R")),
    );
    assert_me(
        &rs256,
        "ba_rs256",
        "rs256@example.com",
        "R",
        "RS256 with an RSA JWK without alg",
    );
    let ps256 = me(
        &srv,
        &rs.sign_as(
            Algorithm::PS256,
            &claims("ba_ps256", "ps256@example.com", "P"),
        ),
    );
    assert_me(
        &ps256,
        "ba_ps256",
        "ps256@example.com",
        "P",
        "PS256 with an RSA JWK without alg",
    );
}

/// A JWK that names its algorithm is used with that algorithm only.
fn jwk_alg_is_enforced(backend: &Backend) {
    let rs = rsa_key("rsa-rs256"); // "alg": "RS256"
    let jwks = JwksServer::serving(&[&rs]);
    let srv = start_with_jwks(backend, &jwks.url());
    let c = claims("ba_alg_user", "alg@example.com", "A");
    assert_me(
        &me(&srv, &rs.sign(&c)),
        "ba_alg_user",
        "alg@example.com",
        "A",
        "RS256 with its RS256 key",
    );
    for alg in [
        Algorithm::PS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS512,
    ] {
        let reply = me(&srv, &rs.sign_as(alg, &c));
        assert_401(
            &reply,
            &format!("{alg:?} token for a JWK whose alg is RS256"),
        );
    }
}

/// A new key (new kid) that appears in the set after startup is accepted without a restart.
fn rotation_is_picked_up_without_restart(backend: &Backend) {
    let a = ed_key("key-a");
    let b = ed_key("key-b");
    let c = ec_key("key-c");
    let jwks = JwksServer::serving(&[&a]);
    let srv = start_with_jwks(backend, &jwks.url());

    assert_me(
        &me(&srv, &a.sign(&claims("ba_a", "a@example.com", "A"))),
        "ba_a",
        "a@example.com",
        "A",
        "key A",
    );
    // Key B is not published yet.
    assert_401(
        &me(&srv, &b.sign(&claims("ba_b", "b@example.com", "B"))),
        "kid not in the set yet",
    );

    jwks.set_keys(&[&a, &b]);
    let reply = wait_for_200(
        &srv,
        &b.sign(&claims("ba_b", "b@example.com", "B")),
        "key B after rotation",
    );
    assert_me(&reply, "ba_b", "b@example.com", "B", "key B after rotation");
    assert_me(
        &me(&srv, &a.sign(&claims("ba_a", "a@example.com", "A"))),
        "ba_a",
        "a@example.com",
        "A",
        "key A after rotation",
    );

    // A second rotation, to another key type.
    jwks.set_keys(&[&a, &b, &c]);
    let reply = wait_for_200(
        &srv,
        &c.sign(&claims("ba_c", "c@example.com", "C")),
        "key C after second rotation",
    );
    assert_me(
        &reply,
        "ba_c",
        "c@example.com",
        "C",
        "key C after second rotation",
    );
}

/// Never take the algorithm from the token: algorithm confusion, alg=none, mismatched
/// header/key, unsupported algorithms, bad signatures, foreign keys, jku/x5u/jwk headers.
fn rejects_algorithm_confusion_and_foreign_keys(backend: &Backend) {
    let ed = ed_key("ed-1");
    let ec = ec_key("ec-1");
    let rs = rsa_key("rsa-1");
    let jwks = JwksServer::serving(&[&ed, &ec, &rs]);
    // The attacker's own JWKS server, publishing the attacker's key.
    let evil = ed_key("attacker-1");
    let evil_jwks = JwksServer::serving(&[&evil]);
    let srv = start_with_jwks(backend, &jwks.url());

    // The victim exists (created by a genuine token), so any accepted forgery would be a 200.
    let victim = "ba_victim";
    let c = || claims(victim, "victim@example.com", "Victim");
    assert_me(
        &me(&srv, &ed.sign(&c())),
        victim,
        "victim@example.com",
        "Victim",
        "genuine token",
    );

    let mut cases: Vec<(String, String)> = Vec::new();
    let mut add = |what: &str, token: String| cases.push((what.to_string(), token));

    // HS256 signed with public key material as the HMAC secret.
    let rsa_spki_pem = pem("PUBLIC KEY", &rs.spki_der);
    let rsa_pkcs1_der = rs.pkcs1_public_der.clone().unwrap();
    let rsa_pkcs1_pem = pem("RSA PUBLIC KEY", &rsa_pkcs1_der);
    let rsa_jwk_text = rs.jwk.to_string();
    let secrets: Vec<(&str, &Key, Vec<u8>)> = vec![
        ("RSA SPKI PEM", &rs, rsa_spki_pem.clone().into_bytes()),
        (
            "RSA SPKI PEM without final newline",
            &rs,
            rsa_spki_pem.trim_end().as_bytes().to_vec(),
        ),
        ("RSA PKCS#1 PEM", &rs, rsa_pkcs1_pem.into_bytes()),
        ("RSA SPKI DER", &rs, rs.spki_der.clone()),
        ("RSA PKCS#1 DER", &rs, rsa_pkcs1_der),
        ("RSA modulus bytes", &rs, rs.raw_public.clone()),
        (
            "RSA n (base64url text)",
            &rs,
            rs.jwk["n"].as_str().unwrap().as_bytes().to_vec(),
        ),
        ("RSA JWK JSON text", &rs, rsa_jwk_text.into_bytes()),
        ("Ed25519 x bytes", &ed, ed.raw_public.clone()),
        (
            "Ed25519 x (base64url text)",
            &ed,
            ed.jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ),
        (
            "Ed25519 SPKI PEM",
            &ed,
            pem("PUBLIC KEY", &ed.spki_der).into_bytes(),
        ),
        ("Ed25519 SPKI DER", &ed, ed.spki_der.clone()),
        ("P-256 point bytes", &ec, ec.raw_public.clone()),
        (
            "P-256 x (base64url text)",
            &ec,
            ec.jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ),
        (
            "P-256 SPKI PEM",
            &ec,
            pem("PUBLIC KEY", &ec.spki_der).into_bytes(),
        ),
    ];
    for (label, key, secret) in &secrets {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            add(
                &format!("{alg:?} signed with {label}, kid {}", key.kid),
                hmac_token(alg, Some(&key.kid), secret, &c()),
            );
        }
        add(
            &format!("HS256 signed with {label}, no kid"),
            hmac_token(Algorithm::HS256, None, secret, &c()),
        );
    }

    // A header that asks for another algorithm than the key named by its kid.
    add(
        "RS256 header (RSA-signed) with the Ed25519 kid",
        rs.sign_claiming_kid(&ed.kid, &c()),
    );
    add(
        "RS256 header (RSA-signed) with the P-256 kid",
        rs.sign_claiming_kid(&ec.kid, &c()),
    );
    add("PS256 header (RSA-signed) with the Ed25519 kid", {
        let mut h = rs.header();
        h.alg = Algorithm::PS256;
        h.kid = Some(ed.kid.clone());
        sign(&h, &c(), &rs.encoding)
    });
    add(
        "EdDSA header (Ed25519-signed) with the RSA kid",
        ed.sign_claiming_kid(&rs.kid, &c()),
    );
    add(
        "EdDSA header (Ed25519-signed) with the P-256 kid",
        ed.sign_claiming_kid(&ec.kid, &c()),
    );
    add(
        "ES256 header (P-256-signed) with the Ed25519 kid",
        ec.sign_claiming_kid(&ed.kid, &c()),
    );
    add(
        "ES256 header (P-256-signed) with the RSA kid",
        ec.sign_claiming_kid(&rs.kid, &c()),
    );

    // alg none, in several spellings, with and without a kid.
    for alg in ["none", "None", "NONE", "nOnE"] {
        add(
            &format!("alg {alg} with kid"),
            raw_token(&json!({"alg": alg, "typ": "JWT", "kid": ed.kid}), &c(), b""),
        );
        add(
            &format!("alg {alg} without kid"),
            raw_token(&json!({"alg": alg, "typ": "JWT"}), &c(), b""),
        );
    }
    // Algorithms the verifier does not support, or that are not algorithms at all.
    for alg in [
        "ES512",
        "ES384",
        "EdDSA25519",
        "Ed448",
        "HS1",
        "",
        "RSA-OAEP",
    ] {
        add(
            &format!("alg {alg:?} with the P-256 kid"),
            raw_token(
                &json!({"alg": alg, "typ": "JWT", "kid": ec.kid}),
                &c(),
                &random_bytes::<132>(),
            ),
        );
    }
    add(
        "alg is a number",
        raw_token(
            &json!({"alg": 256, "kid": ed.kid}),
            &c(),
            &random_bytes::<64>(),
        ),
    );
    add(
        "header without alg",
        raw_token(
            &json!({"typ": "JWT", "kid": ed.kid}),
            &c(),
            &random_bytes::<64>(),
        ),
    );

    // Bad signatures.
    for key in [&ed, &ec, &rs] {
        let good = key.sign(&c());
        let (rest, signature) = good.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
        bytes[0] ^= 0x01;
        add(
            &format!("{:?} token with a flipped signature bit", key.alg),
            format!("{rest}.{}", b64url(&bytes)),
        );
        add(
            &format!("{:?} token with the signature removed", key.alg),
            format!("{rest}."),
        );
        // The payload swapped for another user's, keeping the genuine signature.
        let parts: Vec<&str> = good.split('.').collect();
        let other = b64url(
            claims("ba_someone_else", "else@example.com", "E")
                .to_string()
                .as_bytes(),
        );
        add(
            &format!("{:?} token with a swapped payload", key.alg),
            format!("{}.{other}.{}", parts[0], parts[2]),
        );
    }

    // Keys that are not in the set.
    add(
        "signed by a foreign Ed25519 key under the genuine Ed25519 kid",
        evil.sign_claiming_kid(&ed.kid, &c()),
    );
    add(
        "signed by a foreign P-256 key under the genuine P-256 kid",
        ec_key("x").sign_claiming_kid(&ec.kid, &c()),
    );
    add(
        "signed by a foreign Ed25519 key, unknown kid",
        evil.sign(&c()),
    );
    add("signed by a foreign Ed25519 key, no kid", {
        let mut h = evil.header();
        h.kid = None;
        sign(&h, &c(), &evil.encoding)
    });
    // Headers pointing at the attacker's key.
    add("jku header pointing at the attacker's JWKS", {
        let mut h = evil.header();
        h.jku = Some(evil_jwks.url());
        sign(&h, &c(), &evil.encoding)
    });
    add("jku header with the genuine kid", {
        let mut h = evil.header();
        h.jku = Some(evil_jwks.url());
        h.kid = Some(ed.kid.clone());
        sign(&h, &c(), &evil.encoding)
    });
    add("x5u header pointing at the attacker's server", {
        let mut h = evil.header();
        h.x5u = Some(evil_jwks.url());
        sign(&h, &c(), &evil.encoding)
    });
    add("embedded jwk header with the attacker's key", {
        let mut h = evil.header();
        h.jwk = Some(serde_json::from_value(evil.jwk.clone()).expect("Jwk"));
        sign(&h, &c(), &evil.encoding)
    });
    add(
        "embedded jwk header with the attacker's key under the genuine kid",
        {
            let mut h = evil.header();
            h.kid = Some(ed.kid.clone());
            h.jwk = Some(
                serde_json::from_value(with(evil.jwk.clone(), "kid", json!(ed.kid))).expect("Jwk"),
            );
            sign(&h, &c(), &evil.encoding)
        },
    );
    // Garbage.
    add("not a JWT", "not-a-jwt".to_string());
    add(
        "two segments",
        format!(
            "{}.{}",
            b64url(br#"{"alg":"EdDSA"}"#),
            b64url(c().to_string().as_bytes())
        ),
    );
    add(
        "header is not JSON",
        format!(
            "{}.{}.{}",
            b64url(b"{nope"),
            b64url(c().to_string().as_bytes()),
            b64url(b"sig")
        ),
    );

    assert_all_401(&srv, &cases);
    assert_eq!(
        evil_jwks.hits(),
        0,
        "the server fetched a URL named in a token header (jku/x5u): {:?}",
        evil_jwks.paths()
    );
    // The genuine keys still work.
    assert_me(
        &me(&srv, &ed.sign(&c())),
        victim,
        "victim@example.com",
        "Victim",
        "genuine Ed25519 token afterwards",
    );
    assert_me(
        &me(&srv, &ec.sign(&c())),
        victim,
        "victim@example.com",
        "Victim",
        "genuine P-256 token afterwards",
    );
    assert_me(
        &me(&srv, &rs.sign(&c())),
        victim,
        "victim@example.com",
        "Victim",
        "genuine RSA token afterwards",
    );
    assert!(
        !srv.log().contains("panicked"),
        "the server panicked:\n{}",
        srv.log()
    );
}

/// A symmetric (oct) key in the set is never used: a token signed with its secret is a 401.
fn symmetric_key_in_set_is_not_used(backend: &Backend) {
    let ed = ed_key("ed-1");
    let secret = random_bytes::<32>();
    let oct =
        json!({"kty": "oct", "kid": "oct-1", "k": b64url(&secret), "alg": "HS256", "use": "sig"});
    let oct_no_alg = json!({"kty": "oct", "kid": "oct-2", "k": b64url(&secret)});
    let body = json!({"keys": [ed.jwk.clone(), oct, oct_no_alg]}).to_string();
    let jwks = JwksServer::start(200, &body);
    let srv = start_with_jwks(backend, &jwks.url());

    let c = claims("ba_oct_victim", "oct@example.com", "Oct");
    for (alg, kid) in [
        (Algorithm::HS256, "oct-1"),
        (Algorithm::HS256, "oct-2"),
        (Algorithm::HS512, "oct-2"),
    ] {
        assert_401(
            &me(&srv, &hmac_token(alg, Some(kid), &secret, &c)),
            &format!("{alg:?} token signed with the secret of oct key {kid}"),
        );
    }
    // The server still uses the asymmetric key of the same set.
    assert_me(
        &me(&srv, &ed.sign(&c)),
        "ba_oct_victim",
        "oct@example.com",
        "Oct",
        "Ed25519 key next to oct keys",
    );
    // And the oct key did not become an accepted key after the user existed either.
    assert_401(
        &me(
            &srv,
            &hmac_token(Algorithm::HS256, Some("oct-1"), &secret, &c),
        ),
        "oct-signed token for an existing user",
    );
}

/// A key with an algorithm the verifier does not support (a P-521 / ES512 key, as Better Auth can
/// publish) makes its tokens a 401 — never a 500 — and does not spoil the other keys of the set.
fn unsupported_key_in_set_is_401_not_500(backend: &Backend) {
    let ed = ed_key("ed-1");
    let p521 = json!({"kty": "EC", "crv": "P-521", "kid": "p521-1", "alg": "ES512", "use": "sig",
                      "x": b64url(&random_bytes::<66>()), "y": b64url(&random_bytes::<66>())});
    let body = json!({"keys": [p521, ed.jwk.clone()]}).to_string();
    let jwks = JwksServer::start(200, &body);
    let srv = start_with_jwks(backend, &jwks.url());

    let c = claims("ba_es512", "es512@example.com", "E");
    let es512 = raw_token(
        &json!({"alg": "ES512", "typ": "JWT", "kid": "p521-1"}),
        &c,
        &random_bytes::<132>(),
    );
    assert_401(&me(&srv, &es512), "ES512 token for the P-521 key");
    let es256 = ec_key("p521-1").sign(&c);
    assert_401(&me(&srv, &es256), "ES256 token naming the P-521 key");
    assert_me(
        &me(&srv, &ed.sign(&c)),
        "ba_es512",
        "es512@example.com",
        "E",
        "Ed25519 key in a set that also holds a P-521 key",
    );
}

/// JWT_ISSUER / JWT_AUDIENCE are checked when set (for tokens from the set only).
fn issuer_and_audience_checked_when_set(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = server(backend)
        .env("JWT_JWKS_URL", &jwks.url())
        .env("JWT_ISSUER", ISSUER)
        .env("JWT_AUDIENCE", ISSUER)
        .start();
    let c = || claims("ba_iss", "iss@example.com", "I");
    assert_me(
        &me(&srv, &ed.sign(&c())),
        "ba_iss",
        "iss@example.com",
        "I",
        "right iss and aud",
    );
    assert_me(
        &me(
            &srv,
            &ed.sign(&with(c(), "aud", json!(["http://other.example", ISSUER]))),
        ),
        "ba_iss",
        "iss@example.com",
        "I",
        "aud as an array holding the right audience",
    );
    let cases = [
        ("wrong iss", with(c(), "iss", json!("http://evil.example"))),
        ("wrong aud", with(c(), "aud", json!("http://evil.example"))),
        (
            "aud array without the right audience",
            with(c(), "aud", json!(["http://evil.example"])),
        ),
        ("no iss", without(c(), "iss")),
        ("no aud", without(c(), "aud")),
        (
            "iss differing in case",
            with(c(), "iss", json!("HTTP://LOCALHOST:3000")),
        ),
    ]
    .map(|(what, bad)| (what.to_string(), ed.sign(&bad)));
    assert_all_401(&srv, &cases);
    // Locally issued tokens are checked against JWT_SECRET alone.
    let (_, local) = srv.user("local@example.com");
    assert_eq!(
        me(&srv, &local).status,
        StatusCode::OK,
        "local token with JWT_ISSUER/JWT_AUDIENCE set"
    );
}

/// With JWT_ISSUER / JWT_AUDIENCE unset, a token's iss / aud are not checked.
fn issuer_and_audience_unchecked_when_unset(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let c = || claims("ba_any", "any@example.com", "Any");
    for (what, token_claims) in [
        (
            "arbitrary iss and aud",
            with(
                with(c(), "iss", json!("https://anything.example")),
                "aud",
                json!("whatever"),
            ),
        ),
        ("aud as an array", with(c(), "aud", json!(["a", "b"]))),
        ("no iss and no aud", without(without(c(), "iss"), "aud")),
    ] {
        assert_me(
            &me(&srv, &ed.sign(&token_claims)),
            "ba_any",
            "any@example.com",
            "Any",
            what,
        );
    }
}

/// exp is required and checked; sub is required.
fn exp_and_sub_required(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let now = now_secs();
    let c = || claims("ba_exp", "exp@example.com", "X");
    for (what, bad) in [
        ("no exp", without(c(), "exp")),
        ("expired 65 s ago", with(c(), "exp", json!(now - 65))),
        ("expired an hour ago", with(c(), "exp", json!(now - 3600))),
        ("exp is a string", with(c(), "exp", json!("tomorrow"))),
        ("exp is null", with(c(), "exp", Value::Null)),
        ("no sub", without(c(), "sub")),
        ("sub is null", with(c(), "sub", Value::Null)),
    ] {
        assert_401(&me(&srv, &ed.sign(&bad)), what);
    }
    assert_me(
        &me(&srv, &ed.sign(&c())),
        "ba_exp",
        "exp@example.com",
        "X",
        "valid exp",
    );
}

/// First sight creates the user from sub, email, name; no email → 401; an email held by a local
/// account → 409; the external user has no password for /token or /api/auth/login.
fn first_sight_creates_user_from_claims(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    srv.register("bob@example.com", PASSWORD);

    let first = me(
        &srv,
        &ed.sign(&claims("ba_user_123", "Alice@Example.com", "Alice")),
    );
    assert_me(
        &first,
        "ba_user_123",
        "alice@example.com",
        "Alice",
        "first token",
    );
    assert!(
        first.body["created_at"].is_string() && first.body["updated_at"].is_string(),
        "{}",
        first.body
    );
    let later = me(
        &srv,
        &ed.sign(&claims("ba_user_123", "Alice@Example.com", "Alice")),
    );
    assert_me(
        &later,
        "ba_user_123",
        "alice@example.com",
        "Alice",
        "later token",
    );
    assert_eq!(later.body["created_at"], first.body["created_at"]);

    // Without an email claim the user cannot be created.
    let no_email = without(claims("ba_no_email", "x@example.com", "N"), "email");
    assert_401(
        &me(&srv, &ed.sign(&no_email)),
        "new sub without email claim",
    );
    let null_email = with(
        claims("ba_no_email", "x@example.com", "N"),
        "email",
        Value::Null,
    );
    assert_401(&me(&srv, &ed.sign(&null_email)), "new sub with email null");
    // ...and that refusal left nothing behind.
    assert_me(
        &me(&srv, &ed.sign(&claims("ba_no_email", "n@example.com", "N"))),
        "ba_no_email",
        "n@example.com",
        "N",
        "same sub, now with an email",
    );

    // An email that a local account holds (compared case-insensitively) → 409.
    let taken = me(
        &srv,
        &ed.sign(&claims("ba_bob", "BOB@Example.com", "Not Bob")),
    );
    assert_eq!(
        taken.status,
        StatusCode::CONFLICT,
        "external token with a local account's email: {}",
        taken.body
    );
    assert!(taken.body["detail"].is_string(), "{}", taken.body);
    // Bob's account is untouched.
    let bob = me(&srv, &srv.login("bob@example.com", PASSWORD));
    assert_eq!(bob.status, StatusCode::OK);
    assert_eq!(bob.body["email"], json!("bob@example.com"));
    assert_ne!(bob.body["id"], json!("ba_bob"));
    // And the external user's email is now taken for registration too.
    let register = call(
        &srv,
        client()
            .post(srv.url("/api/auth/register"))
            .json(&json!({"email": "alice@example.com", "password": PASSWORD})),
        "POST /api/auth/register",
    );
    assert_eq!(
        register.status,
        StatusCode::CONFLICT,
        "register with the external user's email: {}",
        register.body
    );

    // The external user has no password: /token and /api/auth/login refuse it.
    for password in [PASSWORD, "anything at all", "ba_user_123"] {
        let form = call(
            &srv,
            client().post(srv.url("/token")).form(&[
                ("username", "alice@example.com"),
                ("password", password),
                ("grant_type", "password"),
            ]),
            "POST /token",
        );
        assert_eq!(
            form.status,
            StatusCode::UNAUTHORIZED,
            "/token for an external user: {}",
            form.body
        );
        assert_eq!(form.body, json!({"detail": "Incorrect email or password"}));
        let login = call(
            &srv,
            client()
                .post(srv.url("/api/auth/login"))
                .json(&json!({"email": "alice@example.com", "password": password})),
            "POST /api/auth/login",
        );
        assert_eq!(
            login.status,
            StatusCode::UNAUTHORIZED,
            "/api/auth/login for an external user: {}",
            login.body
        );
        assert_eq!(login.body, json!({"detail": "Incorrect email or password"}));
    }
}

/// Eight tokens for a new user arriving at once create one user, and none of them fails
/// (25 rounds, each with a new user, since a race shows only now and then).
fn concurrent_first_sight_creates_one_user(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    // The race under test is the user's creation, not the pool's cold start: on PostgreSQL the
    // first burst opens eight new connections, which on a loaded 2-core machine running a debug
    // build can take longer than the default 2 s DATABASE_POOL_TIMEOUT (observed: 503s).
    let srv = Arc::new(
        server(backend)
            .env("JWT_JWKS_URL", &jwks.url())
            .env("DATABASE_POOL_TIMEOUT", "15")
            .start(),
    );
    const PARALLEL: usize = 8;
    for round in 0..25 {
        let sub = format!("ba_race_{round}");
        let email = format!("Race{round}@Example.com");
        let tokens: Vec<String> = (0..PARALLEL)
            .map(|_| ed.sign(&claims(&sub, &email, "Racer")))
            .collect();
        let barrier = Arc::new(Barrier::new(PARALLEL));
        let handles: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let (srv, barrier) = (srv.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let reply = me(&srv, &token);
                    (reply.status, reply.body)
                })
            })
            .collect();
        let results: Vec<(StatusCode, Value)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (status, body) in &results {
            assert_eq!(
                *status,
                StatusCode::OK,
                "round {round}: concurrent first sight: {body}; all: {results:?}\n\
                 server warnings and errors:\n{}",
                warnings(&srv)
            );
            assert_eq!(body["id"], json!(sub), "round {round}: {body}");
        }
        let created: Vec<&Value> = results.iter().map(|(_, b)| &b["created_at"]).collect();
        assert!(
            created.windows(2).all(|w| w[0] == w[1]),
            "round {round}: more than one user was created: {created:?}"
        );
        let after = me(&srv, &ed.sign(&claims(&sub, &email, "Racer")));
        assert_me(
            &after,
            &sub,
            &format!("race{round}@example.com"),
            "Racer",
            "after the race",
        );
        assert_eq!(&after.body["created_at"], created[0]);
    }
    assert!(
        !srv.log().contains("panicked"),
        "the server panicked:\n{}",
        srv.log()
    );
}

/// DELETE /api/users/me deletes the external user and their tasks; the issuer's next valid
/// token starts a fresh, empty account.
fn deleted_external_user_starts_fresh(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let sub = "ba_leaver";
    let token = ed.sign(&claims(sub, "Leaver@example.com", "Leaver"));
    assert_me(
        &me(&srv, &token),
        sub,
        "leaver@example.com",
        "Leaver",
        "before delete",
    );
    let mut task_ids = Vec::new();
    for title in ["one", "two"] {
        let created = post_json(&srv, "/api/me/tasks", &token, &json!({"title": title}));
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        task_ids.push(created.body["id"].as_i64().unwrap());
    }
    let deleted = delete(&srv, "/api/users/me", &token);
    assert_eq!(
        deleted.status,
        StatusCode::NO_CONTENT,
        "DELETE /api/users/me: {}",
        deleted.body
    );

    let fresh_token = ed.sign(&claims(sub, "leaver@example.com", "Leaver Again"));
    let fresh = me(&srv, &fresh_token);
    assert_me(
        &fresh,
        sub,
        "leaver@example.com",
        "Leaver Again",
        "next token after delete",
    );
    let tasks = get(&srv, "/api/me/tasks", &fresh_token);
    assert_eq!(tasks.status, StatusCode::OK, "{}", tasks.body);
    assert_eq!(
        tasks.body,
        json!([]),
        "the fresh account must have no tasks"
    );
    assert_eq!(
        tasks
            .headers
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()),
        Some("0"),
        "X-Total-Count of the fresh account"
    );
    for id in task_ids {
        let old = get(&srv, &format!("/api/{sub}/tasks/{id}"), &fresh_token);
        assert_eq!(
            old.status,
            StatusCode::NOT_FOUND,
            "old task {id} after delete: {}",
            old.body
        );
    }
}

/// JWT_JWKS_URL pointing at a closed port: the server starts anyway (logs the failure), answers
/// 401 (not 500, not a hang), and accepts tokens once the issuer comes up.
fn jwks_down_is_401_then_recovers(backend: &Backend) {
    let ed = ed_key("ed-1");
    let address = closed_port_listener_address();
    let url = format!("http://{address}/api/auth/jwks");
    let srv = start_with_jwks(backend, &url);

    let token = ed.sign(&claims("ba_late", "late@example.com", "Late"));
    assert_401(&me(&srv, &token), "JWKS server down");
    assert_401(&me(&srv, &token), "JWKS server down, second request");
    // The server works for local users meanwhile.
    let (_, local) = srv.user("local@example.com");
    assert_eq!(
        me(&srv, &local).status,
        StatusCode::OK,
        "local token while the issuer is down"
    );
    let log = srv.log();
    assert!(
        log.lines().any(|line| {
            let line = line.to_lowercase();
            line.contains("jwk")
                && ["warn", "error", "fail", "unable", "could not", "refused"]
                    .iter()
                    .any(|word| line.contains(word))
        }),
        "the failed JWKS fetch was not logged (no line naming the JWKS and a failure):\n{log}"
    );

    // The issuer starts later, on the configured address.
    let listener = TcpListener::bind(address).expect("re-bind the JWKS port");
    let jwks = JwksServer::start_on(listener, 200, &jwk_set(&[&ed]));
    let reply = wait_for_200(&srv, &token, "after the issuer came up");
    assert_me(
        &reply,
        "ba_late",
        "late@example.com",
        "Late",
        "after the issuer came up",
    );
    assert!(jwks.hits() >= 1);
}

/// A JWKS endpoint that answers garbage (non-JSON, JSON that is not a key set, an HTTP error):
/// 401, never a 500; once it serves a proper set again, tokens are accepted.
fn jwks_garbage_is_401_then_recovers(backend: &Backend) {
    let ed = ed_key("ed-1");
    // (status, body, whether a later proper set must be picked up for the same kid)
    let modes: [(u16, &str, bool); 8] = [
        (200, "<html><body>Bad gateway</body></html>", true),
        (200, "", true),
        (200, r#"{"foo": 1}"#, true),
        (200, "[]", true),
        (200, r#"{"keys": "nope"}"#, true),
        (
            200,
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": "!!not base64!!"}]}"#,
            // The broken key carries the very kid of the token; whether the server forgets it
            // (and so refetches) is not specified, so only the 401 is checked.
            false,
        ),
        (500, r#"{"detail": "Internal Server Error"}"#, true),
        (404, "Not Found", true),
    ];
    for (status, body, recovers) in modes {
        let what = format!("JWKS answering {status} {body:?}");
        let jwks = JwksServer::start(status, body);
        let srv = start_with_jwks(backend, &jwks.url());
        let token = ed.sign(&claims("ba_garbage", "garbage@example.com", "G"));
        assert_401(&me(&srv, &token), &what);
        assert_401(&me(&srv, &token), &format!("{what}, second request"));
        if recovers {
            jwks.set_keys(&[&ed]);
            let reply = wait_for_200(&srv, &token, &format!("{what}, then a proper set"));
            assert_me(
                &reply,
                "ba_garbage",
                "garbage@example.com",
                "G",
                &format!("{what}, then a proper set"),
            );
        }
        assert!(
            !srv.log().contains("panicked"),
            "{what}: the server panicked:\n{}",
            srv.log()
        );
    }
}

/// A JWKS endpoint that accepts the connection and never answers: the API answers 401 within the
/// client timeout rather than hanging.
fn jwks_that_never_answers_is_401_not_a_hang(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::start(0, "");
    let srv = start_with_jwks(backend, &jwks.url());
    let token = ed.sign(&claims("ba_hang", "hang@example.com", "H"));
    // This test alone allows a little more than CLIENT_TIMEOUT, so a server whose own fetch
    // timeout is close to 10 s is not failed for it.
    let started = Instant::now();
    let reply = call(
        &srv,
        slow_client()
            .get(srv.url("/api/users/me"))
            .bearer_auth(&token),
        "GET /api/users/me while the JWKS server never answers",
    );
    assert_401(
        &reply,
        &format!(
            "JWKS server that never answers (answered after {:?})",
            started.elapsed()
        ),
    );
    // Local users are not held up by the stuck issuer.
    let (_, local) = srv.user("local@example.com");
    assert_eq!(
        me(&srv, &local).status,
        StatusCode::OK,
        "local token while the issuer hangs"
    );
}

/// Keys are cached (known kids cause no fetch) and a burst of 50 tokens with random unknown kids
/// within about a second causes at most ~2 fetches beyond the startup fetch.
fn refetch_is_rate_limited(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = Arc::new(start_with_jwks(backend, &jwks.url()));

    // The set is fetched at startup.
    let started = Instant::now();
    while jwks.hits() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no JWKS fetch at startup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Known kids are served from the cache.
    let base = jwks.hits();
    for _ in 0..10 {
        assert_me(
            &me(&srv, &ed.sign(&claims("ba_rate", "rate@example.com", "R"))),
            "ba_rate",
            "rate@example.com",
            "R",
            "known kid",
        );
    }
    assert_eq!(
        jwks.hits(),
        base,
        "tokens with a known kid made the server fetch the set again"
    );

    // 50 tokens with random unknown kids, 10 threads at once.
    let unknown = ed_key("unknown");
    let tokens: Vec<String> = (0..50)
        .map(|_| {
            unknown.sign_claiming_kid(
                &format!("kid-{}", random_hex(12)),
                &claims("ba_rate", "rate@example.com", "R"),
            )
        })
        .collect();
    let barrier = Arc::new(Barrier::new(10));
    let burst_started = Instant::now();
    let handles: Vec<_> = tokens
        .chunks(5)
        .map(|chunk| {
            let (srv, barrier, chunk) = (srv.clone(), barrier.clone(), chunk.to_vec());
            std::thread::spawn(move || {
                barrier.wait();
                chunk
                    .iter()
                    .map(|t| me(&srv, t))
                    .map(|r| (r.status, r.body))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(StatusCode, Value)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let burst = burst_started.elapsed();
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::UNAUTHORIZED, "unknown kid: {body}");
    }
    std::thread::sleep(Duration::from_millis(500)); // let a fetch in flight be counted
    let extra = jwks.hits() - base;
    // "At most once every few seconds": ~2 fetches for a burst of about a second; if this slow
    // machine stretched the burst, allow one more per extra second.
    let allowed = 2 + burst.as_secs() as usize;
    assert!(
        extra <= allowed,
        "{extra} JWKS fetches for 50 unknown kids within {burst:?} (allowed {allowed})"
    );
    // The cached set survived the burst.
    assert_me(
        &me(&srv, &ed.sign(&claims("ba_rate", "rate@example.com", "R"))),
        "ba_rate",
        "rate@example.com",
        "R",
        "known kid after the burst",
    );
}

// ---------------------------------------------------------------------------------------------
// Hardening: token rules and identities that must not collide
// ---------------------------------------------------------------------------------------------

/// A future `nbf` is refused (as PyJWT does), within the same 60 s leeway as `exp`; a
/// non-numeric `nbf` or `iat` is refused too.
fn external_nbf_and_iat_are_checked(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let base = claims("ba_nbf", "nbf@example.com", "Nbf");
    let now = now_secs();
    for (what, token) in [
        (
            "nbf 5 minutes ahead",
            ed.sign(&with(base.clone(), "nbf", json!(now + 300))),
        ),
        (
            "nbf as a string",
            ed.sign(&with(base.clone(), "nbf", json!("0"))),
        ),
        (
            "iat as a string",
            ed.sign(&with(base.clone(), "iat", json!("yesterday"))),
        ),
    ] {
        assert_401(&me(&srv, &token), what);
    }
    let within_leeway = ed.sign(&with(base.clone(), "nbf", json!(now + 30)));
    assert_me(
        &me(&srv, &within_leeway),
        "ba_nbf",
        "nbf@example.com",
        "Nbf",
        "nbf 30 s ahead (inside the leeway)",
    );
}

/// Headers that point at a key (`jku`, `x5u`) or carry one (`jwk`) are refused even on a token
/// the set's own key signed.
fn key_location_headers_are_refused(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let body = claims("ba_headers", "headers@example.com", "H");
    assert_me(
        &me(&srv, &ed.sign(&body)),
        "ba_headers",
        "headers@example.com",
        "H",
        "the same token without the headers",
    );
    let mut jku = ed.header();
    jku.jku = Some(format!("{}/other-keys", jwks.url()));
    let mut x5u = ed.header();
    x5u.x5u = Some(format!("{}/cert.pem", jwks.url()));
    let mut jwk = ed.header();
    jwk.jwk = Some(serde_json::from_value(ed.jwk.clone()).unwrap());
    for (what, header) in [("jku", jku), ("x5u", x5u), ("jwk", jwk)] {
        assert_401(&me(&srv, &sign(&header, &body, &ed.encoding)), what);
    }
}

/// A `sub` must be printable and at most 255 characters: a newline, NUL or an over-long id is
/// 401 before anything is stored (no user, no task).
fn unprintable_or_long_subjects_are_refused(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let long = "s".repeat(256);
    for (what, sub) in [
        ("newline", "evil\nLocation: x"),
        ("NUL", "nul\u{0}byte"),
        ("tab", "tab\there"),
        ("256 characters", long.as_str()),
    ] {
        let token = ed.sign(&claims(sub, &format!("{}@example.com", what.len()), "X"));
        assert_401(
            &post_json(&srv, "/api/me/tasks", &token, &json!({"title": "t"})),
            &format!("create a task with a {what} in sub"),
        );
        assert_401(&me(&srv, &token), &format!("{what} in sub"));
    }
    // Nothing was written: the emails of those tokens are free for a valid one.
    let fine = "s".repeat(255);
    let token = ed.sign(&claims(&fine, "3@example.com", "Fine"));
    assert_me(
        &me(&srv, &token),
        &fine,
        "3@example.com",
        "Fine",
        "255-character sub",
    );
}

/// An external token whose `sub` names a local account is 401, and it never sees that
/// account's tasks; a user created by one issuer is not reachable by another.
fn external_tokens_reach_only_their_issuers_users(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let local = srv.register("local@example.com", PASSWORD);
    let local_id = local["id"].as_str().unwrap();
    let local_token = srv.login("local@example.com", PASSWORD);
    let created = post_json(
        &srv,
        "/api/me/tasks",
        &local_token,
        &json!({"title": "mine"}),
    );
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);

    let posing = ed.sign(&claims(local_id, "local@example.com", "Local"));
    assert_401(&me(&srv, &posing), "external token naming a local account");
    assert_401(
        &get(&srv, &format!("/api/{local_id}/tasks"), &posing),
        "external token listing a local account's tasks",
    );
    let posing_other_email = ed.sign(&claims(local_id, "someone@example.com", "S"));
    assert_401(
        &me(&srv, &posing_other_email),
        "external token naming a local account, another email",
    );

    // Issuer A creates a user. A second server on the same database trusts issuer B (another
    // JWK Set URL, here serving the same key): B's token for that sub is refused, A's works.
    let from_a = ed.sign(&claims("shared_sub", "a@example.com", "A"));
    assert_me(
        &me(&srv, &from_a),
        "shared_sub",
        "a@example.com",
        "A",
        "issuer A",
    );
    let other_jwks = JwksServer::serving(&[&ed]);
    let other = server_on(srv.db.clone())
        .env("JWT_JWKS_URL", &other_jwks.url())
        .start();
    assert_401(&me(&other, &from_a), "issuer B naming issuer A's user");
    let fresh = ed.sign(&claims("b_sub", "b@example.com", "B"));
    assert_me(
        &me(&other, &fresh),
        "b_sub",
        "b@example.com",
        "B",
        "issuer B's own user",
    );
    assert_401(&me(&srv, &fresh), "issuer A naming issuer B's user");
    assert_me(
        &me(&srv, &from_a),
        "shared_sub",
        "a@example.com",
        "A",
        "issuer A again",
    );
    // The local account is untouched.
    let (status, _, body) = send(srv.get("/api/users/me").bearer_auth(&local_token));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["email"], "local@example.com");
}

/// Accounts created from external tokens before issuers were recorded (the migration marks them
/// with an empty issuer) belong to the first issuer that presents a valid token for them.
fn accounts_from_before_issuers_were_recorded_are_claimed_once(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let from_a = ed.sign(&claims("legacy_sub", "legacy@example.com", "L"));
    assert_me(
        &me(&srv, &from_a),
        "legacy_sub",
        "legacy@example.com",
        "L",
        "created",
    );
    // What the migration leaves for such an account.
    srv.execute_sql("UPDATE users SET issuer = '' WHERE id = 'legacy_sub'");
    // A second server on the same database trusts issuer B (another JWK Set URL).
    let other_jwks = JwksServer::serving(&[&ed]);
    let other = server_on(srv.db.clone())
        .env("JWT_JWKS_URL", &other_jwks.url())
        .start();
    let from_b = ed.sign(&claims("legacy_sub", "legacy@example.com", "L"));
    assert_me(
        &me(&other, &from_b),
        "legacy_sub",
        "legacy@example.com",
        "L",
        "claimed by B",
    );
    assert_me(
        &me(&other, &from_b),
        "legacy_sub",
        "legacy@example.com",
        "L",
        "B again",
    );
    assert_401(&me(&srv, &from_a), "issuer A after B claimed the account");
}

/// An external user id is whatever the issuer's `sub` says, `/`, `?` and `#` included: in the
/// `Location` of a new task it is one percent-encoded path segment, so the header names this
/// task, not another path with a query and a fragment.
fn location_encodes_the_user_id(backend: &Backend) {
    let ed = ed_key("ed-1");
    let jwks = JwksServer::serving(&[&ed]);
    let srv = start_with_jwks(backend, &jwks.url());
    let token = ed.sign(&claims("team/7?x=1#y", "odd@example.com", "Odd"));
    let created = post_json(&srv, "/api/me/tasks", &token, &json!({"title": "t"}));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_i64().unwrap();
    let location = created.headers["location"].to_str().unwrap();
    assert_eq!(location, format!("/api/team%2F7%3Fx%3D1%23y/tasks/{id}"));
}

on_both_backends!(
    location_encodes_the_user_id,
    accepts_eddsa_es256_rs256_tokens,
    rsa_key_without_alg_accepts_rs256_and_ps256,
    jwk_alg_is_enforced,
    rotation_is_picked_up_without_restart,
    rejects_algorithm_confusion_and_foreign_keys,
    symmetric_key_in_set_is_not_used,
    unsupported_key_in_set_is_401_not_500,
    issuer_and_audience_checked_when_set,
    issuer_and_audience_unchecked_when_unset,
    exp_and_sub_required,
    first_sight_creates_user_from_claims,
    concurrent_first_sight_creates_one_user,
    deleted_external_user_starts_fresh,
    jwks_down_is_401_then_recovers,
    jwks_garbage_is_401_then_recovers,
    jwks_that_never_answers_is_401_not_a_hang,
    refetch_is_rate_limited,
    external_nbf_and_iat_are_checked,
    key_location_headers_are_refused,
    unprintable_or_long_subjects_are_refused,
    external_tokens_reach_only_their_issuers_users,
    accounts_from_before_issuers_were_recorded_are_claimed_once,
);
