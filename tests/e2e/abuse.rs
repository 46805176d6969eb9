//! Abuse resistance: what an anonymous client, a tenant with a narrow key,
//! or code inside a sandbox sends must not exhaust the host, cross a
//! tenant or bypass a scope. One regression test per hole, named after
//! what broke.

use std::time::{Duration, Instant};

use crownest_e2e::{Server, SseParser, error_code, shared};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of the server's database files (the db and its WAL).
fn store_bytes(server: &Server) -> u64 {
    ["crownest.db", "crownest.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(server.data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test]
async fn anonymous_requests_with_huge_fields_write_nothing_to_the_store() {
    let server = Server::start();
    let key = server.key("anon-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox("python").await;
    // Let the store settle (WAL checkpoints after the create).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = store_bytes(&server);
    let http = reqwest::Client::new();
    let big = "p".repeat(6_000);
    for i in 0..50 {
        let response = http
            .put(format!(
                "{}/v1/sandboxes/{sandbox}/files?path={big}{i}",
                server.base_url
            ))
            .header("x-request-id", "r".repeat(60_000))
            .body("x")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 401);
        let id = response.headers()["x-request-id"].to_str().expect("id");
        assert!(
            id.len() <= 128,
            "a client request id over 128 bytes was kept"
        );
    }
    let grown = store_bytes(&server).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "50 anonymous requests grew the store by {grown} bytes"
    );
    // A short, safe request id is kept.
    let response = http
        .get(format!("{}/v1/health", server.base_url))
        .header("x-request-id", "trace-42.a:b_c")
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["x-request-id"], "trace-42.a:b_c");
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn an_idempotency_replay_is_authorised_like_the_first_request() {
    let server = Server::start();
    let admin = server.client(&server.key("replay-org", None, "all"));
    let narrow = server.client(&server.key("replay-org", None, "templates:read"));
    let other = server.client(&server.key("replay-org", None, "previews:create"));
    let sandbox = admin.sandbox("python").await;
    let path = format!("/v1/sandboxes/{sandbox}/previews");
    let send = |client: &crownest_e2e::Client| {
        client
            .request(reqwest::Method::POST, &path)
            .header("idempotency-key", "preview-once")
            .json(&json!({ "port": 8000 }))
            .send()
    };
    let first = send(&admin).await.expect("first");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    let token = first["token"].as_str().expect("token").to_string();

    // A key without the scope gets 403, not the stored 201 and its token.
    let replay = send(&narrow).await.expect("replay");
    assert_eq!(replay.status(), 403);
    let body: Value = replay.json().await.expect("json");
    assert!(!body.to_string().contains(&token), "{body}");
    // Another key with the scope does not see the first key's record.
    let other_replay = send(&other).await.expect("other");
    assert!(!other_replay.headers().contains_key("idempotent-replayed"));
    let body: Value = other_replay.json().await.expect("json");
    assert_eq!(error_code(&body), "preview_exists", "{body}");
    // The same key replays.
    let again = send(&admin).await.expect("again");
    assert!(again.headers().contains_key("idempotent-replayed"));
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["token"], token.as_str());

    // The stored response does not hold the token in clear.
    let db = std::fs::read(server.data_dir.join("crownest.db")).unwrap_or_default();
    let wal = std::fs::read(server.data_dir.join("crownest.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "the preview token is stored in clear"
        );
    }
    admin.kill(&sandbox).await;
}

/// Python that writes two display events of about 28 MB straight to the
/// runner's event pipe.
const HOSTILE_EVENTS: &str = r#"
import os, json
line = json.dumps({"type": "display_data", "data": {"text/plain": "x" * (28 * 1024 * 1024)}}) + "\n"
for _ in range(2):
    os.write(4, line.encode())
print("after")
"#;

