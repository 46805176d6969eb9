//! The `gvisor` runtime (runsc): what differs from runc and must hold on
//! gVisor only, templates whose runtime this host cannot run, and
//! templates that name a runtime wrongly.

use crownest_e2e::{Server, crownest_bin, error_code, shared};
use serde_json::json;

#[tokio::test]
async fn a_gvisor_sandbox_runs_on_gvisors_kernel_and_sees_nothing_of_the_hosts() {
    let client = shared().client();
    let sandbox = client.sandbox("python-gvisor").await;
    let (_, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(row["runtime"], "gvisor", "{row}");

    let host_release = crownest_e2e::host_kernel_release();
    let inside = client.run(&sandbox, "uname -r; dmesg | head -1").await;
    let stdout = inside["stdout"].as_str().expect("stdout");
    let mut lines = stdout.lines();
    let release = lines.next().expect("uname line");
    assert_ne!(release, host_release, "the host kernel answered: {inside}");
    assert!(
        lines.next().is_some_and(|l| l.contains("gVisor")),
        "dmesg is not gVisor's: {inside}"
    );

    // The host kernel's symbols and mounts are not there to see.
    let probe = client
        .run(
            &sandbox,
            "cat /proc/kallsyms 2>/dev/null | head -3; echo ---; cat /proc/self/mountinfo",
        )
        .await;
    let stdout = probe["stdout"].as_str().expect("stdout");
    let (kallsyms, mountinfo) = stdout.split_once("---\n").expect("marker");
    assert!(
        kallsyms.trim().is_empty(),
        "host kernel symbols visible: {kallsyms}"
    );
    let data_dir = shared().data_dir.display().to_string();
    let agent = crownest_e2e::agent_bin();
    let agent_dir = agent.parent().expect("agent dir").display().to_string();
    for host_path in [
        data_dir.as_str(),
        agent_dir.as_str(),
        "/var/cache/crownest",
        "/rootfs/",
    ] {
        assert!(
            !mountinfo.contains(host_path),
            "a host path shows in mountinfo: {host_path} in {mountinfo}"
        );
    }
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn ls_and_stat_work_on_gvisor() {
    let client = shared().client();
    let sandbox = client.sandbox("python-gvisor").await;
    let out = client
        .run(
            &sandbox,
            "echo hi > f.txt && ls -l f.txt && stat -c '%s %U' f.txt",
        )
        .await;
    assert_eq!(out["exitCode"], 0, "{out}");
    let stdout = out["stdout"].as_str().expect("stdout");
    assert!(
        stdout.contains(" f.txt\n") && stdout.ends_with("3 user\n"),
        "{out}"
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn templates_show_their_runtime_and_a_missing_runsc_makes_gvisor_unavailable() {
    let listed = shared().client().get("/v1/templates").await.1;
    let find = |list: &serde_json::Value, name: &str| {
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no template {name} in {list}"))
    };
    let gvisor = find(&listed, "python-gvisor");
    assert_eq!(
        (
            &gvisor["runtime"],
            &gvisor["platform"],
            &gvisor["available"]
        ),
        (&json!("gvisor"), &json!("ptrace"), &json!(true)),
        "{gvisor}"
    );
    assert_eq!(find(&listed, "python")["runtime"], "oci");

    let server = Server::start_with_env(&[("CROWNEST_RUNSC", "/nonexistent/runsc")]);
    let key = server.key("no-gvisor", None, "all");
    let client = server.client(&key);
    let listed = client.get("/v1/templates").await.1;
    let gvisor = find(&listed, "python-gvisor");
    assert_eq!(gvisor["available"], false, "{gvisor}");
    let reason = gvisor["reason"].as_str().expect("reason");
    assert!(reason.contains("runsc"), "{reason}");
    assert_eq!(find(&listed, "python")["available"], true);

    let (status, body) = client
        .post("/v1/sandboxes", json!({ "template": "python-gvisor" }))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (409, "runtime_unavailable"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("apt-get install runsc"),
        "{body}"
    );
    let (_, list) = client.get("/v1/sandboxes").await;
    assert!(list["data"].as_array().expect("data").is_empty(), "{list}");
    assert!(server.runsc_containers().is_empty());
}

#[test]
fn a_template_with_an_unknown_runtime_or_platform_stops_the_server_with_the_file_key_and_choices() {
    for (runtime, key, choices) in [
        ("kind = \"firecracker\"", "runtime.kind", "\"microvm\""),
        (
            "kind = \"gvisor\"\nplatform = \"vmx\"",
            "runtime.platform",
            "\"systrap\"",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let python = include_str!("../../templates/python.toml");
        let text = python
            .replace("name = \"python\"", "name = \"odd\"")
            .replace("kind = \"oci\"", runtime);
        let file = dir.path().join("odd.toml");
        std::fs::write(&file, text).expect("write");
        let out = std::process::Command::new(crownest_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--templates-dir")
            .arg(dir.path())
            .output()
            .expect("serve");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("odd.toml") && stderr.contains(key) && stderr.contains(choices),
            "{stderr}"
        );
    }
}
