//! The crosvm command lines, built from typed parts, and the relay that
//! keeps a crosvm guest's agent port reachable across host restarts.
//!
//! Targeted: crosvm at commit `f1e797a6` (2026-08-21, package version
//! 0.1.0), flags as `src/crosvm/cmdline.rs` defines them there:
//!
//! ```text
//! crosvm run --cpus num-cores=N --mem size=MiB --initrd initramfs.cpio
//!   --params "<kernel command line>"
//!   --block path=rootfs.ext4,ro=true --block path=scratch.img
//!   --serial type=file,path=console.log,hardware=serial,num=1,console=true
//!   --serial type=unix-stream,path=serial.sock,hardware=virtio-console,num=1,input-unix-stream=true
//!   --socket control.sock --no-usb --no-balloon
//!   vmlinuz
//! crosvm stop control.sock
//! ```
//!
//! - No `--net`: crosvm adds no network device unless asked.
//! - No `--disable-sandbox`: every device runs in its own minijail (new
//!   pid, user, mount and net namespaces, no capabilities, seccomp
//!   policies compiled into crosvm), pivoted into `/var/empty`.
//! - The agent's port is a single-port virtio-console, `/dev/hvc0` in the
//!   guest (crosvm sends no port names), which the agent puts in raw mode.
//! - crosvm *connects* a `unix-stream` serial to a listening socket once
//!   and never reconnects, so the host cannot be that listener (it would
//!   lose the guest on restart). [`relay`] (`crownest microvm-relay`,
//!   started beside crosvm and outliving the host like it) listens for
//!   crosvm's one connection and, on a second socket, for host
//!   connections, one at a time: a new host connection replaces the old,
//!   and the agent's handshake resyncs on the same guest stream.
//!
//! None of this runs here (no crosvm package, no usable KVM): the argv is
//! pinned by the tests below, the relay is tested on its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// One microVM's `crosvm run` invocation.
#[derive(Debug, Clone)]
pub struct CrosvmCommand {
    pub binary: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// A bzImage (crosvm boots it directly on x86_64) or an ELF.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// `/dev/vda` in the guest, read-only.
    pub rootfs_image: PathBuf,
    /// `/dev/vdb`, read-write.
    pub scratch_image: PathBuf,
    /// The relay's guest-side socket, which crosvm connects to.
    pub serial_socket: PathBuf,
    pub console_log: PathBuf,
    /// crosvm's control socket (`crosvm stop` talks to it).
    pub control_socket: PathBuf,
}

/// crosvm's key=value lists: a value with a comma, quote or bracket is
/// double-quoted, with `\` escaping `"` and `\`.
fn value(path: &Path) -> String {
    let text = path.to_string_lossy();
    if text.contains([',', '"', '[', ']', '=']) {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        text.into_owned()
    }
}

/// The guest device of the agent's port.
pub const AGENT_PORT_DEVICE: &str = "/dev/hvc0";

impl CrosvmCommand {
    pub fn args(&self) -> Vec<OsString> {
        let args: Vec<String> = vec![
            "run".into(),
            "--cpus".into(),
            format!("num-cores={}", self.vcpus.max(1)),
            "--mem".into(),
            format!("size={}", self.memory_mib),
            "--initrd".into(),
            self.initramfs.to_string_lossy().into_owned(),
            "--params".into(),
            self.cmdline.clone(),
            "--block".into(),
            format!("path={},ro=true", value(&self.rootfs_image)),
            "--block".into(),
            format!("path={}", value(&self.scratch_image)),
            "--serial".into(),
            format!(
                "type=file,path={},hardware=serial,num=1,console=true",
                value(&self.console_log)
            ),
            "--serial".into(),
            format!(
                "type=unix-stream,path={},hardware=virtio-console,num=1,input-unix-stream=true",
                value(&self.serial_socket)
            ),
            "--socket".into(),
            self.control_socket.to_string_lossy().into_owned(),
            "--no-usb".into(),
            "--no-balloon".into(),
            self.kernel.to_string_lossy().into_owned(),
        ];
        args.into_iter().map(OsString::from).collect()
    }

    /// `crosvm stop <control socket>`.
    pub fn stop_args(control_socket: &Path) -> Vec<OsString> {
        vec![
            OsString::from("stop"),
            control_socket.as_os_str().to_owned(),
        ]
    }
}

