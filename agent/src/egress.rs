//! `Open::EgressListen`: the sandbox's way out, by policy. The agent listens
//! on the sandbox's loopback as an HTTP proxy (`CONNECT` and absolute-URI
//! requests) and a SOCKS5 proxy (no auth, remote DNS). Each accepted
//! connection takes one stream the host offered, names the host and port
//! the program asked for, and, once the host has decided and dialled,
//! becomes a byte pipe. The agent decides nothing: the sandbox has no
//! network device, so the host's answer is the only way anything leaves.

use std::sync::Arc;
use std::time::Duration;

use crownest_proto::frame::{read_message, write_message};
use crownest_proto::{
    EGRESS_HTTP_PORT, EGRESS_SOCKS_PORT, EgressReply, EgressRequest, MAX_EGRESS_HOST,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

/// How long a connecting program waits for the host to offer a stream.
const OFFER_WAIT: Duration = Duration::from_secs(10);
/// How long the host may take to decide and dial.
const REPLY_WAIT: Duration = Duration::from_secs(40);
/// Longest HTTP request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head or SOCKS handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);
/// Offers held at once (the host bounds them far below this).
const MAX_OFFERS: usize = 1024;

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One stream the host offered, waiting for a connection.
struct Offer {
    reader: Reader,
    writer: Writer,
}

/// The proxy's state: the offers, and whether the listeners run.
pub struct Egress {
    offers: mpsc::Sender<Offer>,
    waiting: Mutex<mpsc::Receiver<Offer>>,
    started: std::sync::OnceLock<()>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("listening", &self.started.get().is_some())
            .finish()
    }
}

impl Default for Egress {
    fn default() -> Self {
        let (offers, waiting) = mpsc::channel(MAX_OFFERS);
        Self {
            offers,
            waiting: Mutex::new(waiting),
            started: std::sync::OnceLock::new(),
        }
    }
}

impl Egress {
    /// Takes one offered stream; starts the listeners on the first.
    pub async fn offer<R, W>(self: &Arc<Self>, reader: R, writer: W)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        self.started.get_or_init(|| {
            for (port, kind) in [
                (EGRESS_HTTP_PORT, Kind::Http),
                (EGRESS_SOCKS_PORT, Kind::Socks),
            ] {
                tokio::spawn(listen(self.clone(), port, kind));
            }
        });
        let offer = Offer {
            reader: Box::new(reader),
            writer: Box::new(writer),
        };
        if self.offers.try_send(offer).is_err() {
            eprintln!("crownest-agent: egress: too many offered streams, dropping one");
        }
    }

    /// Asks the host through an offered stream (skipping offers whose host
    /// session has ended) and returns its answer and the stream.
    async fn ask(&self, host: &str, port: u16) -> Result<(EgressReply, Offer), String> {
        let deadline = tokio::time::Instant::now() + OFFER_WAIT;
        loop {
            let offer = {
                let mut waiting = self.waiting.lock().await;
                match tokio::time::timeout_at(deadline, waiting.recv()).await {
                    Ok(Some(offer)) => offer,
                    _ => return Err(String::from("the host offered no connection in time")),
                }
            };
            let mut offer = offer;
            let request = EgressRequest {
                host: host.to_owned(),
                port,
            };
            if write_message(&mut offer.writer, &request).await.is_err() {
                continue; // a stream of a host session that has ended
            }
            match tokio::time::timeout(
                REPLY_WAIT,
                read_message::<EgressReply, _>(&mut offer.reader),
            )
            .await
            {
                Ok(Ok(Some(reply))) => return Ok((reply, offer)),
                Ok(_) => continue,
                Err(_) => return Err(String::from("the host did not answer in time")),
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Socks,
}

async fn listen(egress: Arc<Egress>, port: u16, kind: Kind) {
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("crownest-agent: egress: cannot listen on 127.0.0.1:{port}: {e}");
            return;
        }
    };
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let egress = egress.clone();
        tokio::spawn(async move {
            match kind {
                Kind::Http => http(egress, client).await,
                Kind::Socks => socks(egress, client).await,
            }
        });
    }
}

/// Pipes the client and the host's connection until both sides close.
async fn pipe(mut client: TcpStream, early: &[u8], offer: Offer) {
    let Offer { reader, mut writer } = offer;
    if !early.is_empty() && writer.write_all(early).await.is_err() {
        return;
    }
    let mut host = tokio::io::join(reader, writer);
    // Large buffers: every write to the host stream is one yamux frame.
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut host, PIPE_BUFFER, PIPE_BUFFER)
            .await;
}

