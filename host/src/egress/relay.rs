//! Serving one sandbox's egress: keeps a few streams offered to its agent's
//! proxy, and for each connection a program makes checks the policy,
//! resolves the name itself (every address is checked, so a name that
//! rebinds to a private address gets nowhere), dials, then pipes bytes with
//! a byte count, a shared bandwidth cap and an idle timeout.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crownest_proto::{EgressReply, EgressRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::policy::{Asked, Ceiling, Host, Policy, Refusal};
use crate::agent::{AgentClient, EgressOffer};

/// The operator's egress settings (server flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub ceiling: Ceiling,
    /// Connections open at once per sandbox.
    pub max_connections: usize,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long resolving and dialling may take.
    pub connect_timeout: Duration,
    /// Bytes per second per sandbox and direction, over all its
    /// connections (0: no cap).
    pub bandwidth_bytes_per_sec: u64,
    /// Streams kept offered to the agent (connections that can start at
    /// the same instant without waiting for the host).
    pub offers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ceiling: Ceiling::default(),
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            bandwidth_bytes_per_sec: 50 << 20,
            offers: 4,
        }
    }
}

/// What the relay tells its owner (the core audits and persists).
#[derive(Debug, Clone)]
pub enum EgressEvent {
    /// A connection the policy refused.
    Refused { target: String, refusal: Refusal },
    /// A connection ended after moving these bytes.
    Closed { bytes_in: u64, bytes_out: u64 },
}

/// A live sandbox's egress state: its policy (changed in place by a
/// PATCH, for new connections) and its meters.
#[derive(Debug)]
pub struct SandboxEgress {
    policy: RwLock<Policy>,
    /// Bytes received from the internet, since the sandbox was created.
    bytes_in: AtomicU64,
    /// Bytes sent by the sandbox.
    bytes_out: AtomicU64,
    connections: Arc<Semaphore>,
    /// Name lookups of this sandbox running now.
    lookups: Arc<Semaphore>,
    /// Serialises policy changes (the store and the live copy agree).
    pub(crate) changing: tokio::sync::Mutex<()>,
    inbound: Limiter,
    outbound: Limiter,
}

