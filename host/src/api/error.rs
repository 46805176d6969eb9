//! The one error envelope: every failure the API returns, whatever produced
//! it (a handler, a JSON or query rejection, an unknown route, a body over
//! the limit, a panic), is `{"error":{"code","message","details"}}` with a
//! stable snake_case code.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::core::CoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

/// The error envelope, for the OpenAPI document.
#[derive(Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable snake_case code, e.g. `not_found`, `sandbox_destroyed`.
    pub code: String,
    /// Human-readable explanation saying what to do.
    pub message: String,
    /// Structured context (ids, fields, limits); an object, maybe empty.
    #[schema(value_type = Object)]
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: json!({}),
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: send it as `x-api-key: cn_live_…` or `Authorization: Bearer cn_live_…`",
        )
    }

    pub fn forbidden(scope: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this API key lacks the `{scope}` scope"),
        )
        .with_details(json!({ "requiredScope": scope }))
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            .with_details(json!({ "field": field }))
    }

    /// A query string this route cannot take (an unknown or repeated
    /// parameter), as serde's rejections of typed queries are.
    pub fn invalid_query(parameter: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
            .with_details(json!({ "parameter": parameter }))
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }

    pub fn route_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; see GET /v1/openapi.json for the API",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not accept that method; see GET /v1/openapi.json",
        )
    }
}

/// Put in an error response's extensions: its code, for the audit record.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    /// The envelope, `{"error":{"code","message","details"}}`.
    pub fn envelope(&self) -> Value {
        json!({
            "error": { "code": self.code, "message": self.message, "details": self.details }
        })
    }

    /// The same envelope as an SSE `error` event: every stream reports an
    /// API failure this way, so `"error" in data` tells it apart from a
    /// Code Run's interpreter error (whose data has `name` and `message`).
    pub fn sse_event(&self) -> axum::response::sse::Event {
        axum::response::sse::Event::default()
            .event("error")
            .json_data(self.envelope())
            .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = ErrorCode(self.code);
        let retry_after = self.details["retryAfterMs"]
            .as_u64()
            .map(|ms| ms.div_ceil(1000).max(1));
        let mut response = (self.status, Json(self.envelope())).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response.extensions_mut().insert(code);
        response
    }
}

