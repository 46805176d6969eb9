//! The `crownest` binary: the API server (`serve`), the operator's tools
//! (`keys`, `orgs`, `template`, `openapi`), the plugin author's tools
//! (`plugin`), the HTTP client of the API (`sandbox`, `exec`, `commands`,
//! `code`, `files`, `artifacts`, `previews`, `run`, `usage`, `audit`; see
//! `client/`) and `completions` for shells.

mod client;
mod plugin_cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crownest::api::{self, AppState};
use crownest::auth;
use crownest::blobs::BlobStore;
use crownest::clock::{Clock, rfc3339};
use crownest::config::{self, Config, Limits};
use crownest::core::Host;
use crownest::ids;
use crownest::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome};
use crownest::rootfs::RootfsCache;
use crownest::runtime::{GvisorRuntime, MicrovmRuntime, OciRuntime, Runtime, Runtimes};
use crownest::store::{AuditRow, Quota, SqliteStore, Store, StoreHandle};
use crownest::templates::TemplateSet;

#[derive(Parser)]
#[command(
    name = "crownest",
    version,
    about = "CrowNest: sandboxes for untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server.
    Serve(ServeArgs),
    /// Create, list and revoke API keys (operator only: no HTTP route mints keys).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Per-org quotas (operator only).
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Build and inspect templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Check and try out WASM plugin components, without a server.
    #[command(subcommand)]
    Plugin(plugin_cli::PluginCommand),
    /// Print the OpenAPI document of this build.
    Openapi,
    /// Runtime hooks runc runs for sandboxes (not for people).
    #[command(hide = true, subcommand)]
    Hook(HookCommand),
    /// The byte relay between a crosvm guest's console and the host (started
    /// by the microvm runtime beside each crosvm; not for people).
    #[command(hide = true)]
    MicrovmRelay {
        #[arg(long)]
        guest: PathBuf,
        #[arg(long)]
        host: PathBuf,
    },
    /// Print a shell completion script: `crownest completions bash >
    /// /etc/bash_completion.d/crownest`, `… zsh > "${fpath[1]}/_crownest"`,
    /// `… fish > ~/.config/fish/completions/crownest.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Client commands: talk to a running server over HTTP.
    #[command(flatten)]
    Client(client::Command),
}

#[derive(Args, Clone)]
struct DataDir {
    /// Where the database and sandbox state live.
    #[arg(long, env = "CROWNEST_DATA_DIR", default_value = ".crownest")]
    data_dir: PathBuf,
}

