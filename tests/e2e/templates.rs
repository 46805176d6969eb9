//! Operator templates: the `oci` and `dir` sources, the pip/npm/files/run
//! layers and their cache, `[env]` and `workdir`, a failed build, the
//! template CLI, SIGHUP reload, and a sandbox's own `env` at create.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crownest::rootfs::oci::testing::{Entry, write_layout};
use crownest_e2e::{Server, code_run, crownest_bin, error_code, joined, shared};
use serde_json::{Value, json};
use sha2::Digest;

/// Busybox applets the test images link to.
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "test", "stat", "env", "sleep", "id", "printf", "true", "mkdir",
    "rm", "touch", "grep", "head",
];

fn busybox() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static; scripts/setup installs it)")
}

/// A world-searchable temporary dir (sandbox uids must walk into a cache
/// kept there).
fn searchable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cn-tmpl-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A directory tree with a static busybox as /bin and its applets.
fn busybox_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    std::fs::write(root.join("bin/busybox"), busybox()).expect("busybox");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
    }
}

/// Runs the CLI with a templates dir and a cache dir.
fn cli(templates: &Path, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(crownest_bin());
    command
        .args(args)
        .env("CROWNEST_TEMPLATES_DIR", templates)
        .env("CROWNEST_CACHE_DIR", cache);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run crownest")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn server_for(templates: &Path, cache: &Path) -> Server {
    Server::start_with_env(&[
        ("CROWNEST_TEMPLATES_DIR", templates.to_str().expect("utf8")),
        ("CROWNEST_CACHE_DIR", cache.to_str().expect("utf8")),
    ])
}

async fn stdout_of(client: &crownest_e2e::Client, sandbox: &str, command: &str) -> String {
    let record = client.run(sandbox, command).await;
    assert_eq!(record["exitCode"], 0, "`{command}`: {record}");
    record["stdout"].as_str().expect("stdout").to_string()
}

