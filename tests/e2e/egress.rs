//! Egress by policy: programs in a sandbox reach exactly what the template
//! and the sandbox allow, through the agent's proxy and the host. The
//! "internet" is an HTTP server on the host's loopback (a directory served
//! by python3's http.server, with a pip index and a dumb-http git repo);
//! the server under test allows 127.0.0.1 with `--egress-allow-private`.
//! Inside the sandbox, 127.0.0.1 is the sandbox's own loopback and is in
//! NO_PROXY, so commands clear NO_PROXY to send it through the proxy.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crownest_e2e::{Client, Server, error_code, shared};
use serde_json::{Value, json};

/// Runs a test on the runc and the gVisor egress template.
macro_rules! on_each_egress_runtime {
    (async fn $name:ident($template:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn on_runtime($template: &'static str) $body

            #[tokio::test]
            async fn oci() {
                on_runtime("python-egress").await
            }

            #[tokio::test]
            async fn gvisor() {
                on_runtime("python-egress-gvisor").await
            }
        }
    };
}

const BLOB_BYTES: usize = 4 << 20;
/// Clears NO_PROXY so that 127.0.0.1 (the host's test server) goes through
/// the proxy rather than to the sandbox's own loopback.
const VIA_PROXY: &str = "env NO_PROXY= no_proxy=";

/// A directory served over HTTP on the host's loopback; killed on drop.
struct Web {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn sh(dir: &Path, script: &str) {
    let status = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .expect("sh");
    assert!(status.success(), "{script}");
}

impl Web {
    fn start() -> Web {
        let dir = tempfile::tempdir().expect("web dir");
        let root = dir.path();
        std::fs::write(root.join("hello.txt"), "hello egress\n").expect("hello");
        let blob: Vec<u8> = (0..BLOB_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(root.join("blob.bin"), blob).expect("blob");
        // A pip "simple" index: /simple/demo-pkg/ lists one wheel.
        std::fs::create_dir_all(root.join("simple/demo-pkg")).expect("index");
        sh(
            &root.join("simple/demo-pkg"),
            r#"python3 - <<'PY'
import zipfile
with zipfile.ZipFile("demo_pkg-1.0-py3-none-any.whl", "w") as w:
    w.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
    w.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    w.writestr("demo_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    w.writestr("demo_pkg-1.0.dist-info/RECORD", "")
PY"#,
        );
        // A git repository over dumb http.
        sh(
            root,
            "git init -q work && cd work && echo 'cloned through the proxy' > README \
             && git add README && git -c user.name=t -c user.email=t@t commit -q -m one \
             && cd .. && git clone -q --bare work repo.git && git -C repo.git update-server-info",
        );
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test web server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Web {
            child,
            port,
            _dir: dir,
        }
    }
}

fn egress_server() -> Server {
    egress_server_with(&[])
}

/// The egress test server, with more environment for it.
fn egress_server_with(extra: &[(&str, &str)]) -> Server {
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    let mut env = vec![
        ("CROWNEST_TEMPLATES_DIR", templates.to_str().expect("utf8")),
        ("CROWNEST_EGRESS_ALLOW_PRIVATE", "127.0.0.1/32"),
    ];
    env.extend_from_slice(extra);
    Server::start_with_env(&env)
}

async fn create(client: &Client, template: &str, network: Value) -> (u16, Value) {
    client
        .post(
            "/v1/sandboxes",
            json!({ "template": template, "network": network }),
        )
        .await
}

async fn patch_network(client: &Client, sandbox: &str, network: Value) -> (u16, Value) {
    let response = client
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/sandboxes/{sandbox}/network"),
        )
        .json(&network)
        .send()
        .await
        .expect("patch");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn stdout(client: &Client, sandbox: &str, command: &str) -> String {
    let record = client.run(sandbox, command).await;
    assert_eq!(record["exitCode"], 0, "`{command}`: {record}");
    record["stdout"].as_str().expect("stdout").to_owned()
}

async fn bytes_in(client: &Client, sandbox: &str) -> u64 {
    let (status, body) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(status, 200, "{body}");
    body["network"]["bytesIn"].as_u64().expect("bytesIn")
}

/// Waits (10 s at most) until usage, which reads the store, counts at
/// least `at_least` egress bytes in for the sandbox.
async fn wait_for_usage(client: &Client, sandbox: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, usage) = client.get("/v1/usage?groupBy=sandbox").await;
        assert_eq!(status, 200, "{usage}");
        let counted = usage["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|l| l["key"] == sandbox)
            .and_then(|l| l["egressBytesIn"].as_u64())
            .unwrap_or(0);
        if counted >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage shows {counted} egress bytes: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `curl` through the proxy: the body, a space, the HTTP status.
async fn curl(client: &Client, sandbox: &str, url: &str) -> String {
    stdout(
        client,
        sandbox,
        &format!("{VIA_PROXY} curl -sS -w ' %{{http_code}}' {url}"),
    )
    .await
}

on_each_egress_runtime! {
async fn curl_urllib_pip_and_git_reach_an_allowed_host_and_nothing_else(template) {
    let web = Web::start();
    let server = egress_server();
    let client = server.client(&server.key("egress", None, "all"));
    let port = web.port;
    let (status, body) = create(
        &client,
        template,
        json!({ "allow": [format!("127.0.0.1:{port}"), format!("localhost:{port}")] }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["network"]["mode"], "allow", "{body}");
    let sandbox = body["id"].as_str().expect("id").to_owned();
    let url = format!("http://127.0.0.1:{port}");

    // Every way a tool goes through a proxy: an absolute URI, CONNECT,
    // SOCKS5 with remote DNS, Python's urllib by name, pip, git.
    for command in [
        format!("{VIA_PROXY} curl -sS {url}/hello.txt"),
        format!("{VIA_PROXY} curl -sS -p {url}/hello.txt"),
        format!("{VIA_PROXY} curl -sS --proxy socks5h://127.0.0.1:1080 {url}/hello.txt"),
        format!(
            "{VIA_PROXY} python3 -c \"import urllib.request; \
             print(urllib.request.urlopen('http://localhost:{port}/hello.txt').read().decode(), end='')\""
        ),
    ] {
        assert_eq!(stdout(&client, &sandbox, &command).await, "hello egress\n", "{command}");
    }
    let pip = stdout(
        &client,
        &sandbox,
        &format!(
            "{VIA_PROXY} pip download -q --no-deps --disable-pip-version-check \
             --index-url {url}/simple/ demo-pkg==1.0 -d dl && ls dl"
        ),
    )
    .await;
    assert_eq!(pip, "demo_pkg-1.0-py3-none-any.whl\n");
    let git = stdout(
        &client,
        &sandbox,
        &format!("{VIA_PROXY} git clone -q {url}/repo.git cloned && cat cloned/README"),
    )
    .await;
    assert_eq!(git, "cloned through the proxy\n");

    // The meters count what went through, within 1%.
    let before = bytes_in(&client, &sandbox).await;
    stdout(&client, &sandbox, &format!("{VIA_PROXY} curl -sS -o blob {url}/blob.bin && wc -c < blob")).await;
    let moved = bytes_in(&client, &sandbox).await - before;
    let size = BLOB_BYTES as u64;
    assert!(moved >= size && moved <= size + size / 100, "counted {moved} for {size}");
    // Usage has it too, once the connection's end is recorded.
    wait_for_usage(&client, &sandbox, before + size).await;

    // Another port is refused with its reason, by HTTP proxy and SOCKS.
    let other = free_port();
    let refused = curl(&client, &sandbox, &format!("http://127.0.0.1:{other}/")).await;
    assert!(
        refused.contains("egress_not_allowed") && refused.contains("not on the allow list") && refused.ends_with(" 403"),
        "{refused}"
    );
    let socks = client
        .run(&sandbox, &format!("{VIA_PROXY} curl -sS --proxy socks5h://127.0.0.1:1080 http://127.0.0.1:{other}/"))
        .await;
    assert_ne!(socks["exitCode"], 0, "{socks}");
    // The cloud metadata address, whatever is asked.
    let metadata = curl(&client, &sandbox, "http://169.254.169.254/latest/meta-data/").await;
    assert!(metadata.ends_with(" 403"), "{metadata}");
    let (status, audit) = client
        .get(&format!("/v1/audit-events?action=egress_denied&resourceId={sandbox}"))
        .await;
    assert_eq!(status, 200, "{audit}");
    let events = audit["data"].as_array().expect("data");
    assert!(
        events.iter().any(|e| e["details"]["target"] == format!("127.0.0.1:{other}")
            && e["details"]["errorCode"] == "egress_not_allowed"),
        "{audit}"
    );

    // Narrowing a live sandbox takes effect for new connections: with only
    // the address allowed, the name that resolves to it is refused, before
    // any lookup (a name never reaches an address through an address rule).
    let (status, body) = patch_network(&client, &sandbox, json!({ "allow": [format!("127.0.0.1:{port}")] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["network"]["allow"], json!([format!("127.0.0.1:{port}")]));
    let rebound = curl(&client, &sandbox, &format!("http://localhost:{port}/hello.txt")).await;
    assert!(rebound.contains("egress_not_allowed") && rebound.ends_with(" 403"), "{rebound}");
    assert_eq!(stdout(&client, &sandbox, &format!("{VIA_PROXY} curl -sS {url}/hello.txt")).await, "hello egress\n");
    // Widening past the template is refused, and changes nothing.
    for wider in [json!({ "allow": ["10.0.0.1"] }), json!({ "mode": "open" })] {
        let (status, body) = patch_network(&client, &sandbox, wider.clone()).await;
        assert_eq!((status, error_code(&body)), (400, "network_policy_too_wide"), "{wider}: {body}");
    }
    let (status, body) = create(&client, template, json!({ "allow": ["github.com"] })).await;
    assert_eq!((status, error_code(&body)), (400, "network_policy_too_wide"), "{body}");
    client.kill(&sandbox).await;
}
}

on_each_egress_runtime! {
async fn deny_wins_over_allow_and_none_turns_a_sandbox_off(template) {
    let web = Web::start();
    let server = egress_server();
    let client = server.client(&server.key("egress", None, "all"));
    let port = web.port;
    // The template allows 127.0.0.1 on any port, and denies port 9; this
    // sandbox also denies the web server's port.
    let (status, body) = create(&client, template, json!({ "deny": [format!("127.0.0.1:{port}")] })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["network"]["deny"], json!(["127.0.0.1:9", format!("127.0.0.1:{port}")]), "{body}");
    let sandbox = body["id"].as_str().expect("id").to_owned();
    let denied = stdout(
        &client,
        &sandbox,
        &format!("{VIA_PROXY} curl -sS -w ' %{{http_code}}' http://127.0.0.1:{port}/hello.txt; \
                  {VIA_PROXY} curl -sS -w ' %{{http_code}}' http://127.0.0.1:9/"),
    )
    .await;
    assert_eq!(denied.matches("egress_denied").count(), 2, "{denied}");
    client.kill(&sandbox).await;

    let (status, body) = create(&client, template, json!({ "mode": "none" })).await;
    assert_eq!(status, 201, "{body}");
    let sandbox = body["id"].as_str().expect("id").to_owned();
    let off = curl(&client, &sandbox, &format!("http://127.0.0.1:{port}/hello.txt")).await;
    assert!(off.contains("network_disabled") && off.ends_with(" 403"), "{off}");
    client.kill(&sandbox).await;
}
}

#[tokio::test]
async fn a_template_without_network_has_no_proxy_and_no_route() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let probe = "import os, socket\n\
                 print(os.environ.get('HTTP_PROXY'), os.environ.get('https_proxy'))\n\
                 for port in (3128, 1080):\n\
                 \x20   s = socket.socket(); s.settimeout(2); print(s.connect_ex(('127.0.0.1', port)))\n\
                 try:\n\
                 \x20   socket.create_connection(('203.0.113.1', 80), timeout=2); print('connected')\n\
                 except OSError as e:\n\
                 \x20   print('unreachable')\n";
    let out = stdout(
        &client,
        &sandbox,
        &format!("python3 -c {}", shell_quote(probe)),
    )
    .await;
    assert_eq!(out, "None None\n111\n111\nunreachable\n");
    let (_, body) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
    assert_eq!(body["network"]["mode"], "none", "{body}");
    client.kill(&sandbox).await;
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[tokio::test]
async fn a_narrowed_policy_and_the_meters_survive_a_kill_9_of_the_host() {
    let web = Web::start();
    let mut server = egress_server_with(&[("CROWNEST_DESTROY_ON_SHUTDOWN", "false")]);
    let key = server.key("egress-restart", None, "all");
    let client = server.client(&key);
    let port = web.port;
    let (status, body) = create(
        &client,
        "python-egress",
        json!({ "allow": [format!("127.0.0.1:{port}")] }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let sandbox = body["id"].as_str().expect("id").to_owned();
    let hello = format!("http://127.0.0.1:{port}/hello.txt");
    assert_eq!(curl(&client, &sandbox, &hello).await, "hello egress\n 200");
    let before = bytes_in(&client, &sandbox).await;
    assert!(before > 0);
    // The meter is committed (usage reads the store) before the crash.
    wait_for_usage(&client, &sandbox, before).await;

    server.kill9();
    server.start_again();
    let client = server.client(&key);
    // The adopted sandbox's proxy is served again, under the same policy.
    assert_eq!(curl(&client, &sandbox, &hello).await, "hello egress\n 200");
    let other = free_port();
    let refused = curl(&client, &sandbox, &format!("http://127.0.0.1:{other}/")).await;
    assert!(
        refused.contains("egress_not_allowed") && refused.ends_with(" 403"),
        "{refused}"
    );
    assert!(bytes_in(&client, &sandbox).await > before);
    client.kill(&sandbox).await;
    server.stop();
}
