//! Inputs and harnesses for fuzzing everything the host decodes from an
//! agent: the handshake ack scanner, the frame decoder, and one decoder per
//! agent reply type. The cargo-fuzz target in `fuzz/` is a thin call of
//! [`agent_bytes`]; the generators here also feed a deterministic test, so
//! every build exercises the same code the fuzzer does.

use crate::code::{ContextReply, RunEnd, RunEvent};
use crate::frame::{FrameDecoder, wrap};
use crate::handshake::scan_reply;
use crate::{
    ExecEvent, FileErrorKind, FileInfo, FileKind, FileReply, HelloReply, Pong, TunnelReply,
};
use crate::{decode, encode};

/// The agent reply types, by the number a fuzz input picks them with.
pub const DECODERS: usize = 7;

/// Decodes one frame payload as reply type `which` (mod [`DECODERS`]).
/// Returns whether it decoded; never panics.
pub fn decode_reply(which: usize, payload: &[u8]) -> bool {
    match which % DECODERS {
        0 => decode::<ExecEvent>(payload).is_ok(),
        1 => decode::<HelloReply>(payload).is_ok(),
        2 => decode::<Pong>(payload).is_ok(),
        3 => decode::<FileReply>(payload).is_ok(),
        4 => decode::<RunEvent>(payload).is_ok(),
        5 => decode::<ContextReply>(payload).is_ok(),
        _ => decode::<TunnelReply>(payload).is_ok(),
    }
}

/// The whole host-side path for one fuzz input: the first byte picks the
/// reply type and how the rest is split into reads; the rest goes through
/// the ack scanner, then the frame decoder, each frame to the picked
/// decoder.
pub fn agent_bytes(data: &[u8]) {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let _ = scan_reply(data, 0x0123_4567_89ab_cdef);
    let which = usize::from(control & 0x0f);
    let step = usize::from(control >> 4) * 7 + 1;
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(step) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = decode_reply(which, &frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// A small deterministic generator (xorshift), so tests need no crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// Up to `max` random bytes.
    pub fn bytes_upto(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        self.bytes(len)
    }
}

/// A valid encoding of a reply of type `which`, for mutation.
pub fn valid_reply(which: usize, rng: &mut Rng) -> Vec<u8> {
    let text = String::from_utf8_lossy(&rng.bytes_upto(40)).into_owned();
    let info = FileInfo {
        name: text.clone(),
        kind: FileKind::File,
        size: rng.next_u64(),
        mode: 0o644,
        mtime_ms: rng.next_u64() as i64,
    };
    let encoded = match which % DECODERS {
        0 => encode(&ExecEvent::Stdout(rng.bytes_upto(100))),
        1 => encode(&HelloReply::Ack(crate::HelloAck {
            version: 1,
            session_nonce: rng.next_u64(),
            agent_version: text,
            boot_id: rng.next_u64(),
        })),
        2 => encode(&Pong {
            boot_id: rng.next_u64(),
            running: rng.next_u64() as u32,
        }),
        3 => match rng.below(3) {
            0 => encode(&FileReply::Entries(vec![info; rng.below(4)])),
            1 => encode(&FileReply::Error {
                kind: FileErrorKind::NotFound,
                message: text,
            }),
            _ => encode(&FileReply::Stat(info)),
        },
        4 => match rng.below(2) {
            0 => encode(&RunEvent::EventPart {
                data: rng.bytes_upto(200),
                last: rng.below(2) == 0,
            }),
            _ => encode(&RunEvent::Finished(RunEnd {
                timed_out: rng.below(2) == 0,
                interpreter_died: Some(text),
                restarted: false,
                unknown_context: false,
            })),
        },
        5 => encode(&ContextReply::Ready {
            implementation: text,
            warm: true,
        }),
        _ => encode(&TunnelReply::Failed { message: text }),
    };
    encoded.unwrap_or_default()
}

/// A fuzz-like input: frames of valid replies, some mutated or cut, some
/// garbage, behind a random control byte.
pub fn generated_input(rng: &mut Rng) -> Vec<u8> {
    let mut input = vec![rng.next_u64() as u8];
    for _ in 0..rng.below(6) {
        let which = usize::from(input[0] & 0x0f);
        let mut payload = valid_reply(which, rng);
        match rng.below(4) {
            0 if !payload.is_empty() => {
                let at = rng.below(payload.len());
                payload[at] ^= rng.next_u64() as u8;
            }
            1 => payload.truncate(rng.below(payload.len() + 1)),
            2 => payload = rng.bytes_upto(64),
            _ => {}
        }
        if let Ok(frame) = wrap(&payload) {
            input.extend(frame);
        }
    }
    if rng.below(3) == 0 {
        input.extend(rng.bytes_upto(32));
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_decoder_survives_generated_and_mutated_input() {
        let mut rng = Rng::new(0x5eed);
        for _ in 0..20_000 {
            agent_bytes(&generated_input(&mut rng));
        }
    }

    #[test]
    fn valid_replies_decode_as_their_type() {
        let mut rng = Rng::new(7);
        for which in 0..DECODERS {
            let payload = valid_reply(which, &mut rng);
            assert!(decode_reply(which, &payload), "decoder {which}");
        }
    }
}
