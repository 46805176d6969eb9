//! `crownest sandbox create|list|get|kill|timeout|metrics`.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, ClientError, Output, print_json, print_table, segment, text};

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from a template and print it.
    Create {
        /// Template name (`crownest template list` on the server shows them).
        #[arg(long)]
        template: String,
        /// Time to live in milliseconds (the server's default when absent).
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// A JSON object stored with the sandbox.
        #[arg(long, value_parser = parse_object)]
        metadata: Option<Value>,
        /// `NAME=VALUE` for every command and code context of the sandbox
        /// (repeatable); the values are never shown again.
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
    /// List sandboxes, newest first.
    #[command(visible_alias = "ls")]
    List {
        /// Only sandboxes with this status (`running`, `destroyed`, …).
        #[arg(long)]
        status: Option<String>,
        /// Only sandboxes of this template.
        #[arg(long)]
        template: Option<String>,
        /// Only sandboxes whose metadata has K=V (repeatable: all must match).
        #[arg(long = "metadata", value_name = "K=V", value_parser = parse_env)]
        metadata: Vec<(String, String)>,
        /// Only sandboxes created after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        created_after: Option<String>,
        /// Only sandboxes created before this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        created_before: Option<String>,
    },
    /// Show one sandbox (also a destroyed one).
    Get { id: String },
    /// Kill a sandbox.
    #[command(visible_alias = "rm")]
    Kill { id: String },
    /// Set a live sandbox's time to live: it ends TTL_MS from now (longer
    /// or shorter than before, within the server's bounds).
    Timeout {
        id: String,
        /// Milliseconds from now.
        #[arg(long)]
        ttl_ms: u64,
    },
    /// Change a live sandbox's egress policy (within its template's).
    Network {
        id: String,
        /// `none`, `allow` or `open` (only if the template is `open`).
        #[arg(long)]
        mode: Option<String>,
        /// A rule that may be reached (repeatable): `pypi.org`,
        /// `*.pythonhosted.org`, `github.com:443`, `203.0.113.0/24:*`.
        #[arg(long = "allow", value_name = "RULE")]
        allow: Vec<String>,
        /// A rule added to the deny list (repeatable; deny wins).
        #[arg(long = "deny", value_name = "RULE")]
        deny: Vec<String>,
    },
    /// List the templates sandboxes can be created from.
    Templates,
    /// Show a sandbox's CPU, memory, processes and /workspace use;
    /// `--follow` prints a reading every second until the sandbox ends.
    Metrics {
        id: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(String::from("expected NAME=VALUE")),
    }
}

fn parse_object(text: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(String::from("metadata must be a JSON object")),
        Err(e) => Err(format!("metadata is not valid JSON: {e}")),
    }
}

