//! The ledger around every mutating route, in layers that each do one thing:
//!
//! 1. [`mutation`] registers a route with what it declares about itself
//!    ([`Declared`]: its audit action and the scope it needs). A route
//!    registered without it has no ledger at all, and the test
//!    `every_mutating_route_declares_its_audit_record` fails.
//! 2. [`audit`] writes one typed audit record for the outcome (success,
//!    denied, failed) from the declaration, the path, and what the handler
//!    put in the response's extensions ([`AuditResource`], [`AuditOrg`],
//!    the error code). Nothing is read back from response bytes.
//! 3. [`idempotency`] enforces the org's body quota, then makes a request
//!    with an `Idempotency-Key` replay: authorised exactly like a fresh one
//!    (the declared scope is checked first), keyed by org and API key, the
//!    stored response sealed at rest.
//!
//! Authentication happened before, once, in `api::authenticate`.

use axum::RequestPartsExt;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, RawPathParams, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::UtoipaMethodRouter;

use super::error::{ApiError, ErrorCode, payload_too_large};
use super::{AppState, Authenticated, KnownQuota};
use crate::core::ledger::{AuditEvent, Idempotency, IdempotencyOwner, request_hash};
use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome, ResourceKind};
use crate::store::StoredResponse;

/// Largest body buffered to fingerprint an idempotent request or to record
/// a response.
const MAX_BUFFERED: usize = 64 * 1024 * 1024;

/// Longest file path kept in an audit record.
const MAX_AUDIT_PATH: usize = 4096;

/// What a mutating route declares about itself.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    pub action: AuditAction,
    /// The scope a key needs; `None` for routes authorised by a token in
    /// the URL (staged transfers).
    pub scope: Option<&'static str>,
}

/// Registers a mutating route with its declaration and ledger layers.
pub fn mutation(
    action: AuditAction,
    scope: Option<&'static str>,
    route: UtoipaMethodRouter<AppState>,
) -> UtoipaMethodRouter<AppState> {
    let (schemas, paths, router) = route;
    let router = router
        .layer::<_, std::convert::Infallible>(axum::middleware::from_fn(idempotency))
        .layer::<_, std::convert::Infallible>(axum::middleware::from_fn(audit))
        .layer::<_, std::convert::Infallible>(Extension(Declared { action, scope }));
    (schemas, paths, router)
}

/// Put in a response's extensions by a handler: the resource the request
/// created or addressed, when the path does not name it.
#[derive(Debug, Clone)]
pub struct AuditResource(pub String);

/// Put in a response's extensions by a handler authorised by a token: the
/// org the request acted for.
#[derive(Debug, Clone)]
pub struct AuditOrg(pub String);

/// Put in a request's extensions when it is the first attempt of an
/// idempotency key, so that a streaming handler can store its final result.
#[derive(Debug, Clone)]
pub struct IdempotencyTicket {
    pub owner: IdempotencyOwner,
    pub key: String,
}

/// Put in a streaming response's extensions by a handler that stores the
/// idempotent result itself when the stream ends.
#[derive(Debug, Clone, Copy)]
pub struct StreamCompletesIdempotency;

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The path parameter that names a resource of this kind.
fn id_param(kind: ResourceKind) -> Option<&'static str> {
    match kind {
        ResourceKind::Sandbox | ResourceKind::WorkspaceRun => Some("id"),
        ResourceKind::Command => Some("command_id"),
        ResourceKind::Preview => Some("preview_id"),
        ResourceKind::CodeContext => Some("context_id"),
        ResourceKind::Artifact | ResourceKind::Transfer | ResourceKind::Key | ResourceKind::Org => {
            None
        }
    }
}

fn outcome_of(status: StatusCode) -> AuditOutcome {
    if status.is_success() {
        AuditOutcome::Success
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        AuditOutcome::Denied
    } else {
        AuditOutcome::Failed
    }
}