#[derive(Args, Clone)]
struct TemplatesDir {
    /// Operator template directory (files replace or add to the built-in templates).
    #[arg(long, env = "CROWNEST_TEMPLATES_DIR")]
    templates_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    templates: TemplatesDir,
    /// OCI runtime binary of the `oci` runtime.
    #[arg(long, env = "CROWNEST_RUNTIME", default_value = "runc")]
    runtime: PathBuf,
    /// runsc binary of the `gvisor` runtime.
    #[arg(long, env = "CROWNEST_RUNSC", default_value = "runsc")]
    runsc: PathBuf,
    /// QEMU binary of the `microvm` runtime (`vmm = "qemu"`).
    #[arg(long, env = "CROWNEST_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// crosvm binary of the `microvm` runtime (`vmm = "crosvm"`).
    #[arg(long, env = "CROWNEST_CROSVM", default_value = "crosvm")]
    crosvm: PathBuf,
    /// Force one accelerator for every microVM template (`kvm` or `tcg`;
    /// `auto` uses KVM only where /dev/kvm works and this host is not a VM).
    #[arg(long, env = "CROWNEST_MICROVM_ACCEL", value_parser = parse_accel)]
    microvm_accel: Option<crownest::runtime::Accel>,
    /// Destroy every sandbox when the server stops. By default sandboxes
    /// keep running and the next server process on this data dir takes
    /// them over (commands, their logs and code contexts included).
    #[arg(long, env = "CROWNEST_DESTROY_ON_SHUTDOWN")]
    destroy_on_shutdown: bool,
    /// The static crownest-agent binary to put in sandboxes.
    #[arg(long, env = "CROWNEST_AGENT_BIN")]
    agent_binary: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// `host[:port]` under which each preview gets its own origin,
    /// `prv-….HOST`; point a wildcard DNS name (and certificate) at this
    /// server. Default: `localhost` with the port clients use for the API
    /// (browsers resolve `*.localhost` to loopback).
    #[arg(long, env = "CROWNEST_PREVIEW_DOMAIN", value_parser = parse_preview_domain)]
    preview_domain: Option<String>,
    /// Requests per second one API key may make on average; more are `429
    /// rate_limited` with `Retry-After`. 0 turns the limit off.
    #[arg(long, env = "CROWNEST_RATE_LIMIT", default_value_t = Limits::default().rate_limit_per_key)]
    rate_limit: u32,
    /// Requests one API key may make at once above the average.
    #[arg(long, env = "CROWNEST_RATE_BURST", default_value_t = Limits::default().rate_burst_per_key)]
    rate_burst: u32,
    /// Client connections open at once; more are closed as they arrive.
    #[arg(long, env = "CROWNEST_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "CROWNEST_HEADER_TIMEOUT_SECS", default_value_t = Limits::default().header_read_timeout_ms / 1000)]
    header_timeout_secs: u64,
    /// Seconds a preview request waits for the app's response headers
    /// before it is answered `504 preview_upstream_timeout`.
    #[arg(long, env = "CROWNEST_PREVIEW_TIMEOUT_SECS", default_value_t = Limits::default().preview_response_timeout_ms / 1000)]
    preview_timeout_secs: u64,
    /// A non-public range (CIDR) sandboxes may reach through an allow rule
    /// that names it (a private package mirror, a test server on
    /// loopback); repeat for more. Loopback, private, link-local, CGNAT
    /// and multicast addresses are refused otherwise; cloud metadata
    /// addresses always are.
    #[arg(
        long = "egress-allow-private",
        value_name = "CIDR",
        env = "CROWNEST_EGRESS_ALLOW_PRIVATE",
        value_delimiter = ','
    )]
    egress_allow_private: Vec<ipnet::IpNet>,
    /// Egress connections one sandbox may have open at once.
    #[arg(long, env = "CROWNEST_EGRESS_MAX_CONNECTIONS", default_value_t = crownest::egress::Settings::default().max_connections)]
    egress_max_connections: usize,
    /// Egress bandwidth per sandbox and direction, MiB/s (0: no cap).
    #[arg(long, env = "CROWNEST_EGRESS_BANDWIDTH_MIB", default_value_t = crownest::egress::Settings::default().bandwidth_bytes_per_sec >> 20)]
    egress_bandwidth_mib: u64,
    /// Seconds an egress connection may idle before it is closed.
    #[arg(long, env = "CROWNEST_EGRESS_IDLE_TIMEOUT_SECS", default_value_t = crownest::egress::Settings::default().idle_timeout.as_secs())]
    egress_idle_timeout_secs: u64,
    /// Days audit events are kept.
    #[arg(long, default_value_t = config::DEFAULT_AUDIT_RETENTION_DAYS, value_parser = clap::value_parser!(i64).range(1..=36_500))]
    audit_retention_days: i64,
    /// Days the logs of a destroyed sandbox's commands are kept (the
    /// command records and their output tails stay).
    #[arg(long, default_value_t = config::DEFAULT_LOG_RETENTION_DAYS, value_parser = clap::value_parser!(i64).range(1..=36_500))]
    log_retention_days: i64,
}

#[derive(Subcommand)]
enum HookCommand {
    /// Bound the inotify limits of a new sandbox's user namespace; reads
    /// runc's container state on stdin.
    UsernsLimits,
}

