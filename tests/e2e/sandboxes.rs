//! Sandbox lifecycle: create, read, list with cursors, kill tombstones,
//! TTL expiry, templates.

use std::time::Duration;

use crownest_e2e::{error_code, shared};
use serde_json::json;

on_each_runtime! {
async fn create_returns_the_sandbox_and_kill_leaves_a_tombstone(template) {
    let s = shared();
    let client = s.client();
    let (status, created) = client
        .post(
            "/v1/sandboxes",
            json!({ "template": template, "ttlMs": 600000, "metadata": { "job": "primes-demo" } }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("sbx_"));
    assert_eq!(created["status"], "running");
    assert_eq!(created["template"], template);
    assert_eq!(created["runtime"], if template == "python" { "oci" } else { "gvisor" });
    assert_eq!(created["metadata"], json!({ "job": "primes-demo" }));
    let created_at = created["createdAt"].as_str().expect("createdAt");
    let expires_at = created["expiresAt"].as_str().expect("expiresAt");
    assert!(created_at.ends_with('Z') && expires_at > created_at);

    let (status, killed) = client.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(killed["status"], "destroyed");
    assert_eq!(killed["endReason"], "killed");

    // Still readable; any operation is 410.
    let (status, tomb) = client.get(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!((status, tomb["status"].as_str()), (200, Some("destroyed")));
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{id}/commands"),
            json!({ "command": "true" }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
    let (status, body) = client.delete(&format!("/v1/sandboxes/{id}")).await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
    assert!(
        !s.data_dir.join("sandboxes").join(&id).exists(),
        "state dir removed"
    );
}
}

#[tokio::test]
async fn the_reaper_destroys_a_sandbox_when_its_ttl_runs_out() {
    let client = shared().client();
    let (status, created) = client
        .post(
            "/v1/sandboxes",
            json!({ "template": "python", "ttlMs": 1500 }),
        )
        .await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().expect("id");
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = client.get(&format!("/v1/sandboxes/{id}")).await.1;
        if last["status"] == "destroyed" {
            break;
        }
    }
    assert_eq!(last["status"], "destroyed", "{last}");
    assert_eq!(last["endReason"], "expired");
}

#[tokio::test]
async fn list_pages_with_a_cursor() {
    let s = shared();
    let client = s.client_with(&s.key("paging-org", None, "all"));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(client.sandbox("python").await);
    }
    let (status, first) = client.get("/v1/sandboxes?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(first["data"].as_array().expect("data").len(), 2);
    let cursor = first["nextCursor"].as_str().expect("cursor");
    let (_, second) = client
        .get(&format!("/v1/sandboxes?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(second["data"].as_array().expect("data").len(), 1);
    assert!(second["nextCursor"].is_null());
    let mut seen: Vec<String> = first["data"]
        .as_array()
        .expect("data")
        .iter()
        .chain(second["data"].as_array().expect("data"))
        .map(|sb| sb["id"].as_str().expect("id").to_string())
        .collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    for id in ids {
        client.kill(&id).await;
    }
}

#[tokio::test]
async fn templates_are_listed_with_their_resources() {
    let client = shared().client();
    let (status, body) = client.get("/v1/templates").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    for expected in ["python", "node", "python-node"] {
        assert!(names.contains(&expected), "{names:?}");
    }
    let python = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["name"] == "python")
        .expect("python");
    assert_eq!(python["network"], "none");
    assert!(python["resources"]["memoryMiB"].as_u64().expect("memory") >= 128);
    // Its output pipeline, with the WASI each plugin imports (the default
    // ones are no_std: none).
    let language = &python["languages"][0];
    assert_eq!(language["language"], "python", "{python}");
    assert_eq!(language["formatter"]["name"], "default-formatter");
    assert_eq!(language["formatter"]["wasiImports"], serde_json::json!([]));
    assert_eq!(language["adapter"]["error"], serde_json::Value::Null);
}

#[tokio::test]
async fn the_openapi_document_is_served_and_lists_the_routes() {
    let client = shared().anonymous_client();
    let (status, doc) = client.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/commands",
        "/v1/sandboxes/{id}/commands/{command_id}/logs",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the document"
        );
    }
}
