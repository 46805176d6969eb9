//! Text helpers: truncation on a char boundary and base64 decoding.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Cuts `text` to at most `limit` bytes (on a char boundary) and, when it
/// cut, says so on a last line. Returns the text and whether it was cut.
pub fn truncate(text: &str, limit: u64) -> (String, bool) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if text.len() <= limit {
        return (String::from(text), false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::from(&text[..end]);
    out.push_str(&format!(
        "\n[output truncated: showing the first {end} of {} bytes]",
        text.len()
    ));
    (out, true)
}

/// Standard base64 (with or without padding, whitespace ignored).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &c in text.as_bytes() {
        if c.is_ascii_whitespace() || c == b'=' {
            continue;
        }
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_on_a_char_boundary_and_says_so() {
        let (text, cut) = truncate("héllo", 2);
        assert!(cut);
        assert!(text.starts_with("h\n[output truncated"));
    }

    #[test]
    fn base64_decode_reads_padded_text() {
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
    }
}