#[tokio::test]
async fn an_oci_template_from_a_layout_runs_commands_without_the_whiteouted_file() {
    let work = searchable_tempdir();
    let bb = busybox();
    let mut base: Vec<(String, Entry<'_>)> = vec![
        ("bin".into(), Entry::Dir),
        ("bin/busybox".into(), Entry::File(&bb, 0o755)),
        ("etc".into(), Entry::Dir),
        (
            "etc/kept".into(),
            Entry::File(b"kept by layer two\n", 0o644),
        ),
        (
            "etc/gone".into(),
            Entry::File(b"removed by layer two\n", 0o644),
        ),
        ("opt".into(), Entry::Dir),
        ("opt/old".into(), Entry::File(b"old\n", 0o644)),
    ];
    for applet in APPLETS {
        base.push((format!("bin/{applet}"), Entry::Link("busybox")));
    }
    let base: Vec<(&str, Entry<'_>)> = base.iter().map(|(p, e)| (p.as_str(), *e)).collect();
    let top: &[(&str, Entry<'_>)] = &[
        ("etc/.wh.gone", Entry::File(b"", 0o644)),
        ("opt/.wh..wh..opq", Entry::File(b"", 0o644)),
        ("opt/new", Entry::File(b"new\n", 0o644)),
    ];
    let layout = work.path().join("image");
    write_layout(&layout, "probe:1", &[&base, top]);

    let templates = work.path().join("templates");
    std::fs::create_dir(&templates).expect("templates");
    std::fs::write(
        templates.join("oci-probe.toml"),
        "name = \"oci-probe\"\nworkdir = \"/workspace/project\"\n[rootfs]\nsource = \"oci\"\nimage = \"../image\"\nimageRef = \"probe:1\"\n[resources]\nmemoryMiB = 128\n",
    )
    .expect("template");
    let cache = work.path().join("cache");

    let built = cli(&templates, &cache, &["template", "build", "oci-probe"], &[]);
    assert!(built.status.success(), "{}", text(&built));

    let server = server_for(&templates, &cache);
    let client = server.client(&server.key("org_oci", None, "all"));
    let (_, list) = client.get("/v1/templates").await;
    let view = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["name"] == "oci-probe")
        .expect("oci-probe listed")
        .clone();
    assert_eq!(view["source"], "oci", "{view}");
    assert_eq!(view["built"], true, "{view}");

    let sandbox = client.sandbox("oci-probe").await;
    let out = stdout_of(
        &client,
        &sandbox,
        "cat /etc/kept; ls /opt; test -e /etc/gone && echo gone-is-there || echo gone-is-absent; id -un",
    )
    .await;
    assert_eq!(
        out, "kept by layer two\nnew\ngone-is-absent\nuser\n",
        "{out}"
    );
    client.kill(&sandbox).await;
}

fn sh(script: &str, dir: &Path) {
    let out = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {}", text(&out));
}

#[test]
fn a_layout_made_by_umoci_unpacks_with_its_whiteout_and_its_tag_selects_it() {
    let work = searchable_tempdir();
    // Two layers: the first with /etc/gone, the second deleting it
    // (umoci writes the whiteout).
    sh(
        "umoci init --layout img
         umoci new --image img:v1
         umoci unpack --rootless --image img:v1 bundle
         mkdir -p bundle/rootfs/bin bundle/rootfs/etc
         cp /bin/busybox bundle/rootfs/bin/ && ln -s busybox bundle/rootfs/bin/sh
         echo gone > bundle/rootfs/etc/gone && echo kept > bundle/rootfs/etc/kept
         umoci repack --image img:v1 bundle && rm -rf bundle
         umoci unpack --rootless --image img:v1 bundle
         rm bundle/rootfs/etc/gone
         umoci repack --image img:v1 bundle && rm -rf bundle",
        work.path(),
    );
    let templates = work.path().join("templates");
    std::fs::create_dir(&templates).expect("templates");
    std::fs::write(
        templates.join("umoci-probe.toml"),
        "name = \"umoci-probe\"\n[rootfs]\nsource = \"oci\"\nimage = \"../img\"\nimageRef = \"img:v1\"\n",
    )
    .expect("template");
    let cache = work.path().join("cache");
    let out = cli(
        &templates,
        &cache,
        &["template", "build", "umoci-probe"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let rootfs = std::fs::read_dir(cache.join("rootfs"))
        .expect("rootfs")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .expect("built rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/kept")).expect("kept"),
        "kept\n"
    );
    assert!(
        !rootfs.join("etc/gone").exists(),
        "the whiteout was not applied"
    );
    assert!(rootfs.join("etc/passwd").is_file() && rootfs.join("workspace").is_dir());

    std::fs::write(
        templates.join("umoci-probe.toml"),
        "name = \"umoci-probe\"\n[rootfs]\nsource = \"oci\"\nimage = \"../img\"\nimageRef = \"v2\"\n",
    )
    .expect("template");
    let out = cli(
        &templates,
        &cache,
        &[
            "template",
            "check",
            templates.join("umoci-probe.toml").to_str().expect("utf8"),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains(":5:12: `rootfs.imageRef`")
            && text(&out).contains("no manifest named `v2`"),
        "{}",
        text(&out)
    );
}

/// A package index on 127.0.0.1 serving one wheel (pip's simple API) and
/// one npm package (the registry's packument and tarball).
struct LocalIndex {
    port: u16,
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

fn base64(bytes: &[u8], url_safe: bool) -> String {
    let table: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if !url_safe {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// A stored (uncompressed) zip: enough for a wheel.
fn zip(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        for part in [
            &0x0403_4b50u32.to_le_bytes()[..],
            &20u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0x21u16.to_le_bytes(),
            &crc.to_le_bytes(),
            &size.to_le_bytes(),
            &size.to_le_bytes(),
            &(name.len() as u16).to_le_bytes(),
            &0u16.to_le_bytes(),
            name.as_bytes(),
            data,
        ] {
            out.extend_from_slice(part);
        }
        for part in [
            &0x0201_4b50u32.to_le_bytes()[..],
            &20u16.to_le_bytes(),
            &20u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0x21u16.to_le_bytes(),
            &crc.to_le_bytes(),
            &size.to_le_bytes(),
            &size.to_le_bytes(),
            &(name.len() as u16).to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &0u16.to_le_bytes(),
            &(0o100644u32 << 16).to_le_bytes(),
            &offset.to_le_bytes(),
            name.as_bytes(),
        ] {
            central.extend_from_slice(part);
        }
    }
    let (central_offset, central_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    for part in [
        &0x0605_4b50u32.to_le_bytes()[..],
        &0u16.to_le_bytes(),
        &0u16.to_le_bytes(),
        &(files.len() as u16).to_le_bytes(),
        &(files.len() as u16).to_le_bytes(),
        &central_size.to_le_bytes(),
        &central_offset.to_le_bytes(),
        &0u16.to_le_bytes(),
    ] {
        out.extend_from_slice(part);
    }
    out
}

fn wheel() -> Vec<u8> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (
            "crownest_probe/__init__.py",
            b"VALUE = 'from-the-local-index'\n".to_vec(),
        ),
        (
            "crownest_probe-1.0.dist-info/METADATA",
            b"Metadata-Version: 2.1\nName: crownest-probe\nVersion: 1.0\n".to_vec(),
        ),
        (
            "crownest_probe-1.0.dist-info/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: crownest-e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
                .to_vec(),
        ),
    ];
    let mut record = String::new();
    for (name, data) in &files {
        record.push_str(&format!(
            "{name},sha256={},{}\n",
            base64(&sha2::Sha256::digest(data), true),
            data.len()
        ));
    }
    record.push_str("crownest_probe-1.0.dist-info/RECORD,,\n");
    files.push(("crownest_probe-1.0.dist-info/RECORD", record.into_bytes()));
    zip(&files)
}

fn npm_tarball() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in [
        (
            "package/package.json",
            &br#"{"name":"crownest-probe","version":"1.0.0","main":"index.js"}"#[..],
        ),
        (
            "package/index.js",
            &b"module.exports = { value: 'from-the-local-registry' };\n"[..],
        ),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        builder.append_data(&mut header, path, data).expect("entry");
    }
    let tar = builder.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    gz.finish().expect("gzip")
}

impl LocalIndex {
    fn start() -> LocalIndex {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let wheel = wheel();
        let tarball = npm_tarball();
        let wheel_name = "crownest_probe-1.0-py3-none-any.whl";
        let mut routes: HashMap<String, (&'static str, Vec<u8>)> = HashMap::new();
        routes.insert(
            "/simple/crownest-probe/".into(),
            (
                "text/html",
                format!(
                    "<html><body><a href=\"/files/{wheel_name}#sha256={}\">{wheel_name}</a></body></html>",
                    hex_of(&sha2::Sha256::digest(&wheel))
                )
                .into_bytes(),
            ),
        );
        routes.insert(
            format!("/files/{wheel_name}"),
            ("application/octet-stream", wheel),
        );
        let packument = json!({
            "name": "crownest-probe",
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {
                "name": "crownest-probe",
                "version": "1.0.0",
                "main": "index.js",
                "dist": {
                    "tarball": format!("http://127.0.0.1:{port}/crownest-probe/-/crownest-probe-1.0.0.tgz"),
                    "integrity": format!("sha512-{}", base64(&sha2::Sha512::digest(&tarball), false)),
                },
            }},
        });
        routes.insert(
            "/crownest-probe".into(),
            ("application/json", packument.to_string().into_bytes()),
        );
        routes.insert(
            "/crownest-probe/-/crownest-probe-1.0.0.tgz".into(),
            ("application/octet-stream", tarball),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .split('?')
                    .next()
                    .unwrap_or("/")
                    .to_string();
                let response = match routes.get(&path) {
                    Some((kind, body)) => {
                        let mut head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        head.extend_from_slice(body);
                        head
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = stream.write_all(&response);
            }
        });
        LocalIndex { port }
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const LAYERED: &str = r#"name = "layered"
description = "pip, npm, files and run layers from a local index"
workdir = "/workspace"

[env]
GREETING = "hello from the template"

[rootfs]
packages = ["python3", "python3-pip", "python3-ipython", "nodejs", "npm"]
pip = ["crownest-probe==1.0"]
npm = ["--registry=http://127.0.0.1:PORT/", "crownest-probe@1.0.0"]
files = [{ src = "motd.txt", dest = "/etc/crownest-motd", mode = "0640" }]
run = ["cat /etc/crownest-motd > /etc/built-by-run"]

[languages.python]
adapter = "ipython-adapter"
formatter = "default-formatter"
policy = "default-policy"
"#;

#[tokio::test]
async fn layers_install_from_a_local_index_copy_files_run_steps_and_set_env() {
    let index = LocalIndex::start();
    let work = searchable_tempdir();
    let templates = work.path().join("templates");
    std::fs::create_dir(&templates).expect("templates");
    // pip finds the index through the host's PIP_INDEX_URL, npm through
    // an option in the template.
    std::fs::write(
        templates.join("layered.toml"),
        LAYERED.replace("PORT", &index.port.to_string()),
    )
    .expect("template");
    std::fs::write(templates.join("motd.txt"), "first motd\n").expect("motd");
    let cache = work.path().join("cache");
    let pip_index = format!("http://127.0.0.1:{}/simple/", index.port);
    let env = [("PIP_INDEX_URL", pip_index.as_str())];

    let first = cli(&templates, &cache, &["template", "build", "layered"], &env);
    assert!(first.status.success(), "{}", text(&first));
    let again = cli(&templates, &cache, &["template", "build", "layered"], &env);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already built"), "{}", text(&again));

    let server = server_for(&templates, &cache);
    let client = server.client(&server.key("org_layers", None, "all"));
    let sandbox = client.sandbox("layered").await;
    let run = code_run(
        &client,
        &sandbox,
        json!({"language": "python", "code": "import crownest_probe, os\nprint(crownest_probe.VALUE, os.environ['GREETING'], os.getcwd())"}),
    )
    .await;
    assert_eq!(
        joined(&run["stdout"]),
        "from-the-local-index hello from the template /workspace\n",
        "{run}"
    );
    let out = stdout_of(
        &client,
        &sandbox,
        "node -e 'console.log(require(\"crownest-probe\").value)'; stat -c %a /etc/crownest-motd; cat /etc/built-by-run; echo \"$GREETING\"",
    )
    .await;
    assert_eq!(
        out, "from-the-local-registry\n640\nfirst motd\nhello from the template\n",
        "{out}"
    );
    client.kill(&sandbox).await;
    drop(server);

    // One file's content changes: the build runs again from the files
    // layer on (pip and npm come from their cached stages).
    std::fs::write(templates.join("motd.txt"), "second motd\n").expect("motd");
    let rebuilt = cli(&templates, &cache, &["template", "build", "layered"], &env);
    assert!(rebuilt.status.success(), "{}", text(&rebuilt));
    assert!(
        !text(&rebuilt).contains("already built"),
        "{}",
        text(&rebuilt)
    );
    let logs: Vec<PathBuf> = std::fs::read_dir(cache.join("logs"))
        .expect("logs")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 2, "{logs:?}");
    let second_log = logs
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("log"))
        .find(|log| !log.contains("pip install"))
        .expect("a log of a build that reused the pip and npm stages");
    assert!(
        second_log.contains("step 4/5 files") && second_log.contains("step 5/5 run"),
        "{second_log}"
    );

    let listed = cli(&templates, &cache, &["template", "ls", "--json"], &[]);
    let layered: Value = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
        .find(|t| t["name"] == "layered")
        .expect("layered listed");
    assert_eq!(layered["built"], true, "{layered}");
    assert!(
        layered["sizeBytes"].as_u64().expect("size") > 0,
        "{layered}"
    );

    // gc removes the first build (no template refers to it any more) and
    // keeps everything the current recipe uses.
    let gc = cli(
        &templates,
        &cache,
        &[
            "template",
            "gc",
            "--data-dir",
            work.path().join("none").to_str().expect("utf8"),
        ],
        &[],
    );
    assert!(
        !gc.status.success(),
        "gc without the server's database: {}",
        text(&gc)
    );
    assert!(
        text(&gc).contains("--ignore-live-sandboxes"),
        "{}",
        text(&gc)
    );
    let gc = cli(
        &templates,
        &cache,
        &["template", "gc", "--ignore-live-sandboxes"],
        &[],
    );
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(text(&gc).contains("freed"), "{}", text(&gc));
    let again = cli(&templates, &cache, &["template", "build", "layered"], &env);
    assert!(text(&again).contains("already built"), "{}", text(&again));
}

fn dir_template(name: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[rootfs]\nsource = \"dir\"\npath = \"../tree\"\n{extra}[resources]\nmemoryMiB = 128\n"
    )
}

#[tokio::test]
async fn a_failing_run_step_fails_the_build_with_its_output_and_caches_nothing() {
    let work = searchable_tempdir();
    busybox_tree(&work.path().join("tree"));
    let templates = work.path().join("templates");
    std::fs::create_dir(&templates).expect("templates");
    std::fs::write(
        templates.join("broken-run.toml"),
        dir_template(
            "broken-run",
            "run = [\"echo step-output-marker; echo to-stderr >&2; exit 3\"]\n",
        ),
    )
    .expect("template");
    let cache = work.path().join("cache");
    let out = cli(
        &templates,
        &cache,
        &["template", "build", "broken-run"],
        &[],
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("step-output-marker")
            && said.contains("to-stderr")
            && said.contains("step 2/2 run")
            && said.contains("full log: "),
        "{said}"
    );
    let entries: Vec<String> = std::fs::read_dir(cache.join("rootfs"))
        .expect("rootfs dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(entries.is_empty(), "half-written entries: {entries:?}");
    let ls = cli(&templates, &cache, &["template", "ls"], &[]);
    let line = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .find(|l| l.starts_with("broken-run"))
        .expect("listed")
        .to_string();
    assert!(line.contains("unbuilt") && line.contains("dir"), "{line}");
}

#[test]
fn template_check_names_the_line_and_key_and_show_fills_in_defaults() {
    let work = searchable_tempdir();
    let good = work.path().join("good.toml");
    std::fs::write(&good, "name = \"good\"\n").expect("good");
    let typo = work.path().join("typo.toml");
    std::fs::write(&typo, "name = \"typo\"\n[resources]\nmemoryMib = 512\n").expect("typo");
    let range = work.path().join("range.toml");
    std::fs::write(&range, "name = \"range\"\n[resources]\nvcpus = 65\n").expect("range");
    let missing_plugin = work.path().join("plugin.toml");
    std::fs::write(
        &missing_plugin,
        "name = \"plugin\"\n[languages.python]\nadapter = \"no-such-adapter\"\nformatter = \"default-formatter\"\npolicy = \"default-policy\"\n",
    )
    .expect("plugin");
    let out = Command::new(crownest_bin())
        .args(["template", "check"])
        .args([&good, &typo, &range, &missing_plugin])
        .output()
        .expect("check");
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("good.toml: ok: template `good`"), "{said}");
    assert!(
        said.contains("typo.toml:3:1: `resources.memoryMib`: unknown field `memoryMib`"),
        "{said}"
    );
    assert!(
        said.contains("range.toml:3:9: `resources.vcpus`: 65 is out of range; allowed: 1..=64"),
        "{said}"
    );
    assert!(
        said.contains(
            "plugin.toml:3:11: `languages.python.adapter`: plugin `no-such-adapter` is not built"
        ),
        "{said}"
    );
    assert!(said.contains("3 of 4 template files are invalid"), "{said}");

    let show = Command::new(crownest_bin())
        .args(["template", "show", "python"])
        .output()
        .expect("show");
    assert!(show.status.success(), "{}", text(&show));
    let shown = String::from_utf8_lossy(&show.stdout);
    for needle in [
        "name = \"python\"",
        "workdir = \"/workspace\"",
        "source = \"debian\"",
        "memoryMiB = 512",
        "recipeHash = ",
    ] {
        assert!(shown.contains(needle), "{needle} in {shown}");
    }
}

/// Polls the template list until `done` holds (a SIGHUP is handled
/// asynchronously).
async fn templates_until(
    client: &crownest_e2e::Client,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, list) = client.get("/v1/templates").await;
        assert_eq!(status, 200, "{list}");
        let data = list["data"].as_array().expect("data").clone();
        if done(&data) {
            return data;
        }
        assert!(Instant::now() < deadline, "templates never changed: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(data: &'a [Value], name: &str) -> Option<&'a Value> {
    data.iter().find(|t| t["name"] == name)
}

#[tokio::test]
async fn sighup_reloads_templates_and_a_live_sandbox_keeps_its_version() {
    let work = searchable_tempdir();
    busybox_tree(&work.path().join("tree"));
    let templates = work.path().join("templates");
    std::fs::create_dir(&templates).expect("templates");
    let v1 = dir_template("reload-a", "") + "[env]\nGREETING = \"v1\"\n";
    std::fs::write(templates.join("reload-a.toml"), &v1).expect("template");
    let cache = work.path().join("cache");
    let server = server_for(&templates, &cache);
    let client = server.client(&server.key("org_reload", None, "all"));

    let before = templates_until(&client, |d| find(d, "reload-a").is_some()).await;
    let old_version = find(&before, "reload-a").expect("a")["version"].clone();
    assert_eq!(
        find(&before, "reload-a").expect("a")["envKeys"],
        json!(["GREETING"])
    );
    let old = client.sandbox("reload-a").await;
    assert_eq!(stdout_of(&client, &old, "echo $GREETING").await, "v1\n");

    std::fs::write(
        templates.join("reload-a.toml"),
        v1.replace("\"v1\"", "\"v2\""),
    )
    .expect("edit");
    std::fs::write(
        templates.join("reload-b.toml"),
        dir_template("reload-b", ""),
    )
    .expect("add");
    let pid = server.pid().expect("pid");
    // SAFETY: kill(2) on the test's own child process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    let after = templates_until(&client, |d| find(d, "reload-b").is_some()).await;
    assert_ne!(find(&after, "reload-a").expect("a")["version"], old_version);

    // The old sandbox runs on the version it started with; a new one gets
    // the new version.
    assert_eq!(stdout_of(&client, &old, "echo $GREETING").await, "v1\n");
    let new = client.sandbox("reload-a").await;
    assert_eq!(stdout_of(&client, &new, "echo $GREETING").await, "v2\n");
    let b = client.sandbox("reload-b").await;
    assert_eq!(stdout_of(&client, &b, "echo ok").await, "ok\n");

    // An invalid directory keeps what was loaded.
    std::fs::write(
        templates.join("reload-c.toml"),
        "name = \"reload-c\"\nbogus = 1\n",
    )
    .expect("bad");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = templates_until(&client, |d| find(d, "reload-b").is_some()).await;
    assert!(find(&kept, "reload-c").is_none());
    assert_eq!(
        stdout_of(&client, &old, "echo still-here").await,
        "still-here\n"
    );
    for sandbox in [old, new, b] {
        client.kill(&sandbox).await;
    }
}

#[tokio::test]
async fn a_sandbox_env_reaches_commands_and_code_but_never_the_store_or_the_api() {
    let client = shared().client();
    let secret = "s3cr3t-value-7f1c9a";
    let digest = hex_of(&sha2::Sha256::digest(secret.as_bytes()));
    // Keyed, so the idempotency store holds the exchange too.
    let response = client
        .request(reqwest::Method::POST, "/v1/sandboxes")
        .header("Idempotency-Key", format!("env-{digest}"))
        .json(&json!({"template": "python", "env": {"API_TOKEN": secret, "GREETING": "from-the-sandbox"}}))
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    assert!(!created.to_string().contains(secret), "{created}");
    let sandbox = created["id"].as_str().expect("id").to_string();

    // The output names only the secret's digest: command output is kept.
    assert_eq!(
        stdout_of(
            &client,
            &sandbox,
            "printf %s \"$API_TOKEN\" | sha256sum | head -c 64; echo \" $GREETING\""
        )
        .await,
        format!("{digest} from-the-sandbox\n")
    );
    let (status, overridden) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({"command": "echo $GREETING", "env": {"GREETING": "from-the-command"}}),
        )
        .await;
    assert_eq!(status, 200, "{overridden}");
    assert_eq!(overridden["stdout"], "from-the-command\n");
    let run = code_run(
        &client,
        &sandbox,
        json!({"language": "python", "code": "import os, hashlib; print(hashlib.sha256(os.environ['API_TOKEN'].encode()).hexdigest())"}),
    )
    .await;
    assert_eq!(joined(&run["stdout"]), format!("{digest}\n"), "{run}");

    let (_, got) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    let (_, audit) = client.get("/v1/audit-events?limit=100").await;
    for body in [&got, &audit] {
        assert!(!body.to_string().contains(secret), "{body}");
    }
    client.kill(&sandbox).await;
    let data_dir = &shared().data_dir;
    for file in std::fs::read_dir(data_dir).expect("data dir").flatten() {
        let path = file.path();
        if path.is_file() {
            let mut bytes = Vec::new();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .expect("read");
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the secret is in {} in the clear",
                path.display()
            );
        }
    }

    let (status, bad) = client
        .post(
            "/v1/sandboxes",
            json!({"template": "python", "env": {"NOT-A-NAME": "x"}}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(error_code(&bad), "invalid_request", "{bad}");
}
