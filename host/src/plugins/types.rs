//! The plugin pipeline's plain Rust types (what the rest of the host sees)
//! and their conversions to and from the `bindgen!` types, which stay in
//! this module tree.

use super::bindings::types as wit;
use base64::Engine as _;

/// A MIME representation's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MimeData {
    Text(String),
    Bytes(Vec<u8>),
}

impl MimeData {
    pub fn len(&self) -> usize {
        match self {
            MimeData::Text(text) => text.len(),
            MimeData::Bytes(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One representation in a MIME bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MimeItem {
    pub mime: String,
    pub data: MimeData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// A raw interpreter event, Jupyter-shaped, as the in-sandbox runners emit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    Stream {
        name: StreamName,
        text: String,
    },
    DisplayData {
        bundle: Vec<MimeItem>,
        execution_count: Option<u32>,
    },
    ExecuteResult {
        bundle: Vec<MimeItem>,
        execution_count: Option<u32>,
    },
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
}

/// One line of a runner's event pipe, decoded once: an event for the
/// pipeline, the end of a run, or something the host ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerEvent {
    Raw(RawEvent),
    /// The run finished (`{"type":"done"}`).
    Done {
        execution_count: Option<u32>,
    },
    /// `ready` and unknown event types.
    Other,
}

/// Why a runner line could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the event is {size} bytes; at most {max} are accepted")]
    TooLarge { size: usize, max: usize },
    #[error("the event is not valid JSON of the runner protocol: {0}")]
    Malformed(String),
}

/// The flat shape of every runner line: no `serde_json::Value` tree is
/// built; bundle values stay raw JSON text until they are needed.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    name: Option<std::borrow::Cow<'a, str>>,
    text: Option<String>,
    #[serde(borrow)]
    data: Option<std::collections::BTreeMap<String, &'a serde_json::value::RawValue>>,
    execution_count: Option<u64>,
    ename: Option<String>,
    evalue: Option<String>,
    traceback: Option<Vec<String>>,
}

impl RunnerEvent {
    /// Decodes one runner event line (`{"type":"stream"|"display_data"|
    /// "execute_result"|"error"|"done", …}`), refusing lines over `max`
    /// bytes before parsing anything. Bundle values that are strings stay
    /// text, except base64 images (`image/png`, `image/jpeg`, `image/gif`,
    /// `image/webp`), which are decoded to bytes; other JSON values become
    /// their JSON text.
    pub fn decode(line: &[u8], max: usize) -> Result<RunnerEvent, DecodeError> {
        if line.len() > max {
            return Err(DecodeError::TooLarge {
                size: line.len(),
                max,
            });
        }
        let line: Line<'_> =
            serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let count = line.execution_count.and_then(|n| u32::try_from(n).ok());
        let missing = |field: &str| DecodeError::Malformed(format!("`{field}` is missing"));
        Ok(match line.kind.as_ref() {
            "stream" => RunnerEvent::Raw(RawEvent::Stream {
                name: match line.name.as_deref() {
                    Some("stderr") => StreamName::Stderr,
                    _ => StreamName::Stdout,
                },
                text: line.text.ok_or_else(|| missing("text"))?,
            }),
            kind @ ("display_data" | "execute_result") => {
                let data = line.data.ok_or_else(|| missing("data"))?;
                let bundle = data
                    .into_iter()
                    .map(|(mime, value)| bundle_item(mime, value))
                    .collect();
                RunnerEvent::Raw(if kind == "display_data" {
                    RawEvent::DisplayData {
                        bundle,
                        execution_count: count,
                    }
                } else {
                    RawEvent::ExecuteResult {
                        bundle,
                        execution_count: count,
                    }
                })
            }
            "error" => RunnerEvent::Raw(RawEvent::Error {
                ename: line.ename.unwrap_or_default(),
                evalue: line.evalue.unwrap_or_default(),
                traceback: line.traceback.unwrap_or_default(),
            }),
            "done" => RunnerEvent::Done {
                execution_count: count,
            },
            _ => RunnerEvent::Other,
        })
    }
}

/// One representation of a bundle from its raw JSON value.
fn bundle_item(mime: String, value: &serde_json::value::RawValue) -> MimeItem {
    let raw = value.get();
    let data = if raw.starts_with('"') {
        match serde_json::from_str::<String>(raw) {
            Ok(text) if is_binary_image(&mime) => {
                match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
                    Ok(bytes) => MimeData::Bytes(bytes),
                    Err(_) => MimeData::Text(text),
                }
            }
            Ok(text) => MimeData::Text(text),
            Err(_) => MimeData::Text(raw.to_owned()),
        }
    } else {
        MimeData::Text(raw.to_owned())
    };
    MimeItem { mime, data }
}

fn is_binary_image(mime: &str) -> bool {
    matches!(
        mime,
        "image/png" | "image/jpeg" | "image/gif" | "image/webp"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    DisplayData,
    ExecuteResult,
}

/// A rich output before formatting: the bundle to pick from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RichOutput {
    pub kind: OutputKind,
    pub bundle: Vec<MimeItem>,
    pub execution_count: Option<u32>,
}

