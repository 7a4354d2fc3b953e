//! # Todo API
//!
//! A Todo backend that speaks the same HTTP contract as the FastAPI + SQLModel + JWT original
//! (see "The API" in the README), so the Next.js frontends written for it work unchanged. One
//! file, read top to bottom:
//!
//! 1. **Configuration** — environment and `.env`, validated once at startup.
//! 2. **Models** — the diesel schema, row structs, request and response types, validation.
//! 3. **Database pool** — bb8 over diesel-async: SQLite by default, PostgreSQL by URL, with one
//!    query code path for both.
//! 4. **Auth extractor** — `CurrentUser`, the actix `FromRequest` guard that turns a bearer
//!    token into a user, like FastAPI's `get_current_user` dependency.
//! 5. **Routes**, grouped by OpenAPI tag: health, auth, users, tasks.
//! 6. **Startup** — migrations, app assembly, graceful shutdown.
//!
//! Errors are one type, [`ApiError`], that renders FastAPI's `{"detail": …}` JSON; handlers
//! just use `?`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, ResourceDef, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::web::Json;
use actix_web::{
    delete, get, middleware, patch, post, put, web, App, FromRequest, HttpMessage, HttpRequest,
    HttpResponse, HttpServer, ResponseError,
};
use chrono::{NaiveDateTime, SubsecRound, Utc};
use diesel::{
    AsChangeset, BoolExpressionMethods, Connection, ConnectionResult, EscapeExpressionMethods,
    ExpressionMethods, Insertable, NullableExpressionMethods, OptionalExtension, QueryDsl,
    QueryResult, Queryable, Selectable, SelectableHelper, SqliteConnection, TextExpressionMethods,
};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, PoolError};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use futures_util::future::{BoxFuture, Either, FutureExt, LocalBoxFuture, TryFutureExt};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::json;
use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
use utoipa::openapi::security::{
    Flow, HttpAuthScheme, HttpBuilder, OAuth2, Password, Scopes, SecurityRequirement,
    SecurityScheme,
};
use utoipa::{IntoParams, IntoResponses, OpenApi, ToSchema};
use utoipa_actix_web::AppExt;
use utoipa_swagger_ui::SwaggerUi;

// =================================================================================================
// 1. Configuration
// =================================================================================================

/// Everything the server reads from its environment, parsed and checked before anything starts:
/// a value that is set but wrong stops the process with one line naming the variable.
struct Config {
    database: DatabaseUrl,
    host: String,
    port: u16,
    jwt_secret: Vec<u8>,
    /// No secret was configured: tokens die with the process, so say so at startup.
    jwt_secret_is_random: bool,
    access_token_ttl: Duration,
    jwks_url: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    cors_origins: Vec<String>,
    bcrypt_cost: u32,
    pool_size: Option<u32>,
    /// How long a request waits for the database — a connection, then its statement — before
    /// it answers 503. Bounded so that a database that is down or frozen fails fast.
    database_timeout: Duration,
    trusted_proxies: Vec<IpAddr>,
    /// How long a client may take to send a whole request body.
    body_timeout: Duration,
    /// How long a client may go without taking any of its response (see `note_connection`).
    response_timeout: Duration,
    /// Open connections at most, across all workers; more wait in the listen queue.
    max_connections: usize,
    /// Registrations a minute from one client address.
    registrations_per_minute: i32,
}

#[derive(Clone, Debug, PartialEq)]
enum DatabaseUrl {
    /// A file path, or `:memory:`.
    Sqlite(String),
    Postgres(String),
}

/// How long a client may take to send a request body unless `REQUEST_BODY_TIMEOUT` says otherwise.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client may go without taking any of its response unless `RESPONSE_TIMEOUT` says
/// otherwise: short enough that a client which stops reading gives back its connection and the
/// response it holds within half a minute, long enough for any client that still reads.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A variable's value; set-but-empty counts as unset, as it does for most twelve-factor apps.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A variable parsed as `T`: `None` when unset, an error naming it when set to something
/// `valid` refuses.
fn parse_env<T: FromStr>(
    name: &str,
    valid: impl Fn(&T) -> bool,
    expected: &str,
) -> Result<Option<T>, String> {
    let Some(raw) = env_var(name) else {
        return Ok(None);
    };
    match raw.trim().parse::<T>() {
        Ok(value) if valid(&value) => Ok(Some(value)),
        _ => Err(format!("{name}: expected {expected}, got {raw:?}")),
    }
}

/// A comma-separated variable, each item kept by `parse` or refused as not `expected`.
fn parse_list<T>(
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<Vec<T>, String> {
    let raw = env_var(name).unwrap_or_default();
    let items = raw.split(',').map(str::trim).filter(|s| !s.is_empty());
    items
        .map(|item| parse(item).ok_or(format!("{name}: {item:?} is not {expected}")))
        .collect()
}

/// `url` if it is an absolute http(s) URL with a host.
fn http_url(url: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

impl Config {
    fn from_env() -> Result<Config, String> {
        load_dotenv()?;
        let (jwt_secret, jwt_secret_is_random) = jwt_secret()?;
        let jwks_url = env_var("JWT_JWKS_URL");
        if let Some(url) = jwks_url.as_deref().filter(|url| http_url(url).is_none()) {
            return Err(format!("JWT_JWKS_URL: not an http(s) URL: {url:?}"));
        }
        let seconds = |name| {
            let valid = |s: &f64| *s > 0.0 && *s <= 3600.0;
            parse_env(name, valid, "seconds between 0 and 3600")
                .map(|s| s.map(Duration::from_secs_f64))
        };
        let count =
            |name, max: u32| parse_env(name, |n| (1..=max).contains(n), &format!("1 to {max}"));
        let minutes = "minutes from 1 to 525600";
        let token_minutes = parse_env(
            "ACCESS_TOKEN_EXPIRE_MINUTES",
            |m| (1..=525_600).contains(m),
            minutes,
        )?;
        Ok(Config {
            database: parse_database_url(
                &env_var("DATABASE_URL").unwrap_or_else(|| "sqlite://todo.db".into()),
            )?,
            host: env_var("HOST").unwrap_or_else(|| "127.0.0.1".into()),
            port: parse_env("PORT", |_| true, "a port number (0-65535)")?.unwrap_or(8000),
            jwt_secret,
            jwt_secret_is_random,
            access_token_ttl: Duration::from_secs(60 * token_minutes.unwrap_or(30)),
            jwks_url,
            jwt_issuer: env_var("JWT_ISSUER"),
            jwt_audience: env_var("JWT_AUDIENCE"),
            cors_origins: parse_list(
                "CORS_ORIGINS",
                cors_origin,
                "an origin like http://localhost:3000",
            )?,
            bcrypt_cost: parse_env("BCRYPT_COST", |c| (4..=31).contains(c), "4 to 31")?
                .unwrap_or(12),
            pool_size: count("DATABASE_POOL_SIZE", 1000)?,
            // DATABASE_POOL_TIMEOUT is the variable's older name, still honoured.
            database_timeout: match seconds("DATABASE_TIMEOUT")? {
                Some(timeout) => timeout,
                None => seconds("DATABASE_POOL_TIMEOUT")?.unwrap_or(Duration::from_secs(3)),
            },
            trusted_proxies: parse_list("TRUSTED_PROXIES", canonical_ip, "an IP address")?,
            body_timeout: seconds("REQUEST_BODY_TIMEOUT")?.unwrap_or(DEFAULT_BODY_TIMEOUT),
            response_timeout: seconds("RESPONSE_TIMEOUT")?.unwrap_or(DEFAULT_RESPONSE_TIMEOUT),
            max_connections: count("MAX_CONNECTIONS", 1_000_000)?.unwrap_or(5_000) as usize,
            registrations_per_minute: count("REGISTRATIONS_PER_MINUTE", 1_000_000)?.unwrap_or(10)
                as i32,
        })
    }
}

/// Reads `.env`, if there is one. The environment wins: dotenvy never overwrites a variable
/// that is set.
fn load_dotenv() -> Result<(), String> {
    match dotenvy::from_path(".env") {
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Not the error's text: it quotes the line, which may hold a secret.
        Err(dotenvy::Error::LineParse(_, at)) => {
            Err(format!(".env: cannot parse the line at byte {at}"))
        }
        Err(e) => Err(format!(".env: {e}")),
        Ok(()) => Ok(()),
    }
}

/// `JWT_SECRET` (or Better Auth's `BETTER_AUTH_SECRET`), and whether a random one stands in
/// for it. Set counts even when empty: an empty secret is a mistake to report, not to paper over.
fn jwt_secret() -> Result<(Vec<u8>, bool), String> {
    let configured = ["JWT_SECRET", "BETTER_AUTH_SECRET"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().map(|secret| (name, secret)));
    match configured {
        Some((name, secret)) if secret.len() < 32 => Err(format!(
            "{name}: must be at least 32 bytes, got {}",
            secret.len()
        )),
        Some((_, secret)) => Ok((secret.into_bytes(), false)),
        None => Ok((rand::random::<[u8; 32]>().to_vec(), true)),
    }
}

/// An IP address, an IPv4 one written as IPv6 (`::ffff:10.0.0.1`, as a dual-stack socket reports
/// its IPv4 peers) read as the IPv4 address it is.
fn canonical_ip(ip: &str) -> Option<IpAddr> {
    ip.trim().parse().ok().map(|ip: IpAddr| ip.to_canonical())
}

/// A CORS origin: scheme and host (and port), nothing after them, e.g. `http://localhost:3000`.
fn cors_origin(origin: &str) -> Option<String> {
    let url = http_url(origin)?;
    (url.path() == "/" && !origin.ends_with('/')).then(|| origin.to_string())
}

fn parse_database_url(url: &str) -> Result<DatabaseUrl, String> {
    let invalid = |why: &str| format!("DATABASE_URL: {why}: {:?}", redact_url(url));
    if url == "sqlite::memory:" || url == "sqlite://:memory:" {
        // diesel's SQLite driver knows only SQLite's own spelling.
        return Ok(DatabaseUrl::Sqlite(":memory:".into()));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(invalid("no file path after sqlite://"));
        }
        return Ok(DatabaseUrl::Sqlite(path.into()));
    }
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(invalid(
            "expected sqlite://PATH, sqlite::memory: or postgres://…",
        ));
    }
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| invalid(&format!("not a valid PostgreSQL URL ({e})")))?;
    Ok(DatabaseUrl::Postgres(url.into()))
}

/// A database URL fit for a log line: the password, if any, replaced. A URL too malformed to
/// find the password in (a port out of range, say) shows only its scheme: the password could be
/// anywhere in the rest.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) if !url.contains('@') => url.to_string(),
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "…".into(),
        },
    }
}

// =================================================================================================
// 2. Models
// =================================================================================================

// One schema serves both backends. Timestamps are UTC without a zone on both, so SQLite and
// PostgreSQL read back exactly what was written (microseconds: see `now()`).
diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        name -> Nullable<Text>,
        /// NULL for users who sign in through an external issuer and have no password here.
        password_hash -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        /// NULL for a local account; for an account created from an external token, its issuer.
        issuer -> Nullable<Text>,
        /// How many times the password has changed; a local token is good only for the current
        /// value (see `Claims::gen`).
        token_generation -> BigInt,
    }
}

