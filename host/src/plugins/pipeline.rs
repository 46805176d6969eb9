//! The output pipeline: adapter -> formatter -> policy, failing closed.
//!
//! - adapter failure: the run keeps only what the host can read itself: the
//!   raw stream text (and the raw error event, so a failed run still looks
//!   failed); rich outputs are dropped;
//! - formatter failure: the output falls back to its `text/plain`
//!   representation (truncated), else it is `unknown`;
//! - policy failure: nothing is promoted or inlined: the output is rejected
//!   with `policy_failed`.
//!
//! Each fallback adds one note naming the plugin and how it failed.

use super::{
    Adapted, Adapter, ArtifactPolicy, Decision, Format, FormatLimits, Formatter, MimeData,
    MimeItem, Output, OutputKind, Policy, PolicyLimits, RawEvent, RejectReason, RunError,
    StreamName,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineLimits {
    pub format: FormatLimits,
    pub policy: PolicyLimits,
}

/// One output and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineOutput {
    pub output: Output,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PipelineResult {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub outputs: Vec<PipelineOutput>,
    pub error: Option<RunError>,
    pub execution_count: Option<u32>,
    /// Plugin failures and fallbacks, one sentence each.
    pub notes: Vec<String>,
}

/// Runs one run's events through the three plugins. Synchronous and
/// CPU-bound: call it on the blocking pool.
pub fn pipeline(
    adapter: &Adapter,
    formatter: &Formatter,
    policy: &Policy,
    events: &[RawEvent],
    policy_choice: ArtifactPolicy,
    limits: &PipelineLimits,
) -> PipelineResult {
    let mut notes = Vec::new();
    let adapted = match adapter.adapt(events) {
        Ok(adapted) => adapted,
        Err(e) => {
            notes.push(format!(
                "result adapter failed ({}): {e}; rich outputs were dropped and only the raw stream text is shown",
                e.kind()
            ));
            raw_fallback(events)
        }
    };
    let Adapted {
        stdout,
        stderr,
        outputs,
        error,
        execution_count,
    } = adapted;
    let mut result = PipelineResult {
        stdout,
        stderr,
        outputs: Vec::with_capacity(outputs.len()),
        error,
        execution_count,
        notes,
    };
    for (index, rich) in outputs.into_iter().enumerate() {
        // Only what the fallback needs is kept back, not the whole bundle.
        let (kind, execution_count) = (rich.kind, rich.execution_count);
        let plain = rich
            .bundle
            .iter()
            .find(|item| is_plain_text(&item.mime))
            .cloned();
        let output = match formatter.format(rich, &limits.format) {
            Ok(output) => output,
            Err(e) => {
                result.notes.push(format!(
                    "output formatter failed ({}) on output {index}: {e}; it fell back to plain text",
                    e.kind()
                ));
                plain_text_fallback(kind, execution_count, plain, &limits.format)
            }
        };
        let decision = match policy.decide(&output, policy_choice, &limits.policy) {
            Ok(decision) => decision,
            Err(e) => {
                result.notes.push(format!(
                    "promotion policy failed ({}) on output {index}: {e}; the output was rejected",
                    e.kind()
                ));
                Decision::Reject(RejectReason::PolicyFailed)
            }
        };
        result.outputs.push(PipelineOutput { output, decision });
    }
    result
}

/// What the host reads from the events itself when the adapter fails.
fn raw_fallback(events: &[RawEvent]) -> Adapted {
    let mut adapted = Adapted::default();
    for event in events {
        match event {
            RawEvent::Stream {
                name: StreamName::Stdout,
                text,
            } => adapted.stdout.push(text.clone()),
            RawEvent::Stream {
                name: StreamName::Stderr,
                text,
            } => adapted.stderr.push(text.clone()),
            RawEvent::Error {
                ename,
                evalue,
                traceback,
            } if adapted.error.is_none() => {
                adapted.error = Some(RunError {
                    name: ename.clone(),
                    message: evalue.clone(),
                    traceback: traceback.clone(),
                });
            }
            _ => {}
        }
    }
    adapted
}

fn is_plain_text(mime: &str) -> bool {
    mime.split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/plain"))
}

/// `text/plain`, truncated to the limit; else an empty `unknown` output
/// (which the policy rejects as unsupported).
fn plain_text_fallback(
    kind: OutputKind,
    execution_count: Option<u32>,
    plain: Option<MimeItem>,
    limits: &FormatLimits,
) -> Output {
    let (format, mime, text, truncated) = match plain {
        Some(item) => {
            let text = match item.data {
                MimeData::Text(text) => text,
                MimeData::Bytes(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            };
            let (text, truncated) = truncate(text, limits.max_text_bytes);
            (Format::Text, "text/plain".to_owned(), text, truncated)
        }
        None => (
            Format::Unknown,
            "application/octet-stream".to_owned(),
            String::new(),
            false,
        ),
    };
    Output {
        kind,
        format,
        mime,
        size: text.len() as u64,
        text: Some(text),
        bytes: None,
        truncated,
        execution_count,
    }
}

fn truncate(mut text: String, limit: u64) -> (String, bool) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if text.len() <= limit {
        return (text, false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let total = text.len();
    text.truncate(end);
    text.push_str(&format!(
        "\n[output truncated: showing the first {end} of {total} bytes]"
    ));
    (text, true)
}
