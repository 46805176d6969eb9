//! The HTTP API: routes, extractors, the error envelope, the OpenAPI
//! document. Each resource has its own module that parses requests into
//! typed core calls and renders core rows as camelCase JSON.
//!
//! **Architecture Invariant:** this is the only module that knows HTTP and
//! JSON bodies. It never sees SQL, a runc path or a yamux stream.

mod artifacts;
mod audit;
mod code;
mod commands;
pub mod error;
mod files;
mod ledger;
mod pagination;
mod previews;
mod sandboxes;
#[cfg(test)]
mod schema_check;
mod system;
mod workspace_runs;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Principal;
use crate::core::Host;
pub use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub host: Arc<Host>,
}

/// A JSON body; rejections become the error envelope.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// A JSON response that also names, for the audit record, the resource it
/// created or addressed (see `ledger::AuditResource`).
pub struct Audited<T> {
    status: StatusCode,
    resource_id: String,
    body: T,
}

impl<T> Audited<T> {
    /// `201 Created` of a new resource.
    pub fn created(resource_id: impl Into<String>, body: T) -> Self {
        Self {
            status: StatusCode::CREATED,
            resource_id: resource_id.into(),
            body,
        }
    }

    /// `200 OK` about a resource the path does not name.
    pub fn ok(resource_id: impl Into<String>, body: T) -> Self {
        Self {
            status: StatusCode::OK,
            resource_id: resource_id.into(),
            body,
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Audited<T> {
    fn into_response(self) -> axum::response::Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        response
            .extensions_mut()
            .insert(ledger::AuditResource(self.resource_id));
        response
    }
}

/// Query parameters; rejections become the error envelope.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters; rejections become the error envelope.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller, from `x-api-key` or `Authorization: Bearer`
/// (resolved once per request by [`authenticate`]).
pub struct Caller(pub Principal);

impl Caller {
    /// Fails with `forbidden` unless the key carries `scope`.
    pub fn require(&self, scope: &str) -> Result<&Principal, ApiError> {
        if self.0.has_scope(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::forbidden(scope))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(Some(principal))) => Ok(Caller(principal.clone())),
            _ => {
                UNAUTHENTICATED.hit();
                Err(ApiError::unauthorized())
            }
        }
    }
}

/// Requests refused for want of a valid key: logged, at most once a second
/// (they write nothing durable).
static UNAUTHENTICATED: std::sync::LazyLock<RateLimitedLog> =
    std::sync::LazyLock::new(|| RateLimitedLog::new("refused requests without a valid API key"));

/// The result of authenticating a request, in its extensions (`None`: no
/// valid key).
#[derive(Clone)]
pub(crate) struct Authenticated(pub Option<Principal>);

/// The caller's org quota as it was read with the key, so a handler need
/// not read it again.
#[derive(Clone)]
pub(crate) struct KnownQuota(pub crate::store::Quota);

/// The one authentication path of the API: every matched route's request
/// gets [`Authenticated`] (and the state, for the ledger layers) before its
/// handler or ledger runs.
async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let principal = match presented_key_of(request.headers()) {
        Some(secret) => match state.host.authenticate(secret).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "key lookup failed");
                return ApiError::internal().into_response();
            }
        },
        None => None,
    };
    let (principal, quota) = match principal {
        Some((principal, quota)) => (Some(principal), Some(quota)),
        None => (None, None),
    };
    if let Some(principal) = &principal
        && let Err(e) = state.host.admit_request(&principal.key_id)
    {
        return ApiError::from(e).into_response();
    }
    let extensions = request.extensions_mut();
    extensions.insert(Authenticated(principal));
    if let Some(quota) = quota {
        extensions.insert(KnownQuota(quota));
    }
    extensions.insert(state);
    next.run(request).await
}

fn presented_key_of(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(value) = headers.get("x-api-key") {
        return value.to_str().ok().map(|v| v.trim().to_string());
    }
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// `scheme://host` of this server as the client reached it.
pub(crate) fn base_url(headers: &axum::http::HeaderMap, state: &AppState) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| state.host.config().listen.to_string(), str::to_string);
    format!("{}://{host}", request_scheme(headers))
}

