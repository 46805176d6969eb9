//! The CrowNest benchmark: starts the built `crownest` server, measures the
//! API paths a client waits on, measures the runc baselines a user would
//! otherwise pick in the same run, and prints one table.
//!
//! Run with: `scripts/bench` (builds release binaries, then runs this).

use std::process::Command;
use std::time::{Duration, Instant};

use crownest_e2e::Server;
use serde_json::{Value, json};

struct Row {
    name: String,
    samples: Vec<Duration>,
    target: &'static str,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn runc(server: &Server) -> Command {
    let mut command = Command::new("runc");
    command.arg("--root").arg(server.data_dir.join("runc"));
    command
}

fn container_pid(server: &Server, id: &str) -> Option<u32> {
    let out = runc(server).args(["state", id]).output().ok()?;
    let state: Value = serde_json::from_slice(&out.stdout).ok()?;
    state["pid"].as_u64().map(|p| p as u32)
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::var("CROWNEST_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let creates: usize = (iterations / 10).max(5);
    // `CROWNEST_BENCH_ONLY=egress`: just the egress table.
    if std::env::var("CROWNEST_BENCH_ONLY").as_deref() == Ok("egress") {
        println!("{}", egress_measurements(iterations).await);
        return;
    }
    // `CROWNEST_BENCH_ONLY=microvm`: just the microVM table.
    if std::env::var("CROWNEST_BENCH_ONLY").as_deref() == Ok("microvm") {
        println!("{}", microvm_measurements().await);
        return;
    }
    // No per-key rate limit: the bench measures latency, one key at a time.
    let mut server = Server::start_with_env(&[("CROWNEST_RATE_LIMIT", "0")]);
    let client = server.client(&server.key("bench", None, "all"));
    let mut rows = Vec::new();

    // Warm-up: the rootfs is built and the page cache is warm.
    let warm = client.sandbox("python").await;
    client.run(&warm, "true").await;

    // Create -> first command result, no warm pool.
    let mut samples = Vec::new();
    for _ in 0..creates {
        let start = Instant::now();
        let id = client.sandbox("python").await;
        let result = client.run(&id, "true").await;
        samples.push(start.elapsed());
        assert_eq!(result["exitCode"], 0);
        client.kill(&id).await;
    }
    rows.push(Row {
        name: "create -> first command result".into(),
        samples,
        target: "p50 <= 150 ms",
    });

    // Command round trip on a live sandbox.
    let mut samples = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let result = client.run(&warm, "true").await;
        samples.push(start.elapsed());
        assert_eq!(result["exitCode"], 0);
    }
    rows.push(Row {
        name: "command round trip (`true`, HTTP)".into(),
        samples,
        target: "p50 <= 3 ms, >= 3x faster than runc exec",
    });

    // Baseline: runc exec into the same running container.
    let mut samples = Vec::new();
    for _ in 0..iterations.min(100) {
        let start = Instant::now();
        let status = runc(&server)
            .args(["exec", "--user", "1000:1000", &warm, "/bin/true"])
            .status()
            .expect("runc exec");
        samples.push(start.elapsed());
        assert!(status.success(), "runc exec failed");
    }
    rows.push(Row {
        name: "baseline: runc exec `true`".into(),
        samples,
        target: "",
    });

    // Baseline: runc run of a fresh container from the same kind of bundle.
    let bundle_src = server
        .data_dir
        .join("sandboxes")
        .join(&warm)
        .join("bundle")
        .join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&bundle_src).expect("bundle config"))
            .expect("json");
    config["process"]["args"] = json!(["/bin/true"]);
    let bundle = tempfile::tempdir().expect("bundle dir");
    std::fs::write(bundle.path().join("config.json"), config.to_string()).expect("write config");
    let mut samples = Vec::new();
    for i in 0..creates {
        let id = format!("bench-run-{}-{i}", std::process::id());
        let start = Instant::now();
        let status = runc(&server)
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(&id)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("runc run");
        samples.push(start.elapsed());
        let _ = runc(&server).args(["delete", "--force", &id]).status();
        assert!(status.success(), "runc run failed");
    }
    rows.push(Row {
        name: "baseline: runc run of a fresh container (`true`)".into(),
        samples,
        target: "",
    });

    // File throughput through the API and the agent: 1 MiB direct
    // (best of 10), 100 MiB through staged URLs (best of 3).
    let mut file_rows = Vec::new();
    for (label, size, rounds) in [
        ("1 MiB, direct", 1usize << 20, 10),
        ("100 MiB, staged URLs", 100 << 20, 3),
    ] {
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut best_write, mut best_read) = (Duration::MAX, Duration::MAX);
        for round in 0..rounds {
            let path = format!("bench/{round}.bin");
            let staged = size > (32 << 20);
            let (put_url, get_url) = if staged {
                let (_, up) = client
                    .post(
                        &format!("/v1/sandboxes/{warm}/files/uploads"),
                        json!({ "path": path }),
                    )
                    .await;
                (
                    up["url"].as_str().expect("upload url").to_string(),
                    String::new(),
                )
            } else {
                let url = format!("{}/v1/sandboxes/{warm}/files?path={path}", client.base);
                (url.clone(), url)
            };
            let start = Instant::now();
            let response = client
                .http
                .put(&put_url)
                .header("x-api-key", client.key.clone().unwrap_or_default())
                .body(data.clone())
                .send()
                .await
                .expect("write");
            assert!(
                response.status().is_success(),
                "write: {}",
                response.status()
            );
            best_write = best_write.min(start.elapsed());
            let get_url = if staged {
                let (_, down) = client
                    .post(
                        &format!("/v1/sandboxes/{warm}/files/downloads"),
                        json!({ "path": path }),
                    )
                    .await;
                down["url"].as_str().expect("download url").to_string()
            } else {
                get_url
            };
            let start = Instant::now();
            let response = client
                .http
                .get(&get_url)
                .header("x-api-key", client.key.clone().unwrap_or_default())
                .send()
                .await
                .expect("read");
            let bytes = response.bytes().await.expect("read body");
            best_read = best_read.min(start.elapsed());
            assert_eq!(bytes.len(), size, "read back");
        }
        let mbps = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
        file_rows.push(format!(
            "| file write + read, {label} | {rounds} | write {:.0} MB/s, read {:.0} MB/s | | {} |",
            mbps(best_write),
            mbps(best_read),
            if size > (32 << 20) { ">= 200 MB/s" } else { "" }
        ));
    }
    // /workspace is memory (tmpfs): free it for the interpreters below.
    client.run(&warm, "rm -rf bench").await;

    // Artifact promotion of a 100 MiB file (sandbox -> blob store, fsynced).
    client
        .run(&warm, "head -c 104857600 /dev/urandom > big.bin")
        .await;
    let mut promote = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let (status, body) = client
            .post(
                &format!("/v1/sandboxes/{warm}/artifacts"),
                json!({ "path": "big.bin" }),
            )
            .await;
        promote.push(start.elapsed());
        assert_eq!(status, 201, "{body}");
    }
    client.run(&warm, "rm -f big.bin").await;
    rows.push(Row {
        name: "artifact promotion, 100 MiB".into(),
        samples: promote,
        target: "",
    });

    // Idempotent replay: a repeat of a completed request with its key.
    let replay_body = json!({ "template": "does-not-exist" });
    let first = client
        .request(reqwest::Method::POST, "/v1/sandboxes")
        .header("idempotency-key", "bench-replay")
        .json(&replay_body)
        .send()
        .await
        .expect("first");
    assert_eq!(first.status(), 404);
    let mut replays = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let response = client
            .request(reqwest::Method::POST, "/v1/sandboxes")
            .header("idempotency-key", "bench-replay")
            .json(&replay_body)
            .send()
            .await
            .expect("replay");
        let _ = response.bytes().await;
        replays.push(start.elapsed());
    }
    rows.push(Row {
        name: "idempotent replay (HTTP round trip)".into(),
        samples: replays,
        target: "p50 <= 1 ms",
    });

    // Code: context creation (a pre-started interpreter after the first),
    // and a `1+1` run on a warm python context.
    let runs = format!("/v1/sandboxes/{warm}/code/runs");
    let contexts = format!("/v1/sandboxes/{warm}/code/contexts");
    let (status, _) = client
        .post(&contexts, json!({ "language": "python" }))
        .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_secs(3)).await; // the spare starts
    let mut creations = Vec::new();
    let mut context = String::new();
    for round in 0..5 {
        let start = Instant::now();
        let (status, body) = client
            .post(&contexts, json!({ "language": "python" }))
            .await;
        creations.push(start.elapsed());
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        if round < 4 {
            // Each interpreter holds tens of MiB of the sandbox's memory.
            client.delete(&format!("{contexts}/{id}")).await;
        }
        context = id;
        // Let the next spare start before the next creation.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    rows.push(Row {
        name: "code context creation (python, pre-started)".into(),
        samples: creations,
        target: "p50 <= 50 ms",
    });
    let mut code_runs = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let (status, body) = client
            .post(
                &runs,
                json!({ "language": "python", "contextId": context, "code": "1+1" }),
            )
            .await;
        code_runs.push(start.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    rows.push(Row {
        name: "code run round trip (`1+1`, warm python context)".into(),
        samples: code_runs,
        target: "p50 <= 3 ms, <= 0.5x ipykernel",
    });

    // A preview request: HTTP into the server, a tunnel through the agent,
    // python's http.server in the sandbox.
    client.run(&warm, "echo hello > hello.txt").await;
    let (status, started) = client
        .post(
            &format!("/v1/sandboxes/{warm}/commands"),
            json!({ "command": "python3 -m http.server 8000 --bind 127.0.0.1", "background": true }),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    let (status, preview) = client
        .post(
            &format!("/v1/sandboxes/{warm}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!(status, 201, "{preview}");
    let url = format!("{}hello.txt", preview["url"].as_str().expect("url"));
    let key = client.key.clone().unwrap_or_default();
    let preview_http = crownest_e2e::preview_client(&url);
    let get = || preview_http.get(&url).header("x-api-key", &key).send();
    for _ in 0..100 {
        if get().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut preview_samples = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let response = get().await.expect("preview");
        let body = response.bytes().await.expect("body");
        preview_samples.push(start.elapsed());
        assert_eq!(&body[..], b"hello\n");
    }
    rows.push(Row {
        name: "preview request (GET, python http.server in the sandbox)".into(),
        samples: preview_samples,
        target: "",
    });

    // Memory per idle sandbox: host RSS growth plus each agent's RSS.
    let server_pid = server.pid().expect("server pid");
    let idle_count = 10;
    let before = rss_kib(server_pid);
    let mut idle = Vec::new();
    for _ in 0..idle_count {
        idle.push(client.sandbox("python").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(server_pid);
    let agents: u64 = idle
        .iter()
        .filter_map(|id| container_pid(&server, id))
        .map(rss_kib)
        .sum();
    let host_per = (after.saturating_sub(before)) as f64 / idle_count as f64 / 1024.0;
    let agent_per = agents as f64 / idle_count as f64 / 1024.0;
    for id in &idle {
        client.kill(id).await;
    }
    let abuse_rows = abuse_measurements(&server, &client, &warm).await;
    client.kill(&warm).await;
    server.stop();
    let runtime_table = runtime_measurements(iterations, creates).await;
    let run_table = workspace_run_measurements().await;
    let egress_table = egress_measurements(iterations).await;
    let microvm_table = microvm_measurements().await;

    println!("\n| measurement | n | p50 | p99 | target |");
    println!("|---|---|---|---|---|");
    let mut p50s = Vec::new();
    for row in &mut rows {
        row.samples.sort();
        let p50 = percentile(&row.samples, 0.5);
        p50s.push(p50);
        println!(
            "| {} | {} | {} | {} | {} |",
            row.name,
            row.samples.len(),
            ms(p50),
            ms(percentile(&row.samples, 0.99)),
            row.target
        );
    }
    let ratio = p50s[2].as_secs_f64() / p50s[1].as_secs_f64().max(1e-9);
    println!("| command round trip vs runc exec (p50) | | {ratio:.1}x faster | | >= 3x |");
    println!(
        "| memory per idle sandbox ({idle_count} idle) | | host {host_per:.2} MiB + agent {agent_per:.2} MiB = {:.2} MiB | | <= 10 MiB |",
        host_per + agent_per
    );
    if let Some(python) = std::env::var_os("CROWNEST_BENCH_JUPYTER_PYTHON") {
        println!("{}", ipykernel_baseline(&python, iterations));
    } else {
        println!(
            "| baseline: ipykernel execute_request `1+1` | | not measured: set CROWNEST_BENCH_JUPYTER_PYTHON (scripts/bench does) | | |"
        );
    }
    for row in &file_rows {
        println!("{row}");
    }
    for row in &abuse_rows {
        println!("{row}");
    }
    println!("{runtime_table}");
    println!("{run_table}");
    println!("{egress_table}");
    println!("{microvm_table}");
}

/// QEMU processes of `sandbox` (their command line names it).
fn vmm_pids(sandbox: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.contains("qemu-system") && text.contains(sandbox)).then_some(pid)
        })
        .collect()
}

/// The microVM runtime on QEMU (TCG here): a few boots only, each tens of
/// seconds.
async fn microvm_measurements() -> String {
    const TEMPLATE: &str = "python-microvm";
    const CREATES: usize = 3;
    const IDLE: usize = 3;
    let mut server = Server::start_with_env(&[
        ("CROWNEST_RATE_LIMIT", "0"),
        ("CROWNEST_DESTROY_ON_SHUTDOWN", "false"),
    ]);
    let key = server.key("bench-microvm", None, "all");
    let client = server.client(&key);
    let (mut creates, mut firsts, mut uptimes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CREATES {
        let start = Instant::now();
        let id = client.sandbox(TEMPLATE).await;
        creates.push(start.elapsed());
        let result = client.run(&id, "cut -d' ' -f1 /proc/uptime").await;
        firsts.push(start.elapsed());
        let uptime: f64 = result["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0.0);
        uptimes.push(Duration::from_secs_f64(uptime));
        client.kill(&id).await;
    }
    let p50 = |mut samples: Vec<Duration>| {
        samples.sort();
        percentile(&samples, 0.5)
    };
    let warm = client.sandbox(TEMPLATE).await;
    client.run(&warm, "true").await;
    let mut commands = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        client.run(&warm, "true").await;
        commands.push(start.elapsed());
    }
    let runs = format!("/v1/sandboxes/{warm}/code/runs");
    client
        .post(&runs, json!({ "language": "python", "code": "0" }))
        .await;
    let mut codes = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let (status, body) = client
            .post(&runs, json!({ "language": "python", "code": "1+1" }))
            .await;
        codes.push(start.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    client.kill(&warm).await;

    let server_pid = server.pid().expect("server pid");
    let before = rss_kib(server_pid);
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(client.sandbox(TEMPLATE).await);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let host = rss_kib(server_pid).saturating_sub(before);
    let vmm: u64 = idle.iter().flat_map(|id| vmm_pids(id)).map(rss_kib).sum();
    let vmm_mib = vmm as f64 / IDLE as f64 / 1024.0;
    // Guest pages in use (kernel, page cache, processes) are part of the
    // VMM's RSS; the rest is QEMU itself (its code, TCG's cache, devices).
    let mut guest_kib = 0u64;
    for id in &idle {
        let meminfo = client
            .run(id, "awk '/^MemTotal|^MemFree/ {print $2}' /proc/meminfo")
            .await;
        let numbers: Vec<u64> = meminfo["stdout"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [total, free] = numbers[..] {
            guest_kib += total.saturating_sub(free);
        }
    }
    let guest_mib = guest_kib as f64 / IDLE as f64 / 1024.0;
    let host_mib = host as f64 / IDLE as f64 / 1024.0;
    let readopt = readopt_after_kill9(&mut server, &key, &idle).await;

    let mut out = String::from(
        "\n| microvm (QEMU, TCG: no usable KVM here) | n | p50 | on KVM (not measurable here) |\n|---|---|---|---|\n",
    );
    out += &format!(
        "| create (VMM start -> kernel boot -> agent handshake) | {CREATES} | {} | Firecracker SLA anchor: boot <= 125 ms |\n",
        ms(p50(creates))
    );
    out += &format!(
        "| guest kernel uptime at the first command (boot -> first result) | {CREATES} | {} | |\n",
        ms(p50(uptimes))
    );
    out += &format!(
        "| create -> first command result | {CREATES} | {} | |\n",
        ms(p50(firsts))
    );
    out += &format!(
        "| command round trip (`true`) | 50 | {} | |\n",
        ms(p50(commands))
    );
    out += &format!("| code run `1+1` | 20 | {} | |\n", ms(p50(codes)));
    out += &format!(
        "| host memory per idle microVM ({IDLE} idle, 512 MiB guests): VMM RSS + host growth | {IDLE} | {vmm_mib:.1} MiB + {host_mib:.2} MiB | |\n",
    );
    out += &format!(
        "| of which guest RAM in use (MemTotal - MemFree) / the rest (QEMU, TCG's cache, guest pages touched then freed) | {IDLE} | {guest_mib:.1} MiB / {:.1} MiB | Firecracker anchor: VMM overhead <= 5 MiB |\n",
        (vmm_mib - guest_mib).max(0.0)
    );
    out += &format!(
        "| host restart (kill -9) -> {IDLE} live microVMs taken over | 1 | {} | |",
        ms(readopt)
    );
    out
}

/// A loopback HTTP server that answers every request with `bytes` bytes
/// (the "internet" of the egress measurements). Returns its port.
async fn blob_server(bytes: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body: std::sync::Arc<Vec<u8>> =
        std::sync::Arc::new((0..bytes).map(|i| (i % 251) as u8).collect());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(header.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    port
}

/// Through-proxy download throughput against a loopback server, beside the
/// same download by curl on the host, and connection setup through the
/// policy (a CONNECT answered) beside a plain TCP connect on the host.
async fn egress_measurements(iterations: usize) -> String {
    const BLOB: usize = 256 << 20;
    let port = blob_server(BLOB).await;
    let templates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    let templates = templates.to_str().expect("utf8").to_owned();
    let url = format!("http://127.0.0.1:{port}/blob");
    let host_speed = || {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{speed_download}", &url])
            .output()
            .expect("curl on the host");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .unwrap_or(0.0)
    };
    let host = (0..3).map(|_| host_speed()).fold(0.0, f64::max);
    let mut host_connect: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            let _ = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            start.elapsed()
        })
        .collect();
    host_connect.sort();
    let mut out = String::from(
        "\n| egress (python-egress template, runc) | value | target |\n|---|---|---|\n",
    );
    out += &format!(
        "| download on the host (curl, 256 MiB, loopback) | {:.0} MB/s | |\n",
        host / 1e6
    );
    for (cap, label) in [("0", "no cap"), ("50", "default cap 50 MiB/s")] {
        let mut server = Server::start_with_env(&[
            ("CROWNEST_RATE_LIMIT", "0"),
            ("CROWNEST_TEMPLATES_DIR", &templates),
            ("CROWNEST_EGRESS_ALLOW_PRIVATE", "127.0.0.1/32"),
            ("CROWNEST_EGRESS_BANDWIDTH_MIB", cap),
        ]);
        let client = server.client(&server.key("bench", None, "all"));
        let sandbox = client.sandbox("python-egress").await;
        let speed = |record: &Value| {
            record["stdout"]
                .as_str()
                .unwrap_or("")
                .trim()
                .parse::<f64>()
                .unwrap_or(0.0)
        };
        let mut best: f64 = 0.0;
        for _ in 0..3 {
            let record = client
                .run(&sandbox, &format!("env NO_PROXY= no_proxy= curl -sS -o /dev/null -w '%{{speed_download}}' {url}"))
                .await;
            best = best.max(speed(&record));
        }
        out += &format!(
            "| download through the proxy ({label}) | {:.0} MB/s ({:.0}% of host) | >= 50% of host (no cap) |\n",
            best / 1e6,
            100.0 * best / host.max(1.0)
        );
        if cap == "0" {
            let probe = format!(
                "import socket, time\n\
                 samples = []\n\
                 for _ in range({iterations}):\n\
                 \x20   t = time.perf_counter(); s = socket.create_connection(('127.0.0.1', 3128))\n\
                 \x20   s.sendall(b'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n')\n\
                 \x20   reply = s.recv(100); samples.append(time.perf_counter() - t); s.close()\n\
                 \x20   assert reply.startswith(b'HTTP/1.1 200'), reply\n\
                 print(' '.join(str(int(x * 1e6)) for x in samples))\n"
            );
            let record = client
                .run(
                    &sandbox,
                    &format!("python3 -c '{}'", probe.replace('\'', "'\\''")),
                )
                .await;
            let mut through: Vec<Duration> = record["stdout"]
                .as_str()
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .map(Duration::from_micros)
                .collect();
            through.sort();
            if through.is_empty() {
                out += &format!("| connect through the policy | failed: {record} | |\n");
            } else {
                let added =
                    |p: f64| percentile(&through, p).saturating_sub(percentile(&host_connect, p));
                out += &format!(
                    "| connection setup through the policy (CONNECT answered), p50 / p99 | {} / {} (host TCP connect {} / {}; added {} / {}) | <= 2 ms added |\n",
                    ms(percentile(&through, 0.5)),
                    ms(percentile(&through, 0.99)),
                    ms(percentile(&host_connect, 0.5)),
                    ms(percentile(&host_connect, 0.99)),
                    ms(added(0.5)),
                    ms(added(0.99))
                );
            }
        }
        client.kill(&sandbox).await;
        server.stop();
    }
    out
}

/// An archive of `files` incompressible files totalling `bytes`.
fn bench_archive(files: usize, bytes: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let per = bytes / files;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..files {
        let data: Vec<u8> = (0..per)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("src/d{}/f{i}.bin", i % 40), &data[..])
            .expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

/// Workspace Runs on python-node with a 2,000-file / 50 MiB archive:
/// staged upload throughput, extraction time (server clock), start ->
/// first stdout event, create -> first stdout (upload included), and
/// terminal event -> evidence ready.
async fn workspace_run_measurements() -> String {
    use futures::StreamExt;
    let runs = 5;
    let bytes = bench_archive(2_000, 50 * 1024 * 1024);
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let mut server = Server::start_with_env(&[("CROWNEST_RATE_LIMIT", "0")]);
    let client = server.client(&server.key("bench", None, "all"));
    let (mut upload, mut extract, mut first, mut created_first, mut evidence) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let created = Instant::now();
        let (status, run) = client
            .post(
                "/v1/workspace-runs",
                json!({"command": "echo first; ls -R src | wc -l", "archive": {"sizeBytes": bytes.len(), "sha256": digest}}),
            )
            .await;
        assert_eq!(status, 201, "{run}");
        let id = run["id"].as_str().expect("id").to_string();
        let (_, ticket) = client
            .post(
                &format!("/v1/workspace-runs/{id}/archive/uploads"),
                json!({}),
            )
            .await;
        let url = ticket["url"].as_str().expect("url");
        let sent = Instant::now();
        let response = reqwest::Client::new()
            .put(url)
            .body(bytes.clone())
            .send()
            .await
            .expect("upload");
        assert_eq!(response.status(), 200);
        upload.push(sent.elapsed());
        let started = Instant::now();
        let (status, _) = client
            .post(&format!("/v1/workspace-runs/{id}/start"), json!({}))
            .await;
        assert_eq!(status, 202);
        let response = client
            .request(
                reqwest::Method::GET,
                &format!("/v1/workspace-runs/{id}/events"),
            )
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("events");
        let mut body = response.bytes_stream();
        let mut parser = crownest_e2e::SseParser::default();
        let mut extracting_at = None;
        let mut terminal = None;
        'events: while let Some(Ok(chunk)) = body.next().await {
            for event in parser.push(&chunk) {
                let at = event.data["at"].as_str().unwrap_or_default().to_string();
                match event.event.as_str() {
                    "status" if event.data["data"]["status"] == "extracting" => {
                        extracting_at = Some(at);
                    }
                    "archive_progress" if event.data["data"]["done"] == true => {
                        if let Some(from) = &extracting_at {
                            extract.push(rfc3339_gap(from, &at));
                        }
                    }
                    "stdout" if first.len() < upload.len() => {
                        first.push(started.elapsed());
                        created_first.push(created.elapsed());
                    }
                    "terminal" => {
                        terminal = Some(Instant::now());
                        assert_eq!(
                            event.data["data"]["status"], "succeeded",
                            "{:?}",
                            event.data
                        );
                        break 'events;
                    }
                    _ => {}
                }
            }
        }
        let terminal = terminal.expect("terminal event");
        loop {
            let response = client
                .request(
                    reqwest::Method::GET,
                    &format!("/v1/workspace-runs/{id}/evidence"),
                )
                .send()
                .await
                .expect("evidence");
            if response.status() == 200 {
                evidence.push(terminal.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    server.stop();
    for v in [
        &mut upload,
        &mut extract,
        &mut first,
        &mut created_first,
        &mut evidence,
    ] {
        v.sort();
    }
    let mib = bytes.len() as f64 / (1024.0 * 1024.0);
    let rate = mib / percentile(&upload, 0.5).as_secs_f64().max(1e-9);
    let mut out = format!(
        "\n| workspace run, 2,000 files / {mib:.1} MiB archive (python-node, n={runs}) | p50 | p99 | target |\n|---|---|---|---|\n"
    );
    out += &format!(
        "| staged upload | {} ({rate:.0} MiB/s) | {} | |\n",
        ms(percentile(&upload, 0.5)),
        ms(percentile(&upload, 0.99))
    );
    out += &format!(
        "| extraction (extracting -> done, server clock) | {} | {} | |\n",
        ms(percentile(&extract, 0.5)),
        ms(percentile(&extract, 0.99))
    );
    out += &format!(
        "| start -> first stdout event | {} | {} | |\n",
        ms(percentile(&first, 0.5)),
        ms(percentile(&first, 0.99))
    );
    out += &format!(
        "| create -> first stdout event (upload included) | {} | {} | |\n",
        ms(percentile(&created_first, 0.5)),
        ms(percentile(&created_first, 0.99))
    );
    out += &format!(
        "| terminal event -> evidence ready | {} | {} | |",
        ms(percentile(&evidence, 0.5)),
        ms(percentile(&evidence, 0.99))
    );
    out
}

/// The time between two RFC 3339 timestamps of the server (`…:SS.mmmZ`).
fn rfc3339_gap(from: &str, to: &str) -> Duration {
    let millis = |t: &str| -> i64 {
        // HH:MM:SS.mmm within one day is enough for a run of seconds.
        let time = t
            .split('T')
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('Z');
        let mut parts = time.split(':');
        let h: i64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let m: i64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let s: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
        (h * 3600 + m * 60) * 1000 + (s * 1000.0) as i64
    };
    Duration::from_millis((millis(to) - millis(from)).max(0) as u64)
}

/// Processes in a sandbox's cgroup (the agent under runc; the sentry,
/// gofer and ptrace stubs under gVisor), by the pids controller.
fn cgroup_pids(id: &str) -> Vec<u32> {
    for dir in [
        format!("/sys/fs/cgroup/pids/crownest/{id}"),
        format!("/sys/fs/cgroup/crownest/{id}"),
    ] {
        if let Ok(text) = std::fs::read_to_string(format!("{dir}/cgroup.procs")) {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    Vec::new()
}

/// One runtime's column: create -> first result, command and code round
/// trips, idle memory, and the take-over of 20 sandboxes after a kill -9.
struct RuntimeColumn {
    create: Duration,
    command: Duration,
    code: Duration,
    idle_mib: f64,
    readopt: Duration,
}

async fn runtime_column(template: &str, iterations: usize, creates: usize) -> RuntimeColumn {
    let mut server = Server::start_with_env(&[
        ("CROWNEST_RATE_LIMIT", "0"),
        ("CROWNEST_DESTROY_ON_SHUTDOWN", "false"),
    ]);
    let key = server.key("bench-runtimes", None, "all");
    let client = server.client(&key);
    let warm = client.sandbox(template).await;
    client.run(&warm, "true").await;
    let p50 = |mut samples: Vec<Duration>| {
        samples.sort();
        percentile(&samples, 0.5)
    };
    let mut samples = Vec::new();
    for _ in 0..creates {
        let start = Instant::now();
        let id = client.sandbox(template).await;
        let result = client.run(&id, "true").await;
        samples.push(start.elapsed());
        assert_eq!(result["exitCode"], 0);
        client.kill(&id).await;
    }
    let create = p50(samples);
    let mut samples = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        client.run(&warm, "true").await;
        samples.push(start.elapsed());
    }
    let command = p50(samples);
    let runs = format!("/v1/sandboxes/{warm}/code/runs");
    client
        .post(&runs, json!({ "language": "python", "code": "0" }))
        .await;
    let mut samples = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let (status, body) = client
            .post(&runs, json!({ "language": "python", "code": "1+1" }))
            .await;
        samples.push(start.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    let code = p50(samples);
    client.kill(&warm).await;

    // 20 idle sandboxes: host RSS growth plus every process in their cgroups.
    let server_pid = server.pid().expect("server pid");
    let before = rss_kib(server_pid);
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(client.sandbox(template).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let host = rss_kib(server_pid).saturating_sub(before);
    let sandboxes: u64 = idle
        .iter()
        .flat_map(|id| cgroup_pids(id))
        .map(rss_kib)
        .sum();
    let idle_mib = (host + sandboxes) as f64 / 20.0 / 1024.0;

    // Kill -9 the host with the 20 live, start it again: the start returns
    // once every one is taken over (it listens after reconciling).
    let readopt = readopt_after_kill9(&mut server, &key, &idle).await;
    RuntimeColumn {
        create,
        command,
        code,
        idle_mib,
        readopt,
    }
}

/// Kills the host with `live` sandboxes running and starts it again: how
/// long until it serves (it listens once every one is taken over). Checks
/// each is `running`, kills them and stops the server.
async fn readopt_after_kill9(server: &mut Server, key: &str, live: &[String]) -> Duration {
    server.kill9();
    let start = Instant::now();
    server.start_again();
    let readopt = start.elapsed();
    let client = server.client(key);
    for id in live {
        let (_, row) = client.get(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(row["status"], "running", "{row}");
        client.kill(id).await;
    }
    server.stop();
    readopt
}

async fn runtime_measurements(iterations: usize, creates: usize) -> String {
    let oci = runtime_column("python", iterations, creates).await;
    let gvisor = runtime_column("python-gvisor", iterations.min(100), creates).await;
    let ratio = gvisor.command.as_secs_f64() / oci.command.as_secs_f64().max(1e-9);
    let mut out = String::from(
        "\n| per runtime (p50) | oci (runc) | gvisor (runsc, ptrace) | target |\n|---|---|---|---|\n",
    );
    out += &format!(
        "| create -> first command result | {} | {} | gvisor <= 400 ms |\n",
        ms(oci.create),
        ms(gvisor.create)
    );
    out += &format!(
        "| command round trip (`true`) | {} | {} ({ratio:.1}x runc) | gvisor <= 2x runc |\n",
        ms(oci.command),
        ms(gvisor.command)
    );
    out += &format!(
        "| code run `1+1` (default python context) | {} | {} | |\n",
        ms(oci.code),
        ms(gvisor.code)
    );
    out += &format!(
        "| idle memory per sandbox (host growth + agent/sentry/gofer RSS, 20 idle) | {:.2} MiB | {:.2} MiB | |\n",
        oci.idle_mib, gvisor.idle_mib
    );
    out += &format!(
        "| host restart (kill -9) -> 20 live sandboxes taken over, serving | {} | {} | <= 1 s |",
        ms(oci.readopt),
        ms(gvisor.readopt)
    );
    out
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0u64)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// What hostile input costs the host: a Code Run writing two 28 MB
/// display events to its runner pipe, a command writing 5,000 one-byte
/// chunks, and 10,000 anonymous requests.
async fn abuse_measurements(
    server: &Server,
    client: &crownest_e2e::Client,
    sandbox: &str,
) -> Vec<String> {
    let pid = server.pid().expect("server pid");
    let mut rows = Vec::new();
    let (peak0, rss0) = memory_kib(pid);
    let hostile = "import os, json\nline = json.dumps({'type': 'display_data', 'data': {'text/plain': 'x' * (28 * 1024 * 1024)}}) + '\\n'\nfor _ in range(2):\n    os.write(4, line.encode())\nprint('after')";
    let start = Instant::now();
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": hostile, "timeoutMs": 120000 }),
        )
        .await;
    let took = start.elapsed();
    let (peak1, rss1) = memory_kib(pid);
    let rejected = result["outputs"].as_array().map_or(0, |o| {
        o.iter()
            .filter(|x| x["reason"] == "output_too_large")
            .count()
    });
    rows.push(format!(
        "| hostile Code Run (2 × 28 MB events), status {status} | | server peak {:.1} -> {:.1} MiB (RSS {:.1} -> {:.1}), {rejected} outputs rejected, {:.1} s | | bounded |",
        peak0 as f64 / 1024.0,
        peak1 as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        took.as_secs_f64()
    ));
    let (_, rss0) = memory_kib(pid);
    let (status, command) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 -c \"import sys,time\nfor i in range(5000):\n    sys.stdout.write('x'); sys.stdout.flush(); time.sleep(0.0002)\"" }),
        )
        .await;
    let (peak2, rss2) = memory_kib(pid);
    let id = command["id"].as_str().unwrap_or_default().to_string();
    let response = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sandbox}/commands/{id}/logs"),
        )
        .send()
        .await
        .expect("logs");
    let text = response.text().await.unwrap_or_default();
    let events = text.matches("\nid: ").count() + usize::from(text.starts_with("id: "));
    rows.push(format!(
        "| one-byte-chunk command (5,000 writes), status {status} | | {events} log events; server RSS {:.1} -> {:.1} MiB (peak {:.1}) | | < 5,000 events |",
        rss0 as f64 / 1024.0,
        rss2 as f64 / 1024.0,
        peak2 as f64 / 1024.0
    ));
    let (_, rss0) = memory_kib(pid);
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v1/sandboxes/{sandbox}/files?path={}",
        server.base_url,
        "p".repeat(4000)
    );
    let start = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for chunk in 0..100 {
        let requests = (0..100).map(|i| {
            http.put(&url)
                .header("x-request-id", format!("{chunk}-{i}-{}", "r".repeat(4000)))
                .body("x")
                .send()
        });
        for response in futures::future::join_all(requests).await {
            let status = response.map(|r| r.status().as_u16()).unwrap_or(0);
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    let (_, rss3) = memory_kib(pid);
    rows.push(format!(
        "| 10,000 anonymous requests ({statuses:?}) | | server RSS {:.1} -> {:.1} MiB in {:.1} s | | flat |",
        rss0 as f64 / 1024.0,
        rss3 as f64 / 1024.0,
        start.elapsed().as_secs_f64()
    ));
    rows
}

/// The engine E2B's code interpreter wraps: an ipykernel driven through
/// jupyter_client on this machine, `1+1` execute_request round trips.
fn ipykernel_baseline(python: &std::ffi::OsStr, iterations: usize) -> String {
    let script = format!(
        r#"
import time
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="python3")
samples = []
for i in range({iterations} + 10):
    start = time.perf_counter()
    kc.execute_interactive("1+1", timeout=30, output_hook=lambda msg: None)
    if i >= 10:
        samples.append(time.perf_counter() - start)
samples.sort()
print("%.2f %.2f" % (samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99) - 1] * 1000))
kc.stop_channels(); km.shutdown_kernel(now=True)
"#
    );
    match Command::new(python).args(["-c", &script]).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut parts = text.split_whitespace();
            format!(
                "| baseline: ipykernel execute_request `1+1` (jupyter_client) | {iterations} | {} ms | {} ms | |",
                parts.next().unwrap_or("?"),
                parts.next().unwrap_or("?")
            )
        }
        Ok(out) => format!(
            "| baseline: ipykernel execute_request `1+1` | | failed: {} | | |",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => format!("| baseline: ipykernel execute_request `1+1` | | failed: {e} | | |"),
    }
}
