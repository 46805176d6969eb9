//! Previews: `/v1/sandboxes/{id}/previews…` to create, list, read and close
//! them, and `/previews/{previewId}/…`, the preview URL itself, which
//! proxies HTTP/1 requests to the port inside the sandbox.
//!
//! A request to a preview URL carries an API key of the preview's org with
//! scope `previews:access`, or the preview's token: once as
//! `?crownest_preview_token=…` (answered with a cookie and a redirect, the
//! token-mode browser session), then as that cookie. Neither the key, nor
//! the token, nor the cookie is passed on to the sandbox. Protocol
//! upgrades (WebSocket) are passed through: on the app's 101 the two
//! connections are spliced.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{
    ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller, base_url, request_scheme,
};
use crate::auth;
use crate::clock::rfc3339;
use crate::core::CoreError;
use crate::core::previews::{PreviewCredential, TOKEN_PREFIX};
use crate::model::{AuditAction, PreviewCloseReason, PreviewStatus};
use crate::store::{Cursor, PreviewRow};

/// Where preview URLs live on this server.
pub const PREVIEW_PATH: &str = "/previews";
/// The query parameter and cookie that carry a preview token.
pub const TOKEN_PARAM: &str = "crownest_preview_token";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_previews))
        .routes(mutation(
            AuditAction::PreviewCreate,
            Some("previews:create"),
            routes!(create_preview),
        ))
        .routes(routes!(get_preview))
        .routes(mutation(
            AuditAction::PreviewDelete,
            Some("previews:delete"),
            routes!(delete_preview),
        ))
}

/// The proxy routes: outside the API's idempotency and audit middleware
/// (an `Idempotency-Key` there belongs to the app in the sandbox).
pub fn proxy_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/previews/{preview_id}", axum::routing::any(proxy))
        .route("/previews/{preview_id}/", axum::routing::any(proxy))
        .route("/previews/{preview_id}/{*rest}", axum::routing::any(proxy))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatePreviewBody {
    /// TCP port inside the sandbox (1-65535); the server there should
    /// listen on 127.0.0.1, ::1 or all addresses.
    pub port: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewView {
    /// `prv_…`
    pub id: String,
    pub sandbox_id: String,
    pub port: u16,
    pub status: PreviewStatus,
    /// The preview URL. Requests need an API key with scope
    /// `previews:access`, or the preview's token.
    pub url: String,
    pub created_at: String,
    pub closed_at: Option<String>,
    pub close_reason: Option<PreviewCloseReason>,
    /// The browser token (`cn_prv_…`). Only in the create response: keep it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `url` with the token, for a browser: opening it sets a cookie
    /// scoped to this preview. Only in the create response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser_url: Option<String>,
}

fn render(row: PreviewRow, base: &str, token: Option<String>) -> PreviewView {
    let url = format!("{base}{PREVIEW_PATH}/{}/", row.id);
    PreviewView {
        browser_url: token.as_ref().map(|t| format!("{url}?{TOKEN_PARAM}={t}")),
        id: row.id,
        sandbox_id: row.sandbox_id,
        port: row.port,
        status: row.status,
        url,
        created_at: rfc3339(row.created_at),
        closed_at: row.closed_at.map(rfc3339),
        close_reason: row.close_reason,
        token,
    }
}

fn cursor_of(row: &PreviewRow) -> Cursor {
    Cursor {
        created_at: row.created_at,
        id: row.id.clone(),
    }
}

/// Exposes a port of a live sandbox as an authenticated URL. One active
/// preview per sandbox and port. Scope `previews:create`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/previews", tag = "previews",
    params(("id" = String, Path, description = "sandbox id")), request_body = CreatePreviewBody,
    responses((status = 201, body = PreviewView), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "preview_exists", body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn create_preview(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CreatePreviewBody>,
) -> Result<Audited<PreviewView>, ApiError> {
    let principal = caller.require("previews:create")?;
    let (row, token) = state.host.create_preview(principal, &id, body.port).await?;
    let base = base_url(&headers, &state);
    Ok(Audited::created(
        row.id.clone(),
        render(row, &base, Some(token)),
    ))
}

/// A sandbox's previews, newest first, closed ones included. Scope
/// `previews:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/previews", tag = "previews",
    params(("id" = String, Path, description = "sandbox id"), PageQuery),
    responses((status = 200, body = Page<PreviewView>), (status = 404, body = ErrorEnvelope)))]
async fn list_previews(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<PreviewView>>, ApiError> {
    let principal = caller.require("previews:read")?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_previews(principal, &id, query.cursor()?, limit + 1)
        .await?;
    let base = base_url(&headers, &state);
    Ok(ApiJson(Page::from_rows(rows, limit, cursor_of, |row| {
        render(row, &base, None)
    })))
}

/// One preview. Scope `previews:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/previews/{preview_id}", tag = "previews",
    params(("id" = String, Path, description = "sandbox id"), ("preview_id" = String, Path, description = "preview id")),
    responses((status = 200, body = PreviewView), (status = 404, body = ErrorEnvelope)))]
