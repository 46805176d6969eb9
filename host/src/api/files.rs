//! `/v1/sandboxes/{id}/files…` and `/v1/transfers/{token}`: files in a
//! sandbox's /workspace. Small files go directly through the raw body
//! (streamed, at most [`DIRECT_MAX_BYTES`]); large ones through staged,
//! single-use, HMAC-signed URLs that need no API key. Bodies stream in both
//! directions; nothing here buffers a whole file.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use crownest_proto::{FileErrorKind, FileInfo, FileKind};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::{AuditOrg, mutation};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, CREATED, Caller};
use crate::clock::rfc3339;
use crate::core::CoreError;
use crate::core::files::{display_path, normalize_path};
use crate::model::{AuditAction, TransferKind};

/// Largest body of a direct `PUT …/files`; larger files go through
/// `POST …/files/uploads`.
pub const DIRECT_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Oversized direct uploads up to this size are read and dropped before
/// the 413, so that the client sees it; larger ones get the connection
/// closed.
const DRAIN_MAX_BYTES: u64 = 2 * DIRECT_MAX_BYTES;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(read_file))
        .routes(mutation(
            AuditAction::FileWrite,
            Some("files:write"),
            routes!(write_file),
        ))
        .routes(mutation(
            AuditAction::FileDelete,
            Some("files:write"),
            routes!(delete_file),
        ))
        .routes(routes!(list_files))
        .routes(routes!(stat_file))
        .routes(routes!(file_exists))
        .routes(routes!(watch_files))
        .routes(mutation(
            AuditAction::FileMove,
            Some("files:write"),
            routes!(move_file),
        ))
        .routes(mutation(
            AuditAction::FileMkdir,
            Some("files:write"),
            routes!(make_dir),
        ))
        .routes(mutation(
            AuditAction::FileUploadUrl,
            Some("files:write"),
            routes!(create_upload),
        ))
        .routes(mutation(
            AuditAction::FileDownloadUrl,
            Some("files:read"),
            routes!(create_download),
        ))
        .routes(routes!(transfer_download))
        .routes(mutation(
            AuditAction::FileTransfer,
            None,
            routes!(transfer_upload),
        ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Relative to /workspace, or absolute under it.
    pub path: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Directory, relative to /workspace or absolute under it (default:
    /// /workspace).
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    pub path: String,
    /// Remove a non-empty directory with its contents.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileView {
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits, e.g. 420 (0644).
    pub mode: u32,
    /// Last modification, RFC 3339.
    pub mtime: String,
}

fn render(path: String, info: FileInfo) -> FileView {
    FileView {
        name: info.name,
        path,
        kind: match info.kind {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Other => "other",
        },
        size: info.size,
        mode: info.mode,
        mtime: rfc3339(info.mtime_ms),
    }
}

/// The path as the client will see it in responses.
fn shown(path: &str) -> Result<String, ApiError> {
    Ok(display_path(&normalize_path(path)?))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    pub data: Vec<FileView>,
    /// True when the directory has more entries than one listing returns.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveBody {
    pub from: String,
    pub to: String,
    /// Replace an existing `to` (default: refuse with `file_exists`).
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MkdirBody {
    pub path: String,
    /// Create missing parents; an existing directory is then no error.
    #[serde(default)]
    pub parents: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadBody {
    pub path: String,
    /// Most bytes the upload may carry (default and cap: the workspace size).
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DownloadBody {
    pub path: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferView {
    /// Signed URL on this server; needs no API key; good for one request.
    pub url: String,
    /// `PUT` (upload the raw bytes) or `GET`.
    pub method: &'static str,
    pub expires_at: String,
    /// Uploads: most bytes accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Downloads: the file's size when the URL was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// The request body as a stream of chunks for the core.
pub(super) fn body_stream(body: Body) -> impl Stream<Item = Result<Bytes, CoreError>> + Send {
    body.into_data_stream().map(|chunk| {
        chunk.map_err(|e| CoreError::Invalid {
            field: "body",
            message: format!("the request body could not be read: {e}"),
        })
    })
}

pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn direct_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "direct uploads are limited to {DIRECT_MAX_BYTES} bytes; use POST /v1/sandboxes/{{id}}/files/uploads for a staged upload URL"
        ),
    )
    .with_details(serde_json::json!({ "maxBytes": DIRECT_MAX_BYTES }))
}

/// A streamed file response with its length and a type from its name.
fn file_response(
    path: &str,
    info: &FileInfo,
    stream: impl Stream<Item = Result<Bytes, CoreError>> + Send + 'static,
) -> Response {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(mime.essence_str()) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    super::download_headers(headers, path.rsplit('/').next().unwrap_or(path));
    response
}

/// Writes a file from the raw request body (at most 32 MiB; larger files:
/// `POST …/files/uploads`). Missing parent directories are created; the
/// file appears whole or not at all. Scope `files:write`.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), PathQuery),
    request_body(content = String, content_type = "application/octet-stream", description = "the file's bytes"),
    responses(
        (status = 200, description = "written", body = FileView),
        (status = 400, description = "path_outside_workspace, invalid_path, is_a_directory, not_a_directory", body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 413, description = "payload_too_large", body = ErrorEnvelope)))]
async fn write_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<FileView>, ApiError> {
    let principal = caller.require("files:write")?;
    let path = shown(&query.path)?;
    if let Some(len) = declared_length(&headers).filter(|len| *len > DIRECT_MAX_BYTES) {
        // An HTTP/1.1 client still sending its body would see a broken pipe
        // instead of this answer; read (and drop) a moderately oversized
        // body first so that it gets the error.
        if len <= DRAIN_MAX_BYTES {
            let mut stream = body.into_data_stream();
            while let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {}
        }
        return Err(direct_too_large());
    }
    let written = state
        .host
        .write_file(
            principal,
            &id,
            &query.path,
            body_stream(body),
            DIRECT_MAX_BYTES,
        )
        .await;
    match written {
        Ok(info) => Ok(ApiJson(render(path, info))),
        Err(CoreError::File {
            kind: FileErrorKind::TooLarge,
            ..
        }) => Err(direct_too_large()),
        Err(e) => Err(e.into()),
    }
}

/// Reads a file: the raw bytes, with `Content-Length` and a
/// `Content-Type` guessed from the name. Scope `files:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), PathQuery),
    responses(
        (status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = String),
        (status = 400, description = "path_outside_workspace, is_a_directory, not_a_file", body = ErrorEnvelope),
        (status = 404, description = "file_not_found", body = ErrorEnvelope)))]