/// `https` when a proxy in front says so (`X-Forwarded-Proto`), else `http`.
pub(crate) fn request_scheme(headers: &axum::http::HeaderMap) -> &'static str {
    match headers.get("x-forwarded-proto").map(|v| v.as_bytes()) {
        Some(b"https") => "https",
        _ => "http",
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CrowNest API",
        description = "Create isolated Linux sandboxes, run commands in them and stream their output. Errors share one envelope: {\"error\":{\"code\",\"message\",\"details\"}}.",
        version = "0.1.0"
    ),
    modifiers(&SecurityAddon),
    security(("apiKey" = []), ("bearer" = [])),
    components(schemas(error::ErrorEnvelope, error::ErrorBody))
)]
struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route with its OpenAPI description; the document is derived from
/// the same list that builds the router, so the two cannot drift.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(system::routes())
        .merge(sandboxes::routes())
        .merge(commands::routes())
        .merge(audit::routes())
        .merge(artifacts::routes())
        .merge(code::routes())
        .merge(files::routes())
        .merge(previews::routes())
        .merge(workspace_runs::routes())
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes().split_for_parts().1;
    document_common_errors(&mut doc);
    doc
}

/// Adds the error answers every operation of a kind can give, where its
/// own declaration does not list them: authentication and rate limits on
/// every keyed operation, body errors on every operation with a body,
/// parameter errors where there are parameters, and sandbox states on the
/// sandbox routes. So the document lists every status the server sends.
fn document_common_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                    .build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            let public = operation.security.as_ref().is_some_and(|s| {
                s.iter()
                    .all(|r| r == &utoipa::openapi::security::SecurityRequirement::default())
            });
            let mut add = |status: &str, description: &str| {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            };
            if !public {
                add("401", "unauthorized: no valid API key");
                add("403", "forbidden: the key lacks the operation's scope");
                add("429", "rate_limited (with Retry-After) or quota_exceeded");
            }
            if operation.request_body.is_some() {
                add("400", "invalid_json, invalid_request");
                add("413", "payload_too_large");
                add("415", "unsupported_media_type");
            }
            let has_parameters =
                operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) || path.contains('{');
            if has_parameters {
                add("400", "invalid_query, invalid_path, invalid_request");
            }
            if path.contains('{') {
                add("404", "not_found");
            }
            if path.starts_with("/v1/sandboxes/{id}") {
                add("410", "sandbox_destroyed");
                add("503", "sandbox_busy, sandbox_start_failed");
            }
        }
    }
}

/// The whole application: routes, body limit, request ids, tracing, panic
/// containment, and envelope fallbacks.
pub fn app(state: AppState) -> Router {
    let max_body = state.host.config().limits.max_body_bytes;
    let (router, mut doc) = routes().split_for_parts();
    document_common_errors(&mut doc);
    let doc = Arc::new(doc);
    let request_id = HeaderName::from_static("x-request-id");
    router
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        // The old path-based preview URLs: redirects to each preview's own
        // origin (outside the API's authentication).
        .merge(previews::legacy_routes())
        .fallback(|| async { ApiError::route_not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body))
        // A request for a preview's origin never reaches the API router.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            previews::dispatch,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a request handler panicked");
            ApiError::internal().into_response()
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_unsafe_request_id))
        .with_state(state)
}

/// Longest client-chosen `x-request-id` kept; longer or odd ones are
/// replaced by a server-generated id (it is logged and audited).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's request id is short and made of safe characters.
fn is_safe_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

async fn drop_unsafe_request_id(mut request: axum::extract::Request) -> axum::extract::Request {
    let headers = request.headers_mut();
    let values: Vec<HeaderValue> = headers.get_all("x-request-id").iter().cloned().collect();
    if values.len() > 1 || values.first().is_some_and(|v| !is_safe_request_id(v)) {
        headers.remove("x-request-id");
    }
    request
}

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then drains
/// in-flight requests (bounded). Admission at the connection level: at
/// most `max_connections` open connections (more are closed at once, the
/// host stays responsive), and a client has `header_read_timeout_ms` to
/// send each request's headers (a half-sent request line is dropped).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let limits = state.host.config().limits.clone();
    let app = app(state);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .keep_alive(true);
    let http = Arc::new(http);
    let refused = Arc::new(RateLimitedLog::new("refused a connection: too many open"));
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of fds, or an aborted handshake: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused.hit();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |request: axum::http::Request<hyper::body::Incoming>| {
                tower::ServiceExt::oneshot(app.clone(), request.map(axum::body::Body::new))
            },
        );
        let (http, watcher) = (http.clone(), graceful.watcher());
        tokio::spawn(async move {
            let connection = http.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the shutdown drain");
    }
    Ok(())
}

