//! An incremental parser of server-sent events, fed with response chunks.

use futures::StreamExt;
use serde_json::Value;

use super::{Api, ClientError};

/// One event: its `id:` (if any), `event:` name and `data:` parsed as JSON
/// (a string when it is not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub name: String,
    pub data: Value,
}

/// Buffers bytes until a blank line ends an event. Bytes, not text: a
/// chunk boundary may split a UTF-8 character.
#[derive(Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

impl Parser {
    /// Adds a chunk and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((end, sep)) = block_end(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + sep).collect();
            if let Some(event) = parse_block(&String::from_utf8_lossy(&block[..end])) {
                events.push(event);
            }
        }
        events
    }
}

/// Reads the event stream `request` answers with, handing each event to
/// `on` until it returns `false` or the stream ends; an `error` event (the
/// error envelope) ends it with that error.
pub async fn each(
    api: &Api,
    request: reqwest::RequestBuilder,
    mut on: impl FnMut(&Event) -> Result<bool, ClientError>,
) -> Result<(), ClientError> {
    let response = api
        .send(request.header(reqwest::header::ACCEPT, "text/event-stream"))
        .await?;
    let url = super::without_query(response.url());
    let mut body = response.bytes_stream();
    let mut parser = Parser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        for event in parser.push(&chunk) {
            if event.name == "error" && event.data.get("error").is_some() {
                return Err(ClientError::from_event(&event.data));
            }
            if !on(&event)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Where the first event block ends and how long its separator is.
fn block_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_block(block: &str) -> Option<Event> {
    let mut event = Event {
        id: None,
        name: String::from("message"),
        data: Value::Null,
    };
    let mut data: Option<String> = None;
    for line in block.lines() {
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "id" => event.id = Some(value.to_string()),
            "event" => event.name = value.to_string(),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            // Comments (keep-alives) and unknown fields.
            _ => {}
        }
    }
    let data = data?;
    event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_split_across_chunks_are_parsed_once_complete() {
        let mut parser = Parser::default();
        assert!(parser.push(b"id: 1\nevent: stdout\ndata: {\"da").is_empty());
        let events = parser.push(b"ta\":\"hi\\n\"}\n\n:keep-alive\n\n");
        assert_eq!(
            events,
            vec![Event {
                id: Some(String::from("1")),
                name: String::from("stdout"),
                data: json!({ "data": "hi\n" }),
            }]
        );
    }

    #[test]
    fn a_utf8_character_split_between_chunks_survives() {
        let mut parser = Parser::default();
        let text = "data: \"é\"\n\n".as_bytes();
        assert!(parser.push(&text[..7]).is_empty());
        let events = parser.push(&text[7..]);
        assert_eq!(events[0].data, json!("é"));
    }
}