diesel::table! {
    tasks (id) {
        id -> BigInt,
        user_id -> Text,
        title -> Text,
        description -> Nullable<Text>,
        completed -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

// Failed password attempts per bucket; see `Bucket`.
diesel::table! {
    login_throttle (bucket) {
        bucket -> Text,
        window_started_ms -> BigInt,
        attempts -> Integer,
    }
}

diesel::joinable!(tasks -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(users, tasks);

#[diesel::declare_sql_function]
extern "SQL" {
    /// SQL's `lower()`. PostgreSQL folds Unicode; on SQLite, whose built-in folds only ASCII,
    /// every connection replaces it with Rust's `str::to_lowercase` (see the pool).
    fn lower(
        text: diesel::sql_types::Nullable<diesel::sql_types::Text>,
    ) -> diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

/// The current time as stored: UTC, truncated to microseconds because PostgreSQL keeps no more.
fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

/// How every timestamp is sent: RFC 3339 in UTC with six digits of fraction and a `Z`
/// (`2026-11-28T18:45:34.123456Z`), whatever the backend stored.
fn utc<S: Serializer>(time: &NaiveDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let text = time
        .and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    serializer.serialize_str(&text)
}

/// A user as clients see it. It has no password hash field, so no response can leak one.
#[derive(Queryable, Selectable, Serialize, ToSchema, Debug)]
#[diesel(table_name = users)]
struct User {
    #[schema(example = "9b2f7c3e-4a51-4f0e-9a8e-2d1c5b7e6f10")]
    id: String,
    #[schema(example = "alice@example.com")]
    email: String,
    /// `null` when the user has not given one.
    #[schema(required = true)]
    name: Option<String>,
    #[serde(serialize_with = "utc")]
    created_at: NaiveDateTime,
    #[serde(serialize_with = "utc")]
    updated_at: NaiveDateTime,
    /// Server-side only: who vouches for the account (see the `users` table).
    #[serde(skip)]
    issuer: Option<String>,
    #[serde(skip)]
    token_generation: i64,
}

/// A user's row as inserted. `None` is written as NULL, not as SQL's `DEFAULT`: a statement
/// with `DEFAULT` in place of some values has a text of its own, so diesel does not keep it
/// prepared, and every insert paid for parsing and planning it again (and, on PostgreSQL, a
/// round trip to prepare it).
#[derive(Insertable)]
#[diesel(table_name = users, treat_none_as_default_value = false)]
struct NewUser<'a> {
    id: &'a str,
    email: &'a str,
    name: Option<&'a str>,
    password_hash: Option<&'a str>,
    issuer: Option<&'a str>,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

#[derive(Queryable, Selectable, Serialize, ToSchema, Debug)]
#[diesel(table_name = tasks)]
struct Task {
    #[schema(example = 1)]
    id: i64,
    user_id: String,
    #[schema(example = "Buy milk")]
    title: String,
    /// `null` when the task has none.
    #[schema(required = true)]
    description: Option<String>,
    completed: bool,
    #[serde(serialize_with = "utc")]
    created_at: NaiveDateTime,
    #[serde(serialize_with = "utc")]
    updated_at: NaiveDateTime,
}

// ----- Request and response bodies ---------------------------------------------------------------
//
// Request types are read field by field (see "Reading input" below), not through serde, so that
// every problem of an input is reported at once. Their `#[schema]` attributes must therefore say
// what is required and what may be `null`: no serde attribute says it for them.

/// Declares a request type together with how each field is read, one line per field:
/// `name: Type = how(check)`, where `how` is `required`, `optional` or `nullable` (see `Fields`)
/// and `check` one of the checks under "Reading input"; `.then(…)` calls may follow, e.g.
/// `.unwrap_or(false)` for a default. It expands to the struct (with `ToSchema`, so the OpenAPI
/// document describes it) and its `FromFields`, so a field is declared, documented and
/// validated in one place.
macro_rules! request_type {
    (
        $(#[$attr:meta])*
        struct $name:ident {
            $(
                $(#[$field_attr:meta])*
                $field:ident: $type:ty = $how:ident($check:expr) $(.$then:ident($($arg:expr)?))*
            ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(ToSchema)]
        struct $name {
            $($(#[$field_attr])* $field: $type,)*
        }

        impl FromFields for $name {
            fn from_fields(f: &mut Fields) -> Self {
                $name {
                    $($field: f.$how(stringify!($field), $check)$(.$then($($arg)?))*,)*
                }
            }
        }
    };
}

request_type! {
    struct RegisterRequest {
        #[schema(format = "email", max_length = 254, example = "alice@example.com")]
        email: String = required(email),
        #[schema(min_length = 8, max_length = 72, format = Password)]
        password: String = required(new_password),
        #[schema(max_length = 100)]
        name: Option<String> = nullable(at_most::<NAME_MAX_CHARS>).flatten(),
    }
}

request_type! {
    // Login input is not checked beyond its types: a malformed email or an impossible password
    // is just a failed login (401), so it looks like every other failed login.
    struct LoginRequest {
        #[schema(format = "email", example = "alice@example.com")]
        email: String = required(any),
        #[schema(format = Password)]
        password: String = required(any),
    }
}

request_type! {
    /// The OAuth2 password flow's form (what FastAPI's `OAuth2PasswordRequestForm` reads).
    // `scope`, `client_id` and `client_secret` are read (so they are checked like any input) and
    // then not used: this API has no scopes and one kind of client.
    #[allow(dead_code)]
    struct TokenForm {
        /// The account's email.
        username: String = required(any),
        #[schema(format = Password)]
        password: String = required(any),
        #[schema(value_type = String, required = false, pattern = "^password$")]
        grant_type: Option<String> = optional(password_grant),
        /// Accepted from OAuth2 clients; this API has no scopes to grant.
        #[schema(value_type = String, required = false)]
        scope: Option<String> = optional(any),
        /// Accepted from OAuth2 clients and not used.
        #[schema(value_type = String, required = false)]
        client_id: Option<String> = optional(any),
        /// Accepted from OAuth2 clients and not used.
        #[schema(value_type = String, required = false, format = Password)]
        client_secret: Option<String> = optional(any),
    }
}

#[derive(Serialize, ToSchema)]
struct TokenResponse {
    access_token: String,
    #[schema(inline)]
    token_type: TokenType,
    /// Lifetime of the token in seconds.
    #[schema(example = 1800)]
    expires_in: u64,
}

// The only kind of token this API issues.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum TokenType {
    Bearer,
}

request_type! {
    // Also the changeset: `None` leaves a column as it is, `Some(None)` sets it to NULL.
    #[derive(AsChangeset)]
    #[diesel(table_name = users)]
    struct UserUpdate {
        /// `null` clears the name; leaving the key out keeps it.
        #[schema(value_type = Option<String>, required = false, max_length = 100)]
        name: Option<Option<String>> = nullable(at_most::<NAME_MAX_CHARS>),
        /// Leaving the key out keeps the email; `null` is refused.
        #[schema(value_type = String, required = false, format = "email", max_length = 254)]
        email: Option<String> = optional(email),
    }
}

request_type! {
    struct PasswordChange {
        #[schema(format = Password)]
        current_password: String = required(any),
        #[schema(min_length = 8, max_length = 72, format = Password)]
        new_password: String = required(new_password),
    }
}

request_type! {
    /// The body of `POST` (create) and `PUT` (full replace) on a task.
    // Also the task's insertable columns and PUT's changeset, in which a missing `description`
    // is written as NULL. In the INSERT too: a `None` written as SQL's `DEFAULT` (diesel's
    // default for inserts) would change the statement's text, so diesel would prepare it anew
    // for every insert instead of keeping it prepared (see `NewUser`).
    #[derive(Insertable, AsChangeset)]
    #[diesel(table_name = tasks, treat_none_as_null = true)]
    #[diesel(treat_none_as_default_value = false)]
    struct TaskInput {
        #[schema(min_length = 1, max_length = 200, example = "Buy milk")]
        title: String = required(title),
        #[schema(max_length = 1000)]
        description: Option<String> = nullable(at_most::<DESCRIPTION_MAX_CHARS>).flatten(),
        /// `false` when left out.
        // Not `default = false`: openapi-typescript (7, by default) makes a property with a
        // default required in the generated type, which would force clients to send it.
        #[schema(required = false)]
        completed: bool = optional(any).unwrap_or(false),
    }
}

request_type! {
    /// The body of `PATCH` on a task: only the keys sent change; `"description": null` clears it.
    // Also PATCH's changeset: `None` leaves a column as it is, `Some(None)` sets it to NULL.
    #[derive(AsChangeset)]
    #[diesel(table_name = tasks)]
    struct TaskPatch {
        #[schema(value_type = String, required = false, min_length = 1, max_length = 200)]
        title: Option<String> = optional(title),
        #[schema(value_type = Option<String>, required = false, max_length = 1000)]
        description: Option<Option<String>> = nullable(at_most::<DESCRIPTION_MAX_CHARS>),
        #[schema(value_type = bool, required = false)]
        completed: Option<bool> = optional(any),
    }
}

request_type! {
    #[derive(IntoParams)]
    #[into_params(parameter_in = Query)]
    struct TaskListQuery {
        /// Which tasks to list.
        #[param(inline, required = false)]
        status: StatusFilter = optional(any).unwrap_or_default(),
        #[param(inline, required = false)]
        sort: SortKey = optional(any).unwrap_or_default(),
        /// Sort direction; ties are broken by id in the same direction.
        #[param(inline, required = false)]
        order: SortOrder = optional(any).unwrap_or_default(),
        /// Case-insensitive substring of the title or the description.
        #[param(max_length = 200)]
        q: Option<String> = optional(at_most::<SEARCH_MAX_CHARS>),
        #[param(minimum = 1, maximum = 1000, default = 100)]
        limit: Option<i64> = optional(between::<1, 1000>),
        #[param(minimum = 0, default = 0)]
        offset: Option<i64> = optional(between::<0, { i64::MAX }>),
    }
}

/// `$owner`'s tasks that pass `$query`'s filters (a `TaskListQuery`), boxed so that filters can
/// be added one by one: to be sorted and paged, or counted.
///
/// This and `sorted_tasks!` are macros rather than functions because a query's type differs per
/// backend: `db!` expands them once for each, and the compiler checks both.
macro_rules! matching_tasks {
    ($query:expr, $owner:expr) => {{
        let mut matching = tasks::table.filter(tasks::user_id.eq($owner)).into_boxed();
        if let Some(completed) = $query.status.completed() {
            matching = matching.filter(tasks::completed.eq(completed));
        }
        if let Some(search) = $query.q.as_deref().filter(|q| !q.is_empty()) {
            // Both sides go through the same `lower()`: lower-casing the search in Rust instead
            // would miss titles where the database's rules differ from Rust's (a Greek final
            // sigma, a Turkish dotted İ) on PostgreSQL.
            let pattern = like_pattern(search);
            let title = lower(tasks::title.nullable()).like(lower(pattern.clone()));
            let description = lower(tasks::description).like(lower(pattern));
            matching = matching.filter(title.escape('\\').or(description.escape('\\')));
        }
        matching
    }};
}

/// `%`, `_` and `\` in a search are literal characters, not wildcards.
fn like_pattern(search: &str) -> String {
    let mut pattern = String::with_capacity(search.len() + 2);
    pattern.push('%');
    for c in search.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[derive(Deserialize, ToSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
#[schema(default = "all")]
enum StatusFilter {
    #[default]
    All,
    Pending,
    Completed,
}

impl StatusFilter {
    /// The value of `completed` it keeps, or `None` for every task.
    fn completed(self) -> Option<bool> {
        match self {
            StatusFilter::All => None,
            StatusFilter::Pending => Some(false),
            StatusFilter::Completed => Some(true),
        }
    }
}

#[derive(Deserialize, ToSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
#[schema(default = "created")]
enum SortKey {
    #[default]
    Created,
    Updated,
    Title,
}

/// `$tasks` (a boxed task query) ordered by `$key`, a `SortKey`, in `$order`.
macro_rules! sorted_tasks {
    ($tasks:expr, $key:expr, $order:expr) => {
        match $key {
            SortKey::Created => ordered_by!($tasks, tasks::created_at, $order),
            SortKey::Updated => ordered_by!($tasks, tasks::updated_at, $order),
            SortKey::Title => ordered_by!($tasks, tasks::title, $order),
        }
    };
}

/// `$tasks` ordered by `$column` in `$order`, ties broken by id in the same direction.
macro_rules! ordered_by {
    ($tasks:expr, $column:expr, $order:expr) => {
        match $order {
            SortOrder::Asc => $tasks.order(($column.asc(), tasks::id.asc())),
            SortOrder::Desc => $tasks.order(($column.desc(), tasks::id.desc())),
        }
    };
}

#[derive(Deserialize, ToSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
#[schema(default = "desc")]
enum SortOrder {
    Asc,
    #[default]
    Desc,
}

#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(inline)]
    status: HealthStatus,
    /// `ok`, or why the database does not answer: `cannot connect`, `timed out` or
    /// `query failed`.
    #[schema(example = "ok")]
    database: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum HealthStatus {
    Ok,
    Unavailable,
}

/// Every error but 422: `{"detail": "…"}`. Each response declares its own example (below).
#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    detail: String,
}

/// 422: `{"detail": [{"loc": ["body", "title"], "msg": "…", "type": "…"}]}`, as FastAPI.
#[derive(Serialize, ToSchema)]
struct ValidationErrorBody {
    detail: Vec<FieldError>,
}

#[derive(Serialize, ToSchema, Debug, Clone)]
struct FieldError {
    #[schema(value_type = Vec<String>, example = json!(["body", "title"]))]
    loc: Vec<serde_json::Value>,
    msg: String,
    #[serde(rename = "type")]
    kind: String,
}

fn field_error(loc: &[&str], msg: impl Into<String>, kind: &str) -> FieldError {
    FieldError {
        loc: loc.iter().map(|p| json!(p)).collect(),
        msg: msg.into(),
        kind: kind.into(),
    }
}

// ----- Reading input: what pydantic did for the Python original --------------------------------
//
// A JSON body, a form or a query string is first parsed into name → value, then each field is
// read on its own: every problem of the input is reported at once, each located by `loc`, as
// pydantic does (a React form maps them to its fields). Messages and types are pydantic's, one per
// kind of problem, and never quote the submitted value, which could be a password.

/// What is wrong with one value: pydantic's `msg` and `type`.
type Problem = (String, &'static str);

fn problem(msg: impl Into<String>, kind: &'static str) -> Problem {
    (msg.into(), kind)
}

/// A type a field can hold, read from a JSON value. `null` is refused like any other wrong
/// value (with the same message); fields that accept `null` say so when they are read.
trait FieldType: Sized {
    fn from_value(value: serde_json::Value) -> Result<Self, Problem>;
}

impl FieldType for String {
    fn from_value(value: serde_json::Value) -> Result<Self, Problem> {
        match value {
            // PostgreSQL text cannot hold U+0000 (SQLite can): refused everywhere, so both
            // backends answer the same 422 instead of one of them a 500.
            serde_json::Value::String(s) if s.contains('\0') => Err(problem(
                "String should not contain NUL characters",
                "string_nul",
            )),
            serde_json::Value::String(s) => Ok(s),
            _ => Err(problem("Input should be a valid string", "string_type")),
        }
    }
}

impl FieldType for bool {
    fn from_value(value: serde_json::Value) -> Result<Self, Problem> {
        // Strict: "yes" or 1 is not a boolean here (a client sending one has a bug to hear about).
        value
            .as_bool()
            .ok_or_else(|| problem("Input should be a valid boolean", "bool_type"))
    }
}

impl FieldType for i64 {
    fn from_value(value: serde_json::Value) -> Result<Self, Problem> {
        // Query values arrive as text.
        match &value {
            serde_json::Value::String(s) => s.parse().ok(),
            _ => value.as_i64(),
        }
        .ok_or_else(|| problem("Input should be a valid integer", "int_parsing"))
    }
}

/// Fields that hold one of a few words, the enums of the list query: serde's names for the
/// variants decide what is accepted, and the message lists the same words, from the enum's
/// OpenAPI schema, the way pydantic does (`Input should be 'asc' or 'desc'`).
macro_rules! one_of_field {
    ($($type:ty),*) => {$(
        impl FieldType for $type {
            fn from_value(value: serde_json::Value) -> Result<Self, Problem> {
                serde_json::from_value(value)
                    .map_err(|_| problem(format!("Input should be {}", one_of::<$type>()), "enum"))
            }
        }
    )*};
}
one_of_field!(StatusFilter, SortKey, SortOrder);

/// An enum's words as pydantic lists them: `'a', 'b' or 'c'`.
fn one_of<T: utoipa::PartialSchema>() -> String {
    let schema = serde_json::to_value(T::schema()).unwrap_or_default();
    let words = schema["enum"].as_array().cloned().unwrap_or_default();
    let quoted: Vec<String> = words
        .iter()
        .filter_map(|w| Some(format!("'{}'", w.as_str()?)))
        .collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

/// The fields of one input, taken out one by one; the problems found so far.
struct Fields {
    /// `body` or `query`: the first element of every `loc`.
    place: &'static str,
    values: serde_json::Map<String, serde_json::Value>,
    errors: Vec<FieldError>,
}

/// A request type, read from `Fields` (`request_type!` writes the impls).
trait FromFields: Sized {
    fn from_fields(fields: &mut Fields) -> Self;
}

impl Fields {
    /// Reads a `T` from name → value pairs: the value, or every problem found.
    fn parse<T: FromFields>(
        place: &'static str,
        values: serde_json::Map<String, serde_json::Value>,
    ) -> Result<T, ApiError> {
        let mut fields = Fields {
            place,
            values,
            errors: Vec::new(),
        };
        let value = T::from_fields(&mut fields);
        if fields.errors.is_empty() {
            Ok(value)
        } else {
            Err(ApiError::Invalid(fields.errors))
        }
    }

    /// `name`'s value, checked by `check` (which may also normalize it): `None` when absent,
    /// `Some(None)` for a `null` that `nullable` allows. A problem is recorded and reads as
    /// absent; once there is a problem the value read is never used.
    fn read<T: FieldType>(
        &mut self,
        name: &str,
        nullable: bool,
        check: impl FnOnce(&mut T) -> Result<(), Problem>,
    ) -> Option<Option<T>> {
        let value = self.values.remove(name)?;
        if nullable && value.is_null() {
            return Some(None);
        }
        let checked = T::from_value(value).and_then(|mut v| check(&mut v).map(|()| v));
        match checked {
            Ok(v) => Some(Some(v)),
            Err((msg, kind)) => {
                self.errors
                    .push(field_error(&[self.place, name], msg, kind));
                None
            }
        }
    }

    /// A field that must be sent, and not as `null`.
    fn required<T: FieldType + Default>(
        &mut self,
        name: &str,
        check: impl FnOnce(&mut T) -> Result<(), Problem>,
    ) -> T {
        if !self.values.contains_key(name) {
            self.errors.push(field_error(
                &[self.place, name],
                "Field required",
                "missing",
            ));
        }
        self.read(name, false, check).flatten().unwrap_or_default()
    }

    /// A field that may be left out, but not sent as `null`.
    fn optional<T: FieldType>(
        &mut self,
        name: &str,
        check: impl FnOnce(&mut T) -> Result<(), Problem>,
    ) -> Option<T> {
        self.read(name, false, check).flatten()
    }

    /// A field that may be left out or be `null`: `Some(None)` is a `null` (PATCH's "clear it").
    fn nullable<T: FieldType>(
        &mut self,
        name: &str,
        check: impl FnOnce(&mut T) -> Result<(), Problem>,
    ) -> Option<Option<T>> {
        self.read(name, true, check)
    }
}

// Checks of single values. They may normalize the value they check (trim, lower-case).

const TITLE_MAX_CHARS: usize = 200;
const DESCRIPTION_MAX_CHARS: usize = 1000;
const NAME_MAX_CHARS: usize = 100;
const EMAIL_MAX_CHARS: usize = 254;
const SEARCH_MAX_CHARS: usize = 200;
const PASSWORD_MIN_CHARS: usize = 8;
/// bcrypt reads only this many bytes; longer passwords are refused, never silently truncated.
const PASSWORD_MAX_BYTES: usize = 72;

/// Any value of the right type.
fn any<T>(_: &mut T) -> Result<(), Problem> {
    Ok(())
}

/// Emails compare case-insensitively and by what they show: stored trimmed, in Unicode NFC
/// (`josé` typed as `e` + accent is the same address as with `é`) and lower-cased.
fn normalize_email(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    email.trim().nfc().collect::<String>().to_lowercase()
}

/// Characters that do not show, or that reorder what is shown (bidirectional controls): an
/// address holding one looks like another account's.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{AD}' | '\u{61C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
        )
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

fn email(email: &mut String) -> Result<(), Problem> {
    *email = normalize_email(email);
    let well_formed = email.chars().count() <= EMAIL_MAX_CHARS
        && !email.chars().any(invisible)
        && email_address::EmailAddress::is_valid(email)
        && email.rsplit_once('@').is_some_and(|(_, domain)| {
            domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        });
    if well_formed {
        Ok(())
    } else {
        Err(problem("value is not a valid email address", "value_error"))
    }
}

/// A password to be hashed: bcrypt's 72-byte limit is refused, never silently truncated.
#[allow(clippy::ptr_arg)] // every check takes `&mut`: some normalize the value
fn new_password(password: &mut String) -> Result<(), Problem> {
    if password.chars().count() < PASSWORD_MIN_CHARS {
        Err(problem(
            format!("String should have at least {PASSWORD_MIN_CHARS} characters"),
            "string_too_short",
        ))
    } else if password.len() > PASSWORD_MAX_BYTES {
        Err(problem(
            format!("Password must be at most {PASSWORD_MAX_BYTES} bytes (bcrypt's limit)"),
            "string_too_long",
        ))
    } else {
        Ok(())
    }
}

#[allow(clippy::ptr_arg)] // every check takes `&mut`: some normalize the value
fn at_most<const MAX: usize>(value: &mut String) -> Result<(), Problem> {
    if value.chars().count() > MAX {
        Err(problem(
            format!("String should have at most {MAX} characters"),
            "string_too_long",
        ))
    } else {
        Ok(())
    }
}

fn title(title: &mut String) -> Result<(), Problem> {
    *title = title.trim().to_string();
    if title.is_empty() {
        return Err(problem(
            "String should have at least 1 character",
            "string_too_short",
        ));
    }
    at_most::<TITLE_MAX_CHARS>(title)
}

fn password_grant(grant_type: &mut String) -> Result<(), Problem> {
    if grant_type == "password" {
        Ok(())
    } else {
        Err(problem(
            "String should match pattern '^password$'",
            "string_pattern_mismatch",
        ))
    }
}

/// An integer from `MIN` to `MAX`.
fn between<const MIN: i64, const MAX: i64>(value: &mut i64) -> Result<(), Problem> {
    if *value < MIN {
        let msg = format!("Input should be greater than or equal to {MIN}");
        Err(problem(msg, "greater_than_equal"))
    } else if *value > MAX {
        let msg = format!("Input should be less than or equal to {MAX}");
        Err(problem(msg, "less_than_equal"))
    } else {
        Ok(())
    }
}

// ----- Errors: one type, rendered the way FastAPI renders them ----------------------------------

/// Every way a request can fail. Handlers return `Result<_, ApiError>` and use `?`; the
/// `ResponseError` impl below is the only place that turns failures into HTTP.
/// Its `Display` (thiserror's `#[error]`) is the `detail` sent, except for 422, 500 and 503.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// 401, with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    /// 422 with FastAPI's list of field errors.
    #[error("invalid input: {0:?}")]
    Invalid(Vec<FieldError>),
    #[error("{detail}")]
    TooManyRequests {
        retry_after: Duration,
        detail: &'static str,
    },
    /// A status decided by the framework (404 / 405 / 413 / 415 …) with its message.
    #[error("{1}")]
    Status(StatusCode, String),
    /// 503: the database did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the cause is logged, never sent.
    #[error("{0}")]
    Internal(String),
}

/// What handlers and helpers return: `?` turns any error that converts into `ApiError`.
type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Status(status, _) => *status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        // Set here too: an error raised by a middleware (a caught panic) skips DefaultHeaders.
        response.insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
        if self.status_code() == StatusCode::REQUEST_TIMEOUT {
            // The rest of a body that came too slowly is not waited for: hang up.
            response.force_close();
        }
        let detail = match self {
            ApiError::Invalid(errors) => {
                return response.json(ValidationErrorBody {
                    detail: errors.clone(),
                })
            }
            ApiError::Unauthorized(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
                self.to_string()
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                response.insert_header((
                    header::RETRY_AFTER,
                    retry_after.as_secs().max(1).to_string(),
                ));
                self.to_string()
            }
            ApiError::Unavailable(cause) => {
                log::warn!("database unavailable: {cause}");
                "Database unavailable".into()
            }
            ApiError::Internal(cause) => {
                log::error!("internal error: {cause}");
                "Internal Server Error".into()
            }
            _ => self.to_string(),
        };
        response.json(ErrorDetail { detail })
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match &error {
            // Constraints are told apart by name, not by kind: only the email's uniqueness is
            // the client's "taken" (PostgreSQL names the constraint; SQLite names the column).
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
                if info.constraint_name() == Some("users_email_key")
                    || info.message().ends_with("users.email") =>
            {
                ApiError::Conflict("Email already registered")
            }
            // The one foreign key is tasks.user_id: the account was deleted while a request of
            // its own was on the way, so its token no longer names anyone.
            Error::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => INVALID_TOKEN,
            // The connection is gone: the server restarted, or closed it.
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
            | Error::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => {
                ApiError::Unavailable(error.to_string())
            }
            // SQLite's lock timeout: the database is overloaded, not broken.
            Error::DatabaseError(_, info) if info.message().contains("database is locked") => {
                ApiError::Unavailable(error.to_string())
            }
            _ => ApiError::Internal(format!("database error: {error}")),
        }
    }
}

impl<E: fmt::Display> From<bb8::RunError<E>> for ApiError {
    fn from(error: bb8::RunError<E>) -> Self {
        ApiError::Unavailable(match error {
            bb8::RunError::TimedOut => "no database connection became available in time".into(),
            bb8::RunError::User(e) => e.to_string(),
        })
    }
}

// ----- Extractors for bodies and queries --------------------------------------------------------
//
// actix's own `web::Json` / `web::Form` / `web::Query` report *that* parsing failed, not *where*,
// and stop at the first problem. These read the input as name → value and then `FromFields`.

const JSON_LIMIT: usize = 64 * 1024;
const FORM_LIMIT: usize = 4 * 1024;

/// A JSON body (`application/json`, at most 64 KiB) read but not yet looked at. Handlers `parse`
/// it once the other extractors have run, as FastAPI runs its auth dependency before it
/// validates the body: a bad token is a 401 and a request for another user's tasks a 403
/// whatever the body, not a 422 that tells a stranger how the route validates. (Extractors run
/// concurrently and the first to fail decides the answer, so a parsing extractor next to
/// `CurrentUser` could not promise it.)
struct JsonBody(Result<web::Bytes, ApiError>);

/// A `application/x-www-form-urlencoded` body (at most 4 KiB), read and checked.
struct Form<T>(T);

impl FromRequest for JsonBody {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    /// Never fails: what is wrong with the body (413, 415) waits for `parse`.
    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let is_json = content_type(req).is_none_or(|mime| {
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
        let body = read_body(req, payload, JSON_LIMIT);
        async move {
            if !is_json {
                return Ok(JsonBody(Err(ApiError::Status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Unsupported media type: expected application/json".into(),
                ))));
            }
            Ok(JsonBody(body.await))
        }
        .boxed_local()
    }
}

impl JsonBody {
    /// Parses a JSON object body the way pydantic does: one object, nothing after it, every
    /// problem located by field.
    fn parse<T: FromFields>(self) -> Result<T, ApiError> {
        let bytes = self.0?;
        // A UTF-8 byte order mark is allowed in front, as Python's `json.loads` allows it.
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let body_error =
            |msg: &str, kind: &str| ApiError::Invalid(vec![field_error(&["body"], msg, kind)]);
        match bytes.trim_ascii_start().first() {
            None => return Err(body_error("Field required", "missing")),
            Some(b'{') => {}
            Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                return Err(body_error(
                    "Input should be a valid dictionary or object to extract fields from",
                    "model_attributes_type",
                ))
            }
            Some(_) => return Err(body_error("JSON decode error", "json_invalid")),
        }
        // Trailing bytes after the object are malformed JSON too, not something to ignore.
        let object = serde_json::from_slice(bytes)
            .map_err(|_| body_error("JSON decode error", "json_invalid"))?;
        Fields::parse("body", object)
    }
}

impl<T: FromFields + 'static> FromRequest for Form<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        // A form comes URL-encoded or, from a browser's `FormData`, as multipart; FastAPI reads
        // both. Anything else reads as an empty form, so the client learns which fields are
        // missing (as FastAPI answers a JSON body sent to a form route).
        let is_form =
            content_type(req).is_some_and(|mime| mime == "application/x-www-form-urlencoded");
        let raw_type = req.headers().get(header::CONTENT_TYPE);
        let boundary = raw_type.and_then(|v| multer::parse_boundary(v.to_str().ok()?).ok());
        let body = read_body(req, payload, FORM_LIMIT);
        async move {
            let bytes = body.await?;
            let fields = match boundary {
                Some(boundary) => multipart(bytes, boundary).await?,
                None => urlencoded(if is_form { &bytes } else { b"" }, false),
            };
            Fields::parse("body", fields).map(Form)
        }
        .boxed_local()
    }
}

/// A `multipart/form-data` body as name → value (text), like `urlencoded`'s. Malformed, it is
/// FastAPI's 400.
async fn multipart(
    body: web::Bytes,
    boundary: String,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let body = futures_util::stream::once(async { Ok::<_, std::convert::Infallible>(body) });
    let mut parts = multer::Multipart::new(body, boundary);
    let malformed = |_| ApiError::BadRequest("There was an error parsing the body");
    let mut fields = serde_json::Map::new();
    while let Some(part) = parts.next_field().await.map_err(malformed)? {
        let name = part.name().map(str::to_string);
        let value = part.text().await.map_err(malformed)?;
        // An empty field counts as absent, as in a URL-encoded form.
        if let Some(name) = name.filter(|_| !value.is_empty()) {
            fields.insert(name, value.into());
        }
    }
    Ok(fields)
}

/// The query string, read and checked. A function rather than an extractor, so the task list
/// checks the caller first, as the routes with a body do.
fn query<T: FromFields>(req: &HttpRequest) -> Result<T, ApiError> {
    Fields::parse("query", urlencoded(req.query_string().as_bytes(), true))
}

/// `a=1&b=2` as name → value (text). A name given twice keeps its last value, as Starlette does.
/// An empty field counts as absent, as FastAPI has it in forms (`grant_type=` is fine), unless
/// `keep_empty`: in a query string FastAPI reads `limit=` as an empty value (a 422 for a number).
fn urlencoded(input: &[u8], keep_empty: bool) -> serde_json::Map<String, serde_json::Value> {
    form_urlencoded::parse(input)
        .filter(|(_, value)| keep_empty || !value.is_empty())
        .map(|(name, value)| (name.into_owned(), value.into_owned().into()))
        .collect()
}

/// The media type of the body (`application/json`, lower case, no parameters), if one is named.
fn content_type(req: &HttpRequest) -> Option<String> {
    let named = req.headers().contains_key(header::CONTENT_TYPE);
    named.then(|| req.content_type().to_ascii_lowercase())
}

/// Reads the whole body, refusing (413) as soon as it grows past `limit`.
fn read_body(
    req: &HttpRequest,
    payload: &mut Payload,
    limit: usize,
) -> LocalBoxFuture<'static, Result<web::Bytes>> {
    let too_large = ApiError::Status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("Request body is larger than {limit} bytes"),
    );
    let declared = req.headers().get(header::CONTENT_LENGTH);
    let declared: Option<usize> = declared.and_then(|v| v.to_str().ok()?.parse().ok());
    // actix bounds the time to send the request head, not the body: without a deadline a client
    // that trickles a byte a second holds its connection (and its memory) for as long as it likes.
    let deadline = req
        .app_data::<State>()
        .map_or(DEFAULT_BODY_TIMEOUT, |state| state.body_timeout);
    let payload = web::Payload::from_request(req, payload);
    async move {
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large);
        }
        let body = payload
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        match actix_web::rt::time::timeout(deadline, body.to_bytes_limited(limit)).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(e))) => Err(ApiError::Status(
                StatusCode::BAD_REQUEST,
                format!("Could not read the request body: {e}"),
            )),
            Ok(Err(_)) => Err(too_large),
            Err(_) => Err(ApiError::Status(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body did not arrive within {} seconds",
                    deadline.as_secs_f64()
                ),
            )),
        }
    }
    .boxed_local()
}

