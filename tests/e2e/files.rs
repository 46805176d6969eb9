//! Files in /workspace over raw HTTP: write, list, stat, read back (text,
//! binary), move, mkdir, delete; staged upload and download URLs with a
//! 200 MiB file and flat server memory; path escapes through every
//! endpoint (`..`, absolute paths, planted symlinks, a symlink race).

use std::time::{Duration, Instant};

use crownest_e2e::{Client, Server, error_code, shared};
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes (xorshift), chunk by chunk.
struct Noise(u64);

impl Noise {
    fn chunk(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            out.extend_from_slice(&self.0.to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

fn files_url(sandbox: &str, path: &str) -> String {
    format!("/v1/sandboxes/{sandbox}/files?path={}", encode(path))
}

fn encode(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn put(client: &Client, sandbox: &str, path: &str, bytes: Vec<u8>) -> (u16, Value) {
    let response = client
        .request(reqwest::Method::PUT, &files_url(sandbox, path))
        .body(bytes)
        .send()
        .await
        .expect("put");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_bytes(
    client: &Client,
    sandbox: &str,
    path: &str,
) -> (u16, Vec<u8>, reqwest::header::HeaderMap) {
    let response = client
        .request(reqwest::Method::GET, &files_url(sandbox, path))
        .send()
        .await
        .expect("get");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        response.bytes().await.expect("body").to_vec(),
        headers,
    )
}

on_each_runtime! {
async fn write_list_stat_read_move_mkdir_delete_round_trip(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;

    let (status, written) = put(&client, &sandbox, "notes/hello.txt", b"hello\n".to_vec()).await;
    assert_eq!(status, 200, "{written}");
    assert_eq!(written["path"], "/workspace/notes/hello.txt");
    assert_eq!(
        (written["type"].as_str(), written["size"].as_u64()),
        (Some("file"), Some(6))
    );
    assert_eq!(written["mode"], 0o644);

    // Binary, larger than the JSON body limit, through the direct PUT.
    let binary = Noise(7).chunk(5 * 1024 * 1024 + 3);
    let (status, body) = put(
        &client,
        &sandbox,
        "/workspace/data/blob.bin",
        binary.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, read, headers) = get_bytes(&client, &sandbox, "data/blob.bin").await;
    assert_eq!(status, 200);
    assert!(read == binary, "binary read back differs");
    assert_eq!(headers["content-length"], binary.len().to_string().as_str());
    assert_eq!(headers["content-type"], "application/octet-stream");
    let (_, text, headers) = get_bytes(&client, &sandbox, "notes/hello.txt").await;
    assert_eq!(text, b"hello\n");
    assert_eq!(headers["content-type"], "text/plain");

    // The sandbox sees the same bytes, owned by its user.
    let result = client
        .run(&sandbox, "cat notes/hello.txt; stat -c '%u:%g' notes/hello.txt notes; sha256sum data/blob.bin | cut -d' ' -f1")
        .await;
    let expected = format!(
        "hello\n1000:1000\n1000:1000\n{}\n",
        hex(&Sha256::digest(&binary))
    );
    assert_eq!(result["stdout"], expected, "{result}");

    let (status, listed) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/files/list?path=/workspace"
        ))
        .await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["data", "notes"]);
    assert_eq!(listed["data"][0]["type"], "dir");
    assert_eq!(listed["data"][0]["path"], "/workspace/data");
    assert!(
        listed["data"][0]["mtime"]
            .as_str()
            .expect("mtime")
            .ends_with('Z')
    );

    let (status, stat) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/files/stat?path=data/blob.bin"
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(stat["size"].as_u64(), Some(binary.len() as u64));

    let (status, made) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/mkdir"),
            json!({ "path": "a/b/c", "parents": true }),
        )
        .await;
    assert_eq!(
        (status, made["type"].as_str()),
        (201, Some("dir")),
        "{made}"
    );
    let (status, again) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/mkdir"),
            json!({ "path": "a/b/c" }),
        )
        .await;
    assert_eq!((status, error_code(&again)), (409, "file_exists"));

