//! Code contexts: persistent interpreter processes the agent keeps per
//! context, and runs of code in them.
//!
//! `Open::CodeContextCreate` and `Open::CodeContextDelete` are answered with
//! one [`ContextReply`]. `Open::CodeRun` is answered with a sequence of
//! [`RunEvent`]s ending in [`RunEvent::Finished`]. The interpreter's events
//! are JSON lines written by code the sandbox controls: the host parses them
//! as untrusted input, and the agent bounds and splits them into frames.

use serde::{Deserialize, Serialize};

use crate::ExecUser;

/// Largest interpreter event line the agent forwards; longer lines are
/// dropped and replaced by a note on stderr.
pub const MAX_EVENT_LEN: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Language {
    Python,
    JavaScript,
    TypeScript,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
        }
    }
}

/// Create (start, or take a pre-started) interpreter for a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextCreate {
    /// The host's id for the context (the agent never invents ids).
    pub context_id: String,
    pub language: Language,
    pub cwd: String,
    /// Variables added to the interpreter's environment.
    pub env: Vec<(String, String)>,
    pub user: Option<ExecUser>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContextReply {
    Ready {
        /// E.g. `ipython 8.5.0`, `node 18.20.4 + typescript 4.8.4`.
        implementation: String,
        /// Whether a pre-started interpreter was used.
        warm: bool,
    },
    Deleted,
    Failed {
        message: String,
    },
    /// The working directory does not exist (or is not a directory): the
    /// caller's mistake, not the interpreter's. Appended: earlier variants
    /// keep their encoding.
    BadCwd {
        cwd: String,
    },
    /// The answer to [`crate::Open::CodeContextList`]: ids of the contexts
    /// whose interpreter is alive.
    Contexts(Vec<String>),
}

/// Run code in a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub context_id: String,
    pub code: String,
    /// Interrupt (SIGINT) after this long; kill and restart the interpreter
    /// if it does not stop within a grace period.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunEvent {
    /// A piece of one interpreter event line (JSON); `last` ends the line.
    EventPart {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// Output the interpreter process wrote to its own stdout/stderr
    /// (subprocesses, C extensions), outside the runner's streams.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    Finished(RunEnd),
}

/// How a run ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    /// The timeout fired and the run was interrupted.
    pub timed_out: bool,
    /// The interpreter died (or was killed) during the run: why. The next
    /// run gets a fresh interpreter without the old state.
    pub interpreter_died: Option<String>,
    /// The run started a fresh interpreter because the previous one had
    /// died: earlier state is gone.
    pub restarted: bool,
    /// No such context in the agent.
    pub unknown_context: bool,
}
