//! What the host records about requests and sandboxes: idempotency
//! (a retried mutation returns the first attempt's response), audit events,
//! metering in compute unit seconds, and per-org quotas.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::secrets::{self, KeyUse};
use super::{CoreError, Host, lock};
use crate::auth::Principal;
use crate::clock::Millis;
use crate::ids;
use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome};
use crate::store::{
    AuditFilter, AuditRow, IdempotencyBegin, IdempotentRequest, MeterRow, Quota, StoredResponse,
};

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 60 * 60 * 1000;
/// How long a repeat waits for the first attempt of its key to finish.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(15 * 60);
/// A waiter re-reads the record at least this often (the first attempt
/// may belong to another process on the same database).
const IDEMPOTENCY_RECHECK: Duration = Duration::from_millis(500);
/// Most requests that may wait on one key's first attempt at once.
pub const MAX_IDEMPOTENCY_WAITERS: usize = 8;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Whose an idempotency key is: records are per org and per API key, so
/// no other key (with other scopes or another project) can replay them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyOwner {
    pub org_id: String,
    pub key_id: String,
}

impl IdempotencyOwner {
    pub fn of(principal: &Principal) -> Self {
        Self {
            org_id: principal.org_id.clone(),
            key_id: principal.key_id.clone(),
        }
    }

    /// What a sealed response is bound to.
    fn context(&self, key: &str) -> Vec<u8> {
        format!("{}\n{}\n{key}", self.org_id, self.key_id).into_bytes()
    }
}

/// One idempotency record, for waiting on it.
pub type IdempotencySlot = (IdempotencyOwner, String);

/// The requests waiting on one record's first attempt.
#[derive(Debug, Default)]
pub struct Waiters {
    notify: std::sync::Arc<tokio::sync::Notify>,
    count: usize,
}

/// What to do with a mutating request that carries an idempotency key.
#[derive(Debug)]
pub enum Idempotency {
    /// First attempt: do the work, then [`Host::idempotency_complete`].
    Proceed,
    /// Same key and request as an earlier attempt: answer with its response.
    Replay(StoredResponse),
}

/// The fingerprint of a request for idempotency: method, path with query,
/// and body.
/// Records an audit event (for tasks that hold the store, not the host).
/// Failing to record is logged, not fatal to what it describes.
pub(crate) async fn record_audit(
    store: &crate::store::StoreHandle,
    clock: &crate::clock::Clock,
    event: AuditEvent,
) {
    let row = AuditRow {
        id: ids::new(ids::Kind::Audit),
        at: clock.now_ms(),
        org_id: event
            .principal
            .as_ref()
            .map(|p| p.org_id.clone())
            .or(event.org_id),
        project_id: event.principal.as_ref().and_then(|p| p.project_id.clone()),
        actor_key_id: event.principal.as_ref().map(|p| p.key_id.clone()),
        actor: event.actor,
        action: event.action,
        resource_type: Some(event.action.resource()),
        resource_id: event.resource_id,
        outcome: event.outcome,
        status: event.status.map(i64::from),
        request_id: event.request_id,
        details: event.details,
    };
    if row.org_id.is_none() {
        // Nothing names whose event it is: unauthenticated requests
        // write nothing durable.
        tracing::debug!(
            action = row.action.name(),
            "audit event without an org dropped"
        );
        return;
    }
    if let Err(e) = store.call(move |s| s.insert_audit(&row)).await {
        tracing::error!(error = %e, "could not record an audit event");
    }
}

pub fn request_hash(method: &str, path_and_query: &str, body: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(method.as_bytes());
    hasher.update(b"\n");
    hasher.update(path_and_query.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hasher.finalize().to_vec()
}

/// An audit event about to be recorded.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub principal: Option<Principal>,
    pub actor: AuditActor,
    pub action: AuditAction,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    pub status: Option<u16>,
    pub request_id: Option<String>,
    pub details: AuditDetails,
    /// For events without a principal (system, operator, token): the org.
    pub org_id: Option<String>,
}

/// How to group usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Sandbox,
    Project,
    Day,
}