    let (status, moved) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/move"),
            json!({ "from": "notes/hello.txt", "to": "a/b/c/hi.txt" }),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["path"], "/workspace/a/b/c/hi.txt");
    let (status, gone) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/files/stat?path=notes/hello.txt"
        ))
        .await;
    assert_eq!((status, error_code(&gone)), (404, "file_not_found"));
    let (_, text, _) = get_bytes(&client, &sandbox, "a/b/c/hi.txt").await;
    assert_eq!(text, b"hello\n");

    let (status, body) = client.delete(&files_url(&sandbox, "a")).await;
    assert_eq!((status, error_code(&body)), (409, "directory_not_empty"));
    let (status, _) = client
        .delete(&format!("{}&recursive=true", files_url(&sandbox, "a")))
        .await;
    assert_eq!(status, 204);
    let (status, _) = client.delete(&files_url(&sandbox, "data/blob.bin")).await;
    assert_eq!(status, 204);
    let result = client
        .run(&sandbox, "ls -A /workspace | tr '\\n' ' '")
        .await;
    assert_eq!(result["stdout"], "data notes ", "{result}");

    let (status, body, _) = get_bytes(&client, &sandbox, "notes").await;
    assert_eq!(status, 400);
    assert_eq!(
        error_code(&serde_json::from_slice(&body).expect("json")),
        "is_a_directory"
    );
    client.kill(&sandbox).await;
}
}

#[tokio::test]
async fn file_routes_check_scopes_and_the_direct_size_limit() {
    let shared = shared();
    let reader = shared.client_with(&shared.key(
        "files-scopes",
        None,
        "sandboxes:create,sandboxes:kill,files:read",
    ));
    let sandbox = reader.sandbox("python").await;
    let (status, body) = put(&reader, &sandbox, "x", b"x".to_vec()).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, _) = reader
        .get(&format!("/v1/sandboxes/{sandbox}/files/list"))
        .await;
    assert_eq!(status, 200);

    let client = shared.client();
    let (status, body) = put(&client, &sandbox, "x", b"x".to_vec()).await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "not_found"),
        "another org's sandbox"
    );

    let writer = shared.client_with(&shared.key("files-scopes", None, "files:write"));
    let big = vec![0u8; 32 * 1024 * 1024 + 1];
    let (status, body) = put(&writer, &sandbox, "big", big).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"));
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("files/uploads")
    );
    let result = client_run_in(&reader, &sandbox).await;
    assert_eq!(result, 404, "no partial file");
    reader.kill(&sandbox).await;
}

/// Status of stat'ing `big` (the oversized direct upload's target).
async fn client_run_in(client: &Client, sandbox: &str) -> u16 {
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sandbox}/files/stat?path=big"),
        )
        .send()
        .await
        .expect("stat");
    response.status().as_u16()
}

/// Every file endpoint given `path`; returns (endpoint, status, code).
async fn every_endpoint(client: &Client, sandbox: &str, path: &str) -> Vec<(String, u16, String)> {
    let mut out = Vec::new();
    let mut record = |name: &str, status: u16, body: &Value| {
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        out.push((name.to_string(), status, code));
    };
    let (status, body) = put(client, sandbox, path, b"pwned".to_vec()).await;
    record("PUT files", status, &body);
    let (status, bytes, _) = get_bytes(client, sandbox, path).await;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    record("GET files", status, &body);
    let (status, body) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/files/list?path={}",
            encode(path)
        ))
        .await;
    record("GET list", status, &body);
    let (status, body) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/files/stat?path={}",
            encode(path)
        ))
        .await;
    record("GET stat", status, &body);
    let (status, body) = client
        .delete(&format!("{}&recursive=true", files_url(sandbox, path)))
        .await;
    record("DELETE files", status, &body);
    let move_url = format!("/v1/sandboxes/{sandbox}/files/move");
    let (status, body) = client
        .post(&move_url, json!({ "from": path, "to": "moved" }))
        .await;
    record("move from", status, &body);
    let (status, body) = client
        .post(&move_url, json!({ "from": "canary", "to": path }))
        .await;
    record("move to", status, &body);
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/mkdir"),
            json!({ "path": path, "parents": true }),
        )
        .await;
    record("mkdir", status, &body);
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/uploads"),
            json!({ "path": path }),
        )
        .await;
    record("uploads", status, &body);
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/downloads"),
            json!({ "path": path }),
        )
        .await;
    record("downloads", status, &body);
    out
}