async fn read_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let principal = caller.require("files:read")?;
    let (info, stream) = state
        .host
        .read_file_stream(principal, &id, &query.path)
        .await?;
    Ok(file_response(&query.path, &info, stream))
}

/// Removes a file, a symlink (never its target) or a directory (non-empty
/// ones with `recursive=true`). Scope `files:write`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), DeleteQuery),
    responses(
        (status = 204, description = "removed"),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "directory_not_empty", body = ErrorEnvelope)))]
async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let principal = caller.require("files:write")?;
    state
        .host
        .remove_file(principal, &id, &query.path, query.recursive)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists a directory (default /workspace), sorted by name; symlinks are
/// listed as such, not followed. Scope `files:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), ListQuery),
    responses((status = 200, body = FileList), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
async fn list_files(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiJson<FileList>, ApiError> {
    let principal = caller.require("files:read")?;
    let path = query.path.unwrap_or_default();
    let listing = state.host.list_files(principal, &id, &path).await?;
    Ok(ApiJson(FileList {
        data: listing
            .entries
            .into_iter()
            .map(|e| render(e.path, e.info))
            .collect(),
        truncated: listing.truncated,
    }))
}

/// Metadata of a file or directory. Scope `files:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), PathQuery),
    responses((status = 200, body = FileView), (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
async fn stat_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<ApiJson<FileView>, ApiError> {
    let principal = caller.require("files:read")?;
    let path = shown(&query.path)?;
    let info = state.host.stat_file(principal, &id, &query.path).await?;
    Ok(ApiJson(render(path, info)))
}

/// Whether a path exists.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExistsView {
    pub exists: bool,
}

/// Whether a file or directory exists (symlinks inside /workspace are
/// followed). Scope `files:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/exists", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), PathQuery),
    responses((status = 200, body = ExistsView),
        (status = 400, description = "path_outside_workspace, invalid_path", body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 410, body = ErrorEnvelope)))]
async fn file_exists(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<ApiJson<ExistsView>, ApiError> {
    let principal = caller.require("files:read")?;
    shown(&query.path)?;
    let exists = state.host.file_exists(principal, &id, &query.path).await?;
    Ok(ApiJson(ExistsView { exists }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// The directory to watch, relative to /workspace or absolute under it
    /// (default: /workspace).
    pub path: Option<String>,
    /// Watch the directories below it too (default true).
    pub recursive: Option<bool>,
}

/// The data of a watch's `ready` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct WatchReady {
    /// The watched directory.
    pub path: String,
}

/// The data of a watch's `change` event.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WatchChange {
    /// `create`, `modify`, `delete` or `rename`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The entry's path (after a rename: where it is now).
    pub path: String,
    pub is_dir: bool,
    /// Where a renamed entry was; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
}

/// Changes under a directory of /workspace, as they happen, from inotify
/// in the sandbox: an SSE stream of `ready` (the watch is in place: changes
/// from now on are reported), then `change` events
/// (`{"type","path","isDir","oldPath"}`), `overflow` when the kernel's
/// bounded queue lost changes (list again to resync), `limited` when a
/// recursive watch reached its 4096 directories, and `end` when the
/// watch does (`{"reason"}`: `sandbox_destroyed` or `directory_removed`).
/// At most 8 watches per sandbox (`429 too_many_watches`).
/// Scope `files:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/watch", tag = "files",
    params(("id" = String, Path, description = "sandbox id"), WatchQuery),
    responses((status = 200, content_type = "text/event-stream", description = "SSE stream"),
        (status = 400, description = "path_outside_workspace, not_a_directory", body = ErrorEnvelope),
        (status = 404, description = "file_not_found", body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope),
        (status = 429, description = "too_many_watches, too_many_streams", body = ErrorEnvelope)))]
