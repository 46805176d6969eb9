//! Artifacts: the seed 002 worked example over raw HTTP, `collect` on a
//! command, range downloads, quotas, and artifacts outliving the sandbox.

use crownest_e2e::{error_code, shared};
use serde_json::json;

const PRIMES: &str = r#"
with open("primes.txt", "w") as f:
    primes = [n for n in range(2, 50)
              if all(n % d for d in range(2, n))]
    f.write("\n".join(map(str, primes)))
print("wrote", "primes.txt")
"#;

async fn download(
    client: &crownest_e2e::Client,
    id: &str,
    range: Option<&str>,
) -> (u16, Vec<u8>, reqwest::header::HeaderMap) {
    let mut request = client.request(reqwest::Method::GET, &format!("/v1/artifacts/{id}/content"));
    if let Some(range) = range {
        request = request.header("range", range);
    }
    let response = request.send().await.expect("download");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        response.bytes().await.expect("bytes").to_vec(),
        headers,
    )
}

#[tokio::test]
async fn seed_002_worked_example_promotes_primes_and_the_artifact_outlives_the_sandbox() {
    let client = shared().client();
    let (status, sandbox) = client
        .post(
            "/v1/sandboxes",
            json!({ "template": "python", "ttlMs": 600000, "metadata": { "job": "primes-demo" } }),
        )
        .await;
    assert_eq!(status, 201);
    let id = sandbox["id"].as_str().expect("id").to_string();
    let response = client
        .request(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=primes.py"),
        )
        .body(PRIMES)
        .send()
        .await
        .expect("write");
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );

    let result = client.run(&id, "python primes.py").await;
    assert_eq!(result["exitCode"], 0, "{result}");
    assert_eq!(result["stdout"], "wrote primes.txt\n");

    let (status, artifact) = client
        .post(
            &format!("/v1/sandboxes/{id}/artifacts"),
            json!({ "path": "primes.txt" }),
        )
        .await;
    assert_eq!(status, 201, "{artifact}");
    let artifact_id = artifact["id"].as_str().expect("id").to_string();
    assert!(artifact_id.starts_with("art_"));
    assert_eq!(artifact["name"], "primes.txt");
    assert_eq!(artifact["mime"], "text/plain");
    assert_eq!(artifact["sandboxId"], id.as_str());
    let expected = "2\n3\n5\n7\n11\n13\n17\n19\n23\n29\n31\n37\n41\n43\n47";
    assert_eq!(artifact["size"], expected.len());

    client.kill(&id).await;

    let (status, bytes, headers) = download(&client, &artifact_id, None).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(bytes).expect("utf8"), expected);
    assert_eq!(headers["content-type"], "text/plain");
    let (status, listed) = client.get(&format!("/v1/sandboxes/{id}/artifacts")).await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"][0]["id"], artifact_id.as_str());
    let (status, one) = client.get(&format!("/v1/artifacts/{artifact_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["sha256"], artifact["sha256"]);

    // Ranges.
    let (status, part, headers) = download(&client, &artifact_id, Some("bytes=0-4")).await;
    assert_eq!((status, part.as_slice()), (206, b"2\n3\n5".as_slice()));
    assert_eq!(
        headers["content-range"],
        format!("bytes 0-4/{}", expected.len()).as_str()
    );
    let (status, part, _) = download(&client, &artifact_id, Some("bytes=-2")).await;
    assert_eq!((status, part.as_slice()), (206, b"47".as_slice()));
    let (status, _, _) = download(&client, &artifact_id, Some("bytes=9999-")).await;
    assert_eq!(status, 416);

    // Promoting from the destroyed sandbox is refused.
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{id}/artifacts"),
            json!({ "path": "primes.txt" }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
}

#[tokio::test]
async fn collect_on_a_command_returns_artifact_ids_and_reports_missing_paths() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({
                "command": "mkdir -p out && echo '<h1>report</h1>' > out/report.html",
                "collect": [
                    { "path": "/workspace/out/report.html", "name": "report.html" },
                    { "path": "missing.txt" }
                ]
            }),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        result["exitCode"], 0,
        "a missing path does not fail the command"
    );
    let artifacts = result["artifacts"].as_array().expect("artifacts");
    assert_eq!(artifacts.len(), 2, "{result}");
    assert_eq!(artifacts[0]["name"], "report.html");
    let report = artifacts[0]["artifactId"].as_str().expect("promoted");
    assert!(artifacts[0]["error"].is_null());
    assert!(artifacts[1]["artifactId"].is_null());
    let missing = artifacts[1]["error"].as_str().expect("error");
    assert!(
        missing.contains("missing.txt"),
        "the error names the path: {missing}"
    );

    let (status, bytes, headers) = download(&client, report, None).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"<h1>report</h1>\n");
    assert_eq!(headers["content-type"], "text/html");
    // The record keeps the results.
    let (_, record) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/commands/{}",
            result["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(record["artifacts"], result["artifacts"]);
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn artifact_storage_quota_is_enforced_and_nothing_is_stored() {
    let s = shared();
    let client = s.client_with(&s.key("artifact-quota-org", None, "all"));
    let out = std::process::Command::new(crownest_e2e::crownest_bin())
        .args([
            "orgs",
            "set-quota",
            "--org",
            "artifact-quota-org",
            "--max-artifact-bytes",
            "1000",
            "--data-dir",
        ])
        .arg(&s.data_dir)
        .output()
        .expect("set-quota");
    assert!(out.status.success());
    let sandbox = client.sandbox("python").await;
    client
        .run(
            &sandbox,
            "head -c 600 /dev/zero > a.bin; head -c 600 /dev/zero > b.bin",
        )
        .await;
    let (status, _) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/artifacts"),
            json!({ "path": "a.bin" }),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/artifacts"),
            json!({ "path": "b.bin" }),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (429, "quota_exceeded"),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["limit"], "maxArtifactBytes");
    let (_, list) = client.get("/v1/artifacts").await;
    assert_eq!(list["data"].as_array().expect("data").len(), 1);
    client.kill(&sandbox).await;
}
