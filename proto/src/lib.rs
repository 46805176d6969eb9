//! The wire protocol between the CrowNest host and `crownest-agent`.
//!
//! The agent is PID 1 inside every sandbox and the host reaches it over one
//! bidirectional byte stream: a unix socket for the `oci` runtime, a
//! virtio-console port for a microVM. The stream carries, in order:
//!
//! 1. a **handshake** on the raw bytes ([`handshake`]): the host sends a
//!    magic-prefixed [`Hello`], the agent answers a magic-prefixed
//!    [`HelloAck`]. Both sides scan for the magic, so a host that restarts on
//!    a transport that still holds stale bytes of an earlier session (a serial
//!    line has no "connect") can resynchronise without a fresh transport.
//! 2. a **yamux** session (the host is the client). Every logical stream
//!    (one exec, one file transfer, …) is one yamux stream.
//! 3. on each logical stream, length-prefixed **frames** ([`frame`]) holding
//!    postcard-encoded messages: the first frame from the host is an
//!    [`Open`], the rest depend on what was opened.
//!
//! Every frame is bounded by [`MAX_FRAME_LEN`]. The host treats every byte
//! that comes from the agent as untrusted: decoding never panics and never
//! allocates more than one bounded frame (see the fuzz target in `fuzz/`).

pub mod code;
pub mod frame;
pub mod fuzzing;
pub mod handshake;
#[cfg(feature = "tokio")]
pub mod mux;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Bump on any incompatible change to
/// a message below; the handshake picks the highest version both sides know.
///
/// Version 2: execs have ids and outlive the session that started them
/// ([`Open::ExecAttach`], [`Open::ExecList`], [`ExecInput::Ack`]), so a
/// restarted host can take over running commands.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest protocol version this build still accepts from its peer.
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// The sandbox's writable workspace: commands start here, file paths are
/// resolved beneath it, and artifacts are promoted from it.
pub const WORKSPACE: &str = "/workspace";

/// The `PATH` every process in a sandbox gets unless its caller sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Upper bound of one frame's payload, in bytes. Output chunks are split to
/// fit, so a peer announcing more is broken or hostile.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Largest data chunk (stdout, stderr, stdin) carried in one frame; leaves
/// room in [`MAX_FRAME_LEN`] for the message envelope.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;

/// First message of the session, host to agent, on the raw transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the host speaks.
    pub max_version: u16,
    /// Lowest protocol version the host accepts.
    pub min_version: u16,
    /// Random per host session; echoed in the ack so that a host scanning a
    /// reused transport can tell its own ack from a stale one.
    pub session_nonce: u64,
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The version both sides will speak from now on.
    pub version: u16,
    /// Echo of [`Hello::session_nonce`].
    pub session_nonce: u64,
    /// The agent's crate version, for logs.
    pub agent_version: String,
    /// Random per agent start: lets the host see that a sandbox rebooted.
    pub boot_id: u64,
}

/// Sent by the agent instead of [`HelloAck`] when it cannot speak any version
/// the host offered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReject {
    pub session_nonce: u64,
    pub min_version: u16,
    pub max_version: u16,
}

/// What the agent answers on the raw transport after a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Ack(HelloAck),
    Reject(HelloReject),
}