/// The run's interpreter error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunError {
    pub name: String,
    pub message: String,
    pub traceback: Vec<String>,
}

/// What a result adapter makes of one run's events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Adapted {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub outputs: Vec<RichOutput>,
    pub error: Option<RunError>,
    pub execution_count: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Json,
    Png,
    Jpeg,
    Svg,
    Latex,
    Chart,
    Data,
    Unknown,
}

impl Format {
    /// The name the API uses (`"png"`, `"chart"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Json => "json",
            Format::Png => "png",
            Format::Jpeg => "jpeg",
            Format::Svg => "svg",
            Format::Latex => "latex",
            Format::Chart => "chart",
            Format::Data => "data",
            Format::Unknown => "unknown",
        }
    }

    /// Formats whose content is bytes (the rest are text).
    pub fn is_binary(self) -> bool {
        matches!(self, Format::Png | Format::Jpeg)
    }

    /// Formats whose text must be one JSON value.
    pub fn is_json(self) -> bool {
        matches!(self, Format::Json | Format::Chart | Format::Data)
    }
}

/// One normalised output: exactly one of `text` and `bytes`, `size` its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub kind: OutputKind,
    pub format: Format,
    pub mime: String,
    pub text: Option<String>,
    pub bytes: Option<Vec<u8>>,
    pub size: u64,
    /// The content was cut to the formatter's limit.
    pub truncated: bool,
    pub execution_count: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatLimits {
    /// Text longer than this is truncated by the formatter.
    pub max_text_bytes: u64,
}

impl Default for FormatLimits {
    fn default() -> Self {
        FormatLimits {
            max_text_bytes: 64 * 1024,
        }
    }
}

/// The run's `artifactPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactPolicy {
    #[default]
    Inline,
    Promote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    pub max_inline_bytes: u64,
    pub max_artifact_bytes: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            max_inline_bytes: 256 * 1024,
            max_artifact_bytes: 32 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    OutputTooLarge,
    RequiresArtifactPromotion,
    UnsupportedFormat,
    /// Host-only: the policy plugin failed, so nothing is promoted or
    /// inlined (fail closed). A policy cannot return this.
    PolicyFailed,
    /// Host-only: promoting it would exceed the org's artifact quota.
    QuotaExceeded,
    /// Host-only: the artifact could not be stored.
    PromotionFailed,
}

impl RejectReason {
    /// The API's reason code.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::OutputTooLarge => "output_too_large",
            RejectReason::RequiresArtifactPromotion => "requires_artifact_promotion",
            RejectReason::UnsupportedFormat => "unsupported_format",
            RejectReason::PolicyFailed => "policy_failed",
            RejectReason::QuotaExceeded => "quota_exceeded",
            RejectReason::PromotionFailed => "promotion_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Inline,
    Promote,
    Reject(RejectReason),
}

// ---- conversions to and from the generated types ----

impl From<MimeItem> for wit::MimeItem {
    fn from(item: MimeItem) -> Self {
        wit::MimeItem {
            mime: item.mime,
            data: match item.data {
                MimeData::Text(text) => wit::MimeData::Text(text),
                MimeData::Bytes(bytes) => wit::MimeData::Bytes(bytes),
            },
        }
    }
}

impl From<wit::MimeItem> for MimeItem {
    fn from(item: wit::MimeItem) -> Self {
        MimeItem {
            mime: item.mime,
            data: match item.data {
                wit::MimeData::Text(text) => MimeData::Text(text),
                wit::MimeData::Bytes(bytes) => MimeData::Bytes(bytes),
            },
        }
    }
}

fn bundle_to_wit(bundle: &[MimeItem]) -> Vec<wit::MimeItem> {
    bundle.iter().cloned().map(Into::into).collect()
}

impl From<&RawEvent> for wit::RawEvent {
    fn from(event: &RawEvent) -> Self {
        match event {
            RawEvent::Stream { name, text } => wit::RawEvent::Stream(wit::StreamEvent {
                name: match name {
                    StreamName::Stdout => wit::StreamName::Stdout,
                    StreamName::Stderr => wit::StreamName::Stderr,
                },
                text: text.clone(),
            }),
            RawEvent::DisplayData {
                bundle,
                execution_count,
            } => wit::RawEvent::DisplayData(wit::DisplayEvent {
                bundle: bundle_to_wit(bundle),
                execution_count: *execution_count,
            }),
            RawEvent::ExecuteResult {
                bundle,
                execution_count,
            } => wit::RawEvent::ExecuteResult(wit::DisplayEvent {
                bundle: bundle_to_wit(bundle),
                execution_count: *execution_count,
            }),
            RawEvent::Error {
                ename,
                evalue,
                traceback,
            } => wit::RawEvent::Error(wit::ErrorEvent {
                ename: ename.clone(),
                evalue: evalue.clone(),
                traceback: traceback.clone(),
            }),
        }
    }
}

