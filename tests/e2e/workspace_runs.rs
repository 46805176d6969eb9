//! Workspace Runs (seed 003) end to end: a repo-shaped archive on
//! `python-node` through both upload paths, the event log (complete,
//! ordered, durable, resumable by `afterSeq` and `Last-Event-ID`),
//! artifacts, the signed Evidence Bundle checked by `crownest evidence
//! verify`, and what an attacker's archive or a broken client gets:
//! traversal entries, device nodes, gzip bombs, symlinks out, wrong
//! digests, truncated uploads, starts out of order, cancel, timeout and a
//! host killed mid-run.

use std::time::Duration;

use crownest_e2e::{Client, Server, SseParser, error_code, shared};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One entry of a test archive.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    /// A character device node.
    Device(&'a str),
    Fifo(&'a str),
}

/// Writes a tar header by hand (the `tar` crate refuses `..` and absolute
/// names, which is exactly what these tests need to send).
fn header(name: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().expect("gnu header");
        let bytes = name.as_bytes();
        assert!(bytes.len() < 100, "test names fit the header");
        gnu.name[..bytes.len()].copy_from_slice(bytes);
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    header
}

/// A .tar.gz of `entries`.
fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for entry in entries {
        match entry {
            Entry::File(name, data) => {
                let h = header(name, tar::EntryType::Regular, data.len() as u64, None);
                tar.append(&h, *data).expect("append");
            }
            Entry::Dir(name) => {
                let h = header(name, tar::EntryType::Directory, 0, None);
                tar.append(&h, std::io::empty()).expect("append");
            }
            Entry::Symlink(name, target) => {
                let h = header(name, tar::EntryType::Symlink, 0, Some(target));
                tar.append(&h, std::io::empty()).expect("append");
            }
            Entry::Device(name) => {
                let h = header(name, tar::EntryType::Char, 0, None);
                tar.append(&h, std::io::empty()).expect("append");
            }
            Entry::Fifo(name) => {
                let h = header(name, tar::EntryType::Fifo, 0, None);
                tar.append(&h, std::io::empty()).expect("append");
            }
        }
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

const PACKAGE_JSON: &[u8] =
    br#"{"name":"demo","version":"1.0.0","scripts":{"test":"node test.js"}}"#;
const TEST_JS: &[u8] =
    b"require('fs').mkdirSync('out',{recursive:true});require('fs').writeFileSync('out/node.txt','node ok\\n');console.log('node tests pass');\n";
const REPORT_PY: &[u8] = b"import json, os\nprint('python report')\njson.dump({'ok': True}, open('out/report.json', 'w'))\n";

/// A repo-shaped archive: a package.json and a Python script.
fn repo() -> Vec<u8> {
    archive(&[
        Entry::Dir("app/"),
        Entry::File("app/package.json", PACKAGE_JSON),
        Entry::File("app/test.js", TEST_JS),
        Entry::File("app/report.py", REPORT_PY),
    ])
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates a run for `bytes` (with extra body fields).
async fn create(client: &Client, bytes: &[u8], command: &str, extra: Value) -> Value {
    let mut body = json!({
        "command": command,
        "archive": { "sizeBytes": bytes.len(), "sha256": sha256(bytes) },
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    let (status, run) = client.post("/v1/workspace-runs", body).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["status"], "awaiting_archive");
    assert!(run["id"].as_str().expect("id").starts_with("wsr_"));
    run
}

async fn put_archive(client: &Client, id: &str, bytes: Vec<u8>) -> (u16, Value) {
    let response = client
        .request(
            reqwest::Method::PUT,
            &format!("/v1/workspace-runs/{id}/archive"),
        )
        .body(bytes)
        .send()
        .await
        .expect("put");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn staged_upload(client: &Client, id: &str, bytes: Vec<u8>) -> (u16, Value) {
    let (status, ticket) = client
        .post(
            &format!("/v1/workspace-runs/{id}/archive/uploads"),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{ticket}");
    assert_eq!(ticket["method"], "PUT");
    assert_eq!(ticket["maxBytes"], bytes.len());
    let url = ticket["url"].as_str().expect("url");
    let response = reqwest::Client::new()
        .put(url)
        .body(bytes)
        .send()
        .await
        .expect("put");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn start(client: &Client, id: &str) -> (u16, Value) {
    client
        .post(&format!("/v1/workspace-runs/{id}/start"), json!({}))
        .await
}

/// Every event of a run, by JSON windows of `limit`.
async fn all_events(client: &Client, id: &str, limit: usize) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = client
            .get(&format!(
                "/v1/workspace-runs/{id}/events?afterSeq={after}&limit={limit}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().expect("data").clone();
        let done = page["terminal"].as_bool().expect("terminal flag");
        after = page["nextAfterSeq"].as_i64().expect("next");
        events.extend(data.clone());
        if done || data.is_empty() {
            return events;
        }
    }
}

/// Reads the SSE stream (from `last_event_id` / `after_seq`) until
/// `terminal`, or until `stop_after` events were read.
async fn sse_events(
    client: &Client,
    id: &str,
    last_event_id: Option<i64>,
    after_seq: Option<i64>,
    stop_after: Option<usize>,
) -> Vec<Value> {
    let path = match after_seq {
        Some(n) => format!("/v1/workspace-runs/{id}/events?afterSeq={n}"),
        None => format!("/v1/workspace-runs/{id}/events"),
    };
    let mut request = client
        .request(reqwest::Method::GET, &path)
        .header("accept", "text/event-stream");
    if let Some(n) = last_event_id {
        request = request.header("last-event-id", n.to_string());
    }
    let response = request.send().await.expect("sse");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        for event in parser.push(&chunk.expect("chunk")) {
            assert_eq!(
                event.id.as_deref(),
                Some(event.data["seq"].to_string().as_str()),
                "the SSE id is the seq"
            );
            assert_eq!(event.event, event.data["type"].as_str().unwrap_or_default());
            let terminal = event.event == "terminal";
            events.push(event.data);
            if terminal || stop_after.is_some_and(|n| events.len() >= n) {
                return events;
            }
        }
    }
    events
}

/// Waits for the run to be terminal and its evidence written.
async fn wait_done(client: &Client, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (status, run) = client.get(&format!("/v1/workspace-runs/{id}")).await;
        assert_eq!(status, 200, "{run}");
        if run["evidenceReady"] == true {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never finished: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_status(client: &Client, id: &str, status: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, run) = client.get(&format!("/v1/workspace-runs/{id}")).await;
        if run["status"] == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never reached {status}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seq 1, 2, 3, … without gaps; one terminal event, the last.
fn assert_ordered(events: &[Value]) {
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    let expected: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, expected, "events have gaps or repeats");
    let terminals = events.iter().filter(|e| e["type"] == "terminal").count();
    assert_eq!(terminals, 1);
    assert_eq!(events.last().expect("last")["type"], "terminal");
}

fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "status")
        .map(|e| e["data"]["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn output(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .filter_map(|e| e["data"]["data"].as_str())
        .collect()
}

async fn evidence(client: &Client, id: &str) -> Vec<u8> {
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/workspace-runs/{id}/evidence"),
        )
        .send()
        .await
        .expect("evidence");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("bytes").to_vec()
}

/// `crownest evidence verify` with the server's published keys.
fn verify(base_url: &str, key: &str, bundle: &[u8], artifacts: &[(&str, &[u8])]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bundle.json");
    std::fs::write(&path, bundle).expect("write");
    let mut command = std::process::Command::new(crownest_e2e::crownest_bin());
    command
        .args(["evidence", "verify"])
        .arg(&path)
        .args(["--server", base_url])
        .env("CROWNEST_API_KEY", key);
    for (i, (name, bytes)) in artifacts.iter().enumerate() {
        let file = dir.path().join(format!("artifact-{i}"));
        std::fs::write(&file, bytes).expect("write");
        command
            .arg("--artifact")
            .arg(format!("{name}={}", file.display()));
    }
    let out = command.output().expect("verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn artifact_bytes(client: &Client, id: &str) -> Vec<u8> {
    let response = client
        .request(reqwest::Method::GET, &format!("/v1/artifacts/{id}/content"))
        .send()
        .await
        .expect("content");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("bytes").to_vec()
}

const REPO_COMMAND: &str = "cd app && npm test && python3 report.py";

fn repo_artifacts() -> Value {
    json!({"artifacts": [{"path": "app/out/report.json", "name": "report"}, {"path": "app/out/node.txt"}],
           "metadata": {"repo": "acme/app", "commit": "abc123"}, "env": {"CI": "1"}})
}

#[tokio::test]
async fn a_repo_archive_runs_on_python_node_with_signed_evidence() {
    let shared = shared();
    let client = shared.client();
    let bytes = repo();
    let run = create(&client, &bytes, REPO_COMMAND, repo_artifacts()).await;
    let id = run["id"].as_str().expect("id");
    assert_eq!(run["template"], "python-node");

    // Start before the upload is refused; the evidence is not there yet.
    let (status, body) = start(&client, id).await;
    assert_eq!((status, error_code(&body)), (409, "archive_not_uploaded"));
    let (status, body) = client
        .get(&format!("/v1/workspace-runs/{id}/evidence"))
        .await;
    assert_eq!((status, error_code(&body)), (409, "evidence_not_ready"));

    let (status, uploaded) = put_archive(&client, id, bytes.clone()).await;
    assert_eq!(status, 200, "{uploaded}");
    assert_eq!(uploaded["archive"]["uploaded"], true);
    let (status, started) = start(&client, id).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["status"], "queued");
    let (status, body) = start(&client, id).await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "workspace_run_already_started")
    );
    let (status, body) = put_archive(&client, id, bytes.clone()).await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "workspace_run_not_awaiting_archive")
    );

    // Live: the SSE stream from the start ends at the terminal event.
    let live = sse_events(&client, id, None, None, None).await;
    assert_ordered(&live);
    let run = wait_done(&client, id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["exitCode"], 0);

    // Durable: the same log replays after the end, by SSE and by JSON.
    let replay = all_events(&client, id, 3).await;
    assert_eq!(replay, live);
    assert_eq!(
        statuses(&replay),
        ["queued", "extracting", "running"],
        "{replay:?}"
    );
    let progress: Vec<&Value> = replay
        .iter()
        .filter(|e| e["type"] == "archive_progress")
        .collect();
    assert_eq!(progress.last().expect("progress")["data"]["done"], true);
    assert_eq!(progress.last().expect("progress")["data"]["entries"], 4);
    let stdout = output(&replay, "stdout");
    assert!(stdout.contains("node tests pass"), "{stdout}");
    assert!(stdout.contains("python report"), "{stdout}");
    let collected: Vec<&Value> = replay
        .iter()
        .filter(|e| e["type"] == "artifact_collected")
        .collect();
    assert_eq!(collected.len(), 2, "{replay:?}");
    let terminal = replay.last().expect("terminal");
    assert_eq!(terminal["data"]["status"], "succeeded");

    // The sandbox is gone; the artifacts outlive it.
    let sandbox = run["sandboxId"].as_str().expect("sandbox");
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "destroyed", "{sbx}");
    let report_id = run["collected"][0]["artifactId"]
        .as_str()
        .expect("artifact");
    let node_id = run["collected"][1]["artifactId"]
        .as_str()
        .expect("artifact");
    let report = artifact_bytes(&client, report_id).await;
    let node = artifact_bytes(&client, node_id).await;
    assert_eq!(node, b"node ok\n");
    assert_eq!(run["collected"][1]["name"], "node.txt");

    // The bundle says what happened, signed.
    let document = evidence(&client, id).await;
    let parsed: Value = serde_json::from_slice(&document).expect("json");
    let bundle = &parsed["bundle"];
    assert_eq!(bundle["runId"], id);
    assert_eq!(bundle["status"], "succeeded");
    assert_eq!(bundle["exitCode"], 0);
    assert_eq!(bundle["command"], REPO_COMMAND);
    assert_eq!(bundle["envNames"], json!(["CI"]));
    assert_eq!(bundle["template"]["name"], "python-node");
    assert_eq!(bundle["template"]["runtime"], "oci");
    assert_eq!(
        bundle["template"]["recipeHash"].as_str().map(str::len),
        Some(64)
    );
    assert_eq!(bundle["archive"]["sha256"], sha256(&bytes));
    assert_eq!(bundle["archive"]["sizeBytes"], bytes.len());
    assert_eq!(bundle["metadata"]["repo"], "acme/app");
    assert_eq!(bundle["events"]["count"], replay.len());
    assert_eq!(bundle["terminalEvent"], *terminal);
    assert_eq!(bundle["artifacts"][0]["sha256"], sha256(&report));
    assert_eq!(bundle["artifacts"][1]["sizeBytes"], node.len());
    assert!(bundle["usage"]["pricingVersion"].is_string());
    assert!(bundle["usage"]["computeUnitSeconds"].as_i64().expect("cus") >= 1);
    assert!(bundle["host"]["version"].is_string());
    // The event digest is the documented one.
    let mut hasher = Sha256::new();
    for event in &replay {
        hasher.update(crownest::evidence::canonical(event).as_bytes());
        hasher.update(b"\n");
    }
    assert_eq!(bundle["events"]["sha256"], hex(&hasher.finalize()));
    assert_eq!(parsed["signature"]["algorithm"], "ed25519");

    let (ok, text) = verify(
        &shared.base_url,
        &shared.key,
        &document,
        &[("report", &report), (node_id, &node)],
    );
    assert!(ok, "{text}");

    // Tampered: one byte of the bundle, or an artifact swapped.
    let text_doc = String::from_utf8(document.clone()).expect("utf8");
    let tampered = text_doc.replacen("\"exitCode\": 0", "\"exitCode\": 1", 1);
    assert_ne!(tampered, text_doc);
    let (ok, text) = verify(&shared.base_url, &shared.key, tampered.as_bytes(), &[]);
    assert!(!ok, "a changed bundle verified: {text}");
    assert!(text.contains("signature"), "{text}");
    let (ok, text) = verify(
        &shared.base_url,
        &shared.key,
        &document,
        &[("report", &node)],
    );
    assert!(!ok, "a swapped artifact verified: {text}");
    assert!(text.contains("report"), "{text}");

    // Listed, filterable by status and metadata.
    let (_, page) = client
        .get("/v1/workspace-runs?status=succeeded&metadata.repo=acme/app&metadata.commit=abc123")
        .await;
    let ids: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert!(ids.contains(&id), "{page}");
    let (_, page) = client
        .get("/v1/workspace-runs?metadata.repo=acme/other")
        .await;
    assert!(
        !page["data"]
            .as_array()
            .expect("data")
            .iter()
            .any(|r| r["id"] == id)
    );
    let (status, body) = client.get("/v1/workspace-runs?status=bogus").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
}

#[tokio::test]
async fn a_staged_upload_runs_and_keep_sandbox_keeps_it() {
    let client = shared().client();
    let bytes = repo();
    let run = create(
        &client,
        &bytes,
        "cd app && npm test",
        json!({"keepSandbox": true, "artifacts": [{"path": "app/out/node.txt"}]}),
    )
    .await;
    let id = run["id"].as_str().expect("id");
    let (status, uploaded) = staged_upload(&client, id, bytes).await;
    assert_eq!(status, 200, "{uploaded}");
    assert_eq!(uploaded["id"], id);
    assert_eq!(uploaded["archive"]["uploaded"], true);
    let (status, _) = start(&client, id).await;
    assert_eq!(status, 202);
    let run = wait_done(&client, id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let sandbox = run["sandboxId"].as_str().expect("sandbox");
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "running", "keepSandbox keeps it: {sbx}");
    let workspace = client.run(sandbox, "cat app/out/node.txt").await;
    assert_eq!(workspace["stdout"], "node ok\n");
    client.kill(sandbox).await;
}

#[tokio::test]
async fn bad_run_requests_get_stable_codes() {
    let client = shared().client();
    let good = json!({"command": "true", "archive": {"sizeBytes": 10, "sha256": "a".repeat(64)}});
    let with = |patch: Value| {
        let mut body = good.clone();
        if let (Value::Object(b), Value::Object(p)) = (&mut body, patch) {
            b.extend(p);
        }
        body
    };
    let cases = [
        (
            with(json!({"archive": {"sizeBytes": 10, "sha256": "xyz"}})),
            400,
            "invalid_request",
        ),
        (
            with(json!({"archive": {"sizeBytes": 10, "sha256": "g".repeat(64)}})),
            400,
            "invalid_request",
        ),
        (
            with(json!({"archive": {"sizeBytes": 2_000_000_000_i64, "sha256": "a".repeat(64)}})),
            400,
            "archive_too_large",
        ),
        (
            with(json!({"archive": {"sizeBytes": 0, "sha256": "a".repeat(64)}})),
            400,
            "invalid_request",
        ),
        (
            with(json!({"artifacts": [{"path": "/etc/passwd"}]})),
            400,
            "invalid_request",
        ),
        (
            with(json!({"artifacts": [{"path": "../x"}]})),
            400,
            "invalid_request",
        ),
        (
            with(json!({"artifacts": [{"path": "a/../../x"}]})),
            400,
            "invalid_request",
        ),
        (
            with(
                json!({"artifacts": (0..33).map(|i| json!({"path": format!("f{i}")})).collect::<Vec<_>>()}),
            ),
            400,
            "invalid_request",
        ),
        (
            with(json!({"template": "no-such-template"})),
            400,
            "template_not_found",
        ),
        (with(json!({"timeoutMs": 1})), 400, "invalid_request"),
        (with(json!({"env": {"1BAD": "x"}})), 400, "invalid_request"),
        (with(json!({"metadata": [1]})), 400, "invalid_request"),
        (with(json!({"command": ""})), 400, "invalid_request"),
        (with(json!({"surprise": true})), 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let (got, answer) = client.post("/v1/workspace-runs", body.clone()).await;
        assert_eq!(
            (got, error_code(&answer)),
            (status, code),
            "{body} -> {answer}"
        );
    }
    let (status, body) = client.get("/v1/workspace-runs/wsr_nope").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));

    // Another org sees nothing of this org's runs; a key without the
    // scope may not create one.
    let run = create(&client, b"0123456789", "true", json!({})).await;
    let id = run["id"].as_str().expect("id");
    let other = shared().client_with(&shared().key("wsr-other-org", None, "all"));
    let (status, _) = other.get(&format!("/v1/workspace-runs/{id}")).await;
    assert_eq!(status, 404);
    let (status, _) = other
        .post(&format!("/v1/workspace-runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 404);
    let reader = shared().client_with(&shared().key("shared", None, "workspace_runs:read"));
    let (status, body) = reader.post("/v1/workspace-runs", good.clone()).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, _) = reader.get(&format!("/v1/workspace-runs/{id}")).await;
    assert_eq!(status, 200);
    let (status, body) = reader
        .post(&format!("/v1/workspace-runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));

    // A run never started can be canceled, and has evidence.
    let (status, canceled) = client
        .post(&format!("/v1/workspace-runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled");
    let (status, body) = client
        .post(&format!("/v1/workspace-runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!((status, error_code(&body)), (409, "workspace_run_finished"));
    wait_done(&client, id).await;
}

#[tokio::test]
async fn a_wrong_digest_or_truncated_upload_is_refused_and_the_run_still_waits() {
    let client = shared().client();
    let bytes = repo();
    let run = create(
        &client,
        &bytes,
        "cd app && mkdir -p out && python3 report.py",
        json!({}),
    )
    .await;
    let id = run["id"].as_str().expect("id");

    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let (status, body) = put_archive(&client, id, flipped.clone()).await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "archive_digest_mismatch")
    );
    let (status, body) = put_archive(&client, id, bytes[..bytes.len() - 5].to_vec()).await;
    assert_eq!((status, error_code(&body)), (422, "archive_size_mismatch"));
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"tail");
    let (status, body) = put_archive(&client, id, longer).await;
    assert_eq!((status, error_code(&body)), (422, "archive_size_mismatch"));
    let (status, body) = staged_upload(&client, id, flipped).await;
    assert_eq!(
        (status, error_code(&body)),
        (422, "archive_digest_mismatch")
    );

    let (_, run) = client.get(&format!("/v1/workspace-runs/{id}")).await;
    assert_eq!(run["status"], "awaiting_archive");
    assert_eq!(run["archive"]["uploaded"], false);
    let (status, body) = start(&client, id).await;
    assert_eq!((status, error_code(&body)), (409, "archive_not_uploaded"));

    // The right bytes, then, work.
    let (status, _) = staged_upload(&client, id, bytes).await;
    assert_eq!(status, 200);
    let (status, _) = start(&client, id).await;
    assert_eq!(status, 202);
    let run = wait_done(&client, id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

/// Runs `bytes` to its end and returns the run and its events.
async fn run_archive(
    client: &Client,
    bytes: Vec<u8>,
    command: &str,
    extra: Value,
) -> (Value, Vec<Value>) {
    let run = create(client, &bytes, command, extra).await;
    let id = run["id"].as_str().expect("id").to_string();
    let (status, body) = put_archive(client, &id, bytes).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = start(client, &id).await;
    assert_eq!(status, 202);
    let run = wait_done(client, &id).await;
    let events = all_events(client, &id, 1000).await;
    assert_ordered(&events);
    (run, events)
}

fn error_event(events: &[Value]) -> Value {
    events
        .iter()
        .find(|e| e["type"] == "error")
        .map(|e| e["data"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn traversal_device_and_fifo_entries_fail_the_run_as_unsafe() {
    let client = shared().client();
    let unsafe_archives: [(&str, Vec<u8>); 5] = [
        (
            "dot-dot",
            archive(&[Entry::File("ok.txt", b"ok"), Entry::File("../x", b"escape")]),
        ),
        (
            "nested dot-dot",
            archive(&[Entry::File("a/../../x", b"escape")]),
        ),
        ("absolute", archive(&[Entry::File("/etc/x", b"escape")])),
        ("device", archive(&[Entry::Device("dev-null")])),
        ("fifo", archive(&[Entry::Fifo("pipe")])),
    ];
    for (what, bytes) in unsafe_archives {
        let (run, events) = run_archive(&client, bytes, "true", json!({})).await;
        assert_eq!(run["status"], "failed", "{what}: {run}");
        assert_eq!(run["reason"], "archive_unsafe", "{what}: {run}");
        assert_eq!(error_event(&events)["code"], "archive_unsafe", "{what}");
        assert!(
            !statuses(&events).contains(&String::from("running")),
            "{what}: the command must not run"
        );
        let sandbox = run["sandboxId"].as_str().expect("sandbox");
        let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
        assert_eq!(sbx["status"], "destroyed", "{what}");
    }
}

#[tokio::test]
async fn a_symlink_out_is_skipped_and_files_through_it_stay_inside() {
    let client = shared().client();
    let bytes = archive(&[
        Entry::Symlink("root", "/"),
        Entry::File("root/etc/crownest-escape", b"escape"),
        Entry::Symlink("up", "../.."),
        Entry::Dir("src/"),
        Entry::File("src/a.txt", b"a"),
        Entry::Symlink("src/link", "a.txt"),
    ]);
    let (run, events) = run_archive(
        &client,
        bytes,
        // The skipped links are not there; the file through one landed
        // beneath /workspace; the link inside works; nothing reached /etc.
        "test ! -L root && test -f root/etc/crownest-escape && test ! -e up \
         && test \"$(cat src/link)\" = a && test ! -e /etc/crownest-escape",
        json!({}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    let done = events
        .iter()
        .rfind(|e| e["type"] == "archive_progress")
        .expect("progress");
    let skipped: Vec<&str> = done["data"]["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(|s| s["path"].as_str())
        .collect();
    assert_eq!(skipped, ["root", "up"]);
}

#[tokio::test]
async fn a_gzip_bomb_fails_with_archive_too_large_after_the_limit() {
    let client = shared().client();
    // 2 GiB of zeros in one file: about 2 MiB compressed, past the
    // workspace (1 GiB) and the ratio limit long before the disk fills.
    let size: u64 = 2 * 1024 * 1024 * 1024;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    let h = header("zeros.bin", tar::EntryType::Regular, size, None);
    tar.append(&h, std::io::Read::take(std::io::repeat(0), size))
        .expect("append");
    let bytes = tar.into_inner().expect("tar").finish().expect("gzip");
    assert!(bytes.len() < 8 * 1024 * 1024);
    let (run, events) = run_archive(&client, bytes, "true", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason"], "archive_too_large", "{run}");
    assert_eq!(error_event(&events)["code"], "archive_too_large");
}

#[tokio::test]
async fn missing_and_escaping_artifacts_are_errors_but_the_run_ends() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("a.txt", b"kept")]);
    let (run, events) = run_archive(
        &client,
        bytes,
        "ln -s /etc/passwd leak.txt && mkdir d && ln -s ../../etc d/up",
        json!({"artifacts": [
            {"path": "a.txt"},
            {"path": "missing.txt"},
            {"path": "leak.txt"},
            {"path": "d/up/passwd"},
        ]}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let collected: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "artifact_collected")
        .filter_map(|e| e["data"]["path"].as_str())
        .collect();
    assert_eq!(collected, ["a.txt"]);
    let errors: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "artifact_error")
        .filter_map(|e| e["data"]["path"].as_str())
        .collect();
    assert_eq!(errors, ["missing.txt", "leak.txt", "d/up/passwd"]);
    let document = evidence(&client, run["id"].as_str().expect("id")).await;
    let parsed: Value = serde_json::from_slice(&document).expect("json");
    assert_eq!(
        parsed["bundle"]["artifactErrors"].as_array().map(Vec::len),
        Some(3)
    );
}

#[tokio::test]
async fn a_run_fails_with_the_exit_code_of_its_command() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("x", b"x")]);
    let (run, events) = run_archive(&client, bytes, "echo oops >&2; exit 3", json!({})).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["reason"], "exit_code");
    assert_eq!(run["exitCode"], 3);
    assert_eq!(output(&events, "stderr"), "oops\n");
}

#[tokio::test]
async fn events_resume_by_after_seq_and_last_event_id_without_gaps_or_repeats() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("x", b"x")]);
    let run = create(
        &client,
        &bytes,
        "for i in 1 2 3 4 5 6 7 8; do echo line-$i; sleep 0.2; done",
        json!({}),
    )
    .await;
    let id = run["id"].as_str().expect("id");
    put_archive(&client, id, bytes).await;
    start(&client, id).await;
    // Read a few live, drop the connection, resume with Last-Event-ID.
    let first = sse_events(&client, id, None, None, Some(5)).await;
    assert_eq!(first.len(), 5);
    let last = first.last().expect("last")["seq"].as_i64().expect("seq");
    let rest = sse_events(&client, id, Some(last), None, None).await;
    let mut joined = first.clone();
    joined.extend(rest);
    assert_ordered(&joined);
    let text = output(&joined, "stdout");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        (1..=8).map(|i| format!("line-{i}")).collect::<Vec<_>>()
    );
    wait_done(&client, id).await;
    // After the end: afterSeq replays the rest; the JSON window agrees.
    let from_three = sse_events(&client, id, None, Some(3), None).await;
    assert_eq!(from_three, joined[3..].to_vec());
    assert_eq!(all_events(&client, id, 2).await, joined);
    let (status, body) = client
        .get(&format!("/v1/workspace-runs/{id}/events?limit=0"))
        .await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    let (status, body) = client
        .get(&format!("/v1/workspace-runs/{id}/events?afterSeq=-1"))
        .await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
}

#[tokio::test]
async fn cancel_mid_run_stops_the_command_and_destroys_the_sandbox() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("x", b"x")]);
    let run = create(
        &client,
        &bytes,
        "echo started; sleep 60",
        json!({"artifacts": [{"path": "x"}]}),
    )
    .await;
    let id = run["id"].as_str().expect("id");
    put_archive(&client, id, bytes).await;
    start(&client, id).await;
    wait_status(&client, id, "running").await;
    let (status, canceled) = client
        .post(&format!("/v1/workspace-runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(canceled["reason"], "canceled");
    let run = wait_done(&client, id).await;
    let sandbox = run["sandboxId"].as_str().expect("sandbox");
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "destroyed");
    let events = all_events(&client, id, 1000).await;
    assert_ordered(&events);
    assert_eq!(events.last().expect("last")["data"]["status"], "canceled");
    let parsed: Value = serde_json::from_slice(&evidence(&client, id).await).expect("json");
    assert_eq!(parsed["bundle"]["status"], "canceled");
}

