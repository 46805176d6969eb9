//! `crownest sandbox create|list|get|kill`.

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
    /// List sandboxes.
    List,
    /// Show one sandbox (also a destroyed one).
    Get { id: String },
    /// Kill a sandbox.
    Kill { id: String },
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
        SandboxCommand::List => {
            let sandboxes = api.list_all("/v1/sandboxes").await?;
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
    }
    Ok(0)
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