// =================================================================================================
// 3. Database pool
// =================================================================================================

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The configured database: SQLite (embedded, the default) or PostgreSQL (a server, by URL),
/// each behind bb8 pools of diesel-async connections. Every worker thread has a `Database` of
/// its own (`for_this_worker`); handlers reach it as `state.db` and query it through `db!`.
#[derive(Clone)]
enum Database {
    Sqlite(SqlitePools),
    Postgres(PgDatabase),
}

/// Runs `$query` (a future yielding `QueryResult<T>`) with `$conn` bound to a connection, giving
/// `Result<T, ApiError>`: the one way this file runs a query.
///
/// The body is expanded once per backend, the way vaultwarden's `db_run!` does it: each query is
/// written once and compiled, type-checked, against both SQLite and PostgreSQL. `read` or
/// `write` says what the body does (SQLite sends writes to its one writer: see `SqlitePools`).
/// Waiting for a connection and the statements together are bounded by `DATABASE_TIMEOUT`, so a
/// database that is down or stalled costs a request a 503 after seconds, never a hang.
macro_rules! db {
    ($database:expr, $role:ident, |$conn:ident| $query:expr) => {{
        let database: &Database = &$database;
        database
            .within_timeout(async {
                use diesel_async::RunQueryDsl as _;
                match database {
                    Database::Sqlite(sqlite) => {
                        let (mut pooled, _turn) = sqlite.$role().await?;
                        let $conn = &mut pooled.conn;
                        $query.await.map_err(ApiError::from)
                    }
                    Database::Postgres(pg) => {
                        let mut pooled = pg.connection().await?;
                        let $conn = &mut *pooled;
                        $query.await.map_err(ApiError::from)
                    }
                }
            })
            .await
    }};
}

/// `UPDATE … SET $changes, updated_at = now RETURNING *` on `$row`, a query for at most one row
/// of `$table`: `Some` of the row as it is now, or `None` if there is no such row. A macro, as
/// `db!` is: each changeset is a type of its own.
macro_rules! update_returning {
    ($database:expr, $row:expr, $changes:expr, $table:ident => $Row:ty) => {
        db!($database, write, |conn| diesel::update($row)
            .set(($changes, $table::updated_at.eq(now())))
            .returning(<$Row>::as_returning())
            .get_result::<$Row>(conn)
            .map(OptionalExtension::optional))
    };
}

