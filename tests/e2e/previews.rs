//! Previews: a port inside a sandbox served at an authenticated URL on its
//! own origin (`prv-….localhost:PORT`), through the agent (the sandbox has
//! no network but its loopback).

use std::time::Duration;

use crownest_e2e::{error_code, shared};
use serde_json::{Value, json};

/// A small app for the sandbox: `/echo` answers with the request it saw,
/// POST echoes its body, anything else is a static file of /workspace.
const APP: &str = r#"
import http.server, json
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/echo"):
            body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()
    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(201)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"#;

/// A client for a preview URL (its `*.localhost` host resolved to
/// loopback, as browsers do) that does not follow redirects and sends no
/// key.
fn browser(url: &str) -> reqwest::Client {
    crownest_e2e::preview_client(url)
}

/// GET of a preview URL with `key`: the status and the JSON body (if any).
async fn get_with_key(url: &str, key: &str) -> (u16, Value) {
    envelope(
        browser(url)
            .get(url)
            .header("x-api-key", key)
            .send()
            .await
            .expect("preview request"),
    )
    .await
}

async fn envelope(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// A python sandbox running [`APP`] on port 8000, and a preview of it.
async fn sandbox_with_app(client: &crownest_e2e::Client) -> (String, Value) {
    let sandbox = client.sandbox("python").await;
    for (path, body) in [("server.py", APP), ("index.html", "<h1>hello preview</h1>")] {
        client.write_file(&sandbox, path, body).await;
    }
    let (status, started) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 server.py", "background": true }),
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
    // Wait until the app listens (502 until then).
    let url = preview["url"].as_str().expect("url").to_string();
    for _ in 0..100 {
        let response = browser(&url)
            .get(&url)
            .header("x-api-key", client.key.clone().unwrap_or_default())
            .send()
            .await
            .expect("poll");
        if response.status() != 502 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (sandbox, preview)
}

#[tokio::test]
async fn a_preview_serves_the_sandbox_port_to_its_org_and_keeps_keys_from_the_app() {
    let server = shared();
    let client = server.client();
    let key = client.key.clone().expect("key");
    let (sandbox, preview) = sandbox_with_app(&client).await;
    let id = preview["id"].as_str().expect("id");
    let url = preview["url"].as_str().expect("url");
    assert!(id.starts_with("prv_"), "{preview}");
    assert_eq!(preview["port"], 8000);
    assert_eq!(preview["status"], "active");
    // Its own origin, never the API's.
    let port = server.base_url.rsplit(':').next().expect("port");
    let host = format!("{}.localhost:{port}", id.replace('_', "-"));
    assert_eq!(url, format!("http://{host}/"));
    assert!(
        preview["token"]
            .as_str()
            .expect("token")
            .starts_with("cn_prv_")
    );

    // The app's page, with an API key.
    let page = browser(url)
        .get(format!("{url}index.html"))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("get");
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.expect("body"), "<h1>hello preview</h1>");
    let head = browser(url)
        .head(format!("{url}index.html"))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "22");
    assert!(head.bytes().await.expect("body").is_empty());

    // What the app saw: its path and its own headers, never our key.
    let seen: Value = browser(url)
        .get(format!("{url}echo?q=1"))
        .header("x-api-key", &key)
        .header("cookie", "app=1")
        .header("x-app", "yes")
        .send()
        .await
        .expect("echo")
        .json()
        .await
        .expect("json");
    assert_eq!(seen["path"], "/echo?q=1");
    let headers = &seen["headers"];
    assert_eq!(headers["x-app"], "yes");
    assert_eq!(headers["cookie"], "app=1");
    assert_eq!(headers["x-forwarded-host"], host);
    assert!(headers.get("x-forwarded-prefix").is_none(), "{headers}");
    let dump = headers.to_string();
    assert!(!dump.contains(&key), "the app saw the API key: {dump}");
    let bearer = browser(url)
        .get(format!("{url}echo"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("bearer")
        .text()
        .await
        .expect("body");
    assert!(
        !bearer.contains(&key),
        "the app saw the bearer key: {bearer}"
    );

    // Request bodies go through.
    let posted = browser(url)
        .post(format!("{url}submit"))
        .header("x-api-key", &key)
        .body("payload-123")
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), 201);
    assert_eq!(posted.text().await.expect("body"), "payload-123");

    // No credential, a key without the scope, another org's key.
    let (status, body) = envelope(browser(url).get(url).send().await.expect("anon")).await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let reader = server.key("preview-org", None, "previews:read");
    let other_org = server.key("preview-other-org", None, "all");
    let (status, body) = get_with_key(url, &reader).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"));
    let (status, body) = get_with_key(url, &other_org).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = server
        .client_with(&other_org)
        .get(&format!("/v1/sandboxes/{sandbox}/previews/{id}"))
        .await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));

    // The API's origin never serves it: the old path redirects there.
    let legacy = browser(url)
        .get(format!("{}/previews/{id}/index.html?a=1", server.base_url))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("legacy");
    assert_eq!(legacy.status(), 308);
    assert_eq!(legacy.headers()["location"], format!("{url}index.html?a=1"));

    // One active preview per port; ports are checked.
    let previews = format!("/v1/sandboxes/{sandbox}/previews");
    let (status, body) = client.post(&previews, json!({ "port": 8000 })).await;
    assert_eq!((status, error_code(&body)), (409, "preview_exists"));
    assert_eq!(body["error"]["details"]["previewId"], id);
    for port in [json!(0), json!(65536), json!(-1), json!("80")] {
        let (status, body) = client.post(&previews, json!({ "port": port })).await;
        assert_eq!(status, 400, "{port}: {body}");
    }

    // Read back, list (the token is shown only once), close.
    let (status, got) = client.get(&format!("{previews}/{id}")).await;
    assert_eq!(status, 200);
    assert!(got.get("token").is_none(), "{got}");
    assert_eq!(got["url"], url);
    let (_, list) = client.get(&previews).await;
    assert_eq!(list["data"].as_array().expect("data").len(), 1);
    let (status, closed) = client.delete(&format!("{previews}/{id}")).await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(
        (closed["status"].as_str(), closed["closeReason"].as_str()),
        (Some("closed"), Some("deleted"))
    );
    let (status, body) = get_with_key(url, &key).await;
    assert_eq!((status, error_code(&body)), (410, "preview_closed"));
    // The port is free again.
    let (status, again) = client.post(&previews, json!({ "port": 8000 })).await;
    assert_eq!(status, 201, "{again}");

    // Create and delete are audited.
    let (_, events) = client
        .get(&format!("/v1/audit-events?resourceId={id}"))
        .await;
    let actions: Vec<&str> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"preview.create") && actions.contains(&"preview.delete"),
        "{actions:?}"
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_preview_token_becomes_a_cookie_session_for_that_preview_only() {
    let client = shared().client();
    let (sandbox, preview) = sandbox_with_app(&client).await;
    let id = preview["id"].as_str().expect("id");
    let url = preview["url"].as_str().expect("url");
    let browser_url = preview["browserUrl"].as_str().expect("browserUrl");
    let token = preview["token"].as_str().expect("token");
    assert_eq!(browser_url, format!("{url}?crownest_preview_token={token}"));

    assert!(url.contains(&id.replace('_', "-")), "{url}");

    // The token in the address: a cookie of this preview's host only (no
    // `Domain`), and a redirect to the same page without it.
    let response = browser(url).get(browser_url).send().await.expect("open");
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/");
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    assert!(
        cookie.starts_with(&format!("crownest_preview_token={token};"))
            && cookie.contains("Path=/;")
            && cookie.contains("HttpOnly")
            && !cookie.to_ascii_lowercase().contains("domain="),
        "{cookie}"
    );
    let page = browser(url)
        .get(format!("{url}index.html"))
        .header("cookie", format!("crownest_preview_token={token}"))
        .send()
        .await
        .expect("with cookie");
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.expect("body"), "<h1>hello preview</h1>");
    // The app never sees the preview cookie.
    let seen: Value = browser(url)
        .get(format!("{url}echo"))
        .header("cookie", format!("crownest_preview_token={token}"))
        .send()
        .await
        .expect("echo")
        .json()
        .await
        .expect("json");
    assert!(!seen.to_string().contains(token), "{seen}");

    // A wrong token, in either place, is a 401 that does not say whether
    // the preview exists.
    let wrong = format!("cn_prv_{}", "x".repeat(40));
    let port = shared()
        .base_url
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let unknown = format!("http://prv-{}.localhost:{port}/", "a".repeat(20));
    for request in [
        browser(url).get(format!("{url}?crownest_preview_token={wrong}")),
        browser(url)
            .get(url)
            .header("cookie", format!("crownest_preview_token={wrong}")),
        browser(&unknown).get(format!("{unknown}?crownest_preview_token={wrong}")),
    ] {
        let (status, body) = envelope(request.send().await.expect("wrong")).await;
        assert_eq!((status, error_code(&body)), (401, "unauthorized"), "{body}");
    }
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_preview_reaches_only_the_sandbox_loopback_and_ends_with_the_sandbox() {
    let client = shared().client();
    let key = client.key.clone().expect("key");
    // A port open on the host's loopback: a preview of that port number
    // must reach the sandbox's loopback, where nothing listens.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let host_port = listener.local_addr().expect("addr").port();
    let sandbox = client.sandbox("python").await;
    let (status, preview) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/previews"),
            json!({ "port": host_port }),
        )
        .await;
    assert_eq!(status, 201, "{preview}");
    let url = preview["url"].as_str().expect("url");
    let (status, body) = get_with_key(url, &key).await;
    assert_eq!(
        (status, error_code(&body)),
        (502, "preview_upstream_unavailable"),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["port"], host_port);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.accept())
            .await
            .is_err(),
        "the preview connected to the host's loopback"
    );

    // Killing the sandbox closes its previews.
    client.kill(&sandbox).await;
    let (status, body) = get_with_key(url, &key).await;
    assert_eq!((status, error_code(&body)), (410, "preview_closed"));
    let (_, list) = client
        .get(&format!("/v1/sandboxes/{sandbox}/previews"))
        .await;
    assert_eq!(list["data"][0]["status"], "closed");
    assert_eq!(list["data"][0]["closeReason"], "sandbox_destroyed");
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/previews"),
            json!({ "port": 8000 }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (410, "sandbox_destroyed"));
}