pub async fn run(api: &Api, output: Output, command: SandboxCommand) -> Result<i32, ClientError> {
    match command {
        SandboxCommand::Create {
            template,
            ttl_ms,
            metadata,
            env,
        } => {
            let mut body = json!({ "template": template });
            if !env.is_empty() {
                body["env"] = Value::Object(
                    env.into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                );
            }
            if let Some(ttl) = ttl_ms {
                body["ttlMs"] = json!(ttl);
            }
            if let Some(metadata) = metadata {
                body["metadata"] = metadata;
            }
            let sandbox = api
                .json(api.request(Method::POST, "/v1/sandboxes").json(&body))
                .await?;
            show(output, &sandbox);
        }
        SandboxCommand::List {
            status,
            template,
            metadata,
            created_after,
            created_before,
        } => {
            let mut query: Vec<(String, String)> = Vec::new();
            let named = [
                ("status", status),
                ("template", template),
                ("createdAfter", created_after),
                ("createdBefore", created_before),
            ];
            for (name, value) in named {
                if let Some(value) = value {
                    query.push((name.to_string(), value));
                }
            }
            for (key, value) in metadata {
                query.push((format!("metadata[{key}]"), value));
            }
            let sandboxes = api.list_all_with("/v1/sandboxes", &query).await?;
            if output.json {
                print_json(&json!({ "data": sandboxes }));
            } else {
                let rows: Vec<Vec<String>> = sandboxes
                    .iter()
                    .map(|s| {
                        vec![
                            text(&s["id"]),
                            text(&s["status"]),
                            text(&s["template"]),
                            text(&s["createdAt"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "STATUS", "TEMPLATE", "CREATED"], &rows);
            }
        }
        SandboxCommand::Get { id } => {
            let path = format!("/v1/sandboxes/{}", segment(&id));
            let sandbox = api.json(api.request(Method::GET, &path)).await?;
            show(output, &sandbox);
        }
        SandboxCommand::Kill { id } => {
            let path = format!("/v1/sandboxes/{}", segment(&id));
            let sandbox = api.json(api.request(Method::DELETE, &path)).await?;
            show(output, &sandbox);
        }
        SandboxCommand::Timeout { id, ttl_ms } => {
            let path = format!("/v1/sandboxes/{}/timeout", segment(&id));
            let sandbox = api
                .json(
                    api.request(Method::POST, &path)
                        .json(&json!({ "ttlMs": ttl_ms })),
                )
                .await?;
            show(output, &sandbox);
        }
        SandboxCommand::Network {
            id,
            mode,
            allow,
            deny,
        } => {
            let mut body = json!({});
            if let Some(mode) = mode {
                body["mode"] = json!(mode);
            }
            if !allow.is_empty() {
                body["allow"] = json!(allow);
            }
            if !deny.is_empty() {
                body["deny"] = json!(deny);
            }
            let path = format!("/v1/sandboxes/{}/network", segment(&id));
            let sandbox = api
                .json(api.request(Method::PATCH, &path).json(&body))
                .await?;
            if output.json {
                print_json(&sandbox);
            } else {
                let network = &sandbox["network"];
                println!("mode:  {}", text(&network["mode"]));
                println!("allow: {}", text(&network["allow"]));
                println!("deny:  {}", text(&network["deny"]));
            }
        }
        SandboxCommand::Templates => {
            let list = api.json(api.request(Method::GET, "/v1/templates")).await?;
            if output.json {
                print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        vec![
                            text(&t["name"]),
                            text(&t["runtime"]),
                            text(&t["available"]),
                            text(&t["description"]),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "RUNTIME", "AVAILABLE", "DESCRIPTION"], &rows);
            }
        }
        SandboxCommand::Metrics { id, follow } => {
            let path = format!("/v1/sandboxes/{}/metrics", segment(&id));
            if !follow {
                let metrics = api.json(api.request(Method::GET, &path)).await?;
                show_metrics(output, &metrics);
                return Ok(0);
            }
            let request = api.request(Method::GET, &path).query(&[("stream", "true")]);
            let streaming = super::sse::each(api, request, |event| {
                match event.name.as_str() {
                    "metrics" => show_metrics(output, &event.data),
                    "end" if !output.json => eprintln!("sandbox {}", text(&event.data["status"])),
                    _ => {}
                }
                Ok(event.name != "end")
            });
            tokio::select! {
                streamed = streaming => streamed?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    }
    Ok(0)
}

/// One metrics reading: a JSON line with --json (one per second when
/// followed), else one line of its key numbers.
fn show_metrics(output: Output, metrics: &Value) {
    use std::io::Write;
    if output.json {
        println!("{metrics}");
    } else {
        let mib = |v: &Value| match v.as_u64() {
            Some(bytes) => format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
            None => String::from("-"),
        };
        let percent = match metrics["cpuPercent"].as_f64() {
            Some(p) => format!("{p:.1}%"),
            None => String::from("-"),
        };
        println!(
            "{}  cpu {percent} ({} s)  memory {} / {}  pids {}  workspace {} / {}",
            text(&metrics["timestamp"]),
            text(&metrics["cpuUsageSeconds"]),
            mib(&metrics["memoryUsedBytes"]),
            mib(&metrics["memoryLimitBytes"]),
            text(&metrics["pids"]),
            mib(&metrics["workspaceUsedBytes"]),
            mib(&metrics["workspaceLimitBytes"]),
        );
    }
    let _ = std::io::stdout().flush();
}

/// One sandbox: its key fields, one per line.
fn show(output: Output, sandbox: &Value) {
    if output.json {
        print_json(sandbox);
        return;
    }
    println!("id:        {}", text(&sandbox["id"]));
    println!("status:    {}", text(&sandbox["status"]));
    println!("template:  {}", text(&sandbox["template"]));
    println!("created:   {}", text(&sandbox["createdAt"]));
    println!("expires:   {}", text(&sandbox["expiresAt"]));
    if !sandbox["endedAt"].is_null() {
        println!(
            "ended:     {} ({})",
            text(&sandbox["endedAt"]),
            text(&sandbox["endReason"])
        );
    }
    if sandbox["metadata"]
        .as_object()
        .is_some_and(|m| !m.is_empty())
    {
        println!("metadata:  {}", sandbox["metadata"]);
    }
}
