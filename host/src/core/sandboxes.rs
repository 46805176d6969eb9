//! Sandbox lifecycle: create (build the template if needed, reserve a uid
//! slot, start the container, connect to its agent), read, list, destroy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use super::slots::{self, SlotLock};
use super::{CoreError, Host, LiveSandbox, MAX_SLOTS, lock};
use crate::agent::AgentClient;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::config::Limits;
use crate::ids;
use crate::model::{EndReason, Metadata, SandboxStatus};
use crate::runtime::SandboxSpec;
use crate::store::{Cursor, SandboxFilter, SandboxRow};
use crate::templates::Template;

/// The most `metadata[KEY]=VALUE` filters one list may have.
pub const MAX_METADATA_FILTERS: usize = 16;

/// A request to create a sandbox, as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct CreateSandbox {
    pub template: String,
    pub ttl_ms: Option<i64>,
    pub metadata: Metadata,
    /// A narrower egress policy than the template's.
    pub network: Option<NetworkRequest>,
    /// Environment of every command and context of the sandbox, over the
    /// template's `env` (a request's own `env` overrides it in turn).
    pub env: Vec<(String, String)>,
}

/// A sandbox's egress policy as a client asks for it: each part omitted
/// keeps the template's (deny rules are added to the template's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkRequest {
    pub mode: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl NetworkRequest {
    /// The policy within `ceiling` (the template's), or why not.
    pub fn within(
        &self,
        ceiling: &crate::egress::Policy,
    ) -> Result<crate::egress::Policy, CoreError> {
        use crate::egress::{Mode, Rule};
        let mode = match &self.mode {
            None => None,
            Some(text) => Some(Mode::parse(text).ok_or_else(|| {
                CoreError::invalid(
                    "network.mode",
                    format!(
                        "`{}` is not a network mode; use \"none\", \"allow\" or \"open\"",
                        text.escape_debug()
                    ),
                )
            })?),
        };
        let allow = match &self.allow {
            None => None,
            Some(items) => Some(
                Rule::parse_list("network.allow", items)
                    .map_err(|e| CoreError::invalid("network.allow", e))?,
            ),
        };
        let deny = Rule::parse_list("network.deny", &self.deny)
            .map_err(|e| CoreError::invalid("network.deny", e))?;
        ceiling
            .narrow(mode, allow, deny)
            .map_err(CoreError::NetworkPolicyTooWide)
    }
}

/// A request that passed [`CreateSandbox::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreateSandbox {
    pub template: String,
    pub ttl_ms: i64,
    pub metadata: Metadata,
    pub network: Option<NetworkRequest>,
    pub env: Vec<(String, String)>,
}

impl CreateSandbox {
    pub fn validate(self, limits: &Limits) -> Result<ValidCreateSandbox, CoreError> {
        let ttl_ms = self.ttl_ms.unwrap_or(limits.default_ttl_ms);
        if ttl_ms < limits.min_ttl_ms || ttl_ms > limits.max_ttl_ms {
            return Err(CoreError::invalid(
                "ttlMs",
                format!(
                    "ttlMs must be between {} and {} milliseconds, got {ttl_ms}",
                    limits.min_ttl_ms, limits.max_ttl_ms
                ),
            ));
        }
        let size = serde_json::to_vec(&self.metadata).map_or(usize::MAX, |v| v.len());
        if size > limits.max_metadata_bytes {
            return Err(CoreError::invalid(
                "metadata",
                format!(
                    "metadata is {size} bytes serialized; the limit is {}",
                    limits.max_metadata_bytes
                ),
            ));
        }
        if self.template.is_empty() || self.template.len() > 64 {
            return Err(CoreError::invalid(
                "template",
                "template must be a template name of 1 to 64 characters; see GET /v1/templates",
            ));
        }
        super::commands::validate_env(&self.env)?;
        Ok(ValidCreateSandbox {
            template: self.template,
            ttl_ms,
            metadata: self.metadata,
            network: self.network,
            env: self.env,
        })
    }
}