/// One line of a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    /// Sandbox id, project id (`None` for unrestricted keys' sandboxes) or
    /// the UTC day (`YYYY-MM-DD`).
    pub group: Option<String>,
    pub pricing_version: String,
    /// Seconds alive in the window, rounded up per sandbox.
    pub seconds: i64,
    pub compute_unit_seconds: i64,
    /// Egress bytes received and sent in the window (hour buckets).
    pub egress_bytes_in: i64,
    pub egress_bytes_out: i64,
}

impl Host {
    /// Starts or resolves an idempotent request. A repeat of a request still
    /// in flight waits for it (woken when it ends, at most
    /// [`MAX_IDEMPOTENCY_WAITERS`] at once); the same key with another
    /// request is `idempotency_key_reused`.
    pub async fn idempotency_begin(
        &self,
        owner: &IdempotencyOwner,
        key: &str,
        method: &str,
        path: &str,
        hash: Vec<u8>,
    ) -> Result<Idempotency, CoreError> {
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CoreError::invalid(
                "Idempotency-Key",
                format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + IDEMPOTENCY_WAIT;
        let slot: IdempotencySlot = (owner.clone(), key.to_string());
        let mut waiting = false;
        let result = loop {
            // Registered before the store is read, so a completion between
            // the read and the wait still wakes this request.
            let notify = {
                let mut waits = lock(&self.idempotency_waits);
                let entry = waits.entry(slot.clone()).or_default();
                entry.notify.clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.clock.now_ms();
            let (o, k, m, p, h) = (
                owner.clone(),
                key.to_string(),
                method.to_string(),
                path.to_string(),
                hash.clone(),
            );
            let begin = self
                .store
                .call(move |s| {
                    let request = IdempotentRequest {
                        org_id: &o.org_id,
                        key_id: &o.key_id,
                        key: &k,
                        method: &m,
                        path: &p,
                        request_hash: &h,
                    };
                    s.begin_idempotent(&request, now, now - IDEMPOTENCY_TTL_MS)
                })
                .await;
            let record = match begin {
                Err(e) => break Err(e.into()),
                Ok(IdempotencyBegin::Started) => break Ok(Idempotency::Proceed),
                Ok(IdempotencyBegin::Existing(record)) => record,
            };
            if record.request_hash != hash {
                break Err(CoreError::IdempotencyKeyReused(key.to_string()));
            }
            if let Some(response) = record.response {
                break self
                    .unseal(owner, key, response)
                    .await
                    .map(Idempotency::Replay);
            }
            if tokio::time::Instant::now() > deadline {
                break Err(CoreError::IdempotencyInFlight(key.to_string()));
            }
            if !waiting {
                let mut waits = lock(&self.idempotency_waits);
                let entry = waits.entry(slot.clone()).or_default();
                if entry.count >= MAX_IDEMPOTENCY_WAITERS {
                    drop(waits);
                    break Err(CoreError::IdempotencyInFlight(key.to_string()));
                }
                entry.count += 1;
                waiting = true;
            }
            let _ = tokio::time::timeout(IDEMPOTENCY_RECHECK, notified).await;
        };
        let mut waits = lock(&self.idempotency_waits);
        if let Some(entry) = waits.get_mut(&slot) {
            if waiting {
                entry.count = entry.count.saturating_sub(1);
            }
            if entry.count == 0 && std::sync::Arc::strong_count(&entry.notify) == 1 {
                waits.remove(&slot);
            }
        }
        result
    }

    /// Wakes the requests waiting on a record.
    fn idempotency_wake(&self, owner: &IdempotencyOwner, key: &str) {
        let slot: IdempotencySlot = (owner.clone(), key.to_string());
        let waits = lock(&self.idempotency_waits);
        if let Some(entry) = waits.get(&slot) {
            entry.notify.notify_waiters();
        }
    }

    async fn unseal(
        &self,
        owner: &IdempotencyOwner,
        key: &str,
        stored: StoredResponse,
    ) -> Result<StoredResponse, CoreError> {
        let secret = self.server_key(KeyUse::Idempotency).await?;
        let body = secrets::open(&secret, &owner.context(key), &stored.body)?;
        Ok(StoredResponse { body, ..stored })
    }

    /// Stores the response of a first attempt, sealed (it can hold preview
    /// tokens and signed URLs). Server errors are not stored (the key is
    /// released) so that a retry does the work again.
    pub async fn idempotency_complete(
        &self,
        owner: &IdempotencyOwner,
        key: &str,
        response: StoredResponse,
    ) {
        let now = self.clock.now_ms();
        let sealed = match self.server_key(KeyUse::Idempotency).await {
            Ok(secret) => secrets::seal_response(&secret, &owner.context(key), response),
            Err(e) => Err(e),
        };
        let (o, k) = (owner.clone(), key.to_string());
        let result = match sealed {
            Ok(sealed) => self
                .store
                .call(move |s| {
                    if sealed.status >= 500 {
                        s.abandon_idempotent(&o.org_id, &o.key_id, &k)
                    } else {
                        s.complete_idempotent(&o.org_id, &o.key_id, &k, &sealed, now)
                    }
                })
                .await
                .map_err(CoreError::from),
            Err(e) => {
                let (o, k) = (owner.clone(), key.to_string());
                let _ = self
                    .store
                    .call(move |s| s.abandon_idempotent(&o.org_id, &o.key_id, &k))
                    .await;
                Err(e)
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "could not record an idempotent response");
        }
        self.idempotency_wake(owner, key);
    }

    /// Releases a key whose response could not be recorded (streams).
    pub async fn idempotency_abandon(&self, owner: &IdempotencyOwner, key: &str) {
        let (o, k) = (owner.clone(), key.to_string());
        if let Err(e) = self
            .store
            .call(move |s| s.abandon_idempotent(&o.org_id, &o.key_id, &k))
            .await
        {
            tracing::error!(error = %e, "could not release an idempotency key");
        }
        self.idempotency_wake(owner, key);
    }

    /// Records an audit event. Failing to record is logged, not fatal to
    /// the request it describes.
    pub async fn audit(&self, event: AuditEvent) {
        record_audit(&self.store, &self.clock, event).await;
    }

    pub async fn audit_events(
        &self,
        principal: &Principal,
        mut filter: AuditFilter,
    ) -> Result<Vec<AuditRow>, CoreError> {
        filter.org_id = principal.org_id.clone();
        filter.project_id = principal.project_id.clone();
        Ok(self.store.call(move |s| s.list_audit(&filter)).await?)
    }

    /// Compute usage of the caller's sandboxes in `[from, to)`.
    pub async fn usage(
        &self,
        principal: &Principal,
        from: Millis,
        to: Millis,
        group: UsageGroup,
    ) -> Result<Vec<UsageLine>, CoreError> {
        if to <= from {
            return Err(CoreError::invalid("to", "`to` must be after `from`"));
        }
        if to - from > 400 * DAY_MS {
            return Err(CoreError::invalid(
                "from",
                "the window may span at most 400 days",
            ));
        }
        let (org, project) = (principal.org_id.clone(), principal.project_id.clone());
        let (meters, egress) = self
            .store
            .call(move |s| {
                Ok((
                    s.meters(&org, project.as_deref(), from, to)?,
                    s.egress_usage(&org, project.as_deref(), from, to)?,
                ))
            })
            .await?;
        Ok(usage_lines(&meters, &egress, from, to, group))
    }

    /// The key's principal and its org's quota, in one trip to the store
    /// (every request needs both). `None` for an unknown or revoked key.
    pub async fn authenticate(
        &self,
        secret: String,
    ) -> Result<Option<(Principal, Quota)>, CoreError> {
        Ok(self
            .store
            .call(move |s| match crate::auth::authenticate(s, &secret)? {
                Some(principal) => {
                    let quota = s.get_quota(&principal.org_id)?;
                    Ok(Some((principal, quota)))
                }
                None => Ok(None),
            })
            .await?)
    }

    pub(crate) async fn quota(&self, org_id: &str) -> Result<Quota, CoreError> {
        let org = org_id.to_string();
        Ok(self.store.call(move |s| s.get_quota(&org)).await?)
    }

    /// Refuses a create that would exceed the org's concurrent sandbox or
    /// compute quota. The caller holds the admission lock, so two creates
    /// cannot both take the last place.
    pub(crate) async fn check_sandbox_quota(
        &self,
        org_id: &str,
        quota: &Quota,
    ) -> Result<(), CoreError> {
        if let Some(max) = quota.max_concurrent_sandboxes {
            let org = org_id.to_string();
            let live = self.store.call(move |s| s.live_sandbox_count(&org)).await?;
            if live >= max {
                return Err(CoreError::QuotaExceeded {
                    limit: "maxConcurrentSandboxes",
                    max,
                    current: live,
                });
            }
        }
        if let Some(max) = quota.max_compute_unit_seconds {
            let now = self.clock.now_ms();
            let from = month_start(now);
            let org = org_id.to_string();
            let meters = self
                .store
                .call(move |s| s.meters(&org, None, from, now + 1))
                .await?;
            let used: i64 = usage_lines(&meters, &[], from, now + 1, UsageGroup::Sandbox)
                .iter()
                .map(|l| l.compute_unit_seconds)
                .sum();
            if used >= max {
                return Err(CoreError::QuotaExceeded {
                    limit: "maxComputeUnitSeconds",
                    max,
                    current: used,
                });
            }
        }
        Ok(())
    }
}

/// Seconds of `[start, end)` inside `[from, to)`, rounded up.
fn overlap_seconds(start: Millis, end: Millis, from: Millis, to: Millis) -> i64 {
    let lo = start.max(from);
    let hi = end.min(to);
    if hi <= lo { 0 } else { (hi - lo + 999) / 1000 }
}

/// Groups metered lifetimes into usage lines, per pricing version.
pub fn usage_lines(
    meters: &[MeterRow],
    egress: &[crate::store::EgressUsageRow],
    from: Millis,
    to: Millis,
    group: UsageGroup,
) -> Vec<UsageLine> {
    let mut lines: BTreeMap<(Option<String>, String), (i64, i64)> = BTreeMap::new();
    for meter in meters {
        let mut add = |key: Option<String>, seconds: i64| {
            if seconds > 0 {
                let entry = lines
                    .entry((key, meter.pricing_version.clone()))
                    .or_default();
                entry.0 += seconds;
                entry.1 += seconds * meter.vcpus;
            }
        };
        let seconds = overlap_seconds(meter.started_at, meter.metered_until, from, to);
        match group {
            UsageGroup::Sandbox => add(Some(meter.sandbox_id.clone()), seconds),
            UsageGroup::Project => add(meter.project_id.clone(), seconds),
            UsageGroup::Day => {
                let mut day = meter.started_at.max(from).div_euclid(DAY_MS) * DAY_MS;
                let end = meter.metered_until.min(to);
                while day < end {
                    let s = overlap_seconds(
                        meter.started_at,
                        meter.metered_until,
                        day.max(from),
                        (day + DAY_MS).min(to),
                    );
                    add(Some(crate::clock::rfc3339(day)[..10].to_string()), s);
                    day += DAY_MS;
                }
            }
        }
    }
    let mut out: Vec<UsageLine> = lines
        .into_iter()
        .map(|((group, pricing_version), (seconds, cus))| UsageLine {
            group,
            pricing_version,
            seconds,
            compute_unit_seconds: cus,
            egress_bytes_in: 0,
            egress_bytes_out: 0,
        })
        .collect();
    // Egress goes on the first line of its group (a sandbox that moved
    // bytes in an hour was alive then; a line is added if its time fell
    // outside the window).
    for row in egress {
        let key = match group {
            UsageGroup::Sandbox => Some(row.sandbox_id.clone()),
            UsageGroup::Project => row.project_id.clone(),
            UsageGroup::Day => Some(crate::clock::rfc3339(row.hour)[..10].to_string()),
        };
        let index = match out.iter().position(|l| l.group == key) {
            Some(index) => index,
            None => {
                let pricing_version = meters
                    .iter()
                    .find(|m| m.sandbox_id == row.sandbox_id)
                    .map_or_else(
                        || crate::store::PRICING_VERSION.to_string(),
                        |m| m.pricing_version.clone(),
                    );
                out.push(UsageLine {
                    group: key,
                    pricing_version,
                    seconds: 0,
                    compute_unit_seconds: 0,
                    egress_bytes_in: 0,
                    egress_bytes_out: 0,
                });
                out.len() - 1
            }
        };
        out[index].egress_bytes_in = out[index].egress_bytes_in.saturating_add(row.bytes_in);
        out[index].egress_bytes_out = out[index].egress_bytes_out.saturating_add(row.bytes_out);
    }
    out
}

/// The first millisecond of the UTC calendar month containing `now`.
pub fn month_start(now: Millis) -> Millis {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now) * 1_000_000) else {
        return 0;
    };
    let Ok(first) = time::Date::from_calendar_date(t.year(), t.month(), 1) else {
        return 0;
    };
    (first.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(id: &str, start: Millis, until: Millis, vcpus: i64) -> MeterRow {
        MeterRow {
            sandbox_id: id.into(),
            project_id: None,
            vcpus,
            pricing_version: "v1".into(),
            started_at: start,
            metered_until: until,
        }
    }

    #[test]
    fn usage_is_vcpus_times_seconds_rounded_up_per_sandbox() {
        let meters = [meter("a", 0, 10_001, 2), meter("b", 500, 1_000, 1)];
        let lines = usage_lines(&meters, &[], 0, 100_000, UsageGroup::Sandbox);
        assert_eq!(lines[0].seconds, 11);
        assert_eq!(lines[0].compute_unit_seconds, 22);
        assert_eq!(lines[1].seconds, 1);
    }

    #[test]
    fn egress_bytes_go_on_their_groups_line() {
        let egress = |id: &str, hour: Millis, bytes_in: i64| crate::store::EgressUsageRow {
            sandbox_id: id.into(),
            project_id: None,
            hour,
            bytes_in,
            bytes_out: 1,
        };
        let meters = [meter("a", 0, 3 * HOUR, 1), meter("b", 0, 10_000, 1)];
        let rows = [
            egress("a", 0, 100),
            egress("a", HOUR, 50),
            egress("c", 0, 7),
        ];
        let lines = usage_lines(&meters, &rows, 0, 4 * HOUR, UsageGroup::Sandbox);
        let line = |id: &str| {
            lines
                .iter()
                .find(|l| l.group.as_deref() == Some(id))
                .expect(id)
        };
        assert_eq!(
            (line("a").egress_bytes_in, line("a").egress_bytes_out),
            (150, 2)
        );
        assert_eq!(line("b").egress_bytes_in, 0);
        assert_eq!((line("c").seconds, line("c").egress_bytes_in), (0, 7));
        let by_day = usage_lines(&meters, &rows, 0, 4 * HOUR, UsageGroup::Day);
        assert_eq!(by_day.len(), 1);
        assert_eq!(by_day[0].egress_bytes_in, 157);
    }

    const HOUR: Millis = 60 * 60 * 1000;

    #[test]
    fn usage_is_clipped_to_the_window() {
        let lines = usage_lines(
            &[meter("a", 0, 60_000, 1)],
            &[],
            30_000,
            40_000,
            UsageGroup::Sandbox,
        );
        assert_eq!(lines[0].seconds, 10);
    }

    #[test]
    fn usage_by_day_splits_at_utc_midnight() {
        let lines = usage_lines(
            &[meter("a", DAY_MS - 5_000, DAY_MS + 7_000, 1)],
            &[],
            0,
            3 * DAY_MS,
            UsageGroup::Day,
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].group.as_deref(), Some("1970-01-01"));
        assert_eq!(lines[0].seconds, 5);
        assert_eq!(lines[1].group.as_deref(), Some("1970-01-02"));
        assert_eq!(lines[1].seconds, 7);
    }

    #[test]
    fn month_start_is_the_first_of_the_utc_month() {
        let now = crate::clock::parse_rfc3339("2026-11-22T07:10:00Z").expect("time");
        assert_eq!(
            crate::clock::rfc3339(month_start(now)),
            "2026-11-01T00:00:00.000Z"
        );
    }

    #[test]
    fn request_hash_depends_on_every_part() {
        let base = request_hash("POST", "/v1/x", b"{}");
        assert_ne!(base, request_hash("PUT", "/v1/x", b"{}"));
        assert_ne!(base, request_hash("POST", "/v1/y", b"{}"));
        assert_ne!(base, request_hash("POST", "/v1/x", b"{ }"));
    }
}