on_each_runtime! {
async fn path_escapes_are_refused_through_every_endpoint_and_touch_nothing_outside(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    // A symlink to / and one to /tmp, planted by code in the sandbox.
    let setup = client
        .run(&sandbox, "ln -s / root && ln -s /tmp tmplink && ln -s ../tmp up && echo c > canary && echo SECRET > /tmp/secret")
        .await;
    assert_eq!(setup["exitCode"], 0, "{setup}");

    for path in [
        "../../etc/passwd",
        "/etc/passwd",
        "root/etc/passwd",
        "tmplink/evil",
        "up/evil",
        "/workspace/../tmp/evil",
    ] {
        for (endpoint, status, code) in every_endpoint(&client, &sandbox, path).await {
            assert_eq!(
                (status, code.as_str()),
                (400, "path_outside_workspace"),
                "{endpoint} {path}"
            );
        }
    }
    // The link itself is read, stat'ed, listed and written as its target:
    // outside.
    let (status, body) = put(&client, &sandbox, "root", b"x".to_vec()).await;
    assert_eq!((status, error_code(&body)), (400, "path_outside_workspace"));
    let (status, bytes, _) = get_bytes(&client, &sandbox, "root").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&bytes));
    let (status, body) = client
        .get(&format!("/v1/sandboxes/{sandbox}/files/list?path=root"))
        .await;
    assert_eq!((status, error_code(&body)), (400, "path_outside_workspace"));
    let check = client
        .run(&sandbox, "ls -A /workspace | tr '\\n' ' '; cat /tmp/secret; ls /tmp | tr '\\n' ' '; test ! -e /moved && head -c 5 /etc/passwd")
        .await;
    assert_eq!(
        check["stdout"], "canary root tmplink up SECRET\nsecret root:",
        "nothing outside /workspace was written, moved or removed: {check}"
    );
    // The links themselves are in /workspace: removing one removes the link only.
    let (status, _) = client.delete(&files_url(&sandbox, "tmplink")).await;
    assert_eq!(status, 204);
    let check = client
        .run(
            &sandbox,
            "cat /tmp/secret; test -e tmplink || echo unlinked",
        )
        .await;
    assert_eq!(check["stdout"], "SECRET\nunlinked\n");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn a_symlink_race_never_reads_or_writes_outside_the_workspace(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let setup = client
        .run(
            &sandbox,
            "echo SECRET > /tmp/secret && mkdir real wreal && echo inside > real/secret",
        )
        .await;
    assert_eq!(setup["exitCode"], 0, "{setup}");
    // `d` (read through) and `e` (written through) each flip between a real
    // directory, nothing, and a symlink to /tmp. They are apart because a
    // write creates missing parents: one landing while `e` is absent nests
    // `wreal` a level down, which must not take `d/secret` away from reads.
    let (status, racer) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({
                "command": "while true; do ln -sfn /tmp d; ln -sfn /tmp e; rm -rf d; \
                            mv real d; rm -rf e; mv d real; mv wreal e; mv e wreal; done",
                "background": true,
                "timeoutMs": 120000
            }),
        )
        .await;
    assert_eq!(status, 200, "{racer}");

    // Race until every outcome has been seen a few times (a loaded machine
    // gets fewer rounds a second), within a generous cap.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut inside, mut refused, mut writes, mut write_refused) = (0, 0, 0, 0);
    let mut round = 0;
    while Instant::now() < deadline && (inside < 3 || refused < 3 || writes < 3 || write_refused < 3)
    {
        round += 1;
        let (status, bytes, _) = get_bytes(&client, &sandbox, "d/secret").await;
        let shown = String::from_utf8_lossy(&bytes);
        match status {
            200 => {
                assert_eq!(shown, "inside\n", "read through the race must stay inside");
                inside += 1;
            }
            400 => {
                let body: Value = serde_json::from_slice(&bytes).expect("json");
                assert_eq!(error_code(&body), "path_outside_workspace", "{body}");
                refused += 1;
            }
            404 => {}
            other => panic!("unexpected read status {other}: {shown}"),
        }
        let (status, body) = put(&client, &sandbox, &format!("e/w{round}"), b"x".to_vec()).await;
        match status {
            200 => writes += 1,
            400 => {
                assert_eq!(error_code(&body), "path_outside_workspace", "{body}");
                write_refused += 1;
            }
            404 | 409 => {}
            other => panic!("unexpected write status {other}: {body}"),
        }
    }
    let (status, _) = client
        .post(
            &format!(
                "/v1/sandboxes/{sandbox}/commands/{}/cancel",
                racer["id"].as_str().expect("id")
            ),
            json!({}),
        )
        .await;
    assert!(status == 200 || status == 409, "cancel: {status}");
    assert!(
        inside > 0 && refused > 0 && writes > 0 && write_refused > 0,
        "the race did not reach every outcome in {round} rounds: reads inside {inside}, \
         refused {refused}; writes {writes}, refused {write_refused}"
    );
    let check = client
        .run(&sandbox, "ls /tmp | grep -c '^w' ; cat /tmp/secret")
        .await;
    assert_eq!(
        check["stdout"], "0\nSECRET\n",
        "no write landed in /tmp ({writes} landed inside): {check}"
    );
    client.kill(&sandbox).await;
}
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("field")
}

