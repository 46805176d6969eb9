//! The sandbox API's additions for clients (issue 16): TTL changes, list
//! filters, live metrics, `files/exists`, file watches and context
//! restarts — happy paths, bad input and who may call them.

use std::time::Duration;

use crownest_e2e::{Client, SseEvent, SseParser, code_run, error_code, shared};
use futures::StreamExt;
use serde_json::{Value, json};

fn millis(rfc3339: &Value) -> i64 {
    crownest::clock::parse_rfc3339(rfc3339.as_str().expect("a time")).expect("RFC 3339")
}

/// The text output of a Code Run's result.
fn text_of(result: &Value) -> &Value {
    result["outputs"]
        .as_array()
        .and_then(|outputs| outputs.iter().find(|o| o["format"] == "text"))
        .map_or(&Value::Null, |o| &o["content"])
}

/// Reads SSE events from `path` until `done` says so (or 30 s pass).
async fn sse_until(
    client: &Client,
    path: &str,
    mut done: impl FnMut(&[SseEvent]) -> bool,
) -> Vec<SseEvent> {
    let response = client
        .request(reqwest::Method::GET, path)
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200, "{path}");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&events) {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => events.extend(parser.push(&chunk.expect("chunk"))),
            Ok(None) => break,
            Err(_) => panic!("{path}: no end in time; got {events:?}"),
        }
    }
    events
}

#[tokio::test]
async fn timeout_extends_and_shortens_a_sandbox_and_is_audited() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    let path = format!("/v1/sandboxes/{sandbox}/timeout");

    let before = tokio::time::Instant::now();
    let (status, extended) = client.post(&path, json!({ "ttlMs": 3_600_000 })).await;
    assert_eq!(status, 200, "{extended}");
    assert_eq!(extended["id"], sandbox.as_str());
    let (_, read) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(read["expiresAt"], extended["expiresAt"], "the store has it");
    let left = millis(&read["expiresAt"]) - millis(&read["createdAt"]);
    assert!((3_600_000..3_600_000 + 60_000).contains(&left), "{read}");

    // Bad input changes nothing.
    for (body, code) in [
        (json!({ "ttlMs": 0 }), "invalid_request"),
        (json!({ "ttlMs": -5 }), "invalid_request"),
        (json!({ "ttlMs": 24 * 3_600_000 + 1 }), "invalid_request"),
        (json!({ "ttlMs": "600000" }), "invalid_request"),
        (json!({}), "invalid_request"),
        (json!({ "ttlMs": 60000, "extra": 1 }), "invalid_request"),
    ] {
        let (status, error) = client.post(&path, body.clone()).await;
        assert_eq!((status, error_code(&error)), (400, code), "{body}: {error}");
    }
    let (_, unchanged) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(unchanged["expiresAt"], read["expiresAt"]);

    // Shortened, it expires on time (the reaper reads the new expiry).
    let (status, _) = client.post(&path, json!({ "ttlMs": 1500 })).await;
    assert_eq!(status, 200);
    let mut last = Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = client.get(&format!("/v1/sandboxes/{sandbox}")).await.1;
        if last["status"] == "destroyed" {
            break;
        }
    }
    assert_eq!(
        (last["status"].as_str(), last["endReason"].as_str()),
        (Some("destroyed"), Some("expired")),
        "{last}"
    );
    assert!(before.elapsed() >= Duration::from_millis(1400));
    let (status, error) = client.post(&path, json!({ "ttlMs": 60000 })).await;
    assert_eq!((status, error_code(&error)), (410, "sandbox_destroyed"));

    let (_, audit) = client
        .get(&format!(
            "/v1/audit-events?resourceId={sandbox}&action=sandbox.timeout"
        ))
        .await;
    let outcomes: Vec<&str> = audit["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert!(
        outcomes.contains(&"succeeded") || outcomes.contains(&"success"),
        "{audit}"
    );
    assert!(outcomes.len() >= 3, "each attempt is recorded: {audit}");
}