impl Database {
    /// Brings the schema up to date and opens the pools; runs before the server listens.
    async fn connect(config: &Config) -> Result<Database, String> {
        let timeout = config.database_timeout;
        let (database, migrations) = match &config.database {
            DatabaseUrl::Sqlite(path) => {
                // Each `:memory:` connection is a database of its own, migrated as it opens.
                let migrations = if path == ":memory:" {
                    0
                } else {
                    let mut conn = open_sqlite(path).map_err(|e| e.to_string())?;
                    // Instances started together take turns (an exclusive transaction, waited
                    // for up to the busy timeout): the first migrates, the others then find
                    // nothing left to do.
                    let migrated = conn.exclusive_transaction(|conn| {
                        Ok::<_, diesel::result::Error>(migrate(conn, SQLITE_MIGRATIONS))
                    });
                    migrated.map_err(|e| e.to_string())??
                };
                (
                    Database::Sqlite(SqlitePools::open(path, config)),
                    migrations,
                )
            }
            DatabaseUrl::Postgres(url) => {
                // At startup the server may wait longer than a request would: a database that
                // is itself starting (or a serverless one waking up) should not stop it.
                let startup_timeout = timeout.max(STARTUP_CONNECT_TIMEOUT);
                let migrations = migrate_postgres(url, startup_timeout).await?;
                let per_worker = config
                    .pool_size
                    .unwrap_or(10)
                    .div_ceil(worker_threads() as u32);
                (
                    Database::Postgres(PgDatabase::open(url, per_worker, timeout)),
                    migrations,
                )
            }
        };
        log::info!("database schema up to date ({migrations} migrations applied now)");
        Ok(database)
    }

    /// The `Database` a worker thread uses. SQLite's pools are shared: there must be one writer.
    /// PostgreSQL gets a pool per worker thread: tokio-postgres drives each connection on the
    /// runtime that opened it, so a query and its connection's I/O stay on one thread, and a
    /// worker that stops at shutdown takes only its own idle connections with it.
    fn for_this_worker(&self) -> Database {
        match self {
            Database::Sqlite(sqlite) => Database::Sqlite(sqlite.clone()),
            Database::Postgres(pg) => {
                Database::Postgres(PgDatabase::open(&pg.url, pg.size, pg.timeout))
            }
        }
    }

    /// `run`, or 503 once it has taken longer than `DATABASE_TIMEOUT`.
    async fn within_timeout<T>(
        &self,
        run: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = match self {
            Database::Sqlite(sqlite) => sqlite.timeout,
            Database::Postgres(pg) => pg.timeout,
        };
        let answer = actix_web::rt::time::timeout(timeout, run).await;
        answer.unwrap_or_else(|_| {
            Err(ApiError::Unavailable(
                "the database did not answer in time".into(),
            ))
        })
    }

    /// `SELECT 1` through the pool: the real answer to "is the database up?".
    async fn ping(&self) -> Result<(), ApiError> {
        db!(self, read, |conn| diesel::sql_query("SELECT 1")
            .execute(conn))
        .map(|_| ())
    }
}

// ----- SQLite ------------------------------------------------------------------------------------

/// diesel's SQLite connection made async by diesel-async: each statement runs on actix's
/// blocking thread pool (see `BlockingPool`), never on a worker thread.
type SqliteAsync = SyncConnectionWrapper<SqliteConnection, BlockingPool>;

/// SQLite's pools: readers, and the one writer.
///
/// WAL lets any number of connections read beside one that writes. A single writer connection
/// means writes queue in this process instead of contending for SQLite's file lock. They take
/// turns at a fair semaphore, in arrival order: bb8 alone lets a newcomer take a connection
/// that was just returned before a request that has been waiting for it.
#[derive(Clone)]
struct SqlitePools {
    readers: bb8::Pool<SqliteManager>,
    writer: bb8::Pool<SqliteManager>,
    write_turns: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

impl SqlitePools {
    fn open(path: &str, config: &Config) -> SqlitePools {
        let timeout = config.database_timeout;
        let pool = |size| {
            bb8::Pool::builder()
                .max_size(size)
                .connection_timeout(timeout)
                // A SQLite connection is an open file: nothing to expire or to test.
                .idle_timeout(None)
                .max_lifetime(None)
                .test_on_check_out(false)
                .build_unchecked(SqliteManager { path: path.into() })
        };
        let writer = pool(1);
        // The one `:memory:` database there is lives in the writer's connection.
        let readers = match path {
            ":memory:" => writer.clone(),
            _ => pool(config.pool_size.unwrap_or(SQLITE_READERS)),
        };
        let write_turns = Arc::new(tokio::sync::Semaphore::new(1));
        SqlitePools {
            readers,
            writer,
            write_turns,
            timeout,
        }
    }

    async fn read(&self) -> Result<(SqlitePooled<'_>, Option<WriteTurn<'_>>)> {
        Ok((self.readers.get().await?, None))
    }

    /// The writer, once it is this write's turn (held with it until the `db!` body is done).
    async fn write(&self) -> Result<(SqlitePooled<'_>, Option<WriteTurn<'_>>)> {
        let turn = self.write_turns.acquire().await;
        let turn = turn.map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((self.writer.get().await?, Some(turn)))
    }
}

type SqlitePooled<'a> = bb8::PooledConnection<'a, SqliteManager>;
type WriteTurn<'a> = tokio::sync::SemaphorePermit<'a>;

/// Read connections unless `DATABASE_POOL_SIZE` says otherwise.
const SQLITE_READERS: u32 = 4;

/// A pooled SQLite connection, and how many of its statements are still running.
struct PooledSqlite {
    conn: SqliteAsync,
    running: Arc<AtomicUsize>,
}

/// Opens SQLite connections for bb8 (see `open_sqlite`).
struct SqliteManager {
    path: String,
}

impl bb8::ManageConnection for SqliteManager {
    type Connection = PooledSqlite;
    type Error = diesel::ConnectionError;

    async fn connect(&self) -> ConnectionResult<PooledSqlite> {
        let path = self.path.clone();
        let opened = actix_web::rt::task::spawn_blocking(move || -> ConnectionResult<_> {
            let mut conn = open_sqlite(&path)?;
            if path == ":memory:" {
                migrate(&mut conn, SQLITE_MIGRATIONS)
                    .map_err(diesel::ConnectionError::BadConnection)?;
            }
            Ok(conn)
        });
        let conn = opened
            .await
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))??;
        let running = Arc::<AtomicUsize>::default();
        let spawner = BlockingPool {
            running: running.clone(),
        };
        let conn = SyncConnectionWrapper::with_runtime(conn, spawner);
        Ok(PooledSqlite { conn, running })
    }

    async fn is_valid(&self, _: &mut PooledSqlite) -> ConnectionResult<()> {
        Ok(())
    }

    /// A connection whose statement still runs (its request gave up waiting for it) is closed
    /// once that statement ends, instead of going back to the pool, where the next request
    /// would wait for it. So is one left inside a transaction.
    fn has_broken(&self, pooled: &mut PooledSqlite) -> bool {
        use diesel_async::pooled_connection::PoolableConnection;
        if pooled.running.load(Ordering::Acquire) > 0 {
            // `:memory:`'s one connection is its database: closing it would lose every row.
            return self.path != ":memory:";
        }
        pooled.conn.is_broken()
    }
}

/// Runs a SQLite connection's statements on actix's blocking thread pool (diesel-async's
/// `SpawnBlocking`), counting those that have not finished.
///
/// diesel-async's own spawner waits, with `block_in_place`, for a statement whose future was
/// dropped, such as one whose request timed out; on actix's single-threaded workers that panics.
/// This one lets the statement finish on its thread, and its connection stay out of the pool
/// until then (`SqliteManager::has_broken`).
struct BlockingPool {
    running: Arc<AtomicUsize>,
}

impl SpawnBlocking for BlockingPool {
    fn spawn_blocking<'a, R: Send + 'static>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn std::error::Error + Send + Sync + 'static>>> {
        let running = self.running.clone();
        running.fetch_add(1, Ordering::AcqRel);
        let finished = actix_web::rt::task::spawn_blocking(move || {
            let result = task(); // the statement, and with it diesel-async's hold on the connection
            running.fetch_sub(1, Ordering::AcqRel);
            result
        });
        finished.map_err(Into::into).boxed()
    }

    fn get_runtime() -> Self {
        BlockingPool {
            running: Arc::default(),
        }
    }
}

/// Opens one SQLite connection, set up the way this app needs every connection to be.
fn open_sqlite(path: &str) -> ConnectionResult<SqliteConnection> {
    let mut conn = SqliteConnection::establish(path)?;
    let setup = |conn: &mut SqliteConnection| -> QueryResult<()> {
        // busy_timeout first, so the statements after it wait for a lock instead of failing.
        // WAL lets readers run beside the writer. NORMAL syncs only at checkpoints, and in WAL
        // mode keeps every commit across a crash of this process.
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            "PRAGMA busy_timeout = 5000;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;",
        )?;
        lower_utils::register_impl(conn, |text: Option<String>| text.map(|t| t.to_lowercase()))
    };
    setup(&mut conn).map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// Runs the migrations not yet applied; how many there were.
fn migrate<DB: diesel::backend::Backend>(
    conn: &mut impl MigrationHarness<DB>,
    migrations: EmbeddedMigrations,
) -> Result<usize, String> {
    let applied = conn.run_pending_migrations(migrations);
    applied.map(|v| v.len()).map_err(|e| e.to_string())
}

// ----- PostgreSQL --------------------------------------------------------------------------------

type PgPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// A worker thread's PostgreSQL pool, which fails fast: a server that refuses connections gets
/// its 503 at once, and one that stops answering (frozen, or a network that drops packets)
/// within `timeout`.
#[derive(Clone)]
struct PgDatabase {
    pool: PgPool,
    connect_failures: ConnectFailures,
    url: String,
    /// Connections in this worker's pool: `DATABASE_POOL_SIZE` shared out among the workers.
    size: u32,
    timeout: Duration,
}

/// Where bb8 reports failed connection attempts. bb8 leaves a request waiting for a pooled
/// connection until its timeout even when the attempt made for it has already failed; this
/// wakes such requests so they can answer 503 straight away.
#[derive(Clone, Debug, Default)]
struct ConnectFailures {
    happened: Arc<tokio::sync::Notify>,
    last_error: Arc<std::sync::Mutex<String>>,
}

impl bb8::ErrorSink<PoolError> for ConnectFailures {
    fn sink(&self, error: PoolError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error.to_string();
        self.happened.notify_waiters();
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<PoolError>> {
        Box::new(self.clone())
    }
}

type PgConnection<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

impl PgDatabase {
    fn open(url: &str, size: u32, timeout: Duration) -> PgDatabase {
        let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
        manager_config.custom_setup = Box::new(move |url| connect_postgres(url, timeout).boxed());
        let manager = AsyncDieselConnectionManager::new_with_config(url, manager_config);
        let connect_failures = ConnectFailures::default();
        let pool = bb8::Pool::builder()
            .max_size(size)
            // A connection kept open, so a burst does not start from nothing.
            .min_idle(Some(1))
            .connection_timeout(timeout)
            // A failed attempt is reported (and the request answered) at once; the next request
            // tries again.
            .retry_connection(false)
            .error_sink(Box::new(connect_failures.clone()))
            // A dead connection is dropped on return (diesel-async checks the socket), so there
            // is no need to pay a round trip to test each one on checkout.
            .test_on_check_out(false)
            .build_unchecked(manager);
        let url = url.to_string();
        PgDatabase {
            pool,
            connect_failures,
            url,
            size,
            timeout,
        }
    }

    /// A live pooled connection, or 503 as soon as the server is known to refuse connections.
    async fn connection(&self) -> Result<PgConnection<'_>, ApiError> {
        use diesel_async::pooled_connection::PoolableConnection;
        // Connections the server closed (a restart, say) are still idle in the pool: skip them
        // rather than fail a request on each. Dropping one tells bb8 it is broken.
        for _ in 0..=self.pool.state().connections {
            let mut conn = self.checkout().await?;
            if !conn.is_broken() {
                return Ok(conn);
            }
        }
        Err(ApiError::Unavailable(
            "every pooled connection was closed".into(),
        ))
    }

    /// Waits for a pooled connection. A failed connection attempt ends the wait only when the
    /// pool has no connection left that could come back: while others are merely busy, a
    /// transient failure (a slow handshake on a loaded machine) must not fail every waiter.
    async fn checkout(&self) -> Result<PgConnection<'_>, ApiError> {
        let mut checkout = std::pin::pin!(self.pool.get());
        loop {
            let failed = std::pin::pin!(self.connect_failures.happened.notified());
            match futures_util::future::select(checkout.as_mut(), failed).await {
                Either::Left((conn, _)) => return Ok(conn?),
                Either::Right(_) if self.pool.state().connections == 0 => {
                    let failures = &self.connect_failures;
                    let cause = failures
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    return Err(ApiError::Unavailable(format!("cannot connect: {cause}")));
                }
                Either::Right(_) => {}
            }
        }
    }
}

/// Opens one PostgreSQL connection: over TLS when the URL says `sslmode=require` (as hosted
/// servers such as Neon do), verifying the server's certificate against Mozilla's roots and the
/// system's (which include `SSL_CERT_FILE`); otherwise in plain text, as libpq's default
/// `prefer` ends up doing against a local server with a self-signed certificate.
///
/// A server that accepts the TCP connection but never answers (frozen) would hold the attempt
/// forever: it is given up after `timeout`.
async fn connect_postgres(url: &str, timeout: Duration) -> ConnectionResult<AsyncPgConnection> {
    use diesel::ConnectionError::BadConnection;
    use tokio_postgres::config::SslMode;
    let connect = async {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| BadConnection(format!("{e}")))?;
        if config.get_ssl_mode() != SslMode::Require {
            return <AsyncPgConnection as diesel_async::AsyncConnection>::establish(url).await;
        }
        let tls = postgres_tls();
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|e| BadConnection(e.to_string()))?;
        AsyncPgConnection::try_from_client_and_connection(client, connection).await
    };
    let attempt = actix_web::rt::time::timeout(timeout, connect).await;
    attempt.unwrap_or_else(|_| Err(BadConnection("the server did not answer in time".into())))
}

/// How long startup waits for PostgreSQL to accept its first connection.
const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Brings a PostgreSQL schema up to date. diesel's migration harness is synchronous, so it runs
/// on a blocking thread through diesel-async's wrapper (the async harness would call
/// `block_in_place`, which panics on actix's runtime).
async fn migrate_postgres(url: &str, timeout: Duration) -> Result<usize, String> {
    let conn = connect_postgres(url, timeout)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let migrated = actix_web::rt::task::spawn_blocking(move || {
        use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        // Instances started together take turns: the first migrates, the others then find
        // nothing left to do. The lock is this session's, released when the connection closes.
        let take_turn = diesel::sql_query("SELECT pg_advisory_lock(7101996)");
        diesel::RunQueryDsl::execute(take_turn, &mut conn).map_err(|e| e.to_string())?;
        migrate(&mut conn, POSTGRES_MIGRATIONS)
    });
    migrated.await.map_err(|e| e.to_string())?
}

fn postgres_tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    static TLS: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    let config = TLS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert); // a malformed system certificate is skipped, not fatal
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    });
    tokio_postgres_rustls::MakeRustlsConnect::new(config.clone())
}

// =================================================================================================
// 4. Auth extractor
// =================================================================================================

/// The signed-in user, loaded from the database on every request (so a deleted account's
/// tokens stop working at once). Take it as a handler argument to require a bearer token:
///
/// ```ignore
/// async fn read_me(CurrentUser(user): CurrentUser) -> web::Json<User> { web::Json(user) }
/// ```
struct CurrentUser(User);

impl FromRequest for CurrentUser {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer_token(req);
        async move {
            let state =
                state.ok_or_else(|| ApiError::Internal("AppState is not registered".into()))?;
            let token = token.ok_or(ApiError::Unauthorized("Not authenticated"))?;
            let identity = state.auth.verify(&token).await?;
            state.user_for(identity).await.map(CurrentUser)
        }
        .boxed_local()
    }
}

