//! Parse, then act: a command request becomes a [`ValidRunCommand`] by a
//! pure function, before anything touches a sandbox or the store (so a bad
//! body is `400` whatever state its sandbox is in).

use crownest_proto::WORKSPACE;

use crate::config::Limits;
use crate::core::CoreError;
use crate::model::CollectItem;

/// Most paths one command may collect.
pub const MAX_COLLECT_ITEMS: usize = 32;
/// Most variables a request may add to an environment.
pub const MAX_ENV_VARS: usize = 256;
/// Bound on the names and values of a request's environment, together.
pub const MAX_ENV_BYTES: usize = 128 * 1024;
/// Longest working directory.
const MAX_CWD_BYTES: usize = 4096;

/// Signals a client may send to a command, by name.
pub const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGKILL", libc::SIGKILL),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGTERM", libc::SIGTERM),
    ("SIGCONT", libc::SIGCONT),
    ("SIGSTOP", libc::SIGSTOP),
    ("SIGTSTP", libc::SIGTSTP),
    ("SIGWINCH", libc::SIGWINCH),
];

/// A request to run a command, as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct RunCommand {
    pub command: String,
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
    pub timeout_ms: Option<i64>,
    pub background: bool,
    pub stdin: bool,
    /// Files to promote to artifacts when the command ends.
    pub collect: Vec<CollectItem>,
}

/// A request that passed [`RunCommand::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRunCommand {
    pub command: String,
    /// Absolute inside the sandbox (relative to /workspace until the
    /// sandbox's template rebases it on its workdir).
    pub cwd: String,
    /// The cwd as the client gave it.
    pub raw_cwd: Option<String>,
    pub env: Vec<(String, String)>,
    pub timeout_ms: Option<u64>,
    pub background: bool,
    pub stdin: bool,
    pub collect: Vec<CollectItem>,
}

impl RunCommand {
    pub fn validate(self, limits: &Limits) -> Result<ValidRunCommand, CoreError> {
        if self.command.trim().is_empty() {
            return Err(CoreError::invalid("command", "command must not be empty"));
        }
        if self.command.len() > limits.max_command_bytes {
            return Err(CoreError::invalid(
                "command",
                format!("command is longer than {} bytes", limits.max_command_bytes),
            ));
        }
        if self.command.contains('\0') {
            return Err(CoreError::invalid(
                "command",
                "command must not contain NUL",
            ));
        }
        let cwd = resolve_cwd(self.cwd.as_deref())?;
        validate_env(&self.env)?;
        if self.collect.len() > MAX_COLLECT_ITEMS {
            return Err(CoreError::invalid(
                "collect",
                format!("at most {MAX_COLLECT_ITEMS} paths may be collected"),
            ));
        }
        if self.collect.iter().any(|c| {
            c.path.is_empty()
                || c.path.len() > MAX_CWD_BYTES
                || c.path.contains('\0')
                || c.name.as_ref().is_some_and(|n| n.len() > 255)
        }) {
            return Err(CoreError::invalid(
                "collect",
                "each collect path must be 1 to 4096 bytes without NUL, and each name at most 255 bytes",
            ));
        }
        let timeout_ms = match self.timeout_ms {
            None => None,
            Some(t) if t > 0 && t <= limits.max_command_timeout_ms => Some(t as u64),
            Some(_) => {
                return Err(CoreError::invalid(
                    "timeoutMs",
                    format!(
                        "timeoutMs must be between 1 and {}",
                        limits.max_command_timeout_ms
                    ),
                ));
            }
        };
        Ok(ValidRunCommand {
            command: self.command,
            cwd,
            raw_cwd: self.cwd,
            env: self.env,
            timeout_ms,
            background: self.background,
            stdin: self.stdin,
            collect: self.collect,
        })
    }
}

/// A cwd as [`resolve_cwd`] does, with `base` (the template's workdir) in
/// place of /workspace.
pub fn resolve_cwd_in(cwd: Option<&str>, base: &str) -> Result<String, CoreError> {
    let resolved = resolve_cwd(cwd)?;
    match cwd {
        None | Some("") => Ok(base.to_string()),
        Some(c) if c.starts_with('/') => Ok(resolved),
        Some(c) => Ok(format!("{}/{c}", base.trim_end_matches('/'))),
    }
}

/// Commands run in /workspace unless told otherwise; a relative cwd is
/// relative to /workspace. The agent checks that it exists.
pub fn resolve_cwd(cwd: Option<&str>) -> Result<String, CoreError> {
    let cwd = match cwd {
        None | Some("") => return Ok(String::from(WORKSPACE)),
        Some(c) => c,
    };
    if cwd.contains('\0') || cwd.len() > MAX_CWD_BYTES {
        return Err(CoreError::invalid(
            "cwd",
            "cwd must be a path of at most 4096 bytes without NUL",
        ));
    }
    if cwd.starts_with('/') {
        Ok(cwd.to_string())
    } else {
        Ok(format!("{WORKSPACE}/{cwd}"))
    }
}

pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        && name.len() <= 256
}

/// Checks variables a client adds to an environment (commands, contexts,
/// sandboxes).
pub fn validate_env(env: &[(String, String)]) -> Result<(), CoreError> {
    if env.len() > MAX_ENV_VARS {
        return Err(CoreError::invalid(
            "env",
            format!("at most {MAX_ENV_VARS} environment variables may be set"),
        ));
    }
    let mut total = 0;
    for (key, value) in env {
        if !valid_env_name(key) || value.contains('\0') {
            return Err(CoreError::invalid(
                "env",
                format!("`{key}` is not a valid environment variable name or its value has a NUL"),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_ENV_BYTES {
        return Err(CoreError::invalid(
            "env",
            format!("the environment variables add up to more than {MAX_ENV_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Parses a signal given by name (`SIGTERM`, `TERM`) or number.
pub fn parse_signal(text: &str) -> Option<i32> {
    let upper = text.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return SIGNALS.iter().find(|(_, s)| *s == n).map(|(_, s)| *s);
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: &str) -> RunCommand {
        RunCommand {
            command: command.to_string(),
            ..RunCommand::default()
        }
    }

    fn field_of(result: Result<ValidRunCommand, CoreError>) -> &'static str {
        match result {
            Err(CoreError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_command_validates_with_the_workspace_as_cwd() {
        let valid = request("echo hi")
            .validate(&Limits::default())
            .expect("valid");
        assert_eq!(valid.cwd, "/workspace");
        assert_eq!(valid.timeout_ms, None);
    }

    #[test]
    fn empty_oversized_and_nul_commands_are_invalid() {
        let limits = Limits::default();
        assert_eq!(field_of(request("  ").validate(&limits)), "command");
        assert_eq!(field_of(request("a\0b").validate(&limits)), "command");
        let long = "x".repeat(limits.max_command_bytes + 1);
        assert_eq!(field_of(request(&long).validate(&limits)), "command");
    }

    #[test]
    fn timeouts_must_be_positive_and_bounded() {
        let limits = Limits::default();
        for bad in [0, -5, limits.max_command_timeout_ms + 1] {
            let r = RunCommand {
                timeout_ms: Some(bad),
                ..request("true")
            };
            assert_eq!(field_of(r.validate(&limits)), "timeoutMs");
        }
        let ok = RunCommand {
            timeout_ms: Some(1),
            ..request("true")
        };
        assert_eq!(ok.validate(&limits).expect("valid").timeout_ms, Some(1));
    }

    #[test]
    fn bad_env_and_collect_are_invalid() {
        let limits = Limits::default();
        let env = RunCommand {
            env: vec![(String::from("1X"), String::new())],
            ..request("true")
        };
        assert_eq!(field_of(env.validate(&limits)), "env");
        let many = RunCommand {
            env: (0..=MAX_ENV_VARS)
                .map(|i| (format!("V{i}"), String::new()))
                .collect(),
            ..request("true")
        };
        assert_eq!(field_of(many.validate(&limits)), "env");
        let collect = RunCommand {
            collect: vec![CollectItem {
                path: String::new(),
                name: None,
            }],
            ..request("true")
        };
        assert_eq!(field_of(collect.validate(&limits)), "collect");
        let too_many = RunCommand {
            collect: (0..=MAX_COLLECT_ITEMS)
                .map(|i| CollectItem {
                    path: format!("f{i}"),
                    name: None,
                })
                .collect(),
            ..request("true")
        };
        assert_eq!(field_of(too_many.validate(&limits)), "collect");
    }

    #[test]
    fn cwd_defaults_to_workspace_and_relative_paths_resolve_under_it() {
        assert_eq!(resolve_cwd(None).expect("cwd"), "/workspace");
        assert_eq!(resolve_cwd(Some("src")).expect("cwd"), "/workspace/src");
        assert_eq!(resolve_cwd(Some("/tmp")).expect("cwd"), "/tmp");
        assert!(resolve_cwd(Some("a\0b")).is_err());
    }

    #[test]
    fn env_names_are_validated() {
        assert!(valid_env_name("FOO_1"));
        assert!(valid_env_name("_x"));
        assert!(!valid_env_name("1FOO"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }

    #[test]
    fn signals_parse_by_name_and_number_from_the_allow_list() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("int"), Some(libc::SIGINT));
        assert_eq!(parse_signal("9"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("SIGSEGV"), None);
        assert_eq!(parse_signal("64"), None);
    }
}
