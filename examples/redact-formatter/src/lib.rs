//! Example plugin: an output formatter that redacts secrets.
//!
//! Run with:
//!   cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//!   # -> plugins/target/wasm32-wasip2/release/redact_formatter.wasm
//! then name it in a template (`formatter = "redact-formatter"`), or see the
//! host test `redact_formatter_example_redacts_secrets` in host/src/plugins.
//!
//! It formats exactly like `default-formatter` (it calls the same library,
//! `formatter_core::format`) and then, in every text output (text,
//! markdown, latex, json, html, svg, chart, data), replaces with
//! `[REDACTED]`:
//! - CrowNest API keys: `cn_live_` followed by key characters;
//! - AWS access key ids: `AKIA`/`ASIA` followed by 16 upper-case letters or digits;
//! - the value after `password=`, `password:`, `secret=`,
//!   `aws_secret_access_key=` (any case, up to the next whitespace, quote, `,` or `;`).
#![no_std]

extern crate alloc;
extern crate guest_rt;

use alloc::string::String;
use formatter_core::bindings::crownest::plugin::host::{LogLevel, log};
use formatter_core::bindings::crownest::plugin::types::{FormatLimits, Output, RichOutput};

const REDACTED: &str = "[REDACTED]";

struct RedactFormatter;

impl formatter_core::bindings::Guest for RedactFormatter {
    fn format(output: RichOutput, limits: FormatLimits) -> Result<Output, String> {
        let mut formatted = formatter_core::format(output, limits)?;
        if let Some(text) = formatted.text.take() {
            let (clean, count) = redact(&text);
            if count > 0 {
                log(
                    LogLevel::Info,
                    &alloc::format!("redacted {count} secret(s)"),
                );
            }
            formatted.size = clean.len() as u64;
            formatted.text = Some(clean);
        }
        Ok(formatted)
    }
}

formatter_core::bindings::export!(RedactFormatter);

/// Returns the text with secrets replaced, and how many were.
fn redact(text: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut count = 0;
    let mut rest = text;
    'scan: while !rest.is_empty() {
        let at_word_start = out.chars().next_back().is_none_or(|c| !is_key_char(c));
        if at_word_start {
            if let Some(len) = api_key_len(rest).or_else(|| aws_key_len(rest)) {
                out.push_str(REDACTED);
                count += 1;
                rest = &rest[len..];
                continue;
            }
            for name in ["aws_secret_access_key", "password", "passwd", "secret"] {
                if let Some(value_at) = assignment(rest, name) {
                    let value_len = rest[value_at..]
                        .find(|c: char| {
                            c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '&')
                        })
                        .unwrap_or(rest.len() - value_at);
                    if value_len > 0 {
                        out.push_str(&rest[..value_at]);
                        out.push_str(REDACTED);
                        count += 1;
                        rest = &rest[value_at + value_len..];
                        continue 'scan;
                    }
                }
            }
        }
        let Some(c) = rest.chars().next() else { break };
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    (out, count)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `cn_live_` + at least 8 key characters.
fn api_key_len(text: &str) -> Option<usize> {
    let tail = text.strip_prefix("cn_live_")?;
    let len = tail.find(|c: char| !is_key_char(c)).unwrap_or(tail.len());
    (len >= 8).then_some("cn_live_".len() + len)
}

/// `AKIA`/`ASIA` + exactly 16 of `[A-Z0-9]`, not followed by another key character.
fn aws_key_len(text: &str) -> Option<usize> {
    if !(text.starts_with("AKIA") || text.starts_with("ASIA")) {
        return None;
    }
    let body = text.get(4..20)?;
    let ok = body
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    let ends = text[20..].chars().next().is_none_or(|c| !is_key_char(c));
    (ok && ends).then_some(20)
}

/// `name` (any case) then optional spaces, `=` or `:`, optional spaces and
/// an opening quote: the offset where the value starts.
fn assignment(text: &str, name: &str) -> Option<usize> {
    let head = text.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    let after = &text[name.len()..];
    let trimmed = after.trim_start_matches(' ');
    let rest = trimmed
        .strip_prefix('=')
        .or_else(|| trimmed.strip_prefix(':'))?;
    let value = rest.trim_start_matches([' ', '"', '\'']);
    Some(text.len() - value.len())
}
