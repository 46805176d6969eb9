//! `Open::TcpConnect`: a byte tunnel from the host to a TCP port on the
//! sandbox's own loopback, for previews. The agent is PID 1 in the
//! sandbox's network namespace, so `127.0.0.1` here is the sandbox's
//! loopback, never the host's.

use std::time::Duration;

use crownest_proto::TunnelReply;
use crownest_proto::frame::write_message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connect may take before the preview request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(port: u16) -> Result<TcpStream, String> {
    let mut last = String::from("no address tried");
    // IPv4 loopback first; servers that bind only `::1` are found too.
    for address in [
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ] {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = format!("connect to {address}: {e}"),
            Err(_) => last = format!("connect to {address}: timed out"),
        }
    }
    Err(last)
}

/// Connects, answers, then copies bytes both ways until both sides close.
pub async fn serve<R, W>(port: u16, reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut upstream = match connect(port).await {
        Ok(stream) => stream,
        Err(message) => {
            if write_message(&mut writer, &TunnelReply::Failed { message })
                .await
                .is_ok()
            {
                let _ = writer.shutdown().await;
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if write_message(&mut writer, &TunnelReply::Connected)
        .await
        .is_err()
    {
        return;
    }
    let mut host = tokio::io::join(reader, writer);
    // Either side closing its write half is passed on as a shutdown; an
    // error on either ends the tunnel (both sockets are dropped here).
    let _ = tokio::io::copy_bidirectional(&mut host, &mut upstream).await;
}