#[derive(Subcommand)]
enum OrgsCommand {
    /// Set an org's quotas. Each limit is a number, or `none` for unlimited;
    /// limits not given keep their value (for a new org, the defaults: 100
    /// live sandboxes, 10 GiB of artifacts, 512 running commands, the rest
    /// unlimited). Creates the org if it is new.
    SetQuota {
        #[arg(long)]
        org: String,
        /// Sandboxes alive at once.
        #[arg(long)]
        max_concurrent_sandboxes: Option<QuotaValue>,
        /// Compute unit seconds (vCPUs × seconds) per UTC calendar month.
        #[arg(long)]
        max_compute_unit_seconds: Option<QuotaValue>,
        /// Bytes of artifacts stored.
        #[arg(long)]
        max_artifact_bytes: Option<QuotaValue>,
        /// Bytes of one request body.
        #[arg(long)]
        max_request_body_bytes: Option<QuotaValue>,
        /// Bytes of each output stream kept per command (the tail is kept).
        #[arg(long)]
        max_command_output_bytes: Option<QuotaValue>,
        /// Commands running at once across the org's sandboxes.
        #[arg(long)]
        max_concurrent_commands: Option<QuotaValue>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Show an org's quotas.
    Show {
        #[arg(long)]
        org: String,
        #[command(flatten)]
        data: DataDir,
    },
}

/// A quota limit on the command line: a number or `none`.
#[derive(Clone, Copy, Debug)]
struct QuotaValue(Option<i64>);

impl std::str::FromStr for QuotaValue {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "none" {
            return Ok(QuotaValue(None));
        }
        text.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(|n| QuotaValue(Some(n)))
            .ok_or_else(|| format!("`{text}` is not a non-negative number or `none`"))
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (it is shown only once).
    Create {
        /// Org the key belongs to (created if new).
        #[arg(long)]
        org: String,
        /// Restrict the key to one project (created if new).
        #[arg(long)]
        project: Option<String>,
        /// Comma-separated `resource:action` scopes, or `all`.
        #[arg(long)]
        scopes: String,
        /// A label for listings.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        data: DataDir,
    },
    /// List keys (never their secrets).
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a key by id (`key_…`); requests with it fail with 401 at once.
    Revoke {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build templates' rootfs into the cache (each cached stage is reused).
    Build {
        /// The templates to build.
        #[arg(required_unless_present = "all")]
        names: Vec<String>,
        /// Build every template.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Rebuild every stage even if cached.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        templates: TemplatesDir,
    },
    /// List templates: source, runtime, built or not, recipe hash, size.
    #[command(alias = "list")]
    Ls {
        /// One JSON object per template instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        templates: TemplatesDir,
    },
    /// Print a template with every default filled in.
    Show {
        name: String,
        #[command(flatten)]
        templates: TemplatesDir,
    },
    /// Validate template files without building them.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Remove cached builds no template (and no live sandbox) refers to.
    Gc {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Collect without the server's database (when there is none): the
        /// trees live sandboxes run on are not known then.
        #[arg(long)]
        ignore_live_sandboxes: bool,
        #[command(flatten)]
        templates: TemplatesDir,
        #[command(flatten)]
        data: DataDir,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keys(command) => keys(command),
        Command::Orgs(command) => orgs(command),
        Command::Template(command) => template(command),
        Command::Hook(HookCommand::UsernsLimits) => {
            // Single-threaded on purpose: setns into a user namespace
            // refuses threaded callers.
            crownest::runtime::oci::hook::userns_limits()?;
            Ok(())
        }
        Command::MicrovmRelay { guest, host } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crownest::runtime::microvm::crosvm::relay(&guest, &host))?;
            Ok(())
        }
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&api::openapi())?);
            Ok(())
        }
        Command::Plugin(command) => {
            // A plugin's log lines and captured stdout/stderr, on stderr.
            init_logging(false);
            std::process::exit(plugin_cli::run(command)?)
        }
        Command::Completions { shell } => {
            use std::io::Write;
            let mut command = <Cli as clap::CommandFactory>::command();
            // Into memory first: clap_complete panics on a failed write
            // (a closed pipe), a Vec cannot fail.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "crownest", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing the completion script")
                }
                _ => Ok(()),
            }
        }
        Command::Client(command) => std::process::exit(client::run(command)),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CROWNEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn open_store(data_dir: &std::path::Path) -> Result<StoreHandle> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let path = data_dir.join("crownest.db");
    let store = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(StoreHandle::new(store))
}