/// `/api/{user_id}/tasks`: the signed-in user's task list. `{user_id}` must be their id or
/// `me`; another user's id is 403, whatever else the request holds.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
struct TaskOwner {
    /// The caller's id, or `me`
    user_id: String,
}

impl FromRequest for TaskOwner {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let in_path = req.match_info().get("user_id").unwrap_or_default();
        let in_path = in_path.to_owned();
        let user = CurrentUser::from_request(req, payload);
        async move {
            let CurrentUser(user) = user.await?;
            if in_path != "me" && in_path != user.id {
                return Err(ApiError::Forbidden(
                    "Not allowed to access another user's tasks",
                ));
            }
            Ok(TaskOwner { user_id: user.id })
        }
        .boxed_local()
    }
}

/// `/api/{user_id}/tasks/{id}`: one task of the signed-in user's, by id (not yet looked up).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
struct TaskRef {
    /// The caller's id, or `me`
    user_id: String,
    /// Task id
    id: i64,
}

impl FromRequest for TaskRef {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    /// The caller is checked first (401, 403), then the id (422), as FastAPI runs its auth
    /// dependency before it validates the path.
    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let owner = TaskOwner::from_request(req, payload);
        let id = req.match_info().get("id").and_then(|id| id.parse().ok());
        let not_an_integer = || {
            let msg = "Input should be a valid integer";
            ApiError::Invalid(vec![field_error(&["path", "id"], msg, "int_parsing")])
        };
        async move {
            let user_id = owner.await?.user_id;
            Ok(TaskRef {
                user_id,
                id: id.ok_or_else(not_an_integer)?,
            })
        }
        .boxed_local()
    }
}

impl TaskRef {
    /// The task as a query: another user's task is as absent as a missing one.
    fn row(&self) -> OwnedTask<'_> {
        tasks::table.filter(tasks::id.eq(self.id).and(tasks::user_id.eq(&self.user_id)))
    }
}

type OwnedTask<'a> = diesel::dsl::Filter<tasks::table, TaskOfOwner<'a>>;
type TaskOfOwner<'a> =
    diesel::dsl::And<diesel::dsl::Eq<tasks::id, i64>, diesel::dsl::Eq<tasks::user_id, &'a String>>;

/// The token from `Authorization: Bearer <token>`; nothing else (no query string, no cookie).
fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

const INVALID_TOKEN: ApiError = ApiError::Unauthorized("Could not validate credentials");

/// What this server puts in the tokens it issues.
#[derive(Serialize)]
struct Claims {
    sub: String,
    /// For clients to read; it ends no session (see `gen`).
    iat: u64,
    exp: u64,
    /// The account's `token_generation` read with the password hash this login checked. A
    /// password change adds one to it, so every token issued before the change, or by a login
    /// that checked the old password however late it signs, is refused from then on: exactly,
    /// where a time (`iat` against the moment of the change) would leave a window.
    gen: i64,
}

/// What a verified token says beyond `exp` and `nbf` (which jsonwebtoken checks). `iat` is
/// optional, as it is for PyJWT, but a number when present; `email` and `name` come in an
/// external issuer's tokens (Better Auth's), and its user is created from them on first sight.
#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    // Read only so that a token whose `iat` is not a number is refused.
    #[allow(dead_code)]
    iat: Option<f64>,
    email: Option<String>,
    name: Option<String>,
    /// This server's `gen` (see `Claims`), taken as it comes: another issuer may use the name
    /// for something else, and its tokens are not refused for that.
    #[serde(default)]
    gen: serde_json::Value,
}

impl TokenClaims {
    /// The token generation a local token was issued in. One without `gen` was issued before
    /// generations were counted (or by a frontend sharing `JWT_SECRET`): generation 0, good
    /// only while the account's password has never changed.
    fn generation(&self) -> Option<i64> {
        match &self.gen {
            serde_json::Value::Null => Some(0),
            generation => generation.as_i64(),
        }
    }
}

/// Who a verified token speaks for.
struct Identity {
    claims: TokenClaims,
    /// `None` for a token signed with `JWT_SECRET`. For one from the JWK Set, `JWT_ISSUER`,
    /// else the JWK Set URL: whose keys vouch for it. It only reaches accounts that issuer created.
    issuer: Option<String>,
}

/// Issues and verifies tokens. Keys and validation rules are built once, at startup.
struct TokenAuthority {
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    /// HS256 only: the algorithm never comes from the token.
    validation: Validation,
    ttl: Duration,
    jwks: Option<JwkSetCache>,
}

/// Leeway for clock skew on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 60;

/// How tokens signed with `algorithm` are checked: the `required` claims, `exp` and `nbf` with
/// leeway (jsonwebtoken accepts a future `nbf` unless told otherwise; PyJWT refuses it), and
/// `aud` checked only against a configured `audience`.
fn token_rules(algorithm: Algorithm, required: &[&str], audience: Option<&String>) -> Validation {
    let mut rules = Validation::new(algorithm);
    rules.leeway = LEEWAY_SECONDS;
    rules.validate_nbf = true;
    rules.set_required_spec_claims(required);
    match audience {
        Some(audience) => rules.set_audience(&[audience]),
        // Better Auth always sends `aud`; no audience configured means "don't check it".
        None => rules.validate_aud = false,
    }
    rules
}

impl TokenAuthority {
    fn new(config: &Config) -> Result<TokenAuthority, String> {
        let secret = &config.jwt_secret;
        let bad_secret = |e: jsonwebtoken::errors::Error| format!("JWT_SECRET: {e}");
        Ok(TokenAuthority {
            encoding_key: EncodingKey::from_secret(secret).map_err(bad_secret)?,
            decoding_key: DecodingKey::from_secret(secret).map_err(bad_secret)?,
            // Local tokens carry no aud/iss; a token that has them is still checked by signature.
            validation: token_rules(Algorithm::HS256, &["exp", "sub"], None),
            ttl: config.access_token_ttl,
            jwks: (config.jwks_url.as_ref()).map(|url| JwkSetCache::new(url, config)),
        })
    }

    /// A token for `user_id`, good while the account's `token_generation` is `generation`.
    fn issue(&self, user_id: &str, generation: i64) -> Result<TokenResponse, ApiError> {
        let iat = Utc::now().timestamp() as u64;
        let claims = Claims {
            sub: user_id.to_string(),
            iat,
            exp: iat + self.ttl.as_secs(),
            gen: generation,
        };
        let access_token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &self.encoding_key,
        )
        .map_err(|e| ApiError::Internal(format!("cannot sign a token: {e}")))?;
        Ok(TokenResponse {
            access_token,
            token_type: TokenType::Bearer,
            expires_in: self.ttl.as_secs(),
        })
    }

    async fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        // The header is only a hint for which key to try; each key decides which algorithms
        // it accepts, so `alg: none` or an HMAC token "signed" with a public key goes nowhere.
        let header = jsonwebtoken::decode_header(token).map_err(|_| INVALID_TOKEN)?;
        // Headers that point at or carry a key ask the verifier to trust the token's own say;
        // this server never does, and refuses such tokens rather than silently ignoring them.
        if header.jku.is_some() || header.x5u.is_some() || header.jwk.is_some() {
            return Err(INVALID_TOKEN);
        }
        let external = match (header.alg, &self.jwks, header.kid) {
            (Algorithm::HS256, _, _) => None,
            (_, Some(jwks), Some(kid)) => {
                let key = jwks.key(&kid).await.ok_or(INVALID_TOKEN)?;
                Some((key, jwks.issuer.clone()))
            }
            _ => return Err(INVALID_TOKEN),
        };
        let (key, validation) = match &external {
            None => (&self.decoding_key, &self.validation),
            Some((key, _)) => (&key.decoding_key, &key.validation),
        };
        let claims = jsonwebtoken::decode::<TokenClaims>(token, key, validation)
            .map_err(|_| INVALID_TOKEN)?
            .claims;
        valid_subject(&claims.sub)?;
        let issuer = external.map(|(_, issuer)| issuer);
        Ok(Identity { claims, issuer })
    }
}

/// Longest `sub` accepted: ids are stored, put in URLs and in `Location` headers.
const SUBJECT_MAX_CHARS: usize = 255;

/// A token's `sub` becomes a user id, a path segment and part of a `Location` header, so it
/// must be printable text (no NUL, no newline) of sensible length; checked before anything
/// is written.
fn valid_subject(sub: &str) -> Result<(), ApiError> {
    let printable = !sub.trim().is_empty()
        && sub.chars().count() <= SUBJECT_MAX_CHARS
        && !sub.chars().any(char::is_control);
    printable.then_some(()).ok_or(INVALID_TOKEN)
}

/// A public key from the JWK Set with the only validation rules it may be used with.
struct JwkKey {
    decoding_key: DecodingKey,
    validation: Validation,
}

/// The external issuer's JWK Set (e.g. Better Auth's `/api/auth/jwks`), cached by `kid`.
/// An unknown `kid` triggers one fetch, at most once per `JWKS_REFETCH_INTERVAL`, however many
/// such tokens arrive; the URL is the configured one, never one taken from a token.
struct JwkSetCache {
    url: String,
    /// The name accounts created from these tokens are kept under: `JWT_ISSUER` when set (and
    /// then checked in every token), else the URL of the keys. Not the token's unchecked `iss`:
    /// whoever holds the keys could write any.
    issuer: String,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, Arc<JwkKey>>>,
    /// When the last on-demand fetch happened; the lock also makes concurrent misses wait for
    /// one fetch instead of each starting its own.
    last_refetch: tokio::sync::Mutex<Option<Instant>>,
    /// Validation rules shared by every key: leeway, required claims, issuer and audience.
    base_validation: Validation,
}

const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(3);

impl JwkSetCache {
    fn new(url: &str, config: &Config) -> JwkSetCache {
        // A configured issuer or audience must be present, not merely right when present.
        let mut required = vec!["exp", "sub"];
        required.extend(config.jwt_issuer.as_ref().map(|_| "iss"));
        required.extend(config.jwt_audience.as_ref().map(|_| "aud"));
        let audience = config.jwt_audience.as_ref();
        let mut validation = token_rules(Algorithm::EdDSA, &required, audience);
        if let Some(issuer) = &config.jwt_issuer {
            validation.set_issuer(&[issuer]);
        }
        JwkSetCache {
            url: url.to_string(),
            issuer: config.jwt_issuer.clone().unwrap_or_else(|| url.to_string()),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                // Workers run separate runtimes; a pooled connection would belong to one of them.
                .pool_max_idle_per_host(0)
                .build()
                .expect("the HTTP client builds with static settings"),
            keys: RwLock::new(HashMap::new()),
            last_refetch: tokio::sync::Mutex::new(None),
            base_validation: validation,
        }
    }

    async fn key(&self, kid: &str) -> Option<Arc<JwkKey>> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        let mut last_refetch = self.last_refetch.lock().await;
        if let Some(key) = self.cached(kid) {
            return Some(key); // fetched by another request while this one waited
        }
        if last_refetch.is_some_and(|at| at.elapsed() < JWKS_REFETCH_INTERVAL) {
            return None;
        }
        *last_refetch = Some(Instant::now());
        if let Err(e) = self.refresh().await {
            log::warn!("JWKS fetch from {} failed: {e}", self.url);
        }
        self.cached(kid)
    }

    fn cached(&self, kid: &str) -> Option<Arc<JwkKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    /// Fetches the set and replaces the cache with the keys it can use.
    async fn refresh(&self) -> Result<usize, String> {
        let response = self.client.get(&self.url).send().await;
        let response = response
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?;
        // Each key is parsed on its own: one this server cannot use does not spoil the others.
        #[derive(Deserialize)]
        struct JwkSet {
            keys: Vec<serde_json::Value>,
        }
        let set: JwkSet = response
            .json()
            .await
            .map_err(|e| format!("not a JWK Set: {e}"))?;
        let keys: HashMap<_, _> = set
            .keys
            .into_iter()
            .filter_map(|jwk| self.usable_key(jwk))
            .collect();
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(count)
    }

    /// A JWK this server will verify with, or `None`: symmetric keys, unknown curves, keys
    /// meant for encryption and keys whose declared `alg` does not fit their type are skipped.
    fn usable_key(&self, jwk: serde_json::Value) -> Option<(String, Arc<JwkKey>)> {
        use jsonwebtoken::jwk::{AlgorithmParameters as Key, EllipticCurve, Jwk, PublicKeyUse};
        let jwk: Jwk = serde_json::from_value(jwk).ok()?;
        let kid = jwk.common.key_id.clone()?;
        let for_signing = matches!(
            jwk.common.public_key_use,
            None | Some(PublicKeyUse::Signature)
        );
        let allowed: &[Algorithm] = match &jwk.algorithm {
            _ if !for_signing => return None,
            Key::OctetKeyPair(key) if key.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            Key::EllipticCurve(key) if key.curve == EllipticCurve::P256 => &[Algorithm::ES256],
            Key::RSA(_) => &[Algorithm::RS256, Algorithm::PS256],
            _ => return None,
        };
        let algorithms = match jwk.common.key_algorithm {
            Some(declared) => {
                let declared = Algorithm::from_str(&declared.to_string()).ok()?;
                allowed.contains(&declared).then(|| vec![declared])?
            }
            None => allowed.to_vec(),
        };
        let decoding_key = DecodingKey::from_jwk(&jwk).ok()?;
        let validation = Validation {
            algorithms,
            ..self.base_validation.clone()
        };
        Some((
            kid,
            Arc::new(JwkKey {
                decoding_key,
                validation,
            }),
        ))
    }
}

/// bcrypt, kept off the async workers, limited to one hash per core at a time and run at a low
/// CPU priority, so a burst of logins queues and slows logins instead of everything else.
struct PasswordHasher {
    cost: u32,
    permits: tokio::sync::Semaphore,
    /// Verified against when the email is unknown, so that case costs the same time as a wrong
    /// password and accounts cannot be told apart.
    dummy_hash: String,
}

/// bcrypt's priority on thread-priority's portable 0–99 scale: on Linux, where the scale maps
/// onto the nice values 19 … -20, this is nice 10.
const BCRYPT_PRIORITY: u8 = 22;

impl PasswordHasher {
    fn new(cost: u32) -> Result<PasswordHasher, String> {
        let cores = worker_threads();
        Ok(PasswordHasher {
            cost,
            permits: tokio::sync::Semaphore::new(cores),
            dummy_hash: bcrypt::hash(uuid::Uuid::new_v4().to_string(), cost)
                .map_err(|e| e.to_string())?,
        })
    }

