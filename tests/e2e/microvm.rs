//! The `microvm` runtime on real QEMU (TCG here: nested KVM does not work
//! on these machines): one smoke of everything a sandbox does, the escape
//! probes that mean something in a VM, re-adoption after a host restart,
//! and a crosvm template on a host without crosvm. Each boot costs tens of
//! seconds under TCG, so the suite boots two guests in all.

use std::time::Duration;

use crownest_e2e::{Server, error_code, shared};
use serde_json::{Value, json};

const TEMPLATE: &str = "python-microvm";

/// QEMU processes whose command line names `sandbox`.
fn vmm_processes(sandbox: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains("qemu-system") && text.contains(sandbox) {
            found.push(pid);
        }
    }
    found
}

/// Waits until no VMM of `sandbox` runs (a kill waits for it, but the
/// check must not race the reaper).
async fn assert_no_vmm_left(sandbox: &str) {
    for _ in 0..100 {
        if vmm_processes(sandbox).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "a QEMU of {sandbox} is still running: {:?}",
        vmm_processes(sandbox)
    );
}

/// A tiny HTTP app on the guest's loopback port 8000.
const APP: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the guest"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"#;

#[tokio::test]
async fn a_microvm_sandbox_runs_commands_files_code_and_previews_in_its_own_kernel() {
    let server = shared();
    let client = server.client();
    let sandbox = client.sandbox(TEMPLATE).await;
    let (_, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(row["runtime"], "microvm", "{row}");
    assert_eq!(row["vmm"], "qemu", "{row}");
    assert_eq!(vmm_processes(&sandbox).len(), 1, "one QEMU for the sandbox");

    // A command.
    let run = client.run(&sandbox, "python3 -c 'print(40 + 2)'").await;
    assert_eq!(run["exitCode"], 0, "{run}");
    assert_eq!(run["stdout"], "42\n", "{run}");

    // A file written over the files API lands on the scratch disk and
    // reads back.
    client
        .write_file(&sandbox, "notes/hello.txt", "written from the host")
        .await;
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sandbox}/files?path=notes/hello.txt"),
        )
        .send()
        .await
        .expect("read");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.expect("body"),
        "written from the host"
    );
    let seen = client
        .run(&sandbox, "cat /workspace/notes/hello.txt; echo; stat -c %U /workspace; findmnt -n -o SOURCE,FSTYPE /workspace")
        .await;
    assert_eq!(
        seen["stdout"], "written from the host\nuser\n/dev/vdb ext4\n",
        "{seen}"
    );

    // A Code Run.
    let (status, code) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "code": "1+1", "language": "python" }),
        )
        .await;
    assert_eq!(status, 200, "{code}");
    assert_eq!(code["outputs"][0]["content"], "2", "{code}");

    // A preview through the agent's tunnel (the guest has no network).
    client.write_file(&sandbox, "app.py", APP).await;
    let (status, started) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 app.py", "background": true }),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    let (status, preview) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, 201, "{preview}");
    let url = preview["url"].as_str().expect("url").to_string();
    let browser = crownest_e2e::preview_client(&url);
    let mut page = (0, String::new());
    for _ in 0..300 {
        let response = browser
            .get(&url)
            .header("x-api-key", client.key.clone().unwrap_or_default())
            .send()
            .await
            .expect("preview");
        page = (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        );
        if page.0 != 502 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(page, (200, String::from("hello from the guest")));

    // The guest has no network device but loopback.
    let links = client.run(&sandbox, "ls /sys/class/net").await;
    assert_eq!(links["stdout"], "lo\n", "{links}");

    // Escape probes: its own kernel, no host filesystem, no host process.
    let host_release = crownest_e2e::host_kernel_release();
    let inside = client.run(&sandbox, "uname -r").await;
    let release = inside["stdout"]
        .as_str()
        .expect("stdout")
        .trim()
        .to_string();
    assert!(
        !release.is_empty() && release != host_release,
        "{release} vs {host_release}"
    );
    assert!(
        release.ends_with("cloud-amd64"),
        "not the guest kernel: {release}"
    );
    let data_dir = server.data_dir.display().to_string();
    let probe = client
        .run(
            &sandbox,
            &format!(
                "ls -d {data_dir} /var/cache/crownest 2>&1; echo ---; cat /proc/mounts; echo ---; \
                 cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '; echo ---; \
                 echo 1 > /proc/sys/kernel/modules_disabled 2>&1; cat /proc/sys/kernel/modules_disabled"
            ),
        )
        .await;
    let stdout = probe["stdout"].as_str().expect("stdout");
    let parts: Vec<&str> = stdout.split("---\n").collect();
    assert_eq!(parts.len(), 4, "{probe}");
    assert!(
        parts[0].matches("No such file or directory").count() == 2,
        "host paths visible in the guest: {}",
        parts[0]
    );
    for host_path in [data_dir.as_str(), "/var/cache/crownest", "virtiofs", "9p"] {
        assert!(
            !parts[1].contains(host_path),
            "{host_path} in the guest's mounts: {}",
            parts[1]
        );
    }
    assert!(
        !parts[2].contains("crownest serve") && !parts[2].contains("qemu-system"),
        "a host process is visible: {}",
        parts[2]
    );
    assert_eq!(
        parts[3].trim(),
        "1",
        "modules can still be loaded: {}",
        parts[3]
    );

    // The template's pids bound the sandbox user's processes.
    let nproc = client
        .run(
            &sandbox,
            "grep '^Max processes' /proc/self/limits | tr -s ' ' | cut -d' ' -f3,4",
        )
        .await;
    assert_eq!(nproc["stdout"], "256 256\n", "{nproc}");

    // A memory bomb ends inside the guest: the bomb dies, the agent and
    // the sandbox live on.
    let bomb = client
        .run(
            &sandbox,
            "python3 -c 'b = []\nwhile True: b.append(bytearray(16 << 20))'",
        )
        .await;
    assert_ne!(bomb["exitCode"], 0, "{bomb}");
    let after = client.run(&sandbox, "echo alive").await;
    assert_eq!(after["stdout"], "alive\n", "{after}");
    assert_eq!(vmm_processes(&sandbox).len(), 1, "the VM survived its bomb");

    client.kill(&sandbox).await;
    assert_no_vmm_left(&sandbox).await;
    let state = server.data_dir.join("sandboxes").join(&sandbox);
    assert!(
        !state.exists(),
        "state (and scratch disk) left at {}",
        state.display()
    );
}

