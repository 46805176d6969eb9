//! Tests of the agent client: against the real `crownest-agent` binary run
//! as an ordinary process on a temporary socket, and against a fake,
//! misbehaving agent.

use std::future::poll_fn;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crownest_proto::{ExecEvent, ExecRequest};
use tokio::io::AsyncWriteExt;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::*;

/// The agent binary the tests run on the host: the static musl build that
/// `scripts/setup` makes (`cargo build -p crownest-agent --target
/// x86_64-unknown-linux-musl`), found the way the server finds it.
fn agent_binary() -> PathBuf {
    let path = crate::config::default_agent_binary();
    assert!(
        path.is_file(),
        "agent binary {} is missing: build it first with `cargo build -p crownest-agent --target x86_64-unknown-linux-musl` (scripts/setup does)",
        path.display()
    );
    path
}

/// A running agent process, killed on drop.
struct RunningAgent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunningAgent {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(agent_binary())
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .spawn()
            .expect("spawn agent");
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    async fn connect(&self) -> AgentClient {
        AgentClient::connect_unix(&self.socket, Duration::from_secs(10))
            .await
            .expect("connect")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: "/".into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        user: None,
        timeout_ms: None,
        stdin: false,
    }
}

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Option<ExecEvent>,
}

async fn collect(session: &mut ExecSession) -> Outcome {
    let mut outcome = Outcome::default();
    while let Some(event) = session.next_event().await {
        match event.expect("event") {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(bytes) => outcome.stdout.extend(bytes),
            ExecEvent::Stderr(bytes) => outcome.stderr.extend(bytes),
            end => outcome.end = Some(end),
        }
    }
    outcome
}

fn exited(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Option<ExecEvent> {
    Some(ExecEvent::Exited {
        code,
        signal,
        timed_out,
    })
}

#[tokio::test]
async fn real_agent_pings_and_runs_commands() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
    let pong = client.ping().await.expect("ping");
    assert_eq!(pong.boot_id, client.boot_id());
    assert_eq!(client.agent_version(), env!("CARGO_PKG_VERSION"));

    let mut session = client
        .exec(request(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .await
        .expect("exec");
    let outcome = collect(&mut session).await;
    assert_eq!(outcome.stdout, b"out\n");
    assert_eq!(outcome.stderr, b"err\n");
    assert_eq!(outcome.end, exited(Some(3), None, false));
    assert!(session.next_event().await.is_none());
}

#[tokio::test]
async fn real_agent_round_trips_stdin() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
    let mut req = request(&["cat"]);
    req.stdin = true;
    let mut session = client.exec(req).await.expect("exec");
    let input = session.input();
    let big = vec![b'y'; 200 * 1024];
    let writer = tokio::spawn(async move {
        input.stdin(b"hi ".to_vec()).await.expect("stdin");
        input.stdin(big).await.expect("stdin");
        input.close_stdin().await.expect("close");
    });
    let outcome = collect(&mut session).await;
    writer.await.expect("writer");
    assert_eq!(outcome.stdout.len(), 3 + 200 * 1024);
    assert!(outcome.stdout.starts_with(b"hi y"));
    assert_eq!(outcome.end, exited(Some(0), None, false));
}

#[tokio::test]
async fn real_agent_delivers_signals_and_timeouts() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;

    let mut session = client.exec(request(&["sleep", "10"])).await.expect("exec");
    let first = session.next_event().await.expect("event").expect("ok");
    assert!(matches!(first, ExecEvent::Started { .. }));
    session.input().signal(15).await.expect("signal");
    assert_eq!(
        collect(&mut session).await.end,
        exited(None, Some(15), false)
    );

    let mut req = request(&["sleep", "10"]);
    req.timeout_ms = Some(100);
    let mut session = client.exec(req).await.expect("exec");
    assert_eq!(collect(&mut session).await.end, exited(None, Some(9), true));

    let mut session = client
        .exec(request(&["/no/such/program"]))
        .await
        .expect("exec");
    let outcome = collect(&mut session).await;
    assert!(matches!(outcome.end, Some(ExecEvent::SpawnFailed { .. })));
}

#[tokio::test]
async fn real_agent_exec_round_trip_is_fast() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
    // Warm up.
    collect(&mut client.exec(request(&["true"])).await.expect("exec")).await;
    let runs = 50;
    let started = Instant::now();
    for _ in 0..runs {
        let mut session = client.exec(request(&["/bin/true"])).await.expect("exec");
        assert_eq!(
            collect(&mut session).await.end,
            exited(Some(0), None, false)
        );
    }
    let per_exec = started.elapsed() / runs;
    let started = Instant::now();
    for _ in 0..runs {
        client.ping().await.expect("ping");
    }
    let per_ping = started.elapsed() / runs;
    eprintln!(
        "exec of /bin/true: {per_exec:?} per round trip; ping: {per_ping:?}; agent VmRSS: {:?} KiB",
        agent.rss_kib()
    );
    assert!(per_exec < Duration::from_millis(100), "{per_exec:?}");
}

#[tokio::test]
async fn real_agent_serves_concurrent_execs() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let script = format!("echo {i}");
            let mut session = client
                .exec(request(&["sh", "-c", &script]))
                .await
                .expect("exec");
            collect(&mut session).await.stdout
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.expect("join"), format!("{i}\n").into_bytes());
    }
}

#[tokio::test]
async fn connect_unix_gives_up_after_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let result =
        AgentClient::connect_unix(&dir.path().join("none.sock"), Duration::from_millis(50)).await;
    assert!(matches!(result, Err(AgentError::Connect { .. })));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A fake agent that handshakes, then answers every stream with `reply`.
async fn fake_agent(reply: Vec<u8>) -> AgentClient {
    let (host, mut agent) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        crownest_proto::handshake::agent_handshake(&mut agent, 5, "fake")
            .await
            .expect("handshake");
        let mut connection = yamux::Connection::new(
            agent.compat(),
            crownest_proto::mux::config(),
            yamux::Mode::Server,
        );
        while let Some(Ok(stream)) = poll_fn(|cx| connection.poll_next_inbound(cx)).await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut stream = stream.compat();
                let _ = stream.write_all(&reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    AgentClient::connect(host).await.expect("connect")
}

#[tokio::test]
async fn oversized_frame_from_agent_is_a_protocol_error() {
    let client = fake_agent(u32::MAX.to_le_bytes().to_vec()).await;
    let mut session = client.exec(request(&["true"])).await.expect("exec");
    assert!(matches!(
        session.next_event().await,
        Some(Err(AgentError::Protocol(_)))
    ));
    assert!(session.next_event().await.is_none());
}

#[tokio::test]
async fn undecodable_event_from_agent_is_a_protocol_error() {
    let client = fake_agent(vec![3, 0, 0, 0, 0xff, 0xff, 0xff]).await;
    assert_eq!(client.boot_id(), 5);
    let mut session = client.exec(request(&["true"])).await.expect("exec");
    assert!(matches!(
        session.next_event().await,
        Some(Err(AgentError::Protocol(_)))
    ));
    assert!(matches!(client.ping().await, Err(AgentError::Protocol(_))));
}

#[tokio::test]
async fn client_notices_a_closed_connection() {
    let (host, mut agent) = tokio::io::duplex(1 << 16);
    let agent_task = tokio::spawn(async move {
        crownest_proto::handshake::agent_handshake(&mut agent, 5, "fake")
            .await
            .expect("handshake");
        drop(agent);
    });
    let client = AgentClient::connect(host).await.expect("connect");
    agent_task.await.expect("join");
    assert!(client.ping().await.is_err());
    assert!(client.is_closed());
}
