//! Harness for the end-to-end tests: starts the built `crownest` binary as
//! a real server on 127.0.0.1 with a temporary data dir, mints keys with
//! the operator CLI, and speaks HTTP to it.
//!
//! The binaries must be built first (the test command does it):
//! `cargo build -p crownest` and
//! `cargo build -p crownest-agent --target x86_64-unknown-linux-musl`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The cargo target dir this test binary was built into.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
}

/// The `crownest` binary under test.
pub fn crownest_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-… (tests) or target/<profile>/crownest-bench.
    let mut profile_dir = exe.parent().expect("exe dir");
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().expect("profile dir");
    }
    let bin = profile_dir.join("crownest");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p crownest` (the test command does)",
        bin.display()
    );
    bin
}

/// The static agent the server injects into sandboxes.
pub fn agent_bin() -> PathBuf {
    let own = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    for profile in [own, "debug", "release"] {
        let path = target_dir()
            .join("x86_64-unknown-linux-musl")
            .join(profile)
            .join("crownest-agent");
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "crownest-agent for x86_64-unknown-linux-musl is missing: build it with `cargo build -p crownest-agent --target x86_64-unknown-linux-musl`"
    );
}

/// Mints a key with the operator CLI on a data dir; `scopes` is a comma
/// list or `all`.
pub fn mint_key(data_dir: &Path, org: &str, project: Option<&str>, scopes: &str) -> String {
    let mut command = Command::new(crownest_bin());
    command.args(["keys", "create", "--org", org, "--scopes", scopes]);
    if let Some(p) = project {
        command.args(["--project", p]);
    }
    let out = command
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// A `crownest serve` child process.
pub struct Server {
    child: Option<Child>,
    pub base_url: String,
    pub data_dir: PathBuf,
    /// Keeps the temporary data dir alive (removed on drop).
    _tmp: Option<tempfile::TempDir>,
    pub env: Vec<(String, String)>,
}

impl Server {
    /// Starts a server on a fresh data dir.
    pub fn start() -> Server {
        Self::start_with_env(&[])
    }

    /// Starts a server with extra environment for the server process.
    pub fn start_with_env(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::Builder::new()
            .prefix("cn-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data_dir = tmp.path().to_path_buf();
        let mut server = Server {
            child: None,
            base_url: String::new(),
            data_dir,
            _tmp: Some(tmp),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new(crownest_bin());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .arg("--agent-binary")
            .arg(agent_bin())
            .env("CROWNEST_LOG", "info,tower_http=warn")
            // A test's server leaves nothing behind when it stops; tests of
            // restarts that keep sandboxes turn this off.
            .env("CROWNEST_DESTROY_ON_SHUTDOWN", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; it only sets this child's
        // parent-death signal so a crashed test run leaves no server behind.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn crownest serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read server stdout");
            assert!(n > 0, "server exited before listening (see its log above)");
            if let Some(url) = line.trim().strip_prefix("crownest listening on ") {
                self.base_url = url.to_string();
                break;
            }
            assert!(Instant::now() < deadline, "server did not start listening");
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        self.child = Some(child);
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the server with SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again after a `kill9`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn();
    }

    /// Runs the operator CLI against this server's data dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(crownest_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("run crownest cli")
    }

    /// Mints a key; `scopes` is a comma list or `all`.
    pub fn key(&self, org: &str, project: Option<&str>, scopes: &str) -> String {
        mint_key(&self.data_dir, org, project, scopes)
    }

    /// Ids of runc containers under this server's runc root.
    pub fn runc_containers(&self) -> Vec<String> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.data_dir.join("runc"))
            .args(["list", "--format", "json"])
            .output()
            .expect("runc list");
        let text = String::from_utf8_lossy(&out.stdout);
        let list: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        list.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ids of runsc (gVisor) containers under this server's runsc root.
    pub fn runsc_containers(&self) -> Vec<String> {
        let root = self.data_dir.join("runsc");
        if !root.exists() {
            return Vec::new();
        }
        let out = Command::new("runsc")
            .arg("--root")
            .arg(root)
            .args(["list", "-format", "json"])
            .output()
            .expect("runsc list");
        let text = String::from_utf8_lossy(&out.stdout);
        let list: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        list.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sets (or replaces) an environment variable of the server process
    /// for its next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn client(&self, key: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .expect("client"),
            base: self.base_url.clone(),
            key: Some(key.to_string()),
        }
    }

    pub fn anonymous(&self) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: self.base_url.clone(),
            key: None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        // A test that kept sandboxes across a restart and failed before
        // killing them leaves no container behind either.
        for id in self.runc_containers() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.data_dir.join("runc"))
                .args(["delete", "--force", &id])
                .status();
        }
        for id in self.runsc_containers() {
            let _ = Command::new("runsc")
                .arg("--root")
                .arg(self.data_dir.join("runsc"))
                .args(["delete", "-force", &id])
                .status();
        }
    }
}

/// The server most tests share (one per test binary), with an all-scopes
/// key. Started from a thread that lives as long as the process, so the
/// parent-death signal fires only when the test binary exits.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shared-server".into())
            .spawn(move || {
                let mut server = Server::start();
                let key = server.key("shared", None, "all");
                let info = (server.base_url.clone(), server.data_dir.clone(), key);
                // The test harness exits without running destructors of
                // statics: stop the server and remove its data dir at exit.
                let pid = server.pid().expect("pid");
                let tmp = server._tmp.take().expect("tempdir").keep();
                *lock_shared_cleanup() = Some((pid, tmp));
                // SAFETY: registers a plain extern "C" function with no
                // captured state; atexit has no other preconditions.
                unsafe {
                    libc::atexit(stop_shared_at_exit);
                }
                tx.send(info).expect("send");
                // Keep the server (and this thread) alive for the process.
                std::mem::forget(server);
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn shared server thread");
        let (base_url, data_dir, key) = rx.recv().expect("shared server started");
        Shared {
            base_url,
            data_dir,
            key,
        }
    })
}

fn lock_shared_cleanup() -> std::sync::MutexGuard<'static, Option<(u32, PathBuf)>> {
    static CLEANUP: std::sync::Mutex<Option<(u32, PathBuf)>> = std::sync::Mutex::new(None);
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn stop_shared_at_exit() {
    let Some((pid, dir)) = lock_shared_cleanup().take() else {
        return;
    };
    // SAFETY: signals and reaps our own child process by pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        while libc::waitpid(pid as i32, &mut status, libc::WNOHANG) == 0 {
            if Instant::now() > deadline {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, &mut status, 0);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

pub struct Shared {
    pub base_url: String,
    pub data_dir: PathBuf,
    pub key: String,
}

impl Shared {
    pub fn client(&self) -> Client {
        self.client_with(&self.key)
    }

    pub fn anonymous_client(&self) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: self.base_url.clone(),
            key: None,
        }
    }

    pub fn client_with(&self, key: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .expect("client"),
            base: self.base_url.clone(),
            key: Some(key.to_string()),
        }
    }

    /// Mints a key on the shared server's store.
    pub fn key(&self, org: &str, project: Option<&str>, scopes: &str) -> String {
        mint_key(&self.data_dir, org, project, scopes)
    }

    pub fn revoke(&self, key_id: &str) {
        let out = Command::new(crownest_bin())
            .args(["keys", "revoke", key_id, "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .expect("keys revoke");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A thin HTTP client returning (status, JSON body).
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub key: Option<String>,
}

impl Client {
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{}", self.base, path));
        match &self.key {
            Some(key) => builder.header("x-api-key", key),
            None => builder,
        }
    }

    async fn send(builder: reqwest::RequestBuilder) -> (u16, Value) {
        let response = builder.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("response is not JSON (status {status}): {text}"))
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        Self::send(self.request(reqwest::Method::POST, path).json(&body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Self::send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// Creates a sandbox and asserts it is running.
    pub async fn sandbox(&self, template: &str) -> String {
        let (status, body) = self
            .post("/v1/sandboxes", serde_json::json!({ "template": template }))
            .await;
        assert_eq!(status, 201, "create sandbox: {body}");
        assert_eq!(body["status"], "running", "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Runs a command to completion and returns the record.
    pub async fn run(&self, sandbox: &str, command: &str) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/sandboxes/{sandbox}/commands"),
                serde_json::json!({ "command": command }),
            )
            .await;
        assert_eq!(status, 200, "run `{command}`: {body}");
        body
    }

    pub async fn kill(&self, sandbox: &str) {
        let (status, body) = self.delete(&format!("/v1/sandboxes/{sandbox}")).await;
        assert_eq!(status, 200, "kill: {body}");
    }

    /// Writes `body` to `path` (URL-safe as given, relative to /workspace)
    /// over the files API and asserts it succeeded.
    pub async fn write_file(&self, sandbox: &str, path: &str, body: &str) {
        let response = self
            .request(
                reqwest::Method::PUT,
                &format!("/v1/sandboxes/{sandbox}/files?path={path}"),
            )
            .body(body.to_string())
            .send()
            .await
            .expect("write");
        assert!(
            response.status().is_success(),
            "write {path}: {}",
            response.status()
        );
    }
}

/// The chunks of a Code Run's `stdout` or `stderr`, joined.
pub fn joined(chunks: &Value) -> String {
    chunks
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c.as_str().expect("chunk"))
        .collect()
}

/// Runs code (`POST …/code/runs` with `body`) and asserts it answered 200.
pub async fn code_run(client: &Client, sandbox: &str, body: Value) -> Value {
    let (status, result) = client
        .post(&format!("/v1/sandboxes/{sandbox}/code/runs"), body)
        .await;
    assert_eq!(status, 200, "{result}");
    result
}

/// The host's kernel release (`uname -r`), to tell a sandbox's own kernel
/// from it.
pub fn host_kernel_release() -> String {
    let out = Command::new("uname").arg("-r").output().expect("uname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts the error envelope shape and returns the code.
pub fn error_code(body: &Value) -> &str {
    let error = &body["error"];
    assert!(error["message"].is_string(), "no error message in {body}");
    assert!(
        error["details"].is_object(),
        "no error details object in {body}"
    );
    error["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

/// One parsed server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// Incremental SSE parser over response chunks.
#[derive(Default)]
pub struct SseParser {
    buffer: String,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = SseEvent {
                id: None,
                event: String::from("message"),
                data: Value::Null,
            };
            let mut data = String::new();
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    event.id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event.event = v.trim().to_string();
                    any = true;
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    any = true;
                }
            }
            if any {
                event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                events.push(event);
            }
        }
        events
    }
}

/// A client for a preview URL: its host (`prv-….localhost:PORT`, which
/// browsers resolve to loopback on their own) resolved to 127.0.0.1, no
/// redirects followed, no key sent.
pub fn preview_client(url: &str) -> reqwest::Client {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .map_or((authority, 80), |(h, p)| (h, p.parse().unwrap_or(80)));
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .expect("preview client")
}
