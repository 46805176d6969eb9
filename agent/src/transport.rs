//! Transports the agent listens on: a unix socket (runc) and a serial port
//! (virtio-serial in a microVM), plus the helper that lets a session over a
//! serial port restart on a new hello.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A character device (or any pollable fd) opened non-blocking and driven by
/// the reactor. `tokio::fs::File` would serialise reads and writes on the
/// blocking pool, and a read that waits for the host would block every write.
#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<File>,
}

impl FdStream {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        Self::from_file(file)
    }

    /// Wraps an fd that is already non-blocking.
    pub fn from_file(file: File) -> io::Result<Self> {
        // SAFETY: a `File` owns its fd, which stays open and unchanged until
        // the `AsyncFd` (which owns the `File`) is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Bytes kept from the end of what a session read, to find a new hello in.
const TAIL_LEN: usize = 256;

/// Wraps a reused transport (a serial port): remembers the last bytes read so
/// that when a yamux session breaks on a new host's hello, the hello bytes
/// yamux swallowed can be replayed to the next handshake.
#[derive(Debug)]
pub struct Replay<T> {
    inner: T,
    /// Bytes to serve before reading `inner` again.
    prefix: Vec<u8>,
    tail: Vec<u8>,
}

impl<T> Replay<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            prefix: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// Forgets the recent bytes: call after a handshake, so that an old
    /// hello is never replayed.
    pub fn forget(&mut self) {
        self.tail.clear();
    }

    /// Call when a session ended: the next reads start at the last (possibly
    /// partial) `magic` seen in the recent bytes, if any.
    pub fn rewind_to(&mut self, magic: &[u8]) {
        let tail = std::mem::take(&mut self.tail);
        if let Some(start) = magic_start(&tail, magic) {
            let mut prefix = tail[start..].to_vec();
            prefix.extend_from_slice(&self.prefix);
            self.prefix = prefix;
        }
    }
}

/// Start of the last full occurrence of `magic` in `bytes`, or of the longest
/// suffix of `bytes` that begins `magic`.
fn magic_start(bytes: &[u8], magic: &[u8]) -> Option<usize> {
    if let Some(pos) = bytes.windows(magic.len()).rposition(|w| w == magic) {
        return Some(pos);
    }
    (1..magic.len())
        .rev()
        .filter(|&n| n <= bytes.len())
        .find(|&n| bytes[bytes.len() - n..] == magic[..n])
        .map(|n| bytes.len() - n)
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
            this.tail
                .extend_from_slice(&buf.filled()[buf.filled().len() - n..]);
        } else {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            this.tail.extend_from_slice(&buf.filled()[before..]);
        }
        if this.tail.len() > TAIL_LEN {
            let excess = this.tail.len() - TAIL_LEN;
            this.tail.drain(..excess);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_start_finds_full_and_partial_magic() {
        assert_eq!(magic_start(b"xxMAGICyy", b"MAGIC"), Some(2));
        assert_eq!(magic_start(b"xxMAG", b"MAGIC"), Some(2));
        assert_eq!(magic_start(b"xxyy", b"MAGIC"), None);
    }
}
