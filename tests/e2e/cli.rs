//! The CLI client (`crownest sandbox|exec|code|files|artifacts|previews`): the real
//! binary, run as a user would, against the shared server over HTTP.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crownest_e2e::{crownest_bin, shared};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Runs the client with the shared server's address and `key` (none: the
/// variable is removed), in `dir`.
pub(crate) fn run_in(dir: Option<&std::path::Path>, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(crownest_bin());
    command
        .args(args)
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env_remove("CROWNEST_API_KEY");
    if let Some(key) = key {
        command.env("CROWNEST_API_KEY", key);
    }
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command.output().expect("run crownest client")
}

pub(crate) fn cli(args: &[&str]) -> Output {
    run_in(None, Some(&shared().key), args)
}

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the client and asserts it succeeded; returns stdout.
pub(crate) fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "`crownest {}` failed ({:?}): {}",
        args.join(" "),
        out.status.code(),
        stderr(&out)
    );
    stdout(&out)
}

pub(crate) fn json(args: &[&str]) -> Value {
    let text = ok(args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Creates a python sandbox through the CLI and returns its id.
pub(crate) fn sandbox() -> String {
    let created = json(&["sandbox", "create", "--template", "python", "--json"]);
    assert_eq!(created["status"], "running", "{created}");
    created["id"].as_str().expect("id").to_string()
}

#[test]
fn sandbox_create_list_get_kill_in_human_and_json_output() {
    let created = json(&[
        "sandbox",
        "create",
        "--template",
        "python",
        "--ttl-ms",
        "600000",
        "--metadata",
        r#"{"job":"cli"}"#,
        "--json",
    ]);
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["metadata"]["job"], "cli", "{created}");

    let listed = ok(&["sandbox", "list"]);
    let header = listed.lines().next().expect("header");
    assert!(
        header.starts_with("ID")
            && header.contains("STATUS")
            && header.contains("TEMPLATE")
            && header.contains("CREATED"),
        "{listed}"
    );
    let row = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
    assert!(row.contains("running") && row.contains("python"), "{row}");
    let listed = json(&["sandbox", "list", "--json"]);
    assert!(
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|s| s["id"] == id.as_str()),
        "{listed}"
    );

    let shown = ok(&["sandbox", "get", &id]);
    assert!(shown.contains(&format!("id:        {id}")), "{shown}");
    assert!(shown.contains("status:    running"), "{shown}");
    assert!(shown.contains(r#"metadata:  {"job":"cli"}"#), "{shown}");
    assert_eq!(
        json(&["sandbox", "get", &id, "--json"])["template"],
        "python"
    );

    ok(&["sandbox", "kill", &id]);
    assert_eq!(
        json(&["sandbox", "get", &id, "--json"])["status"],
        "destroyed"
    );
}

#[test]
fn exec_streams_output_to_the_right_streams_and_exits_with_the_commands_code() {
    let id = sandbox();
    let out = cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");

    assert_eq!(
        ok(&["exec", &id, "--", "python", "-c", "print(40 + 2)"]),
        "42\n"
    );
    // Each argument is quoted for /bin/sh: quotes and `$` arrive as typed.
    assert_eq!(
        ok(&["exec", &id, "--", "echo", "it's $HOME"]),
        "it's $HOME\n"
    );
    ok(&["exec", &id, "--", "mkdir", "sub"]);
    let out = ok(&[
        "exec",
        &id,
        "--cwd",
        "sub",
        "--env",
        "GREETING=hi there",
        "--",
        "sh",
        "-c",
        "pwd; echo $GREETING",
    ]);
    assert_eq!(out, "/workspace/sub\nhi there\n");
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn exec_reports_signals_timeouts_and_json_records() {
    let id = sandbox();
    let out = cli(&["exec", &id, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));

    let out = cli(&["exec", &id, "--timeout-ms", "500", "--", "sleep", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("timed_out"), "{}", stderr(&out));

    let out = cli(&["exec", &id, "--json", "--", "sh", "-c", "echo hi; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let record: Value = serde_json::from_slice(&out.stdout).expect("json record");
    assert_eq!(record["stdout"], "hi\n");
    assert_eq!(record["exitCode"], 4);
    cli(&["sandbox", "kill", &id]);
}

/// Bytes with every value, in an order that is not a repeating pattern.
fn binary(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn files_put_get_ls_mv_rm_round_trip_a_binary_file() {
    let id = sandbox();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("blob.bin");
    let bytes = binary(300 * 1024);
    std::fs::write(&local, &bytes).expect("write");
    let local = local.to_str().expect("utf8 path");

    ok(&["files", "put", &id, local, "data/blob.bin"]);
    let listed = ok(&["files", "ls", &id, "data"]);
    let row = listed
        .lines()
        .find(|l| l.ends_with("blob.bin"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        row.starts_with("file") && row.contains(&bytes.len().to_string()),
        "{row}"
    );

    let back = dir.path().join("back.bin");
    ok(&[
        "files",
        "get",
        &id,
        "data/blob.bin",
        back.to_str().expect("utf8"),
    ]);
    assert!(
        std::fs::read(&back).expect("read") == bytes,
        "get changed the bytes"
    );

    ok(&["files", "mv", &id, "data/blob.bin", "data/moved.bin"]);
    let out = cli(&["files", "get", &id, "data/moved.bin", "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == bytes, "get to stdout changed the bytes");
    // Without LOCAL the file lands under its own name in the working directory.
    let out = run_in(
        Some(dir.path()),
        Some(&shared().key),
        &["files", "get", &id, "data/moved.bin"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(dir.path().join("moved.bin")).expect("read") == bytes);

    let listed = json(&["files", "ls", &id, "data", "--json"]);
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, ["moved.bin"]);

    let out = cli(&["files", "rm", &id, "data"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(directory_not_empty)"),
        "{}",
        stderr(&out)
    );
    ok(&["files", "rm", &id, "data", "--recursive"]);
    let out = cli(&["files", "ls", &id, "data"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn files_over_32_mib_go_through_staged_transfers_byte_identical() {
    let id = sandbox();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("big.bin");
    let bytes = binary(33 * 1024 * 1024 + 17);
    std::fs::write(&local, &bytes).expect("write");
    ok(&[
        "files",
        "put",
        &id,
        local.to_str().expect("utf8"),
        "big.bin",
    ]);
    let back = dir.path().join("back.bin");
    ok(&["files", "get", &id, "big.bin", back.to_str().expect("utf8")]);
    let back = std::fs::read(&back).expect("read");
    assert_eq!(back.len(), bytes.len());
    assert_eq!(Sha256::digest(&back), Sha256::digest(&bytes));
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn artifacts_create_ls_download() {
    let id = sandbox();
    ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "printf 'hello artifact' > report.txt",
    ]);
    let artifact = json(&[
        "artifacts",
        "create",
        &id,
        "report.txt",
        "--name",
        "report.txt",
        "--json",
    ]);
    let art = artifact["id"].as_str().expect("id").to_string();
    assert!(art.starts_with("art_"), "{artifact}");
    let shown = ok(&[
        "artifacts",
        "create",
        &id,
        "report.txt",
        "--name",
        "again.txt",
    ]);
    assert!(shown.contains("name:     again.txt"), "{shown}");

    let listed = ok(&["artifacts", "ls", "--sandbox", &id]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&art) && l.ends_with("report.txt")),
        "{listed}"
    );
    let listed = json(&["artifacts", "ls", "--json"]);
    assert!(
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|a| a["id"] == art.as_str())
    );

    assert_eq!(ok(&["artifacts", "download", &art, "-"]), "hello artifact");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_in(
        Some(dir.path()),
        Some(&shared().key),
        &["artifacts", "download", &art],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("report.txt")).expect("read"),
        "hello artifact"
    );
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn code_run_prints_output_and_exits_1_with_the_traceback_on_error() {
    let id = sandbox();
    let out = cli(&[
        "code",
        "run",
        &id,
        "--language",
        "python",
        "--code",
        "print(40 + 2)",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42\n");

    let out = cli(&["code", "run", &id, "--language", "python", "--code", "1/0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("ZeroDivisionError"),
        "{}",
        stderr(&out)
    );

    // From a file, in the same default context: state carries over.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("snippet.py");
    std::fs::write(&file, "x = 21\nprint(x * 2)\n").expect("write");
    assert_eq!(
        ok(&[
            "code",
            "run",
            &id,
            "--language",
            "python",
            file.to_str().expect("utf8")
        ]),
        "42\n"
    );
    let result = json(&[
        "code",
        "run",
        &id,
        "--language",
        "python",
        "--code",
        "print(x)",
        "--json",
    ]);
    assert_eq!(
        result["stdout"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect::<String>()),
        Some(String::from("21\n")),
        "{result}"
    );
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn a_missing_api_key_is_a_clear_error() {
    let out = run_in(None, None, &["sandbox", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("CROWNEST_API_KEY is not set"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn api_errors_print_message_and_code_and_exit_1() {
    let out = cli(&["sandbox", "get", "sbx_doesnotexist"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.trim_end().ends_with("(not_found)"),
        "{err}"
    );
    let out = cli(&["exec", "sbx_doesnotexist", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("(not_found)"), "{}", stderr(&out));
    // Usage errors are clap's: exit 2.
    assert_eq!(cli(&["sandbox", "create"]).status.code(), Some(2));
}

/// A TCP proxy in front of the shared server that cuts the first
/// connection carrying a log stream request `after` it was seen. Returns
/// its base URL and the request bytes it relayed, lower-cased.
pub(crate) fn cutting_proxy(after: std::time::Duration) -> (String, Arc<Mutex<String>>) {
    let upstream = shared().base_url.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(String::new()));
    let cut = Arc::new(AtomicBool::new(false));
    let requests = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&upstream).expect("connect upstream");
            let (seen, cut) = (requests.clone(), cut.clone());
            let (mut client_read, mut server_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut server_read, mut client_write) = (server, client);
            let to_cut = (
                client_write.try_clone().expect("clone"),
                server_write.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = client_read.read(&mut buf) {
                    if n == 0 || server_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                    seen.lock().expect("lock").push_str(&text);
                    if text.starts_with("get ")
                        && text.contains("/logs")
                        && !cut.swap(true, Ordering::SeqCst)
                    {
                        let (a, b) = (
                            to_cut.0.try_clone().expect("clone"),
                            to_cut.1.try_clone().expect("clone"),
                        );
                        std::thread::spawn(move || {
                            std::thread::sleep(after);
                            let _ = a.shutdown(Shutdown::Both);
                            let _ = b.shutdown(Shutdown::Both);
                        });
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_read, &mut client_write);
            });
        }
    });
    (base, seen)
}

#[test]
fn exec_resumes_a_dropped_log_stream_without_loss_or_repeats() {
    let id = sandbox();
    let (base, seen) = cutting_proxy(std::time::Duration::from_millis(800));
    let out = Command::new(crownest_bin())
        .args([
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.3; done; exit 5",
        ])
        .env("CROWNEST_BASE_URL", &base)
        .env("CROWNEST_API_KEY", &shared().key)
        .output()
        .expect("run exec");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "line1\nline2\nline3\nline4\nline5\nline6\n");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen.matches("/logs").count(),
        2,
        "one reconnection expected: {seen}"
    );
    assert!(
        seen.contains("last-event-id: "),
        "the reconnection must resume: {seen}"
    );
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn previews_create_ls_rm() {
    let id = sandbox();
    let created = json(&["previews", "create", &id, "8000", "--json"]);
    let preview = created["id"].as_str().expect("id").to_string();
    assert!(preview.starts_with("prv_"), "{created}");
    assert!(created["browserUrl"].as_str().is_some(), "{created}");
    let shown = ok(&["previews", "create", &id, "8001"]);
    assert!(
        shown.contains("port:     8001") && shown.contains("browser:  http"),
        "{shown}"
    );
    let refused = cli(&["previews", "create", &id, "8000"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("preview_exists"),
        "{}",
        stderr(&refused)
    );
    let listed = ok(&["previews", "ls", &id]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&preview) && l.contains("8000") && l.contains("active")),
        "{listed}"
    );
    let closed = json(&["previews", "rm", &id, &preview, "--json"]);
    assert_eq!(closed["status"], "closed", "{closed}");
    ok(&["sandbox", "kill", &id]);
}
