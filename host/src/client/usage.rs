//! `crownest usage` and `crownest audit ls`: what the org used and what
//! was done in it.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, ClientError, Global, Output, print_json, print_table, text};

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub global: Global,
    /// Start of the window, RFC 3339 (default: 30 days ago).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// End of the window, RFC 3339, exclusive (default: now).
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// `sandbox` (default), `project` or `day` (UTC).
    #[arg(long, value_name = "BY")]
    group_by: Option<String>,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// List audit events, newest first.
    #[command(visible_alias = "list")]
    Ls {
        /// Only events about this resource (`sbx_…`, `cmd_…`, `key_…`).
        #[arg(long, value_name = "ID")]
        resource: Option<String>,
        /// Only this action, e.g. `sandbox.create`, `command.run`.
        #[arg(long)]
        action: Option<String>,
        /// Events at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Events before this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// At most this many events (pages are followed to reach it).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: u64,
    },
}

pub async fn usage(api: &Api, args: UsageArgs) -> Result<i32, ClientError> {
    let query = present(&[
        ("from", args.from),
        ("to", args.to),
        ("groupBy", args.group_by),
    ]);
    let report = api
        .json(api.request(Method::GET, "/v1/usage").query(&query))
        .await?;
    if args.global.output.json {
        print_json(&report);
        return Ok(0);
    }
    println!(
        "{} to {}, by {}: {} compute-unit seconds",
        text(&report["from"]),
        text(&report["to"]),
        text(&report["groupBy"]),
        text(&report["totalComputeUnitSeconds"])
    );
    let rows: Vec<Vec<String>> = report["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|line| {
            vec![
                text(&line["key"]),
                text(&line["computeUnitSeconds"]),
                text(&line["seconds"]),
                text(&line["egressBytesIn"]),
                text(&line["egressBytesOut"]),
            ]
        })
        .collect();
    print_table(
        &["KEY", "CU-SECONDS", "SECONDS", "EGRESS-IN", "EGRESS-OUT"],
        &rows,
    );
    Ok(0)
}

pub async fn audit(api: &Api, output: Output, command: AuditCommand) -> Result<i32, ClientError> {
    let AuditCommand::Ls {
        resource,
        action,
        from,
        to,
        limit,
    } = command;
    let filters = present(&[
        ("resourceId", resource),
        ("action", action),
        ("from", from),
        ("to", to),
    ]);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut events: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    while events.len() < limit {
        let page_size = (limit - events.len()).min(200).to_string();
        let mut request = api
            .request(Method::GET, "/v1/audit-events")
            .query(&filters)
            .query(&[("limit", page_size)]);
        if let Some(c) = &cursor {
            request = request.query(&[("cursor", c)]);
        }
        let page = api.json(request).await?;
        events.extend(page["data"].as_array().into_iter().flatten().cloned());
        match page["nextCursor"].as_str() {
            Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    events.truncate(limit);
    if output.json {
        print_json(&json!({ "data": events }));
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                text(&e["at"]),
                text(&e["action"]),
                text(&e["outcome"]),
                text(&e["resourceId"]),
                text(&e["actorKeyId"]),
            ]
        })
        .collect();
    print_table(&["AT", "ACTION", "OUTCOME", "RESOURCE", "KEY"], &rows);
    Ok(0)
}

/// The query pairs whose values were given.
fn present(pairs: &[(&str, Option<String>)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name.to_string(), v)))
        .collect()
}