async fn get_preview(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((id, preview_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<PreviewView>, ApiError> {
    let principal = caller.require("previews:read")?;
    let row = state.host.get_preview(principal, &id, &preview_id).await?;
    Ok(ApiJson(render(row, &base_url(&headers, &state), None)))
}

/// Closes a preview: its URL stops working at once; the record stays.
/// Scope `previews:delete`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/previews/{preview_id}", tag = "previews",
    params(("id" = String, Path, description = "sandbox id"), ("preview_id" = String, Path, description = "preview id")),
    responses((status = 200, body = PreviewView), (status = 404, body = ErrorEnvelope)))]
async fn delete_preview(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((id, preview_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<PreviewView>, ApiError> {
    let principal = caller.require("previews:delete")?;
    let row = state
        .host
        .delete_preview(principal, &id, &preview_id)
        .await?;
    Ok(ApiJson(render(row, &base_url(&headers, &state), None)))
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How the request authenticates, and which of its headers carried it.
struct Presented {
    credential: PreviewCredential,
    /// A token given in the query: answer with a cookie and a redirect.
    from_query: bool,
}

/// Whether a `name=value` pair (query or cookie) is the preview token.
fn is_token_pair(pair: &str) -> bool {
    pair.split('=').next() == Some(TOKEN_PARAM)
}

fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == TOKEN_PARAM && value.starts_with(TOKEN_PREFIX)).then(|| value.to_string())
    })
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == TOKEN_PARAM).then(|| value.to_string())
        })
}

/// Whether `Authorization` carries a CrowNest key (then it is ours, and is
/// not passed on); any other `Authorization` belongs to the app.
fn authorization_is_ours(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim().starts_with(auth::KEY_PREFIX)
        })
}

fn preview_unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!(
            "a preview needs an API key with scope `previews:access` (`x-api-key: cn_live_…`), or its token (`?{TOKEN_PARAM}=cn_prv_…`, then the cookie that sets)"
        ),
    )
}

async fn presented(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Presented, ApiError> {
    if headers.contains_key("x-api-key") || authorization_is_ours(headers) {
        let secret = super::presented_key_of(headers).ok_or_else(preview_unauthorized)?;
        let (principal, _) = state
            .host
            .authenticate(secret)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "key lookup failed");
                ApiError::internal()
            })?
            .ok_or_else(preview_unauthorized)?;
        if !principal.has_scope("previews:access") {
            return Err(ApiError::forbidden("previews:access"));
        }
        return Ok(Presented {
            credential: PreviewCredential::Key(principal),
            from_query: false,
        });
    }
    if let Some(token) = query_token(uri) {
        return Ok(Presented {
            credential: PreviewCredential::Token(token),
            from_query: true,
        });
    }
    if let Some(token) = cookie_token(headers) {
        return Ok(Presented {
            credential: PreviewCredential::Token(token),
            from_query: false,
        });
    }
    Err(preview_unauthorized())
}

/// `preview_id` and the path (with query) to ask the sandbox for.
fn split_target(uri: &Uri) -> Option<(String, String)> {
    let rest = uri.path().strip_prefix(PREVIEW_PATH)?.strip_prefix('/')?;
    let (id, path) = match rest.split_once('/') {
        Some((id, path)) => (id, format!("/{path}")),
        None => (rest, String::from("/")),
    };
    let query: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && !is_token_pair(pair))
        .collect();
    let target = if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    };
    Some((id.to_string(), target))
}

/// The request as the app in the sandbox sees it: our credentials and the
/// hop-by-hop headers removed, forwarding headers added.
fn upstream_request(
    request: Request,
    target: &str,
    port: u16,
    preview_id: &str,
    scheme: &str,
) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let ours = authorization_is_ours(&parts.headers);
    let original_host = parts.headers.get(header::HOST).cloned();
    let headers = &mut parts.headers;
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    headers.remove("x-api-key");
    if ours {
        headers.remove(header::AUTHORIZATION);
    }
    // Keep the app's own cookies; drop the preview's.
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !is_token_pair(pair))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(value) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, value);
    }
    if let Some(host) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
    if let Ok(prefix) = HeaderValue::from_str(&format!("{PREVIEW_PATH}/{preview_id}")) {
        headers.insert(HeaderName::from_static("x-forwarded-prefix"), prefix);
    }
    let host =
        HeaderValue::from_str(&format!("localhost:{port}")).map_err(|_| ApiError::internal())?;
    headers.insert(header::HOST, host);
    parts.uri = target
        .parse()
        .map_err(|_| ApiError::invalid("path", "the preview path is not a valid request target"))?;
    parts.version = axum::http::Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

