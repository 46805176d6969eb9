//! Live resource figures of a sandbox: CPU, memory and tasks from its
//! cgroup where its driver has one (the host kernel's accounting), else
//! from its agent (a VM guest's own view); /workspace from the agent; egress
//! bytes from the host's proxy meters.

use std::time::{Duration, Instant};

use super::{CoreError, Host, lock};
use crate::auth::Principal;
use crate::clock::Millis;

/// A CPU percentage needs two readings this far apart at least; a client
/// asking again sooner (or for the first time) gets a fresh interval of
/// this length.
const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// An earlier reading older than this is not "the last interval".
const MAX_INTERVAL: Duration = Duration::from_secs(10);

/// A sandbox's resources now.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxMetrics {
    pub sandbox_id: String,
    pub at: Millis,
    /// CPU time used since it started.
    pub cpu_usec: u64,
    /// CPU use over the last interval; 100 is one CPU busy.
    pub cpu_percent: f64,
    pub vcpus: i64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub tasks: u64,
    pub tasks_limit: u64,
    pub workspace_used_bytes: u64,
    pub workspace_limit_bytes: u64,
    pub network_bytes_in: u64,
    pub network_bytes_out: u64,
}

/// One CPU reading.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuReading {
    at: Instant,
    usec: u64,
}

impl Host {
    /// The resources a live sandbox uses now.
    pub async fn sandbox_metrics(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SandboxMetrics, CoreError> {
        let (row, live) = self.usable_sandbox(principal, id).await?;
        let driver = self.driver(&row.runtime)?.clone();
        let stats = live.agent.stats().await?;
        let cgroup = driver.cgroup_sample(&row.id);
        let mut usec = cgroup.map_or(stats.cpu_usec, |c| c.cpu_usec);
        let mut now = Instant::now();
        let previous = lock(&self.cpu_readings)
            .get(&row.id)
            .copied()
            .filter(|r| (MIN_INTERVAL..=MAX_INTERVAL).contains(&now.duration_since(r.at)));
        let since = match previous {
            Some(reading) => reading,
            None => {
                let first = CpuReading { at: now, usec };
                tokio::time::sleep(MIN_INTERVAL).await;
                usec = match driver.cgroup_sample(&row.id) {
                    Some(sample) => sample.cpu_usec,
                    None => live.agent.stats().await?.cpu_usec,
                };
                now = Instant::now();
                first
            }
        };
        lock(&self.cpu_readings).insert(row.id.clone(), CpuReading { at: now, usec });
        let elapsed = now.duration_since(since.at).as_secs_f64();
        let cpu_percent = if elapsed > 0.0 {
            (usec.saturating_sub(since.usec) as f64 / 1e6) / elapsed * 100.0
        } else {
            0.0
        };
        let template = &live.template;
        let memory_limit = cgroup
            .and_then(|c| c.memory_limit_bytes)
            .or((stats.memory_total_bytes > 0).then_some(stats.memory_total_bytes))
            .unwrap_or(template.resources.memory_mib * 1024 * 1024);
        let (network_bytes_in, network_bytes_out) = self.egress_bytes(&row);
        Ok(SandboxMetrics {
            sandbox_id: row.id.clone(),
            at: self.clock.now_ms(),
            cpu_usec: usec,
            // Rounded to what a reading's resolution supports.
            cpu_percent: (cpu_percent * 10.0).round() / 10.0,
            vcpus: row.vcpus,
            memory_bytes: cgroup.map_or(stats.memory_used_bytes, |c| c.memory_bytes),
            memory_limit_bytes: memory_limit,
            tasks: cgroup.map_or(stats.tasks, |c| c.tasks),
            tasks_limit: cgroup
                .and_then(|c| c.tasks_limit)
                .unwrap_or(u64::try_from(template.resources.pids).unwrap_or(0)),
            workspace_used_bytes: stats.workspace_used_bytes,
            workspace_limit_bytes: if stats.workspace_total_bytes > 0 {
                stats.workspace_total_bytes
            } else {
                template.resources.disk_mib * 1024 * 1024
            },
            network_bytes_in,
            network_bytes_out,
        })
    }

    /// Forgets a destroyed sandbox's CPU reading.
    pub(crate) fn forget_cpu_reading(&self, id: &str) {
        lock(&self.cpu_readings).remove(id);
    }
}