    /// Runs `work` once a permit is free, on a thread of its own at `BCRYPT_PRIORITY`: when the
    /// CPU is busy, requests that do not hash (and PostgreSQL, when it shares the machine) go
    /// first. Not on actix's blocking pool: its threads also run SQLite's statements, and a
    /// thread cannot raise its priority back once it has lowered it.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let permit = self.permits.acquire().await;
        let _permit = permit.map_err(|e| ApiError::Internal(e.to_string()))?;
        let (done, result) = tokio::sync::oneshot::channel();
        let background = move || {
            if let Ok(priority) = ThreadPriorityValue::try_from(BCRYPT_PRIORITY) {
                let _ = set_current_thread_priority(ThreadPriority::Crossplatform(priority));
            }
            let _ = done.send(work());
        };
        let thread = std::thread::Builder::new()
            .name("bcrypt".into())
            .spawn(background);
        thread.map_err(|e| ApiError::Internal(format!("cannot start a bcrypt thread: {e}")))?;
        result
            .await
            .map_err(|_| ApiError::Internal("bcrypt panicked".into()))
    }

    /// Whether `hash` was made at another cost than `BCRYPT_COST` (bcrypt's hash says its cost).
    fn outdated(&self, hash: &str) -> bool {
        let parts = hash.parse::<bcrypt::HashParts>();
        parts.is_ok_and(|parts| parts.get_cost() != self.cost)
    }

    async fn hash(&self, password: String) -> Result<String> {
        let cost = self.cost;
        let hashed = self.run(move || bcrypt::hash(password, cost)).await?;
        hashed.map_err(|e| ApiError::Internal(format!("bcrypt: {e}")))
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, or one who signs in
    /// elsewhere) it checks against the dummy and answers false, in the same time.
    async fn verify(&self, password: String, hash: Option<String>) -> Result<bool> {
        let usable = hash.is_some() && password.len() <= PASSWORD_MAX_BYTES;
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        // Always run, even when `usable` already says no: the time must not tell.
        let matches = self.run(move || bcrypt::verify(password, &hash).unwrap_or(false));
        let matches = matches.await?;
        Ok(usable && matches)
    }
}

/// What password guessing is limited by: failed logins per email (from any address) and per
/// client address (for any emails), and failed password confirmations per user.
///
/// The counts live in the database, not in this process, so every instance of the server on
/// one database shares them and a restart keeps them. An attempt *takes its slot before the
/// password is checked*: one atomic upsert bumps the bucket's count and returns it, so a burst
/// of parallel guesses cannot all pass a check before any failure is recorded — of N
/// simultaneous wrong guesses at most the limit reach bcrypt, the rest get 429. (The upsert
/// costs microseconds; the bcrypt hash it guards, a quarter of a second.) A success gives its
/// slot back; a failure keeps it. Each bucket's window starts with its first attempt and lasts
/// a minute; nothing is locked for good.
#[derive(Clone, Copy)]
enum Bucket<'a> {
    Email(&'a str),
    Client(IpAddr),
    PasswordOf(&'a str),
    /// Registrations from one client address (not only failed ones), at most this many.
    Registrations(IpAddr, i32),
}

const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

/// A client address as the throttle counts it: IPv4 as it is, IPv6 by its /64 (one subscriber
/// usually holds a whole /64, billions of addresses).
fn client_network(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(ip) => format!(
            "{}/64",
            std::net::Ipv6Addr::from(u128::from(ip) >> 64 << 64)
        ),
        ip => ip.to_string(),
    }
}

impl Bucket<'_> {
    fn key(&self) -> String {
        match self {
            // Attackers choose the emails; one longer than any valid email is no account, and
            // cutting it keeps the rows small.
            Bucket::Email(email) => {
                let cut: String = email.chars().take(EMAIL_MAX_CHARS).collect();
                format!("email:{cut}")
            }
            Bucket::Client(ip) => format!("client:{}", client_network(*ip)),
            Bucket::PasswordOf(user_id) => format!("user:{user_id}"),
            Bucket::Registrations(ip, _) => format!("register:{}", client_network(*ip)),
        }
    }

    /// What a 429 from this bucket says.
    fn refusal(&self) -> &'static str {
        match self {
            Bucket::Registrations(..) => "Too many registrations",
            _ => "Too many login attempts",
        }
    }

    /// Attempts allowed per window.
    fn limit(&self) -> i32 {
        match self {
            Bucket::Email(_) | Bucket::PasswordOf(_) => 10,
            Bucket::Registrations(_, limit) => *limit,
            Bucket::Client(_) => 30,
        }
    }
}

impl Database {
    /// Takes one attempt from `bucket`, or answers 429 (with how long to wait) when the window
    /// has none left.
    async fn take_attempt(&self, bucket: Bucket<'_>) -> Result<(), ApiError> {
        use diesel::dsl::case_when;
        use diesel::sql_types::{BigInt, Integer};
        use login_throttle::{attempts, window_started_ms};
        let now_ms = Utc::now().timestamp_millis();
        let window_ms = THROTTLE_WINDOW.as_millis() as i64;
        let window_over = window_started_ms.le(now_ms - window_ms);
        let (taken, started_ms): (i32, i64) = db!(self, write, |conn| {
            let upsert = diesel::insert_into(login_throttle::table)
                .values((
                    login_throttle::bucket.eq(bucket.key()),
                    window_started_ms.eq(now_ms),
                    attempts.eq(1),
                ))
                .on_conflict(login_throttle::bucket)
                .do_update()
                .set((
                    attempts.eq(case_when::<_, _, Integer>(window_over, 1).otherwise(attempts + 1)),
                    window_started_ms
                        .eq(case_when::<_, _, BigInt>(window_over, now_ms)
                            .otherwise(window_started_ms)),
                ))
                .returning((attempts, window_started_ms));
            upsert.get_result(conn)
        })?;
        if taken <= bucket.limit() {
            return Ok(());
        }
        let wait_ms = (started_ms + window_ms - now_ms).max(0) as u64;
        Err(ApiError::TooManyRequests {
            detail: bucket.refusal(),
            retry_after: Duration::from_millis(wait_ms + 999),
        })
    }

    /// Gives back an attempt that did not fail (the password was right, or another bucket
    /// refused it first).
    async fn give_back_attempt(&self, bucket: Bucket<'_>) -> Result<(), ApiError> {
        use login_throttle::attempts;
        db!(self, write, |conn| diesel::update(
            login_throttle::table.find(bucket.key())
        )
        .filter(attempts.gt(0))
        .set(attempts.eq(attempts - 1))
        .execute(conn))?;
        Ok(())
    }

    /// Forgets a bucket's failures: the right password for an email or a user wipes the slate.
    async fn clear_attempts(&self, bucket: Bucket<'_>) -> Result<(), ApiError> {
        db!(self, write, |conn| diesel::delete(
            login_throttle::table.find(bucket.key())
        )
        .execute(conn))?;
        Ok(())
    }

    /// Deletes buckets whose window is over, so rows for emails an attacker made up do not pile
    /// up. Run once a minute; any instance may do it.
    async fn forget_old_attempts(&self) -> Result<usize, ApiError> {
        let cutoff = Utc::now().timestamp_millis() - THROTTLE_WINDOW.as_millis() as i64;
        db!(self, write, |conn| diesel::delete(
            login_throttle::table.filter(login_throttle::window_started_ms.le(cutoff))
        )
        .execute(conn))
    }
}

/// What handlers share: built once at startup, then cloned for each worker thread with the
/// worker's own database pools (`Database::for_this_worker`).
type State = web::Data<AppState>;

#[derive(Clone)]
struct AppState {
    db: Database,
    auth: Arc<TokenAuthority>,
    passwords: Arc<PasswordHasher>,
    trusted_proxies: Arc<[IpAddr]>,
    body_timeout: Duration,
    registrations_per_minute: i32,
}

impl AppState {
    /// The user a verified token names. External users are created on first sight and only
    /// ever reached by their own issuer's tokens; a local token issued before the user's last
    /// password change is void.
    async fn user_for(&self, identity: Identity) -> Result<User> {
        let Identity { claims, issuer } = identity;
        let local = issuer.is_none();
        let found = db!(self.db, read, |conn| async {
            let user_named = users::table.find(&claims.sub).select(User::as_select());
            user_named.first(conn).await.optional()
        })?;
        let user = match (found, issuer) {
            (Some(user), None) => user,
            (None, None) => return Err(INVALID_TOKEN),
            (Some(user), Some(issuer)) => self.vouched_for(user, issuer).await?,
            (None, Some(issuer)) => self.create_external_user(&claims, issuer).await?,
        };
        // An external issuer's users have no password here to change, and its tokens no `gen`.
        let current = !local || claims.generation() == Some(user.token_generation);
        current.then_some(user).ok_or(INVALID_TOKEN)
    }

    /// `user`, if `issuer` created it; 401 for a local account or another issuer's user, so an
    /// issuer cannot reach accounts by choosing a `sub` that names them.
    async fn vouched_for(&self, user: User, issuer: String) -> Result<User> {
        match user.issuer.as_deref() {
            Some(own) if own == issuer => Ok(user),
            // Created before issuers were recorded: the first verified issuer claims it.
            Some("") => {
                let unclaimed = users::table.find(&user.id).filter(users::issuer.eq(""));
                let claim = diesel::update(unclaimed).set(users::issuer.eq(&issuer));
                match db!(self.db, write, |conn| claim.execute(conn))? {
                    1 => Ok(User {
                        issuer: Some(issuer),
                        ..user
                    }),
                    _ => Err(INVALID_TOKEN), // another issuer claimed it a moment ago
                }
            }
            _ => Err(INVALID_TOKEN),
        }
    }

    /// Creates the user an external token names, from its claims (`email` required).
    async fn create_external_user(&self, claims: &TokenClaims, issuer: String) -> Result<User> {
        let mut email = claims.email.clone().ok_or(INVALID_TOKEN)?;
        if self::email(&mut email).is_err() || email.contains('\0') {
            return Err(INVALID_TOKEN);
        }
        // A display name the API would refuse from a client is dropped, not stored.
        let name = (claims.name.as_deref())
            .filter(|n| !n.contains('\0') && n.chars().count() <= NAME_MAX_CHARS);
        let time = now();
        let new_user = NewUser {
            id: &claims.sub,
            email: &email,
            name,
            password_hash: None,
            issuer: Some(&issuer),
            created_at: time,
            updated_at: time,
        };
        // Two first requests can race. Whichever unique index trips first, the loser's insert
        // does nothing and both read the row by id; no row means the email belongs to a
        // different account.
        let created = db!(self.db, write, |conn| async {
            let insert = diesel::insert_into(users::table).values(&new_user);
            insert.on_conflict_do_nothing().execute(conn).await?;
            users::table
                .find(&claims.sub)
                .select(User::as_select())
                .first(conn)
                .await
                .optional()
        })?;
        match created {
            // Same id from a racing request of another issuer: not this token's account.
            Some(user) if user.issuer.as_ref() == Some(&issuer) => Ok(user),
            Some(_) => Err(INVALID_TOKEN),
            None => Err(ApiError::Conflict(
                "Email already registered to another account",
            )),
        }
    }

    /// The client's address: the TCP peer, or, behind a trusted proxy, the last address in
    /// `X-Forwarded-For` that is not itself a trusted proxy.
    fn client_ip(&self, req: &HttpRequest) -> IpAddr {
        let peer = req
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical());
        let trusted = |ip: &IpAddr| self.trusted_proxies.contains(ip);
        if !trusted(&peer) {
            return peer;
        }
        let headers = req.headers().get_all("x-forwarded-for");
        let hops: Vec<&str> = (headers.filter_map(|v| v.to_str().ok()))
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            match canonical_ip(hop) {
                Some(ip) if trusted(&ip) => continue,
                Some(ip) => return ip,
                // A hop that is not an address is not to be trusted any further.
                None => return peer,
            }
        }
        peer
    }

    /// The OAuth2 password check behind `/token` and `/api/auth/login`.
    async fn login(
        &self,
        req: &HttpRequest,
        email: &str,
        password: String,
    ) -> Result<HttpResponse> {
        let email = normalize_email(email);
        let by_client = Bucket::Client(self.client_ip(req));
        let by_email = Bucket::Email(&email);
        // The client's slot first: a client out of attempts does not get to spend the email's.
        self.db.take_attempt(by_client).await?;
        if let Err(refused) = self.db.take_attempt(by_email).await {
            self.db.give_back_attempt(by_client).await?;
            return Err(refused);
        }
        // The generation is read with the hash, in one statement: a login that checks the old
        // password gets the old generation, and its token dies with the change, however late
        // it is signed.
        let account: Option<(String, Option<String>, i64)> = db!(self.db, read, |conn| async {
            let columns = (users::id, users::password_hash, users::token_generation);
            let by_address = users::table.filter(users::email.eq(&email));
            by_address.select(columns).first(conn).await.optional()
        })?;
        let hash = account.as_ref().and_then(|(_, hash, _)| hash.clone());
        let plausible = password.chars().count() >= PASSWORD_MIN_CHARS;
        let verified = (self.passwords.verify(password.clone(), hash.clone())).await? && plausible;
        let Some((user_id, _, generation)) = account.filter(|_| verified) else {
            // The failure keeps both slots it took.
            return Err(ApiError::Unauthorized("Incorrect email or password"));
        };
        self.db.clear_attempts(by_email).await?;
        self.db.give_back_attempt(by_client).await?;
        // A hash made before `BCRYPT_COST` changed is made again at the current cost: until then
        // a wrong password for this account answered faster (or slower) than for an unknown
        // email, whose dummy hash has the current cost.
        if let Some(old_hash) = hash.filter(|hash| self.passwords.outdated(hash)) {
            let new_hash = self.passwords.hash(password).await?;
            // Only if no password change came in between (its hash must not be overwritten).
            let unchanged = users::table
                .find(&user_id)
                .filter(users::password_hash.eq(old_hash));
            let rehash = diesel::update(unchanged).set(users::password_hash.eq(&new_hash));
            db!(self.db, write, |conn| rehash.execute(conn))?;
        }
        Ok(HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((header::PRAGMA, "no-cache"))
            .json(self.auth.issue(&user_id, generation)?))
    }
}

// =================================================================================================
// 5. Routes
// =================================================================================================
//
// The OpenAPI document (`/openapi.json`, `/docs`) is generated from this section: a `///` doc
// comment on a route, or on a request/response type and its fields, becomes public text in it.
// Notes meant for readers of the code go in `//` comments.

// ----- Error responses, declared once ----------------------------------------------------------
//
// Each error status a route can send is one type here, with its own example, so Swagger UI shows
// the message that status really carries. Routes list the ones they return; what is sent is
// still decided by `ApiError::error_response`.

use error_responses::*;

/// Types that exist only to be listed in `responses(...)`: they are never built. Each line is
/// `Name(body) = (what utoipa's #[response(…)] takes)`, under the description as a doc comment.
mod error_responses {
    #![allow(dead_code)]
    use super::{ErrorDetail, IntoResponses, ValidationErrorBody};