#[tokio::test]
async fn timeout_needs_a_key_the_scope_and_the_org() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    let path = format!("/v1/sandboxes/{sandbox}/timeout");
    let body = json!({ "ttlMs": 60000 });
    let (status, error) = s.anonymous_client().post(&path, body.clone()).await;
    assert_eq!((status, error_code(&error)), (401, "unauthorized"));
    let reader = s.client_with(&s.key("shared", None, "sandboxes:read"));
    let (status, error) = reader.post(&path, body.clone()).await;
    assert_eq!((status, error_code(&error)), (403, "forbidden"));
    let stranger = s.client_with(&s.key("timeout-stranger", None, "all"));
    let (status, error) = stranger.post(&path, body.clone()).await;
    assert_eq!((status, error_code(&error)), (404, "not_found"), "{error}");
    let (status, _) = client.post(&path, body).await;
    assert_eq!(status, 200);
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn list_filters_by_status_template_metadata_and_creation_time() {
    let s = shared();
    let client = s.client_with(&s.key("filter-org", None, "all"));
    let create = |template: &'static str, job: &'static str, n: i64| {
        let client = client.clone();
        async move {
            let (status, body) = client
                .post(
                    "/v1/sandboxes",
                    json!({ "template": template, "metadata": { "job": job, "n": n, "x y&z": "a=b" } }),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            body
        }
    };
    let a = create("python", "demo", 1).await;
    let b = create("node", "demo", 2).await;
    let c = create("python", "other", 3).await;
    client.kill(a["id"].as_str().expect("id")).await;
    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    };
    let id = |v: &Value| v["id"].as_str().expect("id").to_string();
    let list = |query: &str| {
        let client = client.clone();
        let query = query.to_string();
        async move { client.get(&format!("/v1/sandboxes?{query}")).await }
    };
    let (status, all) = list("").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&all), [id(&c), id(&b), id(&a)]);
    assert_eq!(ids(&list("metadata[job]=demo").await.1), [id(&b), id(&a)]);
    assert_eq!(
        ids(&list("metadata%5Bjob%5D=demo&status=running").await.1),
        [id(&b)]
    );
    assert_eq!(ids(&list("status=destroyed").await.1), [id(&a)]);
    assert_eq!(
        ids(&list("template=python&status=running").await.1),
        [id(&c)]
    );
    assert_eq!(ids(&list("metadata[n]=3").await.1), [id(&c)]);
    assert_eq!(ids(&list("metadata[x%20y%26z]=a%3Db").await.1).len(), 3);
    assert!(ids(&list("metadata[job]=nope").await.1).is_empty());
    let after = b["createdAt"].as_str().expect("t");
    assert_eq!(
        ids(&list(&format!("createdAfter={after}")).await.1),
        [id(&c)]
    );
    assert_eq!(
        ids(&list(&format!("createdBefore={after}")).await.1),
        [id(&a)]
    );

    // A cursor pages within the filter.
    let (_, first) = list("metadata[job]=demo&limit=1").await;
    assert_eq!(ids(&first), [id(&b)]);
    let cursor = first["nextCursor"].as_str().expect("cursor");
    let (_, second) = list(&format!("metadata[job]=demo&limit=1&cursor={cursor}")).await;
    assert_eq!(ids(&second), [id(&a)]);
    assert!(second["nextCursor"].is_null());

    for (query, code, field) in [
        ("status=sleeping", "invalid_request", "status"),
        ("createdAfter=yesterday", "invalid_request", "createdAfter"),
        ("metadata[]=x", "invalid_request", "metadata"),
        ("limit=0", "invalid_request", "limit"),
        ("limit=ten", "invalid_request", "limit"),
        ("colour=red", "invalid_query", "colour"),
        ("status=running&status=destroyed", "invalid_query", "status"),
    ] {
        let (status, error) = list(query).await;
        assert_eq!(
            (status, error_code(&error)),
            (400, code),
            "{query}: {error}"
        );
        let details = &error["error"]["details"];
        assert_eq!(
            details.get("field").or(details.get("parameter")).cloned(),
            Some(json!(field)),
            "{query}: {error}"
        );
    }
    let many: String = (0..17).map(|i| format!("metadata[k{i}]=v&")).collect();
    let (status, error) = list(&many).await;
    assert_eq!((status, error_code(&error)), (400, "invalid_request"));
    client.kill(&id(&b)).await;
    client.kill(&id(&c)).await;
}

