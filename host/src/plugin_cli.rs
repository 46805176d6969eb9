//! `crownest plugin`: tools for plugin authors that need no server.
//!
//! - `check FILE.wasm`: which world and version it implements, the WASI
//!   interfaces it imports, and whether this host loads it (and why not);
//! - `run FILE.wasm --input events.json`: one Code Run's events through
//!   the output pipeline with this component in its world's place and the
//!   default plugins in the others, printed as JSON.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use crownest::plugins::{
    self, AnyPlugin, ArtifactPolicy, Decision, Output, PipelineLimits, PluginHost, RawEvent,
    RunnerEvent,
};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Say which world a component implements, what WASI it imports, and
    /// whether this host would load it. Exit code 1 if it would not.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        #[command(flatten)]
        cache: CacheDir,
    },
    /// Run one Code Run's events through the pipeline with this component
    /// in its world's place (the default plugins in the others) and print
    /// the result as JSON.
    Run {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The run's events in the runner protocol (docs/plugins.md): a
        /// JSON array of events, or one event per line.
        #[arg(long)]
        input: PathBuf,
        /// The run's `artifactPolicy`.
        #[arg(long, value_enum, default_value_t = PolicyArg::Inline)]
        policy: PolicyArg,
        #[command(flatten)]
        cache: CacheDir,
    },
}

#[derive(clap::Args)]
pub struct CacheDir {
    /// Where compiled components are cached (`<dir>/plugins/`).
    #[arg(long, env = "CROWNEST_CACHE_DIR", default_value = ".crownest-cache")]
    cache_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    Inline,
    Promote,
}

/// Runs a `crownest plugin` command; the process exit code.
pub fn run(command: PluginCommand) -> Result<i32> {
    match command {
        PluginCommand::Check { file, cache } => check(&file, &cache.cache_dir),
        PluginCommand::Run {
            file,
            input,
            policy,
            cache,
        } => run_once(&file, &input, policy, &cache.cache_dir),
    }
}

fn host(cache_dir: &Path) -> Result<PluginHost> {
    PluginHost::new(cache_dir).context("the plugin host could not start")
}

fn check(file: &Path, cache_dir: &Path) -> Result<i32> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    println!("component: {} ({size} bytes)", file.display());
    match plugins::wasi_imports_of(file) {
        Ok(imports) if imports.is_empty() => println!("wasi imports: none"),
        Ok(imports) => {
            println!("wasi imports:");
            for import in imports {
                println!("  {import}");
            }
        }
        Err(e) => {
            println!("loads: no: {e}");
            return Ok(1);
        }
    }
    let host = host(cache_dir)?;
    let cached = host.is_compiled(file);
    let started = Instant::now();
    match host.load_any(file) {
        Ok(plugin) => {
            println!("world: {}", plugin.world());
            let how = if cached {
                "from the compile cache"
            } else {
                "compiled and cached"
            };
            println!("loads: yes ({how} in {} ms)", started.elapsed().as_millis());
            Ok(0)
        }
        Err(e) => {
            println!("loads: no: {e}");
            Ok(1)
        }
    }
}

fn run_once(file: &Path, input: &Path, policy: PolicyArg, cache_dir: &Path) -> Result<i32> {
    let events = read_events(input)?;
    let host = host(cache_dir)?;
    let plugin = host.load_any(file)?;
    let defaults = PluginHost::default_plugins_dir();
    let default = |name: &str| PluginHost::resolve(name, &defaults);
    let adapter = match &plugin {
        AnyPlugin::Adapter(adapter) => adapter.clone(),
        _ => with_default("adapter", host.load_adapter(&default("ipython-adapter")))?,
    };
    let formatter = match &plugin {
        AnyPlugin::Formatter(formatter) => formatter.clone(),
        _ => with_default(
            "formatter",
            host.load_formatter(&default("default-formatter")),
        )?,
    };
    let policy_plugin = match &plugin {
        AnyPlugin::Policy(policy) => policy.clone(),
        _ => with_default("policy", host.load_policy(&default("default-policy")))?,
    };
    let choice = match policy {
        PolicyArg::Inline => ArtifactPolicy::Inline,
        PolicyArg::Promote => ArtifactPolicy::Promote,
    };
    let result = plugins::pipeline(
        &adapter,
        &formatter,
        &policy_plugin,
        &events,
        choice,
        &PipelineLimits::default(),
    );
    let outputs: Vec<Value> = result
        .outputs
        .iter()
        .map(|o| {
            let mut view = output_json(&o.output);
            view["decision"] = decision_json(o.decision);
            view
        })
        .collect();
    let printed = json!({
        "plugin": plugin.info().name,
        "world": plugin.world(),
        "stdout": result.stdout,
        "stderr": result.stderr,
        "outputs": outputs,
        "error": result.error.as_ref().map(|e| json!({
            "name": e.name,
            "message": e.message,
            "traceback": e.traceback,
        })),
        "executionCount": result.execution_count,
        "notes": result.notes,
    });
    println!("{}", serde_json::to_string_pretty(&printed)?);
    // A note means a plugin failed and the pipeline fell back.
    Ok(if result.notes.is_empty() { 0 } else { 1 })
}

/// A default plugin the pipeline needs beside the one being tried.
fn with_default<T>(what: &str, loaded: Result<T, plugins::PluginError>) -> Result<T> {
    loaded.with_context(|| {
        format!(
            "the default {what} is needed beside this component (set {} to the directory of the built plugins)",
            plugins::PLUGINS_DIR_ENV
        )
    })
}

/// The runner events of `input`: a JSON array, or one per line.
fn read_events(input: &Path) -> Result<Vec<RawEvent>> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let lines: Vec<String> = if text.trim_start().starts_with('[') {
        let array: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of events", input.display()))?;
        array.iter().map(Value::to_string).collect()
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut events = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        match RunnerEvent::decode(line.as_bytes(), 16 << 20)
            .with_context(|| format!("event {} of {}", n + 1, input.display()))?
        {
            RunnerEvent::Raw(event) => events.push(event),
            RunnerEvent::Done { .. } | RunnerEvent::Other => {}
        }
    }
    if events.is_empty() {
        bail!(
            "{} has no events (stream, display_data, execute_result or error)",
            input.display()
        );
    }
    Ok(events)
}

fn output_json(output: &Output) -> Value {
    use base64::Engine;
    json!({
        "format": output.format.as_str(),
        "mime": output.mime,
        "text": output.text,
        "bytesBase64": output.bytes.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        "size": output.size,
        "truncated": output.truncated,
        "executionCount": output.execution_count,
    })
}

fn decision_json(decision: Decision) -> Value {
    match decision {
        Decision::Inline => json!("inline"),
        Decision::Promote => json!("promote"),
        Decision::Reject(reason) => json!({ "reject": reason.as_str() }),
    }
}
