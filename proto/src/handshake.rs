//! The session handshake on the raw transport, before yamux starts.
//!
//! The host writes [`HELLO_MAGIC`], a little-endian `u32` length and a
//! postcard [`Hello`]; the agent answers [`ACK_MAGIC`], a length and a
//! postcard [`HelloReply`]. Both sides *scan* for the magic and discard what
//! precedes it (bounded by [`MAX_SCAN_BYTES`]): a serial line has no
//! "connect", so it may still hold bytes of an earlier session. The host
//! accepts only an ack that echoes its own [`Hello::session_nonce`] and skips
//! older ones.
//!
//! The parsing is a sans-I/O state machine ([`Scanner`]) that asks for exactly
//! the bytes it needs next, so the async wrappers never read past the
//! handshake message into the yamux bytes that follow it, and the fuzz target
//! can drive it over a slice ([`scan_reply`]).

use crate::{
    Hello, HelloAck, HelloReject, HelloReply, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtoError,
};

/// Starts the host's [`Hello`].
pub const HELLO_MAGIC: [u8; 8] = *b"\0CNHELLO";

/// Starts the agent's [`HelloReply`].
pub const ACK_MAGIC: [u8; 8] = *b"\0CNHACK!";

/// Upper bound of a handshake message's payload. Both messages are a few
/// dozen bytes; a larger announced length is garbage or hostile.
pub const MAX_HANDSHAKE_LEN: usize = 4096;

/// How many bytes a side reads while looking for the message before it gives
/// up (garbage before the magic plus skipped stale messages).
pub const MAX_SCAN_BYTES: usize = 16 * 1024 * 1024;

const LEN_BYTES: usize = 4;

#[derive(Debug)]
enum State {
    /// Looking for the magic; `window` holds the last bytes seen.
    Magic { window: [u8; 8], seen: usize },
    /// Magic found; collecting the length prefix.
    Len { bytes: [u8; LEN_BYTES], have: usize },
    /// Collecting `len` payload bytes.
    Body { payload: Vec<u8>, len: usize },
}

/// Finds one magic-prefixed, length-prefixed message in a byte stream.
///
/// Feed it with [`Scanner::push`]; it never consumes more than the current
/// message, and [`Scanner::wanted`] says how many bytes it can take next
/// without over-reading.
#[derive(Debug)]
pub struct Scanner {
    magic: [u8; 8],
    state: State,
    /// Bytes consumed since the scanner was created, for [`MAX_SCAN_BYTES`].
    consumed: usize,
}

impl Scanner {
    pub fn new(magic: [u8; 8]) -> Self {
        Self {
            magic,
            state: State::Magic {
                window: [0; 8],
                seen: 0,
            },
            consumed: 0,
        }
    }

    /// How many bytes the scanner can take next without reading past the end
    /// of the current message (always at least one).
    pub fn wanted(&self) -> usize {
        match &self.state {
            // One byte at a time: the magic may start at any byte.
            State::Magic { .. } => 1,
            State::Len { have, .. } => LEN_BYTES - have,
            State::Body { payload, len } => (len - payload.len()).max(1),
        }
    }

    /// Consumes bytes from `input` (at most up to the end of the current
    /// message). Returns how many were consumed and, when the message is
    /// complete, its payload; the scanner then looks for the next magic.
    pub fn push(&mut self, input: &[u8]) -> Result<(usize, Option<Vec<u8>>), ProtoError> {
        let mut used = 0;
        while used < input.len() {
            if self.consumed >= MAX_SCAN_BYTES {
                return Err(ProtoError::Handshake(format!(
                    "no handshake message within {MAX_SCAN_BYTES} bytes"
                )));
            }
            match &mut self.state {
                State::Magic { window, seen } => {
                    window.copy_within(1.., 0);
                    window[7] = input[used];
                    *seen = (*seen + 1).min(8);
                    used += 1;
                    self.consumed += 1;
                    if *seen == 8 && *window == self.magic {
                        self.state = State::Len {
                            bytes: [0; LEN_BYTES],
                            have: 0,
                        };
                    }
                }
                State::Len { bytes, have } => {
                    let take = (LEN_BYTES - *have).min(input.len() - used);
                    bytes[*have..*have + take].copy_from_slice(&input[used..used + take]);
                    *have += take;
                    used += take;
                    self.consumed += take;
                    if *have == LEN_BYTES {
                        let len = u32::from_le_bytes(*bytes) as usize;
                        if len > MAX_HANDSHAKE_LEN {
                            return Err(ProtoError::FrameTooLarge {
                                len,
                                max: MAX_HANDSHAKE_LEN,
                            });
                        }
                        self.state = State::Body {
                            payload: Vec::with_capacity(len),
                            len,
                        };
                        if len == 0 {
                            return Ok((used, Some(self.finish())));
                        }
                    }
                }
                State::Body { payload, len } => {
                    let take = (*len - payload.len()).min(input.len() - used);
                    payload.extend_from_slice(&input[used..used + take]);
                    used += take;
                    self.consumed += take;
                    if payload.len() == *len {
                        return Ok((used, Some(self.finish())));
                    }
                }
            }
        }
        Ok((used, None))
    }