impl From<CoreError> for ApiError {
    fn from(error: CoreError) -> Self {
        use CoreError as E;
        match error {
            E::NotFound { kind, id } => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{kind} `{id}` not found"),
            )
            .with_details(json!({ "resource": kind, "id": id })),
            E::SandboxDestroyed(id) => Self::new(
                StatusCode::GONE,
                "sandbox_destroyed",
                format!("sandbox `{id}` has been destroyed; create a new one"),
            )
            .with_details(json!({ "sandboxId": id })),
            E::SandboxNotReady(id) => Self::new(
                StatusCode::CONFLICT,
                "sandbox_not_ready",
                format!("sandbox `{id}` is still starting; retry shortly"),
            )
            .with_details(json!({ "sandboxId": id })),
            E::UnknownTemplate { name, available } => Self::new(
                StatusCode::NOT_FOUND,
                "template_not_found",
                format!("no template named `{name}`; available: {available}"),
            )
            .with_details(json!({ "template": name })),
            E::NetworkPolicyTooWide(message) => Self::new(
                StatusCode::BAD_REQUEST,
                "network_policy_too_wide",
                format!("{message}; a sandbox may only narrow its template's network policy (GET /v1/templates shows it)"),
            )
            .with_details(json!({ "field": "network" })),
            E::Invalid { field, message } => Self::invalid(field, message),
            E::MissingScope(scope) => Self::forbidden(scope),
            E::RateLimited { retry_after_ms } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("this API key sends requests faster than it may; retry in {} s", retry_after_ms.div_ceil(1000)),
            )
            .with_details(json!({ "retryAfterMs": retry_after_ms })),
            E::TooManyStreams { max } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("this org has {max} log streams open, as many as it may; close some and retry"),
            )
            .with_details(json!({ "max": max })),
            E::TooManyWatches { sandbox_id, max } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_watches",
                format!("sandbox `{sandbox_id}` has {max} file watches open, as many as it may; close one and retry"),
            )
            .with_details(json!({ "sandboxId": sandbox_id, "max": max })),
            E::SandboxBusy {
                sandbox_id,
                what,
                max,
            } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_busy",
                format!("sandbox `{sandbox_id}` is at its limit of {max} {what}; wait for some to end and retry"),
            )
            .with_details(json!({ "sandboxId": sandbox_id, "limit": what, "max": max })),
            E::CommandNotRunning(id) => Self::new(
                StatusCode::CONFLICT,
                "command_not_running",
                format!("command `{id}` has already ended"),
            )
            .with_details(json!({ "commandId": id })),
            E::StdinNotOpen(id) => Self::new(
                StatusCode::CONFLICT,
                "stdin_not_open",
                format!("command `{id}` was not started with \"stdin\": true"),
            )
            .with_details(json!({ "commandId": id })),
            E::Capacity(live) => {
                // The host-wide count is the operator's business, not a
                // tenant's: it stays in the log.
                tracing::warn!(live_sandboxes = live, "sandbox capacity exhausted");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "capacity_exhausted",
                    "this host runs as many sandboxes as it can; kill one or retry later",
                )
            }
            E::RuntimeUnavailable {
                template,
                runtime,
                reason,
            } => Self::new(
                StatusCode::CONFLICT,
                "runtime_unavailable",
                format!("template `{template}` runs on the `{runtime}` runtime, which this host cannot run: {reason}"),
            )
            .with_details(json!({ "template": template, "runtime": runtime, "reason": reason })),
            E::TemplateBuild { template, message } => {
                tracing::error!(%template, %message, "template build failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "template_unavailable",
                    format!("template `{template}` could not be built; the operator can run `crownest template build {template}` to see why"),
                )
                .with_details(json!({ "template": template }))
            }
            E::StartFailed(message) => {
                tracing::error!(%message, "sandbox start failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sandbox_start_failed",
                    "the sandbox could not be started; retry, and if it persists the server log has the cause",
                )
            }
            E::UnsupportedLanguage { language, supported } => Self::new(
                StatusCode::BAD_REQUEST,
                "unsupported_code_language",
                format!("`{language}` is not a code language of this sandbox's template; it supports: {supported}"),
            )
            .with_details(json!({ "language": language, "supported": supported })),
            E::ContextLanguageMismatch {
                context_id,
                context_language,
                language,
            } => Self::new(
                StatusCode::BAD_REQUEST,
                "context_language_mismatch",
                format!("code context `{context_id}` runs {context_language}, not {language}; use a {language} context or omit contextId"),
            )
            .with_details(json!({ "contextId": context_id, "contextLanguage": context_language, "language": language })),
            E::CodeTooLarge { size, max } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "code_source_too_large",
                format!("the code is {size} bytes; a run accepts at most {max}"),
            )
            .with_details(json!({ "size": size, "max": max })),
            E::ContextFailed(language) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "code_context_failed",
                format!("the {} interpreter could not be started; retry, and if it persists the server log has the cause", language.as_str()),
            )
            .with_details(json!({ "language": language.as_str() })),
            E::IdempotencyKeyReused(key) => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!("idempotency key `{key}` was already used with a different request; use a new key for a new request"),
            )
            .with_details(json!({ "idempotencyKey": key })),
            E::IdempotencyInFlight(key) => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                format!("the first request with idempotency key `{key}` is still running; retry later"),
            )
            .with_details(json!({ "idempotencyKey": key })),
            E::QuotaExceeded {
                limit,
                max,
                current,
            } => Self::new(
                if limit == "maxRequestBodyBytes" {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::TOO_MANY_REQUESTS
                },
                "quota_exceeded",
                format!("this org's {limit} quota is {max} and {current} is in use; ask the operator to raise it"),
            )
            .with_details(json!({ "limit": limit, "max": max, "current": current })),
            E::File {
                kind,
                path,
                message,
            } => file_error(kind, path, message),
            E::PreviewPortTaken {
                sandbox_id,
                port,
                existing_id,
            } => Self::new(
                StatusCode::CONFLICT,
                "preview_exists",
                format!("sandbox `{sandbox_id}` already has an active preview of port {port} (`{existing_id}`); use it, or delete it first"),
            )
            .with_details(json!({ "sandboxId": sandbox_id, "port": port, "previewId": existing_id })),
            E::PreviewClosed(id) => Self::new(
                StatusCode::GONE,
                "preview_closed",
                format!("preview `{id}` is closed (deleted, or its sandbox was destroyed); create a new one"),
            )
            .with_details(json!({ "previewId": id })),
            E::PreviewUnreachable { port, message } => Self::new(
                StatusCode::BAD_GATEWAY,
                "preview_upstream_unavailable",
                format!("nothing in the sandbox accepts connections on port {port}; start a server listening on it ({message})"),
            )
            .with_details(json!({ "port": port })),
            E::TransferNotFound => Self::new(
                StatusCode::NOT_FOUND,
                "transfer_not_found",
                "no such transfer: the URL is wrong or was tampered with; create a new one",
            ),
            E::TransferExpired => Self::new(
                StatusCode::GONE,
                "transfer_expired",
                "this transfer URL has expired; create a new one",
            ),
            E::TransferUsed => Self::new(
                StatusCode::GONE,
                "transfer_used",
                "this transfer URL was already used (each is good for one request); create a new one",
            ),
            E::ArchiveTooLarge { declared, max } => Self::new(
                StatusCode::BAD_REQUEST,
                "archive_too_large",
                format!("the archive is declared as {declared} bytes; a run's archive may be at most {max} bytes"),
            )
            .with_details(json!({ "field": "archive.sizeBytes", "max": max })),
            E::ArchiveSizeMismatch { expected, received } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "archive_size_mismatch",
                format!("the run declared an archive of {expected} bytes but at least {received} arrived; upload the declared archive again (the run still awaits it)"),
            )
            .with_details(json!({ "expected": expected, "received": received })),
            E::ArchiveDigestMismatch { expected, received } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "archive_digest_mismatch",
                format!("the uploaded archive's SHA-256 is {received}, not the declared {expected}; upload the declared archive again (the run still awaits it)"),
            )
            .with_details(json!({ "expected": expected, "received": received })),
            E::RunNotAwaitingArchive(id) => Self::new(
                StatusCode::CONFLICT,
                "workspace_run_not_awaiting_archive",
                format!("workspace run `{id}` was started or ended; its archive can no longer change"),
            )
            .with_details(json!({ "workspaceRunId": id })),
            E::ArchiveNotUploaded(id) => Self::new(
                StatusCode::CONFLICT,
                "archive_not_uploaded",
                format!("workspace run `{id}` has no archive yet; PUT /v1/workspace-runs/{id}/archive first"),
            )
            .with_details(json!({ "workspaceRunId": id })),
            E::RunAlreadyStarted(id) => Self::new(
                StatusCode::CONFLICT,
                "workspace_run_already_started",
                format!("workspace run `{id}` was already started; follow its events"),
            )
            .with_details(json!({ "workspaceRunId": id })),
            E::RunFinished(id) => Self::new(
                StatusCode::CONFLICT,
                "workspace_run_finished",
                format!("workspace run `{id}` has already ended"),
            )
            .with_details(json!({ "workspaceRunId": id })),
            E::EvidenceNotReady(id) => Self::new(
                StatusCode::CONFLICT,
                "evidence_not_ready",
                format!("the evidence of workspace run `{id}` is written shortly after the run ends (its sandbox is cleaned up first); retry when the run shows `evidenceReady: true`"),
            )
            .with_details(json!({ "workspaceRunId": id })),
            other @ (E::ServerKey(_) | E::ArchiveStorage(_)) => {
                tracing::error!(error = %other, "internal error");
                Self::internal()
            }
            E::Agent(crate::agent::AgentError::Busy) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_busy",
                "the sandbox is handling as many operations at once as it can; retry shortly",
            )
            .with_details(json!({ "limit": "agent streams" })),
            other @ (E::Runtime(_) | E::Agent(_) | E::Store(_) | E::Blob(_)) => {
                tracing::error!(error = %other, "internal error");
                Self::internal()
            }
        }
    }
}

