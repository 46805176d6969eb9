//! The CLI client: `crownest sandbox|exec|code|files|artifacts|previews` talk to a
//! running server over its REST API, with the key in `CROWNEST_API_KEY`.
//!
//! **Invariant:** only HTTP. Nothing here calls into `core`, `store` or the
//! runtimes, so the client sees exactly what any other API client sees and
//! works against a server on another machine.

mod artifacts;
mod code;
mod exec;
mod files;
mod previews;
mod sandboxes;
mod sse;
mod transfer;
mod workspace_runs;

use std::io::Write;

use clap::{Args, Subcommand};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

/// Where the client looks for the server when `CROWNEST_BASE_URL` is unset.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:7420";

/// Flags every client command takes.
#[derive(Args, Clone, Copy)]
pub struct Output {
    /// Print the server's JSON instead of the human output.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client's top-level commands (flattened into the binary's own).
#[derive(Subcommand)]
pub enum Command {
    /// Create, list, show and kill sandboxes (client: needs CROWNEST_API_KEY).
    Sandbox {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: sandboxes::SandboxCommand,
    },
    /// Run a command in a sandbox, stream its output and exit with its exit code.
    Exec(exec::ExecArgs),
    /// Run code snippets in a sandbox's Code Context.
    Code {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: code::CodeCommand,
    },
    /// Copy, list, move and remove files in a sandbox's /workspace.
    Files {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: files::FilesCommand,
    },
    /// Keep files as durable artifacts, list and download them.
    Artifacts {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: artifacts::ArtifactsCommand,
    },
    /// Expose a sandbox port as an authenticated URL, list and close previews.
    Previews {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: previews::PreviewsCommand,
    },
    /// Run a directory as a Workspace Run: pack, upload, start, stream the
    /// output, exit with the command's exit code.
    Run(workspace_runs::RunArgs),
    /// List, show, follow and cancel Workspace Runs; download their evidence.
    WorkspaceRuns {
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: workspace_runs::RunsCommand,
    },
    /// Verify a Workspace Run's signed Evidence Bundle (offline with --key).
    Evidence {
        #[command(subcommand)]
        command: workspace_runs::EvidenceCommand,
    },
}

/// Everything that can stop a client command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "CROWNEST_API_KEY is not set: export a key created with `crownest keys create` on the server"
    )]
    MissingKey,
    /// The server answered with its error envelope (or a non-JSON error).
    #[error("{message} ({code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("request to {url} failed: {}", chain(.source))]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
        let context = context.into();
        move |source| ClientError::Io { context, source }
    }
}

/// The error and its causes on one line (reqwest's own message alone says
/// little: "error sending request").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs a client command and returns the process exit code.
pub fn run(command: Command) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {e}");
            1
        }
    }
}

async fn dispatch(command: Command) -> Result<i32, ClientError> {
    // Verifying evidence needs no server (or only the one it names).
    let command = match command {
        Command::Evidence { command } => return workspace_runs::evidence(command).await,
        other => other,
    };
    let api = Api::from_env()?;
    match command {
        Command::Sandbox { output, command } => sandboxes::run(&api, output, command).await,
        Command::Exec(args) => exec::run(&api, args).await,
        Command::Code { output, command } => code::run(&api, output, command).await,
        Command::Files { output, command } => files::run(&api, output, command).await,
        Command::Artifacts { output, command } => artifacts::run(&api, output, command).await,
        Command::Previews { output, command } => previews::run(&api, output, command).await,
        Command::Run(args) => workspace_runs::run(&api, args).await,
        Command::WorkspaceRuns { output, command } => {
            workspace_runs::runs(&api, output, command).await
        }
        Command::Evidence { .. } => Err(ClientError::Invalid(String::from("unreachable"))),
    }
}

/// The server's address and the key to send.
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn from_env() -> Result<Api, ClientError> {
        let base = std::env::var("CROWNEST_BASE_URL")
            .ok()
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        Self::for_server(&base)
    }

    /// The client of the server at `base`, with the key in
    /// CROWNEST_API_KEY.
    fn for_server(base: &str) -> Result<Api, ClientError> {
        let base = base.to_string();
        let key = std::env::var("CROWNEST_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
            .ok_or(ClientError::MissingKey)?;
        // No overall timeout: log streams and transfers last as long as
        // they last; idle streams are watched by their readers.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.trim().to_string(),
        })
    }

    /// A request to a path of this server (`/v1/…`), with the key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", &self.key)
    }

    /// A request to an absolute URL the server handed out (signed transfer
    /// URLs carry their own authorization: the key is not sent).
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn send(&self, builder: RequestBuilder) -> Result<Response, ClientError> {
        let request = builder.build().map_err(|source| ClientError::Http {
            url: self.base.clone(),
            source,
        })?;
        let url = request.url().clone();
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|source| ClientError::Http {
                url: without_query(&url),
                source,
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(api_error(response).await)
    }

    /// Sends a request and parses the JSON answer (`null` for no body).
    pub async fn json(&self, builder: RequestBuilder) -> Result<Value, ClientError> {
        let response = self.send(builder).await?;
        let url = without_query(response.url());
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Http { url, source })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Invalid(format!("the server's answer is not JSON: {e}")))
    }

    /// Follows `nextCursor` and returns every item of a paginated list.
    pub async fn list_all(&self, path: &str) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self.request(Method::GET, path).query(&[("limit", "200")]);
            if let Some(c) = &cursor {
                request = request.query(&[("cursor", c)]);
            }
            let page = self.json(request).await?;
            if let Some(data) = page["data"].as_array() {
                items.extend(data.iter().cloned());
            }
            match page["nextCursor"].as_str() {
                Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
                _ => return Ok(items),
            }
        }
    }
}

/// URLs in messages without their query: a signed transfer URL's token
/// stays out of terminals and logs.
fn without_query(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    if url.path().starts_with("/v1/transfers/") {
        url.set_path("/v1/transfers/redacted");
    }
    url.to_string()
}

/// Reads the error envelope `{"error":{"code","message"}}` of a failed
/// answer; anything else keeps the status and the start of the body.
async fn api_error(response: Response) -> ClientError {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let envelope: Option<Value> = serde_json::from_str(&text).ok();
    let field = |name: &str| {
        envelope
            .as_ref()
            .and_then(|e| e["error"][name].as_str())
            .map(str::to_string)
    };
    match (field("code"), field("message")) {
        (Some(code), Some(message)) => ClientError::Api {
            status: status.as_u16(),
            code,
            message,
        },
        _ => ClientError::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: if text.trim().is_empty() {
                status.to_string()
            } else {
                text.trim().chars().take(300).collect()
            },
        },
    }
}

/// Percent-encodes one path segment (ids typed by the user go into URLs).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Prints a JSON value, pretty, on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A field as text for tables: strings bare, null as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => String::from("-"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints rows as a compact table: each column as wide as its widest cell,
/// the last column unpadded.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_encodes_everything_but_unreserved_characters() {
        assert_eq!(segment("sbx_AZ09-.~"), "sbx_AZ09-.~");
        assert_eq!(segment("a/b c?"), "a%2Fb%20c%3F");
    }

    #[test]
    fn transfer_tokens_are_kept_out_of_messages() {
        let url = reqwest::Url::parse("http://h:1/v1/transfers/secret?x=1").expect("url");
        assert_eq!(without_query(&url), "http://h:1/v1/transfers/redacted");
    }
}
