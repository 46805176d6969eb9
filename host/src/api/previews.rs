//! Previews: `/v1/sandboxes/{id}/previews…` to create, list, read and close
//! them, and the preview URL itself, which proxies HTTP/1 requests to the
//! port inside the sandbox.
//!
//! **Architecture Invariant:** every preview has its own origin,
//! `{scheme}://prv-….{preview domain}/` (the domain is `--preview-domain`,
//! by default `localhost` with the API's port, which browsers resolve to
//! loopback). A preview is never served on the API's origin or another
//! preview's, so one preview's scripts can neither read another nor reach
//! its cookies, and its cookies are host-only. [`dispatch`] routes a
//! request by its `Host` before the API router sees it.
//!
//! A request to a preview URL carries an API key of the preview's org with
//! scope `previews:access`, or the preview's token: once as
//! `?crownest_preview_token=…` (answered with a host-only cookie and a
//! redirect, the token-mode browser session), then as that cookie. Neither
//! the key, nor the token, nor the cookie is passed on to the sandbox; the
//! app cannot set or clear that cookie, claim a service worker scope or
//! clear site data. Protocol upgrades (WebSocket) are passed through: on
//! the app's 101 the two connections are spliced.

use std::time::Duration;

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
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller, request_scheme};
use crate::auth;
use crate::clock::rfc3339;
use crate::core::CoreError;
use crate::core::previews::{PreviewCredential, TOKEN_PREFIX};
use crate::model::{AuditAction, PreviewCloseReason, PreviewStatus};
use crate::store::{Cursor, PreviewRow};

/// Where preview URLs used to live on the API's origin; requests there are
/// redirected to the preview's own origin.
pub const LEGACY_PREVIEW_PATH: &str = "/previews";

/// The first label of a preview's host: its id with `_` (not allowed in
/// host names) as `-`.
pub fn host_label(preview_id: &str) -> String {
    preview_id.replace('_', "-")
}

/// The preview id of a host label, if it is one.
fn id_of_label(label: &str) -> Option<String> {
    let id = label.strip_prefix("prv-")?;
    let id = format!("prv_{id}");
    crate::ids::is_valid(crate::ids::Kind::Preview, &id).then_some(id)
}

/// `host[:port]` of the preview domain for a request: the configured one,
/// else `localhost` with the port the client reached the API on.
fn preview_domain(headers: &HeaderMap, state: &AppState) -> String {
    if let Some(domain) = &state.host.config().preview_domain {
        return domain.clone();
    }
    let port = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.rsplit_once(':').map(|(_, p)| p.to_string()))
        .filter(|p| p.parse::<u16>().is_ok())
        .unwrap_or_else(|| state.host.config().listen.port().to_string());
    format!("localhost:{port}")
}

/// The origin of a preview, as a client of this request should use it.
pub fn preview_origin(headers: &HeaderMap, state: &AppState, preview_id: &str) -> String {
    format!(
        "{}://{}.{}",
        request_scheme(headers),
        host_label(preview_id),
        preview_domain(headers, state)
    )
}

/// The preview a request is for, by its `Host`: `prv-….{domain}`.
fn preview_of_host(headers: &HeaderMap, state: &AppState) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').map_or(
        host,
        |(h, p)| {
            if p.parse::<u16>().is_ok() { h } else { host }
        },
    );
    let (label, domain) = host.split_once('.')?;
    let configured = state.host.config().preview_domain.as_deref();
    let want = configured.map_or("localhost", |d| d.rsplit_once(':').map_or(d, |(h, _)| h));
    domain
        .eq_ignore_ascii_case(want)
        .then(|| id_of_label(label))?
}

/// Routes a request for a preview's origin to the proxy; everything else
/// goes on to the API.
pub async fn dispatch(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    match preview_of_host(request.headers(), &state) {
        Some(preview_id) => proxy(state, preview_id, request).await,
        None => next.run(request).await,
    }
}
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

/// The old path-based preview URLs on the API's origin: redirected to the
/// preview's own origin, never served here.
pub fn legacy_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/previews/{preview_id}", axum::routing::any(legacy))
        .route("/previews/{preview_id}/", axum::routing::any(legacy))
        .route("/previews/{preview_id}/{*rest}", axum::routing::any(legacy))
}