fn serve(args: ServeArgs) -> Result<()> {
    init_logging(args.log_json);
    let data_dir = absolute(&args.data.data_dir)?;
    let agent_binary = absolute(
        &args
            .agent_binary
            .unwrap_or_else(config::default_agent_binary),
    )?;
    if !agent_binary.is_file() {
        bail!(
            "the sandbox agent binary {} does not exist; build it with `cargo build -p crownest-agent --target x86_64-unknown-linux-musl` or pass --agent-binary",
            agent_binary.display()
        );
    }
    let config = Config {
        listen: args.listen,
        data_dir: data_dir.clone(),
        cache_dir: config::default_cache_dir(),
        templates_dir: args.templates.templates_dir.clone(),
        runtime_binary: args.runtime.clone(),
        runsc_binary: args.runsc.clone(),
        destroy_on_shutdown: args.destroy_on_shutdown,
        egress: crownest::egress::Settings {
            ceiling: crownest::egress::Ceiling {
                allow_private: args
                    .egress_allow_private
                    .iter()
                    .map(|n| n.trunc())
                    .collect(),
            },
            max_connections: args.egress_max_connections.max(1),
            bandwidth_bytes_per_sec: args.egress_bandwidth_mib.saturating_mul(1 << 20),
            idle_timeout: std::time::Duration::from_secs(args.egress_idle_timeout_secs.max(1)),
            ..crownest::egress::Settings::default()
        },
        agent_binary,
        preview_domain: args.preview_domain.clone(),
        limits: Limits {
            audit_retention_ms: Limits::days(args.audit_retention_days),
            destroyed_log_retention_ms: Limits::days(args.log_retention_days),
            rate_limit_per_key: args.rate_limit,
            rate_burst_per_key: args.rate_burst,
            max_connections: args.max_connections.max(1),
            header_read_timeout_ms: args.header_timeout_secs.max(1) * 1000,
            preview_response_timeout_ms: args.preview_timeout_secs.max(1) * 1000,
            ..Limits::default()
        },
    };
    let templates = TemplateSet::load(config.templates_dir.as_deref())?;
    let store = open_store(&data_dir)?;
    crownest::runtime::oci::become_subreaper();
    let oci: Arc<dyn Runtime> = Arc::new(
        OciRuntime::new(config.runtime_binary.clone(), data_dir.join("runc"))
            .with_userns_hook(std::env::current_exe().context("finding this binary")?),
    );
    let gvisor: Arc<dyn Runtime> = Arc::new(GvisorRuntime::new(
        config.runsc_binary.clone(),
        data_dir.join("runsc"),
    ));
    let microvm: Arc<dyn Runtime> = Arc::new(microvm_runtime(
        args.qemu.clone(),
        args.crosvm.clone(),
        &data_dir,
        args.microvm_accel,
    )?);
    let mut runtimes = Runtimes::new(vec![oci, gvisor, microvm]);
    let runtime_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime_rt.block_on(async move {
        // Each isolation a template names is tried once; one this host
        // cannot run leaves its templates listed as unavailable.
        runtimes.check(templates.iter().map(|t| t.runtime)).await;
        for driver in runtimes.drivers() {
            if let Some(version) = driver.version() {
                tracing::info!(runtime = driver.name(), %version, "runtime checked");
            }
        }
        let blobs = BlobStore::open(data_dir.join("blobs"))?;
        let host = Host::new(
            config.clone(),
            store,
            Clock::system(),
            templates,
            runtimes,
            blobs,
        );
        let reconciled = host
            .reconcile()
            .await
            .context("reconciling sandboxes left by a previous run")?;
        if !reconciled.adopted.is_empty() || !reconciled.destroyed.is_empty() {
            tracing::info!(
                adopted = reconciled.adopted.len(),
                commands = reconciled.commands,
                destroyed = reconciled.destroyed.len(),
                "took over the sandboxes of the previous host process"
            );
        }
        // The evidence key exists from the first start (its public half is
        // served at GET /v1/evidence-keys).
        host.evidence_keys()
            .await
            .context("creating the evidence signing key")?;
        let runs = host
            .reconcile_runs()
            .await
            .context("taking over the workspace runs left by a previous run")?;
        if runs.resumed + runs.ended > 0 {
            tracing::info!(
                resumed = runs.resumed,
                ended = runs.ended,
                "took over the workspace runs of the previous host process"
            );
        }
        let reaper = host.spawn_reaper();
        let reloader = spawn_template_reloader(host.clone())?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(listen = %local, data_dir = %config.data_dir.display(), "crownest serving");
        // One machine-readable line on stdout, for scripts and tests that
        // listen on port 0.
        println!("crownest listening on http://{local}");
        let state = AppState { host: host.clone() };
        api::run(listener, state, shutdown_signal()).await?;
        if config.destroy_on_shutdown {
            tracing::info!("shutting down: destroying live sandboxes");
        } else {
            tracing::info!("shutting down: sandboxes keep running for the next server process");
        }
        host.shutdown().await;
        reaper.abort();
        reloader.abort();
        Ok::<_, anyhow::Error>(())
    })
}

