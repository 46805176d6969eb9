//! The output an exec holds for its host: every byte the process wrote that
//! the host has not acknowledged yet, in arrival order, so that a host that
//! attaches again (after a restart) gets it from the offsets it recorded.
//!
//! Offsets are per stream and count every byte ever produced: byte `n` of
//! stdout is stdout offset `n` whoever was attached when it arrived. Below
//! [`Output::held_from`] of a stream everything is forgotten, acknowledged
//! ([`Output::ack`]) or dropped by the cap ([`Output::new`]); from there on
//! every byte is held. Nothing here does I/O.

use std::collections::VecDeque;

use crownest_proto::MAX_CHUNK_LEN;

/// Upper bound of held entries. Adjacent pieces of one stream share an
/// entry, but stdout and stderr written alternately in tiny pieces would
/// otherwise cost far more memory than their bytes.
const MAX_ENTRIES: usize = 64 * 1024;

/// Which of the process's output pipes a byte came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Consecutive bytes of one stream.
struct Entry {
    stream: Stream,
    /// Offset of the first byte within its stream.
    start: u64,
    /// Offset of the first byte in the arrival order of both streams.
    global: u64,
    bytes: Vec<u8>,
}

impl Entry {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn end(&self) -> u64 {
        self.start + self.len()
    }

    fn global_end(&self) -> u64 {
        self.global + self.len()
    }

    /// Forgets the first `n` bytes.
    fn trim_front(&mut self, n: u64) {
        self.bytes.drain(..n as usize);
        self.start += n;
        self.global += n;
    }
}

/// How far one attached stream has got through the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Per stream: every byte below this was sent, or was not asked for.
    sent: [u64; 2],
    /// In arrival order: every byte below this was looked at (sent or
    /// skipped). What keeps the supervisor from dropping unsent bytes.
    global: u64,
}

/// The held output of one exec.
pub struct Output {
    /// In arrival order; per stream contiguous, from `held_from` to `total`.
    entries: VecDeque<Entry>,
    /// Bytes ever produced, per stream.
    total: [u64; 2],
    /// Bytes ever produced, both streams.
    arrived: u64,
    /// Per stream: bytes below this offset are no longer held.
    held_from: [u64; 2],
    /// Per stream: bytes dropped because the cap was reached.
    dropped: [u64; 2],
    /// Bytes in `entries`.
    held: u64,
    /// Upper bound of `held`.
    cap: u64,
}

impl std::fmt::Debug for Output {
    // Not the bytes: up to the cap of them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("entries", &self.entries.len())
            .field("total", &self.total)
            .field("held_from", &self.held_from)
            .field("dropped", &self.dropped)
            .field("held", &self.held)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Output {
    /// Holds at most `cap` bytes (the oldest are dropped beyond it).
    pub fn new(cap: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            total: [0; 2],
            arrived: 0,
            held_from: [0; 2],
            dropped: [0; 2],
            held: 0,
            cap,
        }
    }

    /// Appends what the process wrote, dropping the oldest bytes beyond the
    /// cap.
    pub fn push(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let s = stream.index();
        let len = bytes.len() as u64;
        match self.entries.back_mut() {
            // The last entry is the newest of its stream, so it ends at the
            // stream's total.
            Some(last)
                if last.stream == stream && last.bytes.len() + bytes.len() <= MAX_CHUNK_LEN =>
            {
                last.bytes.extend_from_slice(bytes);
            }
            _ => self.entries.push_back(Entry {
                stream,
                start: self.total[s],
                global: self.arrived,
                bytes: bytes.to_vec(),
            }),
        }
        self.total[s] += len;
        self.arrived += len;
        self.held += len;
        self.enforce_cap();
    }

    fn enforce_cap(&mut self) {
        while self.held > self.cap || self.entries.len() > MAX_ENTRIES {
            let too_many = self.entries.len() > MAX_ENTRIES;
            let Some(front) = self.entries.front_mut() else {
                return;
            };
            let s = front.stream.index();
            let n = if too_many {
                front.len()
            } else {
                (self.held - self.cap).min(front.len())
            };
            // The front entry is the oldest of its stream.
            self.held_from[s] = self.held_from[s].max(front.start + n);
            self.dropped[s] += n;
            self.held -= n;
            if n == front.len() {
                self.entries.pop_front();
            } else {
                front.trim_front(n);
            }
        }
    }

