//! `crownest run DIR -- CMD…`, `crownest workspace-runs …` and
//! `crownest evidence verify`: Workspace Runs from the command line.
//!
//! `run` packs the directory itself (`.gitignore` rules respected, `.git`
//! left out unless asked), uploads it (direct up to 32 MiB, staged above),
//! starts the run, streams its output live (resuming after the last seq
//! when the connection drops), prints the end and the artifact ids, and
//! exits with the command's exit code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::exec::{parse_env, shell_quote};
use super::files::DIRECT_MAX_BYTES;
use super::sse::Parser;
use super::{Api, ClientError, Global, Output, print_json, print_table, segment, text, transfer};
use crownest::evidence;

/// A stream silent this long counts as dropped (keep-alives come every 15 s).
const IDLE: Duration = Duration::from_secs(45);
/// Reconnections in a row without a new event before giving up.
const MAX_RETRIES: u32 = 8;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub global: Global,
    /// The directory to run (its contents become /workspace).
    dir: PathBuf,
    /// Template (default: the server's, `python-node`).
    #[arg(long)]
    template: Option<String>,
    /// A file to keep as an artifact, relative to the directory (repeatable).
    #[arg(long = "collect", value_name = "PATH")]
    collect: Vec<String>,
    /// End the run as failed (`timeout`) after this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// An environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Metadata kept with the run (repeatable).
    #[arg(long = "metadata", value_name = "K=V", value_parser = parse_env)]
    metadata: Vec<(String, String)>,
    /// Keep the sandbox after the run.
    #[arg(long)]
    keep_sandbox: bool,
    /// Write the signed Evidence Bundle here.
    #[arg(long, value_name = "FILE")]
    evidence: Option<PathBuf>,
    /// Pack `.git` too.
    #[arg(long)]
    include_git: bool,
    /// The command and its arguments, after `--` (shell-quoted).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    Ls {
        #[arg(long)]
        status: Option<String>,
        /// Only runs whose metadata has K=V (repeatable).
        #[arg(long = "metadata", value_name = "K=V", value_parser = parse_env)]
        metadata: Vec<(String, String)>,
    },
    /// Show one run.
    Get { id: String },
    /// Print a run's events (`--follow`: stream them until the end).
    Events {
        id: String,
        #[arg(long, default_value_t = 0)]
        after_seq: i64,
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a run.
    Cancel { id: String },
    /// Download a run's Evidence Bundle (stdout, or `-o FILE`).
    Evidence {
        id: String,
        #[arg(short = 'o', long = "output")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum EvidenceCommand {
    /// Check a bundle's signature and, given the artifacts, their digests.
    Verify {
        /// The bundle (JSON, as `GET …/evidence` serves it).
        bundle: PathBuf,
        /// The public key, base64 of its 32 bytes.
        #[arg(long, conflicts_with = "server")]
        key: Option<String>,
        /// Fetch the keys from this server's `GET /v1/evidence-keys`
        /// (with CROWNEST_API_KEY).
        #[arg(long)]
        server: Option<String>,
        /// An artifact file to check against the bundle: NAME_OR_ID=FILE
        /// (repeatable).
        #[arg(long = "artifact", value_name = "NAME_OR_ID=FILE", value_parser = parse_env)]
        artifacts: Vec<(String, String)>,
    },
}

/// A packed archive on disk.
struct Packed {
    path: PathBuf,
    size: u64,
    sha256: String,
    files: u64,
}

impl Drop for Packed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Packs `dir` as a gzipped tar into a temp file: regular files,
/// directories and symlinks (as links), paths relative to `dir`,
/// `.gitignore` rules respected, `.git` left out unless `include_git`.
fn pack(dir: &Path, include_git: bool) -> Result<Packed, ClientError> {
    let meta =
        std::fs::metadata(dir).map_err(ClientError::io(format!("reading {}", dir.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let path =
        std::env::temp_dir().join(format!("crownest-run-{:016x}.tgz", rand::random::<u64>()));
    let file = std::fs::File::create(&path)
        .map_err(ClientError::io(format!("creating {}", path.display())))?;
    let mut packed = Packed {
        path,
        size: 0,
        sha256: String::new(),
        files: 0,
    };
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let walker = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .ignore(false)
        .parents(false)
        .follow_links(false)
        .filter_entry(move |e| include_git || e.file_name() != ".git")
        .build();
    let io = |what: &Path| ClientError::io(format!("packing {}", what.display()));
    for entry in walker {
        let entry =
            entry.map_err(|e| ClientError::Invalid(format!("walking {}: {e}", dir.display())))?;
        let full = entry.path();
        let Ok(relative) = full.strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            tar.append_dir(relative, full).map_err(io(full))?;
        } else if kind.is_file() || kind.is_symlink() {
            tar.append_path_with_name(full, relative)
                .map_err(io(full))?;
            packed.files += 1;
        }
    }
    let gz = tar.into_inner().map_err(io(dir))?;
    let file = gz.finish().map_err(io(dir))?;
    file.sync_all().map_err(io(dir))?;
    drop(file);
    (packed.size, packed.sha256) = digest_file(&packed.path)?;
    Ok(packed)
}

pub async fn run(api: &Api, args: RunArgs) -> Result<i32, ClientError> {
    let dir = args.dir.clone();
    let include_git = args.include_git;
    let packed = tokio::task::spawn_blocking(move || pack(&dir, include_git))
        .await
        .map_err(|e| ClientError::Invalid(format!("packing: {e}")))??;
    eprintln!(
        "packed {} files from {} ({} bytes, sha256 {})",
        packed.files,
        args.dir.display(),
        packed.size,
        &packed.sha256[..12]
    );
    let command = args
        .command
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let mut body = json!({
        "command": command,
        "archive": { "sizeBytes": packed.size, "sha256": packed.sha256 },
        "artifacts": args.collect.iter().map(|p| json!({ "path": p })).collect::<Vec<_>>(),
        "keepSandbox": args.keep_sandbox,
    });
    if let Some(template) = &args.template {
        body["template"] = json!(template);
    }
    if let Some(timeout) = args.timeout_ms {
        body["timeoutMs"] = json!(timeout);
    }
    if !args.env.is_empty() {
        body["env"] = args
            .env
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
    }
    if !args.metadata.is_empty() {
        body["metadata"] = args
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
    }
    let created = api
        .json(api.request(Method::POST, "/v1/workspace-runs").json(&body))
        .await?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| ClientError::Invalid(format!("the server's answer has no id: {created}")))?
        .to_string();
    let base = format!("/v1/workspace-runs/{}", segment(&id));
    eprintln!("workspace run {id}");
    if packed.size <= DIRECT_MAX_BYTES {
        let request = api.request(Method::PUT, &format!("{base}/archive"));
        transfer::upload(api, request, &packed.path, packed.size, "archive").await?;
    } else {
        let ticket = api
            .json(api.request(Method::POST, &format!("{base}/archive/uploads")))
            .await?;
        let url = ticket["url"]
            .as_str()
            .ok_or_else(|| ClientError::Invalid(format!("no upload url in {ticket}")))?;
        let request = api.request_url(Method::PUT, url);
        transfer::upload(api, request, &packed.path, packed.size, "archive").await?;
    }
    drop(packed);
    api.json(api.request(Method::POST, &format!("{base}/start")))
        .await?;
    let terminal = follow(api, &format!("{base}/events"), 0, !args.global.output.json).await?;
    let run = api.json(api.request(Method::GET, &base)).await?;
    if let Some(path) = &args.evidence {
        let document = wait_for_evidence(api, &base).await?;
        std::fs::write(path, &document)
            .map_err(ClientError::io(format!("writing {}", path.display())))?;
        eprintln!("evidence written to {}", path.display());
    }
    if args.global.output.json {
        print_json(&run);
    } else {
        summarize(&run);
    }
    Ok(exit_code(&terminal))
}

/// The bundle, once written (it follows the terminal event shortly).
async fn wait_for_evidence(api: &Api, base: &str) -> Result<Vec<u8>, ClientError> {
    let mut delay = Duration::from_millis(100);
    for _ in 0..40 {
        match api
            .send(api.request(Method::GET, &format!("{base}/evidence")))
            .await
        {
            Ok(response) => {
                return response
                    .bytes()
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|source| ClientError::Http {
                        url: base.to_string(),
                        source,
                    });
            }
            Err(ClientError::Api { code, .. }) if code == "evidence_not_ready" => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Invalid(String::from(
        "the run ended but its evidence is still not ready",
    )))
}

fn summarize(run: &Value) {
    let reason = match run["reason"].as_str() {
        Some(r) => format!(" ({r})"),
        None => String::new(),
    };
    eprintln!(
        "run {}: {}{} exit code {}",
        text(&run["id"]),
        text(&run["status"]),
        reason,
        text(&run["exitCode"])
    );
    for item in run["collected"].as_array().into_iter().flatten() {
        match item["artifactId"].as_str() {
            Some(id) => eprintln!(
                "artifact {} {} ({} bytes)",
                id,
                text(&item["path"]),
                text(&item["sizeBytes"])
            ),
            None => eprintln!(
                "artifact {} not collected: {}",
                text(&item["path"]),
                text(&item["error"])
            ),
        }
    }
}

/// The exit code for a run's terminal event: the command's exit code
/// when it ran to its end, 130 when canceled, 1 otherwise.
fn exit_code(terminal: &Value) -> i32 {
    match terminal["status"].as_str() {
        Some("succeeded") => 0,
        Some("canceled") => 130,
        _ => match (terminal["reason"].as_str(), terminal["exitCode"].as_i64()) {
            (Some("exit_code"), Some(code)) if code != 0 => code.clamp(1, 255) as i32,
            _ => 1,
        },
    }
}

/// Streams events after `after` until `terminal` (returned), resuming
/// after the last seq seen when the connection drops. With `echo`,
/// stdout/stderr go to the terminal and other events to stderr as notes.
async fn follow(api: &Api, path: &str, after: i64, echo: bool) -> Result<Value, ClientError> {
    let mut last = after;
    let mut failures = 0;
    loop {
        let before = last;
        let dropped = match stream_once(api, path, &mut last, echo).await {
            Ok(Some(terminal)) => return Ok(terminal),
            Ok(None) => None,
            Err(e @ ClientError::Http { .. }) => Some(e),
            Err(e) => return Err(e),
        };
        failures = if last != before { 0 } else { failures + 1 };
        if failures >= MAX_RETRIES {
            return Err(dropped.unwrap_or_else(|| {
                ClientError::Invalid(String::from("the run's event stream kept dropping"))
            }));
        }
        tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
    }
}

async fn stream_once(
    api: &Api,
    path: &str,
    last: &mut i64,
    echo: bool,
) -> Result<Option<Value>, ClientError> {
    let request = api
        .request(Method::GET, path)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .header("last-event-id", last.to_string());
    let response = api.send(request).await?;
    let mut body = response.bytes_stream();
    let mut parser = Parser::default();
    loop {
        let chunk = match tokio::time::timeout(IDLE, body.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(Err(source))) => {
                return Err(ClientError::Http {
                    url: path.to_string(),
                    source,
                });
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        for event in parser.push(&chunk) {
            let Some(seq) = event.id.as_deref().and_then(|i| i.parse::<i64>().ok()) else {
                // An error of the stream itself (not of the run's log).
                if event.name == "error" {
                    return Err(ClientError::from_event(&event.data));
                }
                continue;
            };
            if seq <= *last {
                continue;
            }
            *last = seq;
            if echo {
                show(&event.name, &event.data["data"])?;
            }
            if event.name == "terminal" {
                return Ok(Some(event.data["data"].clone()));
            }
        }
    }
}

/// Shows one run event on the terminal.
fn show(kind: &str, data: &Value) -> Result<(), ClientError> {
    let write = |out: &mut dyn Write, text: &str| {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(ClientError::io("writing the run's output"))
    };
    match kind {
        "stdout" => write(
            &mut std::io::stdout().lock(),
            data["data"].as_str().unwrap_or_default(),
        ),
        "stderr" => write(
            &mut std::io::stderr().lock(),
            data["data"].as_str().unwrap_or_default(),
        ),
        "status" => {
            eprintln!("== {}", text(&data["status"]));
            Ok(())
        }
        "archive_progress" if data["done"].as_bool() == Some(true) => {
            eprintln!(
                "== unpacked {} entries ({} bytes)",
                text(&data["entries"]),
                text(&data["bytes"])
            );
            for skipped in data["skipped"].as_array().into_iter().flatten() {
                eprintln!(
                    "== skipped {}: {}",
                    text(&skipped["path"]),
                    text(&skipped["reason"])
                );
            }
            Ok(())
        }
        "artifact_collected" => {
            eprintln!(
                "== collected {} as {}",
                text(&data["path"]),
                text(&data["artifactId"])
            );
            Ok(())
        }
        "artifact_error" => {
            eprintln!(
                "== not collected {}: {}",
                text(&data["path"]),
                text(&data["message"])
            );
            Ok(())
        }
        "error" => {
            eprintln!(
                "== error {}: {}",
                text(&data["code"]),
                text(&data["message"])
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

pub async fn runs(api: &Api, output: Output, command: RunsCommand) -> Result<i32, ClientError> {
    match command {
        RunsCommand::Ls { status, metadata } => {
            let mut query: Vec<(String, String)> =
                vec![(String::from("limit"), String::from("200"))];
            if let Some(status) = status {
                query.push((String::from("status"), status));
            }
            for (k, v) in metadata {
                query.push((format!("metadata.{k}"), v));
            }
            let page = api
                .json(api.request(Method::GET, "/v1/workspace-runs").query(&query))
                .await?;
            if output.json {
                print_json(&page);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = page["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        text(&r["id"]),
                        text(&r["status"]),
                        text(&r["reason"]),
                        text(&r["exitCode"]),
                        text(&r["createdAt"]),
                        text(&r["command"]),
                    ]
                })
                .collect();
            print_table(
                &["ID", "STATUS", "REASON", "EXIT", "CREATED", "COMMAND"],
                &rows,
            );
            Ok(0)
        }
        RunsCommand::Get { id } => {
            let run = api
                .json(api.request(Method::GET, &format!("/v1/workspace-runs/{}", segment(&id))))
                .await?;
            if output.json {
                print_json(&run);
            } else {
                summarize(&run);
            }
            Ok(0)
        }
        RunsCommand::Events {
            id,
            after_seq,
            follow: live,
        } => {
            let path = format!("/v1/workspace-runs/{}/events", segment(&id));
            if live {
                let terminal = follow(api, &path, after_seq, true).await?;
                return Ok(exit_code(&terminal));
            }
            let mut after = after_seq;
            loop {
                let page = api
                    .json(api.request(Method::GET, &path).query(&[
                        ("afterSeq", after.to_string()),
                        ("limit", String::from("1000")),
                    ]))
                    .await?;
                let events = page["data"].as_array().cloned().unwrap_or_default();
                for event in &events {
                    println!("{event}");
                }
                let next = page["nextAfterSeq"].as_i64().unwrap_or(after);
                if events.is_empty() || next <= after {
                    return Ok(0);
                }
                after = next;
            }
        }
        RunsCommand::Cancel { id } => {
            let run = api
                .json(api.request(
                    Method::POST,
                    &format!("/v1/workspace-runs/{}/cancel", segment(&id)),
                ))
                .await?;
            if output.json {
                print_json(&run);
            } else {
                summarize(&run);
            }
            Ok(0)
        }
        RunsCommand::Evidence { id, file } => {
            let base = format!("/v1/workspace-runs/{}", segment(&id));
            let response = api
                .send(api.request(Method::GET, &format!("{base}/evidence")))
                .await?;
            let bytes = response.bytes().await.map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
            match file {
                Some(path) => std::fs::write(&path, &bytes)
                    .map_err(ClientError::io(format!("writing {}", path.display())))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)
                        .and_then(|()| out.write_all(b"\n"))
                        .map_err(ClientError::io("writing to stdout"))?;
                }
            }
            Ok(0)
        }
    }
}

/// `crownest evidence verify`: exit 0 when everything checked matches,
/// 1 naming the first mismatch.
pub async fn evidence(command: EvidenceCommand) -> Result<i32, ClientError> {
    let EvidenceCommand::Verify {
        bundle,
        key,
        server,
        artifacts,
    } = command;
    let document =
        std::fs::read(&bundle).map_err(ClientError::io(format!("reading {}", bundle.display())))?;
    let keys = match (key, server) {
        (Some(key), _) => {
            vec![evidence::public_key_from_base64(&key).map_err(ClientError::Invalid)?]
        }
        (None, Some(server)) => {
            let api = Api::for_server(&server)?;
            let answer = api
                .json(api.request(Method::GET, "/v1/evidence-keys"))
                .await?;
            serde_json::from_value::<Vec<evidence::PublicKey>>(answer["data"].clone()).map_err(
                |e| ClientError::Invalid(format!("the server's keys are unreadable: {e}")),
            )?
        }
        (None, None) => {
            return Err(ClientError::Invalid(String::from(
                "give the public key with --key BASE64, or --server URL to fetch it",
            )));
        }
    };
    let (value, key_id) = match evidence::verify(&document, &keys) {
        Ok(checked) => checked,
        Err(e) => {
            eprintln!("FAILED: {}: {e}", bundle.display());
            return Ok(1);
        }
    };
    println!(
        "signature ok: run {} ({}), signed by key {key_id}",
        text(&value["runId"]),
        text(&value["status"])
    );
    let listed = value["artifacts"].as_array().cloned().unwrap_or_default();
    for (which, file) in artifacts {
        let Some(entry) = listed.iter().find(|a| {
            a["artifactId"].as_str() == Some(which.as_str())
                || a["name"].as_str() == Some(which.as_str())
        }) else {
            eprintln!("FAILED: the bundle has no artifact named or with id `{which}`");
            return Ok(1);
        };
        let (size, digest) = digest_file(Path::new(&file))?;
        let want_size = entry["sizeBytes"].as_u64();
        let want_digest = entry["sha256"].as_str().unwrap_or_default();
        if want_size != Some(size) {
            eprintln!(
                "FAILED: artifact `{which}` ({file}) is {size} bytes; the bundle says {}",
                text(&entry["sizeBytes"])
            );
            return Ok(1);
        }
        if digest != want_digest {
            eprintln!(
                "FAILED: artifact `{which}` ({file}) has SHA-256 {digest}; the bundle says {want_digest}"
            );
            return Ok(1);
        }
        println!(
            "artifact ok: {which} = {file} ({size} bytes, sha256 {})",
            &digest[..16]
        );
    }
    Ok(0)
}

fn digest_file(path: &Path) -> Result<(u64, String), ClientError> {
    let mut file = std::fs::File::open(path)
        .map_err(ClientError::io(format!("reading {}", path.display())))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher)
        .map_err(ClientError::io(format!("reading {}", path.display())))?;
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_respects_gitignore_and_skips_git() {
        let dir = std::env::temp_dir().join(format!("cn-pack-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("src")).expect("mkdir");
        std::fs::create_dir_all(dir.join(".git")).expect("mkdir");
        std::fs::create_dir_all(dir.join("node_modules/x")).expect("mkdir");
        std::fs::write(dir.join(".gitignore"), "node_modules/\n*.log\n!keep.log\n").expect("write");
        std::fs::write(dir.join("src/main.py"), "print(1)\n").expect("write");
        std::fs::write(dir.join("debug.log"), "x").expect("write");
        std::fs::write(dir.join("keep.log"), "x").expect("write");
        std::fs::write(dir.join(".git/HEAD"), "ref").expect("write");
        std::fs::write(dir.join("node_modules/x/a.js"), "x").expect("write");
        let names = |include_git: bool| {
            let packed = pack(&dir, include_git).expect("pack");
            let file = std::fs::File::open(&packed.path).expect("open");
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
            let mut names: Vec<String> = archive
                .entries()
                .expect("entries")
                .map(|e| {
                    e.expect("entry")
                        .path()
                        .expect("path")
                        .display()
                        .to_string()
                })
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(false),
            [".gitignore", "keep.log", "src", "src/main.py"]
        );
        assert!(names(true).contains(&String::from(".git/HEAD")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_exit_code_follows_the_terminal_event() {
        assert_eq!(exit_code(&json!({"status": "succeeded", "exitCode": 0})), 0);
        assert_eq!(
            exit_code(&json!({"status": "failed", "reason": "exit_code", "exitCode": 3})),
            3
        );
        assert_eq!(
            exit_code(&json!({"status": "failed", "reason": "timeout"})),
            1
        );
        assert_eq!(
            exit_code(&json!({"status": "canceled", "reason": "canceled"})),
            130
        );
    }
}