    /// Takes the completed payload and goes back to scanning for the magic.
    fn finish(&mut self) -> Vec<u8> {
        let state = std::mem::replace(
            &mut self.state,
            State::Magic {
                window: [0; 8],
                seen: 0,
            },
        );
        match state {
            State::Body { payload, .. } => payload,
            _ => Vec::new(),
        }
    }
}

/// Encodes a handshake message with its magic and length prefix.
pub fn encode_message<T: serde::Serialize>(
    magic: [u8; 8],
    message: &T,
) -> Result<Vec<u8>, ProtoError> {
    let payload = postcard::to_stdvec(message)?;
    if payload.len() > MAX_HANDSHAKE_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload.len(),
            max: MAX_HANDSHAKE_LEN,
        });
    }
    let mut out = Vec::with_capacity(magic.len() + LEN_BYTES + payload.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The host's [`Hello`] for a session with this nonce.
pub fn hello(session_nonce: u64) -> Hello {
    Hello {
        max_version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        session_nonce,
    }
}

/// The highest version both this build and a peer offering
/// `peer_min..=peer_max` speak, if any.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let high = peer_max.min(PROTOCOL_VERSION);
    let low = peer_min.max(MIN_PROTOCOL_VERSION);
    (low <= high && peer_min <= peer_max).then_some(high)
}

/// What the host makes of one reply payload.
#[derive(Debug)]
pub enum ReplyVerdict {
    /// Our ack: the session may start.
    Accepted(HelloAck),
    /// A reply for another session (stale bytes): keep scanning.
    Stale,
}

/// Judges one reply payload received by the host of session `nonce`.
pub fn judge_reply(payload: &[u8], nonce: u64) -> Result<ReplyVerdict, ProtoError> {
    match crate::decode::<HelloReply>(payload)? {
        HelloReply::Ack(ack) if ack.session_nonce == nonce => {
            if ack.version < MIN_PROTOCOL_VERSION || ack.version > PROTOCOL_VERSION {
                return Err(ProtoError::Handshake(format!(
                    "agent chose protocol version {} outside {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                    ack.version
                )));
            }
            Ok(ReplyVerdict::Accepted(ack))
        }
        HelloReply::Reject(HelloReject {
            session_nonce,
            min_version,
            max_version,
        }) if session_nonce == nonce => Err(ProtoError::VersionMismatch {
            min: min_version,
            max: max_version,
            our_min: MIN_PROTOCOL_VERSION,
            our_max: PROTOCOL_VERSION,
        }),
        _ => Ok(ReplyVerdict::Stale),
    }
}

/// Scans `input` (bytes the host received) for the ack of session `nonce`.
/// Returns the ack and how many bytes it consumed, `Ok(None)` when `input`
/// ends first. Slice-based twin of [`host_handshake`]'s reading, for the fuzz
/// target and tests.
pub fn scan_reply(input: &[u8], nonce: u64) -> Result<Option<(HelloAck, usize)>, ProtoError> {
    let mut scanner = Scanner::new(ACK_MAGIC);
    let mut offset = 0;
    while offset < input.len() {
        let (used, payload) = scanner.push(&input[offset..])?;
        offset += used;
        if let Some(payload) = payload
            && let ReplyVerdict::Accepted(ack) = judge_reply(&payload, nonce)?
        {
            return Ok(Some((ack, offset)));
        }
    }
    Ok(None)
}