    /// Forgets everything below these offsets (the host recorded it). An
    /// offset beyond what was produced counts as what was produced.
    pub fn ack(&mut self, stdout: u64, stderr: u64) {
        let upto = [stdout.min(self.total[0]), stderr.min(self.total[1])];
        self.held_from = [
            self.held_from[0].max(upto[0]),
            self.held_from[1].max(upto[1]),
        ];
        let held_from = self.held_from;
        let mut held = self.held;
        self.entries.retain_mut(|entry| {
            let from = held_from[entry.stream.index()];
            if entry.end() <= from {
                held -= entry.len();
                false
            } else {
                if entry.start < from {
                    let n = from - entry.start;
                    held -= n;
                    entry.trim_front(n);
                }
                true
            }
        });
        self.held = held;
    }

    /// A cursor that resumes at these offsets, and per stream how many bytes
    /// at or after them are no longer held (the replay starts after them).
    pub fn cursor_from(&self, stdout: u64, stderr: u64) -> (Cursor, [u64; 2]) {
        let from = [stdout, stderr];
        let lost = [
            self.held_from[0].saturating_sub(from[0]),
            self.held_from[1].saturating_sub(from[1]),
        ];
        let cursor = Cursor {
            sent: [
                from[0].max(self.held_from[0]),
                from[1].max(self.held_from[1]),
            ],
            global: 0,
        };
        (cursor, lost)
    }

    /// The next bytes `cursor` has not sent, in arrival order (each piece
    /// of one stream and at most [`MAX_CHUNK_LEN`]), advancing it.
    pub fn next(&self, cursor: &mut Cursor) -> Option<(Stream, Vec<u8>)> {
        let mut index = self
            .entries
            .partition_point(|entry| entry.global_end() <= cursor.global);
        while let Some(entry) = self.entries.get(index) {
            let s = entry.stream.index();
            let from = cursor.sent[s].max(entry.start);
            // The last entry may still grow; `sent` then finds its new bytes.
            cursor.global = entry.global_end();
            if from < entry.end() {
                cursor.sent[s] = entry.end();
                let bytes = entry.bytes[(from - entry.start) as usize..].to_vec();
                return Some((entry.stream, bytes));
            }
            index += 1;
        }
        // Nothing held is left to send: whatever is missing in between was
        // forgotten.
        cursor.global = self.arrived;
        None
    }

    /// How many bytes the process may add now without the cap dropping any
    /// that `cursor` has not looked at: 0 while its stream is that far
    /// behind (the process then waits, as on a full pipe).
    pub fn room(&self, cursor: &Cursor) -> usize {
        // Bytes before the oldest held one are gone, so as good as looked at.
        let oldest = self
            .entries
            .front()
            .map_or(self.arrived, |entry| entry.global);
        let looked_at = cursor.global.max(oldest).min(self.arrived);
        let pending_entries = self.entries.len()
            - self
                .entries
                .partition_point(|entry| entry.global_end() <= looked_at);
        if pending_entries >= MAX_ENTRIES {
            return 0;
        }
        let pending = self.arrived - looked_at;
        self.cap.saturating_sub(pending).min(MAX_CHUNK_LEN as u64) as usize
    }

    /// Per stream, bytes dropped because the cap was reached.
    pub fn dropped(&self) -> [u64; 2] {
        self.dropped
    }