/// A raw app for the sandbox: answers an `Upgrade: shout` request with 101,
/// then echoes every byte upper-cased (what a WebSocket server does, minus
/// the framing).
const SHOUT_APP: &str = r#"
import socket, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 8100))
server.listen()
def handle(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    if b"upgrade: shout" not in head.lower():
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        return conn.close()
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n")
    while data := conn.recv(4096):
        conn.sendall(data.upper())
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"#;

#[tokio::test]
async fn a_preview_passes_a_protocol_upgrade_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = shared().client();
    let key = client.key.clone().expect("key");
    let sandbox = client.sandbox("python").await;
    client.write_file(&sandbox, "shout.py", SHOUT_APP).await;
    let (status, _) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/commands"),
            json!({ "command": "python3 shout.py", "background": true }),
        )
        .await;
    assert_eq!(status, 200);
    let (status, preview) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/previews"),
            json!({ "port": 8100 }),
        )
        .await;
    assert_eq!(status, 201, "{preview}");
    let id = preview["id"].as_str().expect("id");
    let address = shared().base_url.trim_start_matches("http://").to_string();
    let port = address.rsplit(':').next().expect("port");
    let host = format!("{}.localhost:{port}", id.replace('_', "-"));

    // Raw HTTP/1 over TCP, as a WebSocket client speaks it.
    let mut head = String::new();
    let mut stream = None;
    for _ in 0..100 {
        let mut conn = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        conn.write_all(
            format!(
                "GET /socket HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("request");
        let mut buf = Vec::new();
        while !buf.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if conn.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            buf.push(byte[0]);
        }
        head = String::from_utf8_lossy(&buf).into_owned();
        if head.starts_with("HTTP/1.1 101") {
            stream = Some(conn);
            break;
        }
        // 502 until the app listens.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = stream.unwrap_or_else(|| panic!("no 101: {head}"));
    assert!(
        head.to_ascii_lowercase().contains("upgrade: shout"),
        "{head}"
    );
    for word in ["hello", "preview"] {
        stream.write_all(word.as_bytes()).await.expect("send");
        let mut back = vec![0u8; word.len()];
        stream.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, word.to_uppercase().as_bytes());
    }
    drop(stream);
    client.kill(&sandbox).await;
}
