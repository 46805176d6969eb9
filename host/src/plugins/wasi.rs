//! What a plugin gets of WASI 0.2 (through `wasmtime-wasi`): enough for a
//! `std` Rust, componentize-py or jco component to start and run, and no
//! way out. Granted: clocks, random, stdout/stderr (captured into the host
//! log under the plugin's name), `wasi:cli/exit`. Linked but empty: no
//! preopened directory (every path fails), no environment, no arguments,
//! stdin at its end, sockets that refuse every use (`access-denied`).
//! Timers never outlast the call: a sleep is cut at the call's deadline,
//! after which the epoch interrupt ends the call. What WASI allocates on
//! the host is bounded too: at most [`MAX_RESOURCES`] handles at once and
//! 1 MiB of random bytes per request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::engine::StoreState;

/// The WASI packages a plugin may import (any 0.2 version: the linker
/// matches them to the newest it has).
pub const GRANTED_PACKAGES: [&str; 6] = [
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// The version of the WASI interfaces the linker defines.
const WASI_VERSION: &str = "0.2.12";

/// Bytes of stdout and of stderr kept per call (the rest is counted).
pub const MAX_STDIO_BYTES: usize = 16 * 1024;

/// WASI handles (streams, pollables, …) one call may hold at once.
pub const MAX_RESOURCES: usize = 10_000;

/// The most random bytes one `get-random-bytes` call may ask for.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Whether `import` is a WASI interface the host links.
pub fn is_granted(import: &str) -> bool {
    GRANTED_PACKAGES.iter().any(|p| import.starts_with(p))
}

/// Adds WASI 0.2 to `linker`, with timers bound to the call's deadline.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // The stock timers would block the calling thread past any deadline
    // (the epoch interrupt only stops wasm code, not a host call asleep).
    linker.allow_shadowing(true);
    let mut clock = linker.instance(&format!("wasi:clocks/monotonic-clock@{WASI_VERSION}"))?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: wasmtime::StoreContextMut<'_, StoreState>, (nanos,): (u64,)| {
            let state = store.data_mut();
            let at = state.timer_at(Duration::from_nanos(nanos));
            Ok((subscribe_sleep(&mut state.table, at)?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: wasmtime::StoreContextMut<'_, StoreState>, (when,): (u64,)| {
            let state = store.data_mut();
            let now = state.wasi.get_or_insert_with(CallWasi::new).clock.now();
            let at = state.timer_at(Duration::from_nanos(when.saturating_sub(now)));
            Ok((subscribe_sleep(&mut state.table, at)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A timer that fires at `at`.
struct Sleep {
    at: tokio::time::Instant,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Sleep {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.at).await;
    }
}

fn subscribe_sleep(
    table: &mut ResourceTable,
    at: tokio::time::Instant,
) -> wasmtime::Result<Resource<DynPollable>> {
    let sleep = table.push(Sleep { at })?;
    wasmtime_wasi::p2::subscribe(table, sleep)
}

/// The WASI state of one call.
pub struct CallWasi {
    pub ctx: WasiCtx,
    pub stdout: Captured,
    pub stderr: Captured,
    /// The call's `wasi:clocks/monotonic-clock`.
    pub clock: Monotonic,
}

/// A monotonic clock counting from the start of the call (a plugin learns
/// nothing of the host's uptime).
#[derive(Clone, Copy)]
pub struct Monotonic {
    origin: std::time::Instant,
}

impl Monotonic {
    pub fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl wasmtime_wasi::HostMonotonicClock for Monotonic {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        Monotonic::now(self)
    }
}

impl CallWasi {
    /// Nothing granted but clocks, random and captured stdio.
    pub fn new() -> Self {
        let stdout = Captured::default();
        let stderr = Captured::default();
        let clock = Monotonic {
            origin: std::time::Instant::now(),
        };
        let ctx = WasiCtx::builder()
            .monotonic_clock(clock)
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        CallWasi {
            ctx,
            stdout,
            stderr,
            clock,
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.get_or_insert_with(CallWasi::new).ctx,
            table: &mut self.table,
        }
    }
}

/// stdout or stderr of one call: the first [`MAX_STDIO_BYTES`] kept, the
/// rest counted; writes never fail or block (a chatty plugin is not
/// broken by its own prints).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<CapturedBytes>>);

#[derive(Default)]
struct CapturedBytes {
    kept: Vec<u8>,
    dropped: u64,
}

impl Captured {
    fn push(&self, bytes: &[u8]) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_STDIO_BYTES.saturating_sub(inner.kept.len());
        let kept = bytes.len().min(room);
        inner.kept.extend_from_slice(&bytes[..kept]);
        inner.dropped += (bytes.len() - kept) as u64;
    }

    /// What was written, and how many bytes past the cap were dropped.
    pub fn take(&self) -> (Vec<u8>, u64) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (
            std::mem::take(&mut inner.kept),
            std::mem::take(&mut inner.dropped),
        )
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Captured {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Captured {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Captured {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