impl Host {
    /// Creates and starts a sandbox. Either it comes back `running`, or
    /// nothing is left of it but a `destroyed` tombstone and the error.
    pub async fn create_sandbox(
        &self,
        principal: &Principal,
        request: CreateSandbox,
    ) -> Result<SandboxRow, CoreError> {
        let ValidCreateSandbox {
            template,
            ttl_ms,
            metadata,
            network,
            env,
        } = request.validate(&self.config.limits)?;
        let template = Arc::new(self.template(&template)?);
        let network = match &network {
            None => template.network.clone(),
            Some(request) => request.within(&template.network)?,
        };
        if let Some(reason) = self.runtimes.unavailable(template.runtime) {
            return Err(CoreError::RuntimeUnavailable {
                template: template.name.clone(),
                runtime: template.runtime.kind(),
                reason: reason.to_string(),
            });
        }
        self.ensure_rootfs(&template).await?;
        self.prepare_runtime(&template).await?;

        let id = ids::new(ids::Kind::Sandbox);
        let env_sealed = if env.is_empty() {
            None
        } else {
            let key = self.server_key(super::secrets::KeyUse::SandboxEnv).await?;
            let plain =
                serde_json::to_vec(&env).map_err(|e| CoreError::ServerKey(e.to_string()))?;
            Some(super::secrets::seal(&key, id.as_bytes(), &plain)?)
        };

        let quota = self.quota(&principal.org_id).await?;
        let admission = self.admission.lock().await;
        self.check_sandbox_quota(&principal.org_id, &quota).await?;
        let (slot, slot_lock) = self.reserve_slot().await?;
        let now = self.clock.now_ms();
        let row = SandboxRow {
            id,
            org_id: principal.org_id.clone(),
            project_id: principal.project_id.clone(),
            template: template.name.clone(),
            template_hash: template.recipe_hash(),
            status: SandboxStatus::Starting,
            metadata,
            created_at: now,
            expires_at: now + ttl_ms,
            ended_at: None,
            end_reason: None,
            uid_slot: slot,
            vcpus: i64::from(template.resources.vcpus),
            memory_mib: template.resources.memory_mib as i64,
            created_by_key: principal.key_id.clone(),
            runtime: template.runtime.kind().to_string(),
            vmm: template.runtime.vmm().map(|v| v.as_str().to_string()),
            network,
            egress_bytes_in: 0,
            egress_bytes_out: 0,
            env_sealed,
        };
        let inserted = {
            let row = row.clone();
            self.store.call(move |s| s.insert_sandbox(&row)).await
        };
        self.release_slot(slot);
        drop(admission);
        inserted?;

        match self.start_container(&row, template, env).await {
            Ok(mut live) => {
                live.egress = self.start_egress(&live);
                *lock(&live.slot) = Some(slot_lock);
                lock(&self.live).insert(row.id.clone(), Arc::new(live));
                let id = row.id.clone();
                self.store
                    .call(move |s| s.set_sandbox_status(&id, SandboxStatus::Running))
                    .await?;
                Ok(SandboxRow {
                    status: SandboxStatus::Running,
                    ..row
                })
            }
            Err(e) => {
                tracing::warn!(sandbox = %row.id, error = %e, "sandbox failed to start");
                let state_dir = self.state_dir(&row.id);
                if let Err(d) = self
                    .driver(&row.runtime)?
                    .destroy(&row.id, &state_dir)
                    .await
                {
                    tracing::warn!(sandbox = %row.id, error = %d, "cleanup after failed start");
                }
                let id = row.id.clone();
                let ended = self.clock.now_ms();
                self.store
                    .call(move |s| s.end_sandbox(&id, EndReason::Failed, ended))
                    .await?;
                Err(e)
            }
        }
    }

