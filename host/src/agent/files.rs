//! The host side of the agent's file streams (`Open::File*`): one logical
//! stream per operation. Reads and writes stream bounded chunks; nothing
//! here holds a whole file.
//!
//! Agent bytes stay untrusted: every reply is one bounded frame, a read
//! never yields more bytes than the stat the agent announced, and list
//! names with a `/` or that are `.`/`..` end the stream as a protocol error.

use std::sync::Arc;

use crownest_proto::frame::write_message;
use crownest_proto::{
    ArchiveExtract, ArchiveReply, FileInfo, FileInput, FileReply, FileWriteRequest, MAX_CHUNK_LEN,
    Open, WatchEvent,
};

use super::{AgentClient, AgentError, FrameReader, Inner, StreamReader, StreamWriter};

/// A file being read: its metadata came first, chunks follow.
pub struct FileReader {
    reader: StreamReader,
    frames: FrameReader,
    /// Bytes the announced size still allows.
    remaining: u64,
    done: bool,
    /// Keeps the connection driver alive while the body streams.
    _client: Arc<Inner>,
    _writer: StreamWriter,
}

impl FileReader {
    /// The next chunk; `None` once the announced size was read and the agent
    /// ended the stream. A short or long stream is an error.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<u8>, AgentError>> {
        if self.done {
            return None;
        }
        let result = match next_reply(&mut self.frames, &mut self.reader).await {
            Ok(FileReply::Data(bytes)) if bytes.len() as u64 <= self.remaining => {
                self.remaining -= bytes.len() as u64;
                Ok(Some(bytes))
            }
            Ok(FileReply::Data(_)) => Err(AgentError::Protocol(
                "the agent sent more bytes than the file's size".into(),
            )),
            Ok(FileReply::End) if self.remaining == 0 => Ok(None),
            Ok(FileReply::End) => Err(AgentError::Protocol(
                "the file shrank while it was read".into(),
            )),
            Ok(FileReply::Error { kind, message }) => Err(AgentError::File { kind, message }),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(bytes)) => Some(Ok(bytes)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// A file being written: send chunks, then [`FileWriter::finish`]. Dropping
/// it unfinished makes the agent discard what was sent.
pub struct FileWriter {
    reader: StreamReader,
    writer: StreamWriter,
    frames: FrameReader,
    _client: Arc<Inner>,
}

impl FileWriter {
    /// Sends bytes, split into bounded frames. Fails early with the agent's
    /// error when it gave up (out of space, over the size limit, …).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        for chunk in bytes.chunks(MAX_CHUNK_LEN) {
            let message = FileInput::Data(chunk.to_vec());
            tokio::select! {
                biased;
                // The agent only speaks before `End` to refuse the write.
                reply = next_reply(&mut self.frames, &mut self.reader) => {
                    return Err(match reply {
                        Ok(FileReply::Error { kind, message }) => AgentError::File { kind, message },
                        Ok(other) => unexpected(&other),
                        Err(e) => e,
                    });
                }
                written = write_message(&mut self.writer, &message) => {
                    if let Err(e) = written {
                        // A broken stream: the agent's reason, if it sent one.
                        return Err(match next_reply(&mut self.frames, &mut self.reader).await {
                            Ok(FileReply::Error { kind, message }) => AgentError::File { kind, message },
                            _ => AgentError::from_write(e),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Commits the file; returns its metadata.
    pub async fn finish(mut self) -> Result<FileInfo, AgentError> {
        let sent = write_message(&mut self.writer, &FileInput::End).await;
        match next_reply(&mut self.frames, &mut self.reader).await {
            Ok(FileReply::Stat(info)) => Ok(info),
            Ok(FileReply::Error { kind, message }) => Err(AgentError::File { kind, message }),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(sent.err().map_or(e, AgentError::from_write)),
        }
    }
}

fn unexpected(reply: &FileReply) -> AgentError {
    let name = match reply {
        FileReply::Stat(_) => "Stat",
        FileReply::Entries(_) => "Entries",
        FileReply::Data(_) => "Data",
        FileReply::End => "End",
        FileReply::Done => "Done",
        FileReply::Error { .. } => "Error",
    };
    AgentError::Protocol(format!("unexpected file reply {name}"))
}

async fn next_reply(
    frames: &mut FrameReader,
    reader: &mut StreamReader,
) -> Result<FileReply, AgentError> {
    let payload = frames.next(reader).await?.ok_or(AgentError::Closed)?;
    crownest_proto::decode(&payload).map_err(AgentError::from_read)
}

/// A directory being watched (`Open::FileWatch`): changes until it is
/// dropped (which closes the stream and ends the agent's watch).
pub struct FileWatch {
    reader: StreamReader,
    frames: FrameReader,
    _client: Arc<Inner>,
    _writer: StreamWriter,
}

impl FileWatch {
    /// The next event; `None` once the agent ended the watch (its
    /// directory is gone) or the stream broke. A change whose path is not
    /// a clean relative path ends the watch as a protocol error.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, AgentError>> {
        let payload = match self.frames.next(&mut self.reader).await {
            Ok(Some(payload)) => payload,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let event: WatchEvent = match crownest_proto::decode(&payload) {
            Ok(event) => event,
            Err(e) => return Some(Err(AgentError::from_read(e))),
        };
        if let WatchEvent::Change { path, old_path, .. } = &event
            && !std::iter::once(path).chain(old_path).all(|p| valid_path(p))
        {
            return Some(Err(AgentError::Protocol(
                "the agent sent a change with an unclean path".into(),
            )));
        }
        Some(Ok(event))
    }
}

/// Checks a path from a watch: relative, non-empty components, no `.` or `..`.
fn valid_path(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(valid_name)
}

/// Checks a name from a listing: one path component.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl AgentClient {
    /// Runs a one-reply file operation.
    async fn file_call(&self, open: &Open) -> Result<FileReply, AgentError> {
        let (mut reader, _writer) = self.open(open).await?;
        let mut frames = FrameReader::default();
        match next_reply(&mut frames, &mut reader).await? {
            FileReply::Error { kind, message } => Err(AgentError::File { kind, message }),
            reply => Ok(reply),
        }
    }

    async fn file_call_stat(&self, open: &Open) -> Result<FileInfo, AgentError> {
        match self.file_call(open).await? {
            FileReply::Stat(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Metadata of `path` (relative to /workspace).
    pub async fn file_stat(&self, path: &str) -> Result<FileInfo, AgentError> {
        self.file_call_stat(&Open::FileStat {
            path: path.to_string(),
        })
        .await
    }

    /// Entries of a directory, at most `max_entries`; the flag says whether
    /// more were left out.
    pub async fn file_list(
        &self,
        path: &str,
        max_entries: usize,
    ) -> Result<(Vec<FileInfo>, bool), AgentError> {
        let open = Open::FileList {
            path: path.to_string(),
        };
        let (mut reader, _writer) = self.open(&open).await?;
        let mut frames = FrameReader::default();
        let mut entries = Vec::new();
        loop {
            match next_reply(&mut frames, &mut reader).await? {
                FileReply::Entries(batch) => {
                    if batch.iter().any(|e| !valid_name(&e.name)) {
                        return Err(AgentError::Protocol(
                            "the agent listed an invalid name".into(),
                        ));
                    }
                    let room = max_entries - entries.len();
                    if batch.len() > room {
                        entries.extend(batch.into_iter().take(room));
                        // Dropping the stream stops the agent's listing.
                        return Ok((entries, true));
                    }
                    entries.extend(batch);
                }
                FileReply::End => return Ok((entries, false)),
                FileReply::Error { kind, message } => {
                    return Err(AgentError::File { kind, message });
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Opens a regular file for reading: its metadata, then chunks.
    pub async fn file_read(&self, path: &str) -> Result<(FileInfo, FileReader), AgentError> {
        let open = Open::FileRead {
            path: path.to_string(),
        };
        let (mut reader, writer) = self.open(&open).await?;
        let mut frames = FrameReader::default();
        let info = match next_reply(&mut frames, &mut reader).await? {
            FileReply::Stat(info) => info,
            FileReply::Error { kind, message } => return Err(AgentError::File { kind, message }),
            other => return Err(unexpected(&other)),
        };
        let remaining = info.size;
        Ok((
            info,
            FileReader {
                reader,
                frames,
                remaining,
                done: false,
                _client: self.inner.clone(),
                _writer: writer,
            },
        ))
    }

    /// Starts watching a directory: answers once the agent's watches are in
    /// place (or with its error, e.g. not a directory).
    pub async fn file_watch(&self, path: &str, recursive: bool) -> Result<FileWatch, AgentError> {
        let open = Open::FileWatch {
            path: path.to_string(),
            recursive,
        };
        let (reader, writer) = self.open(&open).await?;
        let mut watch = FileWatch {
            reader,
            frames: FrameReader::default(),
            _client: self.inner.clone(),
            _writer: writer,
        };
        match watch.next().await {
            Some(Ok(WatchEvent::Ready)) => Ok(watch),
            Some(Ok(WatchEvent::Error { kind, message })) => {
                Err(AgentError::File { kind, message })
            }
            Some(Ok(other)) => Err(AgentError::Protocol(format!(
                "unexpected first watch event: {other:?}"
            ))),
            Some(Err(e)) => Err(e),
            None => Err(AgentError::Closed),
        }
    }

    /// Starts writing a file (committed by [`FileWriter::finish`]).
    pub async fn file_write(&self, request: FileWriteRequest) -> Result<FileWriter, AgentError> {
        let (reader, writer) = self.open(&Open::FileWrite(request)).await?;
        Ok(FileWriter {
            reader,
            writer,
            frames: FrameReader::default(),
            _client: self.inner.clone(),
        })
    }

    /// Renames `from` to `to`; returns the metadata of `to`.
    pub async fn file_move(
        &self,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileInfo, AgentError> {
        self.file_call_stat(&Open::FileMove {
            from: from.to_string(),
            to: to.to_string(),
            overwrite,
        })
        .await
    }

    /// Creates a directory owned by `owner`.
    pub async fn file_mkdir(
        &self,
        path: &str,
        parents: bool,
        owner: Option<crownest_proto::ExecUser>,
    ) -> Result<FileInfo, AgentError> {
        self.file_call_stat(&Open::FileMkdir {
            path: path.to_string(),
            parents,
            owner,
        })
        .await
    }

    /// Removes a file, symlink or (with `recursive`, non-empty) directory.
    pub async fn file_remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        match self
            .file_call(&Open::FileRemove {
                path: path.to_string(),
                recursive,
            })
            .await?
        {
            FileReply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

impl AgentClient {
    /// Unpacks a gzipped tar archive read from `source` into /workspace
    /// (the agent applies the limits of `request`). Progress the agent
    /// reports goes to `progress` when there is room (it is advisory);
    /// the result is the agent's `Done` or `Failed`, bounded here.
    pub async fn archive_extract<R>(
        &self,
        request: ArchiveExtract,
        mut source: R,
        progress: tokio::sync::mpsc::Sender<(u64, u64)>,
    ) -> Result<ArchiveReply, AgentError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let (mut reader, mut writer) = self.open(&Open::ArchiveExtract(request)).await?;
        let send = async move {
            let mut buf = vec![0u8; MAX_CHUNK_LEN];
            loop {
                let n = source
                    .read(&mut buf)
                    .await
                    .map_err(|e| AgentError::Protocol(format!("reading the archive: {e}")))?;
                if n == 0 {
                    write_message(&mut writer, &FileInput::End)
                        .await
                        .map_err(AgentError::from_write)?;
                    // Keep the write half open until the reply arrives.
                    std::future::pending::<()>().await;
                }
                write_message(&mut writer, &FileInput::Data(buf[..n].to_vec()))
                    .await
                    .map_err(AgentError::from_write)?;
            }
        };
        tokio::pin!(send);
        let mut frames = FrameReader::default();
        let mut sending = true;
        let mut send_error = None;
        loop {
            tokio::select! {
                sent = &mut send, if sending => {
                    sending = false;
                    // The agent stops reading once it refused the archive:
                    // its reply says why.
                    let sent: Result<(), AgentError> = sent;
                    if let Err(e) = sent {
                        send_error = Some(e);
                    }
                }
                reply = async {
                    let payload = frames.next(&mut reader).await?.ok_or(AgentError::Closed)?;
                    crownest_proto::decode::<ArchiveReply>(&payload).map_err(AgentError::from_read)
                } => {
                    match reply {
                        Ok(ArchiveReply::Progress { entries, bytes }) => {
                            let _ = progress.try_send((entries, bytes));
                        }
                        Ok(ArchiveReply::Done { entries, bytes, skipped }) => {
                            let skipped = skipped
                                .into_iter()
                                .take(MAX_SKIPPED)
                                .map(|(path, why)| (bounded(path), bounded(why)))
                                .collect();
                            return Ok(ArchiveReply::Done { entries, bytes, skipped });
                        }
                        Ok(ArchiveReply::Failed { kind, entry, message }) => {
                            return Ok(ArchiveReply::Failed {
                                kind,
                                entry: entry.map(bounded),
                                message: bounded(message),
                            });
                        }
                        Err(e) => return Err(send_error.unwrap_or(e)),
                    }
                }
            }
        }
    }
}

/// Skipped entries kept from an agent's report.
const MAX_SKIPPED: usize = 32;

/// Agent text kept in a run's events: at most 512 bytes.
fn bounded(mut text: String) -> String {
    const MAX: usize = 512;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
