//! `crownest plugin check` and `crownest plugin run`: the plugin author's
//! tools, driven as a user runs them (no server).

use std::path::PathBuf;
use std::process::Command;

fn built(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: scripts/test builds it (cargo build --target wasm32-wasip2 --manifest-path plugins/Cargo.toml; scripts/build-plugin-examples)",
        path.display()
    );
    path
}

/// Runs `crownest plugin ARGS`; (exit code, stdout, stderr). The compile
/// cache is the plugin host tests' (entries are keyed by component digest
/// and engine configuration): the Python and JavaScript components take
/// seconds to compile.
fn plugin(args: &[&std::ffi::OsStr], _scratch: &std::path::Path) -> (i32, String, String) {
    let cache =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/test-compile-cache");
    let out = Command::new(crownest_e2e::crownest_bin())
        .arg("plugin")
        .args(args)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .expect("run crownest plugin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_names_the_world_the_wasi_imports_and_whether_it_loads() {
    let cache = tempfile::tempdir().expect("scratch dir");
    for (file, world, wasi) in [
        ("default_formatter.wasm", "output-formatter@0.1.0", false),
        ("std_probe.wasm", "output-formatter@0.1.0", true),
        ("table_formatter.wasm", "output-formatter@0.1.0", true),
        ("image_policy.wasm", "promotion-policy@0.1.0", false),
        ("config_formatter.wasm", "output-formatter@0.2.0", true),
    ] {
        let path = built(file);
        let (code, stdout, stderr) = plugin(&["check".as_ref(), path.as_os_str()], cache.path());
        assert_eq!(code, 0, "{file}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("world: crownest:plugin/{world}")),
            "{file}: {stdout}"
        );
        assert!(stdout.contains("loads: yes"), "{file}: {stdout}");
        assert_eq!(
            stdout.contains("wasi:cli/environment"),
            wasi,
            "{file}: {stdout}"
        );
    }
    // Not a component: refused, with the reason, exit code 1.
    let bogus = cache.path().join("bogus.wasm");
    std::fs::write(&bogus, b"\0asm not really").expect("write");
    let (code, stdout, _) = plugin(&["check".as_ref(), bogus.as_os_str()], cache.path());
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("loads: no: "), "{stdout}");
    // Built for a version no host links: refused, naming the supported ones.
    let future = built("future_formatter.wasm");
    let (code, stdout, _) = plugin(&["check".as_ref(), future.as_os_str()], cache.path());
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("crownest:plugin@9.9.9")
            && stdout.contains("crownest:plugin@0.1.0, crownest:plugin@0.2.0"),
        "{stdout}"
    );
}