async fn watch_files(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use crownest_proto::{ChangeKind, WatchEvent};
    let principal = caller.require("files:read")?;
    let path = query.path.unwrap_or_default();
    shown(&path)?;
    let watch = state
        .host
        .watch_files(principal, &id, &path, query.recursive.unwrap_or(true))
        .await?;
    let ready = Event::default()
        .event("ready")
        .json_data(WatchReady {
            path: watch.path.clone(),
        })
        .unwrap_or_default();
    let events = super::task_stream(move |tx| async move {
        // The whole watch, not just the fields used below: its places are
        // held for as long as the stream runs.
        let mut watch = watch;
        if tx.send(ready).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = tx.closed() => return,
                _ = watch.stopping.cancelled() => None,
                next = watch.events.next() => Some(next),
            };
            let event = match next {
                // The sandbox is going away, or its agent ended the watch
                // (the directory is gone).
                None | Some(None) => {
                        let reason = if watch.stopping.is_cancelled() {
                        "sandbox_destroyed"
                    } else {
                        "directory_removed"
                    };
                    let end = Event::default()
                        .event("end")
                        .json_data(serde_json::json!({ "reason": reason }))
                        .unwrap_or_default();
                    let _ = tx.send(end).await;
                    return;
                }
                // The agent's connection broke because the sandbox is
                // going away: that is the end, not a failure.
                Some(Some(Err(_))) if watch.stopping.is_cancelled() => {
                    let end = Event::default()
                        .event("end")
                        .json_data(serde_json::json!({ "reason": "sandbox_destroyed" }))
                        .unwrap_or_default();
                    let _ = tx.send(end).await;
                    return;
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, "a file watch failed");
                    let _ = tx.send(ApiError::from(CoreError::Agent(e)).sse_event()).await;
                    return;
                }
                Some(Some(Ok(WatchEvent::Change { kind, path, is_dir, old_path }))) => Event::default()
                    .event("change")
                    .json_data(WatchChange {
                        kind: match kind {
                            ChangeKind::Create => "create",
                            ChangeKind::Modify => "modify",
                            ChangeKind::Delete => "delete",
                            ChangeKind::Rename => "rename",
                        },
                        path: display_path(&path),
                        is_dir,
                        old_path: old_path.as_deref().map(display_path),
                    })
                    .unwrap_or_default(),
                Some(Some(Ok(WatchEvent::Overflow))) => Event::default()
                    .event("overflow")
                    .json_data(serde_json::json!({
                        "message": "the sandbox's change queue overflowed: changes were lost; list the directory again to resync"
                    }))
                    .unwrap_or_default(),
                Some(Some(Ok(WatchEvent::Limited { max_dirs }))) => Event::default()
                    .event("limited")
                    .json_data(serde_json::json!({ "maxDirs": max_dirs }))
                    .unwrap_or_default(),
                // Only first, and handled by the core.
                Some(Some(Ok(WatchEvent::Ready | WatchEvent::Error { .. }))) => continue,
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(super::SSE_KEEPALIVE))
        .into_response())
}