/// A refused file operation: a stable code per kind.
fn file_error(kind: crownest_proto::FileErrorKind, path: String, message: String) -> ApiError {
    use crownest_proto::FileErrorKind as K;
    let (status, code, text) = match kind {
        K::NotFound => (
            StatusCode::NOT_FOUND,
            "file_not_found",
            format!("`{path}` does not exist"),
        ),
        K::OutsideWorkspace => (
            StatusCode::BAD_REQUEST,
            "path_outside_workspace",
            format!(
                "`{path}` resolves outside /workspace (through `..`, an absolute path or a symlink); only paths under /workspace are allowed"
            ),
        ),
        K::NotADirectory => (
            StatusCode::BAD_REQUEST,
            "not_a_directory",
            format!("a component of `{path}` is not a directory"),
        ),
        K::IsADirectory => (
            StatusCode::BAD_REQUEST,
            "is_a_directory",
            format!("`{path}` is a directory"),
        ),
        K::AlreadyExists => (
            StatusCode::CONFLICT,
            "file_exists",
            format!("`{path}` already exists"),
        ),
        K::NotEmpty => (
            StatusCode::CONFLICT,
            "directory_not_empty",
            format!("`{path}` is not empty; pass recursive=true to remove it with its contents"),
        ),
        K::PermissionDenied => (
            StatusCode::FORBIDDEN,
            "file_permission_denied",
            format!("permission denied on `{path}`"),
        ),
        K::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("`{path}`: {message}"),
        ),
        K::InvalidPath => (
            StatusCode::BAD_REQUEST,
            "invalid_path",
            format!("`{path}`: {message}"),
        ),
        K::NoSpace => (
            StatusCode::INSUFFICIENT_STORAGE,
            "workspace_full",
            String::from(
                "the sandbox's /workspace is full; delete files or use a template with a larger diskMiB",
            ),
        ),
        K::NotAFile => (
            StatusCode::BAD_REQUEST,
            "not_a_file",
            format!("`{path}` is not a regular file"),
        ),
        K::Other => {
            tracing::warn!(%path, %message, "file operation failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "file_operation_failed",
                format!("`{path}`: {message}"),
            )
        }
    };
    ApiError::new(status, code, text).with_details(json!({ "path": path }))
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `content-type: application/json`",
            ),
            JsonRejection::JsonSyntaxError(e) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::JsonDataError(e) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "the body does not match the expected shape: {}",
                    e.body_text()
                ),
            ),
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
            other => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                other.body_text(),
            ),
        }
    }
}

pub fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this server accepts",
    )
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("invalid query string: {}", rejection.body_text()),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            format!("invalid path parameter: {}", rejection.body_text()),
        )
    }
}
