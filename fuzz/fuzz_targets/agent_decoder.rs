//! Everything the host decodes from the agent, fed arbitrary bytes: the
//! handshake ack scanner, the frame decoder and one decoder per agent reply
//! type (`ExecEvent`, `HelloReply`, `Pong`, `FileReply`, `RunEvent`,
//! `ContextReply`, `TunnelReply`), picked by the input's first byte. None
//! may panic or allocate beyond its bound. The harness and its generators
//! live in `crownest_proto::fuzzing`.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run agent_decoder`

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    crownest_proto::fuzzing::agent_bytes(data);
});
