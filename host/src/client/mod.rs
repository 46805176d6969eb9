//! The CLI client: `crownest sandbox|exec|code|files|artifacts|previews` talk to a
//! running server over its REST API, with the key in `CROWNEST_API_KEY`.
//!
//! **Invariant:** only HTTP. Nothing here calls into `core`, `store` or the
//! runtimes, so the client sees exactly what any other API client sees and
//! works against a server on another machine.

mod artifacts;
mod code;
mod commands;
mod exec;
mod files;
mod previews;
mod sandboxes;
mod sse;
mod transfer;
mod usage;
mod workspace_runs;

use std::io::Write;

use clap::{Args, Subcommand};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

/// Where the client looks for the server when `CROWNEST_BASE_URL` is unset.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:7420";

/// How a command prints (part of [`Global`]).
#[derive(Args, Clone, Copy)]
pub struct Output {
    /// Print the server's JSON instead of the human output (errors too:
    /// the error envelope on stderr).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Which server, with which key, and the idempotency key to send.
#[derive(Args, Clone, Default)]
pub struct Connection {
    /// The API key (default: $CROWNEST_API_KEY).
    #[arg(long, global = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The server (default: $CROWNEST_BASE_URL, else http://127.0.0.1:7420).
    #[arg(long, global = true, value_name = "URL")]
    pub base_url: Option<String>,
    /// The `Idempotency-Key` of the command's first mutating request; later
    /// ones in the same command get KEY.2, KEY.3, … (default: a fresh
    /// random key per request). Run a command again with the same key and
    /// the server answers with what it answered the first time.
    #[arg(long, global = true, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// Flags every client command takes.
#[derive(Args, Clone)]
pub struct Global {
    #[command(flatten)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

/// The client's top-level commands (flattened into the binary's own).
#[derive(Subcommand)]
pub enum Command {
    /// Create, list, show, extend and kill sandboxes; their live metrics.
    Sandbox {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: sandboxes::SandboxCommand,
    },
    /// Run a command in a sandbox, stream its output and exit with its exit code.
    Exec(exec::ExecArgs),
    /// List, show, follow, cancel and signal a sandbox's commands.
    Commands {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: commands::CommandsCommand,
    },
    /// Run code snippets in a sandbox's Code Contexts; create, list, restart
    /// and remove contexts.
    Code {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: code::CodeCommand,
    },
    /// Copy, list, move, remove and watch files in a sandbox's /workspace.
    Files {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: files::FilesCommand,
    },
    /// Keep files as durable artifacts, list and download them.
    Artifacts {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: artifacts::ArtifactsCommand,
    },
    /// Expose a sandbox port as an authenticated URL, list and close previews.
    Previews {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: previews::PreviewsCommand,
    },
    /// Run a directory as a Workspace Run: pack, upload, start, stream the
    /// output, exit with the command's exit code.
    Run(workspace_runs::RunArgs),
    /// List, show, follow and cancel Workspace Runs; download their evidence.
    WorkspaceRuns {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: workspace_runs::RunsCommand,
    },
    /// Verify a Workspace Run's signed Evidence Bundle (offline with --key).
    Evidence {
        #[command(subcommand)]
        command: workspace_runs::EvidenceCommand,
    },
    /// The org's usage: compute-unit seconds per sandbox, project or day.
    Usage(usage::UsageArgs),
    /// The org's audit log.
    Audit {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: usage::AuditCommand,
    },
}

impl Command {
    /// The flags every client command takes (none for `evidence`).
    fn global(&self) -> Option<&Global> {
        match self {
            Command::Sandbox { global, .. }
            | Command::Commands { global, .. }
            | Command::Code { global, .. }
            | Command::Files { global, .. }
            | Command::Artifacts { global, .. }
            | Command::Previews { global, .. }
            | Command::WorkspaceRuns { global, .. }
            | Command::Audit { global, .. } => Some(global),
            Command::Exec(args) => Some(&args.global),
            Command::Run(args) => Some(&args.global),
            Command::Usage(args) => Some(&args.global),
            Command::Evidence { .. } => None,
        }
    }
}

/// Everything that can stop a client command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "CROWNEST_API_KEY is not set: export a key created with `crownest keys create` on the server, or pass --api-key"
    )]
    MissingKey,
    /// The server answered with its error envelope (or a non-JSON error).
    #[error("{message} ({code})")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// The envelope's `details` (an empty object when it had none).
        details: Value,
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