#[tokio::test]
async fn metrics_move_when_a_command_burns_cpu_and_the_stream_ends_with_the_sandbox() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    let path = format!("/v1/sandboxes/{sandbox}/metrics");
    let (status, idle) = client.get(&path).await;
    assert_eq!(status, 200, "{idle}");
    assert_eq!(idle["sandboxId"], sandbox.as_str());
    for field in [
        "cpuUsageSeconds",
        "cpuPercent",
        "memoryUsedBytes",
        "memoryLimitBytes",
        "pids",
        "pidsLimit",
        "workspaceUsedBytes",
        "workspaceLimitBytes",
        "networkBytesIn",
        "networkBytesOut",
        "vcpus",
    ] {
        assert!(idle[field].is_number(), "{field} in {idle}");
    }
    assert!(
        idle["timestamp"]
            .as_str()
            .expect("timestamp")
            .ends_with('Z')
    );
    assert!(idle["memoryUsedBytes"].as_u64() > Some(0), "{idle}");
    assert_eq!(
        idle["memoryLimitBytes"].as_u64(),
        Some(512 * 1024 * 1024),
        "{idle}"
    );
    assert!(idle["workspaceLimitBytes"].as_u64() > Some(0), "{idle}");
    assert!(idle["pids"].as_u64() >= Some(1), "{idle}");

    // A busy loop for ~2 s, and a file in /workspace.
    let (status, _) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "head -c 3000000 /dev/zero > /workspace/blob; timeout 3 sh -c 'while :; do :; done'", "background": true }),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, busy) = client.get(&path).await;
    assert!(
        busy["cpuUsageSeconds"].as_f64() > idle["cpuUsageSeconds"].as_f64().map(|c| c + 0.2),
        "{idle} -> {busy}"
    );
    // Over the interval since the previous reading (a loaded CI machine
    // gives the loop less than a whole CPU).
    assert!(busy["cpuPercent"].as_f64() > Some(5.0), "{busy}");
    assert!(
        busy["workspaceUsedBytes"].as_u64()
            >= idle["workspaceUsedBytes"].as_u64().map(|u| u + 2_900_000),
        "{busy}"
    );
    assert!(
        busy["pids"].as_u64() > idle["pids"].as_u64(),
        "{idle} -> {busy}"
    );

    // The stream: metrics every second, then `end` once the sandbox is gone.
    let killer = {
        let client = client.clone();
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            client.kill(&sandbox).await;
        })
    };
    let events = sse_until(&client, &format!("{path}?stream=true"), |e| {
        e.iter().any(|e| e.event == "end")
    })
    .await;
    killer.await.expect("kill");
    let metrics: Vec<&SseEvent> = events.iter().filter(|e| e.event == "metrics").collect();
    assert!(metrics.len() >= 2, "{events:?}");
    assert!(
        metrics
            .iter()
            .all(|e| e.data["sandboxId"] == sandbox.as_str())
    );
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("end"),
        "{events:?}"
    );
    assert_eq!(events.last().expect("end").data["status"], "destroyed");

    let (status, error) = client.get(&path).await;
    assert_eq!((status, error_code(&error)), (410, "sandbox_destroyed"));
    let (status, error) = s.anonymous_client().get(&path).await;
    assert_eq!((status, error_code(&error)), (401, "unauthorized"));
    let (status, error) = client.get(&format!("{path}?stream=maybe")).await;
    assert_eq!(
        (status, error_code(&error)),
        (400, "invalid_query"),
        "{error}"
    );
}

