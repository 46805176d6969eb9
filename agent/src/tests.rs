//! Tests of the agent's serving logic, run as an ordinary (non-PID-1)
//! process: a session over a unix socket pair with a tiny yamux client.

use std::future::poll_fn;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crownest_proto::code::{ContextCreate, ContextReply, Language, RunEvent, RunRequest};
use crownest_proto::frame::{read_message, write_message};
use crownest_proto::handshake::{HELLO_MAGIC, encode_message, hello, host_handshake};
use crownest_proto::{
    ExecAttach, ExecEvent, ExecInput, ExecList, ExecRequest, ExecSummary, MAX_EXECS,
    MAX_UNACKED_BYTES, Open, Pong,
};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::*;

type Opener = mpsc::UnboundedSender<oneshot::Sender<yamux::Stream>>;
type Reader = ReadHalf<Compat<yamux::Stream>>;
type Writer = WriteHalf<Compat<yamux::Stream>>;

fn start_reaper() {
    tokio::spawn(reaper::run());
}

/// Starts a yamux client over an already handshaken transport.
fn client<T>(io: T) -> Opener
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<yamux::Stream>>();
    let mut connection = yamux::Connection::new(
        io.compat(),
        crownest_proto::mux::config(),
        yamux::Mode::Client,
    );
    tokio::spawn(async move {
        let mut pending: Option<oneshot::Sender<yamux::Stream>> = None;
        poll_fn(|cx| {
            loop {
                if pending.is_none() {
                    match rx.poll_recv(cx) {
                        std::task::Poll::Ready(Some(request)) => pending = Some(request),
                        std::task::Poll::Ready(None) => return std::task::Poll::Ready(()),
                        std::task::Poll::Pending => {}
                    }
                }
                let Some(request) = pending.take() else { break };
                match connection.poll_new_outbound(cx) {
                    std::task::Poll::Ready(Ok(stream)) => {
                        let _ = request.send(stream);
                    }
                    std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => {
                        pending = Some(request);
                        break;
                    }
                }
            }
            loop {
                match connection.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => continue,
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
    });
    tx
}

async fn open(opener: &Opener, open: &Open) -> (Reader, Writer) {
    let (tx, rx) = oneshot::channel();
    opener.send(tx).expect("driver alive");
    let stream = rx.await.expect("stream");
    let (reader, mut writer) = tokio::io::split(stream.compat());
    write_message(&mut writer, open).await.expect("open");
    (reader, writer)
}

/// An agent session over a socket pair, handshaken; returns the client.
async fn session() -> (Opener, Arc<Shared>) {
    let shared = Shared::new();
    (session_with(shared.clone()).await, shared)
}

/// A new session (new socket pair, new handshake, new yamux) against the
/// state of an agent that already served others: what a restarted host
/// gets.
async fn session_with(shared: Arc<Shared>) -> Opener {
    start_reaper();
    let (mut host, agent) = UnixStream::pair().expect("pair");
    tokio::spawn(async move {
        let mut agent = agent;
        agent_handshake(&mut agent, shared.boot_id, "test")
            .await
            .expect("agent handshake");
        let _ = session::serve(agent, shared).await;
    });
    host_handshake(&mut host, 1).await.expect("host handshake");
    client(host)
}

/// Agent state with a registry of these limits.
fn shared_with(execs: execs::Execs) -> Arc<Shared> {
    Arc::new(Shared {
        boot_id: rand::random(),
        running: AtomicU32::new(0),
        contexts: Arc::new(code::Contexts::default()),
        execs,
        egress: Arc::new(crate::egress::Egress::default()),
        vm: false,
        watches: Default::default(),
    })
}

/// A request under a fresh id.
fn request(argv: &[&str]) -> ExecRequest {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    request_with_id(&format!("cmd-{n}"), argv)
}

fn request_with_id(id: &str, argv: &[&str]) -> ExecRequest {
    ExecRequest {
        id: id.to_owned(),
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
    started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Option<ExecEvent>,
}

/// The next event; a test that would wait forever fails instead.
async fn next_event(reader: &mut Reader) -> Option<ExecEvent> {
    tokio::time::timeout(
        Duration::from_secs(10),
        read_message::<ExecEvent, _>(reader),
    )
    .await
    .expect("an event in time")
    .expect("event")
}

/// Events until the stream ends. After the end event nothing may follow.
async fn collect(reader: &mut Reader) -> Outcome {
    let mut outcome = Outcome::default();
    while let Some(event) = next_event(reader).await {
        assert!(outcome.end.is_none(), "{event:?} after the end");
        match event {
            ExecEvent::Started { .. } => outcome.started = true,
            ExecEvent::Stdout(bytes) => outcome.stdout.extend(bytes),
            ExecEvent::Stderr(bytes) => outcome.stderr.extend(bytes),
            end => {
                outcome.end = Some(end);
            }
        }
    }
    outcome
}

async fn send(writer: &mut Writer, input: &ExecInput) {
    write_message(writer, input).await.expect("input");
}

async fn attach(client: &Opener, id: &str, stdout_from: u64, stderr_from: u64) -> (Reader, Writer) {
    let request = ExecAttach {
        id: id.to_owned(),
        stdout_from,
        stderr_from,
    };
    open(client, &Open::ExecAttach(request)).await
}

async fn list_execs(client: &Opener) -> Vec<ExecSummary> {
    let (mut reader, _writer) = open(client, &Open::ExecList).await;
    let list = read_message::<ExecList, _>(&mut reader)
        .await
        .expect("list")
        .expect("a list");
    assert!(
        read_message::<ExecList, _>(&mut reader)
            .await
            .expect("eof")
            .is_none()
    );
    list.execs
}

fn ids(execs: &[ExecSummary]) -> Vec<&str> {
    execs.iter().map(|exec| exec.id.as_str()).collect()
}

/// Polls `condition` for up to 5 s.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where the agent's held output of exec `id` starts, per stream.
fn held_from(shared: &Shared, id: &str) -> Option<[u64; 2]> {
    shared.execs.get(id).map(|exec| exec.held_from())
}

/// `line0\n` up to `line{n-1}\n`.
fn lines(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("line{i}\n").into_bytes())
        .collect()
}

fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|b| **b == b'\n').count()
}