#[tokio::test]
async fn huge_code_run_events_are_rejected_without_host_memory_growth() {
    let server = Server::start();
    let client = server.client(&server.key("events-org", None, "all"));
    let sandbox = client.sandbox("python").await;
    let pid = server.pid().expect("pid");
    let (peak_before, _) = memory_kib(pid);
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": HOSTILE_EVENTS, "timeoutMs": 120000 }),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    let outputs = result["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    for output in outputs {
        assert_eq!(output["type"], "rejected");
        assert_eq!(output["reason"], "output_too_large");
    }
    let (peak_after, _) = memory_kib(pid);
    let grown_mib = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        grown_mib < 200,
        "the server's peak memory grew by {grown_mib} MiB on a hostile run"
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn output_written_a_byte_at_a_time_is_coalesced_into_few_log_events() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let (status, command) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 -c \"import sys,time\nfor i in range(5000):\n    sys.stdout.write('x'); sys.stdout.flush()\n    time.sleep(0.0002)\"" }),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["stdout"].as_str().map(str::len), Some(5000));
    let id = command["id"].as_str().expect("id");
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sandbox}/commands/{id}/logs"),
        )
        .send()
        .await
        .expect("logs");
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        events.extend(parser.push(&chunk.expect("chunk")));
        if events.iter().any(|e| e.event == "exit") {
            break;
        }
    }
    let output: usize = events
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.data["data"].as_str().map_or(0, str::len))
        .sum();
    assert_eq!(output, 5000);
    assert!(
        events.len() < 1000,
        "5000 one-byte writes became {} log events",
        events.len()
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn sparse_files_and_collect_without_the_artifacts_scope_are_refused() {
    let s = shared();
    let admin = s.client_with(&s.key("sparse-org", None, "all"));
    let runner = s.client_with(&s.key(
        "sparse-org",
        None,
        "sandboxes:create,sandboxes:kill,commands:run,code:run",
    ));
    let sandbox = admin.sandbox("python").await;
    admin.run(&sandbox, "truncate -s 5G big.bin").await;
    let (status, body) = admin
        .post(
            &format!("/v1/sandboxes/{sandbox}/artifacts"),
            json!({ "path": "big.bin" }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // `collect` and `artifactPolicy: promote` need `artifacts:create`.
    let (status, body) = runner
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "echo x > out.txt", "collect": [{ "path": "out.txt" }] }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = runner
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": "1", "artifactPolicy": "promote" }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"), "{body}");
    let (_, list) = admin
        .get(&format!("/v1/sandboxes/{sandbox}/artifacts"))
        .await;
    assert!(list["data"].as_array().expect("data").is_empty(), "{list}");
    admin.kill(&sandbox).await;
}

/// A slow app: every request waits a few seconds before it is answered.
const SLOW_APP: &str = r#"
import http.server, time
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(1)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"#;

