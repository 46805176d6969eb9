//! A CrowNest output formatter: one rich output (a MIME bundle) -> one
//! normalised output. This one keeps the `text/plain` representation, with
//! the template's `formatter_config` string before it.

wit_bindgen::generate!({ world: "output-formatter", path: "wit" });

use crownest::plugin::types::{Format, MimeData};

struct Plugin;

impl Guest for Plugin {
    fn format(output: RichOutput, limits: FormatLimits, config: String) -> Result<Output, String> {
        let plain = output
            .bundle
            .iter()
            .find(|item| item.mime == "text/plain")
            .and_then(|item| match &item.data {
                MimeData::Text(text) => Some(text.clone()),
                MimeData::Bytes(_) => None,
            })
            .ok_or_else(|| String::from("no text/plain representation"))?;
        let (text, truncated) = cut(&format!("{config}{plain}"), limits.max_text_bytes as usize);
        Ok(Output {
            kind: output.kind,
            format: Format::Text,
            mime: String::from("text/plain"),
            size: text.len() as u64,
            text: Some(text),
            bytes: None,
            truncated,
            execution_count: output.execution_count,
        })
    }
}

/// `text` cut to at most `max` bytes on a character boundary, and whether it was cut.
fn cut(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

export!(Plugin);

#[cfg(test)]
mod tests {
    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(super::cut("héllo", 2), (String::from("h"), true));
        assert_eq!(super::cut("hi", 8), (String::from("hi"), false));
    }
}
