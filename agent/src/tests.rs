//! Tests of the agent's serving logic, run as an ordinary (non-PID-1)
//! process: a session over a unix socket pair with a tiny yamux client.

use std::future::poll_fn;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crownest_proto::frame::{read_message, write_message};
use crownest_proto::handshake::{HELLO_MAGIC, encode_message, hello, host_handshake};
use crownest_proto::{ExecEvent, ExecInput, ExecRequest, Open, Pong};
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
    start_reaper();
    let (mut host, agent) = UnixStream::pair().expect("pair");
    let shared = Shared::new();
    let agent_shared = shared.clone();
    tokio::spawn(async move {
        let mut agent = agent;
        agent_handshake(&mut agent, agent_shared.boot_id, "test")
            .await
            .expect("agent handshake");
        let _ = session::serve(agent, agent_shared).await;
    });
    host_handshake(&mut host, 1).await.expect("host handshake");
    (client(host), shared)
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
    started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Option<ExecEvent>,
}

async fn collect(reader: &mut Reader) -> Outcome {
    let mut outcome = Outcome::default();
    while let Some(event) = read_message::<ExecEvent, _>(reader).await.expect("event") {
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
