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

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ResourceDef, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::web::Json;
use actix_web::{
    delete, get, middleware, patch, post, put, web, App, FromRequest, HttpMessage, HttpRequest,
    HttpResponse, HttpServer, ResponseError,
};
use chrono::{NaiveDateTime, SubsecRound, Utc};
// Not `diesel::prelude::*`: it brings diesel's synchronous `RunQueryDsl` into every scope, and
// `db!` picks the query methods per backend (see `inline_sqlite`).
use diesel::{
    AsChangeset, BoolExpressionMethods, Connection, ConnectionResult, EscapeExpressionMethods,
    ExpressionMethods, Insertable, NullableExpressionMethods, OptionalExtension, QueryDsl,
    QueryResult, Queryable, Selectable, SelectableHelper, SqliteConnection, TextExpressionMethods,
};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, PoolError};
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use futures_util::future::Either;
use futures_util::future::{FutureExt, LocalBoxFuture};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::json;
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
    /// How long a response may take to be written to its client (see `watch_response`).
    response_timeout: Duration,
    /// Open connections at most, across all workers; more wait in the listen queue.
    max_connections: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum DatabaseUrl {
    /// A file path, or `:memory:`.
    Sqlite(String),
    Postgres(String),
}

/// How long a client may take to send a request body unless `REQUEST_BODY_TIMEOUT` says otherwise.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a response may take to be written unless `RESPONSE_TIMEOUT` says otherwise. Long
/// enough for the largest page (1,000 tasks of control characters, ~7.4 MB) at 2 Mbit/s, and a
/// common page (100 tasks, tens of kB) on any link; short enough that a client which stops
/// reading gives back its connection and the response it holds within half a minute.
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
            pool_size: parse_env(
                "DATABASE_POOL_SIZE",
                |n| (1..=1000).contains(n),
                "1 to 1000",
            )?,
            // DATABASE_POOL_TIMEOUT is the variable's older name, still honoured.
            database_timeout: match seconds("DATABASE_TIMEOUT")? {
                Some(timeout) => timeout,
                None => seconds("DATABASE_POOL_TIMEOUT")?.unwrap_or(Duration::from_secs(3)),
            },
            trusted_proxies: parse_list("TRUSTED_PROXIES", |ip| ip.parse().ok(), "an IP address")?,
            body_timeout: seconds("REQUEST_BODY_TIMEOUT")?.unwrap_or(DEFAULT_BODY_TIMEOUT),
            response_timeout: seconds("RESPONSE_TIMEOUT")?.unwrap_or(DEFAULT_RESPONSE_TIMEOUT),
            max_connections: parse_env(
                "MAX_CONNECTIONS",
                |n| (1..=1_000_000).contains(n),
                "1 to 1000000",
            )?
            .unwrap_or(5_000),
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

/// A moment in UTC, as stored (microseconds, in a `Timestamp` column) and as sent (RFC 3339
/// with a `Z`, e.g. `2026-11-28T18:45:34.123456Z`).
///
/// Its own type because both directions are on the hot path — a task list reads and writes two
/// per task — and chrono's general routes are slow there: diesel reads SQLite's text timestamps
/// with `parse_from_str`, which parses its format string anew for every value (6% of a list
/// profile), and `format("%Y…")` does the same when writing. Both texts have their digits at
/// fixed places (`TIME_DIGITS`), so they are read and written by position.
#[derive(
    Clone, Copy, Debug, PartialEq, diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Timestamp)]
struct UtcTime(NaiveDateTime);

/// The current time as stored: UTC, truncated to microseconds because PostgreSQL keeps no more.
fn now() -> UtcTime {
    UtcTime(Utc::now().naive_utc().trunc_subsecs(6))
}

/// Where year, month, day, hour, minute, second and microsecond sit in a timestamp's text, the
/// way SQLite stores it (`2026-11-28 18:45:34.123456`) and the way it is sent (`…T…Z`).
const TIME_DIGITS: [std::ops::Range<usize>; 7] =
    [0..4, 5..7, 8..10, 11..13, 14..16, 17..19, 20..26];

impl UtcTime {
    /// Reads the text diesel stores in SQLite (`%F %T%.f`: no fraction, or 3 or 6 digits of one).
    fn from_stored(stored: &[u8]) -> Option<UtcTime> {
        const SHAPE: &[u8; 26] = b"0000-00-00 00:00:00.000000";
        if !matches!(stored.len(), 19 | 23 | 26) {
            return None;
        }
        let mut text = *SHAPE; // a shorter fraction is padded with zeros
        text[..stored.len()].copy_from_slice(stored);
        let shaped = (text.iter().zip(SHAPE))
            .all(|(c, shape)| (*shape == b'0' && c.is_ascii_digit()) || c == shape);
        if !shaped {
            return None;
        }
        let [year, month, day, hour, minute, second, micro] = TIME_DIGITS.map(|digits| {
            (text[digits].iter()).fold(0, |n, digit| n * 10 + u32::from(digit - b'0'))
        });
        let date = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?;
        date.and_hms_micro_opt(hour, minute, second, micro)
            .map(UtcTime)
    }
}

impl diesel::deserialize::FromSql<diesel::sql_types::Timestamp, diesel::sqlite::Sqlite>
    for UtcTime
{
    fn from_sql(
        mut value: diesel::sqlite::SqliteValue<'_, '_, '_>,
    ) -> diesel::deserialize::Result<Self> {
        match UtcTime::from_stored(value.read_text().as_bytes()) {
            Some(time) => Ok(time),
            // Written some other way (by hand, by another tool): diesel reads every form.
            None => diesel::deserialize::FromSql::<
                diesel::sql_types::Timestamp,
                diesel::sqlite::Sqlite,
            >::from_sql(value)
            .map(UtcTime),
        }
    }
}

impl diesel::deserialize::FromSql<diesel::sql_types::Timestamp, diesel::pg::Pg> for UtcTime {
    fn from_sql(value: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
        diesel::deserialize::FromSql::<diesel::sql_types::Timestamp, diesel::pg::Pg>::from_sql(
            value,
        )
        .map(UtcTime)
    }
}

impl<DB> diesel::serialize::ToSql<diesel::sql_types::Timestamp, DB> for UtcTime
where
    DB: diesel::backend::Backend,
    NaiveDateTime: diesel::serialize::ToSql<diesel::sql_types::Timestamp, DB>,
{
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, DB>,
    ) -> diesel::serialize::Result {
        self.0.to_sql(out)
    }
}

impl Serialize for UtcTime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use chrono::{Datelike, Timelike};
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let (date, time) = (self.0.date(), self.0.time());
        let values = [
            date.year() as u32,
            date.month(),
            date.day(),
            time.hour(),
            time.minute(),
            time.second(),
            time.nanosecond() / 1_000,
        ];
        for (digits, value) in TIME_DIGITS.into_iter().zip(values) {
            let mut rest = value;
            for digit in text[digits].iter_mut().rev() {
                *digit = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
        }
        serializer.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
    }
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
    #[schema(value_type = String, format = DateTime)]
    created_at: UtcTime,
    #[schema(value_type = String, format = DateTime)]
    updated_at: UtcTime,
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
    created_at: UtcTime,
    updated_at: UtcTime,
}