/// The first frame the host writes on a new logical stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Open {
    /// Liveness and latency probe; the agent answers [`Pong`] and closes.
    Ping,
    /// Start a process; the stream then carries [`ExecInput`] from the host
    /// and [`ExecEvent`] from the agent.
    Exec(ExecRequest),
    // File operations under /workspace. Appended: postcard encodes the
    // variant index, so the variants above keep their encoding. Paths are
    // relative to /workspace (the host strips `/workspace/`), `""` is the
    // workspace itself; the agent resolves them beneath it and answers
    // [`FileReply`] frames.
    /// Answers `Stat` (symlinks inside the workspace are followed).
    FileStat { path: String },
    /// Answers `Entries` batches, then `End`.
    FileList { path: String },
    /// Answers `Stat` of the opened file, `Data` chunks (at most the stat's
    /// size in total), then `End`.
    FileRead { path: String },
    /// The host then sends [`FileInput`] frames; the agent answers `Stat`
    /// of the written file or `Error`.
    FileWrite(FileWriteRequest),
    /// Answers `Stat` of the moved entry at `to`.
    FileMove {
        from: String,
        to: String,
        /// Replace an existing `to`; otherwise `AlreadyExists`.
        overwrite: bool,
    },
    /// Answers `Stat` of the directory.
    FileMkdir {
        path: String,
        /// Create missing parents; an existing directory is then no error.
        parents: bool,
        owner: Option<ExecUser>,
    },
    /// Answers `Done`. Symlinks are removed, never followed.
    FileRemove { path: String, recursive: bool },
    /// Starts an interpreter for a code context; answers one
    /// [`code::ContextReply`].
    CodeContextCreate(code::ContextCreate),
    /// Runs code in a context; answers [`code::RunEvent`]s ending in
    /// `Finished`.
    CodeRun(code::RunRequest),
    /// Stops a context's interpreter; answers one [`code::ContextReply`].
    CodeContextDelete { context_id: String },
    /// Connects to a TCP port on the sandbox's own loopback (a preview);
    /// answers one [`TunnelReply`]. After `Connected` the stream carries
    /// the connection's raw bytes both ways, no frames.
    TcpConnect { port: u16 },
    /// Take over an exec started earlier (by this host process or one
    /// before it): the agent answers [`ExecEvent::Attached`] (or
    /// [`ExecEvent::NotFound`]), replays the output it still holds from the
    /// given byte offsets, then streams live events as for
    /// [`Open::Exec`]. Another stream attached to the same exec is
    /// detached (its events stop).
    ExecAttach(ExecAttach),
    /// The execs the agent holds (running, or ended but not released):
    /// answered by one [`ExecList`].
    ExecList,
    /// The ids of the code contexts the agent holds (one whose interpreter
    /// died is restarted by its next run, as always): answered by one
    /// [`code::ContextReply::Contexts`].
    CodeContextList,
    /// Unpack a gzipped tar archive into /workspace. The host then sends
    /// the archive's bytes as [`FileInput`] frames (`End` after the last);
    /// the agent answers [`ArchiveReply::Progress`] as it goes and one
    /// `Done` or `Failed`.
    ArchiveExtract(ArchiveExtract),
    /// Offers the agent's egress proxy one outbound connection: the stream
    /// waits, unanswered, until a program in the sandbox connects to the
    /// proxy; the agent then sends one [`EgressRequest`], the host decides
    /// and dials and answers one [`EgressReply`], and after `Connected` the
    /// stream carries the connection's raw bytes both ways. The first such
    /// stream also starts the agent's proxy listeners
    /// ([`EGRESS_HTTP_PORT`], [`EGRESS_SOCKS_PORT`]); a sandbox without
    /// network access never gets one, so it has no listener.
    EgressListen,
    /// Kills a context's interpreter (a run in it ends as `interpreter
    /// died`) and starts a fresh one with the same setup and id; answers one
    /// [`code::ContextReply`] (`Ready`, or `Failed` for an unknown id).
    CodeContextRestart { context_id: String },
    /// The agent's view of the sandbox's resources: answered by one
    /// [`Stats`].
    Stats,
    /// Watches a directory under /workspace (and, `recursive`, the ones
    /// below it) with inotify: the agent answers [`WatchEvent::Ready`] once
    /// the watches are in place (or one `Error`), then a `WatchEvent` per
    /// change until the host closes the stream.
    FileWatch { path: String, recursive: bool },
}

