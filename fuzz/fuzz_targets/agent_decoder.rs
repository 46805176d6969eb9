//! Everything the host decodes from the agent, fed arbitrary bytes: the
//! handshake ack scanner, the frame decoder and the message decoders. None
//! may panic or allocate beyond its bound.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run agent_decoder`

#![no_main]

use crownest_proto::frame::FrameDecoder;
use crownest_proto::handshake::scan_reply;
use crownest_proto::{ExecEvent, HelloReply, Pong, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is split into pushes, so that
    // reassembly across arbitrary boundaries is exercised too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let _ = scan_reply(data, 0x0123_4567_89ab_cdef);

    let mut decoder = FrameDecoder::new();
    let step = usize::from(split).max(1);
    for piece in data.chunks(step) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = decode::<ExecEvent>(&frame);
                    let _ = decode::<HelloReply>(&frame);
                    let _ = decode::<Pong>(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