/// Re-reads the templates on every SIGHUP. An invalid directory keeps the
/// templates that were loaded, and the log says why.
fn spawn_template_reloader(host: Arc<Host>) -> Result<tokio::task::JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match host.reload_templates().await {
                Ok(report) => tracing::info!(
                    added = ?report.added,
                    changed = ?report.changed,
                    removed = ?report.removed,
                    unchanged = report.unchanged,
                    "templates reloaded (SIGHUP)"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "template reload (SIGHUP) failed; keeping the templates loaded before"
                ),
            }
        }
    }))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the server");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn keys(command: KeysCommand) -> Result<()> {
    let now = Clock::system().now_ms();
    match command {
        KeysCommand::Create {
            org,
            project,
            scopes,
            name,
            data,
        } => {
            let scopes = auth::parse_scopes(&scopes)?;
            let store = open_store(&data.data_dir)?;
            let minted = auth::mint_key(
                store.blocking(),
                &org,
                project.as_deref(),
                name.as_deref(),
                scopes,
                now,
            )?;
            eprintln!(
                "created {} for org `{org}`{}; scopes: {}",
                minted.row.id,
                project
                    .map(|p| format!(", project `{p}`"))
                    .unwrap_or_default(),
                minted.row.scopes.join(",")
            );
            operator_audit(
                store.blocking(),
                &minted.row.org_id,
                minted.row.project_id.clone(),
                AuditAction::KeyCreate,
                &minted.row.id,
                now,
            )?;
            eprintln!("store the key now: it is not shown again");
            println!("{}", minted.secret);
        }
        KeysCommand::List { data } => {
            let store = open_store(&data.data_dir)?;
            println!(
                "{:<26} {:<14} {:<16} {:<16} {:<24} {:<8} SCOPES",
                "ID", "PREFIX", "ORG", "PROJECT", "CREATED", "STATUS"
            );
            for listing in store.blocking().list_keys()? {
                let key = &listing.key;
                println!(
                    "{:<26} {:<14} {:<16} {:<16} {:<24} {:<8} {}",
                    key.id,
                    format!("{}…", key.prefix),
                    listing.org_name,
                    listing.project_name.as_deref().unwrap_or("-"),
                    rfc3339(key.created_at),
                    if key.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    key.scopes.join(",")
                );
            }
        }
        KeysCommand::Revoke { id, data } => {
            let store = open_store(&data.data_dir)?;
            if !store.blocking().revoke_key(&id, now)? {
                bail!("no key with id `{id}`; `crownest keys list` shows them");
            }
            if let Some(listing) = store
                .blocking()
                .list_keys()?
                .into_iter()
                .find(|l| l.key.id == id)
            {
                operator_audit(
                    store.blocking(),
                    &listing.key.org_id,
                    listing.key.project_id,
                    AuditAction::KeyRevoke,
                    &id,
                    now,
                )?;
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

/// Records what the operator did with the CLI in the audit log.
fn operator_audit(
    store: &dyn Store,
    org_id: &str,
    project_id: Option<String>,
    action: AuditAction,
    resource_id: &str,
    now: i64,
) -> Result<()> {
    store.insert_audit(&AuditRow {
        id: ids::new(ids::Kind::Audit),
        at: now,
        org_id: Some(org_id.to_string()),
        project_id,
        actor_key_id: None,
        actor: AuditActor::Operator,
        action,
        resource_type: Some(action.resource()),
        resource_id: Some(resource_id.to_string()),
        outcome: AuditOutcome::Success,
        status: None,
        request_id: None,
        details: AuditDetails::default(),
    })?;
    Ok(())
}

fn orgs(command: OrgsCommand) -> Result<()> {
    let now = Clock::system().now_ms();
    match command {
        OrgsCommand::SetQuota {
            org,
            max_concurrent_sandboxes,
            max_compute_unit_seconds,
            max_artifact_bytes,
            max_request_body_bytes,
            max_command_output_bytes,
            max_concurrent_commands,
            data,
        } => {
            let store = open_store(&data.data_dir)?;
            let org_row = store.blocking().ensure_org(&org, now)?;
            let mut quota = store.blocking().get_quota(&org_row.id)?;
            let set = |field: &mut Option<i64>, value: Option<QuotaValue>| {
                if let Some(QuotaValue(v)) = value {
                    *field = v;
                }
            };
            set(
                &mut quota.max_concurrent_sandboxes,
                max_concurrent_sandboxes,
            );
            set(
                &mut quota.max_compute_unit_seconds,
                max_compute_unit_seconds,
            );
            set(&mut quota.max_artifact_bytes, max_artifact_bytes);
            set(&mut quota.max_request_body_bytes, max_request_body_bytes);
            set(
                &mut quota.max_command_output_bytes,
                max_command_output_bytes,
            );
            set(&mut quota.max_concurrent_commands, max_concurrent_commands);
            store.blocking().set_quota(&org_row.id, &quota)?;
            operator_audit(
                store.blocking(),
                &org_row.id,
                None,
                AuditAction::QuotaSet,
                &org_row.id,
                now,
            )?;
            print_quota(&org, &quota);
        }
        OrgsCommand::Show { org, data } => {
            let store = open_store(&data.data_dir)?;
            let org_row = store
                .blocking()
                .find_org(&org)?
                .with_context(|| format!("no org named `{org}`"))?;
            print_quota(&org, &store.blocking().get_quota(&org_row.id)?);
            println!(
                "live sandboxes: {}",
                store.blocking().live_sandbox_count(&org_row.id)?
            );
        }
    }
    Ok(())
}

fn print_quota(org: &str, quota: &Quota) {
    let show = |v: Option<i64>| v.map_or_else(|| String::from("unlimited"), |n| n.to_string());
    println!("org {org}");
    println!(
        "  max concurrent sandboxes:  {}",
        show(quota.max_concurrent_sandboxes)
    );
    println!(
        "  max compute unit seconds:  {} per month",
        show(quota.max_compute_unit_seconds)
    );
    println!(
        "  max artifact bytes:        {}",
        show(quota.max_artifact_bytes)
    );
    println!(
        "  max request body bytes:    {}",
        show(quota.max_request_body_bytes)
    );
    println!(
        "  max command output bytes:  {}",
        show(quota.max_command_output_bytes)
    );
    println!(
        "  max concurrent commands:   {}",
        show(quota.max_concurrent_commands)
    );
}

fn parse_accel(text: &str) -> Result<crownest::runtime::Accel, String> {
    crownest::runtime::Accel::parse(text).ok_or_else(|| format!("`{text}`: use auto, kvm or tcg"))
}

/// The microvm driver: its artifacts in the rootfs cache, its VMM records
/// under the data dir, crosvm's relay run from this binary.
fn microvm_runtime(
    qemu: PathBuf,
    crosvm: PathBuf,
    data_dir: &std::path::Path,
    accel: Option<crownest::runtime::Accel>,
) -> Result<MicrovmRuntime> {
    Ok(MicrovmRuntime::new(
        qemu,
        crosvm,
        std::env::current_exe().context("finding this binary")?,
        config::default_cache_dir(),
        data_dir.join("microvm"),
    )
    .with_accel(accel))
}

fn template(command: TemplateCommand) -> Result<()> {
    let cache = RootfsCache::new(config::default_cache_dir());
    match command {
        TemplateCommand::Build {
            names,
            all,
            force,
            templates,
        } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            let chosen: Vec<_> = if all {
                set.iter().collect()
            } else {
                names
                    .iter()
                    .map(|name| {
                        set.get(name).with_context(|| {
                            format!(
                                "no template named `{name}`; available: {}",
                                set.names().collect::<Vec<_>>().join(", ")
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let microvm = microvm_runtime(
                PathBuf::from("qemu-system-x86_64"),
                PathBuf::from("crosvm"),
                std::path::Path::new("."),
                None,
            )?;
            for template in chosen {
                let name = &template.name;
                if cache.is_built(template) && !force {
                    eprintln!(
                        "{name}: already built at {} (recipe {})",
                        cache.path_for(template).display(),
                        &template.recipe_hash()[..12]
                    );
                } else {
                    let options = crownest::rootfs::BuildOptions {
                        progress: true,
                        force,
                    };
                    let path = runtime.block_on(cache.build_with(template, options))?;
                    eprintln!("{name}: built at {}", path.display());
                }
                template.check_rootfs(&cache.path_for(template))?;
                // A microVM template also needs its disk image and guest kernel.
                runtime.block_on(microvm.prepare(
                    template.runtime,
                    &cache.path_for(template),
                    true,
                ))?;
                if let Some(vmm) = template.runtime.vmm() {
                    eprintln!(
                        "{name}: guest kernel and disk image are ready (vmm {})",
                        vmm.as_str()
                    );
                }
            }
        }
        TemplateCommand::Ls { json, templates } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            if !json {
                println!(
                    "{:<16} {:<7} {:<8} {:<8} {:<13} {:>9}  DESCRIPTION",
                    "NAME", "SOURCE", "RUNTIME", "BUILT", "RECIPE", "SIZE"
                );
            }
            for t in set.iter() {
                let built = cache.is_built(t);
                let size = cache.size_of(t);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": t.name,
                            "source": t.rootfs.source.kind(),
                            "runtime": t.runtime.kind(),
                            "built": built,
                            "recipeHash": t.recipe_hash(),
                            "version": t.version(),
                            "sizeBytes": size,
                            "description": t.description,
                        })
                    );
                    continue;
                }
                println!(
                    "{:<16} {:<7} {:<8} {:<8} {:<13} {:>9}  {}",
                    t.name,
                    t.rootfs.source.kind(),
                    t.runtime.kind(),
                    if built { "built" } else { "unbuilt" },
                    &t.recipe_hash()[..12],
                    if built {
                        human_bytes(size)
                    } else {
                        String::from("-")
                    },
                    t.description
                );
            }
        }
        TemplateCommand::Show { name, templates } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            let template = set.get(&name).with_context(|| {
                format!(
                    "no template named `{name}`; available: {}",
                    set.names().collect::<Vec<_>>().join(", ")
                )
            })?;
            print!("{}", template.resolved_toml());
            for (i, stage) in template.stages().iter().enumerate() {
                println!(
                    "# stage {}/{} {}: {}",
                    i + 1,
                    template.stages().len(),
                    stage.label,
                    stage.key
                );
            }
            println!(
                "# built: {}",
                if cache.is_built(template) {
                    cache.path_for(template).display().to_string()
                } else {
                    String::from("no")
                }
            );
        }
        TemplateCommand::Check { files } => {
            let plugins = crownest::plugins::PluginHost::default_plugins_dir();
            let mut failed = 0;
            for file in &files {
                let checked = TemplateSet::read_file(file, None).and_then(|t| {
                    t.check_plugins(&plugins)?;
                    if cache.is_built(&t) {
                        t.check_rootfs(&cache.path_for(&t))?;
                    }
                    Ok(t)
                });
                match checked {
                    Ok(t) => {
                        println!(
                            "{}: ok: template `{}` (source {}, runtime {}, recipe {}{})",
                            file.display(),
                            t.name,
                            t.rootfs.source.kind(),
                            t.runtime.kind(),
                            &t.recipe_hash()[..12],
                            if cache.is_built(&t) {
                                ", built"
                            } else {
                                ", not built"
                            }
                        );
                        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
                        if stem.as_deref() != Some(t.name.as_str()) {
                            println!(
                                "  note: in a templates directory this file must be named {}.toml",
                                t.name
                            );
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} template files are invalid", files.len());
            }
        }
        TemplateCommand::Gc {
            dry_run,
            ignore_live_sandboxes,
            templates,
            data,
        } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            let mut in_use = std::collections::BTreeSet::new();
            let db = data.data_dir.join("crownest.db");
            if db.is_file() {
                let store = open_store(&data.data_dir)?;
                in_use.extend(store.blocking().live_template_hashes()?);
            } else if !ignore_live_sandboxes {
                bail!(
                    "no database at {}: pass the server's --data-dir (or CROWNEST_DATA_DIR) so gc keeps what live sandboxes run on, or --ignore-live-sandboxes",
                    db.display()
                );
            }
            let keep: Vec<_> = set.iter().collect();
            let report = cache.gc(&keep, &in_use, dry_run)?;
            for path in &report.removed {
                println!(
                    "{} {}",
                    if dry_run { "would remove" } else { "removed" },
                    path.display()
                );
            }
            println!(
                "{} {} cache entries, {} ({} bytes){}",
                if dry_run { "would free" } else { "freed" },
                report.removed.len(),
                human_bytes(report.bytes),
                report.bytes,
                if in_use.is_empty() {
                    String::new()
                } else {
                    format!("; kept {} recipes live sandboxes use", in_use.len())
                }
            );
        }
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `host[:port]` with a host of DNS labels (no scheme, path or `*`).
fn parse_preview_domain(text: &str) -> Result<String, String> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("`{port}` is not a port number"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
    };
    if host.is_empty() || host.len() > 200 || !host.split('.').all(label_ok) {
        return Err(format!(
            "`{text}` is not a domain like `preview.example.com` or `localhost:7420`"
        ));
    }
    Ok(text.to_ascii_lowercase())
}

fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(path))
}
