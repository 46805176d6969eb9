//! The yamux settings both ends of a session use.
//!
//! yamux splits every write into data frames of at most
//! `split_send_size` bytes (16 KiB by default) and hands each one to the
//! connection task through a channel, so a 64 KiB file chunk cost four hops.
//! One protocol frame per yamux frame keeps bulk transfers cheap; yamux itself
//! refuses frame bodies over 1 MiB, so this stays well inside what a peer
//! accepts.

/// The yamux configuration of the host and of the agent.
pub fn config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_split_send_size(crate::MAX_FRAME_LEN + crate::frame::HEADER_LEN);
    config
}