    /// The error of an `error` event in a stream: its data is the error
    /// envelope.
    pub fn from_event(data: &Value) -> ClientError {
        ClientError::Api {
            status: 0,
            code: text(&data["error"]["code"]),
            message: text(&data["error"]["message"]),
            details: details_of(&data["error"]),
        }
    }

    /// The error as the API's envelope (`--json` prints it on stderr).
    fn envelope(&self) -> Value {
        match self {
            ClientError::Api {
                code,
                message,
                details,
                ..
            } => {
                serde_json::json!({ "error": { "code": code, "message": message, "details": details } })
            }
            other => {
                let code = match other {
                    ClientError::MissingKey => "missing_api_key",
                    ClientError::Http { .. } => "connection_failed",
                    ClientError::Io { .. } => "local_io_error",
                    _ => "invalid_input",
                };
                serde_json::json!({ "error": { "code": code, "message": other.to_string(), "details": {} } })
            }
        }
    }
}

/// An envelope's `details`, an empty object when absent.
fn details_of(error: &Value) -> Value {
    match &error["details"] {
        Value::Null => Value::Object(Default::default()),
        details => details.clone(),
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

/// Exit code of a command that failed before or around what it ran (an
/// API error, a connection failure, bad local input); see README.md
/// "Exit codes".
pub const EXIT_ERROR: i32 = 1;
/// Exit code when Ctrl-C canceled the remote command or detached from it.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Runs a client command and returns the process exit code.
pub fn run(command: Command) -> i32 {
    let json = command.global().is_some_and(|g| g.output.json);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let result = runtime.block_on(dispatch(command));
    // Without waiting for a blocking read of stdin (`exec --stdin` whose
    // command ended before the input did) to finish.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            print_error(&e, json);
            EXIT_ERROR
        }
    }
}

/// `error: MESSAGE (CODE)`, with `; details: {…}` before the code when the
/// server gave any; with `--json` the error envelope instead.
fn print_error(error: &ClientError, json: bool) {
    if json {
        eprintln!("{}", error.envelope());
        return;
    }
    match error {
        // One line that still ends with the code, for scripts that grep it.
        ClientError::Api {
            code,
            message,
            details,
            ..
        } if details.as_object().is_some_and(|d| !d.is_empty()) => {
            eprintln!("error: {message}; details: {details} ({code})");
        }
        other => eprintln!("error: {other}"),
    }
}

async fn dispatch(command: Command) -> Result<i32, ClientError> {
    // Verifying evidence needs no server (or only the one it names).
    let command = match command {
        Command::Evidence { command } => return workspace_runs::evidence(command).await,
        other => other,
    };
    let connection = command
        .global()
        .map(|g| g.connection.clone())
        .unwrap_or_default();
    let api = Api::connect(&connection)?;
    match command {
        Command::Sandbox { global, command } => sandboxes::run(&api, global.output, command).await,
        Command::Exec(args) => exec::run(&api, args).await,
        Command::Commands { global, command } => commands::run(&api, global.output, command).await,
        Command::Code { global, command } => code::run(&api, global.output, command).await,
        Command::Files { global, command } => files::run(&api, global.output, command).await,
        Command::Artifacts { global, command } => {
            artifacts::run(&api, global.output, command).await
        }
        Command::Previews { global, command } => previews::run(&api, global.output, command).await,
        Command::Run(args) => workspace_runs::run(&api, args).await,
        Command::WorkspaceRuns { global, command } => {
            workspace_runs::runs(&api, global.output, command).await
        }
        Command::Usage(args) => usage::usage(&api, args).await,
        Command::Audit { global, command } => usage::audit(&api, global.output, command).await,
        Command::Evidence { .. } => Err(ClientError::Invalid(String::from("unreachable"))),
    }
}

/// Attempts of one request that may be retried (a GET, or a keyed
/// mutation: the server replays or runs it once).
const MAX_ATTEMPTS: u32 = 4;
/// Longest `Retry-After` the client waits out on its own.
const MAX_RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the idempotency keys of one command come from.
enum Keys {
    /// `--idempotency-key`: KEY, then KEY.2, KEY.3, …
    Given { key: String, sent: u32 },
    /// A fresh random key per request.
    Random,
}

/// The server's address and the key to send.
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
    keys: std::sync::Mutex<Keys>,
}

impl Api {
    /// The client of the server the flags (else the environment) name.
    fn connect(connection: &Connection) -> Result<Api, ClientError> {
        let base = connection
            .base_url
            .clone()
            .or_else(|| std::env::var("CROWNEST_BASE_URL").ok())
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        let mut api = Self::for_server_with(base.trim(), connection.api_key.clone())?;
        if let Some(key) = &connection.idempotency_key {
            validate_idempotency_key(key)?;
            api.keys = std::sync::Mutex::new(Keys::Given {
                key: key.clone(),
                sent: 0,
            });
        }
        Ok(api)
    }

