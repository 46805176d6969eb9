//! `crownest files put|get|ls|mv|rm|exists|watch`: files in a sandbox's
//! /workspace.
//! Files up to 32 MiB go straight through `…/files?path=`; bigger ones
//! through a staged transfer URL (the direct route refuses them).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::sse;
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
    /// Show a file's or directory's metadata (type, size, mode, mtime).
    Stat { sandbox: String, path: String },
    /// Create a directory.
    Mkdir {
        sandbox: String,
        path: String,
        /// Create missing parents; an existing directory is then no error.
        #[arg(long, short = 'p')]
        parents: bool,
    },
    /// Print `true` or `false`: whether PATH exists (a file, a directory
    /// or a symlink). Exits 0 either way.
    Exists { sandbox: String, path: String },
    /// Print changes under a directory (default /workspace) as they
    /// happen, one per line (`create /workspace/a.txt`, `rename OLD -> NEW`),
    /// until Ctrl-C, the directory's removal or the sandbox's end. With
    /// --json each event is a JSON line.
    Watch {
        sandbox: String,
        path: Option<String>,
        /// Watch only the directory itself, not its subdirectories.
        #[arg(long)]
        no_recursive: bool,
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
        FilesCommand::Stat { sandbox, path } => {
            let stat = api
                .json(
                    api.request(Method::GET, &files_path(&sandbox, "/stat"))
                        .query(&[("path", path)]),
                )
                .await?;
            if output.json {
                print_json(&stat);
            } else {
                for field in ["path", "type", "size", "mode", "mtime"] {
                    println!("{:<6} {}", format!("{field}:"), text(&stat[field]));
                }
            }
        }
        FilesCommand::Mkdir {
            sandbox,
            path,
            parents,
        } => {
            let made = api
                .json(
                    api.request(Method::POST, &files_path(&sandbox, "/mkdir"))
                        .json(&json!({ "path": path, "parents": parents })),
                )
                .await?;
            if output.json {
                print_json(&made);
            }
        }
        FilesCommand::Exists { sandbox, path } => {
            let answer = api
                .json(
                    api.request(Method::GET, &files_path(&sandbox, "/exists"))
                        .query(&[("path", path)]),
                )
                .await?;
            if output.json {
                print_json(&answer);
            } else {
                println!("{}", answer["exists"] == true);
            }
        }
        FilesCommand::Watch {
            sandbox,
            path,
            no_recursive,
        } => {
            let request = api
                .request(Method::GET, &files_path(&sandbox, "/watch"))
                .query(&[
                    ("path", path.unwrap_or_else(|| String::from("/workspace"))),
                    ("recursive", (!no_recursive).to_string()),
                ]);
            let watching = sse::each(api, request, |event| {
                print_watch_event(output, event);
                Ok(event.name != "end")
            });
            tokio::select! {
                watched = watching => watched?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    }
    Ok(0)
}

/// One watch event as a line: the change, or what happened to the watch.
fn print_watch_event(output: Output, event: &sse::Event) {
    use std::io::Write;
    if output.json {
        println!("{}", json!({ "event": event.name, "data": event.data }));
    } else {
        let data = &event.data;
        match event.name.as_str() {
            "ready" => eprintln!("watching {}", text(&data["path"])),
            "change" if data["type"] == "rename" && !data["oldPath"].is_null() => println!(
                "rename {} -> {}",
                text(&data["oldPath"]),
                text(&data["path"])
            ),
            "change" => println!("{} {}", text(&data["type"]), text(&data["path"])),
            "overflow" => eprintln!("warning: changes were lost (list the directory again)"),
            "limited" => eprintln!(
                "warning: the watch reached its {} directories; deeper ones are not watched",
                text(&data["maxDirs"])
            ),
            "end" => eprintln!("watch ended: {}", text(&data["reason"])),
            _ => {}
        }
    }
    let _ = std::io::stdout().flush();
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