/// Prints `line0`, `line1`, … every 50 ms for 20 s.
const TICKER: &str = "i=0; while [ $i -lt 400 ]; do echo line$i; i=$((i+1)); sleep 0.05; done";

fn exited(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Option<ExecEvent> {
    Some(ExecEvent::Exited {
        code,
        signal,
        timed_out,
    })
}

#[tokio::test]
async fn exec_streams_output_and_exit_code() {
    let (client, _) = session().await;
    let req = request(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert!(outcome.started);
    assert_eq!(outcome.stdout, b"out\n");
    assert_eq!(outcome.stderr, b"err\n");
    assert_eq!(outcome.end, exited(Some(3), None, false));
}

#[tokio::test]
async fn exec_round_trips_stdin_through_cat() {
    let (client, _) = session().await;
    let mut req = request(&["cat"]);
    req.stdin = true;
    let (mut reader, mut writer) = open(&client, &Open::Exec(req)).await;
    let big = vec![b'x'; 300 * 1024];
    write_message(&mut writer, &ExecInput::Stdin(b"hello ".to_vec()))
        .await
        .expect("stdin");
    for chunk in big.chunks(crownest_proto::MAX_CHUNK_LEN) {
        write_message(&mut writer, &ExecInput::Stdin(chunk.to_vec()))
            .await
            .expect("stdin");
    }
    write_message(&mut writer, &ExecInput::CloseStdin)
        .await
        .expect("close");
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout.len(), 6 + big.len());
    assert!(outcome.stdout.starts_with(b"hello x"));
    assert_eq!(outcome.end, exited(Some(0), None, false));
}

#[tokio::test]
async fn exec_timeout_kills_the_process_group() {
    let (client, _) = session().await;
    let mut req = request(&["sleep", "10"]);
    req.timeout_ms = Some(200);
    let started = Instant::now();
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.end, exited(None, Some(9), true));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn exec_signal_reaches_the_process() {
    let (client, _) = session().await;
    let (mut reader, mut writer) = open(&client, &Open::Exec(request(&["sleep", "10"]))).await;
    let first = read_message::<ExecEvent, _>(&mut reader)
        .await
        .expect("event");
    assert!(matches!(first, Some(ExecEvent::Started { .. })));
    write_message(&mut writer, &ExecInput::Signal(15))
        .await
        .expect("signal");
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.end, exited(None, Some(15), false));
}