/// Moves (renames) a file or directory within /workspace. Scope
/// `files:write`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/move", tag = "files",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = MoveBody,
    responses((status = 200, description = "the moved entry", body = FileView), (status = 400, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 409, description = "file_exists", body = ErrorEnvelope)))]
async fn move_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<MoveBody>,
) -> Result<ApiJson<FileView>, ApiError> {
    let principal = caller.require("files:write")?;
    let to = shown(&body.to)?;
    let info = state
        .host
        .move_file(principal, &id, &body.from, &body.to, body.overwrite)
        .await?;
    Ok(ApiJson(render(to, info)))
}

/// Creates a directory. Scope `files:write`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = MkdirBody,
    responses((status = 201, body = FileView), (status = 400, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 409, description = "file_exists", body = ErrorEnvelope)))]
async fn make_dir(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<MkdirBody>,
) -> Result<(StatusCode, ApiJson<FileView>), ApiError> {
    let principal = caller.require("files:write")?;
    let path = shown(&body.path)?;
    let info = state
        .host
        .make_dir(principal, &id, &body.path, body.parents)
        .await?;
    Ok((CREATED, ApiJson(render(path, info))))
}

pub(super) fn transfer_view(
    headers: &HeaderMap,
    state: &AppState,
    ticket: crate::core::files::TransferTicket,
    method: &'static str,
) -> TransferView {
    TransferView {
        url: format!(
            "{}/v1/transfers/{}",
            super::base_url(headers, state),
            ticket.token
        ),
        method,
        expires_at: rfc3339(ticket.expires_at),
        max_bytes: ticket.max_bytes,
        size_bytes: ticket.size_bytes,
    }
}

/// Stages an upload: a signed URL, valid 5 minutes for one `PUT` of the raw
/// bytes without an API key, for files of any size up to the workspace's.
/// Scope `files:write`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/uploads", tag = "files",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = UploadBody,
    responses((status = 201, body = TransferView), (status = 400, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 413, description = "file_too_large", body = ErrorEnvelope)))]