impl From<wit::OutputKind> for OutputKind {
    fn from(kind: wit::OutputKind) -> Self {
        match kind {
            wit::OutputKind::DisplayData => OutputKind::DisplayData,
            wit::OutputKind::ExecuteResult => OutputKind::ExecuteResult,
        }
    }
}

impl From<OutputKind> for wit::OutputKind {
    fn from(kind: OutputKind) -> Self {
        match kind {
            OutputKind::DisplayData => wit::OutputKind::DisplayData,
            OutputKind::ExecuteResult => wit::OutputKind::ExecuteResult,
        }
    }
}

impl From<wit::Adapted> for Adapted {
    fn from(a: wit::Adapted) -> Self {
        Adapted {
            stdout: a.stdout,
            stderr: a.stderr,
            outputs: a
                .outputs
                .into_iter()
                .map(|o| RichOutput {
                    kind: o.kind.into(),
                    bundle: o.bundle.into_iter().map(Into::into).collect(),
                    execution_count: o.execution_count,
                })
                .collect(),
            error: a.error.map(|e| RunError {
                name: e.name,
                message: e.message,
                traceback: e.traceback,
            }),
            execution_count: a.execution_count,
        }
    }
}

impl From<RichOutput> for wit::RichOutput {
    fn from(o: RichOutput) -> Self {
        wit::RichOutput {
            kind: o.kind.into(),
            bundle: o.bundle.into_iter().map(Into::into).collect(),
            execution_count: o.execution_count,
        }
    }
}

impl From<wit::Format> for Format {
    fn from(f: wit::Format) -> Self {
        match f {
            wit::Format::Text => Format::Text,
            wit::Format::Markdown => Format::Markdown,
            wit::Format::Html => Format::Html,
            wit::Format::Json => Format::Json,
            wit::Format::Png => Format::Png,
            wit::Format::Jpeg => Format::Jpeg,
            wit::Format::Svg => Format::Svg,
            wit::Format::Latex => Format::Latex,
            wit::Format::Chart => Format::Chart,
            wit::Format::Data => Format::Data,
            wit::Format::Unknown => Format::Unknown,
        }
    }
}

impl From<Format> for wit::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Text => wit::Format::Text,
            Format::Markdown => wit::Format::Markdown,
            Format::Html => wit::Format::Html,
            Format::Json => wit::Format::Json,
            Format::Png => wit::Format::Png,
            Format::Jpeg => wit::Format::Jpeg,
            Format::Svg => wit::Format::Svg,
            Format::Latex => wit::Format::Latex,
            Format::Chart => wit::Format::Chart,
            Format::Data => wit::Format::Data,
            Format::Unknown => wit::Format::Unknown,
        }
    }
}

impl From<wit::Output> for Output {
    fn from(o: wit::Output) -> Self {
        Output {
            kind: o.kind.into(),
            format: o.format.into(),
            mime: o.mime,
            text: o.text,
            bytes: o.bytes,
            size: o.size,
            truncated: o.truncated,
            execution_count: o.execution_count,
        }
    }
}

impl From<&Output> for wit::Output {
    fn from(o: &Output) -> Self {
        wit::Output {
            kind: o.kind.into(),
            format: o.format.into(),
            mime: o.mime.clone(),
            text: o.text.clone(),
            bytes: o.bytes.clone(),
            size: o.size,
            truncated: o.truncated,
            execution_count: o.execution_count,
        }
    }
}

impl From<&FormatLimits> for wit::FormatLimits {
    fn from(l: &FormatLimits) -> Self {
        wit::FormatLimits {
            max_text_bytes: l.max_text_bytes,
        }
    }
}

impl From<&PolicyLimits> for wit::PolicyLimits {
    fn from(l: &PolicyLimits) -> Self {
        wit::PolicyLimits {
            max_inline_bytes: l.max_inline_bytes,
            max_artifact_bytes: l.max_artifact_bytes,
        }
    }
}

impl From<ArtifactPolicy> for wit::ArtifactPolicy {
    fn from(p: ArtifactPolicy) -> Self {
        match p {
            ArtifactPolicy::Inline => wit::ArtifactPolicy::Inline,
            ArtifactPolicy::Promote => wit::ArtifactPolicy::Promote,
        }
    }
}

impl From<wit::Decision> for Decision {
    fn from(d: wit::Decision) -> Self {
        match d {
            wit::Decision::Inline => Decision::Inline,
            wit::Decision::Promote => Decision::Promote,
            wit::Decision::Reject(reason) => Decision::Reject(match reason {
                wit::RejectReason::OutputTooLarge => RejectReason::OutputTooLarge,
                wit::RejectReason::RequiresArtifactPromotion => {
                    RejectReason::RequiresArtifactPromotion
                }
                wit::RejectReason::UnsupportedFormat => RejectReason::UnsupportedFormat,
            }),
        }
    }
}
