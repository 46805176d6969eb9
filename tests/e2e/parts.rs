//! The real parts below the API, each on its own: the static
//! `crownest-agent` run as an ordinary process on a temporary socket, the
//! runc runtime over the tiny rootfs, and a real mmdebstrap build. They
//! need the musl agent, runc and (for the first build) the network, which
//! is why they live here and not in `crownest --lib`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crownest::agent::{AgentClient, ExecSession};
use crownest::rootfs::testing::{test_cache, tiny_template};
use crownest::runtime::{
    AgentChannel, NetworkMode, OciRuntime, Resources, Runtime, RuntimeError, SandboxSpec,
    SandboxUser, UnixChannel, host_id_base,
};
use crownest_proto::{ExecEvent, ExecRequest};

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
        let child = Command::new(crownest_e2e::agent_bin())
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
        let channel = UnixChannel {
            path: self.socket.clone(),
        };
        let stream = channel
            .open(Duration::from_secs(10))
            .await
            .expect("open channel");
        AgentClient::connect(stream).await.expect("connect")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        id: format!(
            "cmd_parts{}",
            NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
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

/// Regression: a timed-out command's `setsid` child used to survive (only
/// the process group was killed).
#[tokio::test]
async fn a_timeout_kills_what_the_command_started_under_setsid() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
    // A sleep nobody else runs: its unusual length is the marker.
    let seconds = 700_000 + std::process::id() % 100_000;
    let marker = format!("sleep\0{seconds}\0");
    let script = format!("setsid sleep {seconds} & sleep 300");
    let mut req = request(&["sh", "-c", &script]);
    req.timeout_ms = Some(500);
    let mut session = client.exec(req).await.expect("exec");
    assert_eq!(collect(&mut session).await.end, exited(None, Some(9), true));
    let survivors = || {
        std::fs::read_dir("/proc")
            .expect("proc")
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&marker))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while survivors() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(survivors(), 0, "the setsid child outlived the timeout");
}

#[tokio::test]
async fn real_agent_exec_round_trip() {
    let agent = RunningAgent::start();
    let client = agent.connect().await;
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
    // Measured, not asserted: `scripts/bench` has the targets.
    eprintln!(
        "exec of /bin/true: {:?} per round trip; agent VmRSS: {:?} KiB",
        started.elapsed() / runs,
        agent.rss_kib()
    );
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

/// Real mmdebstrap: builds (or finds) the tiny rootfs, twice at once;
/// both callers get the same finished tree and no temp dir is left.
#[tokio::test]
async fn concurrent_builds_of_one_recipe_share_one_finished_tree() {
    let cache = test_cache();
    let t = tiny_template();
    let (a, b) = tokio::join!(cache.build(&t, false), cache.build(&t, false));
    let (a, b) = (a.expect("build a"), b.expect("build b"));
    assert_eq!(a, b);
    assert!(cache.is_built(&t));
    let passwd = std::fs::read_to_string(a.join("etc/passwd")).expect("passwd");
    assert!(passwd.contains("user:x:1000:1000:"), "{passwd}");
    for dir in ["workspace", "tmp", "run", "home/user"] {
        assert!(a.join(dir).is_dir(), "{dir} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(cache.cache_dir().join("rootfs"))
        .expect("read cache")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

struct Fixture {
    runtime: OciRuntime,
    spec: SandboxSpec,
    dir: tempfile::TempDir,
}

/// A real runc runtime with its own `--root`, the tiny rootfs (built
/// when absent) and, as "agent", a script that ignores its arguments and
/// sleeps: the real agent is tested end to end elsewhere.
async fn fixture(name: &str, agent_script: &str, agent_mode: u32) -> Fixture {
    let rootfs = test_cache()
        .build(&tiny_template(), false)
        .await
        .expect("tiny rootfs");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = dir.path().join("agent");
    std::fs::write(&agent, agent_script).expect("write agent");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(agent_mode))
        .expect("chmod agent");
    let pid = std::process::id();
    let spec = SandboxSpec {
        isolation: crownest::runtime::Isolation::Oci,
        id: format!("sbx_{name}{pid}"),
        rootfs,
        state_dir: dir.path().join("sandboxes").join(name),
        agent_binary: agent,
        resources: Resources {
            vcpus: 1,
            memory_mib: 128,
            pids: 64,
            disk_mib: 16,
        },
        network: NetworkMode::None,
        uid_slot: 40_000 + pid % 4_000,
        user: SandboxUser {
            uid: 1000,
            gid: 1000,
        },
    };
    let runtime = OciRuntime::new(PathBuf::from("runc"), dir.path().join("runc"));
    Fixture { runtime, spec, dir }
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    ["memory", "pids", "cpu", "devices"]
        .iter()
        .map(|c| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join("crownest")
                .join(id)
        })
        .collect()
}

fn pid_of(state_dir: &Path) -> i32 {
    std::fs::read_to_string(state_dir.join("container.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[tokio::test]
async fn a_runc_sandbox_is_listed_and_destroy_leaves_nothing() {
    let f = fixture("life", "#!/bin/sh\nexec sleep 1000\n", 0o755).await;

    f.runtime.start(&f.spec).await.expect("start");

    assert_eq!(
        f.runtime.list().await.expect("list"),
        vec![f.spec.id.clone()]
    );
    let pid = pid_of(&f.spec.state_dir);
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).expect("uid_map");
    let fields: Vec<u64> = uid_map
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    assert_eq!(
        fields,
        [0, u64::from(host_id_base(f.spec.uid_slot)), 65_536]
    );
    assert!(cgroup_dirs(&f.spec.id).iter().any(|d| d.is_dir()));

    f.runtime
        .destroy(&f.spec.id, &f.spec.state_dir)
        .await
        .expect("destroy");

    assert!(f.runtime.list().await.expect("list").is_empty());
    assert!(!f.spec.state_dir.exists());
    for d in cgroup_dirs(&f.spec.id) {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Gone and reaped, not a zombie: this test process is no subreaper
    // (only `serve` is), so whoever inherited the container's init reaps
    // it once the runtime has killed it.
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(gone, "pid {pid} of the destroyed container is still there");
    f.runtime
        .destroy(&f.spec.id, &f.spec.state_dir)
        .await
        .expect("destroy again");
}

#[tokio::test]
async fn a_failed_runc_start_returns_its_error_and_leaves_nothing() {
    // Not executable: runc fails to exec PID 1.
    let f = fixture("fail", "#!/bin/sh\nexec sleep 1000\n", 0o644).await;

    let err = f.runtime.start(&f.spec).await.expect_err("start must fail");

    assert!(matches!(err, RuntimeError::Command { .. }), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(f.runtime.list().await.expect("list").is_empty());
    assert!(!f.spec.state_dir.exists());
}

#[tokio::test]
async fn runc_start_refuses_an_unreachable_rootfs_and_a_long_socket_path() {
    let mut f = fixture("bad", "#!/bin/sh\n", 0o755).await;
    let private = f.dir.path().join("private");
    std::fs::create_dir_all(private.join("rootfs")).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut spec = f.spec.clone();
    spec.rootfs = private.join("rootfs");
    let err = f.runtime.start(&spec).await.expect_err("unreachable");
    assert!(
        matches!(err, RuntimeError::RootfsUnreachable { .. }),
        "{err}"
    );

    f.spec.state_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
    let err = f.runtime.start(&f.spec).await.expect_err("too long");
    assert!(
        matches!(err, RuntimeError::SocketPathTooLong { .. }),
        "{err}"
    );
}