#[tokio::test]
async fn files_exists_answers_true_false_and_refuses_paths_outside() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    client.write_file(&sandbox, "dir/a.txt", "a").await;
    let exists = |path: &str| {
        let client = client.clone();
        let url = format!("/v1/sandboxes/{sandbox}/files/exists?path={path}");
        async move { client.get(&url).await }
    };
    for (path, want) in [
        ("dir/a.txt", true),
        ("/workspace/dir/a.txt", true),
        ("dir", true),
        ("dir/missing", false),
        ("dir/a.txt/under-a-file", false),
    ] {
        let (status, body) = exists(path).await;
        assert_eq!(
            (status, body.clone()),
            (200, json!({ "exists": want })),
            "{path}"
        );
    }
    client
        .run(&sandbox, "ln -s /etc/passwd /workspace/out")
        .await;
    for path in ["../etc/passwd", "/etc/passwd", "out"] {
        let (status, body) = exists(path).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "path_outside_workspace"),
            "{path}: {body}"
        );
    }
    let (status, body) = client
        .get(&format!("/v1/sandboxes/{sandbox}/files/exists"))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_query"),
        "{body}"
    );
    let writer_only = s.client_with(&s.key("shared", None, "files:write"));
    let (status, body) = writer_only
        .get(&format!("/v1/sandboxes/{sandbox}/files/exists?path=dir"))
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_watch_delivers_create_modify_rename_and_delete_from_a_script() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    client
        .write_file(&sandbox, "touch.sh", "set -e\necho 1 > out/deep/a.txt\necho 2 >> out/deep/a.txt\nmv out/deep/a.txt out/b.txt\nrm out/b.txt\ntouch out/done\n")
        .await;
    let url = format!("/v1/sandboxes/{sandbox}/files/watch?path=/workspace&recursive=true");
    let response = client
        .request(reqwest::Method::GET, &url)
        .send()
        .await
        .expect("watch");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut events: Vec<SseEvent> = Vec::new();
    let (mut made, mut ran) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let is = |e: &SseEvent, kind: &str, path: &str| {
        e.event == "change" && e.data["type"] == kind && e.data["path"] == path
    };
    while !events
        .iter()
        .any(|e| is(e, "create", "/workspace/out/done"))
    {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no changes in time: {events:?}"))
            .expect("open stream")
            .expect("chunk");
        events.extend(parser.push(&chunk));
        // The directories first: changes inside a new directory are seen
        // from when its watch is in place, which its `create` event
        // follows (a file written before that shows up as created, by
        // the scan of the new directory, without its modifications).
        if !made && events.iter().any(|e| e.event == "ready") {
            made = true;
            let record = client.run(&sandbox, "mkdir -p /workspace/out/deep").await;
            assert_eq!(record["exitCode"], 0, "{record}");
        }
        if !ran
            && events
                .iter()
                .any(|e| is(e, "create", "/workspace/out/deep"))
        {
            ran = true;
            let record = client.run(&sandbox, "sh /workspace/touch.sh").await;
            assert_eq!(record["exitCode"], 0, "{record}");
        }
    }
    assert_eq!(events[0].event, "ready");
    assert_eq!(events[0].data["path"], "/workspace");
    for (kind, path) in [
        ("create", "/workspace/out"),
        ("create", "/workspace/out/deep/a.txt"),
        ("modify", "/workspace/out/deep/a.txt"),
        ("delete", "/workspace/out/b.txt"),
    ] {
        assert!(
            events.iter().any(|e| is(e, kind, path)),
            "no {kind} {path} in {events:?}"
        );
    }
    let rename = events
        .iter()
        .find(|e| is(e, "rename", "/workspace/out/b.txt"))
        .unwrap_or_else(|| panic!("no rename in {events:?}"));
    assert_eq!(rename.data["oldPath"], "/workspace/out/deep/a.txt");
    assert_eq!(rename.data["isDir"], false);
    let created_dir = events
        .iter()
        .find(|e| is(e, "create", "/workspace/out"))
        .expect("dir");
    assert_eq!(created_dir.data["isDir"], true);

    // The stream ends with the sandbox.
    client.kill(&sandbox).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut after_kill: Vec<SseEvent> = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        after_kill.extend(parser.push(&chunk.expect("chunk")));
        if after_kill.iter().any(|e| e.event == "end") {
            break;
        }
    }
    let end = after_kill
        .iter()
        .find(|e| e.event == "end")
        .unwrap_or_else(|| panic!("no end event after the kill: {after_kill:?}"));
    assert_eq!(end.data["reason"], "sandbox_destroyed", "{after_kill:?}");
}