/// Samples the server's RSS until told to stop; returns the peak in KiB.
fn watch_rss(
    pid: u32,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (stop, handle)
}

#[tokio::test]
async fn a_200_mib_file_round_trips_through_staged_urls_with_flat_server_memory() {
    const SIZE: usize = 200 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let server = Server::start();
    let client = server.client(&server.key("staged", None, "all"));
    let anonymous = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let sandbox = client.sandbox("python").await;
    let pid = server.pid().expect("pid");
    let before = status_kib(pid, "VmRSS:");

    let (status, upload) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/uploads"),
            json!({ "path": "/workspace/big/file.bin", "sizeBytes": SIZE }),
        )
        .await;
    assert_eq!(status, 201, "{upload}");
    assert_eq!(upload["method"], "PUT");
    assert_eq!(upload["maxBytes"].as_u64(), Some(SIZE as u64));
    let url = upload["url"].as_str().expect("url").to_string();
    assert!(url.starts_with(&server.base_url), "{url}");

    // Stream 200 MiB of noise, hashing as it goes.
    let (stop, watcher) = watch_rss(pid);
    let (hash_tx, hash_rx) = std::sync::mpsc::channel();
    let body = futures::stream::unfold(
        (Noise(42), 0usize, Sha256::new()),
        move |(mut noise, sent, mut hasher)| {
            let hash_tx = hash_tx.clone();
            async move {
                if sent == SIZE {
                    return None;
                }
                let chunk = noise.chunk(CHUNK.min(SIZE - sent));
                hasher.update(&chunk);
                let sent = sent + chunk.len();
                if sent == SIZE {
                    let _ = hash_tx.send(hex(&hasher.clone().finalize()));
                }
                Some((Ok::<_, std::io::Error>(chunk), (noise, sent, hasher)))
            }
        },
    );
    let started = Instant::now();
    let response = anonymous
        .put(&url)
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("upload");
    let upload_secs = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let stat: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{stat}");
    assert_eq!(stat["size"].as_u64(), Some(SIZE as u64));
    let sent_hash = hash_rx.recv().expect("hash");

    let inside = client
        .run(&sandbox, "sha256sum big/file.bin | cut -d' ' -f1")
        .await;
    assert_eq!(inside["stdout"], format!("{sent_hash}\n"), "{inside}");

    let (status, download) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/downloads"),
            json!({ "path": "big/file.bin" }),
        )
        .await;
    assert_eq!(status, 201, "{download}");
    assert_eq!(download["sizeBytes"].as_u64(), Some(SIZE as u64));
    let url = download["url"].as_str().expect("url").to_string();
    let started = Instant::now();
    let response = anonymous.get(&url).send().await.expect("download");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.content_length(), Some(SIZE as u64));
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        received += chunk.len();
        hasher.update(&chunk);
    }
    let download_secs = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().expect("watcher");
    assert_eq!(received, SIZE);
    assert_eq!(
        hex(&hasher.finalize()),
        sent_hash,
        "downloaded bytes differ"
    );
    eprintln!(
        "staged 200 MiB: upload {:.0} MB/s, download {:.0} MB/s, server RSS {before} KiB -> peak {peak} KiB",
        SIZE as f64 / 1e6 / upload_secs,
        SIZE as f64 / 1e6 / download_secs
    );
    assert!(
        peak < before + 64 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB"
    );

    // Single use.
    let again = anonymous.get(&url).send().await.expect("again");
    assert_eq!(again.status().as_u16(), 410);
    let body: Value = again.json().await.expect("json");
    assert_eq!(error_code(&body), "transfer_used");
    // A tampered token is not found, whatever it names.
    let tampered = format!("{}x", &url[..url.len() - 1]);
    let response = anonymous.get(&tampered).send().await.expect("tampered");
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(error_code(&body), "transfer_not_found");

    // Over its limit, an upload is refused and leaves no file behind.
    let (_, upload) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/files/uploads"),
            json!({ "path": "small.bin", "sizeBytes": 1000 }),
        )
        .await;
    let url = upload["url"].as_str().expect("url").to_string();
    let chunks = futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![1u8; 600])));
    let response = anonymous
        .put(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.expect("json");
    assert_eq!(error_code(&body), "file_too_large");
    let check = client
        .run(&sandbox, "ls -A /workspace /workspace/big | tr '\\n' ' '")
        .await;
    assert_eq!(
        check["stdout"], "/workspace: big  /workspace/big: file.bin ",
        "{check}"
    );
    client.kill(&sandbox).await;
}