async fn legacy(State(state): State<AppState>, request: Request) -> Response {
    let rest = request
        .uri()
        .path()
        .strip_prefix(LEGACY_PREVIEW_PATH)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or("");
    let (id, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !crate::ids::is_valid(crate::ids::Kind::Preview, id) {
        return ApiError::route_not_found().into_response();
    }
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!(
        "{}/{path}{query}",
        preview_origin(request.headers(), &state, id)
    );
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => ApiError::route_not_found().into_response(),
    }
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
    /// The preview URL, on the preview's own origin
    /// (`http://prv-….localhost:PORT/` by default). Requests need an API key
    /// with scope `previews:access`, or the preview's token.
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

fn render(row: PreviewRow, origin: &str, token: Option<String>) -> PreviewView {
    let url = format!("{origin}/");
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
    let origin = preview_origin(&headers, &state, &row.id);
    Ok(Audited::created(
        row.id.clone(),
        render(row, &origin, Some(token)),
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
    Ok(ApiJson(Page::from_rows(rows, limit, cursor_of, |row| {
        let origin = preview_origin(&headers, &state, &row.id);
        render(row, &origin, None)
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
    let origin = preview_origin(&headers, &state, &row.id);
    Ok(ApiJson(render(row, &origin, None)))
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
    let origin = preview_origin(&headers, &state, &row.id);
    Ok(ApiJson(render(row, &origin, None)))
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

/// Whether a cookie pair (`Cookie` entry or the first part of a
/// `Set-Cookie`) could be read by a browser as the preview cookie. Judged
/// on the raw bytes before the `=`, in any case and with any whitespace,
/// so that no spelling a browser might normalise gets past (an app setting
/// `crownest_preview_token=forged; Comment=é` would otherwise replace the
/// real session cookie).
fn names_the_token(pair: &[u8]) -> bool {
    let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
    let squeezed: Vec<u8> = name
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_lowercase)
        .collect();
    squeezed
        .windows(TOKEN_PARAM.len())
        .any(|w| w == TOKEN_PARAM.as_bytes())
}

fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == TOKEN_PARAM && value.starts_with(TOKEN_PREFIX)).then(|| value.to_string())
    })
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    cookie_pairs(headers).find_map(|pair| {
        let value = pair
            .strip_prefix(TOKEN_PARAM.as_bytes())?
            .strip_prefix(b"=")?;
        std::str::from_utf8(value).ok().map(str::to_string)
    })
}

/// The `name=value` pairs of every `Cookie` header, as bytes: a browser
/// sends an app's cookie values verbatim, UTF-8 or not, and one such value
/// must not hide the preview token or the app's other cookies.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
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

/// The path (with query) to ask the sandbox for: the request's, without
/// the preview token.
fn target_of(uri: &Uri) -> String {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    let query: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && !is_token_pair(pair))
        .collect();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// The request as the app in the sandbox sees it: our credentials and the
/// hop-by-hop headers removed, forwarding headers added.
fn upstream_request(
    request: Request,
    target: &str,
    port: u16,
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
    let cookies: Vec<&[u8]> = cookie_pairs(headers)
        .filter(|pair| !names_the_token(pair))
        .collect();
    let value = cookies.join(&b"; "[..]);
    headers.remove(header::COOKIE);
    if !value.is_empty()
        && let Ok(value) = HeaderValue::from_bytes(&value)
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

async fn proxy(state: AppState, preview_id: String, request: Request) -> Response {
    match proxy_inner(state, preview_id, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn proxy_inner(
    state: AppState,
    preview_id: String,
    mut request: Request,
) -> Result<Response, ApiError> {
    let target = target_of(request.uri());
    // A protocol upgrade (WebSocket): the app's answer decides; on 101 both
    // connections are spliced together.
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let presented = presented(&state, request.headers(), request.uri()).await?;
    let by_token = matches!(presented.credential, PreviewCredential::Token(_));
    let scheme = request_scheme(request.headers());
    if presented.from_query {
        // Token-mode browser session: check the token, set it as a cookie
        // of this preview's host only, and drop it from the address bar.
        state
            .host
            .authorize_preview(&preview_id, &presented.credential)
            .await
            .map_err(|e| error_for(e, by_token))?;
        let PreviewCredential::Token(token) = presented.credential else {
            return Err(ApiError::internal());
        };
        // `target` starts with `/` and no longer has the token. No
        // `Domain`: the cookie is host-only, so no other preview gets it.
        let location = target;
        let secure = if scheme == "https" { "; Secure" } else { "" };
        let cookie = format!("{TOKEN_PARAM}={token}; Path=/; HttpOnly; SameSite=Lax{secure}");
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
    let mut upstream = upstream_request(request, &target, preview.port, scheme)?;
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
    // An app that accepts a connection but never answers must not hold the
    // request (and its agent stream) forever.
    let wait = Duration::from_millis(state.host.config().limits.preview_response_timeout_ms);
    let mut response = tokio::time::timeout(wait, sender.send_request(upstream))
        .await
        .map_err(|_| upstream_timed_out(preview.port, wait))?
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
    strip_upstream(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// What an app's response may not do to its preview's origin: set or clear
/// the preview cookie, widen a service worker's scope, clear the site's
/// data.
fn strip_upstream(headers: &mut HeaderMap) {
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let pair = v
                .as_bytes()
                .split(|b| *b == b';')
                .next()
                .unwrap_or_default();
            !names_the_token(pair)
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
    headers.remove("service-worker-allowed");
    headers.remove("clear-site-data");
}

fn upstream_timed_out(port: u16, wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "preview_upstream_timeout",
        format!(
            "the server on port {port} in the sandbox accepted the connection but sent no response within {} s",
            wait.as_secs()
        ),
    )
    .with_details(serde_json::json!({ "port": port }))
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
        let uri: Uri = "/a/b?x=1&crownest_preview_token=cn_prv_abc&y=2"
            .parse()
            .expect("uri");
        assert_eq!(target_of(&uri), "/a/b?x=1&y=2");
        let bare: Uri = "/".parse().expect("uri");
        assert_eq!(target_of(&bare), "/");
        assert_eq!(query_token(&uri), Some("cn_prv_abc".into()));
    }

    #[test]
    fn preview_hosts_name_a_preview_id_and_other_hosts_do_not() {
        assert_eq!(
            host_label("prv_0123456789abcdefghjk"),
            "prv-0123456789abcdefghjk"
        );
        assert_eq!(
            id_of_label("prv-0123456789abcdefghjk"),
            Some(String::from("prv_0123456789abcdefghjk"))
        );
        assert_eq!(id_of_label("sbx-0123456789abcdefghjk"), None);
        assert_eq!(id_of_label("prv-short"), None);
    }

    #[test]
    fn an_app_cannot_set_the_preview_cookie_or_claim_the_origin() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_static("crownest_preview_token=forged; Path=/"),
        );
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_static("theme=dark; Path=/"),
        );
        headers.insert("service-worker-allowed", HeaderValue::from_static("/"));
        headers.insert("clear-site-data", HeaderValue::from_static("\"*\""));
        strip_upstream(&mut headers);
        let cookies: Vec<_> = headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, [HeaderValue::from_static("theme=dark; Path=/")]);
        assert!(headers.get("service-worker-allowed").is_none());
        assert!(headers.get("clear-site-data").is_none());
    }

    #[test]
    fn an_app_cannot_set_the_preview_cookie_with_bytes_that_are_not_visible_ascii() {
        let mut headers = HeaderMap::new();
        for raw in [
            &b"crownest_preview_token=forged; Path=/; Comment=\xc3\xa9"[..],
            b"crownest_preview_token=forg\xc3\xa9; Path=/",
            b" Crownest_Preview_Token =x",
            b"crownest_preview_token\t=x",
        ] {
            headers.append(
                header::SET_COOKIE,
                HeaderValue::from_bytes(raw).expect("obs-text is a valid header value"),
            );
        }
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_bytes(b"app_u=\xc3\xa9; Path=/").expect("value"),
        );
        strip_upstream(&mut headers);
        let cookies: Vec<_> = headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies.len(), 1, "{cookies:?}");
        assert_eq!(cookies[0].as_bytes(), b"app_u=\xc3\xa9; Path=/");
    }

    #[test]
    fn an_app_cookie_that_is_not_utf8_hides_neither_the_token_nor_the_other_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_bytes(b"app_u=\xc3\xa9; crownest_preview_token=cn_prv_t; theme=dark")
                .expect("value"),
        );
        assert_eq!(cookie_token(&headers), Some(String::from("cn_prv_t")));
        let forwarded: Vec<&[u8]> = cookie_pairs(&headers)
            .filter(|pair| !names_the_token(pair))
            .collect();
        assert_eq!(forwarded, [&b"app_u=\xc3\xa9"[..], b"theme=dark"]);
    }

    #[test]
    fn our_credentials_are_not_passed_on_but_the_apps_are() {
        let request = Request::builder()
            .uri("/")
            .header("x-api-key", "cn_live_secret")
            .header(
                "cookie",
                "session=app; crownest_preview_token=cn_prv_t; theme=dark",
            )
            .header("connection", "keep-alive")
            .header("host", "example.test:7420")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(request, "/", 8000, "http").expect("upstream");
        let headers = upstream.headers();
        assert!(headers.get("x-api-key").is_none());
        assert!(headers.get("connection").is_none());
        assert_eq!(headers["cookie"], "session=app; theme=dark");
        assert_eq!(headers["host"], "localhost:8000");
        assert_eq!(headers["x-forwarded-host"], "example.test:7420");

        let ours = Request::builder()
            .header("authorization", "Bearer cn_live_secret")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(ours, "/", 8000, "http").expect("upstream");
        assert!(upstream.headers().get("authorization").is_none());
        let theirs = Request::builder()
            .header("authorization", "Bearer app-token")
            .body(Body::empty())
            .expect("request");
        let upstream = upstream_request(theirs, "/", 8000, "http").expect("upstream");
        assert_eq!(upstream.headers()["authorization"], "Bearer app-token");
    }
}
