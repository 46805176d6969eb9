//! `crownest artifacts create|ls|download`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::transfer::{self, Sink};
use super::{Api, ClientError, Output, print_json, print_table, segment, text};

#[derive(Subcommand)]
pub enum ArtifactsCommand {
    /// Keep a sandbox file as a durable artifact.
    Create {
        sandbox: String,
        /// The file, relative to /workspace or absolute under it.
        path: String,
        /// The artifact's name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the org's artifacts, or one sandbox's.
    Ls {
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Show one artifact (its size, digest, mime type and source).
    Get { id: String },
    /// Download an artifact's bytes to LOCAL (default: its name here), or `-` for stdout.
    Download { id: String, local: Option<String> },
}

pub async fn run(api: &Api, output: Output, command: ArtifactsCommand) -> Result<i32, ClientError> {
    match command {
        ArtifactsCommand::Create {
            sandbox,
            path,
            name,
        } => {
            let mut body = json!({ "path": path });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let artifact = api
                .json(
                    api.request(
                        Method::POST,
                        &format!("/v1/sandboxes/{}/artifacts", segment(&sandbox)),
                    )
                    .json(&body),
                )
                .await?;
            if output.json {
                print_json(&artifact);
            } else {
                show(&artifact);
            }
        }
        ArtifactsCommand::Get { id } => {
            let path = format!("/v1/artifacts/{}", segment(&id));
            let artifact = api.json(api.request(Method::GET, &path)).await?;
            if output.json {
                print_json(&artifact);
            } else {
                show(&artifact);
            }
        }
        ArtifactsCommand::Ls { sandbox } => {
            let path = match &sandbox {
                Some(sandbox) => format!("/v1/sandboxes/{}/artifacts", segment(sandbox)),
                None => String::from("/v1/artifacts"),
            };
            let artifacts = api.list_all(&path).await?;
            if output.json {
                print_json(&json!({ "data": artifacts }));
            } else {
                let rows: Vec<Vec<String>> = artifacts
                    .iter()
                    .map(|a| {
                        vec![
                            text(&a["id"]),
                            text(&a["size"]),
                            text(&a["sandboxId"]),
                            text(&a["createdAt"]),
                            text(&a["name"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "SIZE", "SANDBOX", "CREATED", "NAME"], &rows);
            }
        }
        ArtifactsCommand::Download { id, local } => {
            let artifact_path = format!("/v1/artifacts/{}", segment(&id));
            let sink = match &local {
                Some(local) => Sink::parse(local),
                None => {
                    let artifact = api.json(api.request(Method::GET, &artifact_path)).await?;
                    Sink::File(local_name(&artifact, &id))
                }
            };
            let request = api.request(Method::GET, &format!("{artifact_path}/content"));
            let written = transfer::download(api, request, &sink, &id).await?;
            if let Sink::File(path) = &sink {
                eprintln!("saved {} ({written} bytes)", path.display());
            }
        }
    }
    Ok(0)
}

/// A safe local file name for an artifact: the last component of its
/// name (never a path that leaves the current directory), else its id.
fn local_name(artifact: &Value, id: &str) -> PathBuf {
    artifact["name"]
        .as_str()
        .and_then(|n| Path::new(n).file_name())
        .filter(|n| *n != "." && *n != "..")
        .map_or_else(|| PathBuf::from(id), PathBuf::from)
}

fn show(artifact: &Value) {
    println!("id:       {}", text(&artifact["id"]));
    println!("name:     {}", text(&artifact["name"]));
    println!("size:     {}", text(&artifact["size"]));
    println!("mime:     {}", text(&artifact["mime"]));
    println!("sha256:   {}", text(&artifact["sha256"]));
    println!("sandbox:  {}", text(&artifact["sandboxId"]));
    println!("source:   {}", text(&artifact["sourcePath"]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_never_leave_the_current_directory() {
        assert_eq!(
            local_name(&json!({"name": "../../etc/passwd"}), "art_1"),
            PathBuf::from("passwd")
        );
        assert_eq!(
            local_name(&json!({"name": ".."}), "art_1"),
            PathBuf::from("art_1")
        );
        assert_eq!(local_name(&json!({}), "art_1"), PathBuf::from("art_1"));
    }
}
