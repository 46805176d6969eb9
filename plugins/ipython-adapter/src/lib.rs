//! The default result adapter for Python code contexts (IPython's
//! InteractiveShell or the plain runner): tracebacks lose their ANSI colours
//! and are split one line per element.
#![no_std]

extern crate alloc;
extern crate guest_rt;

use adapter_core::bindings::crownest::plugin::types::{Adapted, RawEvent};
use alloc::string::String;
use alloc::vec::Vec;

struct IPythonAdapter;

impl adapter_core::bindings::Guest for IPythonAdapter {
    fn adapt(events: Vec<RawEvent>) -> Result<Adapted, String> {
        Ok(adapter_core::adapt(events, adapter_core::Style::IPython))
    }
}

adapter_core::bindings::export!(IPythonAdapter);
