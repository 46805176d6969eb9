//! The QEMU command line of one microVM, built from typed parts.
//!
//! Two machine shapes: `-M microvm` (virtio-mmio, no PCI, no firmware
//! tables beyond what it needs; boots the kernel's ELF) under KVM, and
//! `-M pc` (virtio-pci; boots the bzImage) under TCG, where microvm often
//! hangs calibrating the TSC without a PIT or HPET to measure it against.
//! Either way: no default devices, no network device, no display, no
//! reboot (a guest panic ends the process), QEMU's seccomp sandbox on with
//! everything optional denied, and the process itself started as an
//! unprivileged uid by the driver (QEMU's own `-runas` would need the
//! set-uid calls its sandbox denies).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::guest::Kernel;

/// The agent's port name (the guest finds `/dev/vportNpM` by it).
pub use super::AGENT_PORT_NAME;

/// How the guest's CPU is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAccel {
    Kvm,
    /// QEMU's emulator; `tb_mib` caps its translation cache (the default,
    /// a quarter of guest memory or 1 GiB, would dominate host memory).
    Tcg {
        tb_mib: u32,
    },
}

/// One microVM's QEMU invocation.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    pub binary: PathBuf,
    pub name: String,
    pub accel: QemuAccel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// Attached read-only: `/dev/vda` in the guest.
    pub rootfs_image: PathBuf,
    /// Attached read-write: `/dev/vdb`.
    pub scratch_image: PathBuf,
    /// QEMU listens here; the host connects (and reconnects after a host
    /// restart) to reach the agent's port.
    pub agent_socket: PathBuf,
    /// The guest's serial console (kernel messages, the agent's stderr).
    pub console_log: PathBuf,
}

/// QEMU option values separate keys with commas; a comma in a value is
/// written twice.
fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

impl QemuCommand {
    /// The machine: `microvm` under KVM, `pc` under TCG (see the module docs).
    fn microvm(&self) -> bool {
        matches!(self.accel, QemuAccel::Kvm)
    }

    /// The kernel to pass for this machine: the ELF for microvm, the
    /// bzImage for pc.
    pub fn kernel_for(kernel: &Kernel, accel: QemuAccel) -> PathBuf {
        match accel {
            QemuAccel::Kvm => kernel.vmlinux(),
            QemuAccel::Tcg { .. } => kernel.bzimage(),
        }
    }

    /// The arguments after the binary.
    pub fn args(&self) -> Vec<OsString> {
        let (machine, blk, serial) = if self.microvm() {
            (
                "microvm,pit=off,pic=off,rtc=off,isa-serial=on",
                "virtio-blk-device",
                "virtio-serial-device",
            )
        } else {
            ("pc", "virtio-blk-pci", "virtio-serial-pci")
        };
        let (accel, cpu) = match self.accel {
            QemuAccel::Kvm => (String::from("kvm"), "host"),
            QemuAccel::Tcg { tb_mib } => (format!("tcg,tb-size={tb_mib}"), "max"),
        };
        let args: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=off", self.name.replace(',', ",,")),
            "-machine".into(),
            machine.into(),
            "-accel".into(),
            accel,
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            self.vcpus.max(1).to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            self.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            self.cmdline.clone(),
            "-drive".into(),
            format!(
                "file={},if=none,id=root,format=raw,readonly=on",
                escape(&self.rootfs_image)
            ),
            "-device".into(),
            format!("{blk},drive=root"),
            "-drive".into(),
            format!(
                "file={},if=none,id=scratch,format=raw,discard=unmap",
                escape(&self.scratch_image)
            ),
            "-device".into(),
            format!("{blk},drive=scratch"),
            "-device".into(),
            format!("{serial},max_ports=2"),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                escape(&self.agent_socket)
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            "-serial".into(),
            format!("file:{}", self.console_log.to_string_lossy()),
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        ];
        // microvm keeps its ACPI tables: they are how this kernel (without
        // virtio_mmio command-line devices) finds the virtio devices.
        args.into_iter().map(OsString::from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(accel: QemuAccel) -> QemuCommand {
        QemuCommand {
            binary: PathBuf::from("qemu-system-x86_64"),
            name: String::from("sbx_1"),
            accel,
            vcpus: 2,
            memory_mib: 512,
            kernel: PathBuf::from("/c/kernels/k/vmlinuz"),
            initramfs: PathBuf::from("/c/initramfs/abc.cpio"),
            cmdline: String::from("console=ttyS0 -- --vm"),
            rootfs_image: PathBuf::from("/c/images/python-1.v1.ext4"),
            scratch_image: PathBuf::from("/d/sbx_1/vm/scratch.img"),
            agent_socket: PathBuf::from("/d/sbx_1/vm/agent.sock"),
            console_log: PathBuf::from("/d/sbx_1/vm/console.log"),
        }
    }

    fn text(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_tcg_guest_is_a_pc_with_pci_virtio_a_capped_translation_cache_and_the_sandbox_on() {
        let args = text(&command(QemuAccel::Tcg { tb_mib: 64 }).args());
        let expected: Vec<String> = [
            "-name",
            "guest=sbx_1,debug-threads=off",
            "-machine",
            "pc",
            "-accel",
            "tcg,tb-size=64",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "512M",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-kernel",
            "/c/kernels/k/vmlinuz",
            "-initrd",
            "/c/initramfs/abc.cpio",
            "-append",
            "console=ttyS0 -- --vm",
            "-drive",
            "file=/c/images/python-1.v1.ext4,if=none,id=root,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=root",
            "-drive",
            "file=/d/sbx_1/vm/scratch.img,if=none,id=scratch,format=raw,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=scratch",
            "-device",
            "virtio-serial-pci,max_ports=2",
            "-chardev",
            "socket,id=agent,path=/d/sbx_1/vm/agent.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=org.crownest.agent",
            "-serial",
            "file:/d/sbx_1/vm/console.log",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(args, expected);
    }

    #[test]
    fn a_kvm_guest_is_a_microvm_with_mmio_virtio_and_the_host_cpu() {
        let args = text(&command(QemuAccel::Kvm).args());
        let pairs: Vec<(&str, &str)> = args
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        assert!(pairs.contains(&("-machine", "microvm,pit=off,pic=off,rtc=off,isa-serial=on")));
        assert!(pairs.contains(&("-accel", "kvm")));
        assert!(pairs.contains(&("-cpu", "host")));
        assert!(pairs.contains(&("-device", "virtio-blk-device,drive=root")));
        assert!(pairs.contains(&("-device", "virtio-serial-device,max_ports=2")));
        assert!(
            !args
                .iter()
                .any(|a| a.contains("netdev") || a.contains("-nic"))
        );
    }

    #[test]
    fn commas_in_paths_are_doubled_so_they_cannot_add_options() {
        let mut c = command(QemuAccel::Tcg { tb_mib: 64 });
        c.scratch_image = PathBuf::from("/d/x,readonly=off/scratch.img");
        c.agent_socket = PathBuf::from("/d/a,server=off/agent.sock");
        let args = text(&c.args());
        assert!(args.contains(&String::from(
            "file=/d/x,,readonly=off/scratch.img,if=none,id=scratch,format=raw,discard=unmap"
        )));
        assert!(args.contains(&String::from(
            "socket,id=agent,path=/d/a,,server=off/agent.sock,server=on,wait=off"
        )));
    }
}
