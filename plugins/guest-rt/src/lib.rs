//! The runtime every default CrowNest plugin links instead of `std`.
//!
//! A Rust `std` component for `wasm32-wasip2` imports WASI interfaces even
//! when the code never touches them (`wasi:cli/environment`, `wasi:cli/exit`,
//! `wasi:io/*`, `wasi:cli/std{in,out,err}`, `wasi:filesystem/{types,preopens}`:
//! std's panic and start-up machinery reaches them through wasi-libc). The
//! host refuses components that import anything but `crownest:plugin/*`, so
//! the plugins are `#![no_std]` + `alloc`: this crate supplies the global
//! allocator (dlmalloc over `memory.grow`, bounded by the host's memory cap)
//! and a panic handler that traps (the host reports the trap).
#![no_std]

extern crate alloc;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic is a trap: there is no stderr to print to, and the host turns
/// the trap into `PluginError::Trap` for this call only.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

// `memcpy`, `memset`, `memcmp` & co. come from wasi-libc's `libc.a` (shipped
// with the target); only those objects are linked, and they import nothing.
#[cfg(target_arch = "wasm32")]
#[link(name = "c")]
unsafe extern "C" {}

/// The canonical ABI's allocator export. With `std` the wasip2 standard
/// library provides it; without, wit-bindgen expects us to.
///
/// # Safety
/// Called by the host per the canonical ABI: `old_ptr`/`old_len` describe a
/// block this allocator returned (or `old_len` is 0), `align` is a power of two.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: per the canonical ABI contract above; a null result traps below.
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}
