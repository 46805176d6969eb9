//! The default output formatter: `formatter_core::format`, exported.
#![no_std]

extern crate alloc;
extern crate guest_rt;

use alloc::string::String;
use formatter_core::bindings::crownest::plugin::types::{FormatLimits, Output, RichOutput};

struct DefaultFormatter;

impl formatter_core::bindings::Guest for DefaultFormatter {
    fn format(output: RichOutput, limits: FormatLimits) -> Result<Output, String> {
        formatter_core::format(output, limits)
    }
}

formatter_core::bindings::export!(DefaultFormatter);
