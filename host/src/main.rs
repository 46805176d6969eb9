//! The `crownest` binary: the API server (`serve`) and the operator's tools
//! (`keys`, `template`, `openapi`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crownest::api::{self, AppState};
use crownest::auth;
use crownest::clock::{Clock, rfc3339};
use crownest::config::{self, Config, Limits};
use crownest::core::Host;
use crownest::rootfs::RootfsCache;
use crownest::runtime::OciRuntime;
use crownest::store::{SqliteStore, StoreHandle};
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
    /// Build and inspect templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Print the OpenAPI document of this build.
    Openapi,
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
    /// OCI runtime binary.
    #[arg(long, env = "CROWNEST_RUNTIME", default_value = "runc")]
    runtime: PathBuf,
    /// The static crownest-agent binary to put in sandboxes.
    #[arg(long, env = "CROWNEST_AGENT_BIN")]
    agent_binary: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
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
    /// Build a template's rootfs into the cache (skipped when already built).
    Build {
        name: String,
        #[command(flatten)]
        templates: TemplatesDir,
    },
    /// List templates and whether they are built.
    List {
        #[command(flatten)]
        templates: TemplatesDir,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keys(command) => keys(command),
        Command::Template(command) => template(command),
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&api::openapi())?);
            Ok(())
        }
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
    let agent_binary = args
        .agent_binary
        .unwrap_or_else(config::default_agent_binary);
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
        agent_binary,
        limits: Limits::default(),
    };
    let templates = TemplateSet::load(config.templates_dir.as_deref())?;
    let store = open_store(&data_dir)?;
    let runtime = Arc::new(OciRuntime::new(
        config.runtime_binary.clone(),
        data_dir.join("runc"),
    ));
    let runtime_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime_rt.block_on(async move {
        let host = Host::new(config.clone(), store, Clock::system(), templates, runtime);
        host.reconcile()
            .await
            .context("reconciling sandboxes left by a previous run")?;
        let reaper = host.spawn_reaper();
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
        tracing::info!("shutting down: destroying live sandboxes");
        host.shutdown().await;
        reaper.abort();
        Ok::<_, anyhow::Error>(())
    })
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
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

fn template(command: TemplateCommand) -> Result<()> {
    match command {
        TemplateCommand::Build { name, templates } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            let template = set.get(&name).with_context(|| {
                format!(
                    "no template named `{name}`; available: {}",
                    set.names().collect::<Vec<_>>().join(", ")
                )
            })?;
            let cache = RootfsCache::new(config::default_cache_dir());
            if cache.is_built(template) {
                eprintln!(
                    "{name} is already built at {}",
                    cache.path_for(template).display()
                );
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let path = runtime.block_on(cache.build(template, true))?;
            eprintln!("built {name} at {}", path.display());
        }
        TemplateCommand::List { templates } => {
            let set = TemplateSet::load(templates.templates_dir.as_deref())?;
            let cache = RootfsCache::new(config::default_cache_dir());
            for t in set.iter() {
                println!(
                    "{:<14} {:<8} {}  {}",
                    t.name,
                    if cache.is_built(t) {
                        "built"
                    } else {
                        "unbuilt"
                    },
                    &t.recipe_hash()[..12],
                    t.description
                );
            }
        }
    }
    Ok(())
}

fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(path))
}
