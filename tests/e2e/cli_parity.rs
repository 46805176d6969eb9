//! The CLI does every call the API has (issue 16): idempotency keys,
//! flags beside the environment, errors with their details, Code Context
//! commands, `exec --collect/--background/--stdin`, Ctrl-C, `commands`,
//! sandbox timeout/metrics/filters, files exists/watch, usage, audit and
//! shell completions. The real binary against the shared server.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crownest_e2e::{crownest_bin, shared};
use serde_json::Value;

use crate::cli::{cli, cutting_proxy, json, ok, run_in, sandbox, stderr, stdout};

#[test]
fn an_idempotency_key_replays_a_create_and_refuses_another_request() {
    let key = format!("cli-test-{}", std::process::id());
    let create = |template: &str| {
        cli(&[
            "sandbox",
            "create",
            "--template",
            template,
            "--idempotency-key",
            &key,
            "--json",
        ])
    };
    let first = create("python");
    assert!(first.status.success(), "{}", stderr(&first));
    let again = create("python");
    assert!(again.status.success(), "{}", stderr(&again));
    let (first, again): (Value, Value) = (
        serde_json::from_slice(&first.stdout).expect("json"),
        serde_json::from_slice(&again.stdout).expect("json"),
    );
    assert_eq!(
        first["id"], again["id"],
        "the same key must not create twice"
    );
    let other = create("python-gvisor");
    assert_eq!(other.status.code(), Some(1));
    let envelope: Value = serde_json::from_slice(&other.stderr).expect("--json error envelope");
    assert_eq!(
        envelope["error"]["code"], "idempotency_key_reused",
        "{envelope}"
    );
    assert_eq!(envelope["error"]["details"]["idempotencyKey"], key.as_str());

    // Without --idempotency-key every mutating request still carries one
    // (a fresh one), GETs none.
    let (base, seen) = cutting_proxy(Duration::from_secs(3600));
    let id = first["id"].as_str().expect("id");
    let out = run_in(
        None,
        Some(&shared().key),
        &["sandbox", "kill", id, "--base-url", &base],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = seen.lock().expect("lock").clone();
    let delete = seen
        .find("delete /v1/sandboxes/")
        .expect("the DELETE went through");
    let head = &seen[delete
        ..seen[delete..]
            .find("\r\n\r\n")
            .map_or(seen.len(), |e| delete + e)];
    assert!(head.contains("idempotency-key: "), "{head}");
}

#[test]
fn api_key_and_base_url_flags_beat_the_environment() {
    // CROWNEST_BASE_URL points nowhere and CROWNEST_API_KEY is unset: the
    // flags alone reach the server.
    let out = Command::new(crownest_bin())
        .args([
            "sandbox",
            "list",
            "--json",
            "--api-key",
            &shared().key,
            "--base-url",
            &shared().base_url,
        ])
        .env("CROWNEST_BASE_URL", "http://127.0.0.1:9")
        .env_remove("CROWNEST_API_KEY")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(list["data"].is_array(), "{list}");
    // A wrong --api-key wins over a right environment variable.
    let out = Command::new(crownest_bin())
        .args(["sandbox", "list", "--api-key", "cn_live_wrong"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("(unauthorized)"), "{}", stderr(&out));
}

#[test]
fn errors_print_code_message_and_details_and_json_gives_the_envelope() {
    let out = cli(&["sandbox", "get", "sbx_doesnotexist"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.trim_end().ends_with("(not_found)"),
        "{err}"
    );
    assert!(
        err.contains(r#""id":"sbx_doesnotexist""#),
        "details missing: {err}"
    );
    let out = cli(&["sandbox", "get", "sbx_doesnotexist", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let envelope: Value = serde_json::from_slice(&out.stderr).expect("envelope");
    assert_eq!(envelope["error"]["code"], "not_found");
    assert_eq!(envelope["error"]["details"]["id"], "sbx_doesnotexist");
    assert!(envelope["error"]["message"].as_str().is_some());
}

#[test]
fn code_contexts_are_created_listed_restarted_and_removed() {
    let id = sandbox();
    let context = json(&[
        "code",
        "context",
        "create",
        &id,
        "--language",
        "python",
        "--json",
    ]);
    let cctx = context["id"].as_str().expect("id").to_string();
    assert!(cctx.starts_with("cctx_"), "{context}");
    assert_eq!(context["isDefault"], false);
    let run = |code: &str| {
        cli(&[
            "code",
            "run",
            &id,
            "--language",
            "python",
            "--context",
            &cctx,
            "--code",
            code,
        ])
    };
    assert!(run("x = 41").status.success());
    assert_eq!(stdout(&run("print(x + 1)")), "42\n");
    let listed = json(&["code", "context", "ls", &id, "--json"]);
    assert!(
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|c| c["id"] == cctx.as_str()),
        "{listed}"
    );
    let restarted = json(&["code", "context", "restart", &id, &cctx, "--json"]);
    assert_eq!(restarted["id"], cctx.as_str());
    let after = run("print(x)");
    assert_eq!(after.status.code(), Some(1), "x survived the restart");
    assert!(stderr(&after).contains("NameError"), "{}", stderr(&after));
    ok(&["code", "context", "rm", &id, &cctx]);
    let listed = json(&["code", "context", "ls", &id, "--json"]);
    assert!(
        !listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|c| c["id"] == cctx.as_str()),
        "{listed}"
    );
    let gone = cli(&["code", "context", "get", &id, &cctx]);
    assert_eq!(gone.status.code(), Some(1));
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn exec_collects_files_as_artifacts_and_reports_a_missing_one() {
    let id = sandbox();
    let out = cli(&[
        "exec",
        &id,
        "--collect",
        "out/report.txt:report-final.txt",
        "--collect",
        "missing.txt",
        "--",
        "sh",
        "-c",
        "mkdir -p out && echo done > out/report.txt",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("collected out/report.txt as report-final.txt (art_"),
        "{err}"
    );
    assert!(err.contains("not collected missing.txt"), "{err}");
    let record = json(&[
        "exec",
        &id,
        "--collect",
        "out/report.txt",
        "--json",
        "--",
        "true",
    ]);
    let artifact = record["artifacts"][0]["artifactId"]
        .as_str()
        .expect("artifact");
    let downloaded = ok(&["artifacts", "download", artifact, "-"]);
    assert_eq!(downloaded, "done\n");
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn exec_stdin_feeds_the_command_and_background_returns_its_id() {
    let id = sandbox();
    let mut child = Command::new(crownest_bin())
        .args(["exec", &id, "--stdin", "--", "sh", "-c", "wc -c; echo end"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let big: String = "0123456789".repeat(20_000); // several stdin requests
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(big.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["200000", "end"]
    );

    let started = ok(&[
        "exec",
        &id,
        "--background",
        "--",
        "sh",
        "-c",
        "echo bg; sleep 60",
    ]);
    let command = started.trim().to_string();
    assert!(command.starts_with("cmd_"), "{started}");
    let listed = json(&["commands", "ls", &id, "--status", "running", "--json"]);
    assert!(
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|c| c["id"] == command.as_str()),
        "{listed}"
    );
    let record = json(&["commands", "get", &id, &command, "--json"]);
    assert_eq!(record["status"], "running", "{record}");
    // The log so far, without waiting for the end.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&["commands", "logs", &id, &command]).contains("bg") {
        assert!(Instant::now() < deadline, "no output in the log");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&["commands", "signal", &id, &command, "TERM"]);
    let follow = cli(&["commands", "logs", &id, &command, "--follow"]);
    assert_eq!(follow.status.code(), Some(128 + 15), "{}", stderr(&follow));
    assert_eq!(stdout(&follow), "bg\n");
    // Cancel of another one.
    let second = ok(&["exec", &id, "--background", "--", "sleep", "60"]);
    let second = second.trim();
    let canceled = json(&["commands", "cancel", &id, second, "--json"]);
    assert!(
        canceled["cancelRequestedAt"].as_str().is_some(),
        "{canceled}"
    );
    let bad = cli(&["commands", "signal", &id, second, "NOPE"]);
    assert_eq!(bad.status.code(), Some(1));
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn ctrl_c_during_exec_cancels_the_remote_command() {
    let id = sandbox();
    let mut child = Command::new(crownest_bin())
        .args(["exec", &id, "--", "sh", "-c", "echo started; sleep 120"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("read");
    assert_eq!(first, "started\n");
    // SAFETY: kill(2) on the child's pid, which is alive (not yet waited for).
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let out = child.wait_with_output().expect("wait");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("canceling cmd_"), "{err}");
    let commands = json(&["commands", "ls", &id, "--json"]);
    let record = &commands["data"][0];
    assert_eq!(record["status"], "canceled", "{commands}");
    cli(&["sandbox", "kill", &id]);
}

#[test]
fn sandbox_list_filters_timeout_and_metrics() {
    let tag = format!("cli-filter-{}", std::process::id());
    let meta = format!(r#"{{"job":"{tag}"}}"#);
    let created = json(&[
        "sandbox",
        "create",
        "--template",
        "python",
        "--metadata",
        &meta,
        "--json",
    ]);
    let id = created["id"].as_str().expect("id").to_string();
    let other = sandbox();
    let listed = json(&[
        "sandbox",
        "ls",
        "--metadata",
        &format!("job={tag}"),
        "--status",
        "running",
        "--json",
    ]);
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()], "{listed}");
    let none = json(&["sandbox", "ls", "--template", "no-such-template", "--json"]);
    assert_eq!(none["data"], serde_json::json!([]));
    let bad = cli(&["sandbox", "ls", "--created-after", "yesterday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("createdAfter"), "{}", stderr(&bad));

    let before = created["expiresAt"]
        .as_str()
        .expect("expiresAt")
        .to_string();
    let extended = json(&["sandbox", "timeout", &id, "--ttl-ms", "3000000", "--json"]);
    assert!(
        extended["expiresAt"].as_str().expect("expiresAt") > before.as_str(),
        "{extended}"
    );
    let shortened = json(&["sandbox", "timeout", &id, "--ttl-ms", "60000", "--json"]);
    assert!(
        shortened["expiresAt"].as_str().expect("expiresAt") < before.as_str(),
        "{shortened}"
    );

    let metrics = json(&["sandbox", "metrics", &id, "--json"]);
    assert_eq!(metrics["sandboxId"], id.as_str(), "{metrics}");
    assert!(
        metrics["memoryUsedBytes"].as_u64().is_some_and(|m| m > 0),
        "{metrics}"
    );
    let human = ok(&["sandbox", "metrics", &id]);
    assert!(
        human.contains("cpu ") && human.contains("memory "),
        "{human}"
    );
    // --follow prints readings until the sandbox ends.
    let follower = Command::new(crownest_bin())
        .args(["sandbox", "metrics", &id, "--follow", "--json"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(2500));
    ok(&["sandbox", "kill", &id]);
    let out = follower.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let readings = stdout(&out).lines().count();
    assert!(readings >= 2, "{}", stdout(&out));
    cli(&["sandbox", "kill", &other]);
}

#[test]
fn files_exists_and_watch() {
    let id = sandbox();
    ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "mkdir -p d && echo x > d/here.txt",
    ]);
    assert_eq!(ok(&["files", "exists", &id, "d/here.txt"]), "true\n");
    assert_eq!(ok(&["files", "exists", &id, "d/absent.txt"]), "false\n");
    let answer = json(&["files", "exists", &id, "d", "--json"]);
    assert_eq!(answer["exists"], true);
    let outside = cli(&["files", "exists", &id, "/etc/passwd"]);
    assert_eq!(outside.status.code(), Some(1));
    assert!(
        stderr(&outside).contains("(path_outside_workspace)"),
        "{}",
        stderr(&outside)
    );

    let mut watcher = Command::new(crownest_bin())
        .args(["files", "watch", &id, "d"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut err = BufReader::new(watcher.stderr.take().expect("stderr"));
    let mut ready = String::new();
    err.read_line(&mut ready).expect("read");
    assert_eq!(ready, "watching /workspace/d\n");
    ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo y > d/new.txt && mv d/new.txt d/moved.txt",
    ]);
    ok(&["sandbox", "kill", &id]);
    let out = watcher.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0));
    let lines = stdout(&out);
    assert!(lines.contains("create /workspace/d/new.txt\n"), "{lines}");
    assert!(
        lines.contains("rename /workspace/d/new.txt -> /workspace/d/moved.txt\n"),
        "{lines}"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).expect("read");
    assert!(rest.contains("watch ended: sandbox_destroyed"), "{rest}");
}

#[test]
fn usage_and_audit_ls() {
    let id = sandbox();
    ok(&["exec", &id, "--", "sleep", "1.2"]);
    ok(&["sandbox", "kill", &id]);
    // A sandbox's seconds are metered once it has lived one; a killed
    // one's line is final.
    let usage = json(&["usage", "--json"]);
    assert!(
        usage["totalComputeUnitSeconds"].as_i64().is_some(),
        "{usage}"
    );
    let line = usage["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|l| l["key"] == id.as_str())
        .unwrap_or_else(|| panic!("no line for {id}: {usage}"))
        .clone();
    assert!(line["seconds"].as_i64().is_some_and(|s| s >= 1), "{line}");
    let by_day = json(&["usage", "--group-by", "day", "--json"]);
    assert_eq!(by_day["groupBy"], "day");
    let bad = cli(&["usage", "--group-by", "planet"]);
    assert_eq!(bad.status.code(), Some(1));
    let audit = json(&["audit", "ls", "--resource", &id, "--json"]);
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"sandbox.create"), "{audit}");
    let limited = json(&["audit", "ls", "--limit", "1", "--json"]);
    assert_eq!(limited["data"].as_array().expect("data").len(), 1);
    let table = ok(&["audit", "ls", "--resource", &id]);
    assert!(
        table.starts_with("AT ") && table.contains("sandbox.create"),
        "{table}"
    );
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish_without_a_server() {
    for (shell, marker) in [
        ("bash", "_crownest()"),
        ("zsh", "#compdef crownest"),
        ("fish", "complete -c crownest"),
    ] {
        let out = run_in(None, None, &["completions", shell]);
        assert!(out.status.success(), "{}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: {script:.300}");
        for command in [
            "sandbox",
            "exec",
            "commands",
            "usage",
            "audit",
            "idempotency-key",
        ] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    assert_eq!(
        run_in(None, None, &["completions", "tcsh"]).status.code(),
        Some(2)
    );
}

#[test]
fn exec_stdin_returns_when_the_command_ends_before_the_input_does() {
    let id = sandbox();
    let mut child = Command::new(crownest_bin())
        .args(["exec", &id, "--stdin", "--", "head", "-c", "3"])
        .env("CROWNEST_BASE_URL", &shared().base_url)
        .env("CROWNEST_API_KEY", &shared().key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Input that is never closed: the client must not wait for its end.
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(b"abcdef").expect("write");
    input.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    drop(input);
    let out = child.wait_with_output().expect("wait");
    assert!(
        status.is_some(),
        "exec kept waiting for stdin after the command ended"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "abc");
    cli(&["sandbox", "kill", &id]);
}