/// `crownest microvm-relay --guest G --host H`: accepts crosvm's one
/// connection on `G`, and host connections on `H` one at a time (a new one
/// replaces the old), piping bytes between the guest stream and the
/// current host connection. Ends when the guest stream ends (the VM is
/// gone). Bytes the guest writes while no host is connected wait in the
/// guest's stream (the relay stops reading it).
pub async fn relay(guest: &Path, host: &Path) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    let bind = |path: &Path| {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path)
    };
    let guest_listener = bind(guest)?;
    let host_listener = bind(host)?;
    let (guest_stream, _) = guest_listener.accept().await?;
    drop(guest_listener);
    let _ = std::fs::remove_file(guest);
    let (mut guest_read, mut guest_write) = guest_stream.into_split();
    let mut to_host = vec![0u8; 64 * 1024];
    let mut to_guest = vec![0u8; 64 * 1024];
    let (mut current, _) = host_listener.accept().await?;
    loop {
        let (mut host_read, mut host_write) = current.split();
        let next = loop {
            tokio::select! {
                accepted = host_listener.accept() => break Some(accepted?.0),
                read = guest_read.read(&mut to_host) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(());
                    }
                    // A host that went away drops these bytes; the agent's
                    // handshake resyncs with the next one.
                    if host_write.write_all(&to_host[..n]).await.is_err() {
                        break None;
                    }
                }
                read = host_read.read(&mut to_guest) => {
                    match read {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => guest_write.write_all(&to_guest[..n]).await?,
                    }
                }
            }
        };
        current = match next {
            Some(stream) => stream,
            None => host_listener.accept().await?.0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    fn command() -> CrosvmCommand {
        CrosvmCommand {
            binary: PathBuf::from("crosvm"),
            vcpus: 2,
            memory_mib: 1024,
            kernel: PathBuf::from("/c/kernels/k/vmlinuz"),
            initramfs: PathBuf::from("/c/initramfs/abc.cpio"),
            cmdline: String::from("console=ttyS0 panic=-1 -- --vm --port /dev/hvc0"),
            rootfs_image: PathBuf::from("/c/images/python-1.v1.ext4"),
            scratch_image: PathBuf::from("/d/sbx_1/vm/scratch.img"),
            serial_socket: PathBuf::from("/d/sbx_1/vm/serial.sock"),
            console_log: PathBuf::from("/d/sbx_1/vm/console.log"),
            control_socket: PathBuf::from("/d/sbx_1/vm/control.sock"),
        }
    }

    fn text(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_run_argv_is_pinned_and_has_no_network_and_keeps_the_sandbox() {
        let expected: Vec<String> = [
            "run",
            "--cpus", "num-cores=2",
            "--mem", "size=1024",
            "--initrd", "/c/initramfs/abc.cpio",
            "--params", "console=ttyS0 panic=-1 -- --vm --port /dev/hvc0",
            "--block", "path=/c/images/python-1.v1.ext4,ro=true",
            "--block", "path=/d/sbx_1/vm/scratch.img",
            "--serial", "type=file,path=/d/sbx_1/vm/console.log,hardware=serial,num=1,console=true",
            "--serial", "type=unix-stream,path=/d/sbx_1/vm/serial.sock,hardware=virtio-console,num=1,input-unix-stream=true",
            "--socket", "/d/sbx_1/vm/control.sock",
            "--no-usb", "--no-balloon",
            "/c/kernels/k/vmlinuz",
        ]
        .map(String::from)
        .to_vec();
        let args = text(&command().args());
        assert_eq!(args, expected);
        assert!(
            !args
                .iter()
                .any(|a| a == "--disable-sandbox" || a.starts_with("--net"))
        );
    }

    #[test]
    fn a_one_cpu_template_with_small_memory_gets_its_own_numbers() {
        let mut c = command();
        c.vcpus = 1;
        c.memory_mib = 256;
        let args = text(&c.args());
        assert_eq!(args[1..5], ["--cpus", "num-cores=1", "--mem", "size=256"]);
    }

    #[test]
    fn paths_with_commas_or_quotes_are_quoted_so_they_cannot_add_keys() {
        let mut c = command();
        c.scratch_image = PathBuf::from("/d/a,ro=true/scratch.img");
        c.serial_socket = PathBuf::from("/d/q\"x/serial.sock");
        let args = text(&c.args());
        assert!(args.contains(&String::from("path=\"/d/a,ro=true/scratch.img\"")));
        assert!(
            args.iter()
                .any(|a| a.starts_with("type=unix-stream,path=\"/d/q\\\"x/serial.sock\","))
        );
        assert_eq!(
            text(&CrosvmCommand::stop_args(Path::new("/d/c.sock"))),
            ["stop", "/d/c.sock"]
        );
    }

    async fn connect(path: &Path) -> UnixStream {
        for _ in 0..200 {
            if let Ok(stream) = UnixStream::connect(path).await {
                return stream;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("cannot connect to {}", path.display());
    }

    #[tokio::test]
    async fn the_relay_keeps_one_guest_stream_across_host_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (guest_path, host_path) = (dir.path().join("g.sock"), dir.path().join("h.sock"));
        let relay = tokio::spawn({
            let (g, h) = (guest_path.clone(), host_path.clone());
            async move { relay(&g, &h).await }
        });
        let mut guest = connect(&guest_path).await;
        let mut buf = [0u8; 5];

        let mut first = connect(&host_path).await;
        first.write_all(b"hello").await.expect("write");
        guest.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        guest.write_all(b"world").await.expect("write");
        first.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"world");

        // A second host (a restarted one) replaces the first on the same
        // guest stream.
        let mut second = connect(&host_path).await;
        second.write_all(b"again").await.expect("write");
        guest.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"again");
        guest.write_all(b"reply").await.expect("write");
        second.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"reply");
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.expect("first is closed");
        assert!(rest.is_empty());

        // The guest stream ending (the VM gone) ends the relay.
        drop(guest);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("relay ends");
        assert!(ended.expect("join").is_ok());
    }
}
