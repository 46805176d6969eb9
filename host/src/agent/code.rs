//! The host side of code contexts (`Open::CodeContextCreate`, `CodeRun`,
//! `CodeContextDelete`). Interpreter events arrive split into bounded
//! parts; a run's events are reassembled here up to a bound, and stay
//! untrusted bytes for the core to parse.

use std::sync::Arc;

use crownest_proto::Open;
use crownest_proto::code::{
    ContextCreate, ContextReply, MAX_EVENT_LEN, RunEnd, RunEvent, RunRequest,
};

use super::{AgentClient, AgentError, FrameReader, Inner, StreamReader, StreamWriter};

/// Bound on everything one run may send (events and raw output).
pub const MAX_RUN_BYTES: usize = 256 * 1024 * 1024;

/// What a run produced, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutput {
    /// One complete interpreter event line (JSON, untrusted).
    Event(Vec<u8>),
    /// An event line longer than the run's bound: its bytes were dropped
    /// as they arrived, never held whole.
    OversizedEvent {
        size: usize,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Finished(RunEnd),
}

/// A run in progress.
pub struct RunSession {
    reader: StreamReader,
    frames: FrameReader,
    partial: Vec<u8>,
    /// Bytes of the current event when it is being dropped (oversized).
    dropping: Option<usize>,
    /// Longest event line kept whole.
    max_event: usize,
    received: usize,
    done: bool,
    _writer: StreamWriter,
    _client: Arc<Inner>,
}

impl RunSession {
    /// The next output; `None` after `Finished`.
    pub async fn next(&mut self) -> Option<Result<RunOutput, AgentError>> {
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        if matches!(result, Err(_) | Ok(RunOutput::Finished(_))) {
            self.done = true;
        }
        Some(result)
    }

    async fn next_inner(&mut self) -> Result<RunOutput, AgentError> {
        loop {
            let payload = self
                .frames
                .next(&mut self.reader)
                .await?
                .ok_or(AgentError::Closed)?;
            self.received += payload.len();
            if self.received > MAX_RUN_BYTES {
                return Err(AgentError::Protocol(format!(
                    "a run sent more than {MAX_RUN_BYTES} bytes"
                )));
            }
            let event: RunEvent =
                crownest_proto::decode(&payload).map_err(AgentError::from_read)?;
            match event {
                RunEvent::EventPart { data, last } => {
                    if let Some(size) = &mut self.dropping {
                        *size += data.len();
                    } else if self.partial.len() + data.len() > self.max_event {
                        self.dropping = Some(self.partial.len() + data.len());
                        self.partial = Vec::new();
                    } else {
                        self.partial.extend_from_slice(&data);
                    }
                    if last {
                        if let Some(size) = self.dropping.take() {
                            return Ok(RunOutput::OversizedEvent { size });
                        }
                        return Ok(RunOutput::Event(std::mem::take(&mut self.partial)));
                    }
                }
                RunEvent::Stdout(data) => return Ok(RunOutput::Stdout(data)),
                RunEvent::Stderr(data) => return Ok(RunOutput::Stderr(data)),
                RunEvent::Finished(end) => return Ok(RunOutput::Finished(end)),
            }
        }
    }
}

impl AgentClient {
    async fn context_call(&self, open: &Open) -> Result<ContextReply, AgentError> {
        let (mut reader, _writer) = self.open(open).await?;
        let mut frames = FrameReader::default();
        let payload = frames.next(&mut reader).await?.ok_or(AgentError::Closed)?;
        crownest_proto::decode(&payload).map_err(AgentError::from_read)
    }

    /// Starts the interpreter of a new code context.
    pub async fn context_create(&self, request: ContextCreate) -> Result<ContextReply, AgentError> {
        self.context_call(&Open::CodeContextCreate(request)).await
    }

    /// Stops a context's interpreter.
    pub async fn context_delete(&self, context_id: &str) -> Result<ContextReply, AgentError> {
        self.context_call(&Open::CodeContextDelete {
            context_id: context_id.to_string(),
        })
        .await
    }

    /// Replaces a context's interpreter with a fresh one.
    pub async fn context_restart(&self, context_id: &str) -> Result<ContextReply, AgentError> {
        self.context_call(&Open::CodeContextRestart {
            context_id: context_id.to_string(),
        })
        .await
    }

    /// Ids of the contexts whose interpreter is alive.
    pub async fn context_list(&self) -> Result<Vec<String>, AgentError> {
        match self.context_call(&Open::CodeContextList).await? {
            ContextReply::Contexts(ids) => Ok(ids),
            other => Err(AgentError::Protocol(format!(
                "unexpected answer to a context list: {other:?}"
            ))),
        }
    }

    /// Runs code in a context; event lines over `max_event` bytes (at most
    /// [`MAX_EVENT_LEN`]) come back as [`RunOutput::OversizedEvent`].
    pub async fn code_run(
        &self,
        request: RunRequest,
        max_event: usize,
    ) -> Result<RunSession, AgentError> {
        let (reader, writer) = self.open(&Open::CodeRun(request)).await?;
        Ok(RunSession {
            reader,
            frames: FrameReader::default(),
            partial: Vec::new(),
            dropping: None,
            max_event: max_event.min(MAX_EVENT_LEN),
            received: 0,
            done: false,
            _writer: writer,
            _client: self.inner.clone(),
        })
    }
}
