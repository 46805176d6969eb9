//! Host restarts: sandboxes survive a crash (SIGKILL) or a graceful stop
//! (SIGTERM) of the server, on runc and on gVisor: same id and state,
//! running commands still running with every line of their log (none
//! missed during the outage, none twice, resumable by `Last-Event-ID`),
//! code contexts still holding their variables, cancellation still
//! working. A sandbox whose container died during the outage is
//! tombstoned `host_restart`; `--destroy-on-shutdown` keeps the old
//! behaviour.

use std::time::Duration;

use crownest_e2e::{Client, Server, SseEvent, SseParser, error_code};
use futures::StreamExt;
use serde_json::{Value, json};

/// Prints `line-1`, `line-2`, … every 50 ms, for ever.
const TICKER: &str = "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.05; done";

/// One sandbox of the scenario and what was read of it before the stop.
struct Watched {
    sandbox: String,
    command: String,
    /// The last log event read before the stop, and the line it ended at.
    last_event_id: String,
    last_line: u64,
}

/// The numbers of the `line-N` lines in the output events, in order.
fn line_numbers(events: &[SseEvent]) -> Vec<u64> {
    let text: String = events
        .iter()
        .filter(|e| e.event == "stdout")
        .filter_map(|e| e.data["data"].as_str())
        .collect();
    text.lines()
        .filter_map(|l| l.strip_prefix("line-"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Reads a command's log from `last_event_id` until its lines reach
/// `until` (or 20 s pass).
async fn read_until(
    client: &Client,
    sandbox: &str,
    command: &str,
    last_event_id: Option<&str>,
    until: u64,
) -> Vec<SseEvent> {
    let mut request = client.request(
        reqwest::Method::GET,
        &format!("/v1/sandboxes/{sandbox}/commands/{command}/logs"),
    );
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("logs");
    assert_eq!(response.status(), 200);
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        events.extend(parser.push(&chunk.expect("chunk")));
        if line_numbers(&events).last().is_some_and(|n| *n >= until) {
            break;
        }
    }
    events
}

/// Starts the ticker and a context holding `x = 42` in a new sandbox, and
/// reads its log a little.
async fn watch(client: &Client, template: &str) -> Watched {
    let sandbox = client.sandbox(template).await;
    let (status, command) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": TICKER, "background": true }),
        )
        .await;
    assert_eq!(status, 200, "{command}");
    let command = command["id"].as_str().expect("id").to_string();
    let (status, run) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": "x = 42" }),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    let events = read_until(client, &sandbox, &command, None, 5).await;
    let last_event_id = events
        .iter()
        .rev()
        .find_map(|e| e.id.clone())
        .expect("an event id");
    let last_line = *line_numbers(&events).last().expect("lines");
    Watched {
        sandbox,
        command,
        last_event_id,
        last_line,
    }
}

/// What must hold of a watched sandbox after the restart.
async fn check_survived(client: &Client, watched: &Watched) {
    let Watched {
        sandbox, command, ..
    } = watched;
    let (status, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(status, 200);
    assert_eq!(row["status"], "running", "{row}");
    // 2 s of outage at 20 lines a second: wait for lines well past it.
    let until = watched.last_line + 60;
    // Resumed after the last event read before the stop: the next line is
    // the one after the last seen, with no gap and no repeat to the end.
    let resumed = read_until(
        client,
        sandbox,
        command,
        Some(&watched.last_event_id),
        until,
    )
    .await;
    let numbers = line_numbers(&resumed);
    let expected: Vec<u64> = (watched.last_line + 1..).take(numbers.len()).collect();
    assert!(
        numbers.len() as u64 >= until - watched.last_line,
        "{sandbox}: too few lines after the restart: {numbers:?}"
    );
    assert_eq!(
        numbers, expected,
        "{sandbox}: gap or repeat across the restart"
    );
    // The whole log, from the start: every line once.
    let all = read_until(client, sandbox, command, None, until).await;
    let numbers = line_numbers(&all);
    let expected: Vec<u64> = (1..).take(numbers.len()).collect();
    assert_eq!(
        numbers, expected,
        "{sandbox}: the full log has a gap or repeat"
    );
    let ids: Vec<u64> = all
        .iter()
        .filter_map(|e| e.id.as_deref()?.parse().ok())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let (status, run) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": "print(x)" }),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["stdout"], json!(["42", "\n"]), "{run}");
    assert_eq!(run["stateLost"], false, "{run}");

    let (status, canceled) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands/{command}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled", "{canceled}");
}

/// The scenario of the issue, with `stop` as the way the server goes down.
async fn sandboxes_survive(stop: fn(&mut Server)) {
    let mut server = Server::start_with_env(&[("CROWNEST_DESTROY_ON_SHUTDOWN", "false")]);
    let key = server.key("restart-org", None, "all");
    let client = server.client(&key);
    let mut watched = Vec::new();
    for template in ["python", "python", "python-gvisor"] {
        watched.push(watch(&client, template).await);
    }
    // Its container dies while the host is down.
    let doomed = client.sandbox("python").await;

    stop(&mut server);
    let killed = std::process::Command::new("runc")
        .arg("--root")
        .arg(server.data_dir.join("runc"))
        .args(["kill", &doomed, "KILL"])
        .status()
        .expect("runc kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again();
    let client = server.client(&key);

    for w in &watched {
        check_survived(&client, w).await;
    }
    let (_, tomb) = client.get(&format!("/v1/sandboxes/{doomed}")).await;
    assert_eq!(tomb["status"], "destroyed", "{tomb}");
    assert_eq!(tomb["endReason"], "host_restart", "{tomb}");
    assert!(!server.runc_containers().contains(&doomed));

    for w in &watched {
        client.kill(&w.sandbox).await;
    }
    assert!(server.runc_containers().is_empty());
    assert!(server.runsc_containers().is_empty());
    server.stop();
}

#[tokio::test]
async fn sandboxes_commands_and_contexts_survive_a_kill_9_of_the_host() {
    sandboxes_survive(Server::kill9).await;
}

#[tokio::test]
async fn sandboxes_commands_and_contexts_survive_a_graceful_stop_of_the_host() {
    sandboxes_survive(Server::stop).await;
}

#[tokio::test]
async fn a_command_that_ended_during_the_outage_is_recorded_with_all_its_output() {
    let mut server = Server::start_with_env(&[("CROWNEST_DESTROY_ON_SHUTDOWN", "false")]);
    let key = server.key("ended-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox("python").await;
    let (_, command) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "echo before; sleep 1; echo during; exit 3", "background": true }),
        )
        .await;
    let id = command["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again();
    let client = server.client(&key);
    let path = format!("/v1/sandboxes/{sandbox}/commands/{id}");
    let mut ended = Value::Null;
    for _ in 0..100 {
        let (_, row) = client.get(&path).await;
        if row["status"] != "running" {
            ended = row;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended["status"], "completed", "{ended}");
    assert_eq!(ended["exitCode"], 3, "{ended}");
    assert_eq!(ended["stdout"], "before\nduring\n", "{ended}");
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn destroy_on_shutdown_destroys_live_sandboxes() {
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
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "true" }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
}
