//! The gate in front of mistral.rs's HTTP router for `serve`.
//!
//! mistral.rs's router answers every origin (CORS `*`), has no
//! authentication and mounts admin routes (unload, reload, tune, re-ISQ)
//! next to the completion routes: any web page the user opens could use or
//! unload the model. The gate, one middleware around that router:
//!
//! - answers only the routes a client of the OpenAI API needs
//!   ([`ROUTES`]); everything else is a 404;
//! - refuses a request whose `Origin` is neither a loopback origin nor one
//!   the user allowed (`--allow-origin`), preflights included, so browsers
//!   on other sites can neither read nor send;
//! - with an API key, wants `Authorization: Bearer KEY` on every route but
//!   the health check, compared in constant time; `serve` requires a key
//!   when it listens beyond the loopback interface;
//! - caps a completion request's body size, `n` and `max_tokens` (a
//!   request without `max_tokens` gets the cap), and the time its body may
//!   take to arrive (a client that stalls mid-body gets a 408).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The routes the gate lets through: health, the model list and the
/// completion APIs. (Paths as mistral.rs's router names them.)
pub const ROUTES: &[&str] = &[
    "/",
    "/health",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
];
/// Routes answered without an API key (load balancers probe them).
const OPEN_ROUTES: &[&str] = &["/", "/health"];
/// Routes whose JSON body the gate checks against the caps.
const COMPLETION_ROUTES: &[&str] = &["/v1/chat/completions", "/v1/completions"];

/// What the gate allows; built once from `serve`'s flags.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Bearer token every guarded route wants; `None` when no key is set.
    pub api_key: Option<String>,
    /// Origins allowed besides the loopback ones, as browsers send them
    /// (`https://app.example.com`).
    pub allowed_origins: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` (or `max_completion_tokens`) a request may ask
    /// for; a request that names none gets this.
    pub max_tokens: usize,
    /// Largest `n` (choices per request).
    pub max_n: usize,
    /// Longest a completion request's body may take to arrive.
    pub body_timeout: Duration,
}

/// Whether `host` (an address or `localhost`) is only reachable from this
/// machine.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `origin` (`scheme://host[:port]`) is a page served from this
/// machine's loopback interface.
fn is_loopback_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    if scheme != "http" && scheme != "https" {
        return false;
    }
    // Strip the port: after the last ':' unless it is inside [v6].
    let host = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => &rest[..i],
        _ => rest,
    };
    is_loopback_host(host)
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for i in 0..given.len().max(key.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = key.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
    }
    diff == 0
}

/// Why the gate refuses a request: an HTTP status and a message.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// A refusal with `status`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

impl IntoResponse for Refusal {
    /// An OpenAI-style error body.
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "message": self.message, "type": "invalid_request_error" }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

impl Policy {
    /// Why a request with these headers may not pass, if it may not.
    fn check_headers(&self, req: &Request) -> Result<(), Refusal> {
        let path = req.uri().path();
        if !ROUTES.contains(&path) {
            return Err(refuse(StatusCode::NOT_FOUND, format!("no route {path}")));
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let allowed =
                is_loopback_origin(origin) || self.allowed_origins.iter().any(|o| o == origin);
            if !allowed {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    format!("origin {origin} is not allowed (serve --allow-origin adds one)"),
                ));
            }
        }
        // A preflight carries no credentials; the request that follows does.
        if req.method() == Method::OPTIONS || OPEN_ROUTES.contains(&path) {
            return Ok(());
        }
        if let Some(key) = &self.api_key {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(given.as_bytes(), key.as_bytes()) {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "a valid API key is required: Authorization: Bearer KEY",
                ));
            }
        }
        Ok(())
    }

    /// The completion request `body` with the caps applied, or why not.
    fn capped_body(&self, body: &[u8]) -> Result<Vec<u8>, Refusal> {
        let mut json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        let Some(fields) = json.as_object_mut() else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object",
            ));
        };
        let count = |name: &str, value: &serde_json::Value| {
            value.as_u64().ok_or_else(|| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("`{name}` must be a non-negative whole number, not {value}"),
                )
            })
        };
        if let Some(n) = fields.get("n").filter(|v| !v.is_null()) {
            let n = count("n", n)?;
            if n > self.max_n as u64 {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("`n` is {n}; this server allows at most {}", self.max_n),
                ));
            }
        }
        let mut named = false;
        for name in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = fields.get(name).filter(|v| !v.is_null()) {
                let v = count(name, v)?;
                if v > self.max_tokens as u64 {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "`{name}` is {v}; this server allows at most {}",
                            self.max_tokens
                        ),
                    ));
                }
                named = true;
            }
        }
        if !named {
            fields.insert("max_tokens".into(), self.max_tokens.into());
        }
        Ok(serde_json::to_vec(&json).expect("a JSON value serializes"))
    }
}

