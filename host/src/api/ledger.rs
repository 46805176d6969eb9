//! The ledger middleware, around every matched mutating route: it
//! authenticates once, enforces the org's request body quota, makes the
//! request idempotent when it carries an `Idempotency-Key`, and writes an
//! audit event for the outcome (success, denied or failed).

use axum::RequestPartsExt;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::{ApiError, payload_too_large};
use super::{AppState, Authenticated, presented_key_of};
use crate::core::ledger::{AuditEvent, Idempotency, request_hash};
use crate::store::StoredResponse;

/// Largest body buffered to fingerprint an idempotent request or to record
/// a response.
const MAX_BUFFERED: usize = 64 * 1024 * 1024;

/// Put in a request's extensions when it is the first attempt of an
/// idempotency key, so that a streaming handler can store its final result.
#[derive(Debug, Clone)]
pub struct IdempotencyTicket {
    pub org_id: String,
    pub key: String,
}

/// Put in a streaming response's extensions by a handler that stores the
/// idempotent result itself when the stream ends.
#[derive(Debug, Clone, Copy)]
pub struct StreamCompletesIdempotency;

/// What an audit event says about a route.
struct RouteAction {
    action: &'static str,
    resource_type: &'static str,
    /// Where the resource id comes from: a path parameter, or the `id` of
    /// the JSON response (creates).
    id_from: IdFrom,
}

enum IdFrom {
    Param(&'static str),
    Response,
    /// A named field of the JSON response.
    ResponseField(&'static str),
    /// The route names no resource the caller may see (transfer tokens).
    Nothing,
}

fn route_action(method: &Method, template: &str) -> Option<RouteAction> {
    use IdFrom::{Param, Response};
    let (action, resource_type, id_from) = match (method.as_str(), template) {
        ("POST", "/v1/sandboxes") => ("sandbox.create", "sandbox", Response),
        ("DELETE", "/v1/sandboxes/{id}") => ("sandbox.kill", "sandbox", Param("id")),
        ("POST", "/v1/sandboxes/{id}/commands") => ("command.run", "command", Response),
        ("POST", "/v1/sandboxes/{id}/commands/{command_id}/stdin") => {
            ("command.stdin", "command", Param("command_id"))
        }
        ("POST", "/v1/sandboxes/{id}/commands/{command_id}/signal") => {
            ("command.signal", "command", Param("command_id"))
        }
        ("POST", "/v1/sandboxes/{id}/commands/{command_id}/cancel") => {
            ("command.cancel", "command", Param("command_id"))
        }
        ("PUT", "/v1/sandboxes/{id}/files") => ("file.write", "sandbox", Param("id")),
        ("DELETE", "/v1/sandboxes/{id}/files") => ("file.delete", "sandbox", Param("id")),
        ("POST", "/v1/sandboxes/{id}/files/move") => ("file.move", "sandbox", Param("id")),
        ("POST", "/v1/sandboxes/{id}/files/mkdir") => ("file.mkdir", "sandbox", Param("id")),
        ("POST", "/v1/sandboxes/{id}/files/uploads") => ("file.upload_url", "sandbox", Param("id")),
        ("POST", "/v1/sandboxes/{id}/files/downloads") => {
            ("file.download_url", "sandbox", Param("id"))
        }
        ("POST", "/v1/sandboxes/{id}/artifacts") => ("artifact.create", "artifact", Response),
        ("POST", "/v1/sandboxes/{id}/previews") => ("preview.create", "preview", Response),
        ("DELETE", "/v1/sandboxes/{id}/previews/{preview_id}") => {
            ("preview.delete", "preview", Param("preview_id"))
        }
        ("POST", "/v1/sandboxes/{id}/code/contexts") => {
            ("code_context.create", "code_context", Response)
        }
        ("DELETE", "/v1/sandboxes/{id}/code/contexts/{context_id}") => {
            ("code_context.delete", "code_context", Param("context_id"))
        }
        ("POST", "/v1/sandboxes/{id}/code/runs") => (
            "code.run",
            "code_context",
            IdFrom::ResponseField("contextId"),
        ),
        (_, "/v1/transfers/{token}") => ("file.transfer", "transfer", IdFrom::Nothing),
        _ => return None,
    };
    Some(RouteAction {
        action,
        resource_type,
        id_from,
    })
}

/// The caller's org quota as the middleware read it with the key, so a
/// handler need not read it again.
#[derive(Clone)]
pub(crate) struct KnownQuota(pub crate::store::Quota);

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

pub async fn ledger(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    let host = state.host.clone();
    let (mut parts, body) = request.into_parts();
    let (principal, quota) = match presented_key_of(&parts.headers) {
        Some(secret) => match host.authenticate_with_quota(secret).await {
            Ok(Some((principal, quota))) => (Some(principal), Some(quota)),
            Ok(None) => (None, None),
            Err(e) => {
                tracing::error!(error = %e, "key lookup failed");
                return ApiError::internal().into_response();
            }
        },
        None => (None, None),
    };
    parts.extensions.insert(Authenticated(principal.clone()));
    if let Some(quota) = &quota {
        parts.extensions.insert(KnownQuota(quota.clone()));
    }
    let template = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
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
            .and_then(|q| q.0.get("path").cloned());
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
    let idempotency_key = parts
        .headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_string).unwrap_or_default());