    async fn start_container(
        &self,
        row: &SandboxRow,
        template: Arc<Template>,
        env: Vec<(String, String)>,
    ) -> Result<LiveSandbox, CoreError> {
        let state_dir = self.state_dir(&row.id);
        let spec = SandboxSpec {
            isolation: template.runtime,
            id: row.id.clone(),
            rootfs: self.rootfs.path_for(&template),
            state_dir: state_dir.clone(),
            agent_binary: self.config.agent_binary.clone(),
            resources: template.resources.clone(),
            // Loopback only, whatever the policy: egress goes through the
            // agent's proxy and the host (`crate::egress`).
            network: crate::runtime::NetworkMode::None,
            uid_slot: row.uid_slot as u32,
            user: template.user.clone(),
        };
        let started = self.driver(&row.runtime)?.start(&spec).await?;
        let timeout = Duration::from_millis(self.config.limits.agent_connect_timeout_ms)
            .max(started.boot_timeout.unwrap_or_default());
        let agent = connect_agent(started.channel.as_ref(), timeout, &self.config.limits).await?;
        // A workdir inside /workspace (an empty tmpfs at start) is made
        // now, owned by the template's user.
        if template.workdir != crownest_proto::WORKSPACE
            && std::path::Path::new(&template.workdir).starts_with(crownest_proto::WORKSPACE)
        {
            let relative = super::files::normalize_path(&template.workdir)?;
            let owner = crownest_proto::ExecUser {
                uid: template.user.uid,
                gid: template.user.gid,
            };
            agent
                .file_mkdir(&relative, true, Some(owner))
                .await
                .map_err(|e| {
                    CoreError::StartFailed(format!(
                        "cannot create the workdir {}: {e}",
                        template.workdir
                    ))
                })?;
        }
        Ok(LiveSandbox {
            id: row.id.clone(),
            row: SandboxRow {
                status: SandboxStatus::Running,
                ..row.clone()
            },
            agent,
            channel: started.channel,
            state_dir,
            stopping: CancellationToken::new(),
            slot: Mutex::new(None),
            egress: None,
            template,
            env,
        })
    }

