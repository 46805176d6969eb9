//! Sandbox templates: the operator-owned TOML files that say how a sandbox's
//! rootfs is built (Debian suite, variant, packages, default user), which
//! runtime runs it, its resource limits and its network policy.
//!
//! The built-in defaults (`templates/*.toml` at the repository root) are
//! embedded in the binary; an operator directory of `*.toml` files replaces
//! or extends them by name ([`TemplateSet::load`]). Every file is validated
//! when loaded, so a bad template fails at start-up with the file and field
//! named, never at sandbox creation.
//!
//! Schema (multi-word keys are camelCase):
//!
//! ```toml
//! name = "python"                 # [a-z0-9-], 1..=32 chars, = the file stem
//! description = "..."
//! [rootfs]
//! suite = "bookworm"              # Debian suite for mmdebstrap
//! variant = "minbase"             # minbase|essential|apt|required|important|standard
//! packages = ["python3", "..."]   # Debian package names, order irrelevant
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::runtime::{Accel, GvisorPlatform, Isolation, Resources, SandboxUser, Vmm};

/// Bumped whenever the way a recipe is turned into a rootfs changes (the
/// mmdebstrap command line, the customize hooks), so old cache entries are
/// not reused for a different result.
pub const RECIPE_FORMAT_VERSION: u32 = 1;

/// The built-in templates, embedded at compile time.
const BUILTIN: &[(&str, &str)] = &[
    ("python.toml", include_str!("../../templates/python.toml")),
    ("node.toml", include_str!("../../templates/node.toml")),
    (
        "python-node.toml",
        include_str!("../../templates/python-node.toml"),
    ),
    (
        "python-gvisor.toml",
        include_str!("../../templates/python-gvisor.toml"),
    ),
    (
        "python-microvm.toml",
        include_str!("../../templates/python-microvm.toml"),
    ),
    (
        "python-crosvm.toml",
        include_str!("../../templates/python-crosvm.toml"),
    ),
];

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
    #[error("invalid template {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid template {origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: &'static str,
        message: String,
    },
    #[error("template `{name}` is defined twice in the template directory: {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// How a template's root filesystem is built. Everything here (plus the
/// template's [`SandboxUser`] and [`RECIPE_FORMAT_VERSION`]) goes into
/// [`Template::recipe_hash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsRecipe {
    pub suite: String,
    pub variant: String,
    /// Sorted and deduplicated, so the hash does not depend on order.
    pub packages: Vec<String>,
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

/// Languages a template may list under `[languages.<name>]`.
pub const CODE_LANGUAGES: &[&str] = &["python", "javascript", "typescript"];

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
    /// Code Run languages this template supports, with the WASM components
    /// of their output pipeline. Not part of the recipe hash: changing a
    /// plugin needs no rootfs rebuild.
    pub languages: BTreeMap<String, LanguagePlugins>,
    pub source: TemplateSource,
}