#[tokio::test]
async fn a_watch_refuses_files_missing_paths_and_more_than_eight_at_once() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    client.write_file(&sandbox, "plain.txt", "x").await;
    let watch = |query: &str| format!("/v1/sandboxes/{sandbox}/files/watch?{query}");
    for (query, status, code) in [
        ("path=plain.txt", 400, "not_a_directory"),
        ("path=missing", 404, "file_not_found"),
        ("path=../etc", 400, "path_outside_workspace"),
        ("path=/workspace&recursive=perhaps", 400, "invalid_query"),
    ] {
        let (got, body) = client.get(&watch(query)).await;
        assert_eq!((got, error_code(&body)), (status, code), "{query}: {body}");
    }
    let (got, body) = s.anonymous_client().get(&watch("path=/workspace")).await;
    assert_eq!((got, error_code(&body)), (401, "unauthorized"));

    let mut open = Vec::new();
    for _ in 0..8 {
        let response = client
            .request(reqwest::Method::GET, &watch("recursive=false"))
            .send()
            .await
            .expect("watch");
        assert_eq!(response.status(), 200);
        open.push(response);
    }
    let (got, body) = client.get(&watch("recursive=false")).await;
    assert_eq!(
        (got, error_code(&body)),
        (429, "too_many_watches"),
        "{body}"
    );
    // Closing one frees its place.
    drop(open.pop());
    let mut freed = false;
    for _ in 0..50 {
        let response = client
            .request(reqwest::Method::GET, &watch("recursive=false"))
            .send()
            .await
            .expect("watch");
        if response.status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "a closed watch's place was not given back");
    drop(open);
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn restarting_a_context_keeps_its_id_and_forgets_its_variables() {
    let s = shared();
    let client = s.client();
    let sandbox = client.sandbox("python").await;
    let (status, context) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/contexts"),
            json!({ "language": "python" }),
        )
        .await;
    assert_eq!(status, 201, "{context}");
    let context_id = context["id"].as_str().expect("id");
    let run = |code: &str| {
        code_run(
            &client,
            &sandbox,
            json!({ "language": "python", "contextId": context_id, "code": code }),
        )
    };
    let first = run("x = 41\nx + 1").await;
    assert_eq!(text_of(&first), "42", "{first}");
    let path = format!("/v1/sandboxes/{sandbox}/code/contexts/{context_id}/restart");
    let (status, restarted) = client.post(&path, json!({})).await;
    assert_eq!(status, 200, "{restarted}");
    assert_eq!(restarted["id"], context_id);
    let after = run("x").await;
    assert_eq!(after["error"]["name"], "NameError", "{after}");
    let again = run("1 + 1").await;
    assert_eq!(text_of(&again), "2", "{again}");

    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/contexts/cctx_missing/restart"),
            json!({}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    let reader = s.client_with(&s.key("shared", None, "code:read"));
    let (status, body) = reader.post(&path, json!({})).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    client.kill(&sandbox).await;
}
