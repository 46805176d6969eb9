//! `crownest-agent`: PID 1 inside every CrowNest sandbox.
//!
//! It listens on one transport (a unix socket for the `oci` runtime, a serial
//! port in a microVM), answers the host's handshake, then serves a yamux
//! session whose logical streams each start with an [`crownest_proto::Open`].
//! As init of the sandbox's PID namespace it also reaps every orphan
//! ([`reaper`]). It runs on one thread and never trusts the host to send
//! well-formed input: a bad stream is logged and dropped.
//!
//! Usage: `crownest-agent [--listen unix:PATH | --serial PATH | --vm ARGS…]`
//! (`--vm`: init of a microVM guest, see [`vm`]).

mod archive;
mod code;
mod egress;
mod exec;
mod execs;
mod files;
mod output;
mod reaper;
mod session;
mod stats;
mod transport;
mod tree;
mod tunnel;
mod vm;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crownest_proto::handshake::{HELLO_MAGIC, agent_handshake};
use tokio::net::UnixListener;
use tokio::task::AbortHandle;

/// musl's allocator returns freed blocks of a few dozen KiB to the kernel at
/// once, so every 64 KiB frame of a file transfer cost an mmap, a munmap and
/// a page fault per page; mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_SOCKET: &str = "/run/crownest/agent.sock";

/// A connection that does not complete the handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every session and stream of this agent run.
#[derive(Debug)]
pub struct Shared {
    /// Random per agent start; tells the host the sandbox rebooted.
    pub boot_id: u64,
    /// Processes started by the agent that have not been reaped yet.
    pub running: AtomicU32,
    /// Code contexts and their interpreters.
    pub contexts: Arc<code::Contexts>,
    /// Commands by the host's id: they outlive sessions, so a restarted
    /// host can attach to them again.
    pub execs: execs::Execs,
    /// The egress proxy (listening once the host offers a first stream).
    pub egress: Arc<egress::Egress>,
    /// Whether the agent is a microVM guest's init (then the guest's own
    /// /proc figures are the sandbox's).
    pub vm: bool,
    /// Open file watches ([`watch::MAX_WATCHES`] at most).
    pub watches: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Self::with_vm(false)
    }

    pub fn with_vm(vm: bool) -> Arc<Self> {
        Arc::new(Self {
            boot_id: rand::random(),
            running: AtomicU32::new(0),
            contexts: Arc::new(code::Contexts::default()),
            execs: execs::Execs::default(),
            egress: Arc::new(egress::Egress::default()),
            vm,
            watches: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

/// Where the agent talks to the host.
#[derive(Debug, PartialEq, Eq)]
enum Transport {
    Unix(PathBuf),
    Serial(PathBuf),
    /// Set the microVM guest up first, then serve its agent port.
    Vm(vm::VmConfig),
}

fn parse_args(args: &[String]) -> Result<Transport, String> {
    if args.first().map(String::as_str) == Some("--vm") {
        return vm::VmConfig::parse(&args[1..]).map(Transport::Vm);
    }
    let mut transport = Transport::Unix(PathBuf::from(DEFAULT_SOCKET));
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs unix:PATH")?;
                let path = value
                    .strip_prefix("unix:")
                    .ok_or_else(|| format!("--listen {value}: only unix:PATH is supported"))?;
                transport = Transport::Unix(PathBuf::from(path));
            }
            "--serial" => {
                let value = args.next().ok_or("--serial needs a device path")?;
                transport = Transport::Serial(PathBuf::from(value));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(transport)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: crownest-agent [--listen unix:PATH | --serial PATH | --vm ARGS...]");
        return std::process::ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version") {
        println!("crownest-agent {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    let parsed = parse_args(&args);
    let in_vm = matches!(parsed, Ok(Transport::Vm(_)));
    let transport = match parsed {
        Ok(Transport::Vm(config)) => match vm::init(&config) {
            Ok(port) => Transport::Serial(port),
            Err(e) => {
                eprintln!("crownest-agent: guest setup failed: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        Ok(transport) => transport,
        Err(e) => {
            eprintln!("crownest-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crownest-agent: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::spawn(async {
            if let Err(e) = reaper::run().await {
                eprintln!("crownest-agent: reaper: {e}");
            }
        });
        let shared = Shared::with_vm(in_vm);
        match transport {
            Transport::Unix(path) => serve_unix(&path, shared).await,
            Transport::Serial(path) => serve_serial(&path, shared).await,
            // Turned into `Serial` by `vm::init` above.
            Transport::Vm(_) => Err(std::io::Error::other("the guest was not set up")),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crownest-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds the socket (replacing a stale one) with mode 0600.
fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The socket is created 0600 (umask), not chmod-ed after: under gVisor
    // it is a host socket made by the gofer (`--host-uds=create`), whose
    // mode cannot be changed from inside.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        eprintln!(
            "crownest-agent: cannot chmod {} (the directory still guards it): {e}",
            path.display()
        );
    }
    Ok(listener)
}

async fn serve_unix(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = bind_unix(path)?;
    accept_loop(listener, shared).await
}

/// Accepts host connections; a connection that completes its handshake
/// replaces the previous session. Processes are not tied to sessions: the
/// new host finds them with `Open::ExecList` and attaches again.
async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let current: Arc<std::sync::Mutex<Option<AbortHandle>>> = Arc::default();
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("crownest-agent: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let current = current.clone();
        tokio::spawn(async move {
            let version = env!("CARGO_PKG_VERSION");
            let handshake = agent_handshake(&mut stream, shared.boot_id, version);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(_hello)) => {}
                Ok(Err(e)) => {
                    eprintln!("crownest-agent: handshake: {e}");
                    return;
                }
                Err(_) => {
                    eprintln!("crownest-agent: handshake timed out");
                    return;
                }
            }
            let session = tokio::spawn(async move {
                if let Err(e) = session::serve(stream, shared).await {
                    eprintln!("crownest-agent: session ended: {e}");
                }
            });
            let previous = current
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .replace(session.abort_handle());
            if let Some(previous) = previous {
                previous.abort();
            }
        });
    }
}

async fn serve_serial(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut io = transport::Replay::new(transport::FdStream::open(path)?);
    let version = env!("CARGO_PKG_VERSION");
    // Until a host connects, every read ends at once: say so once, not ten
    // times a second (the serial console is the guest's only log).
    let mut last_error = String::new();
    loop {
        match agent_handshake(&mut io, shared.boot_id, version).await {
            Ok(_hello) => {
                io.forget();
                last_error.clear();
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    eprintln!("crownest-agent: handshake on {}: {text}", path.display());
                    last_error = text;
                }
                // Nobody may be connected to the port yet (reads see EOF):
                // do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        if let Err(e) = session::serve(&mut io, shared.clone()).await {
            eprintln!("crownest-agent: session ended: {e}");
        }
        // A new host may have started with a hello that yamux swallowed.
        io.rewind_to(&HELLO_MAGIC);
    }
}

#[cfg(test)]
mod tests;
