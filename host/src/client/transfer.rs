//! Streaming bodies to and from disk (never the whole file in memory),
//! with a progress bar on stderr when it is a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::RequestBuilder;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::{Api, ClientError};

/// Where downloaded bytes go.
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `-` is stdout; anything else a local path.
    pub fn parse(text: &str) -> Sink {
        if text == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(text))
        }
    }
}

/// A byte progress bar, hidden unless stderr is a terminal.
fn progress(total: Option<u64>, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::no_length(),
    };
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

/// PUTs a local file as the request body, streamed, and returns the JSON
/// answer (`null` when there is none).
pub async fn upload(
    api: &Api,
    request: RequestBuilder,
    local: &Path,
    size: u64,
    label: &str,
) -> Result<Value, ClientError> {
    let file = tokio::fs::File::open(local)
        .await
        .map_err(ClientError::io(format!("opening {}", local.display())))?;
    let bar = progress(Some(size), label);
    let counter = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)
        .inspect_ok(move |chunk| counter.inc(chunk.len() as u64));
    let request = request
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream));
    let answer = api.json(request).await;
    bar.finish_and_clear();
    answer
}

/// GETs a body into `sink`, streamed; returns the bytes written.
pub async fn download(
    api: &Api,
    request: RequestBuilder,
    sink: &Sink,
    label: &str,
) -> Result<u64, ClientError> {
    let response = api.send(request).await?;
    let bar = progress(response.content_length(), label);
    let mut body = response.bytes_stream();
    let mut written = 0u64;
    let result = match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            loop {
                let Some(chunk) = body.next().await else {
                    break out.flush().map_err(ClientError::io("writing to stdout"));
                };
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(source) => break Err(http(label, source)),
                };
                if let Err(e) = out.write_all(&chunk) {
                    break Err(ClientError::io("writing to stdout")(e));
                }
                written += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
            }
        }
        Sink::File(path) => {
            let context = format!("writing {}", path.display());
            let mut file = tokio::fs::File::create(path)
                .await
                .map_err(ClientError::io(context.clone()))?;
            let copied = async {
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|source| http(label, source))?;
                    file.write_all(&chunk)
                        .await
                        .map_err(ClientError::io(context.clone()))?;
                    written += chunk.len() as u64;
                    bar.inc(chunk.len() as u64);
                }
                file.flush().await.map_err(ClientError::io(context.clone()))
            }
            .await;
            if copied.is_err() {
                // No half-written file left behind to be mistaken for the real one.
                let _ = tokio::fs::remove_file(path).await;
            }
            copied
        }
    };
    bar.finish_and_clear();
    result.map(|()| written)
}

fn http(label: &str, source: reqwest::Error) -> ClientError {
    ClientError::Http {
        url: label.to_string(),
        source,
    }
}