/// Bytes copied per read in each direction (one yamux frame at most).
const PIPE_BUFFER: usize = 256 * 1024;

// ---- HTTP proxy -----------------------------------------------------------

async fn http(egress: Arc<Egress>, mut client: TcpStream) {
    let head = match tokio::time::timeout(HANDSHAKE_WAIT, read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        Ok(Err(status)) => {
            return respond(&mut client, status, "the proxy could not read the request").await;
        }
        Err(_) => return,
    };
    let Some(request) = parse_head(&head.bytes) else {
        return respond(
            &mut client,
            400,
            "not an HTTP proxy request: use CONNECT host:port or an absolute http:// URI",
        )
        .await;
    };
    let (reply, offer) = match egress.ask(&request.host, request.port).await {
        Ok(answer) => answer,
        Err(reason) => return respond(&mut client, 503, &reason).await,
    };
    match reply {
        EgressReply::Connected => {}
        EgressReply::Refused { code, reason } => {
            return respond(&mut client, 403, &format!("{code}: {reason}")).await;
        }
        EgressReply::Failed { reason } => return respond(&mut client, 502, &reason).await,
    }
    match request.forward {
        None => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            pipe(client, &head.rest, offer).await;
        }
        Some(mut forward) => {
            forward.extend_from_slice(&head.rest);
            pipe(client, &forward, offer).await;
        }
    }
}

struct Head {
    bytes: Vec<u8>,
    /// Bytes the client sent after the head (a body, or TLS already).
    rest: Vec<u8>,
}

async fn read_head(client: &mut TcpStream) -> Result<Head, u16> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Ok(Head {
                bytes: buffer,
                rest,
            });
        }
        if buffer.len() > MAX_HEAD {
            return Err(431);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct ProxyRequest {
    host: String,
    port: u16,
    /// For an absolute-URI request, the head to send the origin (origin
    /// form, hop-by-hop and proxy headers dropped, `Connection: close`).
    forward: Option<Vec<u8>>,
}

fn parse_head(head: &[u8]) -> Option<ProxyRequest> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(target, None)?;
        return Some(ProxyRequest {
            host,
            port,
            forward: None,
        });
    }
    let scheme = target.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let rest = &target[7..];
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = split_authority(authority, Some(80))?;
    // The origin gets the URI's authority as Host (RFC 9112 3.2.2: a Host
    // that differs is replaced), and no hop-by-hop or proxy header: neither
    // those the spec names nor those the client's Connection header lists.
    let headers: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let name_of = |line: &str| {
        line.split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    let mut hop: Vec<String> = [
        "proxy-connection",
        "proxy-authorization",
        "connection",
        "keep-alive",
        "host",
    ]
    .iter()
    .map(|h| h.to_string())
    .collect();
    for line in headers.iter().filter(|l| name_of(l) == "connection") {
        let listed = line.split_once(':').map_or("", |(_, v)| v);
        hop.extend(
            listed
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty()),
        );
    }
    let mut forward = format!("{method} {path} {version}\r\nHost: {authority}\r\n");
    for line in headers {
        if hop.contains(&name_of(line)) {
            continue;
        }
        forward.push_str(line);
        forward.push_str("\r\n");
    }
    forward.push_str("Connection: close\r\n\r\n");
    Some(ProxyRequest {
        host,
        port,
        forward: Some(forward.into_bytes()),
    })
}

/// `host:port`, `[v6]:port`, or `host` with a default port.
fn split_authority(authority: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, default_port?),
        }
    };
    if host.is_empty() || host.len() > MAX_EGRESS_HOST || port == 0 {
        return None;
    }
    Some((host.to_owned(), port))
}

