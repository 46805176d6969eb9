//! The auth matrix: no key, wrong scope, another org, a revoked key, a
//! project-restricted key.

use crownest_e2e::{error_code, shared};
use serde_json::json;

#[tokio::test]
async fn requests_without_a_valid_key_are_unauthorized() {
    let s = shared();
    let mut anonymous = s.client();
    anonymous.key = None;
    let (status, body) = anonymous.get("/v1/sandboxes").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));

    let wrong = s.client_with("cn_live_0000000000000000000000000000000000000000");
    let (status, body) = wrong.get("/v1/sandboxes").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));

    // Bearer works like x-api-key.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/sandboxes", s.base_url))
        .bearer_auth(&s.key)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);

    // Health needs no key.
    let (status, body) = anonymous.get("/v1/health").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn a_key_without_the_scope_is_forbidden_and_names_the_scope() {
    let s = shared();
    let reader = s.client_with(&s.key("scoped-org", None, "sandboxes:read"));
    let (status, body) = reader
        .post("/v1/sandboxes", json!({ "template": "python" }))
        .await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    assert_eq!(
        body["error"]["details"]["requiredScope"],
        "sandboxes:create"
    );
    let (status, _) = reader.get("/v1/sandboxes").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn another_orgs_sandbox_is_not_found_and_revoked_keys_stop_working() {
    let s = shared();
    let owner = s.client();
    let sandbox = owner.sandbox("python").await;

    let outsider = s.client_with(&s.key("other-org", None, "all"));
    for (status, body) in [
        outsider.get(&format!("/v1/sandboxes/{sandbox}")).await,
        outsider.delete(&format!("/v1/sandboxes/{sandbox}")).await,
        outsider
            .post(
                &format!("/v1/sandboxes/{sandbox}/commands"),
                json!({ "command": "true" }),
            )
            .await,
    ] {
        assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    }
    let (_, list) = outsider.get("/v1/sandboxes").await;
    assert!(
        list["data"]
            .as_array()
            .expect("list")
            .iter()
            .all(|sb| sb["id"] != sandbox.as_str())
    );

    // Revocation takes effect on the next request.
    let key = s.key("revoked-org", None, "all");
    let doomed = s.client_with(&key);
    assert_eq!(doomed.get("/v1/sandboxes").await.0, 200);
    let out = std::process::Command::new(crownest_e2e::crownest_bin())
        .args(["keys", "list", "--data-dir"])
        .arg(&s.data_dir)
        .output()
        .expect("keys list");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(&key),
        "keys list must never print secrets"
    );
    let key_id = listing
        .lines()
        .find(|l| l.contains("revoked-org"))
        .and_then(|l| l.split_whitespace().next())
        .expect("key id in listing")
        .to_string();
    s.revoke(&key_id);
    let (status, body) = doomed.get("/v1/sandboxes").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    owner.kill(&sandbox).await;
}

#[tokio::test]
async fn a_project_restricted_key_cannot_see_another_projects_sandbox() {
    let s = shared();
    let alpha = s.client_with(&s.key("projects-org", Some("alpha"), "all"));
    let beta = s.client_with(&s.key("projects-org", Some("beta"), "all"));
    let org_wide = s.client_with(&s.key("projects-org", None, "all"));
    let sandbox = alpha.sandbox("python").await;

    let (status, body) = beta.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (_, list) = beta.get("/v1/sandboxes").await;
    assert!(list["data"].as_array().expect("list").is_empty(), "{list}");
    // The org-wide key sees every project.
    assert_eq!(
        org_wide.get(&format!("/v1/sandboxes/{sandbox}")).await.0,
        200
    );
    alpha.kill(&sandbox).await;
}

#[tokio::test]
async fn no_http_route_can_mint_keys() {
    let client = shared().client();
    for path in ["/v1/keys", "/v1/api-keys", "/v1/orgs/keys"] {
        let (status, body) = client
            .post(path, json!({ "scopes": ["sandboxes:create"] }))
            .await;
        assert_eq!((status, error_code(&body)), (404, "not_found"), "{path}");
    }
}