impl Template {
    /// Parses and validates one template file. `expected_name`, when given,
    /// must equal the `name` field (operator files are named `<name>.toml`).
    pub fn parse(
        text: &str,
        source: TemplateSource,
        expected_name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let origin = source.to_string();
        let raw: RawTemplate = toml::from_str(text).map_err(|e| TemplateError::Parse {
            origin: origin.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |field: &'static str, message: String| TemplateError::Invalid {
            origin: origin.clone(),
            field,
            message,
        };

        if !is_name(&raw.name, 32) {
            return Err(invalid(
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
            return Err(invalid(
                "name",
                format!(
                    "`{}` does not match the file name `{expected}.toml`",
                    raw.name
                ),
            ));
        }
        if raw.rootfs.suite.is_empty()
            || !raw
                .rootfs
                .suite
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(
                "rootfs.suite",
                format!("`{}` is not a Debian suite name", raw.rootfs.suite),
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
        if !VARIANTS.contains(&raw.rootfs.variant.as_str()) {
            return Err(invalid(
                "rootfs.variant",
                format!(
                    "`{}` is not supported; use one of {}",
                    raw.rootfs.variant,
                    VARIANTS.join(", ")
                ),
            ));
        }
        let mut packages = raw.rootfs.packages.clone();
        if let Some(bad) = packages.iter().find(|p| !is_debian_package(p)) {
            return Err(invalid(
                "rootfs.packages",
                format!("`{bad}` is not a Debian package name"),
            ));
        }
        packages.sort();
        packages.dedup();

        const KINDS: &str = "\"oci\", \"gvisor\", \"microvm\"";
        let quoted = |names: Vec<&str>| {
            names
                .into_iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rt = &raw.runtime;
        let only = |field: &'static str, kind: &str| {
            invalid(
                field,
                format!(
                    "applies only to kind = \"{kind}\"; remove it for \"{}\"",
                    rt.kind
                ),
            )
        };
        if rt.kind != "gvisor" && rt.platform.is_some() {
            return Err(only("runtime.platform", "gvisor"));
        }
        if rt.kind != "microvm" {
            if rt.vmm.is_some() {
                return Err(only("runtime.vmm", "microvm"));
            }
            if rt.accel.is_some() {
                return Err(only("runtime.accel", "microvm"));
            }
        }
        let runtime = match rt.kind.as_str() {
            "oci" => Isolation::Oci,
            "gvisor" => {
                let platform = match rt.platform.as_deref() {
                    None => GvisorPlatform::Ptrace,
                    Some(text) => GvisorPlatform::parse(text).ok_or_else(|| {
                        invalid(
                            "runtime.platform",
                            format!(
                                "`{text}` is not a gVisor platform; use one of {}",
                                quoted(GvisorPlatform::ALL.map(|p| p.as_str()).to_vec())
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
                        invalid(
                            "runtime.vmm",
                            format!(
                                "`{text}` is not a VMM; use one of {}",
                                quoted(Vmm::ALL.map(|v| v.as_str()).to_vec())
                            ),
                        )
                    })?,
                };
                let accel = match rt.accel.as_deref() {
                    None => Accel::Auto,
                    Some(text) => Accel::parse(text).ok_or_else(|| {
                        invalid(
                            "runtime.accel",
                            format!(
                                "`{text}` is not an accelerator; use one of {}",
                                quoted(Accel::ALL.map(|a| a.as_str()).to_vec())
                            ),
                        )
                    })?,
                };
                if vmm == Vmm::Crosvm && accel == Accel::Tcg {
                    return Err(invalid(
                        "runtime.accel",
                        String::from(
                            "crosvm runs only on KVM; use accel = \"kvm\" or \"auto\" with vmm = \"crosvm\", or vmm = \"qemu\" for \"tcg\"",
                        ),
                    ));
                }
                Isolation::Microvm { vmm, accel }
            }
            other => {
                return Err(invalid(
                    "runtime.kind",
                    format!("`{other}` is not a runtime; use one of {KINDS}"),
                ));
            }
        };

        let r = &raw.resources;
        check_range(&invalid, "resources.vcpus", u64::from(r.vcpus), 1, 64)?;
        check_range(&invalid, "resources.memoryMiB", r.memory_mib, 64, 65_536)?;
        check_range(&invalid, "resources.pids", r.pids, 16, 32_768)?;
        check_range(&invalid, "resources.diskMiB", r.disk_mib, 16, 65_536)?;
        let resources = Resources {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            pids: i64::try_from(r.pids).unwrap_or(i64::MAX),
            disk_mib: r.disk_mib,
        };

        let network =
            crate::egress::Policy::parse(&raw.network.mode, &raw.network.allow, &raw.network.deny)
                .map_err(|e| invalid("network", e))?;

        // 0 is root; 65534 is nobody/nogroup, which is how host-owned files
        // (the shared rootfs) appear inside the user namespace.
        check_range(&invalid, "user.uid", u64::from(raw.user.uid), 1, 65_533)?;
        check_range(&invalid, "user.gid", u64::from(raw.user.gid), 1, 65_533)?;
        if !is_user_name(&raw.user.name) {
            return Err(invalid(
                "user.name",
                format!(
                    "`{}` must be 1 to 32 characters of a-z, 0-9, '_' and '-', starting with a letter",
                    raw.user.name
                ),
            ));
        }

        let mut languages = BTreeMap::new();
        for (language, plugins) in raw.languages {
            if !CODE_LANGUAGES.contains(&language.as_str()) {
                return Err(TemplateError::Invalid {
                    origin,
                    field: "languages",
                    message: format!(
                        "unknown language `{language}`; supported: {}",
                        CODE_LANGUAGES.join(", ")
                    ),
                });
            }
            for value in [&plugins.adapter, &plugins.formatter, &plugins.policy] {
                if value.trim().is_empty() {
                    return Err(TemplateError::Invalid {
                        origin,
                        field: "languages",
                        message: format!("`{language}` names an empty plugin"),
                    });
                }
                // A name resolves inside the plugins dir: it may not walk
                // out of it. Elsewhere, the operator gives an absolute path.
                let absolute = std::path::Path::new(value.as_str()).is_absolute();
                if !absolute && !is_plugin_name(value) {
                    return Err(TemplateError::Invalid {
                        origin,
                        field: "languages",
                        message: format!(
                            "`{language}` names plugin `{value}`: a plugin is the name of a built plugin \
                             (letters, digits, '-', '_' and '.', no '/' and no '..') or an absolute path to a component"
                        ),
                    });
                }
                if absolute && value.split('/').any(|part| part == "..") {
                    return Err(TemplateError::Invalid {
                        origin,
                        field: "languages",
                        message: format!(
                            "`{language}` names plugin `{value}`: an absolute path may not contain '..'"
                        ),
                    });
                }
            }
            for config in [
                &plugins.adapter_config,
                &plugins.formatter_config,
                &plugins.policy_config,
            ] {
                if config.len() > MAX_PLUGIN_CONFIG_BYTES {
                    return Err(TemplateError::Invalid {
                        origin,
                        field: "languages",
                        message: format!(
                            "a plugin config of `{language}` is {} bytes; at most {MAX_PLUGIN_CONFIG_BYTES} are allowed",
                            config.len()
                        ),
                    });
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
        Ok(Self {
            name: raw.name,
            description: raw.description,
            rootfs: RootfsRecipe {
                suite: raw.rootfs.suite,
                variant: raw.rootfs.variant,
                packages,
            },
            runtime,
            resources,
            network,
            user: SandboxUser {
                uid: raw.user.uid,
                gid: raw.user.gid,
            },
            user_name: raw.user.name,
            languages,
            source,
        })
    }

    /// The canonical text of everything that determines the built rootfs.
    /// Line-oriented, so it is stable and easy to read in a cache entry.
    pub fn canonical_recipe(&self) -> String {
        format!(
            "crownest-rootfs-recipe v{}\nsuite={}\nvariant={}\npackages={}\nuser={}:{}:{}\n",
            RECIPE_FORMAT_VERSION,
            self.rootfs.suite,
            self.rootfs.variant,
            self.rootfs.packages.join(","),
            self.user_name,
            self.user.uid,
            self.user.gid,
        )
    }

    /// Hex sha256 of [`Self::canonical_recipe`]: the rootfs cache key.
    pub fn recipe_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_recipe().as_bytes()))
    }
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
            let text = std::fs::read_to_string(&path).map_err(|e| TemplateError::ReadFile {
                path: path.clone(),
                source: e,
            })?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let t = Template::parse(&text, TemplateSource::File(path.clone()), Some(&stem))?;
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

fn check_range(
    invalid: &impl Fn(&'static str, String) -> TemplateError,
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), TemplateError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is out of range {min}..={max}"),
        ))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    #[serde(default)]
    description: String,
    rootfs: RawRootfs,
    runtime: RawRuntime,
    resources: RawResources,
    network: RawNetwork,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRootfs {
    suite: String,
    variant: String,
    #[serde(default)]
    packages: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    kind: String,
    platform: Option<String>,
    vmm: Option<String>,
    accel: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    vcpus: u32,
    #[serde(rename = "memoryMiB")]
    memory_mib: u64,
    pids: u64,
    #[serde(rename = "diskMiB")]
    disk_mib: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    uid: u32,
    gid: u32,
    name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python_text() -> &'static str {
        BUILTIN[0].1
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
        assert!(py.rootfs.packages.iter().any(|p| p == "python-is-python3"));
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
        for p in &py.rootfs.packages {
            assert!(both.rootfs.packages.contains(p), "python-node lacks {p}");
        }
        for p in &set.get("node").expect("node").rootfs.packages {
            assert!(both.rootfs.packages.contains(p), "python-node lacks {p}");
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
}