    /// The client of the server at `base`, with the key in
    /// CROWNEST_API_KEY.
    fn for_server(base: &str) -> Result<Api, ClientError> {
        Self::for_server_with(base, None)
    }

    fn for_server_with(base: &str, key: Option<String>) -> Result<Api, ClientError> {
        let base = base.to_string();
        let key = key
            .or_else(|| std::env::var("CROWNEST_API_KEY").ok())
            .filter(|k| !k.trim().is_empty())
            .ok_or(ClientError::MissingKey)?;
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(ClientError::Invalid(format!(
                "the base URL `{base}` is not an http:// or https:// URL"
            )));
        }
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
            keys: std::sync::Mutex::new(Keys::Random),
        })
    }

    /// The idempotency key of the next mutating request.
    fn next_idempotency_key(&self) -> String {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *keys {
            Keys::Given { key, sent } => {
                *sent += 1;
                if *sent == 1 {
                    key.clone()
                } else {
                    format!("{key}.{sent}")
                }
            }
            Keys::Random => random_key(),
        }
    }

    /// A request to a path of this server (`/v1/…`), with the key; a
    /// mutating one carries an `Idempotency-Key`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        let builder = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", &self.key);
        if mutating {
            builder.header("idempotency-key", self.next_idempotency_key())
        } else {
            builder
        }
    }

    /// A request to an absolute URL the server handed out (signed transfer
    /// URLs carry their own authorization: the key is not sent).
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`]. A
    /// GET or a keyed request is retried when it could not connect, on
    /// 502/503/504, and on 429 with a short `Retry-After`.
    pub async fn send(&self, builder: RequestBuilder) -> Result<Response, ClientError> {
        let mut request = builder.build().map_err(|source| ClientError::Http {
            url: self.base.clone(),
            source,
        })?;
        let retryable =
            request.method() == Method::GET || request.headers().contains_key("idempotency-key");
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A streamed body cannot be sent twice: no copy, no retry.
            let again = if retryable && attempt < MAX_ATTEMPTS {
                request.try_clone()
            } else {
                None
            };
            let url = request.url().clone();
            let wait = match self.http.execute(request).await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => match retry_wait(&response, attempt) {
                    Some(wait) if again.is_some() => wait,
                    _ => return Err(api_error(response).await),
                },
                Err(source) if source.is_connect() && again.is_some() => backoff(attempt),
                Err(source) => {
                    return Err(ClientError::Http {
                        url: without_query(&url),
                        source,
                    });
                }
            };
            tokio::time::sleep(wait).await;
            match again {
                Some(next) => request = next,
                None => {
                    return Err(ClientError::Invalid(String::from(
                        "a request could not be repeated",
                    )));
                }
            }
        }
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
        self.list_all_with(path, &[]).await
    }

    /// [`Api::list_all`] with query parameters (filters).
    pub async fn list_all_with(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self
                .request(Method::GET, path)
                .query(query)
                .query(&[("limit", "200")]);
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

/// Refuses a `--idempotency-key` the server would refuse, before anything
/// is sent.
fn validate_idempotency_key(key: &str) -> Result<(), ClientError> {
    let ok = !key.is_empty() && key.len() <= 240 && key.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(ClientError::Invalid(String::from(
            "--idempotency-key must be 1 to 240 printable ASCII characters without spaces (the server adds .2, .3, … for a command's later requests, up to its limit of 255)",
        )))
    }
}

/// A fresh random idempotency key (a UUID v4).
fn random_key() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// How long to wait before another attempt after this answer, if it is
/// worth one: 502/503/504 (back off, or its `Retry-After`), 429 only with
/// a `Retry-After` (a quota answer has none: waiting does not help).
fn retry_wait(response: &Response, attempt: u32) -> Option<std::time::Duration> {
    let after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    let wait = match response.status().as_u16() {
        502..=504 => after.unwrap_or_else(|| backoff(attempt)),
        429 => after?,
        _ => return None,
    };
    (wait <= MAX_RETRY_WAIT).then_some(wait)
}

/// 250 ms, 500 ms, 1 s, … after the first, second, third attempt.
fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(250 << attempt.saturating_sub(1).min(6))
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
            details: envelope
                .as_ref()
                .map(|e| details_of(&e["error"]))
                .unwrap_or_default(),
        },
        _ => ClientError::Api {
            status: status.as_u16(),
            details: Value::Object(Default::default()),
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
