//! The default result adapter for JavaScript and TypeScript code contexts
//! (the node `vm` runner): the traceback is `error.stack` without its
//! `name: message` header and without frames inside node or the runner.
#![no_std]

extern crate alloc;
extern crate guest_rt;

use adapter_core::bindings::crownest::plugin::types::{Adapted, RawEvent};
use alloc::string::String;
use alloc::vec::Vec;

struct NodeAdapter;

impl adapter_core::bindings::Guest for NodeAdapter {
    fn adapt(events: Vec<RawEvent>) -> Result<Adapted, String> {
        Ok(adapter_core::adapt(events, adapter_core::Style::Node))
    }
}

adapter_core::bindings::export!(NodeAdapter);