#[cfg(feature = "tokio")]
mod io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads exactly one message found by `scanner`, never past its end.
    async fn next_message<R: AsyncRead + Unpin>(
        reader: &mut R,
        scanner: &mut Scanner,
    ) -> Result<Vec<u8>, ProtoError> {
        let mut buf = [0u8; 512];
        loop {
            let want = scanner.wanted().min(buf.len());
            let n = reader.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(ProtoError::Handshake(
                    "transport closed during the handshake".into(),
                ));
            }
            let mut offset = 0;
            while offset < n {
                let (used, payload) = scanner.push(&buf[offset..n])?;
                offset += used;
                if let Some(payload) = payload {
                    // `wanted` never lets a read cross the message's end.
                    debug_assert_eq!(offset, n);
                    return Ok(payload);
                }
            }
        }
    }

    /// The host side: sends a [`Hello`] with `nonce`, then waits for the ack
    /// that echoes it, skipping garbage and stale acks. Leaves `io` positioned
    /// right after the ack.
    pub async fn host_handshake<T: AsyncRead + AsyncWrite + Unpin>(
        io: &mut T,
        nonce: u64,
    ) -> Result<HelloAck, ProtoError> {
        let message = encode_message(HELLO_MAGIC, &hello(nonce))?;
        io.write_all(&message).await?;
        io.flush().await?;
        let mut scanner = Scanner::new(ACK_MAGIC);
        loop {
            let payload = next_message(io, &mut scanner).await?;
            match judge_reply(&payload, nonce) {
                Ok(ReplyVerdict::Accepted(ack)) => return Ok(ack),
                Ok(ReplyVerdict::Stale) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The agent side: scans for a [`Hello`], answers it, and returns it when
    /// a version was agreed (the negotiated version is
    /// [`negotiate`]`(hello.min_version, hello.max_version)`). A hello without
    /// a common version is answered with a reject and returned as
    /// [`ProtoError::VersionMismatch`]. Leaves `io` right after the hello.
    pub async fn agent_handshake<T: AsyncRead + AsyncWrite + Unpin>(
        io: &mut T,
        boot_id: u64,
        agent_version: &str,
    ) -> Result<Hello, ProtoError> {
        let mut scanner = Scanner::new(HELLO_MAGIC);
        let payload = next_message(io, &mut scanner).await?;
        let hello: Hello = crate::decode(&payload)?;
        let (reply, result) = match negotiate(hello.min_version, hello.max_version) {
            Some(version) => (
                HelloReply::Ack(HelloAck {
                    version,
                    session_nonce: hello.session_nonce,
                    agent_version: agent_version.to_owned(),
                    boot_id,
                }),
                Ok(hello),
            ),
            None => (
                HelloReply::Reject(HelloReject {
                    session_nonce: hello.session_nonce,
                    min_version: MIN_PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                }),
                Err(ProtoError::VersionMismatch {
                    min: hello.min_version,
                    max: hello.max_version,
                    our_min: MIN_PROTOCOL_VERSION,
                    our_max: PROTOCOL_VERSION,
                }),
            ),
        };
        let message = encode_message(ACK_MAGIC, &reply)?;
        io.write_all(&message).await?;
        io.flush().await?;
        result
    }
}

#[cfg(feature = "tokio")]
pub use io::{agent_handshake, host_handshake};

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn ack_bytes(nonce: u64, version: u16) -> Vec<u8> {
        encode_message(
            ACK_MAGIC,
            &HelloReply::Ack(HelloAck {
                version,
                session_nonce: nonce,
                agent_version: "test".into(),
                boot_id: 9,
            }),
        )
        .expect("encode")
    }

    #[tokio::test]
    async fn handshake_succeeds_and_leaves_following_bytes_unread() {
        let (mut host, mut agent) = duplex(1 << 16);
        let agent_task = tokio::spawn(async move {
            let hello = agent_handshake(&mut agent, 42, "1.2.3")
                .await
                .expect("agent");
            let mut rest = [0u8; 5];
            agent.read_exact(&mut rest).await.expect("rest");
            (hello, rest)
        });
        let ack = host_handshake(&mut host, 7).await.expect("host");
        host.write_all(b"yamux").await.expect("write");
        let (hello, rest) = agent_task.await.expect("join");
        assert_eq!(ack.session_nonce, 7);
        assert_eq!(ack.boot_id, 42);
        assert_eq!(ack.agent_version, "1.2.3");
        assert_eq!(ack.version, PROTOCOL_VERSION);
        assert_eq!(hello.session_nonce, 7);
        assert_eq!(&rest, b"yamux");
    }

    #[tokio::test]
    async fn agent_skips_garbage_before_magic() {
        let mut input = b"\0CNHELL garbage \0\0CNHELL".to_vec();
        input.extend(encode_message(HELLO_MAGIC, &hello(5)).expect("encode"));
        input.extend_from_slice(b"after");
        let (mut host, mut agent) = duplex(1 << 16);
        host.write_all(&input).await.expect("write");
        let hello = agent_handshake(&mut agent, 1, "v").await.expect("agent");
        assert_eq!(hello.session_nonce, 5);
        let mut rest = [0u8; 5];
        agent.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"after");
    }

    #[tokio::test]
    async fn host_skips_stale_ack_with_other_nonce() {
        let (mut host, mut agent) = duplex(1 << 16);
        let mut stale = b"old yamux bytes".to_vec();
        stale.extend(ack_bytes(1, PROTOCOL_VERSION));
        stale.extend(ack_bytes(2, PROTOCOL_VERSION));
        agent.write_all(&stale).await.expect("write");
        let agent_task =
            tokio::spawn(async move { agent_handshake(&mut agent, 77, "v").await.map(|_| agent) });
        let ack = host_handshake(&mut host, 3).await.expect("host");
        assert_eq!(ack.session_nonce, 3);
        assert_eq!(ack.boot_id, 77);
        agent_task.await.expect("join").expect("agent");
    }

    #[tokio::test]
    async fn version_mismatch_is_rejected_on_both_sides() {
        let (mut host, mut agent) = duplex(1 << 16);
        let future_hello = Hello {
            max_version: PROTOCOL_VERSION + 10,
            min_version: PROTOCOL_VERSION + 5,
            session_nonce: 11,
        };
        host.write_all(&encode_message(HELLO_MAGIC, &future_hello).expect("encode"))
            .await
            .expect("write");
        let agent_result = agent_handshake(&mut agent, 1, "v").await;
        assert!(matches!(
            agent_result,
            Err(ProtoError::VersionMismatch { .. })
        ));
        let mut reply = vec![0u8; 256];
        let n = host.read(&mut reply).await.expect("read");
        let mut scanner = Scanner::new(ACK_MAGIC);
        let (_, payload) = scanner.push(&reply[..n]).expect("scan");
        let verdict = judge_reply(&payload.expect("payload"), 11);
        assert!(matches!(verdict, Err(ProtoError::VersionMismatch { .. })));
    }

    #[test]
    fn host_rejects_ack_with_unknown_version() {
        let input = ack_bytes(4, PROTOCOL_VERSION + 1);
        assert!(matches!(
            scan_reply(&input, 4),
            Err(ProtoError::Handshake(_))
        ));
    }

    #[tokio::test]
    async fn oversized_length_is_refused() {
        let mut input = HELLO_MAGIC.to_vec();
        input.extend_from_slice(&u32::MAX.to_le_bytes());
        let (mut host, mut agent) = duplex(1 << 16);
        host.write_all(&input).await.expect("write");
        let result = agent_handshake(&mut agent, 1, "v").await;
        assert!(matches!(result, Err(ProtoError::FrameTooLarge { .. })));
    }

    #[test]
    fn scanner_gives_up_after_bounded_garbage() {
        let garbage = vec![0x55u8; MAX_SCAN_BYTES + 10];
        assert!(matches!(
            scan_reply(&garbage, 1),
            Err(ProtoError::Handshake(_))
        ));
    }

    #[test]
    fn scan_reply_finds_ack_split_anywhere() {
        let mut input = b"xx".to_vec();
        input.extend(ack_bytes(8, PROTOCOL_VERSION));
        let (ack, used) = scan_reply(&input, 8).expect("scan").expect("found");
        assert_eq!(used, input.len());
        assert_eq!(ack.boot_id, 9);
        assert!(
            scan_reply(&input[..input.len() - 1], 8)
                .expect("scan")
                .is_none()
        );
    }

    #[tokio::test]
    async fn eof_during_handshake_is_an_error() {
        let (host, mut agent) = duplex(64);
        drop(host);
        assert!(agent_handshake(&mut agent, 1, "v").await.is_err());
    }

    #[test]
    fn negotiate_picks_highest_common_version() {
        assert_eq!(negotiate(0, 100), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2), None);
        assert_eq!(negotiate(3, 2), None);
    }
}
