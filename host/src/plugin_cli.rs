//! `crownest plugin`: tools for plugin authors that need no server.
//!
//! - `check FILE.wasm`: which world and version it implements, the WASI
//!   interfaces it imports, and whether this host loads it (and why not);
//! - `run FILE.wasm --input events.json`: one Code Run's events through
//!   the output pipeline with this component in its world's place and the
//!   default plugins in the others, printed as JSON;
//! - `new NAME --lang rust|python|js --world …`: a buildable project with
//!   a README and a test (`plugin_new/` holds what it writes);
//! - `build`: builds the project in a directory into `NAME.wasm`.

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
    /// Write a new plugin project: buildable, with a README and a test.
    New {
        /// The plugin's name: a-z, 0-9 and '-', starting with a letter.
        name: String,
        #[arg(long, value_enum)]
        lang: Lang,
        #[arg(long, value_enum)]
        world: WorldArg,
        /// Where to write it (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build the plugin project in DIR (made by `plugin new`) into
    /// DIR/NAME.wasm.
    Build {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorldArg {
    ResultAdapter,
    OutputFormatter,
    PromotionPolicy,
}

impl WorldArg {
    fn as_str(self) -> &'static str {
        match self {
            WorldArg::ResultAdapter => "result-adapter",
            WorldArg::OutputFormatter => "output-formatter",
            WorldArg::PromotionPolicy => "promotion-policy",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::ResultAdapter,
            Self::OutputFormatter,
            Self::PromotionPolicy,
        ]
        .into_iter()
        .find(|w| w.as_str() == text)
    }

    /// The template key that names a plugin of this world.
    fn template_key(self) -> &'static str {
        match self {
            WorldArg::ResultAdapter => "adapter",
            WorldArg::OutputFormatter => "formatter",
            WorldArg::PromotionPolicy => "policy",
        }
    }
}

impl Lang {
    fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Rust, Self::Python, Self::Js]
            .into_iter()
            .find(|l| l.as_str() == text)
    }
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
        PluginCommand::New {
            name,
            lang,
            world,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold(&name, lang, world, &dir)?;
            println!(
                "wrote {} ({} {}); next: cd {} && crownest plugin build",
                dir.display(),
                lang.as_str(),
                world.as_str(),
                dir.display()
            );
            Ok(0)
        }
        PluginCommand::Build { dir } => build(&dir),
    }
}

/// The project file `plugin new` writes and `plugin build` reads.
const PROJECT_FILE: &str = "crownest-plugin.toml";

/// The WIT a new project builds against (the newest version).
const WIT: &str = include_str!("../../wit/0.2.0/crownest-plugin.wit");

fn scaffold(name: &str, lang: Lang, world: WorldArg, dir: &Path) -> Result<()> {
    let valid = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "`{name}` is not a plugin name: use a-z, 0-9 and '-', starting with a letter (at most 63)"
        );
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: choose another --dir",
            dir.display()
        );
    }
    let file = format!("{}.wasm", name.replace('-', "_"));
    let (language, test) = match lang {
        Lang::Rust => (
            "Rust",
            "cargo test                                    # the unit test",
        ),
        Lang::Python => (
            "Python",
            "python3 -m unittest                           # the unit test",
        ),
        Lang::Js => (
            "JavaScript",
            "npm test                                      # the unit test",
        ),
    };
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{world}}", world.as_str())
            .replace("{{language}}", language)
            .replace("{{file}}", &file)
            .replace("{{test}}", test)
            .replace("{{key}}", world.template_key())
    };
    let mut files: Vec<(&str, String)> = vec![
        ("wit/crownest-plugin.wit", WIT.to_owned()),
        (
            PROJECT_FILE,
            format!(
                "# Written by `crownest plugin new`; read by `crownest plugin build`.\nname = \"{name}\"\nlang = \"{}\"\nworld = \"{}\"\n",
                lang.as_str(),
                world.as_str()
            ),
        ),
        ("README.md", fill(include_str!("plugin_new/README.md.in"))),
    ];
    match lang {
        Lang::Rust => {
            files.push(("Cargo.toml", fill(include_str!("plugin_new/Cargo.toml.in"))));
            files.push(("src/lib.rs", rust_source(world).to_owned()));
            files.push((".gitignore", String::from("/target\n*.wasm\n")));
        }
        Lang::Python => {
            files.push(("app.py", python_source(world).to_owned()));
            files.push((
                "helpers.py",
                include_str!("plugin_new/helpers.py").to_owned(),
            ));
            files.push((
                "test_helpers.py",
                include_str!("plugin_new/test_helpers.py").to_owned(),
            ));
            files.push((".gitignore", String::from("__pycache__/\n*.wasm\n")));
        }
        Lang::Js => {
            let (source, test) = js_source(world);
            files.push(("app.js", source.to_owned()));
            files.push(("app.test.mjs", test.to_owned()));
            files.push(("build.mjs", include_str!("plugin_new/build.mjs").to_owned()));
            files.push((
                "package.json",
                fill(include_str!("plugin_new/package.json.in")),
            ));
            files.push((".gitignore", String::from("node_modules/\n*.wasm\n")));
        }
    }
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn rust_source(world: WorldArg) -> &'static str {
    match world {
        WorldArg::ResultAdapter => include_str!("plugin_new/rust-result-adapter.rs"),
        WorldArg::OutputFormatter => include_str!("plugin_new/rust-output-formatter.rs"),
        WorldArg::PromotionPolicy => include_str!("plugin_new/rust-promotion-policy.rs"),
    }
}