    /// The current version of a template, by name.
    pub(crate) fn template(&self, name: &str) -> Result<Template, CoreError> {
        let templates = self.templates();
        templates
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::UnknownTemplate {
                name: name.to_string(),
                available: templates.names().collect::<Vec<_>>().join(", "),
            })
    }

    /// The template a sandbox runs: the version it started with while it
    /// is live, else the current one of its name.
    pub(crate) fn template_of(&self, sandbox: &SandboxRow) -> Result<Arc<Template>, CoreError> {
        match self.live_sandbox(&sandbox.id) {
            Some(live) => Ok(live.template.clone()),
            None => self.template(&sandbox.template).map(Arc::new),
        }
    }

    /// A sandbox's own environment, opened from its sealed store form.
    pub(crate) async fn open_sandbox_env(
        &self,
        row: &SandboxRow,
    ) -> Result<Vec<(String, String)>, CoreError> {
        let Some(sealed) = &row.env_sealed else {
            return Ok(Vec::new());
        };
        let key = self.server_key(super::secrets::KeyUse::SandboxEnv).await?;
        let plain = super::secrets::open(&key, row.id.as_bytes(), sealed)?;
        serde_json::from_slice(&plain).map_err(|e| CoreError::ServerKey(e.to_string()))
    }

    /// Builds the template's rootfs if it is not in the cache yet. Concurrent
    /// creates of one template wait for a single build.
    pub async fn ensure_rootfs(&self, template: &Template) -> Result<(), CoreError> {
        if self.rootfs.is_built(template) {
            return self.check_built(template);
        }
        let gate = {
            let mut builds = self.builds.lock().await;
            builds
                .entry(template.name.clone())
                .or_insert_with(|| Arc::new(AsyncMutex::new(())))
                .clone()
        };
        let _building = gate.lock().await;
        if self.rootfs.is_built(template) {
            return self.check_built(template);
        }
        tracing::info!(template = %template.name, "building template rootfs (first use)");
        // In a task of its own: a create whose client goes away must not
        // stop a build half-way (its steps would race the next attempt).
        let (cache, owned) = (self.rootfs.clone(), template.clone());
        let build = tokio::spawn(async move { cache.build(&owned, false).await });
        let failed = |message: String| CoreError::TemplateBuild {
            template: template.name.clone(),
            message,
        };
        build
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        self.check_built(template)
    }

    /// What only the built rootfs can show: the languages' interpreters and
    /// the workdir are there.
    fn check_built(&self, template: &Template) -> Result<(), CoreError> {
        template
            .check_rootfs(&self.rootfs.path_for(template))
            .map_err(|e| CoreError::TemplateBuild {
                template: template.name.clone(),
                message: e.to_string(),
            })
    }

    /// Lets the template's driver derive what it boots from the rootfs (a
    /// microVM's disk image and kernel; nothing for containers), once.
    async fn prepare_runtime(&self, template: &Template) -> Result<(), CoreError> {
        let rootfs = self.rootfs.path_for(template);
        self.driver(template.runtime.kind())?
            .prepare(template.runtime, &rootfs, false)
            .await
            .map_err(|e| CoreError::TemplateBuild {
                template: template.name.clone(),
                message: e.to_string(),
            })
    }

    /// A uid slot no live sandbox of this host uses and no other process
    /// on the machine holds; held until the returned lock is dropped.
    async fn reserve_slot(&self) -> Result<(i64, SlotLock), CoreError> {
        let used = self.store.call(|s| s.used_uid_slots()).await?;
        // Sandboxes of a host that is down (restarting) hold no lock but
        // still run as their range's uids.
        let running = tokio::task::spawn_blocking(slots::in_use)
            .await
            .unwrap_or_default();
        let mut reserved = lock(&self.reserved_slots);
        for slot in (0..MAX_SLOTS)
            .filter(|n| !used.contains(n) && !reserved.contains(n) && !running.contains(n))
        {
            match slots::try_hold(&self.slot_dir, slot) {
                Ok(Some(held)) => {
                    reserved.push(slot);
                    return Ok((slot, held));
                }
                Ok(None) => continue,
                Err(e) => {
                    return Err(CoreError::StartFailed(format!(
                        "cannot hold uid slot {slot} in {}: {e}",
                        self.slot_dir.display()
                    )));
                }
            }
        }
        Err(CoreError::Capacity(used.len()))
    }

    fn release_slot(&self, slot: i64) {
        lock(&self.reserved_slots).retain(|s| *s != slot);
    }

    /// A sandbox the caller may see, destroyed or not.
    pub async fn get_sandbox(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SandboxRow, CoreError> {
        let not_found = || CoreError::NotFound {
            kind: "sandbox",
            id: id.to_string(),
        };
        if !ids::is_valid(ids::Kind::Sandbox, id) {
            return Err(not_found());
        }
        let scope = principal.scope();
        let key = id.to_string();
        self.store
            .call(move |s| s.get_sandbox(&scope, &key))
            .await?
            .ok_or_else(not_found)
    }

    /// A sandbox the caller may operate on: visible and not destroyed.
    pub(crate) async fn usable_sandbox(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<(SandboxRow, Arc<LiveSandbox>), CoreError> {
        // A live sandbox the caller may see needs no trip to the store.
        if let Some(live) = self.live_sandbox(id)
            && principal.may_see(&live.row.org_id, live.row.project_id.as_deref())
        {
            return Ok((live.row.clone(), live));
        }
        let row = self.get_sandbox(principal, id).await?;
        if row.status == SandboxStatus::Destroyed {
            return Err(CoreError::SandboxDestroyed(row.id));
        }
        let live = self
            .live_sandbox(&row.id)
            .ok_or_else(|| CoreError::SandboxNotReady(row.id.clone()))?;
        Ok((row, live))
    }

    pub async fn list_sandboxes(
        &self,
        principal: &Principal,
        filter: SandboxFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<SandboxRow>, CoreError> {
        if filter.metadata.len() > MAX_METADATA_FILTERS {
            return Err(CoreError::invalid(
                "metadata",
                format!("at most {MAX_METADATA_FILTERS} metadata filters"),
            ));
        }
        let scope = principal.scope();
        Ok(self
            .store
            .call(move |s| s.list_sandboxes(&scope, &filter, after.as_ref(), limit))
            .await?)
    }

    /// Sets a live sandbox to expire `ttl_ms` from now (longer or shorter
    /// than before), within the server's TTL bounds.
    pub async fn set_sandbox_timeout(
        &self,
        principal: &Principal,
        id: &str,
        ttl_ms: i64,
    ) -> Result<SandboxRow, CoreError> {
        let limits = &self.config.limits;
        if ttl_ms < limits.min_ttl_ms || ttl_ms > limits.max_ttl_ms {
            return Err(CoreError::invalid(
                "ttlMs",
                format!(
                    "ttlMs must be between {} and {} milliseconds, got {ttl_ms}",
                    limits.min_ttl_ms, limits.max_ttl_ms
                ),
            ));
        }
        let row = self.get_sandbox(principal, id).await?;
        if row.status == SandboxStatus::Destroyed {
            return Err(CoreError::SandboxDestroyed(row.id));
        }
        let expires_at = self.clock.now_ms() + ttl_ms;
        let key = row.id.clone();
        let moved = self
            .store
            .call(move |s| s.set_sandbox_expiry(&key, expires_at))
            .await?;
        if !moved {
            return Err(CoreError::SandboxDestroyed(row.id));
        }
        Ok(SandboxRow { expires_at, ..row })
    }

    /// Kills a sandbox on a client's request.
    pub async fn kill_sandbox(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SandboxRow, CoreError> {
        let row = self.get_sandbox(principal, id).await?;
        if row.status == SandboxStatus::Destroyed {
            return Err(CoreError::SandboxDestroyed(row.id));
        }
        self.destroy_sandbox(&row.id, EndReason::Killed).await?;
        self.get_sandbox(principal, id).await
    }

    /// Destroys a sandbox's container and tombstones its record. Running
    /// commands end as `failed`. Safe to call for a sandbox already gone.
    pub(crate) async fn destroy_sandbox(
        &self,
        id: &str,
        reason: EndReason,
    ) -> Result<(), CoreError> {
        let live = lock(&self.live).remove(id);
        if let Some(live) = &live {
            live.stopping.cancel();
        }
        self.drop_contexts_of(id);
        self.forget_cpu_reading(id);
        let state_dir = self.state_dir(id);
        let runtime = match &live {
            Some(live) => live.row.runtime.clone(),
            None => {
                let key = id.to_string();
                self.store
                    .call(move |s| s.sandbox_runtime(&key))
                    .await?
                    .unwrap_or_else(|| String::from("oci"))
            }
        };
        self.driver(&runtime)?.destroy(id, &state_dir).await?;
        // Let each running command's driver record its own end (with its
        // buffered log) before the store marks stragglers failed.
        self.wait_for_commands_of(id, Duration::from_secs(5)).await;
        let now: Millis = self.clock.now_ms();
        let key = id.to_string();
        self.store
            .call(move |s| {
                s.end_sandbox(&key, reason, now)?;
                s.fail_running_commands(&key, "the sandbox was destroyed", now)
            })
            .await?;
        Ok(())
    }
}

/// Opens the channel and runs the handshake, bounded by `timeout`.
pub(crate) async fn connect_agent(
    channel: &dyn crate::runtime::AgentChannel,
    timeout: Duration,
    limits: &crate::config::Limits,
) -> Result<AgentClient, CoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = channel
        .open(timeout)
        .await
        .map_err(|e| CoreError::StartFailed(format!("the sandbox agent did not answer: {e}")))?;
    let connect = AgentClient::connect_with(
        stream,
        limits.max_agent_streams,
        Duration::from_millis(limits.agent_stream_wait_ms),
    );
    tokio::time::timeout_at(deadline, connect)
        .await
        .map_err(|_| {
            CoreError::StartFailed(String::from("the sandbox agent did not answer in time"))
        })?
        .map_err(|e| CoreError::StartFailed(format!("the sandbox agent did not answer: {e}")))
}
