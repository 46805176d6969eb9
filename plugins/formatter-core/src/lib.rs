//! The default output formatting, as a library: the `output-formatter`
//! world's bindings (with a public `export!` macro) and [`format`], which
//! `default-formatter` exports as is and other formatters (the redacting
//! example) wrap.
//!
//! Picks one representation from a MIME bundle in this order:
//! figure description -> `chart`, DataFrame -> `data`, `image/png`,
//! `image/jpeg`, `image/svg+xml`, `text/html`, `text/markdown`,
//! `text/latex`, `application/json`, `text/plain`; a representation that
//! does not convert (bad JSON, bytes that are not a PNG) is skipped.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod bindings {
    //! Generated from `wit/` (world `output-formatter`).
    wit_bindgen::generate!({
        world: "output-formatter",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "formatter_core::bindings",
    });
}

mod chart;
mod data;
mod text;

use alloc::string::String;
use alloc::vec::Vec;
use bindings::crownest::plugin::types::{
    Format, FormatLimits, MimeData, MimeItem, Output, RichOutput,
};

pub use text::truncate;

/// What the in-sandbox Python runner emits for a matplotlib figure.
pub const FIGURE_MIME: &str = "application/vnd.crownest.figure+json";
/// What the in-sandbox Python runner emits for a pandas DataFrame.
pub const DATAFRAME_MIME: &str = "application/vnd.crownest.dataframe+json";
/// The MIME type of a `chart` output (E2B's chart JSON).
pub const CHART_MIME: &str = "application/vnd.crownest.chart+json";
/// The MIME type of a `data` output.
pub const DATA_MIME: &str = "application/vnd.crownest.data+json";

/// The preference order: the first of these present and convertible wins.
const PREFERENCE: &[&str] = &[
    FIGURE_MIME,
    DATAFRAME_MIME,
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "text/html",
    "text/markdown",
    "text/latex",
    "application/json",
    "text/plain",
];

/// Formats one rich output. Never fails on content: an output with no
/// known representation becomes `unknown` (and the policy rejects it).
pub fn format(output: RichOutput, limits: FormatLimits) -> Result<Output, String> {
    let RichOutput {
        kind,
        mut bundle,
        execution_count,
    } = output;
    for wanted in PREFERENCE {
        // Taken out of the bundle, not copied: an image may be most of our memory.
        let Some(at) = bundle
            .iter()
            .position(|item| mime_matches(&item.mime, wanted))
        else {
            continue;
        };
        let item = bundle.swap_remove(at);
        if let Some((format, mime, content)) = convert(wanted, item, &limits) {
            return Ok(build(kind, format, mime, content, execution_count));
        }
    }
    // Nothing we know: pass the first representation through as `unknown`.
    let (mime, content) = match bundle.into_iter().next() {
        Some(MimeItem {
            mime,
            data: MimeData::Text(text),
        }) => {
            let (text, truncated) = truncate(&text, limits.max_text_bytes);
            (mime, Content::Text(text, truncated))
        }
        Some(MimeItem {
            mime,
            data: MimeData::Bytes(bytes),
        }) => (mime, Content::Bytes(bytes)),
        None => (
            String::from("application/octet-stream"),
            Content::Bytes(Vec::new()),
        ),
    };
    Ok(build(kind, Format::Unknown, mime, content, execution_count))
}

/// `text/plain; charset=utf-8` matches `text/plain`.
fn mime_matches(mime: &str, wanted: &str) -> bool {
    let base = mime.split(';').next().unwrap_or(mime).trim();
    base.eq_ignore_ascii_case(wanted) && !mime.contains(";error")
}

enum Content {
    Text(String, bool),
    Bytes(Vec<u8>),
}

fn build(
    kind: bindings::crownest::plugin::types::OutputKind,
    format: Format,
    mime: String,
    content: Content,
    execution_count: Option<u32>,
) -> Output {
    match content {
        Content::Text(text, truncated) => Output {
            kind,
            format,
            mime,
            size: text.len() as u64,
            text: Some(text),
            bytes: None,
            truncated,
            execution_count,
        },
        Content::Bytes(bytes) => Output {
            kind,
            format,
            mime,
            size: bytes.len() as u64,
            text: None,
            bytes: Some(bytes),
            truncated: false,
            execution_count,
        },
    }
}

fn convert(
    wanted: &str,
    item: MimeItem,
    limits: &FormatLimits,
) -> Option<(Format, String, Content)> {
    let owned = |format: Format, content: Content| Some((format, String::from(wanted), content));
    match wanted {
        FIGURE_MIME => {
            let chart = chart::from_figure(as_text(&item.data)?)?;
            Some((
                Format::Chart,
                String::from(CHART_MIME),
                Content::Text(chart, false),
            ))
        }
        DATAFRAME_MIME => {
            let data = data::from_dataframe(as_text(&item.data)?)?;
            Some((
                Format::Data,
                String::from(DATA_MIME),
                Content::Text(data, false),
            ))
        }
        "image/png" => {
            let bytes = into_bytes(item.data)?;
            bytes.starts_with(b"\x89PNG\r\n\x1a\n").then_some(())?;
            owned(Format::Png, Content::Bytes(bytes))
        }
        "image/jpeg" => {
            let bytes = into_bytes(item.data)?;
            bytes.starts_with(&[0xff, 0xd8, 0xff]).then_some(())?;
            owned(Format::Jpeg, Content::Bytes(bytes))
        }
        // Markup is never cut: half an SVG or HTML document is broken. The
        // policy decides what a large one may become.
        "image/svg+xml" => owned(
            Format::Svg,
            Content::Text(as_text(&item.data)?.into(), false),
        ),
        "text/html" => owned(
            Format::Html,
            Content::Text(as_text(&item.data)?.into(), false),
        ),
        "application/json" => {
            let text = as_text(&item.data)?;
            serde_json::from_str::<serde_json::Value>(text).ok()?;
            owned(Format::Json, Content::Text(text.into(), false))
        }
        "text/markdown" | "text/latex" | "text/plain" => {
            let format = match wanted {
                "text/markdown" => Format::Markdown,
                "text/latex" => Format::Latex,
                _ => Format::Text,
            };
            let text = text_lossy(&item.data);
            let (text, truncated) = truncate(&text, limits.max_text_bytes);
            owned(format, Content::Text(text, truncated))
        }
        _ => None,
    }
}

fn as_text(data: &MimeData) -> Option<&str> {
    match data {
        MimeData::Text(text) => Some(text),
        MimeData::Bytes(bytes) => core::str::from_utf8(bytes).ok(),
    }
}

fn text_lossy(data: &MimeData) -> String {
    match data {
        MimeData::Text(text) => text.clone(),
        MimeData::Bytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Binary representations arrive as bytes, or base64 text as Jupyter sends them.
fn into_bytes(data: MimeData) -> Option<Vec<u8>> {
    match data {
        MimeData::Bytes(bytes) => Some(bytes),
        MimeData::Text(text) => text::base64_decode(&text),
    }
}