#[tokio::test]
async fn a_microvm_outlives_a_host_crash_and_is_taken_over_with_its_files() {
    let mut server = Server::start_with_env(&[("CROWNEST_DESTROY_ON_SHUTDOWN", "false")]);
    let key = server.key("vm-org", None, "all");
    let client = server.client(&key);
    let sandbox = client.sandbox(TEMPLATE).await;
    client.write_file(&sandbox, "kept.txt", "still here").await;
    let (status, context) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "code": "x = 41", "language": "python" }),
        )
        .await;
    assert_eq!(status, 200, "{context}");

    server.kill9();
    assert_eq!(
        vmm_processes(&sandbox).len(),
        1,
        "the VM died with the host"
    );
    server.start_again();

    let client = server.client(&key);
    let (status, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(
        (status, row["status"].as_str()),
        (200, Some("running")),
        "{row}"
    );
    let run = client.run(&sandbox, "cat kept.txt").await;
    assert_eq!(run["stdout"], "still here", "{run}");
    let (status, code) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "code": "x + 1", "language": "python" }),
        )
        .await;
    assert_eq!(status, 200, "{code}");
    assert_eq!(
        code["outputs"][0]["content"], "42",
        "the context was lost: {code}"
    );

    client.kill(&sandbox).await;
    assert_no_vmm_left(&sandbox).await;
}

#[tokio::test]
async fn a_crosvm_template_on_a_host_without_crosvm_is_unavailable_and_creating_is_409() {
    let client = shared().client();
    let (status, templates) = client.get("/v1/templates").await;
    assert_eq!(status, 200);
    let crosvm: &Value = templates["data"]
        .as_array()
        .expect("templates")
        .iter()
        .find(|t| t["name"] == "python-crosvm")
        .expect("python-crosvm listed");
    assert_eq!(crosvm["runtime"], "microvm", "{crosvm}");
    assert_eq!(crosvm["vmm"], "crosvm", "{crosvm}");
    assert_eq!(crosvm["available"], false, "{crosvm}");
    let reason = crosvm["reason"].as_str().expect("reason");
    assert!(reason.contains("crosvm is not installed"), "{reason}");

    let (status, body) = client
        .post("/v1/sandboxes", json!({ "template": "python-crosvm" }))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "runtime_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("crosvm"),
        "{body}"
    );
}
