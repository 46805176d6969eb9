//! The core's side of egress: starts a live sandbox's relay, records what
//! it reports (refusals as rate-limited `egress_denied` audit events, byte
//! meters in the store), narrows a live sandbox's policy, and gives its
//! programs the proxy variables.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crownest_proto::{EGRESS_HTTP_PORT, EGRESS_SOCKS_PORT};
use tokio::sync::mpsc;

use super::{CoreError, Host, LiveSandbox, ledger, lock};
use crate::auth::Principal;
use crate::egress::{EgressEvent, SandboxEgress, relay};
use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome};
use crate::templates::Template;

/// `egress_denied` audit events one sandbox may write per window; more
/// are counted in the log only.
const AUDITS_PER_WINDOW: u32 = 20;
const AUDIT_WINDOW: Duration = Duration::from_secs(60);
/// How often ended connections' bytes are written to the store.
const METER_FLUSH: Duration = Duration::from_secs(1);

/// The variables every command and code context of a sandbox with egress
/// gets: pip, npm, curl, git, `urllib` and `requests` honour them.
pub(crate) fn proxy_env(template: &Template) -> Vec<(String, String)> {
    if !template.network.is_enabled() {
        return Vec::new();
    }
    let http = format!("http://127.0.0.1:{EGRESS_HTTP_PORT}");
    let socks = format!("socks5h://127.0.0.1:{EGRESS_SOCKS_PORT}");
    let mut env = Vec::new();
    for (key, value) in [
        ("HTTP_PROXY", http.as_str()),
        ("HTTPS_PROXY", http.as_str()),
        ("ALL_PROXY", socks.as_str()),
        ("NO_PROXY", "localhost,127.0.0.1,::1"),
    ] {
        env.push((key.to_owned(), value.to_owned()));
        env.push((key.to_ascii_lowercase(), value.to_owned()));
    }
    env
}