impl SandboxEgress {
    /// `bytes_in`/`bytes_out`: what the store already counts.
    pub fn new(policy: Policy, settings: &Settings, bytes_in: u64, bytes_out: u64) -> Self {
        Self {
            policy: RwLock::new(policy),
            bytes_in: AtomicU64::new(bytes_in),
            bytes_out: AtomicU64::new(bytes_out),
            connections: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS_PER_SANDBOX)),
            changing: tokio::sync::Mutex::new(()),
            inbound: Limiter::new(settings.bandwidth_bytes_per_sec),
            outbound: Limiter::new(settings.bandwidth_bytes_per_sec),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_policy(&self, policy: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// (in, out) bytes so far, including connections still open.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// A token bucket with one second of burst, shared by every connection of
/// a sandbox in one direction.
#[derive(Debug)]
struct Limiter {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    async fn take(&self, bytes: usize) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let rate = self.rate as f64;
            let refilled = state.0 + now.duration_since(state.1).as_secs_f64() * rate;
            state.0 = refilled.min(rate) - bytes as f64;
            state.1 = now;
            if state.0 < 0.0 {
                Duration::from_secs_f64(-state.0 / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Serves a sandbox's egress until `stop` or until its agent is gone.
pub fn spawn(
    agent: AgentClient,
    egress: Arc<SandboxEgress>,
    settings: Arc<Settings>,
    stop: CancellationToken,
    report: Arc<dyn Fn(EgressEvent) + Send + Sync>,
) {
    for _ in 0..settings.offers.max(1) {
        let (agent, egress, settings, stop, report) = (
            agent.clone(),
            egress.clone(),
            settings.clone(),
            stop.clone(),
            report.clone(),
        );
        tokio::spawn(async move {
            offer_loop(agent, egress, settings, stop, report).await;
        });
    }
}

async fn offer_loop(
    agent: AgentClient,
    egress: Arc<SandboxEgress>,
    settings: Arc<Settings>,
    stop: CancellationToken,
    report: Arc<dyn Fn(EgressEvent) + Send + Sync>,
) {
    loop {
        if agent.is_closed() {
            return;
        }
        let offered = tokio::select! {
            _ = stop.cancelled() => return,
            offered = agent.egress_listen() => offered,
        };
        let mut offer = match offered {
            Ok(offer) => offer,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let request = tokio::select! {
            _ = stop.cancelled() => return,
            request = offer.request() => request,
        };
        match request {
            Ok(Some(request)) => {
                let (egress, settings, stop, report) = (
                    egress.clone(),
                    settings.clone(),
                    stop.clone(),
                    report.clone(),
                );
                tokio::spawn(async move {
                    connect(offer, request, &egress, &settings, stop, report.as_ref()).await;
                });
            }
            Ok(None) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn refused(code: &'static str, reason: String) -> Refusal {
    Refusal { code, reason }
}

/// Decides, dials and pipes one connection.
async fn connect(
    offer: EgressOffer,
    request: EgressRequest,
    egress: &SandboxEgress,
    settings: &Settings,
    stop: CancellationToken,
    report: &(dyn Fn(EgressEvent) + Send + Sync),
) {
    let shown: String = request.host.chars().take(255).collect();
    let target = format!("{shown}:{}", request.port);
    let refuse = |refusal: Refusal| {
        report(EgressEvent::Refused {
            target: target.clone(),
            refusal: refusal.clone(),
        });
        EgressReply::Refused {
            code: refusal.code.to_owned(),
            reason: refusal.reason,
        }
    };
    let Some(host) = Host::parse(&request.host).filter(|_| request.port != 0) else {
        let reply = refuse(refused(
            "egress_bad_host",
            format!("`{}` is not a host name or address", shown.escape_debug()),
        ));
        return offer.refuse(&reply).await;
    };
    let asked = Asked {
        host: &host,
        port: request.port,
    };
    let policy = egress.policy();
    if let Err(refusal) = policy.check_asked(asked) {
        return offer.refuse(&refuse(refusal)).await;
    }
    let Ok(_permit) = egress.connections.clone().try_acquire_owned() else {
        let reply = refuse(refused(
            "egress_connection_limit",
            format!(
                "this sandbox already has {} connections open",
                settings.max_connections
            ),
        ));
        return offer.refuse(&reply).await;
    };
    // Resolving and every dial share one deadline.
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    let addresses = match resolve(&host, request.port, &egress.lookups, deadline).await {
        Ok(addresses) => addresses,
        Err(reason) => return offer.refuse(&EgressReply::Failed { reason }).await,
    };
    let mut refusal = None;
    let mut failure = None;
    let mut upstream = None;
    for ip in addresses {
        if let Err(r) = policy.check_address(&settings.ceiling, asked, ip) {
            refusal.get_or_insert(r);
            continue;
        }
        let dial = TcpStream::connect((ip, request.port));
        match tokio::time::timeout_at(deadline, dial).await {
            Ok(Ok(stream)) => {
                upstream = Some(stream);
                break;
            }
            Ok(Err(e)) => failure = Some(format!("connect to {target} ({ip}): {e}")),
            Err(_) => failure = Some(format!("connect to {target} ({ip}): timed out")),
        }
    }
    let Some(upstream) = upstream else {
        let reply = match (failure, refusal) {
            (Some(reason), refusal) => {
                // An address the policy refused is audited even when a
                // later one was allowed and failed.
                if let Some(r) = refusal {
                    let _ = refuse(r);
                }
                EgressReply::Failed { reason }
            }
            (None, Some(r)) => refuse(r),
            (None, None) => EgressReply::Failed {
                reason: format!("{target} has no address"),
            },
        };
        return offer.refuse(&reply).await;
    };
    let _ = upstream.set_nodelay(true);
    let Ok(stream) = offer.connected().await else {
        return;
    };
    let (up_read, up_write) = upstream.into_split();
    let moved = pipe(
        stream.reader,
        stream.writer,
        up_read,
        up_write,
        egress,
        settings.idle_timeout,
        stop,
    )
    .await;
    report(EgressEvent::Closed {
        bytes_in: moved.0,
        bytes_out: moved.1,
    });
}

/// The addresses to try: the literal one, or what the name resolves to.
/// Name lookups running at once on this host, all sandboxes together.
/// A lookup runs getaddrinfo on a blocking thread that cannot be stopped,
/// so a place is given back only when that thread returns, not when the
/// connection stops waiting: a resolver that never answers can hold these
/// places, never the blocking pool the store also uses.
const MAX_LOOKUPS: usize = 32;
/// Lookups one sandbox may have running at once.
const MAX_LOOKUPS_PER_SANDBOX: usize = 4;

fn lookups() -> &'static Arc<Semaphore> {
    static LOOKUPS: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    LOOKUPS.get_or_init(|| Arc::new(Semaphore::new(MAX_LOOKUPS)))
}

async fn resolve(
    host: &Host,
    port: u16,
    own: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> Result<Vec<IpAddr>, String> {
    let name = match host {
        Host::Ip(ip) => return Ok(vec![*ip]),
        Host::Name(name) => name.clone(),
    };
    let busy = || format!("resolving {name} timed out (too many lookups running)");
    let mine = own.clone().try_acquire_owned().map_err(|_| busy())?;
    let global = tokio::time::timeout_at(deadline, lookups().clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let shown = name.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        let found = std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port));
        drop((mine, global));
        found
    });
    let found = tokio::time::timeout_at(deadline, lookup)
        .await
        .map_err(|_| format!("resolving {shown} timed out"))?
        .map_err(|e| format!("resolving {shown} failed: {e}"))?
        .map_err(|e| format!("cannot resolve {shown}: {e}"))?;
    let mut addresses: Vec<IpAddr> = Vec::new();
    for address in found {
        if !addresses.contains(&address.ip()) {
            addresses.push(address.ip());
        }
    }
    Ok(addresses)
}

/// Copies both ways until both sides close, the connection idles out or
/// the sandbox stops; returns (bytes in, bytes out).
async fn pipe<SR, SW, UR, UW>(
    sandbox_read: SR,
    sandbox_write: SW,
    upstream_read: UR,
    upstream_write: UW,
    egress: &SandboxEgress,
    idle: Duration,
    stop: CancellationToken,
) -> (u64, u64)
where
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let done = stop.child_token();
    let (moved_in, moved_out) = (AtomicU64::new(0), AtomicU64::new(0));
    let inbound = copy(
        upstream_read,
        sandbox_write,
        Direction {
            meter: &egress.bytes_in,
            moved: &moved_in,
            limiter: &egress.inbound,
        },
        &last,
        start,
        idle,
        &done,
    );
    let outbound = copy(
        sandbox_read,
        upstream_write,
        Direction {
            meter: &egress.bytes_out,
            moved: &moved_out,
            limiter: &egress.outbound,
        },
        &last,
        start,
        idle,
        &done,
    );
    tokio::join!(inbound, outbound);
    (
        moved_in.load(Ordering::Relaxed),
        moved_out.load(Ordering::Relaxed),
    )
}

struct Direction<'a> {
    meter: &'a AtomicU64,
    moved: &'a AtomicU64,
    limiter: &'a Limiter,
}

#[allow(clippy::too_many_arguments)]
async fn copy<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction<'_>,
    last: &AtomicU64,
    start: Instant,
    idle: Duration,
    done: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // One read is one write to the agent stream (one yamux frame). 64 KiB
    // moved as much as 256 KiB did in the egress bench, and keeps a
    // sandbox's 64 connections to 8 MiB of host buffers.
    let mut buffer = vec![0u8; crownest_proto::MAX_CHUNK_LEN];
    loop {
        let read = tokio::select! {
            _ = done.cancelled() => break,
            read = tokio::time::timeout(idle, from.read(&mut buffer)) => read,
        };
        let n = match read {
            Ok(Ok(0)) => {
                // Half-close: the other direction goes on.
                let _ = tokio::time::timeout(idle, to.shutdown()).await;
                return;
            }
            Ok(Ok(n)) => n,
            Ok(Err(_)) => break,
            Err(_) => {
                let quiet = (start.elapsed().as_millis() as u64)
                    .saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    break;
                }
                continue;
            }
        };
        // A peer that stops reading (a zero window) must not hold the
        // connection past a stop or the idle timeout either.
        let written = tokio::select! {
            _ = done.cancelled() => break,
            written = tokio::time::timeout(idle, async {
                direction.limiter.take(n).await;
                to.write_all(&buffer[..n]).await
            }) => written,
        };
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
        direction.meter.fetch_add(n as u64, Ordering::Relaxed);
        direction.moved.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    // An error, the idle timeout or a stop ends both directions (a peer
    // that reads nothing cannot hold the shutdown either).
    done.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, to.shutdown()).await;
}

/// How long closing a direction may wait for its peer.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_holds_a_direction_near_its_rate() {
        let limiter = Limiter::new(1 << 20);
        let start = Instant::now();
        // One second of burst, then 1 MiB more at 1 MiB/s.
        for _ in 0..32 {
            limiter.take(64 * 1024).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        let unlimited = Limiter::new(0);
        unlimited.take(usize::MAX).await;
    }
}