fn python_source(world: WorldArg) -> &'static str {
    match world {
        WorldArg::ResultAdapter => include_str!("plugin_new/python-result-adapter.py"),
        WorldArg::OutputFormatter => include_str!("plugin_new/python-output-formatter.py"),
        WorldArg::PromotionPolicy => include_str!("plugin_new/python-promotion-policy.py"),
    }
}

fn js_source(world: WorldArg) -> (&'static str, &'static str) {
    match world {
        WorldArg::ResultAdapter => (
            include_str!("plugin_new/js-result-adapter.js"),
            include_str!("plugin_new/js-test-result-adapter.mjs"),
        ),
        WorldArg::OutputFormatter => (
            include_str!("plugin_new/js-output-formatter.js"),
            include_str!("plugin_new/js-test-output-formatter.mjs"),
        ),
        WorldArg::PromotionPolicy => (
            include_str!("plugin_new/js-promotion-policy.js"),
            include_str!("plugin_new/js-test-promotion-policy.mjs"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Project {
    name: String,
    lang: String,
    world: String,
}

fn build(dir: &Path) -> Result<i32> {
    let project_file = dir.join(PROJECT_FILE);
    let text = std::fs::read_to_string(&project_file).with_context(|| {
        format!(
            "{} is not a plugin project ({PROJECT_FILE} is missing): make one with `crownest plugin new`",
            dir.display()
        )
    })?;
    let project: Project = toml::from_str(&text)
        .with_context(|| format!("{} is not valid", project_file.display()))?;
    let lang = Lang::parse(&project.lang).with_context(|| {
        format!(
            "unknown lang `{}` in {}",
            project.lang,
            project_file.display()
        )
    })?;
    let world = WorldArg::parse(&project.world).with_context(|| {
        format!(
            "unknown world `{}` in {}",
            project.world,
            project_file.display()
        )
    })?;
    let file = format!("{}.wasm", project.name.replace('-', "_"));
    let run = |program: &str, args: &[&str], env_program: Option<&str>| -> Result<()> {
        let program = env_program
            .and_then(std::env::var_os)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(program));
        let status = std::process::Command::new(&program)
            .args(args)
            .current_dir(dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .with_context(|| {
                format!(
                    "cannot run {} (is it installed?{})",
                    program.display(),
                    env_program
                        .map(|e| format!(" set {e} to its path"))
                        .unwrap_or_default()
                )
            })?;
        if !status.success() {
            bail!("{} failed ({status})", program.display());
        }
        Ok(())
    };
    match lang {
        Lang::Rust => {
            run(
                "cargo",
                &["build", "--release", "--target", "wasm32-wasip2"],
                Some("CARGO"),
            )?;
            let built = dir.join("target/wasm32-wasip2/release").join(&file);
            std::fs::copy(&built, dir.join(&file))
                .with_context(|| format!("cannot copy {}", built.display()))?;
        }
        Lang::Python => run(
            "componentize-py",
            &[
                "-d",
                "wit",
                "-w",
                world.as_str(),
                "componentize",
                "app",
                "-p",
                ".",
                "-o",
                &file,
            ],
            Some("CROWNEST_COMPONENTIZE_PY"),
        )?,
        Lang::Js => {
            if !dir.join("node_modules").is_dir() {
                run("npm", &["install", "--no-audit", "--no-fund"], None)?;
            }
            run("node", &["build.mjs", world.as_str(), &file], None)?;
        }
    }
    println!("built {}", dir.join(&file).display());
    Ok(0)
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
