//! Thin wrapper over the OCI runtime CLI (`runc` and compatibles): every
//! invocation passes `--root`, so one host only ever sees its own containers.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::runtime::RuntimeError;

/// Output of one finished runtime invocation.
pub struct Output {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    /// runc's state directory (`--root`).
    pub root: PathBuf,
}

impl Runc {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).args(args);
        cmd.kill_on_drop(true);
        cmd
    }

    fn describe(&self, args: &[&str]) -> String {
        format!("{} {}", self.binary.display(), args.join(" "))
    }

    /// Runs to completion, capturing stdout and stderr.
    pub async fn run(&self, args: &[&str]) -> Result<Output, RuntimeError> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| RuntimeError::Spawn {
                binary: self.binary.clone(),
                source: e,
            })?;
        Ok(Output {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Runs and turns a non-zero exit into [`RuntimeError::Command`].
    pub async fn run_ok(&self, args: &[&str]) -> Result<Output, RuntimeError> {
        let out = self.run(args).await?;
        if out.success {
            Ok(out)
        } else {
            Err(RuntimeError::Command {
                command: self.describe(args),
                status: out.status,
                stderr: out.stderr,
            })
        }
    }

    /// `runc run -d`: starts the container detached. Its stdin is
    /// /dev/null; its stdout and stderr (and runc's own messages) go to
    /// `console`, which outlives this call because the container keeps it.
    pub async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        log_file: &Path,
        console: std::fs::File,
    ) -> Result<(), RuntimeError> {
        let console_err = console.try_clone().map_err(|e| RuntimeError::Io {
            action: "cannot duplicate console log of",
            path: PathBuf::from(id),
            source: e,
        })?;
        let (Some(bundle_s), Some(pid_s), Some(log_s)) =
            (bundle.to_str(), pid_file.to_str(), log_file.to_str())
        else {
            return Err(RuntimeError::Config {
                id: id.to_owned(),
                message: "state dir path is not valid utf-8".to_owned(),
            });
        };
        let args = [
            "run",
            "--detach",
            "--no-new-keyring",
            "--pid-file",
            pid_s,
            "--bundle",
            bundle_s,
            id,
        ];
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(log_s)
            .args(args)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .kill_on_drop(true);
        let status = cmd.status().await.map_err(|e| RuntimeError::Spawn {
            binary: self.binary.clone(),
            source: e,
        })?;
        if status.success() {
            return Ok(());
        }
        Err(RuntimeError::Command {
            command: self.describe(&args),
            status: status.to_string(),
            stderr: runc_log_errors(log_file),
        })
    }
}

/// The `msg` of the error-level lines of a runc `--log` file (logrus text
/// format: `time="…" level=error msg="…"`), or the raw tail when none parse.
pub fn runc_log_errors(log_file: &Path) -> String {
    let text = std::fs::read_to_string(log_file).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("level=error") || l.contains("level=fatal"))
        .map(|l| l.split_once("msg=").map_or(l, |(_, m)| m.trim_matches('"')))
        .collect();
    if errors.is_empty() {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("; ")
    } else {
        errors.join("; ")
    }
}

/// The runc release that fixed CVE-2024-21626 (a working directory leaked
/// into the container as a host file descriptor).
pub const MIN_SAFE_RUNC: (u32, u32, u32) = (1, 1, 12);

/// Distribution builds of older releases that carry the CVE-2024-21626 fix
/// (their `commit:` line); Debian bookworm's security update is one.
const PATCHED_BUILDS: &[&str] = &["1.1.5+ds1-1+deb12u"];

/// Checks `runc --version` output: the version string to report, or why it
/// is refused.
pub fn check_version(output: &str) -> Result<String, String> {
    let version = output
        .lines()
        .find_map(|l| l.strip_prefix("runc version "))
        .map(str::trim)
        .ok_or_else(|| String::from("`runc --version` printed no version"))?;
    let commit = output
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .map(str::trim)
        .unwrap_or("");
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .filter_map(|n| n.parse().ok())
        .collect();
    let parsed = match numbers.as_slice() {
        [a, b, c] => (*a, *b, *c),
        _ => return Err(format!("cannot read the runc version `{version}`")),
    };
    if parsed >= MIN_SAFE_RUNC {
        return Ok(version.to_string());
    }
    if PATCHED_BUILDS.iter().any(|p| commit.starts_with(p)) {
        return Ok(format!("{version} ({commit}, CVE-2024-21626 fixed)"));
    }
    Err(format!(
        "runc {version} is vulnerable to CVE-2024-21626 (container escape); install runc 1.1.12 or later (or a distribution build with the fix) and start again"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_before_1_1_12_is_refused_unless_a_patched_build() {
        let upstream = "runc version 1.1.12\ncommit: v1.1.12-0-g51d5e946\n";
        assert_eq!(check_version(upstream), Ok(String::from("1.1.12")));
        assert!(check_version("runc version 1.2.0\n").is_ok());
        let old = "runc version 1.1.5\ncommit: v1.1.5\n";
        assert!(
            check_version(old)
                .expect_err("refused")
                .contains("CVE-2024-21626")
        );
        let debian = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\n";
        assert!(check_version(debian).expect("patched").contains("deb12u1"));
        assert!(check_version("garbage").is_err());
    }
}
