//! `crownest files put|get|ls|mv|rm`: files in a sandbox's /workspace.
//! Files up to 32 MiB go straight through `…/files?path=`; bigger ones
//! through a staged transfer URL (the direct route refuses them).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::transfer::{self, Sink};
use super::{Api, ClientError, Output, print_json, print_table, segment, text};

/// The largest body the direct file route takes (the server's limit).
pub const DIRECT_MAX_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Copy a local file into the sandbox (parents are created).
    Put {
        sandbox: String,
        local: PathBuf,
        remote: String,
    },
    /// Copy a file out of the sandbox to LOCAL (default: its name here), or `-` for stdout.
    Get {
        sandbox: String,
        remote: String,
        local: Option<String>,
    },
    /// List a directory (default /workspace).
    Ls {
        sandbox: String,
        path: Option<String>,
    },
    /// Move or rename a file or directory.
    Mv {
        sandbox: String,
        from: String,
        to: String,
    },
    /// Remove a file, a symlink or a directory.
    Rm {
        sandbox: String,
        path: String,
        /// Remove a non-empty directory and everything in it.
        #[arg(long)]
        recursive: bool,
    },
}

pub async fn run(api: &Api, output: Output, command: FilesCommand) -> Result<i32, ClientError> {
    match command {
        FilesCommand::Put {
            sandbox,
            local,
            remote,
        } => {
            let stat = put(api, &sandbox, &local, &remote).await?;
            if output.json {
                print_json(&stat);
            } else {
                eprintln!(
                    "wrote {} ({} bytes)",
                    text(&stat["path"]),
                    text(&stat["size"])
                );
            }
        }
        FilesCommand::Get {
            sandbox,
            remote,
            local,
        } => {
            let sink = match &local {
                Some(local) => Sink::parse(local),
                None => Sink::File(PathBuf::from(file_name(&remote)?)),
            };
            let written = get(api, &sandbox, &remote, &sink).await?;
            if let Sink::File(path) = &sink {
                eprintln!("saved {} ({written} bytes)", path.display());
            }
        }
        FilesCommand::Ls { sandbox, path } => {
            let mut request = api.request(Method::GET, &files_path(&sandbox, "/list"));
            if let Some(path) = &path {
                request = request.query(&[("path", path)]);
            }
            let listing = api.json(request).await?;
            if output.json {
                print_json(&listing);
            } else {
                let rows: Vec<Vec<String>> = listing["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            text(&e["type"]),
                            text(&e["size"]),
                            text(&e["mtime"]),
                            text(&e["name"]),
                        ]
                    })
                    .collect();
                print_table(&["TYPE", "SIZE", "MODIFIED", "NAME"], &rows);
                if listing["truncated"] == json!(true) {
                    eprintln!("(truncated: the directory has more entries)");
                }
            }
        }
        FilesCommand::Mv { sandbox, from, to } => {
            let moved = api
                .json(
                    api.request(Method::POST, &files_path(&sandbox, "/move"))
                        .json(&json!({ "from": from, "to": to })),
                )
                .await?;
            if output.json {
                print_json(&moved);
            }
        }
        FilesCommand::Rm {
            sandbox,
            path,
            recursive,
        } => {
            let mut query = vec![("path", path)];
            if recursive {
                query.push(("recursive", String::from("true")));
            }
            api.send(
                api.request(Method::DELETE, &files_path(&sandbox, ""))
                    .query(&query),
            )
            .await?;
        }
    }
    Ok(0)
}

fn files_path(sandbox: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{}/files{rest}", segment(sandbox))
}

/// The last component of a remote path, as a local file name.
fn file_name(remote: &str) -> Result<String, ClientError> {
    Path::new(remote)
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            ClientError::Invalid(format!(
                "`{remote}` has no file name: give a LOCAL path or `-`"
            ))
        })
}

/// Uploads a local file; returns the server's stat of the written file.
async fn put(api: &Api, sandbox: &str, local: &Path, remote: &str) -> Result<Value, ClientError> {
    let size = tokio::fs::metadata(local)
        .await
        .map_err(ClientError::io(format!("reading {}", local.display())))?
        .len();
    if size <= DIRECT_MAX_BYTES {
        let request = api
            .request(Method::PUT, &files_path(sandbox, ""))
            .query(&[("path", remote)]);
        return transfer::upload(api, request, local, size, remote).await;
    }
    let ticket = api
        .json(
            api.request(Method::POST, &files_path(sandbox, "/uploads"))
                .json(&json!({ "path": remote, "sizeBytes": size })),
        )
        .await?;
    let url = ticket_url(&ticket)?;
    let answer =
        transfer::upload(api, api.request_url(Method::PUT, url), local, size, remote).await?;
    if answer.is_object() {
        return Ok(answer);
    }
    // The transfer answered without a body: ask for the stat.
    api.json(
        api.request(Method::GET, &files_path(sandbox, "/stat"))
            .query(&[("path", remote)]),
    )
    .await
}

/// Downloads a remote file into `sink`; returns the bytes written.
async fn get(api: &Api, sandbox: &str, remote: &str, sink: &Sink) -> Result<u64, ClientError> {
    let stat = api
        .json(
            api.request(Method::GET, &files_path(sandbox, "/stat"))
                .query(&[("path", remote)]),
        )
        .await?;
    let size = stat["size"].as_u64().unwrap_or(0);
    if size <= DIRECT_MAX_BYTES {
        let request = api
            .request(Method::GET, &files_path(sandbox, ""))
            .query(&[("path", remote)]);
        return transfer::download(api, request, sink, remote).await;
    }
    let ticket = api
        .json(
            api.request(Method::POST, &files_path(sandbox, "/downloads"))
                .json(&json!({ "path": remote })),
        )
        .await?;
    let url = ticket_url(&ticket)?;
    transfer::download(api, api.request_url(Method::GET, url), sink, remote).await
}

fn ticket_url(ticket: &Value) -> Result<&str, ClientError> {
    ticket["url"]
        .as_str()
        .ok_or_else(|| ClientError::Invalid(String::from("the transfer ticket has no url")))
}