#[test]
fn run_puts_the_component_in_the_pipeline_and_prints_what_came_out() {
    let cache = tempfile::tempdir().expect("scratch dir");
    let input = cache.path().join("events.json");
    std::fs::write(
        &input,
        r#"[{"type":"stream","name":"stdout","text":"hi\n"},
            {"type":"execute_result","execution_count":1,"data":{"text/plain":"   a\n0  1",
             "application/vnd.crownest.dataframe+json":{"columns":["a"],"index":["0"],"rows":[[1]]}}}]"#,
    )
    .expect("write");
    let formatter = built("table_formatter.wasm");
    let (code, stdout, stderr) = plugin(
        &[
            "run".as_ref(),
            formatter.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
        ],
        cache.path(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(printed["world"], "crownest:plugin/output-formatter@0.1.0");
    assert_eq!(printed["stdout"], serde_json::json!(["hi\n"]));
    assert_eq!(printed["outputs"][0]["format"], "markdown", "{printed}");
    assert_eq!(printed["outputs"][0]["decision"], "inline", "{printed}");

    // A failing call shows as a note (exit code 1), not a crash.
    std::fs::write(
        &input,
        r#"{"type":"execute_result","data":{"text/plain":"'fs'"}}"#,
    )
    .expect("write");
    let probe = built("std_probe.wasm");
    let (code, stdout, _) = plugin(
        &[
            "run".as_ref(),
            probe.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
        ],
        cache.path(),
    );
    assert_eq!(code, 1, "{stdout}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(
        printed["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("cannot read /etc/passwd")),
        "{printed}"
    );
    // Bad input is a clear error.
    std::fs::write(&input, "not json").expect("write");
    let (code, _, stderr) = plugin(
        &[
            "run".as_ref(),
            probe.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
        ],
        cache.path(),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("event 1 of"), "{stderr}");
}

/// `plugin new` then `plugin build` then `plugin check`/`run`, in each
/// language (one world each; all nine pairs build the same way).
#[test]
fn new_projects_build_load_and_run_in_rust_python_and_javascript() {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let componentize_py =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-venv/bin/componentize-py");
    assert!(
        componentize_py.is_file(),
        "componentize-py is missing: scripts/build-plugin-examples installs it"
    );
    let events = scratch.path().join("events.json");
    std::fs::write(
        &events,
        r#"[{"type":"stream","name":"stdout","text":"hi\n"},
            {"type":"execute_result","execution_count":3,"data":{"text/plain":"42"}},
            {"type":"error","ename":"ValueError","evalue":"bad","traceback":["\u001b[31mValueError\u001b[0m: bad"]}]"#,
    )
    .expect("write");
    for (lang, world, name) in [
        ("rust", "output-formatter", "my-formatter"),
        ("python", "result-adapter", "my-adapter"),
        ("js", "promotion-policy", "my-policy"),
    ] {
        let dir = scratch.path().join(name);
        let out = Command::new(crownest_e2e::crownest_bin())
            .args([
                "plugin", "new", name, "--lang", lang, "--world", world, "--dir",
            ])
            .arg(&dir)
            .output()
            .expect("plugin new");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join("README.md").is_file());
        let out = Command::new(crownest_e2e::crownest_bin())
            .args(["plugin", "build"])
            .arg(&dir)
            .env("CROWNEST_COMPONENTIZE_PY", &componentize_py)
            .output()
            .expect("plugin build");
        assert!(
            out.status.success(),
            "{lang}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let file = dir.join(format!("{}.wasm", name.replace('-', "_")));
        let (code, stdout, stderr) = plugin(&["check".as_ref(), file.as_os_str()], scratch.path());
        assert_eq!(code, 0, "{lang}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("world: crownest:plugin/{world}@0.2.0")),
            "{lang}: {stdout}"
        );
        let (code, stdout, stderr) = plugin(
            &[
                "run".as_ref(),
                file.as_os_str(),
                "--input".as_ref(),
                events.as_os_str(),
            ],
            scratch.path(),
        );
        assert_eq!(code, 0, "{lang}: {stdout}{stderr}");
        let printed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        assert_eq!(
            printed["stdout"],
            serde_json::json!(["hi\n"]),
            "{lang}: {printed}"
        );
        assert_eq!(printed["outputs"][0]["text"], "42", "{lang}: {printed}");
        assert_eq!(
            printed["outputs"][0]["decision"], "inline",
            "{lang}: {printed}"
        );
        assert_eq!(
            printed["error"]["traceback"],
            serde_json::json!(["ValueError: bad"]),
            "{lang}: {printed}"
        );
    }
    // A second `new` into the same place is refused, as is a bad name.
    let out = Command::new(crownest_e2e::crownest_bin())
        .args([
            "plugin",
            "new",
            "my-formatter",
            "--lang",
            "rust",
            "--world",
            "output-formatter",
            "--dir",
        ])
        .arg(scratch.path().join("my-formatter"))
        .output()
        .expect("plugin new");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    let out = Command::new(crownest_e2e::crownest_bin())
        .args([
            "plugin",
            "new",
            "../evil",
            "--lang",
            "rust",
            "--world",
            "output-formatter",
        ])
        .current_dir(scratch.path())
        .output()
        .expect("plugin new");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a plugin name"));
}