async fn respond(client: &mut TcpStream, status: u16, reason: &str) {
    let phrase = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nX-Crownest-Egress: refused\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

// ---- SOCKS5 ---------------------------------------------------------------

/// SOCKS5 reply codes (RFC 1928).
const SOCKS_OK: u8 = 0x00;
const SOCKS_FAILURE: u8 = 0x01;
const SOCKS_NOT_ALLOWED: u8 = 0x02;
const SOCKS_HOST_UNREACHABLE: u8 = 0x04;
const SOCKS_COMMAND_UNSUPPORTED: u8 = 0x07;
const SOCKS_ADDRESS_UNSUPPORTED: u8 = 0x08;

async fn socks(egress: Arc<Egress>, mut client: TcpStream) {
    let target = match tokio::time::timeout(HANDSHAKE_WAIT, socks_handshake(&mut client)).await {
        Ok(Ok(target)) => target,
        Ok(Err(Some(code))) => return socks_reply(&mut client, code).await,
        _ => return,
    };
    let (reply, offer) = match egress.ask(&target.0, target.1).await {
        Ok(answer) => answer,
        Err(_) => return socks_reply(&mut client, SOCKS_FAILURE).await,
    };
    match reply {
        EgressReply::Connected => {}
        EgressReply::Refused { code, reason } => {
            eprintln!("crownest-agent: egress: {code}: {reason}");
            return socks_reply(&mut client, SOCKS_NOT_ALLOWED).await;
        }
        EgressReply::Failed { .. } => {
            return socks_reply(&mut client, SOCKS_HOST_UNREACHABLE).await;
        }
    }
    if client
        .write_all(&[5, SOCKS_OK, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .is_err()
    {
        return;
    }
    pipe(client, &[], offer).await;
}

async fn socks_reply(client: &mut TcpStream, code: u8) {
    let _ = client.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await;
    let _ = client.shutdown().await;
}

/// Greeting and request; `Err(Some(code))` to answer, `Err(None)` to drop.
async fn socks_handshake(client: &mut TcpStream) -> Result<(String, u16), Option<u8>> {
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting).await.map_err(|_| None)?;
    if greeting[0] != 5 {
        return Err(None);
    }
    let mut methods = vec![0u8; usize::from(greeting[1])];
    client.read_exact(&mut methods).await.map_err(|_| None)?;
    if !methods.contains(&0) {
        let _ = client.write_all(&[5, 0xff]).await;
        return Err(None);
    }
    client.write_all(&[5, 0]).await.map_err(|_| None)?;
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await.map_err(|_| None)?;
    if request[0] != 5 {
        return Err(None);
    }
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await.map_err(|_| None)?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await.map_err(|_| None)?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await.map_err(|_| None)?;
            String::from_utf8(name).map_err(|_| Some(SOCKS_ADDRESS_UNSUPPORTED))?
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await.map_err(|_| None)?;
            std::net::Ipv6Addr::from(ip).to_string()
        }
        _ => return Err(Some(SOCKS_ADDRESS_UNSUPPORTED)),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await.map_err(|_| None)?;
    if request[1] != 1 {
        return Err(Some(SOCKS_COMMAND_UNSUPPORTED));
    }
    let port = u16::from_be_bytes(port);
    if host.is_empty() || port == 0 {
        return Err(Some(SOCKS_ADDRESS_UNSUPPORTED));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_absolute_uri_heads_parse_and_are_rewritten() {
        let connect = parse_head(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
            .expect("connect");
        assert_eq!((connect.host.as_str(), connect.port), ("pypi.org", 443));
        assert!(connect.forward.is_none());

        let get = parse_head(
            b"GET http://example.test:8080/simple/?q=1 HTTP/1.1\r\nHost: example.test:8080\r\n\
              Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n",
        )
        .expect("get");
        assert_eq!((get.host.as_str(), get.port), ("example.test", 8080));
        let forward = String::from_utf8(get.forward.expect("forward")).expect("utf8");
        assert_eq!(
            forward,
            "GET /simple/?q=1 HTTP/1.1\r\nHost: example.test:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );

        let fronted = parse_head(
            b"GET http://allowed.test/ HTTP/1.1\r\nHost: other.test\r\nConnection: close, X-Secret\r\n\
              X-Secret: 1\r\nUser-Agent: t\r\n\r\n",
        )
        .expect("fronted");
        assert_eq!(
            String::from_utf8(fronted.forward.expect("forward")).expect("utf8"),
            "GET / HTTP/1.1\r\nHost: allowed.test\r\nUser-Agent: t\r\nConnection: close\r\n\r\n"
        );

        let v6 = parse_head(b"GET http://[::1]/ HTTP/1.0\r\n\r\n").expect("v6");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 80));
        assert!(
            String::from_utf8(v6.forward.expect("f"))
                .expect("u")
                .contains("Host: [::1]\r\n")
        );

        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"GET https://x/ HTTP/1.1\r\n\r\n",
            b"CONNECT nohostport HTTP/1.1\r\n\r\n",
            b"CONNECT x:0 HTTP/1.1\r\n\r\n",
            b"CONNECT x:99999 HTTP/1.1\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
