//! A running command's log in memory: output tails for its record, events
//! for live readers (coalesced, so a process writing one byte at a time
//! does not make one event per byte), retention by bytes and by count, and
//! the events not yet written to the store.

use std::collections::VecDeque;

use crate::clock::Millis;
use crate::model::OutputStream;
use crate::store::{CommandEventRow, LogBody};

/// How much output of one stream is merged into one event at most.
pub const COALESCE_BYTES: usize = 64 * 1024;
/// How long output may wait to be merged with what follows it.
pub const COALESCE_MS: Millis = 5;

/// One entry of a command log as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub seq: i64,
    pub body: LogBody,
}

impl From<CommandEventRow> for LogEvent {
    fn from(row: CommandEventRow) -> Self {
        LogEvent {
            seq: row.seq,
            body: row.body,
        }
    }
}

/// How much of a log is kept for replay.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub bytes: usize,
    pub events: usize,
}

/// The last `limit` bytes of an output stream.
#[derive(Debug, Default)]
pub struct Tail {
    bytes: VecDeque<u8>,
    pub dropped: i64,
}

impl Tail {
    pub fn push(&mut self, data: &[u8], limit: usize) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(limit);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.dropped += excess as i64;
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// Bytes kept.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// Holds back an incomplete UTF-8 sequence at the end of a chunk so that log
/// events split only on character boundaries.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    pub fn split(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.pending);
        data.extend_from_slice(chunk);
        let keep = incomplete_utf8_suffix(&data);
        self.pending = data.split_off(data.len() - keep);
        data
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Bytes held back.
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Length of a trailing, incomplete (but so far valid) UTF-8 sequence.
fn incomplete_utf8_suffix(data: &[u8]) -> usize {
    for back in 1..=3.min(data.len()) {
        let byte = data[data.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte: look further back
        }
        let needed = match byte {
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Output waiting to be merged into one event.
#[derive(Debug)]
struct Pending {
    stream: OutputStream,
    data: Vec<u8>,
    since: Millis,
}

/// The retained events of one command, oldest first, and what the store
/// does not have yet.
#[derive(Debug)]
pub struct Log {
    command_id: String,
    events: VecDeque<CommandEventRow>,
    retained_bytes: usize,
    next_seq: i64,
    pending: Option<Pending>,
    /// Events not yet in the store.
    pub unflushed: Vec<CommandEventRow>,
    pub unflushed_bytes: usize,
    /// Store events below this seq are to be deleted (retention).
    pub trim_from: Option<i64>,
    retention: Retention,
}

impl Log {
    /// A log whose next event has number `next_seq` (1 for a new command).
    pub fn new(command_id: &str, next_seq: i64, retention: Retention) -> Self {
        Self {
            command_id: command_id.to_string(),
            events: VecDeque::new(),
            retained_bytes: 0,
            next_seq,
            pending: None,
            unflushed: Vec::new(),
            unflushed_bytes: 0,
            trim_from: None,
            retention,
        }
    }

    /// Adds output; it becomes an event when the stream changes, when
    /// [`COALESCE_BYTES`] are waiting, or at [`Log::flush_pending`].
    /// Returns whether an event was emitted.
    pub fn output(&mut self, stream: OutputStream, data: Vec<u8>, at: Millis) -> bool {
        if data.is_empty() {
            return false;
        }
        let mut emitted = false;
        if let Some(pending) = &self.pending
            && pending.stream != stream
        {
            emitted |= self.flush_pending();
        }
        match &mut self.pending {
            Some(pending) => pending.data.extend_from_slice(&data),
            None => {
                self.pending = Some(Pending {
                    stream,
                    data,
                    since: at,
                })
            }
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.data.len() >= COALESCE_BYTES)
        {
            emitted |= self.flush_pending();
        }
        emitted
    }

    /// Turns waiting output into events (at most [`COALESCE_BYTES`] each).
    pub fn flush_pending(&mut self) -> bool {
        let Some(pending) = self.pending.take() else {
            return false;
        };
        for chunk in pending.data.chunks(COALESCE_BYTES) {
            self.push(
                LogBody::Output {
                    stream: pending.stream,
                    data: chunk.to_vec(),
                },
                pending.since,
            );
        }
        true
    }

    /// Appends an event (the exit, or coalesced output) and applies
    /// retention: the oldest events go past the limits; the newest stays.
    pub fn push(&mut self, body: LogBody, at: Millis) {
        let event = CommandEventRow {
            command_id: self.command_id.clone(),
            seq: self.next_seq,
            body,
            at,
        };
        self.next_seq += 1;
        let len = event.body.len();
        self.retained_bytes += len;
        self.unflushed_bytes += len;
        self.events.push_back(event.clone());
        self.unflushed.push(event);
        while (self.retained_bytes > self.retention.bytes
            || self.events.len() > self.retention.events)
            && self.events.len() > 1
        {
            if let Some(old) = self.events.pop_front() {
                self.retained_bytes -= old.body.len();
                self.trim_from = Some(old.seq + 1);
            }
        }
    }

    /// Retained events after `after`, found by binary search.
    pub fn after(&self, after: i64) -> Vec<CommandEventRow> {
        let start = self.events.partition_point(|e| e.seq <= after);
        self.events.range(start..).cloned().collect()
    }

    /// The seq of the oldest retained event; with none, the next one's
    /// (so that a reader of a command taken over after a restart, whose
    /// memory starts empty, fetches what came before from the store).
    pub fn first_seq(&self) -> Option<i64> {
        Some(self.events.front().map_or(self.next_seq, |e| e.seq))
    }

    /// Takes what the store does not have yet.
    pub fn take_unflushed(&mut self) -> (Vec<CommandEventRow>, Option<i64>) {
        self.unflushed_bytes = 0;
        (std::mem::take(&mut self.unflushed), self.trim_from.take())
    }

    /// Retained events.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(bytes: usize, events: usize) -> Retention {
        Retention { bytes, events }
    }

    fn output(log: &Log) -> Vec<(OutputStream, Vec<u8>)> {
        log.after(0)
            .into_iter()
            .filter_map(|e| match e.body {
                LogBody::Output { stream, data } => Some((stream, data)),
                LogBody::Exit(_) => None,
            })
            .collect()
    }

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_dropped() {
        let mut tail = Tail::default();
        tail.push(b"hello ", 8);
        tail.push(b"world", 8);
        assert_eq!(tail.to_vec(), b"lo world");
        assert_eq!(tail.dropped, 3);
    }

    #[test]
    fn utf8_carry_never_splits_a_character() {
        let text = "héllo wörld €".as_bytes();
        for split in 0..text.len() {
            let mut carry = Utf8Carry::default();
            let mut out = carry.split(&text[..split]);
            assert!(std::str::from_utf8(&out).is_ok(), "split at {split}");
            out.extend(carry.split(&text[split..]));
            out.extend(carry.finish());
            assert_eq!(out, text);
        }
    }

    #[test]
    fn utf8_carry_passes_invalid_bytes_through() {
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.split(&[0xff, b'a']), vec![0xff, b'a']);
    }

    #[test]
    fn one_byte_writes_coalesce_into_one_event() {
        let mut log = Log::new("cmd", 1, retention(1 << 20, 1000));
        for i in 0..5000 {
            log.output(OutputStream::Stdout, vec![b'x'], i / 100);
        }
        log.flush_pending();
        let events = output(&log);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1.len(), 5000);
    }

    #[test]
    fn a_change_of_stream_and_the_size_cap_end_an_event() {
        let mut log = Log::new("cmd", 1, retention(1 << 30, 1000));
        log.output(OutputStream::Stdout, b"a".to_vec(), 0);
        log.output(OutputStream::Stderr, b"b".to_vec(), 0);
        log.output(OutputStream::Stdout, vec![b'c'; COALESCE_BYTES + 10], 0);
        log.flush_pending();
        let events = output(&log);
        let sizes: Vec<(OutputStream, usize)> = events.iter().map(|(s, d)| (*s, d.len())).collect();
        assert_eq!(
            sizes,
            [
                (OutputStream::Stdout, 1),
                (OutputStream::Stderr, 1),
                (OutputStream::Stdout, COALESCE_BYTES),
                (OutputStream::Stdout, 10),
            ]
        );
    }

    #[test]
    fn retention_drops_oldest_events_by_bytes_and_by_count() {
        let mut log = Log::new("cmd", 1, retention(350, 1000));
        for _ in 0..10 {
            log.output(OutputStream::Stdout, vec![b'x'; 100], 0);
            log.flush_pending();
        }
        assert!(log.retained_bytes <= 350);
        assert_eq!(log.after(0).last().map(|e| e.seq), Some(10));
        assert_eq!(log.trim_from, Some(8));

        let mut log = Log::new("cmd", 1, retention(1 << 20, 4));
        for _ in 0..10 {
            log.output(OutputStream::Stdout, b"y".to_vec(), 0);
            log.flush_pending();
        }
        assert_eq!(log.len(), 4);
        assert_eq!(log.first_seq(), Some(7));
    }

    #[test]
    fn after_finds_the_resume_point_by_binary_search() {
        let mut log = Log::new("cmd", 1, retention(1 << 20, 1000));
        for _ in 0..100 {
            log.output(OutputStream::Stdout, b"z".to_vec(), 0);
            log.flush_pending();
        }
        let seqs: Vec<i64> = log.after(97).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [98, 99, 100]);
        assert!(log.after(100).is_empty());
        assert_eq!(log.after(-1).len(), 100);
    }
}
