//! The default artifact promotion policy (the Code Runs rules):
//!
//! - inline formats: text, markdown, json, data, chart, latex, when at most
//!   `max-inline-bytes`;
//! - artifact formats: png, jpeg, svg, html, json, chart, data;
//! - `promote`: an artifact format is promoted (`output-too-large` past
//!   `max-artifact-bytes`); anything else is inlined when it may be;
//! - `inline`: what may be inlined is; otherwise `requires-artifact-promotion`
//!   for an artifact format, `output-too-large` for the rest;
//! - `unknown` is always `unsupported-format`.
#![no_std]

extern crate alloc;
extern crate guest_rt;

mod bindings {
    wit_bindgen::generate!({ world: "promotion-policy", path: "../../wit" });
}

use alloc::string::String;
use bindings::crownest::plugin::types::{
    ArtifactPolicy, Decision, Format, Output, PolicyLimits, RejectReason,
};

struct DefaultPolicy;

impl bindings::Guest for DefaultPolicy {
    fn decide(
        output: Output,
        policy: ArtifactPolicy,
        limits: PolicyLimits,
    ) -> Result<Decision, String> {
        Ok(decide(output.format, output.size, policy, &limits))
    }
}

fn decide(format: Format, size: u64, policy: ArtifactPolicy, limits: &PolicyLimits) -> Decision {
    let inline_format = matches!(
        format,
        Format::Text
            | Format::Markdown
            | Format::Json
            | Format::Data
            | Format::Chart
            | Format::Latex
    );
    let artifact_format = matches!(
        format,
        Format::Png
            | Format::Jpeg
            | Format::Svg
            | Format::Html
            | Format::Json
            | Format::Chart
            | Format::Data
    );
    if !inline_format && !artifact_format {
        return Decision::Reject(RejectReason::UnsupportedFormat);
    }
    if policy == ArtifactPolicy::Promote && artifact_format {
        return if size <= limits.max_artifact_bytes {
            Decision::Promote
        } else {
            Decision::Reject(RejectReason::OutputTooLarge)
        };
    }
    if inline_format && size <= limits.max_inline_bytes {
        return Decision::Inline;
    }
    if artifact_format {
        Decision::Reject(RejectReason::RequiresArtifactPromotion)
    } else {
        Decision::Reject(RejectReason::OutputTooLarge)
    }
}

bindings::export!(DefaultPolicy with_types_in bindings);
