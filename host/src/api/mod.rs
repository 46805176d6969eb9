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
mod system;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::{self, Principal};
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

/// Query parameters; rejections become the error envelope.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters; rejections become the error envelope.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller, from `x-api-key` or `Authorization: Bearer`.
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

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> impl Future<Output = Result<Self, Self::Rejection>> + Send {
        // The ledger middleware has usually authenticated already.
        let known = parts.extensions.get::<Authenticated>().cloned();
        let presented = presented_key(parts);
        let store = state.host.store().clone();
        async move {
            if let Some(Authenticated(principal)) = known {
                return principal.map(Caller).ok_or_else(ApiError::unauthorized);
            }
            let secret = presented.ok_or_else(ApiError::unauthorized)?;
            let principal = store
                .call(move |s| auth::authenticate(s, &secret))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "key lookup failed");
                    ApiError::internal()
                })?
                .ok_or_else(ApiError::unauthorized)?;
            Ok(Caller(principal))
        }
    }
}

/// The result of authenticating a request, cached in its extensions by the
/// ledger middleware (`None`: no valid key).
#[derive(Clone)]
pub(crate) struct Authenticated(pub Option<Principal>);

fn presented_key(parts: &Parts) -> Option<String> {
    presented_key_of(&parts.headers)
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
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(system::routes())
        .merge(sandboxes::routes())
        .merge(commands::routes())
        .merge(audit::routes())
        .merge(artifacts::routes())
        .merge(code::routes())
        .merge(files::routes())
        .merge(previews::routes())
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The whole application: routes, body limit, request ids, tracing, panic
/// containment, and envelope fallbacks.
pub fn app(state: AppState) -> Router {
    let max_body = state.host.config().limits.max_body_bytes;
    let (router, doc) = routes().split_for_parts();
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
            ledger::ledger,
        ))
        // Preview URLs: after the ledger layer, which they are not under.
        .merge(previews::proxy_routes())
        .fallback(|| async { ApiError::route_not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body))
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
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains
/// in-flight requests (bounded).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Status for handlers that create something.
pub const CREATED: StatusCode = StatusCode::CREATED;

/// Bound on how long a streaming response idles before a keep-alive.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::{Config, Limits};
    use crate::runtime::OciRuntime;
    use crate::store::{SqliteStore, StoreHandle};
    use crate::templates::TemplateSet;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// An app over an in-memory store. No route used here reaches the
    /// runtime, so its binary is never run.
    fn test_app(max_body_bytes: usize) -> (Router, StoreHandle) {
        let (app, store, _) = test_app_with_clock(max_body_bytes);
        (app, store)
    }

    fn test_app_with_clock(max_body_bytes: usize) -> (Router, StoreHandle, Clock) {
        let store = StoreHandle::new(SqliteStore::open_in_memory().expect("store"));
        let config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: std::env::temp_dir(),
            cache_dir: std::env::temp_dir(),
            templates_dir: None,
            runtime_binary: "runc".into(),
            agent_binary: "crownest-agent".into(),
            limits: Limits {
                max_body_bytes,
                ..Limits::default()
            },
        };
        let runtime = Arc::new(OciRuntime::new(
            "runc".into(),
            std::env::temp_dir().join("cn-api-test-runc"),
        ));
        let templates = TemplateSet::load(None).expect("templates");
        let clock = Clock::system();
        let blobs = crate::blobs::BlobStore::open(
            std::env::temp_dir().join(format!("cn-api-test-blobs-{}", std::process::id())),
        )
        .expect("blobs");
        let host = Host::new(
            config,
            store.clone(),
            clock.clone(),
            templates,
            runtime,
            blobs,
        );
        (app(AppState { host }), store, clock)
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
        let (app, _) = test_app(1024);
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
        let (app, _) = test_app(1024);
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
        let (app, store) = test_app(1024);
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
        let secret = key(&store, &["sandboxes:read"]);
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
        let (app, store) = test_app(64);
        let secret = key(&store, &["sandboxes:create"]);
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
        let (app, _) = test_app(1024);
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
        let (app, store, clock) = test_app_with_clock(1024);
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
        let (app, store) = test_app(1024);
        let secret = key(&store, &["sandboxes:create"]);
        let (status, body) = call(app, create(&secret, &"k".repeat(300), "python")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["details"]["field"], "Idempotency-Key");
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
