//! Idempotency, audit events, metering and quotas, end to end.

use std::time::{Duration, Instant};

use crownest_e2e::{Server, error_code, shared};
use serde_json::{Value, json};

async fn post_with_key(
    client: &crownest_e2e::Client,
    path: &str,
    key: &str,
    body: Value,
) -> (u16, Value, bool) {
    let response = client
        .request(reqwest::Method::POST, path)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (status, response.json().await.expect("json"), replayed)
}

#[tokio::test]
async fn concurrent_identical_creates_with_one_key_create_one_sandbox() {
    let s = shared();
    let client = s.client_with(&s.key("idem-org", None, "all"));
    let body = json!({ "template": "python", "metadata": { "try": 1 } });
    let (a, b) = tokio::join!(
        post_with_key(&client, "/v1/sandboxes", "create-once", body.clone()),
        post_with_key(&client, "/v1/sandboxes", "create-once", body.clone()),
    );
    assert_eq!((a.0, b.0), (201, 201), "{a:?} {b:?}");
    assert_eq!(a.1["id"], b.1["id"], "both answers name the same sandbox");
    assert!(a.2 ^ b.2, "exactly one of them is a replay");
    let (_, list) = client.get("/v1/sandboxes").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 1);

    // The same key with another body is a conflict and does nothing.
    let (status, conflict, _) = post_with_key(
        &client,
        "/v1/sandboxes",
        "create-once",
        json!({ "template": "python", "metadata": { "try": 2 } }),
    )
    .await;
    assert_eq!(
        (status, error_code(&conflict)),
        (409, "idempotency_key_reused")
    );
    let (_, list) = client.get("/v1/sandboxes").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 1);

    // Commands: a retried run returns the first result without running again.
    let sandbox = a.1["id"].as_str().expect("id");
    let path = format!("/v1/sandboxes/{sandbox}/commands");
    let run = json!({ "command": "echo ran >> /workspace/count; wc -l < /workspace/count" });
    let (_, first, _) = post_with_key(&client, &path, "run-once", run.clone()).await;
    let (_, second, replayed) = post_with_key(&client, &path, "run-once", run).await;
    assert!(replayed);
    assert_eq!(first, second);
    assert_eq!(
        client.run(sandbox, "wc -l < /workspace/count").await["stdout"],
        "1\n"
    );

    // Keys are scoped to the org: another org may use the same key.
    let other = s.client_with(&s.key("idem-other-org", None, "all"));
    let (status, other_sandbox, replayed) =
        post_with_key(&other, "/v1/sandboxes", "create-once", body).await;
    assert_eq!(status, 201);
    assert!(!replayed);
    assert_ne!(other_sandbox["id"], a.1["id"]);
    client.kill(sandbox).await;
    other.kill(other_sandbox["id"].as_str().expect("id")).await;
}