    let response = async {
        let mut body = body;
        if let Some(max) = quota.as_ref().and_then(|q| q.max_request_body_bytes) {
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(len) = declared
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
        let (Some(p), Some(key)) = (&principal, &idempotency_key) else {
            return Ok(next.run(Request::from_parts(parts, body)).await);
        };
        let bytes = axum::body::to_bytes(body, MAX_BUFFERED)
            .await
            .map_err(|_| payload_too_large())?;
        let hash = request_hash(method.as_str(), &path_and_query, &bytes);
        match host
            .idempotency_begin(&p.org_id, key, method.as_str(), &path_and_query, hash)
            .await?
        {
            Idempotency::Replay(stored) => Ok(replayed(stored, accepts_event_stream)),
            Idempotency::Proceed => {
                parts.extensions.insert(IdempotencyTicket {
                    org_id: p.org_id.clone(),
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
                        host.idempotency_abandon(&p.org_id, key).await;
                    }
                    return Ok(response);
                }
                let (head, body) = response.into_parts();
                let Ok(bytes) = axum::body::to_bytes(body, MAX_BUFFERED).await else {
                    host.idempotency_abandon(&p.org_id, key).await;
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
                host.idempotency_complete(&p.org_id, key, stored).await;
                Ok(Response::from_parts(head, Body::from(bytes)))
            }
        }
    }
    .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if response.headers().contains_key("idempotent-replayed") {
        return response;
    }
    let Some(route) = route_action(&method, &template) else {
        return response;
    };
    // Read the JSON body for the created id and the error code.
    let (head, body) = response.into_parts();
    let json_body = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let (bytes, response) = if json_body {
        match axum::body::to_bytes(body, MAX_BUFFERED).await {
            Ok(bytes) => (
                Some(bytes.clone()),
                Response::from_parts(head, Body::from(bytes)),
            ),
            Err(_) => (None, ApiError::internal().into_response()),
        }
    } else {
        (None, Response::from_parts(head, body))
    };
    let parsed: Value = bytes
        .as_ref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null);
    let status = response.status();
    let resource_id = match route.id_from {
        IdFrom::Param(name) => params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()),
        IdFrom::Response if status.is_success() => parsed["id"].as_str().map(str::to_string),
        IdFrom::ResponseField(field) if status.is_success() => {
            parsed[field].as_str().map(str::to_string)
        }
        IdFrom::Response | IdFrom::ResponseField(_) | IdFrom::Nothing => None,
    };
    let mut details = serde_json::Map::new();
    if let Some((_, sandbox)) = params.iter().find(|(k, _)| k == "id") {
        details.insert("sandboxId".into(), json!(sandbox));
    }
    if let Some(path) = query_path {
        details.insert("path".into(), json!(path));
    }
    if let Some(code) = parsed["error"]["code"].as_str() {
        details.insert("errorCode".into(), json!(code));
    }
    host.audit(AuditEvent {
        actor: if principal.is_some() {
            "key"
        } else {
            "anonymous"
        },
        principal,
        action: route.action.to_string(),
        resource_type: Some(route.resource_type),
        resource_id,
        outcome: outcome_of(status),
        status: Some(status.as_u16()),
        request_id,
        details,
        org_id: None,
    })
    .await;
    response
}

fn outcome_of(status: StatusCode) -> &'static str {
    if status.is_success() {
        "success"
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        "denied"
    } else {
        "failed"
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