    /// Per stream, the offset of the oldest byte still held.
    #[cfg(test)]
    pub fn held_from(&self) -> [u64; 2] {
        self.held_from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a fresh cursor from these offsets gets, per stream, and
    /// the order of the pieces.
    fn replay(output: &Output, stdout: u64, stderr: u64) -> (Vec<(Stream, Vec<u8>)>, [u64; 2]) {
        let (mut cursor, lost) = output.cursor_from(stdout, stderr);
        let mut pieces = Vec::new();
        while let Some(piece) = output.next(&mut cursor) {
            pieces.push(piece);
        }
        (pieces, lost)
    }

    #[test]
    fn replay_keeps_arrival_order_and_starts_at_the_offsets() {
        let mut output = Output::new(1 << 20);
        output.push(Stream::Stdout, b"one\n");
        output.push(Stream::Stderr, b"err\n");
        output.push(Stream::Stdout, b"two\n");
        let (pieces, lost) = replay(&output, 2, 0);
        assert_eq!(
            pieces,
            [
                (Stream::Stdout, b"e\n".to_vec()),
                (Stream::Stderr, b"err\n".to_vec()),
                (Stream::Stdout, b"two\n".to_vec()),
            ]
        );
        assert_eq!(lost, [0, 0]);
    }

    #[test]
    fn a_cursor_gets_bytes_appended_to_an_entry_it_already_sent() {
        let mut output = Output::new(1 << 20);
        output.push(Stream::Stdout, b"ab");
        let (mut cursor, _) = output.cursor_from(0, 0);
        assert_eq!(
            output.next(&mut cursor),
            Some((Stream::Stdout, b"ab".to_vec()))
        );
        assert_eq!(output.next(&mut cursor), None);
        output.push(Stream::Stdout, b"cd");
        assert_eq!(
            output.next(&mut cursor),
            Some((Stream::Stdout, b"cd".to_vec()))
        );
        assert_eq!(output.next(&mut cursor), None);
    }

    #[test]
    fn ack_trims_partial_entries_and_attach_below_it_counts_lost_bytes() {
        let mut output = Output::new(1 << 20);
        output.push(Stream::Stdout, b"hello\n");
        output.push(Stream::Stderr, b"world\n");
        output.ack(3, 2);
        assert_eq!(output.held_from(), [3, 2]);
        let (pieces, lost) = replay(&output, 1, 0);
        assert_eq!(lost, [2, 2]);
        assert_eq!(
            pieces,
            [
                (Stream::Stdout, b"lo\n".to_vec()),
                (Stream::Stderr, b"rld\n".to_vec()),
            ]
        );
        let (pieces, lost) = replay(&output, 4, 5);
        assert_eq!(lost, [0, 0]);
        assert_eq!(
            pieces,
            [
                (Stream::Stdout, b"o\n".to_vec()),
                (Stream::Stderr, b"\n".to_vec()),
            ]
        );
    }

    #[test]
    fn ack_beyond_the_output_forgets_only_what_exists() {
        let mut output = Output::new(1 << 20);
        output.push(Stream::Stdout, b"abc");
        output.ack(100, 100);
        output.push(Stream::Stdout, b"def");
        let (pieces, lost) = replay(&output, 3, 0);
        assert_eq!(pieces, [(Stream::Stdout, b"def".to_vec())]);
        assert_eq!(lost, [0, 0]);
    }

    #[test]
    fn the_cap_drops_the_oldest_bytes_and_counts_them_per_stream() {
        let mut output = Output::new(10);
        output.push(Stream::Stderr, b"EEEE");
        output.push(Stream::Stdout, b"0123456789");
        assert_eq!(output.dropped(), [0, 4]);
        output.push(Stream::Stdout, b"ab");
        assert_eq!(output.dropped(), [2, 4]);
        let (pieces, lost) = replay(&output, 0, 0);
        assert_eq!(lost, [2, 4]);
        assert_eq!(pieces, [(Stream::Stdout, b"23456789ab".to_vec())]);
    }

    #[test]
    fn room_never_lets_the_cap_drop_bytes_a_cursor_has_not_sent() {
        let mut output = Output::new(100);
        let (mut cursor, _) = output.cursor_from(0, 0);
        let mut received = [Vec::new(), Vec::new()];
        let mut produced = [Vec::new(), Vec::new()];
        let mut next_byte = 0u8;
        for round in 0..400usize {
            // The producer fills whatever room it gets; the consumer takes
            // one piece every third round.
            let room = output.room(&cursor);
            if room > 0 {
                let stream = if round % 5 == 0 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                let bytes: Vec<u8> = (0..room.min(7))
                    .map(|_| {
                        next_byte = next_byte.wrapping_add(1);
                        next_byte
                    })
                    .collect();
                produced[stream.index()].extend(&bytes);
                output.push(stream, &bytes);
            }
            if round % 3 == 0
                && let Some((stream, bytes)) = output.next(&mut cursor)
            {
                received[stream.index()].extend(bytes);
            }
        }
        while let Some((stream, bytes)) = output.next(&mut cursor) {
            received[stream.index()].extend(bytes);
        }
        assert!(output.dropped().iter().sum::<u64>() > 0);
        assert_eq!(received, produced);
    }
}