impl Host {
    /// Starts the relay of a sandbox whose template lets anything out (a
    /// sandbox narrowed to `none` still gets one, refusing everything, so
    /// a later PATCH within the template takes effect at once).
    pub(crate) fn start_egress(&self, live: &LiveSandbox) -> Option<Arc<SandboxEgress>> {
        let template = live.template.clone();
        if !template.network.is_enabled() {
            return None;
        }
        let settings = Arc::new(self.config.egress.clone());
        // The stored policy within the template as it is now: a restarted
        // host applies an operator's tightening, and a rule's right to a
        // private address comes from the template, never from the store.
        let policy = template.network.renarrow(&live.row.network);
        let egress = Arc::new(SandboxEgress::new(
            policy,
            &settings,
            u64::try_from(live.row.egress_bytes_in).unwrap_or(0),
            u64::try_from(live.row.egress_bytes_out).unwrap_or(0),
        ));
        // Refusals go through a bounded queue (they are audited at a
        // bounded rate anyway); ended connections' bytes add up in memory
        // and are written at most once a second, so a sandbox opening
        // connections in a loop makes no write per connection.
        let (refusals, mut received) = mpsc::channel::<(String, crate::egress::Refusal)>(256);
        let pending = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let counted = pending.clone();
        let ended = Arc::new(tokio::sync::Notify::new());
        let wake = ended.clone();
        let report: Arc<dyn Fn(EgressEvent) + Send + Sync> = Arc::new(move |event| match event {
            EgressEvent::Refused { target, refusal } => {
                let _ = refusals.try_send((target, refusal));
            }
            EgressEvent::Closed {
                bytes_in,
                bytes_out,
            } => {
                counted.0.fetch_add(bytes_in, Ordering::Relaxed);
                counted.1.fetch_add(bytes_out, Ordering::Relaxed);
                wake.notify_one();
            }
        });
        let stopping = live.stopping.clone();
        relay::spawn(
            live.agent.clone(),
            egress.clone(),
            settings,
            stopping.clone(),
            report,
        );
        let (store, clock) = (self.store.clone(), self.clock.clone());
        let (id, org) = (live.row.id.clone(), live.row.org_id.clone());
        tokio::spawn(async move {
            let flush = |store: crate::store::StoreHandle, id: String, now| {
                let (bytes_in, bytes_out) = (
                    pending.0.swap(0, Ordering::Relaxed),
                    pending.1.swap(0, Ordering::Relaxed),
                );
                async move {
                    if bytes_in == 0 && bytes_out == 0 {
                        return;
                    }
                    if let Err(e) = store
                        .call(move |s| s.add_egress_bytes(&id, bytes_in, bytes_out, now))
                        .await
                    {
                        tracing::warn!(error = %e, "could not record egress bytes");
                    }
                }
            };
            let mut tick = tokio::time::interval(METER_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let now = tokio::time::Instant::now();
            let mut flushed = now.checked_sub(METER_FLUSH).unwrap_or(now);
            let mut window = (tokio::time::Instant::now(), 0u32, 0u64);
            loop {
                let (target, refusal) = tokio::select! {
                    // A connection ended: written now unless a write was
                    // made within the last second (then the tick writes).
                    _ = ended.notified(), if flushed.elapsed() >= METER_FLUSH => {
                        flush(store.clone(), id.clone(), clock.now_ms()).await;
                        flushed = tokio::time::Instant::now();
                        continue;
                    }
                    _ = tick.tick() => {
                        flush(store.clone(), id.clone(), clock.now_ms()).await;
                        flushed = tokio::time::Instant::now();
                        continue;
                    }
                    _ = stopping.cancelled() => {
                        // Connections end with the sandbox: give them a
                        // moment to count their last bytes.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        flush(store.clone(), id.clone(), clock.now_ms()).await;
                        return;
                    }
                    refused = received.recv() => match refused {
                        Some(refused) => refused,
                        None => {
                            flush(store.clone(), id.clone(), clock.now_ms()).await;
                            return;
                        }
                    },
                };
                if window.0.elapsed() >= AUDIT_WINDOW {
                    if window.2 > 0 {
                        tracing::warn!(sandbox = %id, suppressed = window.2, "egress_denied audit events suppressed");
                    }
                    window = (tokio::time::Instant::now(), 0, 0);
                }
                if window.1 >= AUDITS_PER_WINDOW {
                    window.2 += 1;
                    continue;
                }
                window.1 += 1;
                tracing::info!(sandbox = %id, %target, code = refusal.code, reason = %refusal.reason, "egress refused");
                let event = ledger::AuditEvent {
                    principal: None,
                    actor: AuditActor::System,
                    action: AuditAction::EgressDenied,
                    resource_id: Some(id.clone()),
                    outcome: AuditOutcome::Denied,
                    status: None,
                    request_id: None,
                    details: AuditDetails {
                        sandbox_id: Some(id.clone()),
                        error_code: Some(refusal.code.to_owned()),
                        target: Some(target),
                        message: Some(refusal.reason.chars().take(500).collect()),
                        ..AuditDetails::default()
                    },
                    org_id: Some(org.clone()),
                };
                ledger::record_audit(&store, &clock, event).await;
            }
        });
        Some(egress)
    }

    /// Replaces a live sandbox's egress policy with one within its
    /// template's; new connections follow it at once.
    pub async fn set_sandbox_network(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        request: super::NetworkRequest,
    ) -> Result<crate::store::SandboxRow, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let template = live.template.clone();
        // Within a `none` template only `none` passes, and such a sandbox
        // has no relay: the stored policy is all there is to change.
        let policy = request.within(&template.network)?;
        let _changing = match &live.egress {
            Some(egress) => Some(egress.changing.lock().await),
            None => None,
        };
        let id = sandbox.id.clone();
        let stored = policy.clone();
        self.store
            .call(move |s| s.set_sandbox_network(&id, &stored))
            .await?;
        if let Some(egress) = &live.egress {
            egress.set_policy(policy);
        }
        self.get_sandbox(principal, sandbox_id).await
    }

    /// A sandbox's egress meters now: a live one's run ahead of the store.
    pub fn egress_bytes(&self, row: &crate::store::SandboxRow) -> (u64, u64) {
        match self.live_egress(&row.id) {
            Some(egress) => egress.bytes(),
            None => (
                u64::try_from(row.egress_bytes_in).unwrap_or(0),
                u64::try_from(row.egress_bytes_out).unwrap_or(0),
            ),
        }
    }

    /// A sandbox's egress policy now (a live one's may have been patched).
    pub fn egress_policy(&self, row: &crate::store::SandboxRow) -> crate::egress::Policy {
        self.live_egress(&row.id)
            .map_or_else(|| row.network.clone(), |e| e.policy())
    }

    fn live_egress(&self, id: &str) -> Option<Arc<SandboxEgress>> {
        lock(&self.live).get(id).and_then(|l| l.egress.clone())
    }
}