#[tokio::test]
async fn a_run_past_its_timeout_fails_with_reason_timeout() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("x", b"x")]);
    let (run, events) = run_archive(
        &client,
        bytes,
        "echo partial > out.txt; sleep 60",
        json!({"timeoutMs": 3000, "artifacts": [{"path": "out.txt"}]}),
    )
    .await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason"], "timeout");
    assert_eq!(error_event(&events)["code"], "timeout");
    // What the command left is still collected.
    assert!(
        events.iter().any(|e| e["type"] == "artifact_collected"),
        "{events:?}"
    );
    let sandbox = run["sandboxId"].as_str().expect("sandbox");
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "destroyed");
}

#[tokio::test]
async fn a_run_goes_on_after_a_kill_9_of_its_host_with_every_line_once() {
    let mut server = Server::start();
    let key = server.key("acme", None, "all");
    let client = server.client(&key);
    let bytes = archive(&[Entry::File("x", b"x")]);
    let run = create(
        &client,
        &bytes,
        "for i in $(seq 1 40); do echo line-$i; sleep 0.1; done; echo done > out.txt",
        json!({"artifacts": [{"path": "out.txt"}]}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    put_archive(&client, &id, bytes).await;
    start(&client, &id).await;
    // Some output is copied before the crash, the rest comes after.
    let before = sse_events(&client, &id, None, None, Some(6)).await;
    assert!(before.iter().any(|e| e["type"] == "stdout"), "{before:?}");
    server.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start_again();
    let client = server.client(&key);
    let run = wait_done(&client, &id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let events = all_events(&client, &id, 1000).await;
    assert_ordered(&events);
    let text = output(&events, "stdout");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        (1..=40).map(|i| format!("line-{i}")).collect::<Vec<_>>(),
        "every line once, across the restart"
    );
    assert!(
        events.iter().any(|e| e["type"] == "artifact_collected"),
        "{events:?}"
    );
    let sandbox = run["sandboxId"].as_str().expect("sandbox");
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "destroyed", "{sbx}");
    assert!(server.runc_containers().is_empty());
    let document = evidence(&client, &id).await;
    let (ok, text) = verify(&server.base_url, &key, &document, &[]);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn a_run_whose_sandbox_died_with_its_host_ends_as_host_restart_with_evidence() {
    let mut server = Server::start();
    let key = server.key("acme", None, "all");
    let client = server.client(&key);
    let bytes = archive(&[Entry::File("x", b"x")]);
    let run = create(&client, &bytes, "echo started; sleep 120", json!({})).await;
    let id = run["id"].as_str().expect("id").to_string();
    put_archive(&client, &id, bytes).await;
    start(&client, &id).await;
    wait_status(&client, &id, "running").await;
    let (_, run) = client.get(&format!("/v1/workspace-runs/{id}")).await;
    let sandbox = run["sandboxId"].as_str().expect("sandbox").to_string();
    server.kill9();
    let killed = std::process::Command::new("runc")
        .arg("--root")
        .arg(server.data_dir.join("runc"))
        .args(["kill", &sandbox, "KILL"])
        .status()
        .expect("runc kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start_again();
    let client = server.client(&key);
    let run = wait_done(&client, &id).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason"], "host_restart");
    let events = all_events(&client, &id, 1000).await;
    assert_ordered(&events);
    assert_eq!(error_event(&events)["code"], "host_restart");
    // Nothing orphaned: the run's sandbox is a tombstone, no container is left.
    let (_, sbx) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(sbx["status"], "destroyed", "{sbx}");
    assert!(server.runc_containers().is_empty());
    let document = evidence(&client, &id).await;
    let (ok, text) = verify(&server.base_url, &key, &document, &[]);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn crownest_run_packs_a_directory_and_exits_with_the_commands_code() {
    let shared = shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("node_modules/dep")).expect("mkdir");
    std::fs::create_dir_all(root.join(".git")).expect("mkdir");
    std::fs::write(root.join(".gitignore"), "node_modules/\n*.log\n").expect("write");
    std::fs::write(root.join("node_modules/dep/index.js"), "x").expect("write");
    std::fs::write(root.join("debug.log"), "x").expect("write");
    std::fs::write(root.join(".git/HEAD"), "ref").expect("write");
    std::fs::write(root.join("report.py"), REPORT_PY).expect("write");
    std::fs::create_dir_all(root.join("out")).expect("mkdir");
    let bundle = root.join("bundle.json");
    let out = std::process::Command::new(crownest_e2e::crownest_bin())
        .arg("run")
        .arg(root)
        .args(["--collect", "out/report.json", "--metadata", "ci=e2e", "--evidence"])
        .arg(&bundle)
        .args([
            "--",
            "sh",
            "-c",
            "test ! -e node_modules && test ! -e debug.log && test ! -e .git && python3 report.py && exit 7",
        ])
        .env("CROWNEST_API_KEY", &shared.key)
        .env("CROWNEST_BASE_URL", &shared.base_url)
        .output()
        .expect("crownest run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stdout}{stderr}");
    assert!(stdout.contains("python report"), "{stdout}");
    assert!(
        stderr.contains("art_"),
        "the artifact id is printed: {stderr}"
    );
    let document = std::fs::read(&bundle).expect("bundle written");
    let parsed: Value = serde_json::from_slice(&document).expect("json");
    assert_eq!(parsed["bundle"]["exitCode"], 7);
    assert_eq!(parsed["bundle"]["metadata"]["ci"], "e2e");
    let (ok, text) = verify(&shared.base_url, &shared.key, &document, &[]);
    assert!(ok, "{text}");
    // Offline with the published key.
    let (_, keys) = shared.client().get("/v1/evidence-keys").await;
    let key = keys["data"][0]["publicKey"].as_str().expect("key");
    let out = std::process::Command::new(crownest_e2e::crownest_bin())
        .args(["evidence", "verify"])
        .arg(&bundle)
        .args(["--key", key])
        .env_remove("CROWNEST_API_KEY")
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_run_on_gvisor_unpacks_through_the_walk_and_collects() {
    let client = shared().client();
    let (status, templates) = client.get("/v1/templates").await;
    assert_eq!(status, 200);
    let available = templates["data"]
        .as_array()
        .expect("templates")
        .iter()
        .any(|t| t["name"] == "python-gvisor" && t["available"] == true);
    assert!(available, "python-gvisor must run here: {templates}");
    let bytes = archive(&[
        Entry::Dir("src/"),
        Entry::File("src/a.txt", b"gvisor"),
        Entry::Symlink("src/link", "a.txt"),
        Entry::Symlink("out", "/etc"),
    ]);
    let (run, events) = run_archive(
        &client,
        bytes,
        "cat src/link && test ! -e out && cp src/a.txt copy.txt",
        json!({"template": "python-gvisor", "artifacts": [{"path": "copy.txt"}]}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run} {events:?}");
    assert_eq!(output(&events, "stdout"), "gvisor");
    assert_eq!(run["collected"][0]["sizeBytes"], 6);
    let parsed: Value =
        serde_json::from_slice(&evidence(&client, run["id"].as_str().expect("id")).await)
            .expect("json");
    assert_eq!(parsed["bundle"]["template"]["runtime"], "gvisor");
}

#[tokio::test]
async fn a_long_run_gets_heartbeats_while_it_runs() {
    let client = shared().client();
    let bytes = archive(&[Entry::File("x", b"x")]);
    let (run, events) = run_archive(
        &client,
        bytes,
        "for i in $(seq 1 55); do echo tick-$i; sleep 0.2; done",
        json!({}),
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let beats: Vec<&Value> = events.iter().filter(|e| e["type"] == "heartbeat").collect();
    assert!(!beats.is_empty(), "no heartbeat in an 11 s run: {events:?}");
    assert_eq!(beats[0]["data"]["status"], "running");
    assert!(beats[0]["data"]["elapsedMs"].as_i64().expect("elapsed") >= 10_000);
}