#[tokio::test]
async fn background_grandchild_holding_stdout_does_not_hang_exit() {
    let (client, _) = session().await;
    let req = request(&["sh", "-c", "sleep 5 & echo hi"]);
    let started = Instant::now();
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout, b"hi\n");
    assert_eq!(outcome.end, exited(Some(0), None, false));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn missing_program_reports_spawn_failure() {
    let (client, _) = session().await;
    let req = request(&["/nonexistent/program"]);
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert!(!outcome.started);
    assert!(matches!(outcome.end, Some(ExecEvent::SpawnFailed { .. })));
}

#[tokio::test]
async fn bad_cwd_reports_spawn_failure() {
    let (client, _) = session().await;
    let mut req = request(&["true"]);
    req.cwd = "/nonexistent/dir".into();
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert!(matches!(outcome.end, Some(ExecEvent::SpawnFailed { .. })));
}

#[tokio::test]
async fn ping_answers_boot_id() {
    let (client, shared) = session().await;
    let (mut reader, _writer) = open(&client, &Open::Ping).await;
    let pong = read_message::<Pong, _>(&mut reader).await.expect("pong");
    assert_eq!(
        pong,
        Some(Pong {
            boot_id: shared.boot_id,
            running: 0
        })
    );
}

#[tokio::test]
async fn garbage_open_frame_drops_only_that_stream() {
    let (client, shared) = session().await;
    let (tx, rx) = oneshot::channel();
    client.send(tx).expect("driver");
    let stream = rx.await.expect("stream");
    let (mut reader, mut writer) = tokio::io::split(stream.compat());
    writer
        .write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    writer.flush().await.expect("flush");
    assert!(
        read_message::<Pong, _>(&mut reader)
            .await
            .expect("eof")
            .is_none()
    );
    let (mut reader, _writer) = open(&client, &Open::Ping).await;
    let pong = read_message::<Pong, _>(&mut reader).await.expect("pong");
    assert_eq!(pong.map(|p| p.boot_id), Some(shared.boot_id));
}

