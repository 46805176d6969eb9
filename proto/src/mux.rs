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

#[cfg(test)]
mod tests {
    use std::future::{Future, poll_fn};
    use std::task::Poll;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

    const TOTAL: usize = 8 << 20;

    /// Writes `TOTAL` bytes on one half and reads `TOTAL` on the other,
    /// each in its own task: how the agent serves an exec (output out in
    /// one task, the host's acks in another).
    async fn both_ways(stream: yamux::Stream) {
        let (mut reader, mut writer) = tokio::io::split(stream.compat());
        let write = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            let mut sent = 0;
            while sent < TOTAL {
                writer.write_all(&chunk).await.expect("write");
                sent += chunk.len();
            }
            writer
        });
        let read = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut got = 0;
            while got < TOTAL {
                let n = reader.read(&mut buf).await.expect("read");
                assert!(n > 0, "the stream ended after {got} bytes");
                got += n;
            }
        });
        read.await.expect("reader");
        drop(write.await.expect("writer"));
    }

    /// Both halves of one stream used from two tasks on each end stalled
    /// with yamux 0.13: the halves shared one channel sender and so one
    /// waker slot, and a window update queued by the reader took the
    /// writer's wake-up (rust-yamux issue 232). Output of a command the
    /// host was acknowledging then stopped mid-way, for good.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_split_across_tasks_does_not_lose_wake_ups() {
        // A small pipe keeps the connections' writes pending often.
        let (client_io, server_io) = tokio::io::duplex(4 * 1024);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut connection =
                yamux::Connection::new(server_io.compat(), super::config(), yamux::Mode::Server);
            let Some(Ok(stream)) = poll_fn(|cx| connection.poll_next_inbound(cx)).await else {
                return;
            };
            let served = tokio::spawn(both_ways(stream));
            let mut done_tx = Some(done_tx);
            let mut served = Some(served);
            // Drive the connection until the client goes; report when this
            // end has read and sent everything.
            poll_fn(|cx| {
                if let Some(task) = served.as_mut()
                    && let Poll::Ready(result) = std::pin::Pin::new(task).poll(cx)
                {
                    served = None;
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(result.is_ok());
                    }
                }
                match connection.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_))) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Ready(_) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
        });
        let mut connection =
            yamux::Connection::new(client_io.compat(), super::config(), yamux::Mode::Client);
        let stream = poll_fn(|cx| connection.poll_new_outbound(cx))
            .await
            .expect("outbound");
        let served = tokio::spawn(both_ways(stream));
        let drive = poll_fn(|cx| match connection.poll_next_inbound(cx) {
            Poll::Ready(ended) => Poll::Ready(ended.map(|r| r.map(|_| ()))),
            Poll::Pending => Poll::Pending,
        });
        let both = async {
            served.await.expect("client side");
            assert!(done_rx.await.expect("server side reported"), "server side");
        };
        tokio::select! {
            ended = drive => panic!("the client connection ended: {ended:?}"),
            result = tokio::time::timeout(Duration::from_secs(60), both) => {
                result.expect("both directions finished: no lost wake-up");
            }
        }
    }
}