#[tokio::test]
async fn a_scripted_session_produces_exactly_the_expected_audit_events() {
    let s = shared();
    let admin = s.client_with(&s.key("audit-org", None, "all"));
    let reader = s.client_with(&s.key("audit-org", None, "sandboxes:read"));
    let sandbox = admin.sandbox("python").await;
    let command = admin.run(&sandbox, "echo hi").await;
    let (status, _) = reader
        .post("/v1/sandboxes", json!({ "template": "python" }))
        .await;
    assert_eq!(status, 403);
    admin.kill(&sandbox).await;

    let (status, page) = admin.get("/v1/audit-events?limit=200").await;
    assert_eq!(status, 200, "{page}");
    let events: Vec<(String, String, String, String)> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
                e["outcome"].as_str().unwrap_or("").to_string(),
                e["resourceId"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    let cmd = command["id"].as_str().expect("cmd");
    let expected: Vec<(String, String, String, String)> = [
        ("key", "sandbox.kill", "success", sandbox.as_str()),
        ("key", "sandbox.create", "denied", "-"),
        ("key", "command.run", "success", cmd),
        ("key", "sandbox.create", "success", sandbox.as_str()),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    assert_eq!(&events[..4], &expected[..], "{page}");
    // The two keys were minted by the operator, and that is audited too.
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(
        events[4..]
            .iter()
            .all(|e| e.0 == "operator" && e.1 == "key.create")
    );

    // The tombstone's history stays queryable by resource.
    let (_, history) = admin
        .get(&format!("/v1/audit-events?resourceId={sandbox}"))
        .await;
    let actions: Vec<&str> = history["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["sandbox.kill", "sandbox.create"]);
    let (_, filtered) = admin.get("/v1/audit-events?action=command.run").await;
    assert_eq!(filtered["data"].as_array().expect("data").len(), 1);

    // Reading the audit log needs its scope.
    let (status, body) = reader.get("/v1/audit-events").await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
}

fn usage_of(report: &Value, sandbox: &str) -> (i64, i64) {
    let line = report["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|l| l["key"] == sandbox)
        .unwrap_or_else(|| panic!("no usage line for {sandbox}: {report}"));
    (
        line["seconds"].as_i64().expect("seconds"),
        line["computeUnitSeconds"].as_i64().expect("cus"),
    )
}

#[tokio::test]
async fn usage_is_vcpus_times_seconds_alive_and_counts_a_host_outage() {
    let mut server = Server::start();
    let key = server.key("usage-org", None, "all");
    let client = server.client(&key);
    let (_, killed) = client
        .post("/v1/sandboxes", json!({ "template": "python" }))
        .await;
    let killed_id = killed["id"].as_str().expect("id").to_string();
    let vcpus = killed["vcpus"].as_i64().expect("vcpus");
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.kill(&killed_id).await;
    let lived = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (_, crashed) = client
        .post("/v1/sandboxes", json!({ "template": "python" }))
        .await;
    let crashed_id = crashed["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    // The sandbox lives on while the host is down, and is taken over: the
    // outage is part of its life, and metered.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    server.start_again();
    let client = server.client(&key);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client.kill(&crashed_id).await;
    let crashed_lived = started.elapsed().as_secs_f64();

    let (status, report) = client.get("/v1/usage?groupBy=sandbox").await;
    assert_eq!(status, 200, "{report}");
    let (seconds, cus) = usage_of(&report, &killed_id);
    assert!(
        (seconds as f64 - lived).abs() <= 1.0,
        "{seconds} s metered, lived {lived:.2} s"
    );
    assert_eq!(cus, seconds * vcpus);
    let (seconds, _) = usage_of(&report, &crashed_id);
    assert!(
        (seconds as f64 - crashed_lived).abs() <= 1.0,
        "{seconds} s metered, lived {crashed_lived:.2} s across the outage"
    );
    assert!(report["data"][0]["pricingVersion"].is_string());

    // Grouped by day and project, the totals agree.
    let (_, by_day) = client.get("/v1/usage?groupBy=day").await;
    assert_eq!(
        by_day["totalComputeUnitSeconds"],
        report["totalComputeUnitSeconds"]
    );
    let (status, body) = client.get("/v1/usage?groupBy=week").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    server.stop();
}

#[tokio::test]
async fn quotas_refuse_with_the_limit_named_and_create_nothing() {
    let s = shared();
    let key = s.key("quota-org", None, "all");
    let client = s.client_with(&key);
    let set = |args: &[&str]| {
        let mut command = std::process::Command::new(crownest_e2e::crownest_bin());
        command
            .args(["orgs", "set-quota", "--org", "quota-org"])
            .args(args);
        let out = command
            .arg("--data-dir")
            .arg(&s.data_dir)
            .output()
            .expect("set-quota");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    set(&[
        "--max-concurrent-sandboxes",
        "1",
        "--max-request-body-bytes",
        "200",
        "--max-command-output-bytes",
        "10",
    ]);

    let first = client.sandbox("python").await;
    let (status, body) = client
        .post("/v1/sandboxes", json!({ "template": "python" }))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (429, "quota_exceeded"),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["limit"], "maxConcurrentSandboxes");
    assert_eq!(body["error"]["details"]["max"], 1);
    let (_, list) = client.get("/v1/sandboxes").await;
    assert_eq!(
        list["data"].as_array().expect("data").len(),
        1,
        "nothing partially created"
    );

    let (status, body) = client
        .post(
            "/v1/sandboxes",
            json!({ "template": "python", "metadata": { "pad": "x".repeat(300) } }),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (413, "quota_exceeded"),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["limit"], "maxRequestBodyBytes");

    let result = client.run(&first, "echo 0123456789abcdef").await;
    assert_eq!(result["stdout"], "789abcdef\n");
    assert_eq!(result["stdoutTruncated"], true);

    // Raising the quota lets the next create through.
    set(&["--max-concurrent-sandboxes", "none"]);
    let second = client.sandbox("python").await;
    client.kill(&first).await;
    client.kill(&second).await;
}

#[tokio::test]
async fn audit_events_name_file_paths_as_decoded() {
    let s = shared();
    let client = s.client_with(&s.key("audit-path-org", None, "all"));
    let sandbox = client.sandbox("python").await;
    let response = client
        .request(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{sandbox}/files?path=notes%2Fa%20b.txt"),
        )
        .body("hi")
        .send()
        .await
        .expect("write");
    assert_eq!(response.status(), 200);
    let (_, page) = client.get("/v1/audit-events?action=file.write").await;
    assert_eq!(
        page["data"][0]["details"]["path"], "notes/a b.txt",
        "{page}"
    );
    client.kill(&sandbox).await;
}
