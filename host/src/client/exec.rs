//! `crownest exec SBX -- CMD…`: starts a background command, streams its
//! log live (resuming with `Last-Event-ID` when the connection drops) and
//! exits with the command's exit code.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use super::sse::{Event, Parser};
use super::{Api, ClientError, EXIT_INTERRUPTED, Global, print_json, segment, text};

/// How long a log stream may stay silent before it counts as dropped (the
/// server sends a keep-alive every 15 s).
const IDLE: Duration = Duration::from_secs(45);
/// Reconnections in a row without a new event before giving up.
const MAX_RETRIES: u32 = 8;

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub global: Global,
    /// The sandbox (`sbx_…`).
    sandbox: String,
    /// Working directory, relative to /workspace or absolute under it.
    #[arg(long)]
    cwd: Option<String>,
    /// An environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Kill the command after this many milliseconds (ends `timed_out`).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Keep a file as an artifact when the command ends: PATH (relative to
    /// /workspace) or PATH:NAME (repeatable). What became of each is
    /// printed on stderr (in the record with --json).
    #[arg(long = "collect", value_name = "PATH[:NAME]", value_parser = parse_collect)]
    collect: Vec<(String, Option<String>)>,
    /// Start the command, print its id and return without following it
    /// (`crownest commands logs SBX CMD --follow` follows it later).
    #[arg(long, conflicts_with = "stdin")]
    background: bool,
    /// Send this process's stdin to the command (closed at end of input);
    /// without it the command reads /dev/null.
    #[arg(long)]
    stdin: bool,
    /// The command and its arguments, after `--`; each is shell-quoted
    /// because the server runs `/bin/sh -c`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// A `K=V` argument (`--env`, `--metadata`).
pub(super) fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not K=V")),
    }
}

/// `PATH` or `PATH:NAME` (a NAME has no `/`, so `a:b/c` is one path).
fn parse_collect(text: &str) -> Result<(String, Option<String>), String> {
    let (path, name) = match text.rsplit_once(':') {
        Some((path, name)) if !name.contains('/') && !path.is_empty() => {
            (path, (!name.is_empty()).then(|| name.to_string()))
        }
        _ => (text, None),
    };
    if path.is_empty() {
        return Err(String::from("expected PATH or PATH:NAME"));
    }
    Ok((path.to_string(), name))
}

/// Quotes one word for `/bin/sh`: bare when it has only safe characters,
/// otherwise in single quotes (a `'` inside becomes `'\''`).
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Bytes of stdin sent per request.
const STDIN_CHUNK: usize = 64 * 1024;