/// The agent's answer to [`Open::Stats`]. Figures a sandbox reports are
/// untrusted: the host prefers what it measures itself (cgroups) and uses
/// these only where it cannot see in (a VM guest, /workspace).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes used and total of the filesystem at /workspace.
    pub workspace_used_bytes: u64,
    pub workspace_total_bytes: u64,
    /// CPU time of every process the agent sees, ended ones included, in
    /// microseconds.
    pub cpu_usec: u64,
    /// Memory in use: a VM guest's (total less available), else the sum of
    /// its processes' resident sets.
    pub memory_used_bytes: u64,
    /// A VM guest's memory; 0 where the agent cannot know (a container).
    pub memory_total_bytes: u64,
    /// Tasks (threads) of every process it sees.
    pub tasks: u64,
}

/// What changed under a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Create,
    Modify,
    Delete,
    Rename,
}

/// Most directories one [`Open::FileWatch`] watches; deeper trees are
/// watched in part (the agent says so with [`WatchEvent::Limited`]).
pub const MAX_WATCHED_DIRS: usize = 4096;

/// Agent to host, on an [`Open::FileWatch`] stream. Paths are relative to
/// /workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    Ready,
    Change {
        kind: ChangeKind,
        path: String,
        is_dir: bool,
        /// Where a renamed entry was.
        old_path: Option<String>,
    },
    /// The kernel's event queue overflowed: changes were lost.
    Overflow,
    /// [`MAX_WATCHED_DIRS`] directories are watched; ones beyond are not.
    Limited {
        max_dirs: u32,
    },
    Error {
        kind: FileErrorKind,
        message: String,
    },
}

/// The agent's HTTP proxy port on the sandbox's loopback.
pub const EGRESS_HTTP_PORT: u16 = 3128;
/// The agent's SOCKS5 proxy port on the sandbox's loopback.
pub const EGRESS_SOCKS_PORT: u16 = 1080;
/// Longest host name an [`EgressRequest`] may carry.
pub const MAX_EGRESS_HOST: usize = 255;

/// Agent to host, first frame on an [`Open::EgressListen`] stream: where a
/// program in the sandbox wants to connect (a name or an address, as the
/// program wrote it; the host resolves names itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRequest {
    pub host: String,
    pub port: u16,
}

/// Host to agent, the answer to an [`EgressRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressReply {
    /// Dialled: raw bytes follow both ways.
    Connected,
    /// The policy refused it (`code` is `egress_denied`,
    /// `egress_not_allowed`, `egress_private_address`, ...).
    Refused { code: String, reason: String },
    /// Allowed, but the connection failed (DNS, refused, timed out).
    Failed { reason: String },
}

/// What an archive may unpack to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveExtract {
    /// Owner of what is created (the template's user).
    pub owner: Option<ExecUser>,
    /// Most entries the archive may hold.
    pub max_entries: u64,
    /// Most bytes its files may hold, unpacked.
    pub max_bytes: u64,
    /// Most unpacked bytes per compressed byte, once past
    /// [`ARCHIVE_RATIO_GRACE`] unpacked bytes (a gzip bomb fails early).
    pub max_ratio: u64,
}

/// Unpacked bytes an archive may reach before its compression ratio is
/// checked (small, highly compressible archives are normal).
pub const ARCHIVE_RATIO_GRACE: u64 = 64 * 1024 * 1024;

/// Why an archive was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveErrorKind {
    /// Past an entry, byte or ratio limit.
    TooLarge,
    /// An entry that would leave /workspace or is not a file, directory or
    /// symlink: an absolute path, `..`, a device node, a fifo, a hard link
    /// to outside the archive.
    Unsafe,
    /// Not a gzipped tar archive, or truncated.
    Corrupt,
    /// The workspace refused a write (full, permissions).
    Io,
}

