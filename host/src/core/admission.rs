//! Admission control in the core: per-key request rates (a token bucket per
//! API key), and counted places for long-lived streams per org. Both are
//! in memory and bounded by the number of real keys and orgs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CoreError, Host, lock};

/// A bucket idle this long is forgotten (it would be full again anyway).
const IDLE: Duration = Duration::from_secs(60);
/// Forgetting idle buckets is done when the map is this large.
const PRUNE_AT: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by API key id.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token of `key`'s bucket (`rate` per second, up to `burst`);
    /// when empty, how long until one is back.
    fn take(&self, key: &str, rate: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(rate), f64::from(burst.max(1)));
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= PRUNE_AT {
            buckets.retain(|_, b| now.duration_since(b.at) < IDLE);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

/// A counted place (a log stream of an org); given back when dropped.
pub struct StreamPlace {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    /// The org (log streams) or sandbox (file watches) it counts against.
    org_id: String,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.org_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.org_id);
            }
        }
    }
}

impl Host {
    /// Admits one request of an API key, or says when to retry.
    pub fn admit_request(&self, key_id: &str) -> Result<(), CoreError> {
        let limits = &self.config.limits;
        self.rate_limiter
            .take(
                key_id,
                limits.rate_limit_per_key,
                limits.rate_burst_per_key,
                Instant::now(),
            )
            .map_err(|wait| CoreError::RateLimited {
                retry_after_ms: wait.as_millis().max(1) as u64,
            })
    }

    /// Takes one of a sandbox's places for a file watch.
    pub fn watch_place(&self, sandbox_id: &str) -> Result<StreamPlace, CoreError> {
        let max = super::files::MAX_WATCHES_PER_SANDBOX;
        let mut counts = lock(&self.watches);
        let n = counts.entry(sandbox_id.to_string()).or_default();
        if *n >= max {
            return Err(CoreError::TooManyWatches {
                sandbox_id: sandbox_id.to_string(),
                max,
            });
        }
        *n += 1;
        Ok(StreamPlace {
            counts: self.watches.clone(),
            org_id: sandbox_id.to_string(),
        })
    }

    /// Takes one of the org's places for a long-lived log stream.
    pub fn log_stream_place(&self, org_id: &str) -> Result<StreamPlace, CoreError> {
        let max = self.config.limits.max_log_streams_per_org;
        let mut counts = lock(&self.log_streams);
        let n = counts.entry(org_id.to_string()).or_default();
        if *n >= max {
            return Err(CoreError::TooManyStreams { max });
        }
        *n += 1;
        Ok(StreamPlace {
            counts: self.log_streams.clone(),
            org_id: org_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = RateLimiter::default();
        let start = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take("k", 10, 5, start).is_ok());
        }
        let wait = limiter.take("k", 10, 5, start).expect_err("empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limiter
                .take("k", 10, 5, start + Duration::from_millis(100))
                .is_ok()
        );
        // Another key has its own bucket; rate 0 is unlimited.
        assert!(limiter.take("other", 10, 5, start).is_ok());
        for _ in 0..100 {
            assert!(limiter.take("free", 0, 0, start).is_ok());
        }
    }
}
