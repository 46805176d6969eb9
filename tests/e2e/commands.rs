//! Commands over raw HTTP: the seed 002 flow, exit codes, background
//! commands with streamed logs and resume, stdin, signals, cancel, timeouts.

use std::time::Duration;

use crownest_e2e::{SseEvent, SseParser, shared};
use futures::StreamExt;
use serde_json::json;

on_each_runtime! {
async fn seed_002_flow_prints_42_and_a_nonzero_exit_is_a_result(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;

    let result = client.run(&sandbox, "python -c 'print(40 + 2)'").await;
    assert_eq!(result["exitCode"], 0, "{result}");
    assert_eq!(result["stdout"], "42\n");
    assert_eq!(result["status"], "completed");
    assert!(result["id"].as_str().expect("id").starts_with("cmd_"));
    assert!(result["startedAt"].is_string() && result["endedAt"].is_string());

    let failed = client.run(&sandbox, "echo oops >&2; exit 3").await;
    assert_eq!(failed["exitCode"], 3);
    assert_eq!(failed["stderr"], "oops\n");
    assert_eq!(failed["status"], "completed");

    let (status, listed) = client
        .get(&format!("/v1/sandboxes/{sandbox}/commands"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"].as_array().expect("list").len(), 2);
    let (status, one) = client
        .get(&format!(
            "/v1/sandboxes/{sandbox}/commands/{}",
            result["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["stdout"], "42\n");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn commands_run_in_workspace_as_the_unprivileged_user_with_env_and_cwd(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let result = client.run(&sandbox, "pwd; id -u; echo $HOME").await;
    assert_eq!(
        result["stdout"], "/workspace\n1000\n/workspace\n",
        "{result}"
    );

    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "mkdir -p sub && cd sub && pwd && echo $GREETING", "env": { "GREETING": "hi" } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(result["stdout"], "/workspace/sub\nhi\n", "{result}");
    let (_, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "pwd", "cwd": "sub" }),
        )
        .await;
    assert_eq!(result["stdout"], "/workspace/sub\n", "{result}");
    client.kill(&sandbox).await;
}
}

async fn read_events(
    client: &crownest_e2e::Client,
    path: &str,
    last_event_id: Option<&str>,
    stop_after: usize,
) -> Vec<SseEvent> {
    let mut request = client.request(reqwest::Method::GET, path);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("logs");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("ct"),
        "text/event-stream"
    );
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        events.extend(parser.push(&chunk.expect("chunk")));
        if events.len() >= stop_after || events.iter().any(|e| e.event == "exit") {
            break;
        }
    }
    events
}

on_each_runtime! {
async fn background_command_streams_logs_live_and_resumes_without_loss_or_repeats(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let (status, started) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.3; done; echo done >&2", "background": true }),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["status"], "running");
    assert!(started["exitCode"].is_null());
    let id = started["id"].as_str().expect("id");
    let path = format!("/v1/sandboxes/{sandbox}/commands/{id}/logs");

    // The first two events arrive while the command still runs.
    let first = read_events(&client, &path, None, 2).await;
    assert_eq!(first.len(), 2, "{first:?}");
    let (_, record) = client
        .get(&format!("/v1/sandboxes/{sandbox}/commands/{id}"))
        .await;
    assert_eq!(
        record["status"], "running",
        "events must arrive before the end"
    );

    // Resume after the second event: the rest, no repeats, ending in exit.
    let last_id = first[1].id.clone().expect("event id");
    let rest = read_events(&client, &path, Some(&last_id), usize::MAX).await;
    let all: Vec<SseEvent> = first.into_iter().chain(rest).collect();
    let ids: Vec<i64> = all
        .iter()
        .map(|e| e.id.as_deref().expect("id").parse().expect("numeric id"))
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "dense ids: {all:?}"
    );
    let stdout: String = all
        .iter()
        .filter(|e| e.event == "stdout")
        .map(|e| e.data["data"].as_str().expect("data"))
        .collect();
    assert_eq!(stdout, "line1\nline2\nline3\nline4\nline5\nline6\n");
    let stderr: String = all
        .iter()
        .filter(|e| e.event == "stderr")
        .map(|e| e.data["data"].as_str().expect("data"))
        .collect();
    assert_eq!(stderr, "done\n");
    let exit = all.last().expect("exit");
    assert_eq!(exit.event, "exit");
    assert_eq!(exit.data["exitCode"], 0);

    // A finished command's log replays from the record, and resumes too.
    let replay = read_events(&client, &path, None, usize::MAX).await;
    assert_eq!(replay, all);
    let tail = read_events(
        &client,
        &path,
        Some(&ids[ids.len() - 3].to_string()),
        usize::MAX,
    )
    .await;
    assert_eq!(tail.len(), 2);
    assert_eq!(tail.last().expect("exit").event, "exit");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn stdin_signal_cancel_and_timeout_are_recorded(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let commands = format!("/v1/sandboxes/{sandbox}/commands");

    // stdin round trip.
    let (_, cat) = client
        .post(
            &commands,
            json!({ "command": "cat", "background": true, "stdin": true }),
        )
        .await;
    let cat_id = cat["id"].as_str().expect("id").to_string();
    let (status, _) = client
        .post(
            &format!("{commands}/{cat_id}/stdin"),
            json!({ "data": "hello\n", "close": true }),
        )
        .await;
    assert_eq!(status, 200);
    let record = wait_for_end(&client, &commands, &cat_id).await;
    assert_eq!(record["stdout"], "hello\n");
    assert_eq!(record["exitCode"], 0);

    // stdin to a command without stdin open.
    let (_, sleeper) = client
        .post(
            &commands,
            json!({ "command": "sleep 30", "background": true }),
        )
        .await;
    let sleeper_id = sleeper["id"].as_str().expect("id").to_string();
    let (status, body) = client
        .post(
            &format!("{commands}/{sleeper_id}/stdin"),
            json!({ "data": "x" }),
        )
        .await;
    assert_eq!(
        (status, crownest_e2e::error_code(&body)),
        (409, "stdin_not_open")
    );

    // A signal ends it; the record says which.
    let (status, _) = client
        .post(
            &format!("{commands}/{sleeper_id}/signal"),
            json!({ "signal": "SIGTERM" }),
        )
        .await;
    assert_eq!(status, 200);
    let record = wait_for_end(&client, &commands, &sleeper_id).await;
    assert_eq!(record["signal"], 15, "{record}");
    assert_eq!(record["status"], "completed");

    // Cancel is recorded and ends the command as canceled.
    let (_, long) = client
        .post(
            &commands,
            json!({ "command": "sleep 30", "background": true }),
        )
        .await;
    let long_id = long["id"].as_str().expect("id").to_string();
    let (status, canceled) = client
        .post(&format!("{commands}/{long_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled");
    assert!(canceled["cancelRequestedAt"].is_string(), "{canceled}");
    let (status, body) = client
        .post(&format!("{commands}/{long_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, crownest_e2e::error_code(&body)),
        (409, "command_not_running")
    );

    // A timeout kills the whole process group.
    let (status, timed) = client
        .post(
            &commands,
            json!({ "command": "sleep 30 & sleep 30", "timeoutMs": 500 }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(timed["status"], "timed_out", "{timed}");
    let left = client
        .run(&sandbox, "ps -eo comm | grep -c '^sleep' || true")
        .await;
    assert_eq!(
        left["stdout"], "0\n",
        "timed-out process group must be gone"
    );
    client.kill(&sandbox).await;
}
}

async fn wait_for_end(
    client: &crownest_e2e::Client,
    commands: &str,
    id: &str,
) -> serde_json::Value {
    for _ in 0..200 {
        let (_, record) = client.get(&format!("{commands}/{id}")).await;
        if record["status"] != "running" {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("command {id} did not end");
}

on_each_runtime! {
async fn output_beyond_the_limit_keeps_the_tail_and_says_so(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    // 3 MiB of output; the record keeps the last 1 MiB of it.
    let result = client
        .run(
            &sandbox,
            "python3 -c \"import sys; sys.stdout.write('a' * (3 << 20) + 'END')\"",
        )
        .await;
    assert_eq!(
        result["stdoutTruncated"], true,
        "truncation must be recorded"
    );
    assert_eq!(result["stdoutDroppedBytes"], (3 << 20) + 3 - (1 << 20));
    let stdout = result["stdout"].as_str().expect("stdout");
    assert_eq!(stdout.len(), 1 << 20);
    assert!(stdout.ends_with("END"));
    client.kill(&sandbox).await;
}
}
