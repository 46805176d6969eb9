//! Builds the one native piece of the host: the stat shim preloaded into
//! `gvisor` sandboxes (see `native/gvisor_stat_shim.c` and
//! `src/runtime/gvisor.rs`), embedded in the binary with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = PathBuf::from("native/gvisor_stat_shim.c");
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("gvisor_stat_shim.so");
    let compiler = std::env::var("CC_x86_64_unknown_linux_gnu")
        .or_else(|_| std::env::var("CC"))
        .unwrap_or_else(|_| String::from("cc"));
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler `{compiler}` (apt-get install gcc): {e}")
        });
    assert!(status.success(), "building {} failed", source.display());
}