/// Agent to host, on an `ArchiveExtract` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveReply {
    /// So far: entries unpacked and bytes of their contents.
    Progress { entries: u64, bytes: u64 },
    /// Unpacked. `skipped`: entries left out and why (at most 32), e.g. a
    /// symlink pointing outside /workspace.
    Done {
        entries: u64,
        bytes: u64,
        skipped: Vec<(String, String)>,
    },
    Failed {
        kind: ArchiveErrorKind,
        /// The entry at fault, when there is one.
        entry: Option<String>,
        message: String,
    },
}

/// Where a host resumes an exec's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecAttach {
    /// The id given in [`ExecRequest::id`].
    pub id: String,
    /// Bytes of stdout the host has already recorded: the replay starts
    /// there.
    pub stdout_from: u64,
    /// Bytes of stderr the host has already recorded.
    pub stderr_from: u64,
}

/// The agent's answer to [`Open::ExecList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecList {
    pub execs: Vec<ExecSummary>,
}

/// One exec the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSummary {
    pub id: String,
    pub pid: u32,
    /// `false` once the process has exited (its end is held until the host
    /// sends [`ExecInput::Release`]).
    pub running: bool,
}

/// Longest [`ExecRequest::id`], so that [`ExecList`] fits one frame.
pub const MAX_EXEC_ID_LEN: usize = 128;

/// Upper bound of the execs an agent holds; a new exec beyond it evicts the
/// oldest one that has ended, or is refused when all are running.
pub const MAX_EXECS: usize = 1024;

/// Output bytes an agent holds per exec that the host has not acknowledged
/// ([`ExecInput::Ack`]); beyond it the oldest are dropped and counted in
/// [`ExecEvent::Attached`].
pub const MAX_UNACKED_BYTES: u64 = 4 * 1024 * 1024;

/// Agent to host, once, on a `TcpConnect` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelReply {
    Connected,
    /// Nothing accepted the connection (refused, timed out); the stream ends.
    Failed {
        message: String,
    },
}

/// Write a file: its bytes arrive as [`FileInput::Data`] and land in a
/// temporary file beside the target, renamed into place on
/// [`FileInput::End`]; a stream that ends otherwise leaves nothing behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteRequest {
    pub path: String,
    /// Permission bits of the new file (default 0644).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub parents: bool,
    /// Owner of what the agent creates (the sandbox's default user).
    pub owner: Option<ExecUser>,
    /// Refuse (and remove the partial file) past this many bytes.
    pub max_bytes: Option<u64>,
}

/// Host to agent, on a `FileWrite` stream after the [`Open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileInput {
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Every byte was sent: commit the file.
    End,
}

/// What a directory entry is (symlinks are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one file or directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Final path component (`""` for the workspace itself).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
}

/// Why a file operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileErrorKind {
    NotFound,
    /// The path, or a symlink on it, resolves outside /workspace.
    OutsideWorkspace,
    NotADirectory,
    IsADirectory,
    AlreadyExists,
    NotEmpty,
    PermissionDenied,
    TooLarge,
    InvalidPath,
    /// The workspace is full.
    NoSpace,
    /// Not a regular file (a device, a FIFO, a socket).
    NotAFile,
    Other,
}

/// Maximum entries in one [`FileReply::Entries`] frame: 256 names of at most
/// 255 bytes plus metadata stay well inside [`MAX_FRAME_LEN`].
pub const MAX_ENTRIES_PER_FRAME: usize = 256;

/// Agent to host, on a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileReply {
    Stat(FileInfo),
    Entries(Vec<FileInfo>),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of `Entries` or `Data`.
    End,
    Done,
    Error {
        kind: FileErrorKind,
        message: String,
    },
}

/// The agent's answer to [`Open::Ping`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub boot_id: u64,
    /// Processes the agent is supervising right now.
    pub running: u32,
}

