//! Host restarts: a crash (SIGKILL) while commands run loses no committed
//! record and leaves no container behind; a graceful stop cleans up too.

use std::time::Duration;

use crownest_e2e::{Server, error_code};
use serde_json::json;

#[tokio::test]
async fn kill_9_while_commands_run_then_restart_keeps_records_and_leaves_no_container() {
    let mut server = Server::start();
    let key = server.key("crash-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox("python").await;
    let done = client.run(&sandbox, "echo before-crash").await;
    let (status, running) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "echo started; sleep 300", "background": true }),
        )
        .await;
    assert_eq!(status, 200);
    let running_id = running["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.runc_containers(), vec![sandbox.clone()]);

    server.kill9();
    server.start_again();
    let client = server.client(&key);

    assert!(
        server.runc_containers().is_empty(),
        "no container left behind"
    );
    let (status, tomb) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(status, 200);
    assert_eq!(tomb["status"], "destroyed");
    assert_eq!(tomb["endReason"], "host_restart");

    let commands = format!("/v1/sandboxes/{sandbox}/commands");
    let (_, before) = client
        .get(&format!("{commands}/{}", done["id"].as_str().expect("id")))
        .await;
    assert_eq!(before["stdout"], "before-crash\n");
    assert_eq!(before["exitCode"], 0);
    let (_, interrupted) = client.get(&format!("{commands}/{running_id}")).await;
    assert_eq!(interrupted["status"], "failed", "{interrupted}");
    assert!(
        interrupted["error"]
            .as_str()
            .expect("error")
            .contains("restarted")
    );

    // Its log replays what was recorded and ends with an exit event.
    let text = client
        .request(
            reqwest::Method::GET,
            &format!("{commands}/{running_id}/logs"),
        )
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    assert!(text.contains("started"), "{text}");
    assert!(text.contains("event: exit"), "{text}");

    let (status, body) = client.post(&commands, json!({ "command": "true" })).await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
    server.stop();
}

#[tokio::test]
async fn a_graceful_stop_destroys_live_sandboxes() {
    let mut server = Server::start();
    let key = server.key("stop-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox("python").await;
    server.restart();
    assert!(server.runc_containers().is_empty());
    let client = server.client(&key);
    let (_, tomb) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(tomb["status"], "destroyed");
    assert_eq!(tomb["endReason"], "host_shutdown");
}