/// The middleware: `axum::middleware::from_fn_with_state(policy, guard)`.
pub async fn guard(State(policy): State<Arc<Policy>>, req: Request, next: Next) -> Response {
    if let Err(refused) = policy.check_headers(&req) {
        return refused.into_response();
    }
    if req.method() != Method::POST || !COMPLETION_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, policy.max_body_bytes);
    let body = match tokio::time::timeout(policy.body_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than this server's limit of {} bytes",
                    policy.max_body_bytes
                ),
            )
            .into_response()
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} s",
                    policy.body_timeout.as_secs_f64()
                ),
            )
            .into_response()
        }
    };
    let capped = match policy.capped_body(&body) {
        Ok(capped) => capped,
        Err(refused) => return refused.into_response(),
    };
    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from_str(&capped.len().to_string()).expect("digits"),
    );
    next.run(Request::from_parts(parts, Body::from(capped)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            api_key: Some("s3cret".into()),
            allowed_origins: vec!["https://app.example.com".into()],
            max_body_bytes: 1000,
            max_tokens: 100,
            max_n: 2,
            body_timeout: Duration::from_secs(30),
        }
    }

    fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request {
        let mut req = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Body::empty()).unwrap()
    }

    fn status(r: Result<(), Refusal>) -> StatusCode {
        r.err().map_or(StatusCode::OK, |r| r.status)
    }

    #[test]
    fn loopback_hosts_and_origins() {
        for host in ["127.0.0.1", "::1", "[::1]", "localhost", "127.8.9.1"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "::",
            "192.168.1.2",
            "example.com",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1",
            "https://[::1]:8443",
        ] {
            assert!(is_loopback_origin(origin), "{origin}");
        }
        for origin in [
            "http://evil.com",
            "http://localhost.evil.com",
            "http://127.0.0.1.evil.com:80",
            "null",
            "file://localhost",
        ] {
            assert!(!is_loopback_origin(origin), "{origin}");
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for other in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"s3cres"] {
            assert!(!same_secret(other, b"s3cret"), "{other:?}");
        }
    }

    #[test]
    fn routes_origins_and_keys() {
        let p = policy();
        let auth = ("authorization", "Bearer s3cret");
        let chat = "/v1/chat/completions";
        assert_eq!(
            status(p.check_headers(&request(Method::POST, chat, &[auth]))),
            StatusCode::OK
        );
        assert_eq!(
            status(p.check_headers(&request(Method::POST, chat, &[]))),
            StatusCode::UNAUTHORIZED
        );
        let wrong = ("authorization", "Bearer s3cres");
        assert_eq!(
            status(p.check_headers(&request(Method::POST, chat, &[wrong]))),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(p.check_headers(&request(Method::GET, "/health", &[]))),
            StatusCode::OK
        );
        for admin in [
            "/v1/models/unload",
            "/v1/models/reload",
            "/v1/models/tune",
            "/re_isq",
            "/v1/system/doctor",
        ] {
            assert_eq!(
                status(p.check_headers(&request(Method::POST, admin, &[auth]))),
                StatusCode::NOT_FOUND,
                "{admin}"
            );
        }
        let evil = ("origin", "http://evil.com");
        assert_eq!(
            status(p.check_headers(&request(Method::OPTIONS, chat, &[evil]))),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(p.check_headers(&request(Method::POST, chat, &[evil, auth]))),
            StatusCode::FORBIDDEN
        );
        for origin in ["https://app.example.com", "http://localhost:5173"] {
            let o = ("origin", origin);
            assert_eq!(
                status(p.check_headers(&request(Method::OPTIONS, chat, &[o]))),
                StatusCode::OK
            );
            assert_eq!(
                status(p.check_headers(&request(Method::POST, chat, &[o, auth]))),
                StatusCode::OK
            );
        }
    }

    #[test]
    fn completion_bodies_are_capped() {
        let p = policy();
        let capped = |body: &str| {
            p.capped_body(body.as_bytes())
                .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
                .map_err(|r| r.status)
        };
        let ok = capped(r#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(ok["max_tokens"], 100);
        assert_eq!(
            capped(r#"{"max_tokens":50,"n":2}"#).unwrap()["max_tokens"],
            50
        );
        let ok = capped(r#"{"max_completion_tokens":7}"#).unwrap();
        assert!(ok.get("max_tokens").is_none());
        for bad in [
            r#"{"max_tokens":101}"#,
            r#"{"max_completion_tokens":1000000}"#,
            r#"{"n":3}"#,
            r#"{"n":-1}"#,
            r#"{"max_tokens":"lots"}"#,
            r#"{"max_tokens":1e300}"#,
            r#"[1,2]"#,
            r#"{"max_tokens":"#,
        ] {
            assert_eq!(capped(bad).unwrap_err(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
