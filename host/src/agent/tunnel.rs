//! The host side of `Open::TcpConnect`: a byte stream to a TCP port on the
//! sandbox's loopback, for previews. After the agent's one [`TunnelReply`]
//! frame the stream is raw bytes, so the reply is read exactly (length,
//! then payload) and nothing of the connection is consumed with it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crownest_proto::frame::read_payload;
use crownest_proto::{Open, TunnelReply};
use tokio::io::{AsyncRead, AsyncWrite, Join, ReadBuf};

use super::{AgentClient, AgentError, Inner, StreamReader, StreamWriter};

/// A connection to a port inside the sandbox. Holds the agent connection
/// up while it is open.
pub struct Tunnel {
    io: Join<StreamReader, StreamWriter>,
    _client: Arc<Inner>,
}

impl AgentClient {
    /// Connects to `port` on the sandbox's loopback.
    pub async fn tcp_connect(&self, port: u16) -> Result<Tunnel, AgentError> {
        let (mut reader, writer) = self.open(&Open::TcpConnect { port }).await?;
        let payload = read_payload(&mut reader)
            .await
            .map_err(AgentError::from_read)?
            .ok_or(AgentError::Closed)?;
        match crownest_proto::decode::<TunnelReply>(&payload).map_err(AgentError::from_read)? {
            TunnelReply::Connected => Ok(Tunnel {
                io: tokio::io::join(reader, writer),
                _client: self.inner.clone(),
            }),
            TunnelReply::Failed { message } => Err(AgentError::PortUnreachable(message)),
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
