//! Artifacts: promote a sandbox file, list, read metadata, download (with
//! range requests).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller};
use crate::clock::rfc3339;
use crate::model::AuditAction;
use crate::store::{ArtifactRow, Cursor};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sandbox_artifacts))
        .routes(mutation(
            AuditAction::ArtifactCreate,
            Some("artifacts:create"),
            routes!(create_artifact),
        ))
        .routes(routes!(list_artifacts))
        .routes(routes!(get_artifact))
        .routes(routes!(artifact_content))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateArtifactBody {
    /// File to promote, relative to /workspace or absolute under it.
    pub path: String,
    /// Artifact name (default: the file name); decides the mime type.
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactView {
    /// `art_…`
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub size: i64,
    pub mime: String,
    pub sandbox_id: String,
    pub source_path: String,
    pub created_at: String,
}

fn render(row: ArtifactRow) -> ArtifactView {
    ArtifactView {
        id: row.id,
        name: row.name,
        sha256: row.sha256,
        size: row.size,
        mime: row.mime,
        sandbox_id: row.sandbox_id,
        source_path: row.source_path,
        created_at: rfc3339(row.created_at),
    }
}

fn cursor_of(row: &ArtifactRow) -> Cursor {
    Cursor {
        created_at: row.created_at,
        id: row.id.clone(),
    }
}

/// Promotes a file of a live sandbox into durable, content-addressed
/// storage. Scope `artifacts:create`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/artifacts", tag = "artifacts",
    params(("id" = String, Path, description = "sandbox id")), request_body = CreateArtifactBody,
    responses((status = 201, body = ArtifactView), (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope),
        (status = 429, description = "quota_exceeded", body = ErrorEnvelope)))]
async fn create_artifact(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateArtifactBody>,
) -> Result<Audited<ArtifactView>, ApiError> {
    let principal = caller.require("artifacts:create")?;
    let row = state
        .host
        .create_artifact(principal, &id, &body.path, body.name)
        .await?;
    Ok(Audited::created(row.id.clone(), render(row)))
}

/// Artifacts promoted from one sandbox (also after it was destroyed).
/// Scope `artifacts:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/artifacts", tag = "artifacts",
    params(("id" = String, Path, description = "sandbox id"), PageQuery),
    responses((status = 200, body = Page<ArtifactView>), (status = 404, body = ErrorEnvelope)))]
async fn list_sandbox_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<ArtifactView>>, ApiError> {
    let principal = caller.require("artifacts:read")?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_artifacts(principal, Some(&id), query.cursor()?, limit + 1)
        .await?;
    Ok(ApiJson(Page::from_rows(rows, limit, cursor_of, render)))
}

/// All of the caller's artifacts, newest first. Scope `artifacts:read`.
#[utoipa::path(get, path = "/v1/artifacts", tag = "artifacts", params(PageQuery),
    responses((status = 200, body = Page<ArtifactView>)))]
async fn list_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<ArtifactView>>, ApiError> {
    let principal = caller.require("artifacts:read")?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_artifacts(principal, None, query.cursor()?, limit + 1)
        .await?;
    Ok(ApiJson(Page::from_rows(rows, limit, cursor_of, render)))
}

/// One artifact's metadata. Scope `artifacts:read`.
#[utoipa::path(get, path = "/v1/artifacts/{id}", tag = "artifacts",
    params(("id" = String, Path, description = "artifact id")),
    responses((status = 200, body = ArtifactView), (status = 404, body = ErrorEnvelope)))]
async fn get_artifact(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<ArtifactView>, ApiError> {
    let principal = caller.require("artifacts:read")?;
    Ok(ApiJson(render(
        state.host.get_artifact(principal, &id).await?,
    )))
}

/// Downloads an artifact's content. Supports a single `Range: bytes=…`
/// (206 with `Content-Range`; 416 when unsatisfiable). Scope `artifacts:read`.
#[utoipa::path(get, path = "/v1/artifacts/{id}/content", tag = "artifacts",
    params(("id" = String, Path, description = "artifact id"),
        ("Range" = Option<String>, Header, description = "bytes=START-END, bytes=START- or bytes=-SUFFIX")),
    responses((status = 200, description = "the content", content_type = "application/octet-stream"),
        (status = 206, description = "the requested range"),
        (status = 404, body = ErrorEnvelope), (status = 416, body = ErrorEnvelope)))]
async fn artifact_content(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let principal = caller.require("artifacts:read")?;
    let artifact = state.host.get_artifact(principal, &id).await?;
    let size = artifact.size.max(0) as u64;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| parse_range(v, size))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("the range is not within the artifact's {size} bytes; use bytes=START-END"),
                    )
                    .with_details(serde_json::json!({ "size": size }))
                })?,
        ),
    };
    let mut file = match state.host.artifact_file(&artifact).await {
        Ok(file) => tokio::fs::File::from_std(file),
        Err(e) => {
            tracing::error!(artifact = %artifact.id, error = %e, "artifact blob missing");
            return Err(ApiError::internal());
        }
    };
    let (status, start, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, size),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|_| ApiError::internal())?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    let mut response = (status, Body::from_stream(stream)).into_response();
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_str(&artifact.mime)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    super::download_headers(headers, &artifact.name);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", artifact.sha256)) {
        headers.insert(header::ETAG, etag);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
    {
        headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// Parses one `bytes=` range into an inclusive `(start, end)` within `size`.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (size.saturating_sub(n), size - 1)
        }
        (start, "") => (start.parse().ok()?, size - 1),
        (start, end) => (start.parse().ok()?, end.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_within_the_size() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }
}