impl<'a> NewUser<'a> {
    /// A user created now: with a password hash for a local account, with the issuer for one
    /// created from an external token.
    fn now(
        id: &'a str,
        email: &'a str,
        name: Option<&'a str>,
        password_hash: Option<&'a str>,
        issuer: Option<&'a str>,
    ) -> Self {
        let time = now();
        let (created_at, updated_at) = (time, time);
        NewUser {
            id,
            email,
            name,
            password_hash,
            issuer,
            created_at,
            updated_at,
        }
    }
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
    #[schema(value_type = String, format = DateTime)]
    created_at: UtcTime,
    #[schema(value_type = String, format = DateTime)]
    updated_at: UtcTime,
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
    /// `ok`, or a short reason why the database does not answer.
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

/// Emails compare case-insensitively: stored trimmed and lower-cased.
fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

fn email(email: &mut String) -> Result<(), Problem> {
    *email = normalize_email(email);
    let well_formed = email.chars().count() <= EMAIL_MAX_CHARS
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
#[derive(Debug)]
enum ApiError {
    /// 401, with `WWW-Authenticate: Bearer`.
    Unauthorized(&'static str),
    BadRequest(&'static str),
    Forbidden(&'static str),
    NotFound(&'static str),
    Conflict(&'static str),
    /// 422 with FastAPI's list of field errors.
    Invalid(Vec<FieldError>),
    TooManyRequests {
        retry_after: Duration,
    },
    /// A status decided by the framework (404 / 405 / 413 / 415 …) with its message.
    Status(StatusCode, String),
    /// 503: the database did not answer in time.
    Unavailable(String),
    /// 500: the cause is logged, never sent.
    Internal(String),
}

/// What handlers and helpers return: `?` turns any error that converts into `ApiError`.
type Result<T, E = ApiError> = std::result::Result<T, E>;

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unauthorized(m)
            | ApiError::BadRequest(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m) => f.write_str(m),
            ApiError::Invalid(errors) => write!(f, "invalid input: {errors:?}"),
            ApiError::TooManyRequests { .. } => f.write_str("Too many login attempts"),
            ApiError::Status(_, m) | ApiError::Unavailable(m) | ApiError::Internal(m) => {
                f.write_str(m)
            }
        }
    }
}

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
            ApiError::TooManyRequests { retry_after } => {
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
            _ if connection_lost(&error) => ApiError::Unavailable(error.to_string()),
            // SQLite's lock timeout: the database is overloaded, not broken.
            Error::DatabaseError(_, info) if info.message().contains("database is locked") => {
                ApiError::Unavailable(error.to_string())
            }
            _ => ApiError::Internal(format!("database error: {error}")),
        }
    }
}

impl From<bb8::RunError<PoolError>> for ApiError {
    fn from(error: bb8::RunError<PoolError>) -> Self {
        ApiError::Unavailable(match error {
            bb8::RunError::TimedOut => "no database connection became available in time".into(),
            bb8::RunError::User(e) => e.to_string(),
        })
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(error: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(format!("blocking task failed: {error}"))
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

/// SQLite statements run right away, on the async worker that asked for them, through diesel's
/// own synchronous driver.
///
/// A statement on a local WAL database is a few microseconds of work from the page cache; handing
/// it to a blocking thread and back costs two thread switches, more than the work, and puts
/// the hand-off latency on the single writer's critical path. The waits SQLite can have are
/// kept off the request path instead: checkpoints (the only fsyncs with `synchronous=NORMAL`)
/// run on a background thread (`spawn_checkpointer`), and within this process nothing holds the
/// write lock but the one writer connection; when another process holds it, the writer waits
/// as a sleeping task (`begin_immediate`), not on the thread.
///
/// diesel-async's `SyncConnectionWrapper` would let SQLite use diesel-async's query methods, but
/// it is built to ship work to another thread: it renders every query to SQL text and copies
/// its parameters before running it, and copies every row it reads into owned values. Calling
/// diesel directly skips all three (a task list spent a fifth of its time there). This trait
/// is the price: diesel's synchronous methods under diesel-async's names, returning futures that
/// are already complete, so that `db!` runs one query text on either backend.
mod inline_sqlite {
    use diesel::query_dsl::methods::{ExecuteDsl, LimitDsl};
    use diesel::query_dsl::LoadQuery;
    use diesel::{dsl::Limit, QueryResult, SqliteConnection};
    use std::future::{ready, Ready};

    pub trait RunQueryDsl: diesel::RunQueryDsl<SqliteConnection> + Sized {
        fn execute(self, conn: &mut SqliteConnection) -> Ready<QueryResult<usize>>
        where
            Self: ExecuteDsl<SqliteConnection>,
        {
            ready(diesel::RunQueryDsl::execute(self, conn))
        }

        fn load<'query, U>(self, conn: &mut SqliteConnection) -> Ready<QueryResult<Vec<U>>>
        where
            Self: LoadQuery<'query, SqliteConnection, U>,
        {
            ready(diesel::RunQueryDsl::load(self, conn))
        }

        fn get_result<'query, U>(self, conn: &mut SqliteConnection) -> Ready<QueryResult<U>>
        where
            Self: LoadQuery<'query, SqliteConnection, U>,
        {
            ready(diesel::RunQueryDsl::get_result(self, conn))
        }

        fn first<'query, U>(self, conn: &mut SqliteConnection) -> Ready<QueryResult<U>>
        where
            Self: LimitDsl,
            Limit<Self>: LoadQuery<'query, SqliteConnection, U>,
        {
            ready(diesel::RunQueryDsl::first(self, conn))
        }
    }

    impl<T: diesel::RunQueryDsl<SqliteConnection>> RunQueryDsl for T {}
}

type PgPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// The configured database: SQLite (embedded, the default) or PostgreSQL (a server, by URL).
#[derive(Clone)]
enum Database {
    Sqlite(Arc<SqliteDatabase>),
    Postgres(Arc<PgSettings>),
}

/// SQLite, run inline on the worker threads (see `inline_sqlite`).
///
/// Its statements take microseconds and never wait on a network, so its connections are not
/// pooled: each worker thread reads through a connection of its own (WAL lets readers run beside
/// the writer; see `SqliteReader`), and all writes go through the single writer connection.
/// One writer means writes queue in memory instead of spinning on SQLite's file lock; tokio's
/// mutex hands it over in arrival order (bb8's pool let newcomers overtake a waiting write: p99
/// 75 ms at 64 connections).
///
/// Writes are committed in groups (see `WriteBatch`). Committing each write on its own, a commit
/// cost more than the statements (appending its pages to the WAL, taking and dropping SQLite's
/// locks: over a third of the server's time under a load of creates), and handing the writer
/// from thread to thread for every write left it idle while the next thread woke up.
struct SqliteDatabase {
    path: String,
    writer: Arc<tokio::sync::Mutex<SqliteConnection>>,
}

thread_local! {
    /// This worker thread's reader connection, opened on first use.
    static SQLITE_READER: std::cell::RefCell<Option<SqliteReader>> =
        const { std::cell::RefCell::new(None) };
    /// The batch this worker thread's next write joins, while one is waiting for the writer or
    /// open.
    static SQLITE_BATCH: std::cell::RefCell<Option<std::rc::Rc<WriteBatch>>> =
        const { std::cell::RefCell::new(None) };
}

impl SqliteDatabase {
    /// Runs `statements` on this thread's reader connection.
    async fn read<T>(
        &self,
        statements: impl FnOnce(&mut SqliteConnection) -> Option<QueryResult<T>>,
    ) -> Result<T, ApiError> {
        // Every `:memory:` connection is a database of its own: there the writer is the only one.
        if self.path == ":memory:" {
            return self.write(statements).await;
        }
        SQLITE_READER.with_borrow_mut(|reader| {
            let reader = match reader {
                Some(reader) => reader,
                None => reader.insert(SqliteReader::open(&self.path)?),
            };
            reader.begin_snapshot()?;
            let result = finish_inline(&mut reader.conn, statements);
            if result.is_err() {
                reader.end_snapshot();
            }
            result
        })
    }

    /// Runs `statements` on the writer, in this thread's batch, and answers once the batch is
    /// committed: a write is acknowledged only when it will survive a crash.
    async fn write<T, F>(&self, mut statements: F) -> Result<T, ApiError>
    where
        F: FnOnce(&mut SqliteConnection) -> Option<QueryResult<T>>,
    {
        loop {
            let batch = WriteBatch::join(&self.writer);
            batch.opened().await?;
            match batch.run(statements) {
                Ok(result) => {
                    batch.committed().await?;
                    return result;
                }
                // The batch closed before this write's turn came: it goes into the next one.
                Err(not_run) => {
                    let _ = batch.committed().await;
                    statements = not_run;
                }
            }
        }
    }
}

/// A worker thread's reader connection, and the read transaction (snapshot) it reads in.
///
/// Reads made on one thread during one turn of its event loop share one read transaction, as
/// writes share a batch. Begun and ended for every statement on its own, a read transaction
/// cost a fifth of a task list: SQLite takes and drops a lock on the WAL's shared memory each
/// time, which is a `fcntl` system call, under a mutex the threads' readers share and wait
/// for each other on. A snapshot is ended a turn after it began, by a task of its own; and it
/// is used only while nothing has been committed since it began, by this process or another
/// (see `WalIndex`), so a read always sees every write acknowledged before it, as with a
/// transaction of its own.
struct SqliteReader {
    conn: SqliteConnection,
    /// The database's WAL index; without it (not in WAL mode) each statement reads on its own.
    wal: Option<WalIndex>,
    /// The WAL index's header when the open read transaction began; `None` when none is open.
    snapshot: Option<WalHeader>,
}

impl SqliteReader {
    fn open(path: &str) -> Result<SqliteReader> {
        let conn = open_sqlite(path).map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let wal = WalIndex::open(path);
        Ok(SqliteReader {
            conn,
            wal,
            snapshot: None,
        })
    }

    /// Makes sure a read transaction is open that began after the last commit, if any is.
    fn begin_snapshot(&mut self) -> Result<()> {
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        let header = wal.header();
        match self.snapshot {
            Some(began) if began == header => return Ok(()),
            Some(_) => self.end_snapshot(),
            // The first snapshot of a turn: a task ends it in the next one.
            None => drop(actix_web::rt::spawn(async {
                actix_web::rt::task::yield_now().await;
                SQLITE_READER.with_borrow_mut(|reader| reader.as_mut().map(Self::end_snapshot));
            })),
        }
        // DEFERRED: SQLite takes the snapshot at the first statement, after `header` was read,
        // so a commit in between only makes the next read start another.
        sql(&mut self.conn, "BEGIN DEFERRED")?;
        self.snapshot = Some(header);
        Ok(())
    }

    fn end_snapshot(&mut self) {
        if self.snapshot.take().is_some() && sql(&mut self.conn, "COMMIT").is_err() {
            rollback(&mut self.conn);
        }
    }
}

/// The header of a WAL database's index, as SQLite keeps it in shared memory: the start of
/// the `-shm` file, mapped read-only. SQLite rewrites it on every commit, from any process
/// (its `iChange` counter, the log's last frame `mxFrame`, and a new salt when the log starts
/// over); it is laid out as SQLite's "WAL-mode file format" page describes. Read without a
/// system call, it tells whether a snapshot is still current.
struct WalIndex(memmap2::Mmap);

/// The header's first copy: 48 bytes, compared whole.
type WalHeader = [u64; 6];

impl WalIndex {
    /// Not found (not in WAL mode, or not a file) is `None`.
    fn open(database: &str) -> Option<WalIndex> {
        // Next to the database file itself: SQLite follows symbolic links to it.
        let mut shm = std::fs::canonicalize(database).ok()?.into_os_string();
        shm.push("-shm");
        let file = std::fs::File::open(shm).ok()?;
        // SAFETY: SQLite changes this file's contents under the mapping, so it is only ever
        // read with volatile loads (`header`), never through a reference; it never shrinks
        // while a connection (this thread's reader) has the database open.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let index = (map.len() >= std::mem::size_of::<WalHeader>()).then_some(WalIndex(map))?;
        // The header starts with its format's version, 3007000, in the machine's byte order.
        let start = index.header()[0].to_ne_bytes();
        let version = u32::from_ne_bytes([start[0], start[1], start[2], start[3]]);
        (version == 3_007_000).then_some(index)
    }

    fn header(&self) -> WalHeader {
        let words = self.0.as_ptr().cast::<u64>();
        // SAFETY: the mapping is page-aligned and at least 48 bytes long (`open`). A read torn
        // by a concurrent commit differs from the header it is compared with, as the commit's
        // own would: the snapshot is then only begun again.
        std::array::from_fn(|i| unsafe { words.add(i).read_volatile() })
    }
}

/// Writes made on one worker thread during one turn of its event loop, committed together.
///
/// The first write to find no batch starts one, and a task of its own that waits for the
/// writer, opens a transaction, lets every request this thread has ready run its writes in it,
/// each in a savepoint of its own (a write that fails undoes only itself), then commits and
/// hands the writer on. Each write is answered after that COMMIT, so it is as durable as with a
/// commit of its own, for a share of one. The batch lives on one thread, so its requests wait
/// for it without any thread switch; the writer changes threads once per batch, not per write.
struct WriteBatch {
    /// The writer, inside the batch's transaction, while the batch is open; the error instead
    /// if a write's error ended the transaction early.
    writer: std::cell::RefCell<Option<Result<tokio::sync::OwnedMutexGuard<SqliteConnection>>>>,
    state: tokio::sync::watch::Sender<BatchState>,
}

enum BatchState {
    WaitingForWriter,
    Open,
    Done(Result<(), ApiError>),
}

impl WriteBatch {
    /// This thread's current batch, started if there is none.
    fn join(writer: &Arc<tokio::sync::Mutex<SqliteConnection>>) -> std::rc::Rc<WriteBatch> {
        SQLITE_BATCH.with_borrow_mut(|current| {
            let batch = current.get_or_insert_with(|| {
                let batch = std::rc::Rc::new(WriteBatch {
                    writer: None.into(),
                    state: tokio::sync::watch::Sender::new(BatchState::WaitingForWriter),
                });
                actix_web::rt::spawn(batch.clone().drive(writer.clone()));
                batch
            });
            batch.clone()
        })
    }

    /// Opens the batch, commits it one turn of the event loop later, and tells its writes.
    async fn drive(self: std::rc::Rc<Self>, writer: Arc<tokio::sync::Mutex<SqliteConnection>>) {
        let outcome = self.open_and_commit(writer).await;
        SQLITE_BATCH.with_borrow_mut(|current| *current = None);
        self.state.send_replace(BatchState::Done(outcome));
    }

    async fn open_and_commit(
        &self,
        writer: Arc<tokio::sync::Mutex<SqliteConnection>>,
    ) -> Result<()> {
        let mut writer = writer.lock_owned().await;
        begin_immediate(&mut writer).await?;
        *self.writer.borrow_mut() = Some(Ok(writer));
        self.state.send_replace(BatchState::Open);
        // The requests woken by `Open`, and those the poll for I/O finds ready, run before this
        // task does again (tokio defers a yield until then).
        actix_web::rt::task::yield_now().await;
        let writer = self.writer.borrow_mut().take();
        let lost = || ApiError::Internal("the write batch lost its writer".into());
        let mut writer = writer.ok_or_else(lost)??;
        sql(&mut writer, "COMMIT").inspect_err(|_| rollback(&mut writer))
    }

    /// Waits until the batch holds the writer, or has failed to get it.
    async fn opened(&self) -> Result<()> {
        self.wait_for(|state| !matches!(state, BatchState::WaitingForWriter))
            .await
    }

    async fn committed(&self) -> Result<()> {
        self.wait_for(|state| matches!(state, BatchState::Done(_)))
            .await
    }

    async fn wait_for(&self, reached: impl FnMut(&BatchState) -> bool) -> Result<()> {
        let mut state = self.state.subscribe();
        let state = state.wait_for(reached).await;
        match state.as_deref() {
            Ok(BatchState::Done(Err(e))) => Err(e.again()),
            Ok(_) => Ok(()),
            Err(_) => Err(ApiError::Internal("write batch dropped".into())),
        }
    }

    /// Runs `statements` in a savepoint of the open transaction; gives them back if the batch
    /// is closed (committed, or its transaction ended by an error).
    fn run<T, F>(&self, statements: F) -> Result<Result<T>, F>
    where
        F: FnOnce(&mut SqliteConnection) -> Option<QueryResult<T>>,
    {
        let mut open = self.writer.borrow_mut();
        let Some(Ok(writer)) = open.as_mut() else {
            return Err(statements);
        };
        if let Err(e) = sql(writer, "SAVEPOINT write") {
            return Ok(Err(e));
        }
        let result = finish_inline(writer, statements);
        let end = match result {
            Ok(_) => "RELEASE write",
            Err(_) => "ROLLBACK TO write; RELEASE write",
        };
        // Only an error that ended the whole transaction (an I/O error, a full disk) leaves no
        // savepoint to close: then the writes before this one are lost, and the batch fails.
        if let Err(e) = sql(writer, end) {
            rollback(writer);
            *open = Some(Err(e));
        }
        Ok(result)
    }
}

impl ApiError {
    /// The failure of a batch, for each of its writes (only 503 and 500 come out of one).
    fn again(&self) -> ApiError {
        match self {
            ApiError::Unavailable(m) => ApiError::Unavailable(m.clone()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// How long a write waits for another process to release the database's write lock.
const SQLITE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// `BEGIN IMMEDIATE` on the writer, waiting while another process holds the write lock (a second
/// server on the same file, a `sqlite3` shell, a `VACUUM`). The writer has no busy timeout: SQLite
/// would wait inside its busy handler, asleep on this worker thread with every request of the
/// thread. Here the wait is a task that sleeps, and the thread goes on serving.
async fn begin_immediate(writer: &mut SqliteConnection) -> Result<()> {
    let deadline = Instant::now() + SQLITE_LOCK_WAIT;
    loop {
        match sql(writer, "BEGIN IMMEDIATE") {
            // "database is locked"
            Err(ApiError::Unavailable(_)) if Instant::now() < deadline => {
                actix_web::rt::time::sleep(Duration::from_millis(5)).await
            }
            begun => return begun,
        }
    }
}

/// Runs SQL without results on a SQLite connection.
fn sql(conn: &mut SqliteConnection, text: &str) -> Result<()> {
    use diesel::connection::SimpleConnection;
    Ok(conn.batch_execute(text)?)
}

/// Ends whatever transaction is left open, so the writer is clean for the next batch.
fn rollback(conn: &mut SqliteConnection) {
    let _ = sql(conn, "ROLLBACK"); // "no transaction is active" is fine too
}

/// The result of statements that finish within one poll, as SQLite's through `inline_sqlite` do.
fn finish_inline<T>(
    conn: &mut SqliteConnection,
    statements: impl FnOnce(&mut SqliteConnection) -> Option<QueryResult<T>>,
) -> Result<T, ApiError> {
    let result = statements(conn).ok_or_else(|| {
        ApiError::Internal("a SQLite statement waited for something other than SQLite".into())
    })?;
    Ok(result?)
}

/// How to reach PostgreSQL. Each thread that uses it builds a pool of its own from these.
struct PgSettings {
    url: String,
    /// Connections per thread's pool for writes: `DATABASE_POOL_SIZE` shared out among the
    /// workers. The pool holds `PG_READERS` more, the thread's readers (see
    /// `PgDatabase::reader`).
    pool_size: u32,
    timeout: Duration,
}

thread_local! {
    static PG_POOL: std::cell::OnceCell<std::rc::Rc<PgDatabase>> = const { std::cell::OnceCell::new() };
}

impl PgSettings {
    /// This thread's pool, built on first use.
    ///
    /// tokio-postgres drives each connection with a task on the runtime that opened it. With a
    /// pool per worker thread, a query and its connection's I/O run on one thread — no hop to
    /// another thread and back for every statement — and a worker that stops at shutdown takes
    /// only its own, idle connections with it, never one another worker is still using.
    fn pool_here(&self) -> std::rc::Rc<PgDatabase> {
        PG_POOL.with(|pool| pool.get_or_init(|| self.open_pool().into()).clone())
    }

    fn open_pool(&self) -> PgDatabase {
        let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
        let timeout = self.timeout;
        manager_config.custom_setup = Box::new(move |url| connect_postgres(url, timeout).boxed());
        let manager = AsyncDieselConnectionManager::new_with_config(&self.url, manager_config);
        let connect_failures = ConnectFailures::default();
        let pool = bb8::Pool::builder()
            .max_size(self.pool_size + PG_READERS as u32)
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
        PgDatabase {
            pool,
            timeout,
            connect_failures,
            readers: Default::default(),
            next_reader: Default::default(),
        }
    }
}

/// A PostgreSQL pool that fails fast: a server that refuses connections gets its 503 at once,
/// and one that stops answering (frozen, or a network that drops packets) within `timeout`.
struct PgDatabase {
    pool: PgPool,
    /// Bounds each use of the database: waiting for a connection, then the statement.
    timeout: Duration,
    connect_failures: ConnectFailures,
    /// The connections this thread's reads go through, in turn (see `PgDatabase::reader`).
    readers: std::cell::RefCell<Vec<std::rc::Rc<PgConnection>>>,
    next_reader: std::cell::Cell<usize>,
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

type PgConnection = bb8::PooledConnection<'static, AsyncDieselConnectionManager<AsyncPgConnection>>;

impl PgDatabase {
    /// A live pooled connection, or 503 as soon as the server is known to refuse connections.
    async fn connection(&self) -> Result<PgConnection, ApiError> {
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
    async fn checkout(&self) -> Result<PgConnection, ApiError> {
        let mut checkout = std::pin::pin!(self.pool.get_owned());
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

    /// One of the `PG_READERS` connections this thread's reads share, in turn; each taken from
    /// the pool on first use.
    ///
    /// A pooled connection serves one request at a time: a request sends its statement, then
    /// the connection waits a round trip for the answer while other requests wait for it.
    /// diesel-async's connection also runs statements through a shared reference, and then
    /// *pipelines* them: the statements of every request in flight on this thread go out
    /// together, in one write, and their answers come back together. Reads are single
    /// statements outside any transaction, so they can share it; writes keep the pool, where
    /// each has a connection (and a PostgreSQL backend) of its own and their commits can wait
    /// for the disk at the same time.
    ///
    /// PostgreSQL answers one connection's statements one after another, in one backend
    /// process: all reads behind one backend would stall whenever the scheduler runs something
    /// else on its core. Two readers per thread keep that from stopping every read at once.
    async fn reader(&self) -> Result<std::rc::Rc<PgConnection>, ApiError> {
        let turn = self.next_reader.get().wrapping_add(1);
        self.next_reader.set(turn);
        if let Some(reader) = self.readers.borrow().get(turn % PG_READERS).cloned() {
            return Ok(reader);
        }
        let reader = std::rc::Rc::new(self.connection().await?);
        let mut readers = self.readers.borrow_mut();
        if readers.len() < PG_READERS {
            readers.push(reader.clone());
        }
        Ok(reader)
    }

    /// Stops sharing this thread's readers after the server closed `failed`: when it closes
    /// one it has usually closed them all (a restart), so the next read takes a new one rather
    /// than try the others. Once the requests still holding them let go, they go back to the
    /// pool, which keeps the live ones and drops the dead; until then the pool counts them, so
    /// this request lets go of `failed` first.
    fn forget_readers(&self, failed: std::rc::Rc<PgConnection>) {
        drop(failed);
        self.readers.borrow_mut().clear();
    }
}

/// Read connections per worker thread (see `PgDatabase::reader`).
const PG_READERS: usize = 2;

/// Whether a statement failed because its connection is gone (the server restarted, or closed
/// it), not because of the statement.
fn connection_lost(error: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind::*, Error::DatabaseError};
    matches!(
        error,
        DatabaseError(ClosedConnection | UnableToSendCommand, _)
    )
}

/// Runs `$query` (a future yielding `QueryResult<T>`) with `$conn` bound to a connection, giving
/// `Result<T, ApiError>`.
///
/// The body is expanded once per backend, the way vaultwarden's `db_run!` does it: each query is
/// written once and compiled, type-checked, against both SQLite and PostgreSQL. `read` or
/// `write` picks SQLite's writer, and on PostgreSQL whether the statements share this thread's
/// readers or take a pooled connection of their own (`pg_run!`). SQLite statements finish within
/// one poll (`now_or_never`: the block may await only its statements); on PostgreSQL, waiting
/// for a connection and the statements together are bounded by `DATABASE_TIMEOUT`, so a frozen
/// server costs a request seconds, not forever.
macro_rules! db {
    ($database:expr, $role:ident, |$conn:ident| $query:expr) => {
        match &$database {
            Database::Sqlite(sqlite) => {
                use inline_sqlite::RunQueryDsl as _;
                sqlite.$role(|$conn| $query.now_or_never()).await
            }
            Database::Postgres(settings) => {
                use diesel_async::RunQueryDsl as _;
                let pg = settings.pool_here();
                let answer = pg_run!(pg, $role, |$conn| $query);
                actix_web::rt::time::timeout(pg.timeout, answer)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ApiError::Unavailable(
                            "the database did not answer in time".into(),
                        ))
                    })
            }
        }
    };
}

/// `db!`'s PostgreSQL side: a read on one of this thread's shared readers, run again on a new
/// one if the server had closed it (a read changes nothing, so running it twice is safe); a
/// write on a pooled connection of its own.
macro_rules! pg_run {
    ($pg:expr, read, |$conn:ident| $query:expr) => {
        async {
            let (mut reader, mut again) = ($pg.reader().await?, true);
            loop {
                let $conn = &mut &**reader;
                match $query.await {
                    Err(e) if again && connection_lost(&e) => {
                        $pg.forget_readers(reader);
                        (reader, again) = ($pg.reader().await?, false);
                    }
                    answer => break answer.map_err(ApiError::from),
                }
            }
        }
    };
    ($pg:expr, write, |$conn:ident| $query:expr) => {
        async {
            let mut pooled = $pg.connection().await?;
            let $conn = &mut *pooled;
            $query.await.map_err(ApiError::from)
        }
    };
}

/// `UPDATE … SET $changes, updated_at = now RETURNING *` on `$row`, a query for at most one row
/// of `$table`: `Some` of the row as it is now, or `None` if there is no such row. A macro, as
/// `db!` is: each changeset is a type of its own.
macro_rules! update_returning {
    ($database:expr, $row:expr, $changes:expr, $table:ident => $Row:ty) => {
        db!($database, write, |conn| async {
            let update = diesel::update($row)
                .set(($changes, $table::updated_at.eq(now())))
                .returning(<$Row>::as_returning());
            KeepPrepared(update)
                .get_result::<$Row>(conn)
                .await
                .optional()
        })
    };
}

/// A statement diesel keeps prepared, although it is of a kind (an UPDATE, an upsert) that
/// diesel prepares anew every time it runs: parsed and planned again, and on PostgreSQL one
/// more round trip to prepare it. diesel does that because a changeset with optional fields
/// gives one statement type many texts; it then cannot find the prepared statement by type.
/// This one is found by its text (`HAS_STATIC_QUERY_ID = false`), so each text is prepared once
/// per connection: a toggle, the same text every time, once; a PATCH, once per set of fields.
///
/// `is_safe_to_cache_prepared` is the hook diesel gives query types for this; diesel's docs
/// show it only to backend authors, so a diesel upgrade that changes it fails to compile here.
struct KeepPrepared<Q>(Q);

impl<Q: diesel::query_builder::QueryFragment<DB>, DB: diesel::backend::Backend>
    diesel::query_builder::QueryFragment<DB> for KeepPrepared<Q>
{
    fn walk_ast<'b>(&'b self, pass: diesel::query_builder::AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> diesel::query_builder::QueryId for KeepPrepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: diesel::query_builder::Query> diesel::query_builder::Query for KeepPrepared<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, C> diesel::RunQueryDsl<C> for KeepPrepared<Q> {}

impl Database {
    /// Opens the pools and brings the schema up to date; runs before the server listens.
    async fn connect(config: &Config) -> Result<Database, String> {
        let migrations;
        let database = match &config.database {
            DatabaseUrl::Sqlite(path) => {
                // The writer opens first, so that it turns WAL on before any reader opens.
                let mut writer =
                    open_sqlite(path).map_err(|e| format!("cannot open the database: {e}"))?;
                migrations = migrate_sqlite(&mut writer)?;
                // From now on the writer waits for locks in `begin_immediate`, not in SQLite.
                sql(&mut writer, "PRAGMA busy_timeout = 0").map_err(|e| e.to_string())?;
                let writer = Arc::new(tokio::sync::Mutex::new(writer));
                if path != ":memory:" {
                    spawn_checkpointer(path, writer.clone())?;
                }
                Database::Sqlite(Arc::new(SqliteDatabase {
                    path: path.clone(),
                    writer,
                }))
            }
            DatabaseUrl::Postgres(url) => {
                // At startup the server may wait longer than a request would: a database that
                // is itself starting (or a serverless one waking up) should not stop it.
                let startup_timeout = config.database_timeout.max(STARTUP_CONNECT_TIMEOUT);
                migrations = migrate_postgres(url, startup_timeout).await?;
                let total = config.pool_size.unwrap_or(10);
                Database::Postgres(Arc::new(PgSettings {
                    url: url.clone(),
                    pool_size: total.div_ceil(worker_threads() as u32),
                    timeout: config.database_timeout,
                }))
            }
        };
        log::info!("database schema up to date ({migrations} migrations applied now)");
        Ok(database)
    }

    /// `SELECT 1` through the pool: the real answer to "is the database up?".
    async fn ping(&self) -> Result<(), ApiError> {
        db!(self, read, |conn| diesel::sql_query("SELECT 1")
            .execute(conn))
        .map(|_| ())
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

/// Brings a SQLite schema up to date, on the writer: for `:memory:` it is the only database
/// there is.
fn migrate_sqlite(writer: &mut SqliteConnection) -> Result<usize, String> {
    let migrated = writer.run_pending_migrations(SQLITE_MIGRATIONS);
    migrated.map(|v| v.len()).map_err(|e| e.to_string())
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
    tokio::task::spawn_blocking(move || {
        use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        conn.run_pending_migrations(POSTGRES_MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
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

/// Opens one SQLite connection, set up the way this app needs every connection to be.
fn open_sqlite(path: &str) -> diesel::ConnectionResult<SqliteConnection> {
    let mut conn = SqliteConnection::establish(path)?;
    let setup = |conn: &mut SqliteConnection| -> QueryResult<()> {
        // busy_timeout first, so the statements after it wait for a lock instead of failing.
        // WAL lets readers run beside the writer. NORMAL syncs only at checkpoints, and in WAL
        // mode keeps every commit across a crash of this process. Checkpoints are left to the
        // background checkpointer, so requests wait for an fsync only when it resets the WAL
        // (see `checkpoint`), at most once a second.
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            "PRAGMA busy_timeout = 5000;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA wal_autocheckpoint = 0;
             PRAGMA foreign_keys = ON;",
        )?;
        lower_utils::register_impl(conn, |text: Option<String>| text.map(|t| t.to_lowercase()))
    };
    setup(&mut conn).map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

/// How many pages the write-ahead log may hold before the checkpointer resets it (see
/// `checkpoint`): 16 MiB of SQLite's default 4 KiB pages, four times the size at which SQLite
/// itself would checkpoint (`wal_autocheckpoint`, 1000 pages).
///
/// A reset makes writes wait (for two fsyncs and a truncation: 20 to 80 ms measured on a cloud
/// VM's disk), so it should not come on every tick under a moderate load; and the log, which reads
/// must search and which is replayed when the database is opened after a crash, should stay
/// small. It never grows much past this size plus what one second of writes adds (some 30 MiB
/// under a full load of creates).
const WAL_RESET_PAGES: i32 = 4096;

/// The row `PRAGMA wal_checkpoint` answers (its third column, pages copied, is not needed).
#[derive(diesel::QueryableByName)]
struct WalCheckpoint {
    /// 1 when a blocking checkpoint (`TRUNCATE`) gave up waiting for a reader or a writer.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    busy: i32,
    /// Pages (frames) in the log, since it last started over.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    log: i32,
}

/// Copies committed pages from the WAL into the database file once a second, on a thread of its
/// own with its own connection, and keeps the WAL from growing without bound.
///
/// It takes the `writer` now and then, to reset the WAL (see `checkpoint`).
fn spawn_checkpointer(
    path: &str,
    writer: Arc<tokio::sync::Mutex<SqliteConnection>>,
) -> Result<(), String> {
    let mut conn = SqliteConnection::establish(path).map_err(|e| e.to_string())?;
    // A reset waits for readers to leave the WAL while writes wait for the reset. Ours leave
    // within a turn of their event loop (a millisecond or so); one that stays longer (another
    // process in a long read) makes the reset give up after this and try again a second later,
    // rather than hold writes back.
    diesel::connection::SimpleConnection::batch_execute(&mut conn, "PRAGMA busy_timeout = 100;")
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            // A failure is retried on the next tick: the WAL only grows meanwhile.
            if let Err(e) = checkpoint(&mut conn, &writer) {
                log::warn!("SQLite checkpoint failed: {e}");
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One tick of the checkpointer: copies what it can, and resets the WAL once it holds
/// `WAL_RESET_PAGES`.
///
/// SQLite appends to the WAL until a writer finds every page in it copied and no reader still
/// reading it; then it starts the log over from the beginning. Under sustained writes that
/// moment never comes: new pages are appended while a checkpoint copies the old ones, so the
/// WAL grows for as long as the writes go on (a gigabyte in half a minute of creates at full
/// speed), until the disk is full. A `TRUNCATE` checkpoint makes the moment: it waits until no
/// one is writing, copies the rest, waits for the readers still on the WAL (a millisecond or
/// so), and empties it. The first commit after it also syncs the new log's header (a few ms).
fn checkpoint(
    conn: &mut SqliteConnection,
    writer: &tokio::sync::Mutex<SqliteConnection>,
) -> QueryResult<()> {
    // PASSIVE never blocks readers or the writer; what it cannot copy now, it copies next time.
    let wal = wal_checkpoint(conn, "PASSIVE")?;
    if wal.log < WAL_RESET_PAGES {
        return Ok(());
    }
    // The writer is taken first, between two batches, so no transaction is open while SQLite's
    // write lock is held for the reset. A batch that met that lock instead would wait in
    // SQLite's busy handler, asleep on its worker thread with every request of that thread;
    // queued on the mutex, writes wait without blocking anything, and reads go on.
    let writes_held = writer.blocking_lock();
    let held_since = Instant::now();
    // Only what was committed during the PASSIVE just above is left to copy, so this is short:
    // that copy, two fsyncs (the WAL, then the database file) and the truncation.
    let reset = wal_checkpoint(conn, "TRUNCATE");
    drop(writes_held);
    let writes_waited = held_since.elapsed();
    if reset?.busy != 0 {
        log::warn!(
            "SQLite WAL at {} pages: a reader kept it from being reset; trying again in a second",
            wal.log
        );
    } else {
        log::info!(
            "SQLite WAL reset at {} pages; writes waited {writes_waited:.1?}",
            wal.log
        );
    }
    Ok(())
}

/// Runs `PRAGMA wal_checkpoint(mode)`: SQLite reports a checkpoint kept waiting in its row, not
/// as an error.
fn wal_checkpoint(conn: &mut SqliteConnection, mode: &str) -> QueryResult<WalCheckpoint> {
    let pragma = diesel::sql_query(format!("PRAGMA wal_checkpoint({mode})"));
    diesel::RunQueryDsl::get_result(pragma, conn)
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

/// nginx's 499, for a request whose client hung up before its answer was ready: nobody reads it,
/// but the access log shows what happened.
fn client_closed_request() -> ApiError {
    let status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
    ApiError::Status(status, "Client closed the request".into())
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

    /// Runs `work` on the blocking pool once a permit is free, at `nice` 10: when the CPU is
    /// busy, requests that do not hash (and PostgreSQL, when it shares the machine) go first.
    ///
    /// Not if the client of `req` hung up while it waited: actix does not cancel a handler
    /// whose client left, so a burst of abandoned logins would otherwise keep every core
    /// hashing for clients long gone, and the queue would outgrow the cap on connections.
    async fn run<T: Send + 'static>(
        &self,
        req: &HttpRequest,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let permit = self.permits.acquire().await;
        let _permit = permit.map_err(|e| ApiError::Internal(e.to_string()))?;
        if ClientConnection::of(req).is_some_and(ClientConnection::closed) {
            return Err(client_closed_request());
        }
        let background = move || {
            // SAFETY: setpriority on this thread's own id changes only its nice value, which
            // any thread may raise; it touches no memory.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
            work()
        };
        Ok(web::block(background).await?)
    }

    async fn hash(&self, req: &HttpRequest, password: String) -> Result<String> {
        let cost = self.cost;
        let hashed = self.run(req, move || bcrypt::hash(password, cost)).await?;
        hashed.map_err(|e| ApiError::Internal(format!("bcrypt: {e}")))
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, or one who signs in
    /// elsewhere) it checks against the dummy and answers false, in the same time.
    async fn verify(
        &self,
        req: &HttpRequest,
        password: String,
        hash: Option<String>,
    ) -> Result<bool> {
        let usable = hash.is_some() && password.len() <= PASSWORD_MAX_BYTES;
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        // Always run, even when `usable` already says no: the time must not tell.
        let matches = self.run(req, move || {
            bcrypt::verify(password, &hash).unwrap_or(false)
        });
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
}

const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

impl Bucket<'_> {
    fn key(&self) -> String {
        match self {
            // Attackers choose the emails; one longer than any valid email is no account, and
            // cutting it keeps the rows small.
            Bucket::Email(email) => {
                let cut: String = email.chars().take(EMAIL_MAX_CHARS).collect();
                format!("email:{cut}")
            }
            Bucket::Client(ip) => format!("client:{ip}"),
            Bucket::PasswordOf(user_id) => format!("user:{user_id}"),
        }
    }

    /// Attempts allowed per window.
    fn limit(&self) -> i32 {
        match self {
            Bucket::Email(_) | Bucket::PasswordOf(_) => 10,
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
            KeepPrepared(upsert).get_result(conn)
        })?;
        if taken <= bucket.limit() {
            return Ok(());
        }
        let wait_ms = (started_ms + window_ms - now_ms).max(0) as u64;
        Err(ApiError::TooManyRequests {
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

/// Shared, read-mostly state, built once at startup and handed to every worker.
type State = web::Data<AppState>;

struct AppState {
    db: Database,
    auth: TokenAuthority,
    passwords: PasswordHasher,
    trusted_proxies: Vec<IpAddr>,
    body_timeout: Duration,
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
        let new_user = NewUser::now(&claims.sub, &email, name, None, Some(&issuer));
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
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let trusted = |ip: &IpAddr| self.trusted_proxies.contains(ip);
        if !trusted(&peer) {
            return peer;
        }
        let headers = req.headers().get_all("x-forwarded-for");
        let hops: Vec<&str> = (headers.filter_map(|v| v.to_str().ok()))
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            match hop.trim().parse() {
                Ok(ip) if trusted(&ip) => continue,
                Ok(ip) => return ip,
                // A hop that is not an address is not to be trusted any further.
                Err(_) => return peer,
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
        let verified = self.passwords.verify(req, password, hash).await? && plausible;
        let Some((user_id, _, generation)) = account.filter(|_| verified) else {
            // The failure keeps both slots it took.
            return Err(ApiError::Unauthorized("Incorrect email or password"));
        };
        self.db.clear_attempts(by_email).await?;
        self.db.give_back_attempt(by_client).await?;
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
        example = json!({"status": "unavailable", "database": "no database connection became available in time"})),
))]
#[get("/health")]
async fn health(state: State) -> HttpResponse {
    let (mut response, status, database) = match state.db.ping().await {
        Ok(()) => (HttpResponse::Ok(), HealthStatus::Ok, "ok".into()),
        Err(e) => {
            log::warn!("health check failed: {e}");
            let reason = match e {
                ApiError::Unavailable(reason) => reason,
                _ => "query failed".into(),
            };
            let unavailable = HttpResponse::ServiceUnavailable();
            (unavailable, HealthStatus::Unavailable, reason)
        }
    };
    response.json(Health { status, database })
}

// ----- [auth] ------------------------------------------------------------------------------------

/// Create an account.
#[utoipa::path(tag = "auth", security(), request_body = RegisterRequest, responses(
    (status = 201, description = "The new user", body = User),
    EmailTaken, BodyTooLarge, NotJson, Invalid,
))]
#[post("/api/auth/register")]
async fn register(state: State, req: HttpRequest, body: JsonBody) -> Result<HttpResponse> {
    let body: RegisterRequest = body.parse()?;
    let password_hash = state.passwords.hash(&req, body.password).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let name = body.name.as_deref();
    let new_user = NewUser::now(&id, &body.email, name, Some(&password_hash), None);
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
    req: HttpRequest,
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
    let right = (state.passwords).verify(&req, body.current_password, current_hash.clone());
    if !right.await? {
        return Err(INCORRECT_PASSWORD);
    }
    state.db.clear_attempts(guesses).await?;
    let new_hash = state.passwords.hash(&req, body.new_password).await?;
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
    let location = format!("/api/{}/tasks/{}", task.user_id, task.id);
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
const ACCESS_LOG_FORMAT: &str = r#"%a "%{method}xi %U" %s %b %Dms"#;

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
    configure_sqlite();
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
    if config.jwt_secret_is_random {
        log::warn!(
            "JWT_SECRET is not set: using a random secret, so tokens will not survive a restart"
        );
    }
    let state = web::Data::new(AppState::new(&config).await?);
    spawn_housekeeping(&state)?;
    let openapi = openapi_document();
    let known_routes = web::Data::new(KnownRoutes::from_openapi(&openapi));
    let cors_origins = config.cors_origins.clone();
    let (workers, max_connections) = (worker_threads(), connection_limit(&config));
    let response_timeout = config.response_timeout;
    let server = HttpServer::new(move || {
        App::new()
            .into_utoipa_app()
            .configure(api_routes)
            .into_app()
            .app_data(state.clone())
            .app_data(known_routes.clone())
            .service(web::redirect("/docs", "/docs/"))
            .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi.clone()))
            .default_service(web::to(no_route))
            .wrap(middleware::from_fn(catch_panics))
            .wrap(cors(&cors_origins))
            .wrap(middleware::ErrorHandlers::new().default_handler(json_error_bodies))
            .wrap(
                middleware::DefaultHeaders::new().add((header::X_CONTENT_TYPE_OPTIONS, "nosniff")),
            )
            // Only when its lines are written: the logger renders its fields for every request
            // (2% of a task list's time) before it asks whether info is logged.
            .wrap(middleware::Condition::new(
                log::log_enabled!(target: "actix_web::middleware::logger", log::Level::Info),
                middleware::Logger::new(ACCESS_LOG_FORMAT)
                    .custom_request_replace("method", |req| req.method().to_string()),
            ))
            // Last, so outermost: it watches every response, whichever layer produced it.
            .wrap(middleware::from_fn(watch_response))
    })
    .workers(workers)
    .max_connections(max_connections / workers)
    // SIGTERM and Ctrl-C both stop accepting, let in-flight requests finish, then exit.
    .shutdown_signal(shutdown_signal())
    .shutdown_timeout(30)
    // Before `bind`: actix takes the callback when it binds.
    .on_connect(move |io, data| note_connection(io, data, response_timeout))
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
            auth,
            passwords,
            trusted_proxies: config.trusted_proxies.clone(),
            body_timeout: config.body_timeout,
        })
    }
}

/// Background upkeep: expired login-throttle buckets, and memory freed after a burst.
fn spawn_housekeeping(state: &AppState) -> Result<(), String> {
    // Throttle buckets whose minute is over are deleted in the background.
    let throttle_db = state.db.clone();
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(THROTTLE_WINDOW).await;
            if let Err(e) = throttle_db.forget_old_attempts().await {
                log::warn!("cannot clear old login attempts: {e}");
            }
        }
    });
    // A burst of connections (slow clients, a load spike) leaves freed memory in glibc's
    // per-thread arenas, which it hands back to the kernel only from the top of each heap.
    // Trimming now and then returns it, so the process shrinks back once the burst is over.
    std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
            unsafe { libc::malloc_trim(0) };
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
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
// the answer. A client that asks for a 7 MB page and never reads kept that page, and its
// connection, for as long as it stayed: 40 of them took 300 MB. So every response too big to go
// out in one piece is watched:
//
// - Its body is handed to actix a `RESPONSE_CHUNK` at a time. actix asks for more only when its
//   own write buffer (32 KiB) has drained, so a response waiting for its reader holds under
//   48 KiB there; handed over whole, it was copied into that buffer, a second copy of the page.
// - A watchdog ends the connection if the response is still being written `RESPONSE_TIMEOUT`
//   after the handler answered. The body itself cannot: actix stops asking it for data while
//   its buffer is full, which is exactly what a client that stopped reading causes. So the
//   watchdog shuts the socket down; actix's next write fails, and actix drops the connection
//   and the response with it.
//
// Smaller responses are left alone, at no cost: actix takes one whole into its buffer and is done
// with it at once, and its keep-alive timeout (5 s) then closes the connection if the client
// never reads.

/// How much of a response body actix is handed at a time, and the size below which a response is
/// not watched. Well under actix's 32 KiB write buffer, so a response of this size (headers
/// included) is finished the moment it is first polled.
const RESPONSE_CHUNK: usize = 16 * 1024;

/// What the watchdog needs to know of a connection, noted when actix accepts it.
#[derive(Clone, Copy)]
struct ClientConnection {
    socket: std::os::fd::RawFd,
    response_timeout: Duration,
}

impl ClientConnection {
    fn of(req: &HttpRequest) -> Option<ClientConnection> {
        req.conn_data::<ClientConnection>().copied()
    }

    /// Whether the client has hung up: a read that does not wait finds the end of the stream,
    /// or a reset. `MSG_PEEK` leaves any bytes there (a pipelined request) to actix. This is
    /// nginx's test for a client that closed its request (its status 499): one that only shut
    /// down its sending side counts as gone too.
    fn closed(self) -> bool {
        let mut byte = 0u8;
        let (buffer, flags) = (
            (&mut byte as *mut u8).cast(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        );
        // SAFETY: a handler runs only while actix holds its connection's socket open (it drops
        // the handler before it closes the socket); recv writes at most one byte to `byte`.
        let read = unsafe { libc::recv(self.socket, buffer, 1, flags) };
        let error = std::io::Error::last_os_error().raw_os_error();
        read == 0 || (read < 0 && !matches!(error, Some(libc::EAGAIN | libc::EINTR)))
    }
}

/// `HttpServer::on_connect`: notes the socket of each plain TCP connection.
fn note_connection(
    io: &dyn std::any::Any,
    data: &mut actix_web::dev::Extensions,
    timeout: Duration,
) {
    use std::os::fd::AsRawFd;
    if let Some(tcp) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
        data.insert(ClientConnection {
            socket: tcp.as_raw_fd(),
            response_timeout: timeout,
        });
    }
}

/// The outermost middleware: watches every response bigger than `RESPONSE_CHUNK` (or of unknown
/// size) with a `WatchedBody`; smaller ones pass as they are.
async fn watch_response<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: middleware::Next<B>,
) -> Result<ServiceResponse<EitherBody<B, WatchedBody>>, actix_web::Error> {
    let res = next.call(req).await?;
    let small = match res.response().body().size() {
        BodySize::None => true,
        BodySize::Sized(size) => size <= RESPONSE_CHUNK as u64,
        BodySize::Stream => false,
    };
    let connection = ClientConnection::of(res.request());
    match connection {
        Some(connection) if !small => {
            let peer = res.request().peer_addr();
            let watched = res.map_body(|_, body| WatchedBody::new(body.boxed(), connection, peer));
            Ok(watched.map_into_right_body())
        }
        _ => Ok(res.map_into_left_body()),
    }
}

/// A response body handed out a `RESPONSE_CHUNK` at a time, with a watchdog that ends the
/// connection if it is not all written within the connection's `response_timeout`.
struct WatchedBody {
    body: BoxBody,
    /// What is left of the last piece `body` gave. Cut with `Bytes::split_to`, which shares
    /// the piece's memory instead of copying it.
    rest: web::Bytes,
    watchdog: actix_web::rt::task::JoinHandle<()>,
}

impl WatchedBody {
    fn new(
        body: BoxBody,
        connection: ClientConnection,
        peer: Option<std::net::SocketAddr>,
    ) -> Self {
        let timeout = connection.response_timeout;
        // A task on this worker's thread, as the connection is.
        let watchdog = actix_web::rt::spawn(async move {
            actix_web::rt::time::sleep(timeout).await;
            log::warn!("response to {peer:?} not read within {timeout:?}: connection closed");
            reset(connection.socket);
        });
        WatchedBody {
            body,
            rest: web::Bytes::new(),
            watchdog,
        }
    }
}

impl Drop for WatchedBody {
    /// The body is dropped when actix has taken all of it, or when it drops the connection. The
    /// watchdog must then never touch the socket: once actix closes it, its number may be given
    /// to the next client. The watchdog runs on this same thread, so it is not running now, and
    /// an aborted task is never polled again.
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl MessageBody for WatchedBody {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<web::Bytes, Self::Error>>> {
        if self.rest.is_empty() {
            match std::task::ready!(std::pin::Pin::new(&mut self.body).poll_next(cx)) {
                Some(Ok(piece)) => self.rest = piece,
                end_or_error => return std::task::Poll::Ready(end_or_error),
            }
        }
        let size = self.rest.len().min(RESPONSE_CHUNK);
        std::task::Poll::Ready(Some(Ok(self.rest.split_to(size))))
    }
}

/// Ends a connection from outside actix: `shutdown` wakes actix, whose next write on the socket
/// fails, so it drops the connection; `SO_LINGER` 0 makes its close a reset, so the kernel
/// drops the unsent rest of the response too instead of holding it for a client that will not
/// read it.
fn reset(socket: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `socket` is an open socket: the watchdog that calls this is aborted before actix
    // closes it (see `WatchedBody`'s `Drop`). Both calls only change that socket's state.
    unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::shutdown(socket, libc::SHUT_RDWR);
    }
}

/// Process-wide SQLite settings, made before the first connection opens.
///
/// - Multi-thread mode: SQLite's own mutex on each connection, taken on every call and every
///   column read, is dropped. Each connection here is used by one thread at a time (diesel's
///   `SqliteConnection` is not `Sync`; readers are per thread, the writer behind a mutex).
/// - Allocation statistics off: SQLite keeps them behind one process-wide mutex, taken on every
///   malloc and free; under concurrent readers that lock was the hottest spot in a profile, and
///   nothing here reads them.
/// - Every connection gets the query planner stability guarantee (QPSG). Without it, a
///   statement whose plan *could* depend on a bound value (`LIMIT ?`, `LIKE ?`, a comparison
///   with an indexed column when STAT4 is compiled in, as the bundled SQLite is) is thrown away
///   and compiled again whenever its parameters change — on every request, so diesel's
///   prepared-statement cache never got a hit and SQL was parsed each time. Plans here do not
///   depend on values (no ANALYZE statistics), so nothing is lost.
fn configure_sqlite() {
    unsafe extern "C" fn enable_qpsg(
        db: *mut libsqlite3_sys::sqlite3,
        _error: *mut *mut std::ffi::c_char,
        _api: *const libsqlite3_sys::sqlite3_api_routines,
    ) -> std::ffi::c_int {
        // SAFETY: SQLite calls this with the connection it is opening; ENABLE_QPSG takes an
        // int (1: on) and an int pointer for the new setting, which may be null.
        unsafe {
            libsqlite3_sys::sqlite3_db_config(
                db,
                libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
                1 as std::ffi::c_int,
                std::ptr::null_mut::<std::ffi::c_int>(),
            )
        }
    }
    // SAFETY: sqlite3_config is documented as callable before sqlite3_initialize, which has not
    // run yet (no connection has been opened); MULTITHREAD takes no argument, MEMSTATUS an int.
    // sqlite3_auto_extension takes a function with the entry-point signature above.
    let results = unsafe {
        [
            libsqlite3_sys::sqlite3_config(libsqlite3_sys::SQLITE_CONFIG_MULTITHREAD),
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            ),
            libsqlite3_sys::sqlite3_auto_extension(Some(enable_qpsg)),
        ]
    };
    // Not OK only if SQLite were already initialized: slower, but still correct.
    debug_assert_eq!(results, [libsqlite3_sys::SQLITE_OK; 3]);
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(e) => {
            log::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    let ctrl_c = tokio::signal::ctrl_c();
    futures_util::pin_mut!(ctrl_c);
    let which = match futures_util::future::select(Box::pin(terminate.recv()), ctrl_c).await {
        futures_util::future::Either::Left(_) => "SIGTERM",
        futures_util::future::Either::Right(_) => "Ctrl-C",
    };
    log::info!("{which} received: finishing in-flight requests, then stopping");
}
