//! The SQLite ceiling for `benches/run.sh`: a bare actix-web server whose only work per request
//! is what the real server does before it touches the database, verifying the HS256 bearer
//! token, with the same jsonwebtoken validation settings (HS256 only, `exp` and `sub`
//! required, `nbf` checked, leeway 60 s), then answering a small JSON body. Every path and
//! method answers the same, so wrk can send it the real server's URLs.
//!
//! Not a test and not part of the server: built with `cargo build --release --bench bare_route`
//! (or `cargo bench --no-run`) and started by the benchmark script.
//!
//! Environment: `JWT_SECRET` (at least 32 bytes, as the server requires), `PORT` (default
//! 8000); it listens on 127.0.0.1 only, with one worker per core as the server does.

use actix_web::{http::header, web, App, HttpRequest, HttpResponse, HttpServer};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

async fn answer(req: HttpRequest, verifier: web::Data<Verifier>) -> HttpResponse {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let claims = token.and_then(|token| {
        jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation).ok()
    });
    match claims {
        Some(data) => HttpResponse::Ok().json(serde_json::json!({ "sub": data.claims.sub })),
        None => HttpResponse::Unauthorized().json(serde_json::json!({ "detail": "Invalid token" })),
    }
}

fn main() -> std::io::Result<()> {
    let secret = std::env::var("JWT_SECRET").unwrap_or_default();
    if secret.len() < 32 {
        eprintln!("error: JWT_SECRET must be set to at least 32 bytes");
        std::process::exit(2);
    }
    let port: u16 = match std::env::var("PORT").map(|p| p.parse()) {
        Err(_) => 8000,
        Ok(Ok(port)) => port,
        Ok(Err(_)) => {
            eprintln!("error: PORT is not a port number");
            std::process::exit(2);
        }
    };
    // The same settings as the server's `TokenAuthority::new`.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 60;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_aud = false;
    let key = DecodingKey::from_secret(secret.as_bytes()).map_err(std::io::Error::other)?;
    let verifier = web::Data::new(Verifier { key, validation });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());

    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(verifier.clone())
                .default_service(web::to(answer))
        })
        .workers(workers)
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
