//! Escape and abuse attempts from inside a sandbox. Each must be contained:
//! the attempt fails or sees nothing, and the host keeps serving.

use std::io::Read;
use std::time::Duration;

use crownest_e2e::{Server, shared};
use serde_json::json;

async fn host_still_serves(client: &crownest_e2e::Client) {
    let (status, body) = client.get("/v1/health").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
}

on_each_runtime! {
async fn host_files_outside_the_rootfs_are_invisible(template) {
    let s = shared();
    let client = s.client();
    let marker = format!("/tmp/cn-escape-marker-{}-{template}", std::process::id());
    std::fs::write(&marker, "host secret").expect("write marker");
    let sandbox = client.sandbox(template).await;
    let result = client
        .run(
            &sandbox,
            &format!(
                "cat {marker} 2>&1; ls {data} 2>&1; find / -xdev -name 'cn-escape-marker-*' 2>/dev/null; \
                 cat /proc/1/root{marker} 2>&1; echo end",
                data = s.data_dir.display()
            ),
        )
        .await;
    let stdout = result["stdout"].as_str().expect("stdout");
    assert!(!stdout.contains("host secret"), "{stdout}");
    assert!(!stdout.contains("crownest.db"), "{stdout}");
    assert!(stdout.ends_with("end\n"));
    // The rootfs itself is read-only.
    let write = client.run(&sandbox, "touch /etc/evil 2>&1; echo $?").await;
    assert_ne!(
        write["stdout"]
            .as_str()
            .expect("out")
            .trim_end()
            .lines()
            .last(),
        Some("0")
    );
    std::fs::remove_file(&marker).expect("remove marker");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn the_hosts_environment_and_processes_are_not_visible(template) {
    let server = Server::start_with_env(&[("CROWNEST_E2E_SECRET", "hunter2-host-env")]);
    let client = server.client(&server.key("env-org", None, "all"));
    let sandbox = client.sandbox(template).await;
    let result = client
        .run(
            &sandbox,
            "cat /proc/1/environ 2>&1 | tr '\\0' '\\n'; for f in /proc/[0-9]*/environ; do cat $f 2>/dev/null; done | tr '\\0' '\\n'; \
             cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -eo pid,comm --no-headers | wc -l",
        )
        .await;
    let stdout = result["stdout"].as_str().expect("stdout");
    assert!(!stdout.contains("hunter2-host-env"), "{stdout}");
    assert!(
        stdout.contains("crownest-agent"),
        "PID 1 is the agent: {stdout}"
    );
    // Only the agent, sh, and the few processes of this pipeline.
    let processes: usize = stdout
        .lines()
        .last()
        .expect("count")
        .trim()
        .parse()
        .expect("number");
    assert!(processes < 10, "sees {processes} processes: {stdout}");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn there_is_no_network_but_loopback(template) {
    let client = shared().client();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let sandbox = client.sandbox(template).await;
    let script = format!(
        "import os, socket\n\
         print(sorted(os.listdir('/sys/class/net')))\n\
         s = socket.socket(); s.settimeout(2)\n\
         try:\n    s.connect(('127.0.0.1', {port})); print('connected')\n\
         except OSError as e:\n    print('refused', e.errno)\n\
         print('routes', len(open('/proc/net/route').read().splitlines()) - 1)\n"
    );
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": format!("python3 -c \"$S\""), "env": { "S": script } }),
        )
        .await;
    assert_eq!(status, 200);
    let stdout = result["stdout"].as_str().expect("stdout");
    assert!(stdout.starts_with("['lo']\n"), "only loopback: {result}");
    assert!(stdout.contains("refused"), "{result}");
    assert!(!stdout.contains("connected"), "{result}");
    assert!(
        stdout.contains("routes 0"),
        "no route off the sandbox: {result}"
    );
    // Nothing reached the host's listener.
    let mut buf = [0u8; 1];
    match listener.accept() {
        Ok((mut stream, _)) => {
            let _ = stream.read(&mut buf);
            panic!("a connection from the sandbox reached the host");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn mount_and_unshare_are_refused(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    for attempt in [
        "mount -t tmpfs none /tmp",
        "unshare --user --map-root-user true",
        "unshare --mount true",
        "python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)'",
    ] {
        let result = client.run(&sandbox, attempt).await;
        assert_ne!(result["exitCode"], 0, "`{attempt}` succeeded: {result}");
    }
    client.kill(&sandbox).await;
}
}

/// Under gVisor the sentry is one host process under the sandbox's
/// cgroup limits: exhausting them (runsc 20221219 has no kernel-side
/// memory or task limit to stop a bomb first) may end the whole sandbox,
/// which must then be reported `failed` promptly and leave nothing behind;
/// a neighbour and the host never notice.
async fn gvisor_bomb_ends_only_its_sandbox(client: &crownest_e2e::Client, sandbox: &str) {
    let neighbour = client.sandbox("python-gvisor").await;
    let mut settled = None;
    for _ in 0..100 {
        let (_, row) = client.get(&format!("/v1/sandboxes/{sandbox}")).await;
        if row["status"] == "destroyed" {
            assert_eq!(row["endReason"], "failed", "{row}");
            settled = Some("destroyed");
            break;
        }
        let (status, after) = client
            .post(
                &format!("/v1/sandboxes/{sandbox}/commands"),
                json!({ "command": "echo alive" }),
            )
            .await;
        if status == 200 && after["stdout"] == "alive\n" {
            settled = Some("recovered");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(settled.is_some(), "the sandbox neither recovered nor ended");
    assert_eq!(
        client.run(&neighbour, "echo fine").await["stdout"],
        "fine\n"
    );
    client.kill(&neighbour).await;
    if settled == Some("recovered") {
        client.kill(sandbox).await;
    }
}

on_each_runtime! {
async fn a_fork_bomb_hits_the_pids_limit_and_the_host_keeps_serving(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let (status, result) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "bomb() { bomb | bomb & }; bomb; sleep 3", "timeoutMs": 4000 }),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    host_still_serves(&client).await;
    if template == "python-gvisor" {
        gvisor_bomb_ends_only_its_sandbox(&client, &sandbox).await;
        return;
    }
    // The sandbox recovers: its agent is alive and commands run again.
    let mut ok = false;
    for _ in 0..50 {
        let (status, after) = client
            .post(
                &format!("/v1/sandboxes/{sandbox}/commands"),
                json!({ "command": "echo alive" }),
            )
            .await;
        if status == 200 && after["stdout"] == "alive\n" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the sandbox did not recover after the fork bomb");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn a_memory_bomb_is_killed_inside_the_sandbox_only(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let result = client
        .run(
            &sandbox,
            "python3 -c 'x = bytearray(4 * 1024 ** 3); print(len(x))'",
        )
        .await;
    assert_ne!(result["exitCode"], 0, "{result}");
    assert!(
        !result["stdout"]
            .as_str()
            .expect("out")
            .contains("4294967296")
    );
    host_still_serves(&client).await;
    if template == "python-gvisor" {
        gvisor_bomb_ends_only_its_sandbox(&client, &sandbox).await;
        return;
    }
    let after = client.run(&sandbox, "echo alive").await;
    assert_eq!(after["stdout"], "alive\n", "the agent survived the OOM");
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn sandboxes_cannot_see_each_others_processes_or_files(template) {
    let client = shared().client();
    let a = client.sandbox(template).await;
    let b = client.sandbox(template).await;
    let (status, _) = client
        .post(
            &format!("/v1/sandboxes/{a}/commands"),
            json!({ "command": "echo secret-a > /workspace/secret-a; echo tmp > /tmp/secret-a; exec sleep 300", "background": true }),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = client
        .run(
            &b,
            "ps -eo args --no-headers; ls /workspace /tmp; find / -xdev -name 'secret-a' 2>/dev/null; echo end",
        )
        .await;
    let stdout = seen["stdout"].as_str().expect("out");
    assert!(!stdout.contains("sleep 300"), "{stdout}");
    assert!(!stdout.contains("secret-a"), "{stdout}");
    // Under runc each has its own host uid range; under gVisor sandbox
    // uids exist only in gVisor's kernel.
    if template == "python" {
        let ids = client.run(&a, "cat /proc/self/uid_map").await;
        let idsb = client.run(&b, "cat /proc/self/uid_map").await;
        assert_ne!(ids["stdout"], idsb["stdout"], "distinct host uid ranges");
    }
    client.kill(&a).await;
    client.kill(&b).await;
}
}

#[tokio::test]
async fn two_servers_on_one_machine_never_share_a_host_uid_range() {
    // A second server with its own data dir: its store knows nothing of the
    // shared server's sandboxes, yet their uid ranges must not overlap.
    let server = Server::start();
    let mine = server.client(&server.key("uid-slots", None, "all"));
    let theirs = shared().client();
    let mut ranges = Vec::new();
    let mut made = Vec::new();
    for client in [&theirs, &mine, &theirs, &mine] {
        let id = client.sandbox("python").await;
        let map = client.run(&id, "cat /proc/self/uid_map").await;
        // "0 <host base> <count>" per line: the host side of each mapping.
        let stdout = map["stdout"].as_str().expect("stdout").to_string();
        for line in stdout.lines() {
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|f| f.parse().expect("number"))
                .collect();
            ranges.push((fields[1], fields[1] + fields[2]));
        }
        made.push((client, id));
    }
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            assert!(
                a.1 <= b.0 || b.1 <= a.0,
                "host uid ranges overlap: {a:?} and {b:?} (all: {ranges:?})"
            );
        }
    }
    for (client, id) in made {
        client.kill(&id).await;
    }
}