    macro_rules! error_responses {
        ($($(#[doc = $doc:literal])* $name:ident($body:ty) = ($($response:tt)*);)*) => {
            $($(#[doc = $doc])* #[derive(IntoResponses)] #[response($($response)*)] pub struct $name($body);)*
        };
    }

    error_responses! {
        /// Missing or invalid token
        Unauthorized(ErrorDetail) = (status = 401,
            headers(("WWW-Authenticate" = String, description = "`Bearer`")),
            examples(
                ("no token" = (value = json!({"detail": "Not authenticated"}))),
                ("invalid token" = (value = json!({"detail": "Could not validate credentials"}))),
            ));
        /// Incorrect email or password
        BadCredentials(ErrorDetail) = (status = 401,
            headers(("WWW-Authenticate" = String, description = "`Bearer`")),
            example = json!({"detail": "Incorrect email or password"}));
        /// Too many failed attempts at a password (for this email, from this client, or for this user)
        TooManyAttempts(ErrorDetail) = (status = 429,
            headers(("Retry-After" = u64, description = "Seconds until another attempt is allowed")),
            example = json!({"detail": "Too many login attempts"}));
        /// Too many registrations from this client address (`REGISTRATIONS_PER_MINUTE`, 10 by default)
        TooManyRegistrations(ErrorDetail) = (status = 429,
            headers(("Retry-After" = u64, description = "Seconds until another registration is allowed")),
            example = json!({"detail": "Too many registrations"}));
        /// `{user_id}` is another user
        NotYourTasks(ErrorDetail) = (status = 403,
            example = json!({"detail": "Not allowed to access another user's tasks"}));
        /// No such task of this user
        TaskNotFound(ErrorDetail) = (status = 404, example = json!({"detail": "Task not found"}));
        /// The email belongs to another account
        EmailTaken(ErrorDetail) = (status = 409,
            example = json!({"detail": "Email already registered"}));
        /// The body is larger than the limit (64 KiB for JSON, 4 KiB for forms)
        BodyTooLarge(ErrorDetail) = (status = 413,
            example = json!({"detail": "Request body is larger than 65536 bytes"}));
        /// The body is not `application/json`
        NotJson(ErrorDetail) = (status = 415,
            example = json!({"detail": "Unsupported media type: expected application/json"}));
        /// Validation error: every problem of the input, each located by `loc`
        Invalid(ValidationErrorBody) = (status = 422, example = json!({"detail": [
            {"loc": ["body", "title"], "msg": "String should have at least 1 character", "type": "string_too_short"},
            {"loc": ["body", "completed"], "msg": "Input should be a valid boolean", "type": "bool_type"},
        ]}));
    }
}

// ----- [health] ----------------------------------------------------------------------------------

/// Liveness and database check.
#[utoipa::path(tag = "health", security(), responses(
    (status = 200, description = "The service and its database answer", body = Health),
    (status = 503, description = "The database does not answer", body = Health,
        example = json!({"status": "unavailable", "database": "cannot connect"})),
))]
#[get("/health")]
async fn health(state: State) -> HttpResponse {
    let (mut response, status, database) = match state.db.ping().await {
        Ok(()) => (HttpResponse::Ok(), HealthStatus::Ok, "ok".into()),
        Err(e) => {
            log::warn!("health check failed: {e}");
            // Generic: the cause can name the database, its host or its user.
            let reason = match e {
                ApiError::Unavailable(cause) if cause.contains("in time") => "timed out",
                ApiError::Unavailable(_) => "cannot connect",
                _ => "query failed",
            };
            let unavailable = HttpResponse::ServiceUnavailable();
            (unavailable, HealthStatus::Unavailable, reason.into())
        }
    };
    response.json(Health { status, database })
}

// ----- [auth] ------------------------------------------------------------------------------------

/// Create an account.
///
/// At most `REGISTRATIONS_PER_MINUTE` (10 by default) a minute from one client address.
#[utoipa::path(tag = "auth", security(), request_body = RegisterRequest, responses(
    (status = 201, description = "The new user", body = User),
    EmailTaken, BodyTooLarge, NotJson, Invalid, TooManyRegistrations,
))]
#[post("/api/auth/register")]
async fn register(state: State, req: HttpRequest, body: JsonBody) -> Result<HttpResponse> {
    let body: RegisterRequest = body.parse()?;
    let client = state.client_ip(&req);
    let from_client = Bucket::Registrations(client, state.registrations_per_minute);
    state.db.take_attempt(from_client).await?;
    let password_hash = state.passwords.hash(body.password).await?;
    let (id, time) = (uuid::Uuid::new_v4().to_string(), now());
    let new_user = NewUser {
        id: &id,
        email: &body.email,
        name: body.name.as_deref(),
        password_hash: Some(&password_hash),
        issuer: None,
        created_at: time,
        updated_at: time,
    };
    let user: User = db!(state.db, write, |conn| diesel::insert_into(users::table)
        .values(&new_user)
        .returning(User::as_returning())
        .get_result(conn))?;
    Ok(HttpResponse::Created().json(user))
}

/// OAuth2 password flow (the form Swagger UI's Authorize button and FastAPI clients send).
///
/// The form may also be sent as `multipart/form-data`, as a browser's `FormData` is.
#[utoipa::path(tag = "auth", security(),
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A bearer token", body = TokenResponse),
        (status = 400, description = "A multipart form that cannot be parsed", body = ErrorDetail,
            example = json!({"detail": "There was an error parsing the body"})),
        BadCredentials, BodyTooLarge, Invalid, TooManyAttempts,
    )
)]
#[post("/token")]
async fn oauth2_token(
    state: State,
    req: HttpRequest,
    Form(form): Form<TokenForm>,
) -> Result<HttpResponse> {
    state.login(&req, &form.username, form.password).await
}

/// Log in with JSON; the same as `/token`.
#[utoipa::path(tag = "auth", security(), request_body = LoginRequest, responses(
    (status = 200, description = "A bearer token", body = TokenResponse),
    BadCredentials, BodyTooLarge, NotJson, Invalid, TooManyAttempts,
))]
#[post("/api/auth/login")]
async fn login(state: State, req: HttpRequest, body: JsonBody) -> Result<HttpResponse> {
    let body: LoginRequest = body.parse()?;
    state.login(&req, &body.email, body.password).await
}

// ----- [users] -----------------------------------------------------------------------------------

/// The signed-in user.
#[utoipa::path(tag = "users", responses(
    (status = 200, description = "The user", body = User),
    Unauthorized,
))]
#[get("/api/users/me")]
async fn read_me(CurrentUser(user): CurrentUser) -> Json<User> {
    Json(user)
}

/// Change the name and/or email.
#[utoipa::path(tag = "users", request_body = UserUpdate, responses(
    (status = 200, description = "The updated user", body = User),
    Unauthorized, EmailTaken, BodyTooLarge, NotJson, Invalid,
))]
#[patch("/api/users/me")]
async fn update_me(
    state: State,
    CurrentUser(user): CurrentUser,
    body: JsonBody,
) -> Result<Json<User>> {
    let changes: UserUpdate = body.parse()?;
    let me = users::table.find(&user.id);
    let updated = update_returning!(state.db, me, &changes, users => User)?;
    // The account was deleted by another request while this one ran.
    updated.map(Json).ok_or(INVALID_TOKEN)
}

const INCORRECT_PASSWORD: ApiError = ApiError::BadRequest("Incorrect password");

/// Change the password.
///
/// Every token issued before the change stops working, this request's included: log in again
/// with the new password. Wrong `current_password` guesses are limited like failed logins
/// (429 after 10 in a minute). Of two changes made at once with the same `current_password`,
/// one succeeds and the other gets 400, as that password is no longer the current one.
#[utoipa::path(tag = "users", request_body = PasswordChange, responses(
    (status = 204, description = "Changed; tokens issued before now no longer work"),
    (status = 400, description = "The current password is wrong (or was just changed by another \
        request)", body = ErrorDetail,
        example = json!({"detail": "Incorrect password"})),
    Unauthorized, BodyTooLarge, NotJson, Invalid, TooManyAttempts,
))]
#[put("/api/users/me/password")]
async fn change_password(
    state: State,
    CurrentUser(user): CurrentUser,
    body: JsonBody,
) -> Result<HttpResponse> {
    let body: PasswordChange = body.parse()?;
    // Guessing the current password with a stolen token is throttled like logins.
    let guesses = Bucket::PasswordOf(&user.id);
    state.db.take_attempt(guesses).await?;
    let current_hash: Option<String> = db!(state.db, read, |conn| async {
        let me = users::table.find(&user.id);
        me.select(users::password_hash).first(conn).await.optional()
    })?
    .ok_or(INVALID_TOKEN)?;
    let right = (state.passwords).verify(body.current_password, current_hash.clone());
    if !right.await? {
        return Err(INCORRECT_PASSWORD);
    }
    state.db.clear_attempts(guesses).await?;
    let new_hash = state.passwords.hash(body.new_password).await?;
    // Only if the hash is still the one just checked: another change may have committed while
    // bcrypt ran, and this one must not overwrite it and answer 204 too.
    let checked = users::table
        .find(&user.id)
        .filter(users::password_hash.eq(&current_hash));
    // The new generation ends every token issued so far, this request's included (see
    // `Claims::gen`); added in SQL, so changes made at once cannot both write the same value.
    let changes = (
        users::password_hash.eq(&new_hash),
        users::token_generation.eq(users::token_generation + 1),
    );
    if update_returning!(state.db, checked, changes, users => User)?.is_none() {
        // Another change came first: the password sent is no longer the current one, as 400
        // says (the client's remedy is the same as for a wrong one). Or the account is gone.
        let me = users::table.find(&user.id).count();
        let still_there = db!(state.db, read, |conn| me.get_result::<i64>(conn))? > 0;
        return Err(if still_there {
            INCORRECT_PASSWORD
        } else {
            INVALID_TOKEN
        });
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Delete the account and all its tasks.
#[utoipa::path(tag = "users", responses(
    (status = 204, description = "Deleted; the account's tokens no longer work"),
    Unauthorized,
))]
#[delete("/api/users/me")]
async fn delete_me(state: State, CurrentUser(user): CurrentUser) -> Result<HttpResponse> {
    // Tasks go with the user: ON DELETE CASCADE, enforced on SQLite by `foreign_keys = ON`.
    db!(state.db, write, |conn| {
        diesel::delete(users::table.find(&user.id)).execute(conn)
    })?;
    Ok(HttpResponse::NoContent().finish())
}

// ----- [tasks] -----------------------------------------------------------------------------------
//
// `TaskOwner` and `TaskRef` (section 4) have already checked `{user_id}` against the token when
// a handler runs, so each handler only does what its route says.

const TASK_NOT_FOUND: ApiError = ApiError::NotFound("Task not found");

/// What is percent-encoded in a path segment: all but letters, digits and `-._~` (RFC 3986's
/// unreserved characters), so a UUID stays as it is.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// List the user's tasks: filter, search, sort and page. `X-Total-Count` is the count before paging.
#[utoipa::path(tag = "tasks", params(TaskOwner, TaskListQuery), responses(
    (status = 200, description = "One page of tasks", body = Vec<Task>,
        headers(("X-Total-Count" = i64, description = "Matching tasks before limit/offset"))),
    Unauthorized, NotYourTasks, Invalid,
))]
#[get("/api/{user_id}/tasks")]
async fn list_tasks(state: State, owner: TaskOwner, req: HttpRequest) -> Result<HttpResponse> {
    let query: TaskListQuery = query(&req)?;
    let (page, total) = page_of_tasks(&state.db, &owner.user_id, &query).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", total.to_string()))
        .json(page))
}

/// One page of `owner`'s tasks that match `query`, and how many match in all.
///
/// The page is fetched first, with one row more than asked for: when that row is not there, the
/// page already tells the total, so only a page with more after it (or an empty one past the
/// end) pays for a COUNT. (A window count on every row looks like one round trip, but makes
/// SQLite materialize and sort every matching row: slower.)
async fn page_of_tasks(
    db: &Database,
    owner: &str,
    query: &TaskListQuery,
) -> Result<(Vec<Task>, i64)> {
    let (limit, offset) = (query.limit.unwrap_or(100), query.offset.unwrap_or(0));
    db!(db, read, |conn| async {
        let sorted = sorted_tasks!(matching_tasks!(query, owner), query.sort, query.order);
        let rows = sorted
            .select(Task::as_select())
            .limit(limit + 1)
            .offset(offset);
        let mut page: Vec<Task> = rows.load(conn).await?;
        let fetched = page.len() as i64;
        let total = if fetched <= limit && (fetched > 0 || offset == 0) {
            offset + fetched
        } else {
            page.truncate(limit as usize);
            matching_tasks!(query, owner)
                .count()
                .get_result(conn)
                .await?
        };
        QueryResult::Ok((page, total))
    })
}

/// Create a task.
#[utoipa::path(tag = "tasks", params(TaskOwner), request_body = TaskInput, responses(
    (status = 201, description = "The new task", body = Task,
        headers(("Location" = String, description = "/api/{user_id}/tasks/{id}"))),
    Unauthorized, NotYourTasks, BodyTooLarge, NotJson, Invalid,
))]
#[post("/api/{user_id}/tasks")]
async fn create_task(state: State, owner: TaskOwner, body: JsonBody) -> Result<HttpResponse> {
    let body: TaskInput = body.parse()?;
    let time = now();
    let columns = (
        &body,
        tasks::user_id.eq(&owner.user_id),
        tasks::created_at.eq(time),
        tasks::updated_at.eq(time),
    );
    let task: Task = db!(state.db, write, |conn| diesel::insert_into(tasks::table)
        .values(columns)
        .returning(Task::as_returning())
        .get_result(conn))?;
    // An external user's id is the issuer's `sub`, which may hold `/`, `?` or `#`.
    let owner = percent_encoding::utf8_percent_encode(&task.user_id, PATH_SEGMENT);
    let location = format!("/api/{owner}/tasks/{}", task.id);
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, location))
        .json(task))
}

/// One task.
#[utoipa::path(tag = "tasks", params(TaskRef), responses(
    (status = 200, description = "The task", body = Task),
    Unauthorized, NotYourTasks, TaskNotFound, Invalid,
))]
#[get("/api/{user_id}/tasks/{id}")]
async fn read_task(state: State, task: TaskRef) -> Result<Json<Task>> {
    let found = db!(state.db, read, |conn| async {
        task.row()
            .select(Task::as_select())
            .first(conn)
            .await
            .optional()
    })?;
    found.map(Json).ok_or(TASK_NOT_FOUND)
}

/// Replace a task: an omitted `description` becomes null, an omitted `completed` false.
#[utoipa::path(tag = "tasks", params(TaskRef), request_body = TaskInput, responses(
    (status = 200, description = "The replaced task", body = Task),
    Unauthorized, NotYourTasks, TaskNotFound, BodyTooLarge, NotJson, Invalid,
))]
#[put("/api/{user_id}/tasks/{id}")]
async fn replace_task(state: State, task: TaskRef, body: JsonBody) -> Result<Json<Task>> {
    let replacement: TaskInput = body.parse()?;
    update_returning!(state.db, task.row(), &replacement, tasks => Task)?
        .map(Json)
        .ok_or(TASK_NOT_FOUND)
}

/// Change some fields of a task; `"description": null` clears it.
#[utoipa::path(tag = "tasks", params(TaskRef), request_body = TaskPatch, responses(
    (status = 200, description = "The updated task", body = Task),
    Unauthorized, NotYourTasks, TaskNotFound, BodyTooLarge, NotJson, Invalid,
))]
#[patch("/api/{user_id}/tasks/{id}")]
async fn patch_task(state: State, task: TaskRef, body: JsonBody) -> Result<Json<Task>> {
    let changes = body.parse::<TaskPatch>()?;
    update_returning!(state.db, task.row(), &changes, tasks => Task)?
        .map(Json)
        .ok_or(TASK_NOT_FOUND)
}

/// Delete a task.
#[utoipa::path(tag = "tasks", params(TaskRef), responses(
    (status = 204, description = "Deleted"),
    Unauthorized, NotYourTasks, TaskNotFound, Invalid,
))]
#[delete("/api/{user_id}/tasks/{id}")]
async fn delete_task(state: State, task: TaskRef) -> Result<HttpResponse> {
    match db!(state.db, write, |conn| diesel::delete(task.row())
        .execute(conn))?
    {
        0 => Err(TASK_NOT_FOUND),
        _ => Ok(HttpResponse::NoContent().finish()),
    }
}

/// Toggle `completed`, atomically (one UPDATE, so concurrent toggles never lose one).
#[utoipa::path(tag = "tasks", params(TaskRef), responses(
    (status = 200, description = "The task with `completed` flipped", body = Task),
    Unauthorized, NotYourTasks, TaskNotFound, Invalid,
))]
#[patch("/api/{user_id}/tasks/{id}/complete")]
async fn toggle_task(state: State, task: TaskRef) -> Result<Json<Task>> {
    let flip = tasks::completed.eq(diesel::dsl::not(tasks::completed));
    let toggled = update_returning!(state.db, task.row(), flip, tasks => Task)?;
    toggled.map(Json).ok_or(TASK_NOT_FOUND)
}