async fn create_upload(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UploadBody>,
) -> Result<(StatusCode, ApiJson<TransferView>), ApiError> {
    let principal = caller.require("files:write")?;
    let ticket = state
        .host
        .create_upload(principal, &id, &body.path, body.size_bytes)
        .await?;
    Ok((
        CREATED,
        ApiJson(transfer_view(&headers, &state, ticket, "PUT")),
    ))
}

/// Stages a download: a signed URL, valid 5 minutes for one `GET` without
/// an API key. Scope `files:read`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/downloads", tag = "files",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = DownloadBody,
    responses((status = 201, body = TransferView), (status = 400, body = ErrorEnvelope),
        (status = 404, description = "file_not_found", body = ErrorEnvelope)))]
async fn create_download(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<DownloadBody>,
) -> Result<(StatusCode, ApiJson<TransferView>), ApiError> {
    let principal = caller.require("files:read")?;
    let ticket = state
        .host
        .create_download(principal, &id, &body.path)
        .await?;
    Ok((
        CREATED,
        ApiJson(transfer_view(&headers, &state, ticket, "GET")),
    ))
}

/// Uploads through a staged URL: the raw bytes, no API key. Single use;
/// more bytes than `maxBytes` abort it and leave no file behind. A
/// Workspace Run's archive URL answers with the run (`WorkspaceRunView`)
/// or 422 `archive_size_mismatch` / `archive_digest_mismatch`.
#[utoipa::path(put, path = "/v1/transfers/{token}", tag = "files", security(()),
    params(("token" = String, Path, description = "from the staged URL")),
    request_body(content = String, content_type = "application/octet-stream", description = "the file's bytes"),
    responses((status = 200, body = FileView),
        (status = 404, description = "transfer_not_found", body = ErrorEnvelope),
        (status = 410, description = "transfer_used, transfer_expired", body = ErrorEnvelope),
        (status = 413, description = "file_too_large", body = ErrorEnvelope)))]
async fn transfer_upload(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let transfer = match state
        .host
        .claim_transfer(&token, TransferKind::Upload)
        .await
    {
        Ok(transfer) => transfer,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // A valid token acts for the transfer's org: audit it there.
    let org = AuditOrg(transfer.org_id.clone());
    let max = transfer.max_bytes.unwrap_or(0).max(0) as u64;
    if transfer.kind == TransferKind::ArchiveUpload {
        // A Workspace Run's archive: answered with the run.
        let result = state
            .host
            .upload_archive_transfer(&transfer, body_stream(body))
            .await
            .map(|row| ApiJson(super::workspace_runs::render_run(row)))
            .map_err(ApiError::from);
        let mut response = result.into_response();
        response.extensions_mut().insert(org);
        return response;
    }
    let result = if declared_length(&headers).is_some_and(|len| len > max) {
        Err(ApiError::from(CoreError::File {
            kind: FileErrorKind::TooLarge,
            path: display_path(&transfer.path),
            message: format!("the upload is larger than its limit of {max} bytes"),
        }))
    } else {
        state
            .host
            .upload_transfer(&transfer, body_stream(body))
            .await
            .map(|info| ApiJson(render(display_path(&transfer.path), info)))
            .map_err(ApiError::from)
    };
    let mut response = result.into_response();
    response.extensions_mut().insert(org);
    response
}

/// Downloads through a staged URL: the raw bytes with `Content-Length`, no
/// API key. Single use.
#[utoipa::path(get, path = "/v1/transfers/{token}", tag = "files", security(()),
    params(("token" = String, Path, description = "from the staged URL")),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = String),
        (status = 404, description = "transfer_not_found, file_not_found", body = ErrorEnvelope),
        (status = 410, description = "transfer_used, transfer_expired", body = ErrorEnvelope)))]
async fn transfer_download(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<Response, ApiError> {
    let transfer = state
        .host
        .claim_transfer(&token, TransferKind::Download)
        .await?;
    let (info, stream) = state.host.download_transfer(&transfer).await?;
    Ok(file_response(&transfer.path, &info, stream))
}