/// A warning logged at most once a second, with how often it happened.
pub(crate) struct RateLimitedLog {
    what: &'static str,
    state: std::sync::Mutex<(std::time::Instant, u64)>,
}

impl RateLimitedLog {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            state: std::sync::Mutex::new((std::time::Instant::now() - Duration::from_secs(2), 0)),
        }
    }

    pub(crate) fn hit(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        if state.0.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(count = state.1, "{}", self.what);
            *state = (std::time::Instant::now(), 0);
        }
    }
}

/// Marks a download as one: saved, never rendered on this origin. A file
/// from a sandbox could be HTML that would otherwise run with the API's
/// origin; `Content-Security-Policy: sandbox` keeps even an opened one
/// from running scripts or reaching cookies.
pub(crate) fn download_headers(headers: &mut axum::http::HeaderMap, file_name: &str) {
    use axum::http::header;
    let safe: String = file_name
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | ';' | '/'))
        .take(200)
        .collect();
    let safe = if safe.is_empty() {
        String::from("download")
    } else {
        safe
    };
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Status for handlers that create something.
pub const CREATED: StatusCode = StatusCode::CREATED;

/// Bound on how long a streaming response idles before a keep-alive.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// The `Last-Event-ID` header of an SSE reconnect: a non-negative event
/// id (a log's seq), or none.
pub(crate) fn last_event_id(headers: &axum::http::HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                "Last-Event-ID",
                "Last-Event-ID must be an event id this stream sent",
            )
        })
}

