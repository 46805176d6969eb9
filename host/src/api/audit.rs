//! `GET /v1/audit-events` and `GET /v1/usage`: what happened, and what it
//! cost.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::{ApiError, ApiJson, ApiQuery, AppState, Caller};
use crate::clock::{parse_rfc3339, rfc3339};
use crate::core::ledger::UsageGroup;
use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome, ResourceKind};
use crate::store::{AuditFilter, AuditRow};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit_events))
        .routes(routes!(usage))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events about this resource id (`sbx_…`, `cmd_…`, `key_…`).
    pub resource_id: Option<String>,
    /// Only this action, e.g. `sandbox.create`, `command.run`, `sandbox.kill`.
    pub action: Option<String>,
    /// RFC 3339; events at or after.
    pub from: Option<String>,
    /// RFC 3339; events before.
    pub to: Option<String>,
    /// Page size, 1..=200 (default 50).
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEventView {
    /// `evt_…`
    pub id: String,
    pub at: String,
    /// `key` (an API key), `operator` (the CLI), `system` (the host, e.g.
    /// the TTL reaper) or `token` (a staged transfer URL).
    pub actor: AuditActor,
    pub actor_key_id: Option<String>,
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub action: AuditAction,
    pub resource_type: Option<ResourceKind>,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    pub status: Option<i64>,
    pub request_id: Option<String>,
    pub details: AuditDetails,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub data: Vec<AuditEventView>,
    pub next_cursor: Option<String>,
}

fn render(row: AuditRow) -> AuditEventView {
    AuditEventView {
        details: row.details,
        id: row.id,
        at: rfc3339(row.at),
        actor: row.actor,
        actor_key_id: row.actor_key_id,
        org_id: row.org_id,
        project_id: row.project_id,
        action: row.action,
        resource_type: row.resource_type,
        resource_id: row.resource_id,
        outcome: row.outcome,
        status: row.status,
        request_id: row.request_id,
    }
}

pub(super) fn time_param(
    field: &'static str,
    value: Option<&str>,
) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            parse_rfc3339(v).ok_or_else(|| {
                ApiError::invalid(field, format!("`{field}` must be an RFC 3339 time"))
            })
        })
        .transpose()
}

/// Audit events of the caller's org (and project, for a project key),
/// newest first: every create, run, write, kill and revoke, including
/// denied and failed attempts. Scope `audit:read`.
#[utoipa::path(get, path = "/v1/audit-events", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorEnvelope), (status = 403, body = ErrorEnvelope)))]
async fn list_audit_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<ApiJson<AuditPage>, ApiError> {
    let principal = caller.require("audit:read")?;
    let limit = match query.limit {
        None => 50,
        Some(n) if (1..=200).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and 200, got {n}"),
            ));
        }
    };
    let after =
        match &query.cursor {
            None => None,
            Some(c) => Some(decode_cursor(c).ok_or_else(|| {
                ApiError::invalid("cursor", "cursor is not one this server issued")
            })?),
        };
    let filter = AuditFilter {
        org_id: String::new(),
        project_id: None,
        resource_id: query.resource_id,
        action: query
            .action
            .as_deref()
            .map(|name| {
                AuditAction::from_name(name).ok_or_else(|| {
                    ApiError::invalid(
                        "action",
                        format!(
                            "unknown action `{}`; known: {}",
                            name.chars().take(64).collect::<String>(),
                            AuditAction::ALL
                                .iter()
                                .map(|a| a.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })
            })
            .transpose()?,
        from: time_param("from", query.from.as_deref())?,
        to: time_param("to", query.to.as_deref())?,
        after,
        limit: limit + 1,
    };
    let mut rows = state.host.audit_events(principal, filter).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|r| encode_cursor(r.at, &r.id))
    } else {
        None
    };
    Ok(ApiJson(AuditPage {
        data: rows.into_iter().map(render).collect(),
        next_cursor,
    }))
}

fn encode_cursor(at: i64, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{at}:{id}"))
}

fn decode_cursor(text: &str) -> Option<(i64, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
    let (at, id) = text.split_once(':')?;
    Some((at.parse().ok()?, id.to_string()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// RFC 3339 start of the window (default: 30 days ago).
    pub from: Option<String>,
    /// RFC 3339 end of the window, exclusive (default: now).
    pub to: Option<String>,
    /// `sandbox` (default), `project` or `day` (UTC).
    pub group_by: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageLineView {
    /// The sandbox id, project id (null: sandboxes of unrestricted keys) or
    /// UTC day `YYYY-MM-DD`, depending on `groupBy`.
    pub key: Option<String>,
    /// The pricing version the usage is pinned to.
    pub pricing_version: String,
    /// Seconds alive within the window, rounded up per sandbox.
    pub seconds: i64,
    /// vCPUs × seconds.
    pub compute_unit_seconds: i64,
    /// Bytes received through the egress proxy, in the hours of the window.
    pub egress_bytes_in: i64,
    /// Bytes sent through it.
    pub egress_bytes_out: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub from: String,
    pub to: String,
    pub group_by: String,
    pub data: Vec<UsageLineView>,
    pub total_compute_unit_seconds: i64,
}

/// Compute usage of the caller's sandboxes, metered per second in
/// `compute_unit_seconds` (vCPUs × seconds alive). Scope `usage:read`.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorEnvelope)))]
async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<ApiJson<UsageReport>, ApiError> {
    let principal = caller.require("usage:read")?;
    let now = state.host.clock().now_ms();
    let to = time_param("to", query.to.as_deref())?.unwrap_or(now);
    let from = time_param("from", query.from.as_deref())?.unwrap_or(to - 30 * 24 * 60 * 60 * 1000);
    let (group, group_name) = match query.group_by.as_deref() {
        None | Some("sandbox") => (UsageGroup::Sandbox, "sandbox"),
        Some("project") => (UsageGroup::Project, "project"),
        Some("day") => (UsageGroup::Day, "day"),
        Some(other) => {
            return Err(ApiError::invalid(
                "groupBy",
                format!("groupBy must be sandbox, project or day, got `{other}`"),
            ));
        }
    };
    let lines = state.host.usage(principal, from, to, group).await?;
    let total = lines.iter().map(|l| l.compute_unit_seconds).sum();
    Ok(ApiJson(UsageReport {
        from: rfc3339(from),
        to: rfc3339(to),
        group_by: group_name.to_string(),
        data: lines
            .into_iter()
            .map(|l| UsageLineView {
                key: l.group,
                pricing_version: l.pricing_version,
                seconds: l.seconds,
                compute_unit_seconds: l.compute_unit_seconds,
                egress_bytes_in: l.egress_bytes_in,
                egress_bytes_out: l.egress_bytes_out,
            })
            .collect(),
        total_compute_unit_seconds: total,
    }))
}