/// A process to start inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The host's id for it (its command id), unique per sandbox: what
    /// [`Open::ExecAttach`] names. An id the agent already holds, an empty
    /// one or one longer than [`MAX_EXEC_ID_LEN`] is refused with
    /// [`ExecEvent::SpawnFailed`].
    pub id: String,
    /// argv; `argv[0]` is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Working directory inside the sandbox (absolute).
    pub cwd: String,
    /// The whole environment of the process (nothing is inherited from the
    /// agent, which runs with an empty environment).
    pub env: Vec<(String, String)>,
    /// Run as this uid/gid; `None` runs as the agent's user (root of the
    /// sandbox's user namespace).
    pub user: Option<ExecUser>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Keep stdin open for [`ExecInput::Stdin`]; otherwise it is /dev/null.
    pub stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
}

/// Host to agent, on an exec stream after the [`Open::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    CloseStdin,
    /// Deliver this signal number to the process group.
    Signal(i32),
    /// Kill the process and everything it started, wherever it moved
    /// (`setsid`, double forks): cancel. Appended: earlier variants keep
    /// their encoding.
    Kill,
    /// The host has durably recorded output up to these byte offsets of
    /// stdout and stderr: the agent may forget it.
    Ack {
        stdout: u64,
        stderr: u64,
    },
    /// The host has recorded the exec's end: the agent forgets the exec
    /// (after [`ExecEvent::Exited`] or [`ExecEvent::SpawnFailed`]; ignored
    /// while it runs).
    Release,
}

/// Agent to host, on an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended: `code` when it exited, `signal` when a signal
    /// killed it. `timed_out` when the agent killed it for its timeout.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The process could not be started (bad cwd, missing binary, …).
    SpawnFailed {
        message: String,
    },
    /// First event on an [`Open::ExecAttach`] stream: the exec is held.
    /// `lost_stdout`/`lost_stderr`: bytes at or after the requested offsets
    /// that the agent no longer holds (acknowledged before, or dropped past
    /// [`MAX_UNACKED_BYTES`]); the replay starts after them.
    Attached {
        pid: u32,
        running: bool,
        lost_stdout: u64,
        lost_stderr: u64,
    },
    /// First and only event on an [`Open::ExecAttach`] stream when the agent
    /// holds no exec of that id.
    NotFound,
}

/// Errors of encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("peer speaks protocol versions {min}..={max}, this side {our_min}..={our_max}")]
    VersionMismatch {
        min: u16,
        max: u16,
        our_min: u16,
        our_max: u16,
    },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message as a postcard payload (without the frame header).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtoError> {
    let bytes = postcard::to_stdvec(message)?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(bytes)
}

/// Decodes one message from a frame payload. Trailing bytes are an error: a
/// frame holds exactly one message.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtoError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (message, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_event_round_trips() {
        let events = [
            ExecEvent::Started { pid: 7 },
            ExecEvent::Stdout(b"42\n".to_vec()),
            ExecEvent::Exited {
                code: Some(3),
                signal: None,
                timed_out: false,
            },
        ];
        for event in events {
            let bytes = encode(&event).expect("encode");
            assert_eq!(decode::<ExecEvent>(&bytes).expect("decode"), event);
        }
    }

    #[test]
    fn old_open_variants_keep_their_encoding() {
        // `Ping` is variant 0 and `Exec` variant 1 whatever is appended.
        assert_eq!(encode(&Open::Ping).expect("encode"), vec![0]);
        let bytes = encode(&Open::FileStat {
            path: String::from("a"),
        })
        .expect("encode");
        assert_eq!(bytes[0], 2);
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let mut bytes = encode(&Open::Ping).expect("encode");
        bytes.push(0);
        assert!(decode::<Open>(&bytes).is_err());
    }

    #[test]
    fn decode_of_arbitrary_bytes_never_panics() {
        // A cheap deterministic generator; the fuzz target covers this properly.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2048 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode::<ExecEvent>(&bytes);
            let _ = decode::<HelloReply>(&bytes);
            let _ = decode::<Pong>(&bytes);
            let _ = decode::<FileReply>(&bytes);
        }
    }
}