// ----- [docs] and the router's own answers -------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    info(title = "Todo API", description = "Tasks per user, behind JWT bearer auth."),
    // Relative: the document is right wherever the server is reached (Swagger UI, a proxy).
    servers((url = "/", description = "This server")),
    tags(
        (name = "health", description = "Service and database status"),
        (name = "auth", description = "Accounts and tokens"),
        (name = "users", description = "The signed-in user"),
        (name = "tasks", description = "The signed-in user's tasks"),
    ),
    // The error bodies: the error response types above refer to them but do not register them.
    components(schemas(ErrorDetail, ValidationErrorBody, FieldError)),
)]
struct ApiDoc;

/// The OpenAPI document of every route in `api_routes`, with what utoipa 6's attributes cannot
/// say added here (it runs after the routes are collected, which `modifiers(...)` does not).
fn openapi_document() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    let (_, mut openapi) = App::new()
        .into_utoipa_app()
        .openapi(ApiDoc::openapi())
        .configure(api_routes)
        .split_for_parts();
    let components = openapi.components.get_or_insert_with(Default::default);
    let bearer = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT");
    components.add_security_scheme("bearer", SecurityScheme::Http(bearer.build()));
    let password_flow = Flow::Password(Password::new("/token", Scopes::new()));
    components.add_security_scheme(
        "oauth2",
        SecurityScheme::OAuth2(OAuth2::new([password_flow])),
    );
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            // A route needs a token unless it says `security()`: public routes opt out, so a
            // new route cannot be documented as public by forgetting a line.
            operation.security.get_or_insert_with(|| {
                ["bearer", "oauth2"]
                    .map(|scheme| SecurityRequirement::new(scheme, Vec::<String>::new()))
                    .into()
            });
            // Every header this API declares is sent on every such response. utoipa 6's
            // `Header` has no `required` field, so it goes in through the extensions map.
            let headers = operation
                .responses
                .responses
                .values_mut()
                .filter_map(|response| match response {
                    RefOr::T(response) => Some(response.headers.values_mut()),
                    RefOr::Ref(_) => None,
                })
                .flatten();
            for header in headers {
                if let RefOr::T(header) = header {
                    header
                        .extensions
                        .get_or_insert_with(Default::default)
                        .insert("required".into(), json!(true));
                }
            }
        }
    }
    openapi
}

/// Registers every API route; the OpenAPI document is generated from this same list, so a
/// route cannot exist undocumented.
fn api_routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(health)
        .service(register)
        .service(oauth2_token)
        .service(login)
        .service(read_me)
        .service(update_me)
        .service(change_password)
        .service(delete_me)
        .service(list_tasks)
        .service(create_task)
        .service(read_task)
        .service(replace_task)
        .service(patch_task)
        .service(delete_task)
        .service(toggle_task);
}

/// Which methods each path answers (`GET, PUT` …), for telling 405 from 404 as FastAPI does.
struct KnownRoutes(Vec<(ResourceDef, String)>);

impl KnownRoutes {
    fn from_openapi(openapi: &utoipa::openapi::OpenApi) -> KnownRoutes {
        let documented = openapi.paths.paths.iter().map(|(path, item)| {
            let operations = [
                ("GET", &item.get),
                ("PUT", &item.put),
                ("POST", &item.post),
                ("DELETE", &item.delete),
                ("PATCH", &item.patch),
            ];
            let methods = operations
                .iter()
                .filter(|(_, operation)| operation.is_some());
            let methods: Vec<&str> = methods.map(|(method, _)| *method).collect();
            (ResourceDef::new(path.as_str()), methods.join(", "))
        });
        let docs = [
            (ResourceDef::new("/openapi.json"), "GET".into()),
            (ResourceDef::new(["/docs", "/docs/{_:.*}"]), "GET".into()),
        ];
        KnownRoutes(documented.chain(docs).collect())
    }
}

/// What the router answers when no route matched: 405 with `Allow` if the path exists under
/// another method, else 404. `json_error_bodies` gives both their `{"detail": …}` body.
///
/// A known path with a slash added (`/api/me/tasks/`) is redirected (307, which keeps the method
/// and the body) to the path without it, query and all, as FastAPI does: clients written for it
/// may rely on that.
async fn no_route(req: HttpRequest, known: web::Data<KnownRoutes>) -> HttpResponse {
    let is_known = |path: &str| known.0.iter().any(|(route, _)| route.is_match(path));
    if let Some(path) = (req.path().strip_suffix('/')).filter(|path| is_known(path)) {
        let location = match req.query_string() {
            "" => path.to_string(),
            query => format!("{path}?{query}"),
        };
        return HttpResponse::TemporaryRedirect()
            .insert_header((header::LOCATION, location))
            .finish();
    }
    let matching = known.0.iter().filter(|(path, _)| path.is_match(req.path()));
    let allowed: Vec<&str> = matching.map(|(_, methods)| methods.as_str()).collect();
    if allowed.is_empty() {
        return HttpResponse::NotFound().finish();
    }
    let allow = (header::ALLOW, allowed.join(", "));
    HttpResponse::MethodNotAllowed()
        .insert_header(allow)
        .finish()
}

/// Turns a panic in a handler into a 500 `{"detail": "Internal Server Error"}` (with the cause
/// logged) instead of a dropped connection.
async fn catch_panics(
    req: ServiceRequest,
    next: middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    match std::panic::AssertUnwindSafe(next.call(req))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(panic) => {
            let cause = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // The request went down with the handler, so answer through the error path: actix
            // renders it with `ApiError::error_response`.
            Err(ApiError::Internal(format!("panic: {cause}")).into())
        }
    }
}

/// The last line of defence for the contract's "every error is JSON": an error response that
/// some layer produced as plain text (a refused CORS preflight, say) is re-rendered as
/// `{"detail": "<reason>"}`, keeping its status and headers.
fn json_error_bodies<B>(
    res: ServiceResponse<B>,
) -> actix_web::Result<middleware::ErrorHandlerResponse<B>> {
    let is_json = res
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return Ok(middleware::ErrorHandlerResponse::Response(
            res.map_into_left_body(),
        ));
    }
    let status = res.status();
    let (req, original) = res.into_parts();
    let reason = status.canonical_reason().unwrap_or("Error").to_string();
    let mut json = ApiError::Status(status, reason).error_response();
    for (name, value) in original.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    Ok(middleware::ErrorHandlerResponse::Response(
        ServiceResponse::new(req, json).map_into_right_body(),
    ))
}

fn cors(origins: &[String]) -> actix_cors::Cors {
    // Closed unless CORS_ORIGINS names origins; requests from other origins still get answers,
    // just without Access-Control-Allow-Origin, so browsers keep them from foreign pages.
    origins
        .iter()
        .fold(actix_cors::Cors::default(), |cors, origin| {
            cors.allowed_origin(origin)
        })
        .allowed_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
        .expose_headers([
            header::HeaderName::from_static("x-total-count"),
            header::LOCATION,
        ])
        .block_on_origin_mismatch(false)
        .max_age(3600)
}

// =================================================================================================
// 6. Startup
// =================================================================================================

/// The request log line: method, path without the query string (which could hold a token),
/// status, size, time.
const ACCESS_LOG_FORMAT: &str = r#"%a "%{method}xi %{path}xi" %s %b %Dms"#;

/// The access log, left out when its lines would not be written: the logger renders its fields
/// for every request (2% of a task list's time) before it asks whether info is logged.
fn access_log() -> middleware::Condition<middleware::Logger> {
    let logger = middleware::Logger::new(ACCESS_LOG_FORMAT)
        .custom_request_replace("method", |req| req.method().to_string())
        // Escaped (`"` as `\"`, control and non-ASCII characters as `\u{…}`): what a client
        // sends must not end the quoted field and forge the ones after it.
        .custom_request_replace("path", |req| req.path().escape_default().to_string());
    let written = log::log_enabled!(target: "actix_web::middleware::logger", log::Level::Info);
    middleware::Condition::new(written, logger)
}

/// Headers on every response: no content-type sniffing, and no page of this server (Swagger
/// UI's included) framed by another site.
fn security_headers() -> middleware::DefaultHeaders {
    middleware::DefaultHeaders::new()
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"))
}

/// One worker thread per core, as actix does by default; the PostgreSQL pools and the bcrypt
/// permits are sized from the same number.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// File descriptors kept for everything but client connections: the database, logs, bcrypt's
/// threads, the JWKS client.
const RESERVED_FILES: u64 = 128;

fn init_logging() {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // tokio-postgres logs bound parameters at debug level, and those include password hashes.
    logger.filter_module("tokio_postgres", log::LevelFilter::Info);
    logger.init();
}

fn main() {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    init_logging();
    if let Err(e) = actix_web::rt::System::new().block_on(serve(config)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let state = AppState::new(&config).await?;
    spawn_housekeeping(state.db.clone());
    let openapi = openapi_document();
    let known_routes = web::Data::new(KnownRoutes::from_openapi(&openapi));
    let cors_origins = config.cors_origins.clone();
    let (workers, max_connections) = (worker_threads(), connection_limit(&config));
    let response_timeout = config.response_timeout;
    // Called once on each worker thread, which gets its own `App` and its own database pools.
    let server = HttpServer::new(move || {
        let state = AppState {
            db: state.db.for_this_worker(),
            ..state.clone()
        };
        App::new()
            .into_utoipa_app()
            .configure(api_routes)
            .into_app()
            .app_data(web::Data::new(state))
            .app_data(known_routes.clone())
            .service(web::redirect("/docs", "/docs/"))
            .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi.clone()))
            .default_service(web::to(no_route))
            .wrap(middleware::from_fn(catch_panics))
            .wrap(cors(&cors_origins))
            .wrap(middleware::ErrorHandlers::new().default_handler(json_error_bodies))
            .wrap(security_headers())
            .wrap(access_log())
            // Last, so outermost: it sees every response, whichever layer produced it.
            .wrap(middleware::from_fn(in_pieces))
    })
    .workers(workers)
    .max_connections(max_connections / workers)
    // SIGTERM and Ctrl-C both stop accepting, let in-flight requests finish, then exit.
    .shutdown_signal(shutdown_signal())
    .shutdown_timeout(30)
    // Before `bind`: actix takes the callback when it binds.
    .on_connect(move |io, _| note_connection(io, response_timeout))
    .bind((config.host.as_str(), config.port))
    .map_err(|e| {
        let (host, port) = (&config.host, config.port);
        format!("HOST/PORT: cannot listen on {host}:{port}: {e}")
    })?;
    for addr in server.addrs() {
        log::info!("Listening on http://{addr}");
    }
    server.run().await.map_err(|e| e.to_string())?;
    log::info!("Server stopped");
    Ok(())
}

impl AppState {
    /// Connects to the database (migrating it) and builds the token and password machinery.
    async fn new(config: &Config) -> Result<AppState, String> {
        let db = Database::connect(config)
            .await
            .map_err(|e| format!("DATABASE_URL: {e}"))?;
        let auth = TokenAuthority::new(config)?;
        if config.jwt_secret_is_random {
            log::warn!("JWT_SECRET is not set: using a random secret, so tokens will not survive a restart");
        }
        if let Some(jwks) = &auth.jwks {
            // Not fatal: the issuer may start after us, and an unknown kid fetches again.
            match jwks.refresh().await {
                Ok(n) => log::info!("JWKS: {n} usable keys from {}", jwks.url),
                Err(e) => log::warn!("JWKS fetch from {} failed: {e}", jwks.url),
            }
        }
        let bcrypt_cost = config.bcrypt_cost;
        let passwords = web::block(move || PasswordHasher::new(bcrypt_cost))
            .await
            .map_err(|e| e.to_string())??;
        Ok(AppState {
            db,
            auth: Arc::new(auth),
            passwords: Arc::new(passwords),
            trusted_proxies: config.trusted_proxies.clone().into(),
            body_timeout: config.body_timeout,
            registrations_per_minute: config.registrations_per_minute,
        })
    }
}

/// Throttle buckets whose minute is over are deleted in the background, once a minute.
fn spawn_housekeeping(db: Database) {
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(THROTTLE_WINDOW).await;
            if let Err(e) = db.forget_old_attempts().await {
                log::warn!("cannot clear old login attempts: {e}");
            }
        }
    });
}

/// How many connections to accept at once. Every connection is a file descriptor. The soft
/// limit is often 1,024, which a thousand idle clients exhaust; it is raised to the hard limit,
/// and no more connections are accepted than it leaves room for (the rest wait in the listen
/// queue until one closes).
fn connection_limit(config: &Config) -> usize {
    let open_files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let max_connections = config
        .max_connections
        .min(open_files.saturating_sub(RESERVED_FILES) as usize)
        .max(worker_threads());
    log::info!("accepting up to {max_connections} connections ({open_files} open files allowed)");
    max_connections
}

// ----- Clients that do not read their responses --------------------------------------------------
//
// actix bounds how long a client may take to send a request, not how long it may take to read
// the answer. A client that asks for a 7 MB page and never reads would keep that page, and its
// connection, for as long as it stayed. So:
//
// - Each connection has a `TCP_USER_TIMEOUT` of `RESPONSE_TIMEOUT`: the kernel gives up on a
//   connection whose client has not taken (acknowledged) data sent to it for that long, however
//   long it keeps answering the kernel's probes with "my window is full". actix's next write then
//   fails, and it drops the connection and the response. Linux only (elsewhere the option does
//   not exist, and such a client is cut off by nothing but the client itself).
// - A big response body is handed to actix a `RESPONSE_CHUNK` at a time. actix asks for more only
//   when its own write buffer (32 KiB) has drained, so a response waiting for its reader holds
//   under 48 KiB there; handed over whole, it was copied into that buffer, a second copy of it.

/// How much of a response body actix is handed at a time, and the size up to which a response
/// is handed over whole.
const RESPONSE_CHUNK: usize = 16 * 1024;

/// `HttpServer::on_connect`: sets the connection's user timeout (see above).
fn note_connection(io: &dyn std::any::Any, response_timeout: Duration) {
    if let Some(tcp) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
        #[cfg(target_os = "linux")]
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(response_timeout)) {
            log::warn!("cannot set TCP_USER_TIMEOUT: {e}");
        }
        let _ = (tcp, response_timeout); // used only on Linux
    }
}

/// The outermost middleware: a response body over `RESPONSE_CHUNK` goes to actix in pieces of
/// that size, cut from the body without copying it (`Bytes::split_to` shares its memory).
async fn in_pieces(
    req: ServiceRequest,
    next: middleware::Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let res = next.call(req).await?;
    Ok(res.map_body(|_, body| {
        if !matches!(body.size(), BodySize::Sized(size) if size > RESPONSE_CHUNK as u64) {
            return body.boxed(); // small, empty or a stream: as it is
        }
        let body = match body.try_into_bytes() {
            Ok(bytes) => bytes,
            Err(body) => return body.boxed(),
        };
        let size = body.len() as u64;
        let pieces = futures_util::stream::unfold(body, |mut rest| async move {
            let piece = rest.split_to(rest.len().min(RESPONSE_CHUNK));
            (!piece.is_empty()).then_some((Ok::<_, std::convert::Infallible>(piece), rest))
        });
        actix_web::body::SizedStream::new(size, pieces).boxed()
    }))
}

/// Resolves at SIGTERM or Ctrl-C (actix then finishes the requests in flight and stops).
async fn shutdown_signal() {
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => drop(stream.recv().await),
            Err(e) => {
                log::error!("cannot listen for SIGTERM: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let which = match futures_util::future::select(std::pin::pin!(terminate), ctrl_c).await {
        Either::Left(_) => "SIGTERM",
        Either::Right(_) => "Ctrl-C",
    };
    log::info!("{which} received: finishing in-flight requests, then stopping");
}