#[tokio::test]
async fn host_disconnect_does_not_kill_the_process() {
    let dir = std::env::temp_dir().join(format!("crownest-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marker = dir.join("done");
    let _ = std::fs::remove_file(&marker);
    let (client, _) = session().await;
    let script = format!("sleep 0.3; echo late; touch {}", marker.display());
    let (mut reader, writer) = open(&client, &Open::Exec(request(&["sh", "-c", &script]))).await;
    let first = read_message::<ExecEvent, _>(&mut reader)
        .await
        .expect("event");
    assert!(matches!(first, Some(ExecEvent::Started { .. })));
    drop((reader, writer, client));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(marker.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serial_session_restarts_on_new_hello() {
    start_reaper();
    let (host, agent) = std::os::unix::net::UnixStream::pair().expect("pair");
    agent.set_nonblocking(true).expect("nonblocking");
    host.set_nonblocking(true).expect("nonblocking");
    let agent_io = transport::FdStream::from_file(std::fs::File::from(OwnedFd::from(agent)))
        .expect("fd stream");
    let shared = Shared::new();
    let agent_shared = shared.clone();
    tokio::spawn(async move {
        let mut io = transport::Replay::new(agent_io);
        loop {
            if agent_handshake(&mut io, agent_shared.boot_id, "test")
                .await
                .is_ok()
            {
                io.forget();
                let _ = session::serve(&mut io, agent_shared.clone()).await;
                io.rewind_to(&HELLO_MAGIC);
            }
        }
    });
    let mut host = UnixStream::from_std(host).expect("host");
    host_handshake(&mut host, 1).await.expect("first handshake");
    // The first host vanishes; a new one sends its hello into the live session.
    let second = encode_message(HELLO_MAGIC, &hello(2)).expect("encode");
    host.write_all(&second).await.expect("hello");
    let mut scanner = crownest_proto::handshake::Scanner::new(crownest_proto::handshake::ACK_MAGIC);
    let ack = loop {
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut host, &mut byte)
            .await
            .expect("read");
        if let (_, Some(payload)) = scanner.push(&byte).expect("scan")
            && let crownest_proto::handshake::ReplyVerdict::Accepted(ack) =
                crownest_proto::handshake::judge_reply(&payload, 2).expect("judge")
        {
            break ack;
        }
    };
    assert_eq!(ack.boot_id, shared.boot_id);
    let client = client(host);
    let (mut reader, _writer) = open(&client, &Open::Ping).await;
    let pong = read_message::<Pong, _>(&mut reader).await.expect("pong");
    assert_eq!(pong.map(|p| p.boot_id), Some(shared.boot_id));
}

#[test]
fn args_select_transport() {
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        parse_args(&args(&[])),
        Ok(Transport::Unix(PathBuf::from(DEFAULT_SOCKET)))
    );
    assert_eq!(
        parse_args(&args(&["--listen", "unix:/tmp/a.sock"])),
        Ok(Transport::Unix(PathBuf::from("/tmp/a.sock")))
    );
    assert_eq!(
        parse_args(&args(&["--serial", "/dev/vport0p1"])),
        Ok(Transport::Serial(PathBuf::from("/dev/vport0p1")))
    );
    assert!(parse_args(&args(&["--listen", "tcp:1"])).is_err());
}

#[tokio::test]
async fn exec_raises_oom_score_adj_of_the_command() {
    let (client, _) = session().await;
    let req = request(&["cat", "/proc/self/oom_score_adj"]);
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout, b"1000\n");
}

#[tokio::test]
async fn exec_as_user_switches_uid_and_groups() {
    let (client, _) = session().await;
    let mut req = request(&["sh", "-c", "id -u; id -G"]);
    req.user = Some(crownest_proto::ExecUser {
        uid: 65534,
        gid: 65533,
    });
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    if nix::unistd::geteuid().is_root() {
        assert_eq!(outcome.stdout, b"65534\n65533\n");
        assert_eq!(outcome.end, exited(Some(0), None, false));
    } else {
        // Without privilege, dropping to another user must fail loudly.
        assert!(matches!(outcome.end, Some(ExecEvent::SpawnFailed { .. })));
    }
}

#[tokio::test]
async fn a_new_session_resumes_a_running_exec_without_gap_or_duplicate() {
    let shared = Shared::new();
    let first = session_with(shared.clone()).await;
    let req = request_with_id("resume", &["sh", "-c", TICKER]);
    let (mut reader, mut writer) = open(&first, &Open::Exec(req)).await;
    let Some(ExecEvent::Started { pid }) = next_event(&mut reader).await else {
        panic!("no Started");
    };
    let mut recorded = Vec::new();
    while count_lines(&recorded) < 3 {
        match next_event(&mut reader).await {
            Some(ExecEvent::Stdout(bytes)) => recorded.extend(bytes),
            other => panic!("unexpected {other:?}"),
        }
    }
    let acked = recorded.len() as u64;
    send(
        &mut writer,
        &ExecInput::Ack {
            stdout: acked,
            stderr: 0,
        },
    )
    .await;
    wait_until("the ack is applied", || {
        held_from(&shared, "resume") == Some([acked, 0])
    })
    .await;
    // The host dies: its streams and its session go.
    drop((reader, writer, first));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let second = session_with(shared.clone()).await;
    let execs = list_execs(&second).await;
    assert_eq!(
        execs,
        [ExecSummary {
            id: "resume".into(),
            pid,
            running: true
        }]
    );
    let (mut reader, mut writer) = attach(&second, "resume", acked, 0).await;
    assert_eq!(
        next_event(&mut reader).await,
        Some(ExecEvent::Attached {
            pid,
            running: true,
            lost_stdout: 0,
            lost_stderr: 0
        })
    );
    let mut resumed = Vec::new();
    while count_lines(&recorded) + count_lines(&resumed) < 20 {
        match next_event(&mut reader).await {
            Some(ExecEvent::Stdout(bytes)) => resumed.extend(bytes),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Ignored while it runs: the exec is still listed after its end.
    send(&mut writer, &ExecInput::Release).await;
    send(&mut writer, &ExecInput::Kill).await;
    let rest = collect(&mut reader).await;
    assert_eq!(rest.end, exited(None, Some(9), false));
    assert!(rest.stderr.is_empty());
    resumed.extend(rest.stdout);
    let all = [recorded, resumed].concat();
    assert_eq!(all, lines(count_lines(&all)));
    assert_eq!(
        list_execs(&second).await,
        [ExecSummary {
            id: "resume".into(),
            pid,
            running: false
        }]
    );
    send(&mut writer, &ExecInput::Release).await;
    wait_until("the release is applied", || {
        shared.execs.get("resume").is_none()
    })
    .await;
    assert!(list_execs(&second).await.is_empty());
}

#[tokio::test]
async fn attach_replays_the_output_and_end_of_an_exec_that_ended_meanwhile() {
    let shared = Shared::new();
    let first = session_with(shared.clone()).await;
    let script = "echo a; sleep 0.3; echo b; echo c >&2; exit 4";
    let req = request_with_id("meanwhile", &["sh", "-c", script]);
    let (mut reader, mut writer) = open(&first, &Open::Exec(req)).await;
    assert!(matches!(
        next_event(&mut reader).await,
        Some(ExecEvent::Started { .. })
    ));
    assert_eq!(
        next_event(&mut reader).await,
        Some(ExecEvent::Stdout(b"a\n".to_vec()))
    );
    send(
        &mut writer,
        &ExecInput::Ack {
            stdout: 2,
            stderr: 0,
        },
    )
    .await;
    wait_until("the ack is applied", || {
        held_from(&shared, "meanwhile") == Some([2, 0])
    })
    .await;
    drop((reader, writer, first));
    tokio::time::sleep(Duration::from_millis(600)).await;

    let second = session_with(shared.clone()).await;
    let execs = list_execs(&second).await;
    assert_eq!(ids(&execs), ["meanwhile"]);
    assert!(!execs[0].running);
    let (mut reader, _writer) = attach(&second, "meanwhile", 2, 0).await;
    assert!(matches!(
        next_event(&mut reader).await,
        Some(ExecEvent::Attached {
            running: false,
            lost_stdout: 0,
            lost_stderr: 0,
            ..
        })
    ));
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout, b"b\n");
    assert_eq!(outcome.stderr, b"c\n");
    assert_eq!(outcome.end, exited(Some(4), None, false));
}

#[tokio::test]
async fn attach_to_an_unknown_id_answers_not_found() {
    let (client, _) = session().await;
    let (mut reader, _writer) = attach(&client, "no-such-exec", 0, 0).await;
    assert_eq!(next_event(&mut reader).await, Some(ExecEvent::NotFound));
    assert_eq!(next_event(&mut reader).await, None);
}

#[tokio::test]
async fn exec_with_an_id_already_held_fails_and_starts_nothing() {
    let dir = std::env::temp_dir().join(format!("crownest-agent-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marker = dir.join("started");
    let _ = std::fs::remove_file(&marker);
    let (client, _) = session().await;
    let req = request_with_id("dup", &["sleep", "5"]);
    let (mut reader, mut writer) = open(&client, &Open::Exec(req)).await;
    let Some(ExecEvent::Started { pid }) = next_event(&mut reader).await else {
        panic!("no Started");
    };
    let touch = format!("touch {}", marker.display());
    let again = request_with_id("dup", &["sh", "-c", &touch]);
    let (mut again_reader, _again_writer) = open(&client, &Open::Exec(again)).await;
    let outcome = collect(&mut again_reader).await;
    assert!(!outcome.started);
    assert!(matches!(outcome.end, Some(ExecEvent::SpawnFailed { .. })));
    let execs = list_execs(&client).await;
    assert_eq!(
        execs,
        [ExecSummary {
            id: "dup".into(),
            pid,
            running: true
        }]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists());
    send(&mut writer, &ExecInput::Kill).await;
    assert_eq!(collect(&mut reader).await.end, exited(None, Some(9), false));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn attach_below_the_acked_offsets_reports_the_bytes_lost() {
    let (client, shared) = session().await;
    let req = request_with_id("acked", &["sh", "-c", "echo hello; echo world >&2"]);
    let (mut reader, mut writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.end, exited(Some(0), None, false));
    send(
        &mut writer,
        &ExecInput::Ack {
            stdout: 3,
            stderr: 2,
        },
    )
    .await;
    wait_until("the ack is applied", || {
        held_from(&shared, "acked") == Some([3, 2])
    })
    .await;
    let (mut reader, _writer) = attach(&client, "acked", 1, 0).await;
    assert!(matches!(
        next_event(&mut reader).await,
        Some(ExecEvent::Attached {
            running: false,
            lost_stdout: 2,
            lost_stderr: 2,
            ..
        })
    ));
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout, b"lo\n");
    assert_eq!(outcome.stderr, b"rld\n");
    assert_eq!(outcome.end, exited(Some(0), None, false));
}

#[tokio::test]
async fn unacked_output_beyond_the_cap_drops_the_oldest_and_counts_it() {
    let shared = shared_with(execs::Execs::new(MAX_EXECS, 100));
    let client = session_with(shared.clone()).await;
    let script = "echo E >&2; sleep 0.2; i=0; while [ $i -lt 30 ]; do echo 01234567$((i % 10)); i=$((i+1)); done";
    let expected: Vec<u8> = (0..30)
        .flat_map(|i| format!("01234567{}\n", i % 10).into_bytes())
        .collect();
    let req = request_with_id("capped", &["sh", "-c", script]);
    let (mut reader, _writer) = open(&client, &Open::Exec(req)).await;
    let outcome = collect(&mut reader).await;
    // The attached stream itself gets everything: the cap only drops what
    // it has been sent.
    assert_eq!(outcome.stdout, expected);
    assert_eq!(outcome.stderr, b"E\n");
    assert_eq!(outcome.end, exited(Some(0), None, false));
    let exec = shared.execs.get("capped").expect("held");
    assert_eq!(exec.dropped(), [200, 2]);
    let (mut reader, _writer) = attach(&client, "capped", 0, 0).await;
    assert!(matches!(
        next_event(&mut reader).await,
        Some(ExecEvent::Attached {
            lost_stdout: 200,
            lost_stderr: 2,
            ..
        })
    ));
    let outcome = collect(&mut reader).await;
    assert_eq!(outcome.stdout, expected[200..]);
    assert!(outcome.stderr.is_empty());
}

#[tokio::test]
async fn a_full_registry_evicts_the_oldest_ended_exec_and_refuses_when_all_run() {
    let shared = shared_with(execs::Execs::new(2, MAX_UNACKED_BYTES));
    let client = session_with(shared).await;
    for id in ["e1", "e2", "e3"] {
        let (mut reader, _writer) =
            open(&client, &Open::Exec(request_with_id(id, &["true"]))).await;
        assert_eq!(collect(&mut reader).await.end, exited(Some(0), None, false));
    }
    assert_eq!(ids(&list_execs(&client).await), ["e2", "e3"]);
    let mut running = Vec::new();
    for id in ["r1", "r2"] {
        let (mut reader, writer) =
            open(&client, &Open::Exec(request_with_id(id, &["sleep", "5"]))).await;
        assert!(matches!(
            next_event(&mut reader).await,
            Some(ExecEvent::Started { .. })
        ));
        running.push((reader, writer));
    }
    assert_eq!(ids(&list_execs(&client).await), ["r1", "r2"]);
    let (mut reader, _writer) =
        open(&client, &Open::Exec(request_with_id("r3", &["sleep", "5"]))).await;
    assert_eq!(
        collect(&mut reader).await.end,
        Some(ExecEvent::SpawnFailed {
            message: "too many commands held".into()
        })
    );
    assert_eq!(ids(&list_execs(&client).await), ["r1", "r2"]);
    for (mut reader, mut writer) in running {
        send(&mut writer, &ExecInput::Kill).await;
        assert_eq!(collect(&mut reader).await.end, exited(None, Some(9), false));
    }
}

#[tokio::test]
async fn a_second_attach_detaches_the_first_stream() {
    let (client, _) = session().await;
    let req = request_with_id("twice", &["sh", "-c", TICKER]);
    let (mut first, mut first_writer) = open(&client, &Open::Exec(req)).await;
    assert!(matches!(
        next_event(&mut first).await,
        Some(ExecEvent::Started { .. })
    ));
    assert!(matches!(
        next_event(&mut first).await,
        Some(ExecEvent::Stdout(_))
    ));
    let (mut second, mut second_writer) = attach(&client, "twice", 0, 0).await;
    assert!(matches!(
        next_event(&mut second).await,
        Some(ExecEvent::Attached { running: true, .. })
    ));
    // The first stream ends (after what was already on its way) although
    // the command runs on.
    while let Some(event) = next_event(&mut first).await {
        assert!(matches!(event, ExecEvent::Stdout(_)), "{event:?}");
    }
    assert!(list_execs(&client).await[0].running);
    // Its input is no longer applied.
    let _ = write_message(&mut first_writer, &ExecInput::Kill).await;
    let mut output = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        match next_event(&mut second).await {
            Some(ExecEvent::Stdout(bytes)) => output.extend(bytes),
            other => panic!("unexpected {other:?}"),
        }
    }
    send(&mut second_writer, &ExecInput::Kill).await;
    let rest = collect(&mut second).await;
    assert_eq!(rest.end, exited(None, Some(9), false));
    output.extend(rest.stdout);
    assert_eq!(output, lines(count_lines(&output)));
}

async fn create_context(client: &Opener, id: &str) -> ContextReply {
    let request = ContextCreate {
        context_id: id.to_owned(),
        language: Language::Python,
        cwd: "/".into(),
        env: Vec::new(),
        user: None,
    };
    let (mut reader, _writer) = open(client, &Open::CodeContextCreate(request)).await;
    read_message::<ContextReply, _>(&mut reader)
        .await
        .expect("reply")
        .expect("a reply")
}

async fn live_contexts(client: &Opener) -> ContextReply {
    let (mut reader, _writer) = open(client, &Open::CodeContextList).await;
    read_message::<ContextReply, _>(&mut reader)
        .await
        .expect("reply")
        .expect("a reply")
}

#[tokio::test]
async fn code_context_list_names_the_contexts_held_even_when_an_interpreter_died() {
    if !Path::new("/usr/bin/python3").exists() && !Path::new("/usr/local/bin/python3").exists() {
        eprintln!("skipped: no python3 in the agent's PATH");
        return;
    }
    let (client, _) = session().await;
    for id in ["ctx-a", "ctx-b"] {
        let reply = create_context(&client, id).await;
        assert!(matches!(reply, ContextReply::Ready { .. }), "{reply:?}");
    }
    assert_eq!(
        live_contexts(&client).await,
        ContextReply::Contexts(vec!["ctx-a".into(), "ctx-b".into()])
    );
    // The interpreter of ctx-b dies after its run, when nobody looks.
    let run = RunRequest {
        context_id: "ctx-b".into(),
        code: "import os, threading\nthreading.Timer(0.2, lambda: os._exit(1)).start()".into(),
        timeout_ms: 10_000,
    };
    let (mut reader, _writer) = open(&client, &Open::CodeRun(run)).await;
    loop {
        match read_message::<RunEvent, _>(&mut reader)
            .await
            .expect("run event")
        {
            Some(RunEvent::Finished(end)) => {
                assert_eq!(end.interpreter_died, None);
                break;
            }
            Some(_) => {}
            None => panic!("run ended without Finished"),
        }
    }
    // Dead, but held: its next run restarts it (and says so).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        live_contexts(&client).await,
        ContextReply::Contexts(vec!["ctx-a".into(), "ctx-b".into()])
    );
    for id in ["ctx-a", "ctx-b"] {
        let (mut reader, _writer) = open(
            &client,
            &Open::CodeContextDelete {
                context_id: id.into(),
            },
        )
        .await;
        let _ = read_message::<ContextReply, _>(&mut reader).await;
    }
    assert_eq!(
        live_contexts(&client).await,
        ContextReply::Contexts(Vec::new())
    );
}
