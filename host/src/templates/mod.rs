//! Sandbox templates: the operator-owned TOML files that say how a sandbox's
//! rootfs is built (a Debian recipe, an OCI image or a directory, then pip,
//! npm, file and shell layers), which runtime runs it, its resource limits,
//! its network policy, and the environment its commands get.
//!
//! The built-in defaults (`templates/*.toml` at the repository root) are
//! embedded in the binary; an operator directory of `*.toml` files replaces
//! or extends them by name ([`TemplateSet::load`]). Every file is validated
//! when loaded, so a bad template fails with the file, line, column and key
//! named, never at sandbox creation. `docs/templates.md` documents every key.
//!
//! Schema (multi-word keys are camelCase; everything but `name` has a
//! default):
//!
//! ```toml
//! name = "python"                 # [a-z0-9-], 1..=32 chars, = the file stem
//! description = "..."
//! workdir = "/workspace"          # default cwd of commands and contexts
//! [env]                           # every command and context of the template
//! MPLBACKEND = "Agg"
//! [rootfs]
//! source = "debian"               # "debian" (default), "oci" or "dir"
//! suite = "bookworm"              # debian: suite for mmdebstrap
//! variant = "minbase"             # debian: minbase|essential|apt|required|important|standard
//! packages = ["python3", "..."]   # debian: package names, order irrelevant
//! image = "./images/app.tar"      # oci: an oci-layout dir or an oci-/docker-archive tarball
//! imageRef = "app:1.0"            # oci: which image of a layout/archive holding several
//! path = "/srv/rootfs/app"        # dir: a prepared tree, copied into the cache
//! # Layers, applied in the order written, each cached:
//! pip = ["requests==2.32.3"]      # pip install at build time
//! npm = ["typescript@5"]          # npm install -g at build time
//! files = [{ src = "motd", dest = "/etc/motd", mode = 0o644 }]
//! run = ["echo built > /etc/built"]
//! [runtime]
//! kind = "oci"                    # "oci" (runc), "gvisor" (runsc) or "microvm"
//! platform = "ptrace"             # gvisor only: ptrace (default), kvm, systrap
//! vmm = "qemu"                    # microvm only: "qemu" (default) or "crosvm"
//! accel = "auto"                  # microvm only: "auto" (default), "kvm", "tcg"
//! [resources]
//! vcpus = 1                       # 1..=64
//! memoryMiB = 512                 # 64..=65536
//! pids = 256                      # 16..=32768
//! diskMiB = 1024                  # 16..=65536, size of the /workspace tmpfs
//! [network]
//! mode = "none"                   # "none" (loopback only), "allow" or "open"
//! allow = ["pypi.org", "*.pythonhosted.org:443"]   # mode "allow": what may be reached
//! deny = ["bad.example"]          # wins over allow (docs/network.md)
//! [user]
//! uid = 1000                      # 1..=65533 (inside the sandbox user namespace)
//! gid = 1000
//! name = "user"                   # created in the rootfs, home /home/<name>
//! ```

mod digest;
mod spans;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use digest::{file as file_digest, tree as tree_digest};
use spans::Doc;

use crate::runtime::{Accel, GvisorPlatform, Isolation, Resources, SandboxUser, Vmm};

/// Bumped whenever the way a recipe is turned into a rootfs changes (the
/// mmdebstrap command line, the customize hooks), so old cache entries are
/// not reused for a different result.
pub const RECIPE_FORMAT_VERSION: u32 = 1;

/// The built-in templates, embedded at compile time.
const BUILTIN: &[(&str, &str)] = &[
    (
        "python.toml",
        include_str!("../../../templates/python.toml"),
    ),
    ("node.toml", include_str!("../../../templates/node.toml")),
    (
        "python-node.toml",
        include_str!("../../../templates/python-node.toml"),
    ),
    (
        "python-gvisor.toml",
        include_str!("../../../templates/python-gvisor.toml"),
    ),
    (
        "python-microvm.toml",
        include_str!("../../../templates/python-microvm.toml"),
    ),
    (
        "python-crosvm.toml",
        include_str!("../../../templates/python-crosvm.toml"),
    ),
];

/// Defaults of the keys a template may leave out.
pub mod defaults {
    pub const SUITE: &str = "bookworm";
    pub const VARIANT: &str = "minbase";
    pub const VCPUS: u32 = 1;
    pub const MEMORY_MIB: u64 = 512;
    pub const PIDS: u64 = 256;
    pub const DISK_MIB: u64 = 1024;
    pub const UID: u32 = 1000;
    pub const GID: u32 = 1000;
    pub const USER: &str = "user";
    pub const WORKDIR: &str = crownest_proto::WORKSPACE;
    /// Where `npm install -g` puts packages (prefix `/usr/local`), added as
    /// `NODE_PATH` to a template with an `npm` layer so `require` finds them.
    pub const NODE_PATH: &str = "/usr/local/lib/node_modules";
}

/// Where a template came from, for error messages and `template list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// Embedded in the binary; the string is the file name under `templates/`.
    Builtin(&'static str),
    /// A file in the operator template directory.
    File(PathBuf),
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Builtin(name) => write!(f, "built-in templates/{name}"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read template file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A template that does not parse or validate: where, which key, why.
    #[error("{}", located(origin, *at, field.as_deref(), message))]
    Invalid {
        origin: String,
        /// 1-based line and column in the file, when known.
        at: Option<(usize, usize)>,
        /// The dotted key (`resources.memoryMiB`, `rootfs.files[0].src`).
        field: Option<String>,
        message: String,
    },
    #[error("template `{name}` is defined twice in the template directory: {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

fn located(origin: &str, at: Option<(usize, usize)>, field: Option<&str>, message: &str) -> String {
    let place = match at {
        Some((line, column)) => format!("{origin}:{line}:{column}"),
        None => origin.to_string(),
    };
    match field {
        Some(field) => format!("invalid template {place}: `{field}`: {message}"),
        None => format!("invalid template {place}: {message}"),
    }
}

/// What a template's rootfs starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// mmdebstrap of a Debian suite.
    Debian {
        suite: String,
        variant: String,
        /// Sorted and deduplicated, so the hash does not depend on order.
        packages: Vec<String>,
    },
    /// An OCI image in a local layout or archive. A registry reference
    /// would be a third form here, fetched into a layout before unpacking.
    Oci {
        image: PathBuf,
        reference: Option<String>,
    },
    /// An operator-prepared directory, copied.
    Dir { path: PathBuf },
}

impl RootfsSource {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Debian { .. } => "debian",
            Self::Oci { .. } => "oci",
            Self::Dir { .. } => "dir",
        }
    }
}

/// A file or directory copied into the rootfs at build time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    /// Absolute (relative ones are resolved against the template's dir).
    pub src: PathBuf,
    pub dest: String,
    /// Permission bits of the copy (of each file, for a directory); the
    /// source's when unset.
    pub mode: Option<u32>,
}

/// One build step on top of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    Pip(Vec<String>),
    Npm(Vec<String>),
    Files(Vec<FileCopy>),
    Run(Vec<String>),
}

impl Layer {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pip(_) => "pip",
            Self::Npm(_) => "npm",
            Self::Files(_) => "files",
            Self::Run(_) => "run",
        }
    }
}

/// How a template's root filesystem is built. Everything here (plus the
/// template's [`SandboxUser`], the content of every input and
/// [`RECIPE_FORMAT_VERSION`]) goes into [`Template::recipe_hash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsRecipe {
    pub source: RootfsSource,
    /// Applied in this order (the order the keys are written in).
    pub layers: Vec<Layer>,
}

/// One cached step of a build: the source (with the default user and the
/// mount points), then each layer. `key` chains the previous stage's, so a
/// stage is reused exactly when it and everything before it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub label: &'static str,
    pub key: String,
    /// What went into `key`, one item per line (written beside the build).
    pub canonical: String,
}