#[tokio::test]
async fn six_hundred_concurrent_preview_requests_leave_the_sandbox_alive() {
    let server = Server::start_with_env(&[
        ("CROWNEST_RATE_LIMIT", "0"),
        ("CROWNEST_PREVIEW_TIMEOUT_SECS", "5"),
    ]);
    let key = server.key("streams-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox("python").await;
    client.write_file(&sandbox, "slow.py", SLOW_APP).await;
    client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 slow.py", "background": true }),
        )
        .await;
    let (_, preview) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    let url = preview["url"].as_str().expect("url").to_string();
    let http = crownest_e2e::preview_client(&url);
    // Wait for the app.
    for _ in 0..100 {
        let status = http
            .get(&url)
            .header("x-api-key", &key)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = (0..600).map(|_| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        tokio::spawn(async move {
            http.get(&url)
                .header("x-api-key", key)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
    });
    let statuses = futures::future::join_all(requests).await;
    // Answered, busy, refused by the app's own listen backlog, or left
    // unanswered by an app out of threads (its pids limit): never a server
    // error, never a request held for ever, never a dead sandbox.
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count();
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|s| !matches!(s, Ok(200 | 502 | 503 | 504)))
        .collect();
    assert!(ok > 0 && unexpected.is_empty(), "ok {ok}: {unexpected:?}");
    // The sandbox survived, and the reaper does not take it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(row["status"], "running", "{row}");
    assert_eq!(
        client.run(&sandbox, "echo alive").await["stdout"],
        "alive\n"
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_half_sent_request_is_dropped_and_a_key_is_rate_limited() {
    let server = Server::start_with_env(&[
        ("CROWNEST_HEADER_TIMEOUT_SECS", "2"),
        ("CROWNEST_RATE_LIMIT", "5"),
        ("CROWNEST_RATE_BURST", "5"),
    ]);
    let address = server.base_url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    conn.write_all(b"GET /v1/hea").await.expect("half a line");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), conn.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the half-sent request was still open after {:?}",
        started.elapsed()
    );

    let client = server.client(&server.key("rate-org", None, "all"));
    let mut limited = None;
    for _ in 0..30 {
        let response = client
            .request(reqwest::Method::GET, "/v1/templates")
            .send()
            .await
            .expect("send");
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("30 quick requests were never rate limited");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    let body: Value = limited.json().await.expect("json");
    assert_eq!(error_code(&body), "rate_limited");
}

#[tokio::test]
async fn one_sandbox_cannot_take_the_hosts_inotify_instances_or_odd_sockets() {
    let client = shared().client();
    let greedy = client.sandbox("python").await;
    let neighbour = client.sandbox("python").await;
    let grab = "python3 -c \"import ctypes\nlibc = ctypes.CDLL(None)\nfds = [libc.inotify_init1(0) for _ in range(400)]\nprint(sum(1 for f in fds if f >= 0))\"";
    let taken = client.run(&greedy, grab).await;
    let count: u32 = taken["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .expect("count");
    assert!(count <= 128, "one sandbox took {count} inotify instances");
    // Its neighbour still gets some, while the greedy one holds them.
    let (_, held) = client
        .post(
            &format!("/v1/sandboxes/{greedy}/commands"),
            json!({ "command": grab.replace("print(", "import time; time.sleep(30); print("), "background": true }),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let theirs = client.run(&neighbour, grab).await;
    let got: u32 = theirs["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .expect("count");
    assert!(got >= 64, "the neighbour got only {got} inotify instances");
    let _ = held;
    let odd = client
        .run(
            &neighbour,
            "python3 -c \"import socket\nfor f in (40, 38, 17):\n    try:\n        socket.socket(f, socket.SOCK_STREAM if f != 17 else socket.SOCK_RAW); print('opened', f)\n    except OSError as e: print('refused', f)\" ; ulimit -c",
        )
        .await;
    let text = odd["stdout"].as_str().expect("stdout");
    assert!(!text.contains("opened"), "{text}");
    assert!(text.ends_with("0\n"), "core dumps are not off: {text}");
    let (_, health) = shared().anonymous_client().get("/v1/health").await;
    assert!(health["runtimeVersion"].is_string(), "{health}");
    client.kill(&greedy).await;
    client.kill(&neighbour).await;
}

#[tokio::test]
async fn a_timed_out_command_leaves_no_setsid_child_behind() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let (status, command) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "setsid sleep 701234 & sleep 300", "timeoutMs": 500 }),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "timed_out");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = client
        .run(
            &sandbox,
            "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done | grep -c '^sleep 701234'",
        )
        .await;
    assert_eq!(left["stdout"], "0\n", "{left}");
    client.kill(&sandbox).await;
}

/// Code that forges the end of its run on the runner's event pipe, then
/// goes on printing: a run must end only on the runner's own `done`.
const FORGED_DONE: &str = r#"
import gc, json, os, types
ids = {g["current_id"] for g in (f.__globals__ for f in gc.get_objects() if isinstance(f, types.FunctionType)) if "current_id" in g}
for run_id in ids:
    os.write(4, (json.dumps({"id": run_id, "type": "done", "execution_count": 1, "status": "ok"}) + "\n").encode())
print("after the forged end")
"#;

#[tokio::test]
async fn a_run_cannot_be_ended_early_and_its_subprocesses_get_no_runner_pipes() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": FORGED_DONE }),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    let stdout: String = result["stdout"]
        .as_array()
        .expect("stdout")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(stdout.contains("after the forged end"), "{result}");
    let (_, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": "import subprocess\nprint(subprocess.run(['sh', '-c', 'ls /proc/self/fd'], capture_output=True, text=True).stdout.split())" }),
        )
        .await;
    let stdout: String = result["stdout"]
        .as_array()
        .expect("stdout")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !stdout.contains("'4'") && !stdout.contains("'5'"),
        "a subprocess inherited the runner's pipes: {stdout}"
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_page_of_commands_is_bounded_by_bytes() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    for _ in 0..6 {
        client
            .run(
                &sandbox,
                "head -c 1048576 /dev/zero | tr '\\0' a; head -c 1048576 /dev/zero | tr '\\0' b >&2",
            )
            .await;
    }
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sandbox}/commands?limit=200"),
        )
        .send()
        .await
        .expect("list");
    let bytes = response.bytes().await.expect("body");
    assert!(bytes.len() < 10 * 1024 * 1024, "{} bytes", bytes.len());
    let page: Value = serde_json::from_slice(&bytes).expect("json");
    assert!(page["data"].as_array().expect("data").len() < 6);
    assert!(page["nextCursor"].is_string());
    client.kill(&sandbox).await;
}