/// The events a task sends, as a stream that ends when the task does (and
/// that stops the task, by closing its channel, when the client goes).
pub(crate) fn task_stream<F, Fut>(
    task: F,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<axum::response::sse::Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(task(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth;
    use crate::config::Limits;
    use crate::store::StoreHandle;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// An app over an in-memory store and the fake runtime; the host (and
    /// its temporary dirs) lives as long as the returned `TestHost`.
    fn test_app(max_body_bytes: usize) -> (Router, crate::core::tests::TestHost) {
        test_app_host(Limits {
            max_body_bytes,
            ..Limits::default()
        })
    }

    fn test_app_host(limits: Limits) -> (Router, crate::core::tests::TestHost) {
        let t = crate::core::tests::test_host_with(limits);
        (
            app(AppState {
                host: t.host.clone(),
            }),
            t,
        )
    }

    async fn call(app: Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = app.oneshot(request).await.expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("json body"))
    }

    fn key(store: &StoreHandle, scopes: &[&str]) -> String {
        auth::mint_key(
            store.blocking(),
            "acme",
            None,
            None,
            scopes.iter().map(|s| s.to_string()).collect(),
            0,
        )
        .expect("mint")
        .secret
    }

    #[tokio::test]
    async fn unknown_routes_get_the_not_found_envelope() {
        let (app, _t) = test_app(1024);
        let (status, body) = call(
            app,
            Request::get("/v2/nope").body(Body::empty()).expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        assert!(body["error"]["details"].is_object());
    }

    #[tokio::test]
    async fn a_wrong_method_gets_the_method_not_allowed_envelope() {
        let (app, _t) = test_app(1024);
        let (status, body) = call(
            app,
            Request::patch("/v1/sandboxes")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }

    #[tokio::test]
    async fn a_missing_key_is_unauthorized_and_a_missing_scope_forbidden() {
        let (app, t) = test_app(1024);
        let (status, body) = call(
            app.clone(),
            Request::get("/v1/templates")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );
        let secret = key(&t.store, &["sandboxes:read"]);
        let (status, body) = call(
            app,
            Request::get("/v1/templates")
                .header("authorization", format!("Bearer {secret}"))
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["details"]["requiredScope"], "templates:read");
    }

    #[tokio::test]
    async fn an_oversized_body_is_payload_too_large() {
        let (app, t) = test_app(64);
        let secret = key(&t.store, &["sandboxes:create"]);
        let body = format!("{{\"template\":\"{}\"}}", "x".repeat(200));
        let (status, body) = call(
            app,
            Request::post("/v1/sandboxes")
                .header("x-api-key", secret)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "payload_too_large");
    }

    #[tokio::test]
    async fn responses_carry_a_request_id() {
        let (app, _t) = test_app(1024);
        let response = app
            .oneshot(Request::get("/v1/health").body(Body::empty()).expect("req"))
            .await
            .expect("response");
        assert!(response.headers().contains_key("x-request-id"));
    }

    fn create(secret: &str, key: &str, template: &str) -> Request<Body> {
        Request::post("/v1/sandboxes")
            .header("x-api-key", secret)
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from(format!("{{\"template\":\"{template}\"}}")))
            .expect("req")
    }

    #[tokio::test]
    async fn an_idempotency_key_replays_for_24_hours_then_does_the_work_again() {
        let (app, t) = test_app(1024);
        let (store, clock) = (t.store.clone(), t.clock.clone());
        let secret = key(&store, &["sandboxes:create"]);
        // An unknown template fails before anything starts: a stored 404.
        let first = app
            .clone()
            .oneshot(create(&secret, "k1", "cobol"))
            .await
            .expect("first");
        assert_eq!(first.status(), StatusCode::NOT_FOUND);
        assert!(!first.headers().contains_key("idempotent-replayed"));
        let replay = app
            .clone()
            .oneshot(create(&secret, "k1", "cobol"))
            .await
            .expect("replay");
        assert_eq!(replay.status(), StatusCode::NOT_FOUND);
        assert!(replay.headers().contains_key("idempotent-replayed"));
        let (status, body) = call(app.clone(), create(&secret, "k1", "fortran")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("idempotency_key_reused"))
        );

        clock.advance(24 * 60 * 60 * 1000 + 1);
        let later = app
            .clone()
            .oneshot(create(&secret, "k1", "fortran"))
            .await
            .expect("later");
        assert_eq!(
            later.status(),
            StatusCode::NOT_FOUND,
            "the expired key runs the new request"
        );
        assert!(!later.headers().contains_key("idempotent-replayed"));
    }

    #[tokio::test]
    async fn a_malformed_idempotency_key_is_refused() {
        let (app, t) = test_app(1024);
        let secret = key(&t.store, &["sandboxes:create"]);
        let (status, body) = call(app, create(&secret, &"k".repeat(300), "python")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["details"]["field"], "Idempotency-Key");
    }

    /// Every mutating operation of the document, with its path filled in
    /// from `ids` (parameter name -> value).
    fn mutating_operations(ids: &[(&str, String)]) -> Vec<(axum::http::Method, String)> {
        let doc = serde_json::to_value(openapi()).expect("json");
        let mut out = Vec::new();
        for (template, item) in doc["paths"].as_object().expect("paths") {
            for method in ["post", "put", "patch", "delete"] {
                if item.get(method).is_none() {
                    continue;
                }
                let mut path = template.clone();
                for (name, value) in ids {
                    path = path.replace(&format!("{{{name}}}"), value);
                }
                let method = axum::http::Method::from_bytes(method.to_uppercase().as_bytes())
                    .expect("method");
                out.push((method, path));
            }
        }
        out
    }

    #[tokio::test]
    async fn every_mutating_route_declares_its_audit_record() {
        let (app, t) = test_app_host(Limits::default());
        let principal = t.principal("acme", "all");
        let sandbox = t.sandbox(&principal, "python").await;
        let secret = key(&t.store, &["files:write"]);
        let (status, upload) = call(
            app.clone(),
            Request::post(format!("/v1/sandboxes/{}/files/uploads", sandbox.id))
                .header("x-api-key", &secret)
                .header("content-type", "application/json")
                .body(Body::from(r#"{"path":"x.txt"}"#))
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{upload}");
        let token = upload["url"]
            .as_str()
            .and_then(|u| u.rsplit('/').next())
            .expect("token")
            .to_string();
        let admin = key(&t.store, auth::SCOPES);
        let ids = [
            ("id", sandbox.id.clone()),
            ("command_id", String::from("cmd_00000000000000000000")),
            ("context_id", String::from("cctx_00000000000000000000")),
            ("preview_id", String::from("prv_00000000000000000000")),
            ("token", token),
        ];
        let operations = mutating_operations(&ids);
        assert!(operations.len() >= 19, "{operations:?}");
        for (method, path) in operations {
            let before = audit_count(&t);
            let response = app
                .clone()
                .oneshot(
                    Request::builder()
                        .method(method.clone())
                        .uri(&path)
                        .header("x-api-key", &admin)
                        .header("content-type", "application/json")
                        .body(Body::from("{}"))
                        .expect("req"),
                )
                .await
                .expect("response");
            let status = response.status();
            let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
            assert_eq!(
                audit_count(&t),
                before + 1,
                "{method} {path} ({status}) wrote no audit record: register it with ledger::mutation"
            );
        }
    }

    fn audit_count(t: &crate::core::tests::TestHost) -> usize {
        let org = t
            .store
            .blocking()
            .find_org("acme")
            .expect("org")
            .expect("acme");
        t.store
            .blocking()
            .list_audit(&crate::store::AuditFilter {
                org_id: org.id,
                limit: 10_000,
                ..crate::store::AuditFilter::default()
            })
            .expect("audit")
            .len()
    }

    #[tokio::test]
    async fn an_unauthenticated_mutation_writes_nothing_durable() {
        let (app, t) = test_app_host(Limits::default());
        let principal = t.principal("acme", "all");
        let sandbox = t.sandbox(&principal, "python").await;
        let before = audit_count(&t);
        let (status, _) = call(
            app,
            Request::put(format!(
                "/v1/sandboxes/{}/files?path={}",
                sandbox.id,
                "p".repeat(8_000)
            ))
            .header("x-request-id", "r".repeat(60_000))
            .body(Body::from("data"))
            .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(audit_count(&t), before);
    }

    /// One request of the schema scenario: method, route template, the
    /// concrete path, a JSON body.
    struct Step {
        method: &'static str,
        template: &'static str,
        path: String,
        body: Option<serde_json::Value>,
    }

    #[tokio::test]
    async fn served_bodies_match_the_openapi_schemas_of_their_operations() {
        let (app, t) = test_app_host(Limits::default());
        let admin = key(&t.store, auth::SCOPES);
        let doc = serde_json::to_value(openapi()).expect("json");
        let send = |step: &Step| {
            let mut request = Request::builder()
                .method(step.method)
                .uri(&step.path)
                .header("x-api-key", &admin);
            let body = match &step.body {
                Some(body) => {
                    request = request.header("content-type", "application/json");
                    Body::from(body.to_string())
                }
                None => Body::empty(),
            };
            request.body(body).expect("request")
        };
        let step = |method, template, path: String, body| Step {
            method,
            template,
            path,
            body,
        };
        use serde_json::json;
        let create = step(
            "POST",
            "/v1/sandboxes",
            "/v1/sandboxes".into(),
            Some(json!({"template": "python", "metadata": {"job": "schema"}})),
        );
        let (status, sandbox) = call(app.clone(), send(&create)).await;
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        let id = sandbox["id"].as_str().expect("id").to_string();
        let (_, command) = call(
            app.clone(),
            send(&step(
                "POST",
                "/v1/sandboxes/{id}/commands",
                format!("/v1/sandboxes/{id}/commands"),
                Some(json!({"command": "echo hi > out.txt; cat out.txt", "collect": [{"path": "out.txt"}]})),
            )),
        )
        .await;
        let command_id = command["id"].as_str().expect("command id").to_string();
        let sandbox_path = format!("/v1/sandboxes/{id}");
        let steps = vec![
            step("GET", "/v1/health", "/v1/health".into(), None),
            step("GET", "/v1/templates", "/v1/templates".into(), None),
            step("GET", "/v1/sandboxes", "/v1/sandboxes".into(), None),
            step("GET", "/v1/sandboxes/{id}", sandbox_path.clone(), None),
            step(
                "GET",
                "/v1/sandboxes/{id}/commands",
                format!("{sandbox_path}/commands"),
                None,
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/commands/{command_id}",
                format!("{sandbox_path}/commands/{command_id}"),
                None,
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/commands",
                format!("{sandbox_path}/commands"),
                Some(json!({"command": "sleep 5", "background": true})),
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/code/contexts",
                format!("{sandbox_path}/code/contexts"),
                Some(json!({"language": "python"})),
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/code/contexts",
                format!("{sandbox_path}/code/contexts"),
                None,
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/code/runs",
                format!("{sandbox_path}/code/runs"),
                Some(json!({"language": "python", "code": "print hi\nraise KeyError k"})),
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/files/list",
                format!("{sandbox_path}/files/list"),
                None,
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/files/stat",
                format!("{sandbox_path}/files/stat?path=out.txt"),
                None,
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/files/mkdir",
                format!("{sandbox_path}/files/mkdir"),
                Some(json!({"path": "d", "parents": true})),
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/files/uploads",
                format!("{sandbox_path}/files/uploads"),
                Some(json!({"path": "u.bin"})),
            ),
            step(
                "POST",
                "/v1/sandboxes/{id}/artifacts",
                format!("{sandbox_path}/artifacts"),
                Some(json!({"path": "out.txt"})),
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/artifacts",
                format!("{sandbox_path}/artifacts"),
                None,
            ),
            step("GET", "/v1/artifacts", "/v1/artifacts".into(), None),
            step(
                "POST",
                "/v1/sandboxes/{id}/previews",
                format!("{sandbox_path}/previews"),
                Some(json!({"port": 8000})),
            ),
            step(
                "GET",
                "/v1/sandboxes/{id}/previews",
                format!("{sandbox_path}/previews"),
                None,
            ),
            step("GET", "/v1/audit-events", "/v1/audit-events".into(), None),
            step("GET", "/v1/usage", "/v1/usage".into(), None),
            step(
                "GET",
                "/v1/sandboxes/{id}/commands/{command_id}",
                format!("{sandbox_path}/commands/cmd_00000000000000000000"),
                None,
            ),
            step("DELETE", "/v1/sandboxes/{id}", sandbox_path.clone(), None),
            step("DELETE", "/v1/sandboxes/{id}", sandbox_path.clone(), None),
        ];
        let mut checked = 0;
        for step in std::iter::once(create).chain(steps) {
            let (status, body) = call(app.clone(), send(&step)).await;
            let schema = response_schema_or_error(&doc, &step, status.as_u16());
            schema_check::check(&doc, schema, &body, "$").unwrap_or_else(|e| {
                panic!(
                    "{} {} ({status}) does not match its schema: {e}\n{body}",
                    step.method, step.path
                )
            });
            checked += 1;
        }
        assert!(checked >= 24);
        // The schemas are specific: a body with a wrong status fails.
        let schema = schema_check::response_schema(&doc, "GET", "/v1/sandboxes/{id}", 200)
            .expect("sandbox schema");
        let mut wrong = sandbox.clone();
        wrong["status"] = json!("sleeping");
        assert!(schema_check::check(&doc, schema, &wrong, "$").is_err());
    }

    /// The documented schema of a response, or the error envelope's for a
    /// documented error status.
    fn response_schema_or_error<'a>(
        doc: &'a serde_json::Value,
        step: &Step,
        status: u16,
    ) -> &'a serde_json::Value {
        schema_check::response_schema(doc, step.method, step.template, status).unwrap_or_else(
            || {
                panic!(
                    "{} {} answered {status}, which its operation does not document",
                    step.method, step.template
                )
            },
        )
    }

    #[test]
    fn the_openapi_document_matches_the_checked_in_copy() {
        let generated = serde_json::to_string_pretty(&openapi()).expect("json") + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "docs/openapi.json is out of date: regenerate it with `cargo run -p crownest -- openapi > docs/openapi.json`"
        );
    }
}