/// The output pipeline of one language: names of built plugins
/// (`<plugins dir>/<name>.wasm`) or absolute paths to components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanguagePlugins {
    pub adapter: String,
    pub formatter: String,
    pub policy: String,
    /// Strings each plugin gets with every call (`crownest:plugin@0.2.0`
    /// components; empty when unset).
    pub adapter_config: String,
    pub formatter_config: String,
    pub policy_config: String,
}

/// A plugin named by a template (resolved as `<plugins dir>/<name>.wasm`).
fn is_plugin_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value != "."
        && !value.contains("..")
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The longest plugin config string a template may set.
pub const MAX_PLUGIN_CONFIG_BYTES: usize = 64 * 1024;
/// The most variables a template's `[env]` may set, and the longest value.
pub const MAX_ENV_VARS: usize = 128;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// The longest `run` step.
pub const MAX_RUN_STEP_BYTES: usize = 64 * 1024;

/// Languages a template may list under `[languages.<name>]`.
pub const CODE_LANGUAGES: &[&str] = &["python", "javascript", "typescript"];

/// The interpreter a language's contexts run (looked up on the sandbox PATH).
pub fn interpreter_of(language: &str) -> &'static str {
    match language {
        "python" => "python3",
        _ => "node",
    }
}

/// Paths a `files` layer may not write to: mounted over in every sandbox.
const MOUNTED: &[&str] = &["/workspace", "/proc", "/sys", "/dev", "/run", "/tmp"];

/// A validated template.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub description: String,
    pub rootfs: RootfsRecipe,
    /// The runtime that runs its sandboxes, with its options.
    pub runtime: Isolation,
    pub resources: Resources,
    /// Egress policy: the ceiling a sandbox may narrow (`crate::egress`).
    pub network: crate::egress::Policy,
    /// The default command user; created in the rootfs at build time.
    pub user: SandboxUser,
    /// Name of the default user (its home is `/home/<user_name>`).
    pub user_name: String,
    /// Environment of every command and context, sorted by name (a
    /// sandbox's own `env` and a request's override it).
    pub env: Vec<(String, String)>,
    /// Default cwd of commands and contexts (absolute).
    pub workdir: String,
    /// Code Run languages this template supports, with the WASM components
    /// of their output pipeline. Not part of the recipe hash: changing a
    /// plugin needs no rootfs rebuild.
    pub languages: BTreeMap<String, LanguagePlugins>,
    pub source: TemplateSource,
    stages: Vec<Stage>,
    version: String,
    /// The file as read, to point at keys after the build.
    text: Arc<str>,
}

/// Reports a validation error at a key of one file.
struct Ctx<'t> {
    origin: String,
    doc: Doc<'t>,
}

