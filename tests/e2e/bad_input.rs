//! Bad input gets the error envelope with a stable code, never a 500.

use crownest_e2e::{error_code, shared};
use serde_json::json;

#[tokio::test]
async fn malformed_and_misshapen_bodies_get_stable_codes() {
    let client = shared().client();
    let raw = |body: &'static str, content_type: &'static str| {
        client
            .request(reqwest::Method::POST, "/v1/sandboxes")
            .header("content-type", content_type)
            .body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (raw("{not json", "application/json"), 400, "invalid_json"),
        (
            raw("{\"template\": 7}", "application/json"),
            400,
            "invalid_request",
        ),
        (
            raw("{\"template\":\"python\",\"evil\":1}", "application/json"),
            400,
            "invalid_request",
        ),
        (raw("{}", "application/json"), 400, "invalid_request"),
        (
            raw("{\"template\":\"python\"}", "text/plain"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.expect("send");
        let got = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("json envelope");
        assert_eq!((got, error_code(&body)), (status, code), "{body}");
    }
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_payload_too_large() {
    let client = shared().client();
    // Just over the 2 MiB limit: the server answers once it has read the
    // limit and closes; what is left (64 KiB) fits the socket's buffer, so
    // the client finishes writing and reads the answer. (4 MiB left the
    // client writing into a closed connection: a broken pipe, no answer.)
    let huge = format!(
        "{{\"template\":\"python\",\"metadata\":{{\"x\":\"{}\"}}}}",
        "a".repeat((2 << 20) + (64 << 10))
    );
    let response = client
        .request(reqwest::Method::POST, "/v1/sandboxes")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(error_code(&body), "payload_too_large");
}

#[tokio::test]
async fn bad_ttls_metadata_and_templates_are_rejected_before_anything_starts() {
    let client = shared().client();
    for (body, status, code) in [
        (
            json!({ "template": "python", "ttlMs": 0 }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "python", "ttlMs": -5 }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "python", "ttlMs": 1u64 << 40 }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "python", "ttlMs": "soon" }),
            400,
            "invalid_request",
        ),
        (
            json!({ "template": "python", "metadata": [1, 2] }),
            400,
            "invalid_request",
        ),
        (json!({ "template": "cobol" }), 404, "template_not_found"),
    ] {
        let (got, response) = client.post("/v1/sandboxes", body.clone()).await;
        assert_eq!(
            (got, error_code(&response)),
            (status, code),
            "{body} -> {response}"
        );
    }
}

#[tokio::test]
async fn unknown_ids_routes_and_methods_get_the_envelope() {
    let client = shared().client();
    for path in [
        "/v1/sandboxes/sbx_00000000000000000000",
        "/v1/sandboxes/not-an-id",
        "/v1/sandboxes/..%2F..%2Fetc",
        "/v1/sandboxes/sbx_00000000000000000000/commands/cmd_00000000000000000000",
        "/v1/nothing-here",
    ] {
        let (status, body) = client.get(path).await;
        assert_eq!(
            (status, error_code(&body)),
            (404, "not_found"),
            "{path}: {body}"
        );
    }
    let (status, body) = client
        .request(reqwest::Method::PUT, "/v1/sandboxes")
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("send");
    let body: serde_json::Value = body.json().await.expect("json");
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    let (status, body) = client.get("/v1/sandboxes?limit=0").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    let (status, body) = client.get("/v1/sandboxes?cursor=garbage!").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    let (status, body) = client.get("/v1/sandboxes?bogus=1").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_query"));
}

#[tokio::test]
async fn bad_command_requests_are_rejected() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let path = format!("/v1/sandboxes/{sandbox}/commands");
    for body in [
        json!({ "command": "" }),
        json!({ "command": "true", "env": { "BAD=NAME": "x" } }),
        json!({ "command": "true", "timeoutMs": 0 }),
        json!({ "command": "true", "cwd": "a\u{0}b" }),
        json!({ "command": "true", "shell": "bash" }),
        json!({ "command": ["true"] }),
    ] {
        let (status, response) = client.post(&path, body.clone()).await;
        assert_eq!(
            (status, error_code(&response)),
            (400, "invalid_request"),
            "{body}"
        );
    }
    let (status, _) = client
        .post(
            &format!("{path}/cmd_00000000000000000000/signal"),
            json!({ "signal": "SIGSEGV" }),
        )
        .await;
    assert_eq!(status, 400);
    // A missing cwd is a failed command, not an API error.
    let (status, failed) = client
        .post(
            &path,
            json!({ "command": "true", "cwd": "/does/not/exist" }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].is_string());
    client.kill(&sandbox).await;
}