/// Writes the audit record of a mutating request once it has an answer.
async fn audit(
    Extension(state): Extension<AppState>,
    Extension(declared): Extension<Declared>,
    request: Request,
    next: Next,
) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let principal = parts
        .extensions
        .get::<Authenticated>()
        .and_then(|a| a.0.clone());
    let params: Vec<(String, String)> = parts
        .extract::<RawPathParams>()
        .await
        .map(|p| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Decoded like the handlers decode it, so the audit shows the real path.
    let query_path =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|q| q.0.get("path").cloned())
            .map(|p| p.chars().take(MAX_AUDIT_PATH).collect::<String>());
    let response = next.run(Request::from_parts(parts, body)).await;
    if response.headers().contains_key("idempotent-replayed") {
        return response;
    }
    let status = response.status();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.chars().take(128).collect::<String>())
    };
    let resource_id = response
        .extensions()
        .get::<AuditResource>()
        .map(|r| r.0.clone())
        .or_else(|| id_param(declared.action.resource()).and_then(param));
    let org_id = response.extensions().get::<AuditOrg>().map(|o| o.0.clone());
    let details = AuditDetails {
        sandbox_id: param("id"),
        path: query_path,
        error_code: response
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0.to_string()),
        reason: None,
        target: None,
        message: None,
    };
    let actor = if principal.is_some() {
        AuditActor::Key
    } else {
        AuditActor::Token
    };
    state
        .host
        .audit(AuditEvent {
            actor,
            principal,
            action: declared.action,
            resource_id,
            outcome: outcome_of(status),
            status: Some(status.as_u16()),
            request_id,
            details,
            org_id,
        })
        .await;
    response
}

/// The org's body quota, then idempotent replay.
async fn idempotency(
    Extension(state): Extension<AppState>,
    Extension(declared): Extension<Declared>,
    request: Request,
    next: Next,
) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    match idempotent(state, declared, request, next).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn idempotent(
    state: AppState,
    declared: Declared,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let host = state.host.clone();
    let (mut parts, body) = request.into_parts();
    let principal = parts
        .extensions
        .get::<Authenticated>()
        .and_then(|a| a.0.clone());
    let quota = parts.extensions.get::<KnownQuota>().map(|q| q.0.clone());
    let mut body = body;
    if let Some(max) = quota.as_ref().and_then(|q| q.max_request_body_bytes) {
        let declared_len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(len) = declared_len
            && len > max
        {
            return Err(ApiError::from(crate::core::CoreError::QuotaExceeded {
                limit: "maxRequestBodyBytes",
                max,
                current: len,
            }));
        }
        body = Body::new(http_body_util::Limited::new(body, max.max(0) as usize));
    }
    let idempotency_key = parts
        .headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_string).unwrap_or_default());
    let (Some(principal), Some(key)) = (principal, idempotency_key) else {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    // A replay is authorised like the request it repeats.
    if let Some(scope) = declared.scope
        && !principal.has_scope(scope)
    {
        return Err(ApiError::forbidden(scope));
    }
    let method = parts.method.clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let accepts_event_stream = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let bytes = axum::body::to_bytes(body, MAX_BUFFERED)
        .await
        .map_err(|_| payload_too_large())?;
    let hash = request_hash(method.as_str(), &path_and_query, &bytes);
    let owner = IdempotencyOwner::of(&principal);
    match host
        .idempotency_begin(&owner, &key, method.as_str(), &path_and_query, hash)
        .await?
    {
        Idempotency::Replay(stored) => Ok(replayed(stored, accepts_event_stream)),
        Idempotency::Proceed => {
            parts.extensions.insert(IdempotencyTicket {
                owner: owner.clone(),
                key: key.clone(),
            });
            let response = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            if is_event_stream(&response) {
                // A stream cannot be stored: either its handler stores
                // the final result, or a retry runs again.
                if response
                    .extensions()
                    .get::<StreamCompletesIdempotency>()
                    .is_none()
                {
                    host.idempotency_abandon(&owner, &key).await;
                }
                return Ok(response);
            }
            let (head, body) = response.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, MAX_BUFFERED).await else {
                host.idempotency_abandon(&owner, &key).await;
                return Err(ApiError::internal());
            };
            let stored = StoredResponse {
                status: head.status.as_u16(),
                content_type: head
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body: bytes.to_vec(),
            };
            host.idempotency_complete(&owner, &key, stored).await;
            Ok(Response::from_parts(head, Body::from(bytes)))
        }
    }
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

fn replayed(stored: StoredResponse, as_event_stream: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let json = stored
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"));
    if as_event_stream && status == StatusCode::OK && json {
        // A completed streamed run replays as its one `complete` event.
        let data = String::from_utf8_lossy(&stored.body).replace('\n', " ");
        let mut response = (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/event-stream")],
            format!("event: complete\ndata: {data}\n\n"),
        )
            .into_response();
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return response;
    }
    let mut response = (status, Bytes::from(stored.body)).into_response();
    if let Some(content_type) = stored
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