impl Ctx<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> TemplateError {
        TemplateError::Invalid {
            origin: self.origin.clone(),
            at: self.doc.locate(field),
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    fn range(&self, field: &str, value: u64, min: u64, max: u64) -> Result<(), TemplateError> {
        if (min..=max).contains(&value) {
            Ok(())
        } else {
            Err(self.err(
                field,
                format!("{value} is out of range; allowed: {min}..={max}"),
            ))
        }
    }

    fn only(&self, field: &str, key: &str, wanted: &str, actual: &str) -> TemplateError {
        self.err(
            field,
            format!("applies only to {key} = \"{wanted}\"; remove it for \"{actual}\""),
        )
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Template {
    /// Parses and validates one template file. `expected_name`, when given,
    /// must equal the `name` field (operator files are named `<name>.toml`).
    /// Relative paths (`rootfs.image`, `rootfs.path`, `files[].src`) resolve
    /// against the file's directory, and the content they name is hashed.
    pub fn parse(
        text: &str,
        source: TemplateSource,
        expected_name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let cx = Ctx {
            origin: source.to_string(),
            doc: Doc::new(text),
        };
        let raw: RawTemplate = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            let span = e.span();
            TemplateError::Invalid {
                origin: cx.origin.clone(),
                at: span.as_ref().map(|s| cx.doc.line_col(s.start)),
                field: span
                    .filter(|_| !message.starts_with("missing field"))
                    .and_then(|s| cx.doc.path_at(s.start)),
                message,
            }
        })?;
        let base_dir = match &source {
            TemplateSource::File(path) => path.parent().map(Path::to_owned),
            TemplateSource::Builtin(_) => None,
        };

        if !is_name(&raw.name, 32) {
            return Err(cx.err(
                "name",
                format!(
                    "`{}` must be 1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit",
                    raw.name
                ),
            ));
        }
        if let Some(expected) = expected_name
            && expected != raw.name
        {
            return Err(cx.err(
                "name",
                format!(
                    "`{}` does not match the file name `{expected}.toml`",
                    raw.name
                ),
            ));
        }

        let runtime = parse_runtime(&cx, &raw.runtime)?;

        let r = &raw.resources;
        let vcpus = r.vcpus.unwrap_or(defaults::VCPUS);
        let memory_mib = r.memory_mib.unwrap_or(defaults::MEMORY_MIB);
        let pids = r.pids.unwrap_or(defaults::PIDS);
        let disk_mib = r.disk_mib.unwrap_or(defaults::DISK_MIB);
        cx.range("resources.vcpus", u64::from(vcpus), 1, 64)?;
        cx.range("resources.memoryMiB", memory_mib, 64, 65_536)?;
        cx.range("resources.pids", pids, 16, 32_768)?;
        cx.range("resources.diskMiB", disk_mib, 16, 65_536)?;
        let resources = Resources {
            vcpus,
            memory_mib,
            pids: i64::try_from(pids).unwrap_or(i64::MAX),
            disk_mib,
        };

        let network = crate::egress::Policy::parse(
            raw.network.mode.as_deref().unwrap_or("none"),
            &raw.network.allow,
            &raw.network.deny,
        )
        .map_err(|e| cx.err("network", e))?;

        // 0 is root; 65534 is nobody/nogroup, which is how host-owned files
        // (the shared rootfs) appear inside the user namespace.
        let uid = raw.user.uid.unwrap_or(defaults::UID);
        let gid = raw.user.gid.unwrap_or(defaults::GID);
        cx.range("user.uid", u64::from(uid), 1, 65_533)?;
        cx.range("user.gid", u64::from(gid), 1, 65_533)?;
        let user_name = raw
            .user
            .name
            .clone()
            .unwrap_or_else(|| defaults::USER.into());
        if !is_user_name(&user_name) {
            return Err(cx.err(
                "user.name",
                format!(
                    "`{user_name}` must be 1 to 32 characters of a-z, 0-9, '_' and '-', starting with a letter"
                ),
            ));
        }
        let user = SandboxUser { uid, gid };

        let workdir = raw
            .workdir
            .clone()
            .unwrap_or_else(|| defaults::WORKDIR.into());
        if !workdir.starts_with('/')
            || workdir.contains('\0')
            || workdir.len() > 4096
            || workdir.split('/').any(|part| part == "..")
        {
            return Err(cx.err(
                "workdir",
                format!(
                    "`{}` must be an absolute path without `..` (for example \"/workspace\")",
                    workdir.escape_debug()
                ),
            ));
        }
        let workdir = if workdir.len() > 1 {
            workdir.trim_end_matches('/').to_string()
        } else {
            workdir
        };

        let mut env: Vec<(String, String)> = Vec::new();
        if raw.env.len() > MAX_ENV_VARS {
            return Err(cx.err(
                "env",
                format!(
                    "{} variables; at most {MAX_ENV_VARS} are allowed",
                    raw.env.len()
                ),
            ));
        }
        for (key, value) in &raw.env {
            let field = format!("env.{key}");
            if !crate::core::commands::valid_env_name(key) {
                return Err(cx.err(
                    &field,
                    format!("`{key}` is not an environment variable name; allowed: letters, digits and '_', not starting with a digit"),
                ));
            }
            if value.contains('\0') || value.len() > MAX_ENV_VALUE_BYTES {
                return Err(cx.err(
                    &field,
                    format!("the value must have no NUL and at most {MAX_ENV_VALUE_BYTES} bytes"),
                ));
            }
            env.push((key.clone(), value.clone()));
        }

        let rootfs = parse_rootfs(&cx, &raw.rootfs, base_dir.as_deref())?;
        if rootfs.layers.iter().any(|l| matches!(l, Layer::Npm(_)))
            && !env.iter().any(|(k, _)| k == "NODE_PATH")
        {
            env.push((String::from("NODE_PATH"), String::from(defaults::NODE_PATH)));
            env.sort();
        }

        let languages = parse_languages(&cx, raw.languages)?;
        let stages = stages_of(&cx, &rootfs, &user_name, &user)?;
        let recipe = stages.last().map(|s| s.key.clone()).unwrap_or_default();
        let mut version = Sha256::new();
        version.update(recipe.as_bytes());
        version.update(b"\n");
        version.update(text.as_bytes());
        let version = hex::encode(version.finalize())[..16].to_string();

        Ok(Self {
            name: raw.name,
            description: raw.description,
            rootfs,
            runtime,
            resources,
            network,
            user,
            user_name,
            env,
            workdir,
            languages,
            source,
            stages,
            version,
            text: Arc::from(text),
        })
    }

    /// The canonical text of everything that determines the built rootfs,
    /// stage by stage. Line-oriented, so it is stable and easy to read in a
    /// cache entry.
    pub fn canonical_recipe(&self) -> String {
        self.stages
            .iter()
            .map(|s| s.canonical.as_str())
            .collect::<Vec<_>>()
            .join("")
    }

    /// Hex sha256 that identifies the built rootfs: the rootfs cache key.
    pub fn recipe_hash(&self) -> String {
        self.stages
            .last()
            .map(|s| s.key.clone())
            .unwrap_or_default()
    }

    /// The build's cached stages: the source, then each layer.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Changes with any edit of the file (the recipe or anything else), so
    /// a reload can tell an edited template from an unchanged one.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// An error at `field` of this template's file.
    pub fn error_at(&self, field: &str, message: impl Into<String>) -> TemplateError {
        Ctx {
            origin: self.source.to_string(),
            doc: Doc::new(&self.text),
        }
        .err(field, message)
    }

    /// What can only be checked once the rootfs is built: each language's
    /// interpreter is on the sandbox PATH, and the workdir exists.
    pub fn check_rootfs(&self, rootfs: &Path) -> Result<(), TemplateError> {
        // The template's env may set its own PATH (an image's /opt/…/bin).
        let path = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(crownest_proto::DEFAULT_PATH, |(_, v)| v.as_str());
        for language in self.languages.keys() {
            let program = interpreter_of(language);
            let found = path
                .split(':')
                .filter(|dir| dir.starts_with('/'))
                .any(|dir| crate::rootfs::exists_in(rootfs, &Path::new(dir).join(program)));
            if !found {
                return Err(self.error_at(
                    &format!("languages.{language}"),
                    format!(
                        "the built rootfs has no `{program}` on the sandbox PATH ({path}); install it (a package, a layer) or remove the language"
                    ),
                ));
            }
        }
        let under_workspace = Path::new(&self.workdir).starts_with(crownest_proto::WORKSPACE);
        if !under_workspace && !crate::rootfs::is_dir_in(rootfs, Path::new(&self.workdir)) {
            return Err(self.error_at(
                "workdir",
                format!(
                    "`{}` is not a directory in the built rootfs; create it in a layer, or use a path under /workspace (created at sandbox start)",
                    self.workdir
                ),
            ));
        }
        Ok(())
    }

    /// Every plugin the template names is built (a component file exists).
    pub fn check_plugins(&self, plugins_dir: &Path) -> Result<(), TemplateError> {
        for (language, plugins) in &self.languages {
            for (role, name) in [
                ("adapter", &plugins.adapter),
                ("formatter", &plugins.formatter),
                ("policy", &plugins.policy),
            ] {
                let path = crate::plugins::PluginHost::resolve(name, plugins_dir);
                if !path.is_file() {
                    return Err(self.error_at(
                        &format!("languages.{language}.{role}"),
                        format!(
                            "plugin `{name}` is not built: {} does not exist (build the plugins with scripts/setup or `crownest plugin build`, or name an absolute path)",
                            path.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Template {
    /// The template with every default filled in, as TOML (`template show`).
    pub fn resolved_toml(&self) -> String {
        use toml::Value;
        let strings =
            |items: &[String]| Value::Array(items.iter().cloned().map(Value::String).collect());
        let mut top = toml::Table::new();
        top.insert("name".into(), Value::String(self.name.clone()));
        top.insert(
            "description".into(),
            Value::String(self.description.clone()),
        );
        top.insert("workdir".into(), Value::String(self.workdir.clone()));
        top.insert("version".into(), Value::String(self.version.clone()));
        top.insert("recipeHash".into(), Value::String(self.recipe_hash()));
        let mut env = toml::Table::new();
        for (k, v) in &self.env {
            env.insert(k.clone(), Value::String(v.clone()));
        }
        top.insert("env".into(), Value::Table(env));
        let mut rootfs = toml::Table::new();
        rootfs.insert(
            "source".into(),
            Value::String(self.rootfs.source.kind().into()),
        );
        match &self.rootfs.source {
            RootfsSource::Debian {
                suite,
                variant,
                packages,
            } => {
                rootfs.insert("suite".into(), Value::String(suite.clone()));
                rootfs.insert("variant".into(), Value::String(variant.clone()));
                rootfs.insert("packages".into(), strings(packages));
            }
            RootfsSource::Oci { image, reference } => {
                rootfs.insert("image".into(), Value::String(image.display().to_string()));
                if let Some(r) = reference {
                    rootfs.insert("imageRef".into(), Value::String(r.clone()));
                }
            }
            RootfsSource::Dir { path } => {
                rootfs.insert("path".into(), Value::String(path.display().to_string()));
            }
        }
        for layer in &self.rootfs.layers {
            let value = match layer {
                Layer::Pip(items) | Layer::Npm(items) | Layer::Run(items) => strings(items),
                Layer::Files(files) => Value::Array(
                    files
                        .iter()
                        .map(|f| {
                            let mut t = toml::Table::new();
                            t.insert("src".into(), Value::String(f.src.display().to_string()));
                            t.insert("dest".into(), Value::String(f.dest.clone()));
                            if let Some(mode) = f.mode {
                                t.insert("mode".into(), Value::String(format!("{mode:04o}")));
                            }
                            Value::Table(t)
                        })
                        .collect(),
                ),
            };
            rootfs.insert(layer.kind().into(), value);
        }
        top.insert("rootfs".into(), Value::Table(rootfs));
        let mut runtime = toml::Table::new();
        runtime.insert("kind".into(), Value::String(self.runtime.kind().into()));
        if let Some(p) = self.runtime.platform() {
            runtime.insert("platform".into(), Value::String(p.as_str().into()));
        }
        if let Some(v) = self.runtime.vmm() {
            runtime.insert("vmm".into(), Value::String(v.as_str().into()));
        }
        if let Some(a) = self.runtime.accel() {
            runtime.insert("accel".into(), Value::String(a.as_str().into()));
        }
        top.insert("runtime".into(), Value::Table(runtime));
        let mut resources = toml::Table::new();
        resources.insert(
            "vcpus".into(),
            Value::Integer(i64::from(self.resources.vcpus)),
        );
        resources.insert(
            "memoryMiB".into(),
            Value::Integer(self.resources.memory_mib as i64),
        );
        resources.insert("pids".into(), Value::Integer(self.resources.pids));
        resources.insert(
            "diskMiB".into(),
            Value::Integer(self.resources.disk_mib as i64),
        );
        top.insert("resources".into(), Value::Table(resources));
        let mut network = toml::Table::new();
        network.insert(
            "mode".into(),
            Value::String(self.network.mode.as_str().into()),
        );
        network.insert("allow".into(), strings(&self.network.allow_texts()));
        network.insert("deny".into(), strings(&self.network.deny_texts()));
        top.insert("network".into(), Value::Table(network));
        let mut user = toml::Table::new();
        user.insert("uid".into(), Value::Integer(i64::from(self.user.uid)));
        user.insert("gid".into(), Value::Integer(i64::from(self.user.gid)));
        user.insert("name".into(), Value::String(self.user_name.clone()));
        top.insert("user".into(), Value::Table(user));
        let mut languages = toml::Table::new();
        for (name, l) in &self.languages {
            let mut t = toml::Table::new();
            for (k, v) in [
                ("adapter", &l.adapter),
                ("formatter", &l.formatter),
                ("policy", &l.policy),
                ("adapter_config", &l.adapter_config),
                ("formatter_config", &l.formatter_config),
                ("policy_config", &l.policy_config),
            ] {
                t.insert(k.into(), Value::String(v.clone()));
            }
            languages.insert(name.clone(), Value::Table(t));
        }
        top.insert("languages".into(), Value::Table(languages));
        format!(
            "# {}\n{}",
            self.source,
            toml::to_string_pretty(&top).unwrap_or_default()
        )
    }
}

fn parse_runtime(cx: &Ctx<'_>, rt: &RawRuntime) -> Result<Isolation, TemplateError> {
    let kind = rt.kind.as_deref().unwrap_or("oci");
    if kind != "gvisor" && rt.platform.is_some() {
        return Err(cx.only("runtime.platform", "kind", "gvisor", kind));
    }
    if kind != "microvm" {
        if rt.vmm.is_some() {
            return Err(cx.only("runtime.vmm", "kind", "microvm", kind));
        }
        if rt.accel.is_some() {
            return Err(cx.only("runtime.accel", "kind", "microvm", kind));
        }
    }
    Ok(match kind {
        "oci" => Isolation::Oci,
        "gvisor" => {
            let platform = match rt.platform.as_deref() {
                None => GvisorPlatform::Ptrace,
                Some(text) => GvisorPlatform::parse(text).ok_or_else(|| {
                    cx.err(
                        "runtime.platform",
                        format!(
                            "`{text}` is not a gVisor platform; use one of {}",
                            quoted(&GvisorPlatform::ALL.map(|p| p.as_str()))
                        ),
                    )
                })?,
            };
            Isolation::Gvisor { platform }
        }
        "microvm" => {
            let vmm = match rt.vmm.as_deref() {
                None => Vmm::Qemu,
                Some(text) => Vmm::parse(text).ok_or_else(|| {
                    cx.err(
                        "runtime.vmm",
                        format!(
                            "`{text}` is not a VMM; use one of {}",
                            quoted(&Vmm::ALL.map(|v| v.as_str()))
                        ),
                    )
                })?,
            };
            let accel = match rt.accel.as_deref() {
                None => Accel::Auto,
                Some(text) => Accel::parse(text).ok_or_else(|| {
                    cx.err(
                        "runtime.accel",
                        format!(
                            "`{text}` is not an accelerator; use one of {}",
                            quoted(&Accel::ALL.map(|a| a.as_str()))
                        ),
                    )
                })?,
            };
            if vmm == Vmm::Crosvm && accel == Accel::Tcg {
                return Err(cx.err(
                    "runtime.accel",
                    "crosvm runs only on KVM; use accel = \"kvm\" or \"auto\" with vmm = \"crosvm\", or vmm = \"qemu\" for \"tcg\"",
                ));
            }
            Isolation::Microvm { vmm, accel }
        }
        other => {
            return Err(cx.err(
                "runtime.kind",
                format!(
                    "`{other}` is not a runtime; use one of {}",
                    quoted(&["oci", "gvisor", "microvm"])
                ),
            ));
        }
    })
}

/// A path from the template, resolved against its directory.
fn resolve_path(
    cx: &Ctx<'_>,
    field: &str,
    value: &str,
    base_dir: Option<&Path>,
) -> Result<PathBuf, TemplateError> {
    if value.is_empty() || value.contains('\0') {
        return Err(cx.err(field, "must be a path"));
    }
    let path = Path::new(value);
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    match base_dir {
        Some(dir) => Ok(dir.join(path)),
        None => Err(cx.err(
            field,
            format!("`{value}` is relative, and a built-in template has no directory; use an absolute path"),
        )),
    }
}

fn parse_rootfs(
    cx: &Ctx<'_>,
    raw: &RawRootfs,
    base_dir: Option<&Path>,
) -> Result<RootfsRecipe, TemplateError> {
    let kind = raw.source.as_deref().unwrap_or("debian");
    let debian_keys = [
        ("rootfs.suite", raw.suite.is_some()),
        ("rootfs.variant", raw.variant.is_some()),
        ("rootfs.packages", raw.packages.is_some()),
    ];
    let oci_keys = [
        ("rootfs.image", raw.image.is_some()),
        ("rootfs.imageRef", raw.image_ref.is_some()),
    ];
    let dir_keys = [("rootfs.path", raw.path.is_some())];
    let forbid = |keys: &[(&str, bool)], wanted: &str| {
        keys.iter()
            .find(|(_, set)| *set)
            .map_or(Ok(()), |(field, _)| {
                Err(cx.only(field, "source", wanted, kind))
            })
    };
    let source = match kind {
        "debian" => {
            forbid(&oci_keys, "oci")?;
            forbid(&dir_keys, "dir")?;
            let suite = raw.suite.clone().unwrap_or_else(|| defaults::SUITE.into());
            if suite.is_empty()
                || !suite
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(cx.err(
                    "rootfs.suite",
                    format!("`{suite}` is not a Debian suite name (for example \"bookworm\")"),
                ));
            }
            const VARIANTS: &[&str] = &[
                "minbase",
                "essential",
                "apt",
                "required",
                "important",
                "standard",
            ];
            let variant = raw
                .variant
                .clone()
                .unwrap_or_else(|| defaults::VARIANT.into());
            if !VARIANTS.contains(&variant.as_str()) {
                return Err(cx.err(
                    "rootfs.variant",
                    format!(
                        "`{variant}` is not supported; use one of {}",
                        quoted(VARIANTS)
                    ),
                ));
            }
            let mut packages = raw.packages.clone().unwrap_or_default();
            if let Some(i) = packages.iter().position(|p| !is_debian_package(p)) {
                return Err(cx.err(
                    &format!("rootfs.packages[{i}]"),
                    format!("`{}` is not a Debian package name", packages[i]),
                ));
            }
            packages.sort();
            packages.dedup();
            RootfsSource::Debian {
                suite,
                variant,
                packages,
            }
        }
        "oci" => {
            forbid(&debian_keys, "debian")?;
            forbid(&dir_keys, "dir")?;
            let Some(image) = raw.image.as_deref() else {
                return Err(cx.err(
                    "rootfs.source",
                    "source = \"oci\" needs `image`: an oci-layout directory or an oci-archive/docker-archive tarball",
                ));
            };
            let image = resolve_path(cx, "rootfs.image", image, base_dir)?;
            if !image.exists() {
                return Err(cx.err(
                    "rootfs.image",
                    format!("{} does not exist", image.display()),
                ));
            }
            if let Some(reference) = &raw.image_ref
                && (reference.is_empty()
                    || reference.len() > 256
                    || reference.contains(char::is_whitespace))
            {
                return Err(cx.err(
                    "rootfs.imageRef",
                    "must be an image name or tag without spaces",
                ));
            }
            RootfsSource::Oci {
                image,
                reference: raw.image_ref.clone(),
            }
        }
        "dir" => {
            forbid(&debian_keys, "debian")?;
            forbid(&oci_keys, "oci")?;
            let Some(path) = raw.path.as_deref() else {
                return Err(cx.err(
                    "rootfs.source",
                    "source = \"dir\" needs `path`: the directory to copy",
                ));
            };
            let path = resolve_path(cx, "rootfs.path", path, base_dir)?;
            // A symlinked path (`/srv/current`) is hashed and copied as
            // the tree it points at.
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            if !path.is_dir() {
                return Err(cx.err(
                    "rootfs.path",
                    format!("{} is not a directory", path.display()),
                ));
            }
            RootfsSource::Dir { path }
        }
        other => {
            return Err(cx.err(
                "rootfs.source",
                format!(
                    "`{other}` is not a rootfs source; use one of {}",
                    quoted(&["debian", "oci", "dir"])
                ),
            ));
        }
    };

    // Layers in the order their keys are written.
    let order = cx.doc.key_order("rootfs");
    let mut present: Vec<(usize, &str)> = ["pip", "npm", "files", "run"]
        .into_iter()
        .map(|k| (order.iter().position(|o| o == k).unwrap_or(usize::MAX), k))
        .collect();
    present.sort();
    let mut layers = Vec::new();
    for (_, key) in present {
        let layer = match key {
            "pip" | "npm" => {
                let list = if key == "pip" { &raw.pip } else { &raw.npm };
                let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else {
                    continue;
                };
                for (i, spec) in list.iter().enumerate() {
                    if !is_package_spec(spec) {
                        return Err(cx.err(
                            &format!("rootfs.{key}[{i}]"),
                            format!(
                                "`{}` is not one argument (a requirement such as \"requests==2.32.3\", or an option such as \"--index-url=URL\"; no spaces or control characters)",
                                spec.escape_debug()
                            ),
                        ));
                    }
                }
                if key == "pip" {
                    Layer::Pip(list.clone())
                } else {
                    Layer::Npm(list.clone())
                }
            }
            "files" => {
                let Some(list) = raw.files.as_ref().filter(|l| !l.is_empty()) else {
                    continue;
                };
                let mut files = Vec::new();
                for (i, file) in list.iter().enumerate() {
                    let src =
                        resolve_path(cx, &format!("rootfs.files[{i}].src"), &file.src, base_dir)?;
                    if std::fs::symlink_metadata(&src).is_err() {
                        return Err(cx.err(
                            &format!("rootfs.files[{i}].src"),
                            format!("{} does not exist", src.display()),
                        ));
                    }
                    let dest = &file.dest;
                    let dest_field = format!("rootfs.files[{i}].dest");
                    if !dest.starts_with('/')
                        || dest == "/"
                        || dest.contains('\0')
                        || dest.split('/').any(|p| p == "..")
                    {
                        return Err(cx.err(
                            &dest_field,
                            format!(
                                "`{}` must be an absolute path other than / and without `..`",
                                dest.escape_debug()
                            ),
                        ));
                    }
                    if let Some(mount) = MOUNTED.iter().find(|m| Path::new(dest).starts_with(m)) {
                        return Err(cx.err(
                            &dest_field,
                            format!("`{dest}` is under {mount}, which every sandbox mounts over; copy it elsewhere"),
                        ));
                    }
                    let mode = match &file.mode {
                        None => None,
                        Some(mode) => Some(mode.value().filter(|m| *m <= 0o7777).ok_or_else(|| {
                            cx.err(
                                &format!("rootfs.files[{i}].mode"),
                                "must be permission bits 0..=0o7777, as an integer (0o644) or an octal string (\"0644\")",
                            )
                        })?),
                    };
                    files.push(FileCopy {
                        src,
                        dest: dest.trim_end_matches('/').to_string(),
                        mode,
                    });
                }
                Layer::Files(files)
            }
            _ => {
                let Some(steps) = raw.run.as_ref().filter(|l| !l.is_empty()) else {
                    continue;
                };
                for (i, step) in steps.iter().enumerate() {
                    if step.trim().is_empty()
                        || step.contains('\0')
                        || step.len() > MAX_RUN_STEP_BYTES
                    {
                        return Err(cx.err(
                            &format!("rootfs.run[{i}]"),
                            format!("a step must be a non-empty shell command of at most {MAX_RUN_STEP_BYTES} bytes without NUL"),
                        ));
                    }
                }
                Layer::Run(steps.clone())
            }
        };
        layers.push(layer);
    }
    Ok(RootfsRecipe { source, layers })
}

fn parse_languages(
    cx: &Ctx<'_>,
    raw: BTreeMap<String, RawLanguage>,
) -> Result<BTreeMap<String, LanguagePlugins>, TemplateError> {
    let mut languages = BTreeMap::new();
    for (language, plugins) in raw {
        let field = format!("languages.{language}");
        if !CODE_LANGUAGES.contains(&language.as_str()) {
            return Err(cx.err(
                &field,
                format!(
                    "unknown language `{language}`; supported: {}",
                    CODE_LANGUAGES.join(", ")
                ),
            ));
        }
        for (role, value) in [
            ("adapter", &plugins.adapter),
            ("formatter", &plugins.formatter),
            ("policy", &plugins.policy),
        ] {
            let field = format!("{field}.{role}");
            if value.trim().is_empty() {
                return Err(cx.err(&field, format!("`{language}` names an empty plugin")));
            }
            // A name resolves inside the plugins dir: it may not walk
            // out of it. Elsewhere, the operator gives an absolute path.
            let absolute = Path::new(value.as_str()).is_absolute();
            if !absolute && !is_plugin_name(value) {
                return Err(cx.err(
                    &field,
                    format!(
                        "`{language}` names plugin `{value}`: a plugin is the name of a built plugin \
                         (letters, digits, '-', '_' and '.', no '/' and no '..') or an absolute path to a component"
                    ),
                ));
            }
            if absolute && value.split('/').any(|part| part == "..") {
                return Err(cx.err(
                    &field,
                    format!(
                        "`{language}` names plugin `{value}`: an absolute path may not contain '..'"
                    ),
                ));
            }
        }
        for (role, config) in [
            ("adapter_config", &plugins.adapter_config),
            ("formatter_config", &plugins.formatter_config),
            ("policy_config", &plugins.policy_config),
        ] {
            if config.len() > MAX_PLUGIN_CONFIG_BYTES {
                return Err(cx.err(
                    &format!("{field}.{role}"),
                    format!(
                        "a plugin config of `{language}` is {} bytes; at most {MAX_PLUGIN_CONFIG_BYTES} are allowed",
                        config.len()
                    ),
                ));
            }
        }
        languages.insert(
            language,
            LanguagePlugins {
                adapter: plugins.adapter,
                formatter: plugins.formatter,
                policy: plugins.policy,
                adapter_config: plugins.adapter_config,
                formatter_config: plugins.formatter_config,
                policy_config: plugins.policy_config,
            },
        );
    }
    Ok(languages)
}

/// The build's stages and their chained keys. A Debian source with no
/// layers keeps the one-stage recipe text of earlier versions, so caches
/// built before layers existed stay valid.
fn stages_of(
    cx: &Ctx<'_>,
    rootfs: &RootfsRecipe,
    user_name: &str,
    user: &SandboxUser,
) -> Result<Vec<Stage>, TemplateError> {
    let user_line = format!("user={user_name}:{}:{}\n", user.uid, user.gid);
    let head = format!("crownest-rootfs-recipe v{RECIPE_FORMAT_VERSION}\n");
    let first = match &rootfs.source {
        RootfsSource::Debian {
            suite,
            variant,
            packages,
        } => format!(
            "{head}suite={suite}\nvariant={variant}\npackages={}\n{user_line}",
            packages.join(",")
        ),
        RootfsSource::Oci { image, reference } => {
            let source = crate::rootfs::oci::ImageSource::of(image);
            let digest =
                crate::rootfs::oci::image_digest(&source, reference.as_deref()).map_err(|e| {
                    let message = e.to_string();
                    // A reference the image does not have is the ref's fault.
                    let field = if reference.is_some() && message.contains("no manifest named") {
                        "rootfs.imageRef"
                    } else {
                        "rootfs.image"
                    };
                    cx.err(field, format!("cannot read the image: {message}"))
                })?;
            format!("{head}source=oci\nimage={digest}\n{user_line}")
        }
        RootfsSource::Dir { path } => {
            let digest = digest::tree(path).map_err(|e| {
                cx.err(
                    "rootfs.path",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            format!("{head}source=dir\ntree={digest}\n{user_line}")
        }
    };
    let mut stages = vec![Stage {
        label: rootfs.source.kind(),
        key: hex::encode(Sha256::digest(first.as_bytes())),
        canonical: first,
    }];
    for layer in &rootfs.layers {
        let mut text = format!("layer {}\n", layer.kind());
        match layer {
            Layer::Pip(items) | Layer::Npm(items) => {
                for item in items {
                    text.push_str(&format!("{item}\n"));
                }
            }
            Layer::Files(files) => {
                for (i, file) in files.iter().enumerate() {
                    let digest = digest::tree(&file.src).map_err(|e| {
                        cx.err(
                            &format!("rootfs.files[{i}].src"),
                            format!("cannot read {}: {e}", file.src.display()),
                        )
                    })?;
                    let mode = file
                        .mode
                        .map_or_else(|| String::from("source"), |m| format!("{m:o}"));
                    text.push_str(&format!("{} mode={mode} {digest}\n", file.dest));
                }
            }
            Layer::Run(steps) => {
                for step in steps {
                    text.push_str(&format!("{step:?}\n"));
                }
            }
        }
        let previous = stages.last().map(|s| s.key.clone()).unwrap_or_default();
        let key = hex::encode(Sha256::digest(format!("{previous}\n{text}").as_bytes()));
        stages.push(Stage {
            label: layer.kind(),
            key,
            canonical: text,
        });
    }
    Ok(stages)
}

/// All templates known to the host, by name.
#[derive(Debug, Clone)]
pub struct TemplateSet {
    templates: BTreeMap<String, Template>,
}

impl TemplateSet {
    /// The built-in templates, then every `*.toml` in `dir` (when given),
    /// replacing a built-in of the same name or adding a new one. Any invalid
    /// file is an error: a typo must not silently fall back to a default.
    pub fn load(dir: Option<&Path>) -> Result<Self, TemplateError> {
        let mut templates = BTreeMap::new();
        for (file, text) in BUILTIN {
            let stem = file.trim_end_matches(".toml");
            let t = Template::parse(text, TemplateSource::Builtin(file), Some(stem))?;
            templates.insert(t.name.clone(), t);
        }
        let Some(dir) = dir else {
            return Ok(Self { templates });
        };

        let read_dir = |e| TemplateError::ReadDir {
            path: dir.to_owned(),
            source: e,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut from_dir: BTreeMap<String, PathBuf> = BTreeMap::new();
        for path in files {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let t = Self::read_file(&path, Some(&stem))?;
            if let Some(first) = from_dir.insert(t.name.clone(), path.clone()) {
                return Err(TemplateError::Duplicate {
                    name: t.name,
                    first,
                    second: path,
                });
            }
            templates.insert(t.name.clone(), t);
        }
        Ok(Self { templates })
    }

    /// Reads and validates one template file (`template check`).
    pub fn read_file(path: &Path, expected_name: Option<&str>) -> Result<Template, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|e| TemplateError::ReadFile {
            path: path.to_owned(),
            source: e,
        })?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        Template::parse(&text, TemplateSource::File(path), expected_name)
    }

    /// A set of exactly these templates (tests, and hosts built in code).
    pub fn from_templates(templates: impl IntoIterator<Item = Template>) -> Self {
        Self {
            templates: templates.into_iter().map(|t| (t.name.clone(), t)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// All templates, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.templates.values()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
}

fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Debian policy 5.6.1: lower-case letters, digits, `+`, `-`, `.`; at least
/// two characters, starting with an alphanumeric. This also keeps package
/// names from smuggling options into the mmdebstrap command line.
fn is_debian_package(s: &str) -> bool {
    s.len() >= 2
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// One argument of `pip install` / `npm install -g`: a requirement
/// (`requests==2.32.3`, `@types/node@20`) or an option written as one
/// argument (`--index-url=http://…`, passed as written and hashed like the
/// rest). No whitespace or control characters: each item is one argument.
fn is_package_spec(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 2048
        && s != "-"
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    rootfs: RawRootfs,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    user: RawUser,
    #[serde(default)]
    languages: BTreeMap<String, RawLanguage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLanguage {
    adapter: String,
    formatter: String,
    policy: String,
    #[serde(default)]
    adapter_config: String,
    #[serde(default)]
    formatter_config: String,
    #[serde(default)]
    policy_config: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRootfs {
    source: Option<String>,
    suite: Option<String>,
    variant: Option<String>,
    packages: Option<Vec<String>>,
    image: Option<String>,
    #[serde(rename = "imageRef")]
    image_ref: Option<String>,
    path: Option<String>,
    pip: Option<Vec<String>>,
    npm: Option<Vec<String>>,
    files: Option<Vec<RawFile>>,
    run: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: String,
    dest: String,
    mode: Option<RawMode>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMode {
    Bits(u32),
    Octal(String),
}

impl RawMode {
    fn value(&self) -> Option<u32> {
        match self {
            Self::Bits(bits) => Some(*bits),
            Self::Octal(text) => {
                let digits = text.strip_prefix("0o").unwrap_or(text);
                u32::from_str_radix(digits, 8).ok()
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    kind: Option<String>,
    platform: Option<String>,
    vmm: Option<String>,
    accel: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    vcpus: Option<u32>,
    #[serde(rename = "memoryMiB")]
    memory_mib: Option<u64>,
    pids: Option<u64>,
    #[serde(rename = "diskMiB")]
    disk_mib: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUser {
    uid: Option<u32>,
    gid: Option<u32>,
    name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python_text() -> &'static str {
        BUILTIN[0].1
    }

    fn packages(t: &Template) -> &[String] {
        match &t.rootfs.source {
            RootfsSource::Debian { packages, .. } => packages,
            _ => &[],
        }
    }

    fn parse(text: &str) -> Result<Template, TemplateError> {
        Template::parse(text, TemplateSource::File("/ops/t.toml".into()), None)
    }

    #[test]
    fn builtin_templates_load_and_python_has_python_is_python3() {
        let set = TemplateSet::load(None).expect("builtins load");
        let names: Vec<_> = set.names().collect();
        assert_eq!(
            names,
            [
                "node",
                "python",
                "python-crosvm",
                "python-gvisor",
                "python-microvm",
                "python-node"
            ]
        );
        let py = set.get("python").expect("python");
        assert!(packages(py).iter().any(|p| p == "python-is-python3"));
        assert_eq!(py.runtime, Isolation::Oci);
        assert_eq!(py.network, crate::egress::Policy::none());
        assert_eq!(
            py.user,
            SandboxUser {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(py.resources.memory_mib, 512);
        let both = set.get("python-node").expect("python-node");
        for p in packages(py) {
            assert!(packages(both).contains(p), "python-node lacks {p}");
        }
        for p in packages(set.get("node").expect("node")) {
            assert!(packages(both).contains(p), "python-node lacks {p}");
        }
    }

    #[test]
    fn a_plugin_name_that_walks_out_of_the_plugins_dir_is_refused() {
        for bad in ["../../etc/evil", "a/b", "..", "/srv/../etc/x.wasm", "a b"] {
            let text = python_text().replace(
                "formatter = \"default-formatter\"",
                &format!("formatter = \"{bad}\""),
            );
            let err = parse(&text).expect_err(bad).to_string();
            assert!(err.contains("languages"), "{bad}: {err}");
        }
        for good in [
            "redact-formatter",
            "redact_formatter",
            "v1.2-fmt",
            "/srv/plugins/f.wasm",
        ] {
            let text = python_text().replace(
                "formatter = \"default-formatter\"",
                &format!("formatter = \"{good}\""),
            );
            parse(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn plugin_configs_are_kept_and_bounded() {
        let text = python_text().replace(
            "formatter = \"default-formatter\"",
            "formatter = \"default-formatter\"\nformatter_config = \"rows=10\"",
        );
        let template = parse(&text).expect("config");
        let python = &template.languages["python"];
        assert_eq!(python.formatter_config, "rows=10");
        assert_eq!(python.adapter_config, "");
        let huge = python_text().replace(
            "formatter = \"default-formatter\"",
            &format!(
                "formatter = \"default-formatter\"\npolicy_config = \"{}\"",
                "x".repeat(MAX_PLUGIN_CONFIG_BYTES + 1)
            ),
        );
        let err = parse(&huge).expect_err("too long").to_string();
        assert!(err.contains("at most 65536"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected_naming_file_and_field() {
        let text = python_text().replace("pids = 256", "pids = 256\nmemory = 3");
        let err = parse(&text).expect_err("unknown field").to_string();
        assert!(err.contains("/ops/t.toml"), "{err}");
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn network_policies_parse_and_a_bad_one_names_the_key_and_the_choices() {
        let text = python_text().replace("mode = \"none\"", "mode = \"bridge\"");
        let err = parse(&text).expect_err("bridge").to_string();
        assert!(err.contains("network"), "{err}");
        assert!(err.contains("\"none\", \"allow\" or \"open\""), "{err}");
        let text = python_text().replace(
            "mode = \"none\"",
            "mode = \"allow\"\nallow = [\"pypi.org\", \"*.pythonhosted.org\"]\ndeny = [\"x.org\"]",
        );
        let template = parse(&text).expect("allow");
        assert_eq!(template.network.mode, crate::egress::Mode::Allow);
        assert_eq!(
            template.network.allow_texts(),
            ["pypi.org", "*.pythonhosted.org"]
        );
        let text = python_text().replace("mode = \"none\"", "mode = \"allow\"\nallow = [\"*foo\"]");
        let err = parse(&text).expect_err("bad rule").to_string();
        assert!(err.contains("allow[0]"), "{err}");
    }

    #[test]
    fn an_unknown_runtime_kind_or_platform_names_the_file_the_key_and_the_choices() {
        let text = python_text().replace("kind = \"oci\"", "kind = \"firecracker\"");
        let err = parse(&text).expect_err("firecracker").to_string();
        assert!(
            err.contains("runtime.kind")
                && err.contains("\"gvisor\"")
                && err.contains("\"microvm\"")
                && err.contains("t.toml"),
            "{err}"
        );
        let text = python_text().replace("kind = \"oci\"", "kind = \"gvisor\"\nplatform = \"vmx\"");
        let err = parse(&text).expect_err("vmx").to_string();
        assert!(
            err.contains("runtime.platform") && err.contains("\"systrap\"") && err.contains("vmx"),
            "{err}"
        );
        let text = python_text().replace("kind = \"oci\"", "kind = \"oci\"\nplatform = \"kvm\"");
        let err = parse(&text).expect_err("oci platform").to_string();
        assert!(err.contains("runtime.platform"), "{err}");
    }

    #[test]
    fn python_gvisor_shares_the_python_rootfs_and_runs_on_ptrace() {
        let set = TemplateSet::load(None).expect("builtin");
        let (py, gv) = (
            set.get("python").expect("python"),
            set.get("python-gvisor").expect("python-gvisor"),
        );
        assert_eq!(py.recipe_hash(), gv.recipe_hash());
        assert_eq!(
            gv.runtime,
            Isolation::Gvisor {
                platform: GvisorPlatform::Ptrace
            }
        );
    }

    #[test]
    fn microvm_templates_name_their_vmm_and_accel_and_share_the_python_rootfs() {
        let set = TemplateSet::load(None).expect("builtins load");
        let python = set.get("python").expect("python");
        let vm = set.get("python-microvm").expect("python-microvm");
        assert_eq!(
            vm.runtime,
            Isolation::Microvm {
                vmm: Vmm::Qemu,
                accel: Accel::Auto
            }
        );
        assert_eq!(vm.recipe_hash(), python.recipe_hash());
        let crosvm = set.get("python-crosvm").expect("python-crosvm");
        assert_eq!(crosvm.runtime.vmm(), Some(Vmm::Crosvm));
        assert!(crosvm.description.contains("not exercised by CI"));

        let microvm = |extra: &str| {
            python_text().replace("kind = \"oci\"", &format!("kind = \"microvm\"\n{extra}"))
        };
        let defaults = parse(&microvm("")).expect("defaults");
        assert_eq!(
            defaults.runtime,
            Isolation::Microvm {
                vmm: Vmm::Qemu,
                accel: Accel::Auto
            }
        );
        let forced = parse(&microvm("vmm = \"qemu\"\naccel = \"tcg\"")).expect("tcg");
        assert_eq!(forced.runtime.accel(), Some(Accel::Tcg));
        for (extra, field, hint) in [
            ("vmm = \"firecracker\"", "runtime.vmm", "\"crosvm\""),
            ("accel = \"hvf\"", "runtime.accel", "\"tcg\""),
            (
                "vmm = \"crosvm\"\naccel = \"tcg\"",
                "runtime.accel",
                "only on KVM",
            ),
            ("platform = \"ptrace\"", "runtime.platform", "gvisor"),
        ] {
            let err = parse(&microvm(extra)).expect_err(extra).to_string();
            assert!(err.contains(field) && err.contains(hint), "{extra}: {err}");
        }
        let oci_with_vmm =
            python_text().replace("kind = \"oci\"", "kind = \"oci\"\nvmm = \"qemu\"");
        let err = parse(&oci_with_vmm).expect_err("vmm on oci").to_string();
        assert!(
            err.contains("runtime.vmm") && err.contains("microvm"),
            "{err}"
        );
    }

    #[test]
    fn package_name_that_looks_like_an_option_is_rejected() {
        let text = python_text().replace("\"python3\",", "\"--hook=evil\",");
        let err = parse(&text).expect_err("bad package").to_string();
        assert!(err.contains("rootfs.packages"), "{err}");
    }

    #[test]
    fn out_of_range_resources_and_root_user_are_rejected() {
        let text = python_text().replace("memoryMiB = 512", "memoryMiB = 1");
        assert!(
            parse(&text)
                .expect_err("tiny")
                .to_string()
                .contains("resources.memoryMiB")
        );
        let text = python_text().replace("uid = 1000", "uid = 0");
        assert!(
            parse(&text)
                .expect_err("root")
                .to_string()
                .contains("user.uid")
        );
    }

    #[test]
    fn recipe_hash_ignores_package_order_and_non_recipe_fields() {
        let a = parse(python_text()).expect("a");
        let reordered = python_text().replace(
            "\"python3\",\n    \"python-is-python3\",",
            "\"python-is-python3\",\n    \"python3\",\n    \"python3\",",
        );
        let b = parse(&reordered).expect("b");
        assert_eq!(a.recipe_hash(), b.recipe_hash());
        let c = parse(&python_text().replace("vcpus = 1", "vcpus = 2")).expect("c");
        assert_eq!(a.recipe_hash(), c.recipe_hash());
        assert_eq!(a.recipe_hash().len(), 64);
    }

    #[test]
    fn recipe_hash_changes_with_packages_suite_and_user() {
        let a = parse(python_text()).expect("a");
        let more =
            parse(&python_text().replace("\"python3\",", "\"python3\", \"git\",")).expect("b");
        let suite = parse(&python_text().replace("\"bookworm\"", "\"trixie\"")).expect("c");
        let user = parse(&python_text().replace("uid = 1000", "uid = 1001")).expect("d");
        for other in [&more, &suite, &user] {
            assert_ne!(a.recipe_hash(), other.recipe_hash());
        }
    }

    #[test]
    fn operator_dir_replaces_and_extends_builtins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let replaced = python_text().replace("memoryMiB = 512", "memoryMiB = 2048");
        std::fs::write(dir.path().join("python.toml"), replaced).expect("write");
        let extra = python_text().replace("name = \"python\"", "name = \"data\"");
        std::fs::write(dir.path().join("data.toml"), extra).expect("write");
        std::fs::write(dir.path().join("README.md"), "ignored").expect("write");

        let set = TemplateSet::load(Some(dir.path())).expect("load");

        assert_eq!(
            set.get("python").expect("python").resources.memory_mib,
            2048
        );
        assert!(matches!(
            set.get("python").expect("python").source,
            TemplateSource::File(_)
        ));
        assert!(set.get("data").is_some());
        assert!(set.get("node").is_some());
    }

    #[test]
    fn operator_file_whose_name_differs_from_its_file_name_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("other.toml"), python_text()).expect("write");
        let err = TemplateSet::load(Some(dir.path()))
            .expect_err("mismatch")
            .to_string();
        assert!(
            err.contains("other.toml") && err.contains("`name`"),
            "{err}"
        );
    }

    /// Ten (and more) broken templates: each error names the file, the
    /// line and column of the offending key or value, and the key.
    #[test]
    fn broken_templates_name_the_line_column_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("motd"), "hi").expect("src");
        let cases: &[(&str, &str, &str)] = &[
            (
                "name = \"t\"\ndescripton = \"typo\"\n",
                "t.toml:2:1: `descripton`",
                "unknown field `descripton`, expected one of",
            ),
            (
                "name = \"t\"\n[resources]\nmemory = 3\n",
                "t.toml:3:1: `resources.memory`",
                "`memoryMiB`",
            ),
            (
                "name = \"t\"\n[resources]\nmemoryMiB = \"512\"\n",
                "t.toml:3:13: `resources.memoryMiB`",
                "invalid type: string",
            ),
            (
                "name = \"t\"\n[resources]\npids = 5\n",
                "t.toml:3:8: `resources.pids`",
                "allowed: 16..=32768",
            ),
            (
                "name = \"t\"\n[runtime]\nkind = \"docker\"\n",
                "t.toml:3:8: `runtime.kind`",
                "\"oci\", \"gvisor\", \"microvm\"",
            ),
            (
                "name = \"t\"\n[rootfs]\nsource = \"oci\"\n",
                "t.toml:3:10: `rootfs.source`",
                "needs `image`",
            ),
            (
                "name = \"t\"\n[rootfs]\nsource = \"oci\"\nimage = \"nope.tar\"\n",
                "t.toml:4:9: `rootfs.image`",
                "does not exist",
            ),
            (
                "name = \"t\"\n[rootfs]\nfiles = [{ src = \"motd\", dest = \"/workspace/motd\" }]\n",
                "t.toml:3:33: `rootfs.files[0].dest`",
                "under /workspace",
            ),
            (
                "name = \"t\"\n[rootfs]\npip = [\"ok\", \"requests ==2\"]\n",
                "t.toml:3:14: `rootfs.pip[1]`",
                "no spaces or control characters",
            ),
            (
                "name = \"t\"\n[env]\n\"BAD-NAME\" = \"x\"\n",
                "t.toml:3:14: `env.BAD-NAME`",
                "not an environment variable name",
            ),
            (
                "name = \"t\"\n[languages.ruby]\nadapter = \"a\"\nformatter = \"f\"\npolicy = \"p\"\n",
                "t.toml:2:12: `languages.ruby`",
                "supported: python, javascript, typescript",
            ),
            (
                "name = \"t\"\n[rootfs]\nsource = \"oci\"\nsuite = \"bookworm\"\n",
                "t.toml:4:9: `rootfs.suite`",
                "applies only to source = \"debian\"",
            ),
            (
                "name = \"t\"\n[rootfs]\nfiles = [{ src = \"motd\", dest = \"/etc/motd\", mode = 0o17777 }]\n",
                "t.toml:3:53: `rootfs.files[0].mode`",
                "0..=0o7777",
            ),
            ("name = \"t\n", "t.toml:1:", "invalid basic string"),
            (
                "name = \"t\"\nworkdir = \"app\"\n",
                "t.toml:2:11: `workdir`",
                "absolute path",
            ),
        ];
        for (text, place, message) in cases {
            let path = dir.path().join("t.toml");
            std::fs::write(&path, text).expect("write");
            let err = TemplateSet::read_file(&path, None)
                .expect_err(text)
                .to_string();
            assert!(
                err.contains(place) && err.contains(message),
                "{text:?}\n  got: {err}\n  want: {place} … {message}"
            );
        }
    }

    #[test]
    fn layers_keep_their_written_order_and_every_input_is_in_the_recipe_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("motd"), "one").expect("src");
        let text = "name = \"t\"\n[rootfs]\nrun = [\"echo hi\"]\nfiles = [{ src = \"motd\", dest = \"/etc/motd\", mode = \"0600\" }]\npip = [\"requests==2.32.3\"]\n[env]\nA = \"1\"\n";
        let path = dir.path().join("t.toml");
        std::fs::write(&path, text).expect("write");
        let first = TemplateSet::read_file(&path, None).expect("valid");
        let kinds: Vec<_> = first.rootfs.layers.iter().map(Layer::kind).collect();
        assert_eq!(kinds, ["run", "files", "pip"]);
        let labels: Vec<_> = first.stages().iter().map(|s| s.label).collect();
        assert_eq!(labels, ["debian", "run", "files", "pip"]);
        assert_eq!(first.env, [("A".to_string(), "1".to_string())]);
        let Layer::Files(files) = &first.rootfs.layers[1] else {
            panic!("files layer");
        };
        assert_eq!(files[0].mode, Some(0o600));
        assert_eq!(files[0].src, dir.path().join("motd"));

        let same = TemplateSet::read_file(&path, None).expect("valid");
        assert_eq!(same.recipe_hash(), first.recipe_hash());
        assert_eq!(same.version(), first.version());

        // A file's content changes the files stage and what follows, not
        // what comes before it.
        std::fs::write(dir.path().join("motd"), "two").expect("src");
        let edited = TemplateSet::read_file(&path, None).expect("valid");
        assert_ne!(edited.recipe_hash(), first.recipe_hash());
        assert_eq!(edited.stages()[1].key, first.stages()[1].key);
        assert_ne!(edited.stages()[2].key, first.stages()[2].key);

        // env is not a rootfs input: a new version, the same rootfs.
        std::fs::write(&path, text.replace("A = \"1\"", "A = \"2\"")).expect("write");
        let env = TemplateSet::read_file(&path, None).expect("valid");
        assert_eq!(env.recipe_hash(), edited.recipe_hash());
        assert_ne!(env.version(), edited.version());
    }

    #[test]
    fn a_minimal_template_gets_every_default_and_show_prints_them() {
        let t = parse("name = \"mini\"\n").expect("minimal");
        assert_eq!(t.runtime, Isolation::Oci);
        assert_eq!(t.resources.memory_mib, defaults::MEMORY_MIB);
        assert_eq!(t.workdir, "/workspace");
        assert_eq!(t.user_name, "user");
        assert!(matches!(
            &t.rootfs.source,
            RootfsSource::Debian { suite, variant, .. } if suite == "bookworm" && variant == "minbase"
        ));
        let shown = t.resolved_toml();
        for needle in [
            "memoryMiB = 512",
            "workdir = \"/workspace\"",
            "source = \"debian\"",
            "kind = \"oci\"",
        ] {
            assert!(shown.contains(needle), "{needle} in\n{shown}");
        }
        let npm = parse("name = \"n\"\n[rootfs]\nnpm = [\"typescript@5\"]\n").expect("npm");
        assert!(
            npm.env
                .iter()
                .any(|(k, v)| k == "NODE_PATH" && v == defaults::NODE_PATH)
        );
    }

    #[test]
    fn the_builtin_recipe_hashes_did_not_change_with_layers() {
        // Caches built before sources and layers existed stay valid: a
        // Debian template without layers hashes the text it always did.
        let t = parse(python_text()).expect("python");
        let RootfsSource::Debian { packages, .. } = &t.rootfs.source else {
            panic!("debian");
        };
        let legacy = format!(
            "crownest-rootfs-recipe v1\nsuite=bookworm\nvariant=minbase\npackages={}\nuser=user:1000:1000\n",
            packages.join(",")
        );
        assert_eq!(
            t.recipe_hash(),
            hex::encode(Sha256::digest(legacy.as_bytes()))
        );
    }
}