fn error_for(error: CoreError, by_token: bool) -> ApiError {
    match error {
        // A wrong token must not tell whether the preview exists.
        CoreError::NotFound { .. } if by_token => preview_unauthorized(),
        other => other.into(),
    }
}

async fn proxy(State(state): State<AppState>, request: Request) -> Response {
    match proxy_inner(state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn proxy_inner(state: AppState, mut request: Request) -> Result<Response, ApiError> {
    let (preview_id, target) = split_target(request.uri()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such preview URL",
        )
    })?;
    // A protocol upgrade (WebSocket): the app's answer decides; on 101 both
    // connections are spliced together.
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let presented = presented(&state, request.headers(), request.uri()).await?;
    let by_token = matches!(presented.credential, PreviewCredential::Token(_));
    let scheme = request_scheme(request.headers());
    if presented.from_query {
        // Token-mode browser session: check the token, set it as a cookie
        // for this preview's path only, and drop it from the address bar.
        let preview = state
            .host
            .authorize_preview(&preview_id, &presented.credential)
            .await
            .map_err(|e| error_for(e, by_token))?;
        let PreviewCredential::Token(token) = presented.credential else {
            return Err(ApiError::internal());
        };
        // `target` starts with `/` and no longer has the token.
        let location = format!("{PREVIEW_PATH}/{}{target}", preview.id);
        let secure = if scheme == "https" { "; Secure" } else { "" };
        let cookie = format!(
            "{TOKEN_PARAM}={token}; Path={PREVIEW_PATH}/{}/; HttpOnly; SameSite=Lax{secure}",
            preview.id
        );
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::LOCATION,
            HeaderValue::from_str(&location).map_err(|_| ApiError::internal())?,
        );
        headers.insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).map_err(|_| ApiError::internal())?,
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(response);
    }
    let (preview, tunnel) = state
        .host
        .open_preview(&preview_id, &presented.credential)
        .await
        .map_err(|e| error_for(e, by_token))?;
    let mut upstream = upstream_request(request, &target, preview.port, &preview.id, scheme)?;
    if let Some(protocol) = &upgrade {
        let headers = upstream.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tunnel))
            .await
            .map_err(|e| upstream_failed(preview.port, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "preview connection ended");
        }
    });
    let mut response = sender
        .send_request(upstream)
        .await
        .map_err(|e| upstream_failed(preview.port, &e))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let app_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, app_upgrade) {
                Ok((client, app)) => {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(app),
                    )
                    .await;
                }
                Err(e) => tracing::debug!(error = %e, "preview upgrade failed"),
            }
        });
        // The 101 keeps its `Connection` and `Upgrade`: they are the answer.
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn upstream_failed(port: u16, error: &hyper::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "preview_upstream_failed",
        format!(
            "the server on port {port} in the sandbox did not answer with valid HTTP/1: {error}"
        ),
    )
    .with_details(serde_json::json!({ "port": port }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_drops_only_the_token_parameter() {
        let uri: Uri = "/previews/prv_x/a/b?x=1&crownest_preview_token=cn_prv_abc&y=2"
            .parse()
            .expect("uri");
        assert_eq!(
            split_target(&uri),
            Some(("prv_x".into(), "/a/b?x=1&y=2".into()))
        );
        let bare: Uri = "/previews/prv_x".parse().expect("uri");
        assert_eq!(split_target(&bare), Some(("prv_x".into(), "/".into())));
        assert_eq!(query_token(&uri), Some("cn_prv_abc".into()));
    }

    #[test]
    fn our_credentials_are_not_passed_on_but_the_apps_are() {
        let request = Request::builder()
            .uri("/previews/prv_x/")
            .header("x-api-key", "cn_live_secret")
            .header(
                "cookie",
                "session=app; crownest_preview_token=cn_prv_t; theme=dark",
            )
            .header("connection", "keep-alive")
            .header("host", "example.test:7420")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(request, "/", 8000, "prv_x", "http").expect("upstream");
        let headers = upstream.headers();
        assert!(headers.get("x-api-key").is_none());
        assert!(headers.get("connection").is_none());
        assert_eq!(headers["cookie"], "session=app; theme=dark");
        assert_eq!(headers["host"], "localhost:8000");
        assert_eq!(headers["x-forwarded-host"], "example.test:7420");
        assert_eq!(headers["x-forwarded-prefix"], "/previews/prv_x");

        let ours = Request::builder()
            .header("authorization", "Bearer cn_live_secret")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(ours, "/", 8000, "prv_x", "http").expect("upstream");
        assert!(upstream.headers().get("authorization").is_none());
        let theirs = Request::builder()
            .header("authorization", "Bearer app-token")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(theirs, "/", 8000, "prv_x", "http").expect("upstream");
        assert_eq!(upstream.headers()["authorization"], "Bearer app-token");
    }
}
