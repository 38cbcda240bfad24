//! Guards in front of every route: the token, the cross-site checks, the
//! Host check and the response headers that limit what a page may do.
//!
//! Requests pass these layers, outermost first:
//!
//! 1. Response headers: a Content Security Policy that allows scripts and
//!    styles from this server only, no framing, no MIME sniffing and no
//!    referrer to other sites. Job values are escaped by the templates; the policy is a
//!    second line of defence should one ever slip through.
//! 2. Host check, when no token is set: the `Host` header must name a
//!    loopback address or `localhost`. Without it, a web page on another
//!    site could point its own domain name at 127.0.0.1 (DNS rebinding) and
//!    read the dashboard.
//! 3. Token, when one is set: `Authorization: Bearer TOKEN`, or the cookie
//!    that `/login` sets. Only `/login` and the static assets are exempt.
//! 4. Cross-site check on every request that changes something (any method
//!    but GET, HEAD and OPTIONS): a browser names the page that sent the
//!    request in `Origin` and `Sec-Fetch-Site`, and a request from another
//!    origin is rejected. Clients outside a browser, such as curl, send
//!    neither header and pass.
//!
//! Forms on the pages also carry a per-process secret ([`CsrfToken`]) that
//! the form handlers check, so a cross-site form post fails even in a
//! browser that sends neither header.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;

/// Name of the cookie that `/login` sets and the token check accepts.
pub const TOKEN_COOKIE: &str = "jobhost_token";

/// The secret that page forms carry in their `csrf` field: 32 random bytes
/// in hex, new for each process.
#[derive(Clone)]
pub struct CsrfToken(String);

impl CsrfToken {
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks a submitted form field, in constant time.
    pub fn matches(&self, submitted: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), submitted.as_bytes())
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    expected.ct_eq(given).into()
}

/// Returns true for paths whose errors are JSON or plain text rather than pages.
pub fn is_machine_path(path: &str) -> bool {
    path.starts_with("/api/") || path == "/api" || path == "/metrics" || path == "/healthz"
}

/// Builds an error response in the form the path calls for: JSON under `/api/`,
/// plain text for `/metrics` and `/healthz`, and an HTML page elsewhere.
pub fn rejection(path: &str, status: StatusCode, message: &str) -> Response {
    if path.starts_with("/api") {
        super::api::ApiError::new(status, message).into_response()
    } else if is_machine_path(path) {
        (status, format!("{message}\n")).into_response()
    } else {
        super::pages::error_page(status, message)
    }
}

/// Layer 1: headers on every response.
pub async fn response_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: under it, browsers send `Origin: null` with the
    // pages' own form posts, which the cross-site check would reject.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// Layer 2: without a token, only requests addressed to a loopback name pass.
pub async fn check_host(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.config.http.token.is_some() {
        return next.run(request).await;
    }
    let host = request.headers().get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("");
    if is_loopback_host(host) {
        return next.run(request).await;
    }
    let message = format!(
        "Host {host:?} is not a loopback address; without a token this server answers only requests to localhost, 127.0.0.1 or [::1], so that other web sites cannot reach it through DNS rebinding"
    );
    rejection(request.uri().path(), StatusCode::FORBIDDEN, &message)
}

/// Returns true if a `Host` header value names this machine's loopback
/// interface: `localhost`, an address in 127.0.0.0/8 or `[::1]`, with or
/// without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|address| address.is_loopback())
}

/// Layer 3: with a token set, every request but `/login` and the assets must present it.
pub async fn check_token(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(token) = &state.config.http.token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if path == "/login" || path.starts_with("/assets/") {
        return next.run(request).await;
    }
    if presented_token(request.headers()).is_some_and(|given| constant_time_eq(token.expose().as_bytes(), given.as_bytes())) {
        return next.run(request).await;
    }

    let has_credentials = presented_token(request.headers()).is_some();
    let message = if has_credentials {
        "the token is wrong; send the token from [http] in jobs.toml"
    } else {
        "a token is required; send it as Authorization: Bearer TOKEN, or sign in at /login"
    };
    let mut response = if is_machine_path(path) {
        rejection(path, StatusCode::UNAUTHORIZED, message)
    } else {
        super::pages::login_page(StatusCode::UNAUTHORIZED, Some(message))
    };
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"jobhost\""));
    response
}

/// Returns the token a request presents: the bearer token, else the cookie.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim);
    bearer.or_else(|| cookie(headers, TOKEN_COOKIE))
}

/// Returns the value of the cookie called `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Layer 4: a request that changes something must come from this origin.
pub async fn check_origin(request: Request<Body>, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let headers = request.headers();
    // `Sec-Fetch-Site` is set by the browser and cannot be forged by a page,
    // so when present it decides. `Origin` is the check for older browsers.
    match headers.get("sec-fetch-site").and_then(|value| value.to_str().ok()) {
        Some("same-origin" | "none") => return next.run(request).await,
        Some(site) => {
            let message = format!("cross-site request rejected: the browser reports it came from a {site} page; use the forms on this server's own pages");
            return rejection(request.uri().path(), StatusCode::FORBIDDEN, &message);
        }
        None => {}
    }
    let origin = headers.get(header::ORIGIN).and_then(|value| value.to_str().ok());
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or("");
    if let Some(origin) = origin
        && !same_origin(origin, host)
    {
        let message = format!("cross-site request rejected: it came from {origin:?}, not from this server ({host}); use the forms on this server's own pages");
        return rejection(request.uri().path(), StatusCode::FORBIDDEN, &message);
    }
    next.run(request).await
}

/// Returns true if `origin` is this server as addressed by `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    // The server speaks plain HTTP, so its own pages have an http:// origin.
    origin.strip_prefix("http://").is_some_and(|rest| rest.eq_ignore_ascii_case(host))
}

/// Returns a `Set-Cookie` value that stores `token` for this server's pages.
pub fn token_cookie(token: &str) -> String {
    format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognized() {
        for host in ["localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8080", "127.1.2.3:9", "[::1]", "[::1]:8080"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["", "example.com", "example.com:8080", "10.0.0.1:80", "[::2]:80", "localhost.example.com", "127.0.0.1.nip.io"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn origin_must_match_host() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!same_origin("https://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
    }

    #[test]
    fn token_comes_from_bearer_or_cookie() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_token(&headers), None);
        headers.insert(header::COOKIE, HeaderValue::from_static("theme=dark; jobhost_token=abc"));
        assert_eq!(presented_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(presented_token(&headers), Some("xyz"));
    }

    #[test]
    fn csrf_token_matches_only_itself() {
        let token = CsrfToken::generate();
        assert_eq!(token.as_str().len(), 64);
        assert!(token.matches(token.as_str()));
        assert!(!token.matches(""));
        assert!(!token.matches(CsrfToken::generate().as_str()));
    }
}