pub async fn run(api: &Api, args: ExecArgs) -> Result<i32, ClientError> {
    let json_output = args.global.output.json;
    let command_line = args
        .command
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let mut body = json!({ "command": command_line, "background": true });
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    if !args.env.is_empty() {
        body["env"] = args
            .env
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
    }
    if let Some(timeout) = args.timeout_ms {
        body["timeoutMs"] = json!(timeout);
    }
    if args.stdin {
        body["stdin"] = json!(true);
    }
    if !args.collect.is_empty() {
        body["collect"] = args
            .collect
            .iter()
            .map(|(path, name)| json!({ "path": path, "name": name }))
            .collect();
    }
    let commands = format!("/v1/sandboxes/{}/commands", segment(&args.sandbox));
    let started = api
        .json(api.request(Method::POST, &commands).json(&body))
        .await?;
    let id = started["id"]
        .as_str()
        .ok_or_else(|| ClientError::Invalid(format!("the server's answer has no id: {started}")))?
        .to_string();
    let record_path = format!("{commands}/{}", segment(&id));
    if args.background {
        if json_output {
            print_json(&started);
        } else {
            println!("{id}");
            eprintln!(
                "started {id} in the background; follow it with: crownest commands logs {} {id} --follow",
                args.sandbox
            );
        }
        return Ok(0);
    }
    let logs = format!("{record_path}/logs");
    // Ctrl-C from here on cancels the remote command instead of killing
    // this process; a second one detaches.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ClientError::io("listening for Ctrl-C"))?;
    // With --json the record is the output: stream nothing, print it at the end.
    let following = follow(api, &logs, !json_output);
    tokio::pin!(following);
    let pump = pump_stdin(api, &record_path, args.stdin);
    tokio::pin!(pump);
    let mut pumping = args.stdin;
    let mut canceled = false;
    let exit = loop {
        tokio::select! {
            exit = &mut following => break exit?,
            pumped = &mut pump, if pumping => {
                pumping = false;
                if let Err(e) = pumped {
                    eprintln!("warning: stdin was not sent on: {e}");
                }
            }
            _ = interrupts.recv() => {
                if canceled {
                    eprintln!(
                        "detached from {id}; it may still be running: crownest commands get {} {id}",
                        args.sandbox
                    );
                    return Ok(EXIT_INTERRUPTED);
                }
                canceled = true;
                eprintln!("canceling {id} (Ctrl-C again to detach)");
                let cancel = api.request(Method::POST, &format!("{record_path}/cancel"));
                if let Err(e) = api.json(cancel).await {
                    eprintln!("warning: the cancel was refused: {e}");
                }
            }
        }
    };
    let record = if json_output || !args.collect.is_empty() {
        Some(api.json(api.request(Method::GET, &record_path)).await?)
    } else {
        None
    };
    if let Some(record) = &record {
        if json_output {
            print_json(record);
        } else {
            report_collected(record);
        }
    }
    if canceled && exit["status"] == "canceled" {
        eprintln!("canceled {id}");
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(exit_code(&exit))
}

/// Sends this process's stdin to the command, chunk by chunk, and closes
/// the command's stdin at the end of input.
async fn pump_stdin(api: &Api, record_path: &str, enabled: bool) -> Result<(), ClientError> {
    use base64::Engine as _;
    use tokio::io::AsyncReadExt;
    if !enabled {
        return Ok(());
    }
    let path = format!("{record_path}/stdin");
    let mut input = tokio::io::stdin();
    let mut buffer = vec![0u8; STDIN_CHUNK];
    loop {
        let n = input
            .read(&mut buffer)
            .await
            .map_err(ClientError::io("reading stdin"))?;
        let body = if n == 0 {
            json!({ "close": true })
        } else {
            json!({ "dataBase64": base64::engine::general_purpose::STANDARD.encode(&buffer[..n]) })
        };
        api.json(api.request(Method::POST, &path).json(&body))
            .await?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// One line on stderr per `--collect` path: the artifact it became, or
/// why it did not.
fn report_collected(record: &Value) {
    for item in record["artifacts"].as_array().into_iter().flatten() {
        match item["artifactId"].as_str() {
            Some(artifact) => eprintln!(
                "collected {} as {} ({artifact})",
                text(&item["path"]),
                text(&item["name"])
            ),
            None => eprintln!(
                "not collected {}: {}",
                text(&item["path"]),
                text(&item["error"])
            ),
        }
    }
}

/// Streams the log until its `exit` event and returns that event's data,
/// reconnecting after the last event seen when the connection drops.
pub(super) async fn follow(api: &Api, path: &str, echo: bool) -> Result<Value, ClientError> {
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    loop {
        let before = last_id.clone();
        let dropped = match stream_once(api, path, &mut last_id, echo, IDLE).await {
            Ok(Some(exit)) => return Ok(exit),
            // The stream ended without `exit`: the connection dropped.
            Ok(None) => None,
            Err(e @ ClientError::Http { .. }) => Some(e),
            Err(e) => return Err(e),
        };
        failures = if last_id != before { 0 } else { failures + 1 };
        if failures >= MAX_RETRIES {
            return Err(dropped.unwrap_or_else(|| {
                ClientError::Invalid(String::from(
                    "the command's log stream kept dropping; its record has the output",
                ))
            }));
        }
        tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
    }
}

/// The log of a running command so far: what the server has recorded
/// arrives at once, so the stream is read until it has been quiet for
/// `quiet` (or ends with `exit`, returned).
pub(super) async fn log_so_far(
    api: &Api,
    path: &str,
    quiet: Duration,
) -> Result<Option<Value>, ClientError> {
    stream_once(api, path, &mut None, true, quiet).await
}

async fn stream_once(
    api: &Api,
    path: &str,
    last_id: &mut Option<String>,
    echo: bool,
    idle: Duration,
) -> Result<Option<Value>, ClientError> {
    let mut request = api
        .request(Method::GET, path)
        .header(reqwest::header::ACCEPT, "text/event-stream");
    if let Some(id) = last_id.as_deref() {
        request = request.header("last-event-id", id);
    }
    let response = api.send(request).await?;
    let url = path.to_string();
    let mut body = response.bytes_stream();
    let mut parser = Parser::default();
    loop {
        let chunk = match tokio::time::timeout(idle, body.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(Err(source))) => return Err(ClientError::Http { url, source }),
            Ok(Some(Ok(chunk))) => chunk,
        };
        for event in parser.push(&chunk) {
            if let Some(exit) = handle(&event, echo)? {
                return Ok(Some(exit));
            }
            if event.id.is_some() {
                last_id.clone_from(&event.id);
            }
        }
    }
}

/// Writes one log event to the terminal; returns the exit data at the end.
fn handle(event: &Event, echo: bool) -> Result<Option<Value>, ClientError> {
    match event.name.as_str() {
        "stdout" | "stderr" if echo => {
            let data = event.data["data"].as_str().unwrap_or_default();
            let written = if event.name == "stdout" {
                let mut out = std::io::stdout().lock();
                out.write_all(data.as_bytes()).and_then(|()| out.flush())
            } else {
                let mut err = std::io::stderr().lock();
                err.write_all(data.as_bytes()).and_then(|()| err.flush())
            };
            written.map_err(ClientError::io("writing the command's output"))?;
            Ok(None)
        }
        "exit" => Ok(Some(event.data.clone())),
        "error" => Err(ClientError::from_event(&event.data)),
        _ => Ok(None),
    }
}

/// The process exit code for a command's end: its exit code, 128+signal
/// when a signal killed it, 1 (with the reason on stderr) when it failed,
/// timed out or was canceled.
pub(super) fn exit_code(exit: &Value) -> i32 {
    let status = exit["status"].as_str().unwrap_or("unknown");
    if status == "completed" {
        if let Some(signal) = exit["signal"].as_i64() {
            return 128 + signal as i32;
        }
        if let Some(code) = exit["exitCode"].as_i64() {
            return code as i32;
        }
    }
    match exit["error"].as_str() {
        Some(error) => eprintln!("error: command {status}: {error}"),
        None => eprintln!("error: command {status}"),
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_words_stay_bare_and_others_are_single_quoted() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("/tmp/a-b_c.txt"), "/tmp/a-b_c.txt");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("echo hi; exit 3"), "'echo hi; exit 3'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn collect_takes_a_path_and_an_optional_name() {
        assert_eq!(
            parse_collect("out/a.txt"),
            Ok((String::from("out/a.txt"), None))
        );
        assert_eq!(
            parse_collect("out/a.txt:report.txt"),
            Ok((String::from("out/a.txt"), Some(String::from("report.txt"))))
        );
        // A colon followed by a path is part of the path.
        assert_eq!(parse_collect("a:b/c"), Ok((String::from("a:b/c"), None)));
        assert!(parse_collect("").is_err());
    }

    #[test]
    fn exit_code_follows_the_command() {
        assert_eq!(exit_code(&json!({"status": "completed", "exitCode": 3})), 3);
        assert_eq!(
            exit_code(&json!({"status": "completed", "exitCode": null, "signal": 15})),
            143
        );
        assert_eq!(
            exit_code(&json!({"status": "timed_out", "error": "timed out"})),
            1
        );
    }
}
