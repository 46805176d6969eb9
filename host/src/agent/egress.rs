//! The host side of `Open::EgressListen`: a stream offered to the agent's
//! egress proxy, answered once a program in the sandbox connects. After the
//! one [`EgressReply::Connected`] frame the stream is the connection's raw
//! bytes (the request frame is read exactly, nothing more).

use std::sync::Arc;

use crownest_proto::frame::{read_message, write_message};
use crownest_proto::{EgressReply, EgressRequest, MAX_EGRESS_HOST, Open};

use super::{AgentClient, AgentError, Inner, StreamReader, StreamWriter};

/// One offered stream, waiting for a connection in the sandbox.
pub struct EgressOffer {
    reader: StreamReader,
    writer: StreamWriter,
    _client: Arc<Inner>,
}

/// An answered offer: the connection's bytes, both ways. Holds the agent
/// connection up while it is open.
pub struct EgressStream {
    pub(crate) reader: StreamReader,
    pub(crate) writer: StreamWriter,
    _client: Arc<Inner>,
}

impl AgentClient {
    /// Offers the agent's proxy one outbound connection (starting its
    /// listeners on the first).
    pub async fn egress_listen(&self) -> Result<EgressOffer, AgentError> {
        let (reader, writer) = self.open(&Open::EgressListen).await?;
        Ok(EgressOffer {
            reader,
            writer,
            _client: self.inner.clone(),
        })
    }
}

impl EgressOffer {
    /// Waits for a program in the sandbox to connect; `None` when the
    /// stream ended first (the agent or its session is gone). A request
    /// naming an over-long host is refused here, never decoded further.
    pub async fn request(&mut self) -> Result<Option<EgressRequest>, AgentError> {
        let request: Option<EgressRequest> = read_message(&mut self.reader)
            .await
            .map_err(AgentError::from_read)?;
        match request {
            Some(r) if r.host.len() > MAX_EGRESS_HOST => Err(AgentError::Protocol(format!(
                "egress request names a host of {} bytes",
                r.host.len()
            ))),
            other => Ok(other),
        }
    }

    /// Answers a refusal or failure; the stream ends.
    pub async fn refuse(mut self, reply: &EgressReply) {
        let _ = write_message(&mut self.writer, reply).await;
    }

    /// Answers `Connected`: the stream is now the connection's bytes.
    pub async fn connected(mut self) -> Result<EgressStream, AgentError> {
        write_message(&mut self.writer, &EgressReply::Connected)
            .await
            .map_err(AgentError::from_write)?;
        Ok(EgressStream {
            reader: self.reader,
            writer: self.writer,
            _client: self._client,
        })
    }
}
