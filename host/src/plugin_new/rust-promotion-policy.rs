//! A CrowNest promotion policy: one output + the run's artifact policy ->
//! inline, promote or reject.

wit_bindgen::generate!({ world: "promotion-policy", path: "wit" });

use crownest::plugin::types::{Format, RejectReason};

struct Plugin;

impl Guest for Plugin {
    fn decide(
        output: Output,
        policy: ArtifactPolicy,
        limits: PolicyLimits,
        _config: String,
    ) -> Result<Decision, String> {
        Ok(decide(output.format, output.size, policy, limits))
    }
}

fn decide(format: Format, size: u64, policy: ArtifactPolicy, limits: PolicyLimits) -> Decision {
    if size > limits.max_artifact_bytes {
        return Decision::Reject(RejectReason::OutputTooLarge);
    }
    if matches!(format, Format::Unknown) {
        return Decision::Reject(RejectReason::UnsupportedFormat);
    }
    if size <= limits.max_inline_bytes {
        return Decision::Inline;
    }
    match policy {
        ArtifactPolicy::Promote => Decision::Promote,
        ArtifactPolicy::Inline => Decision::Reject(RejectReason::RequiresArtifactPromotion),
    }
}

export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_outputs_are_promoted_only_when_the_run_allows_it() {
        let limits = PolicyLimits { max_inline_bytes: 10, max_artifact_bytes: 100 };
        assert!(matches!(decide(Format::Text, 5, ArtifactPolicy::Inline, limits), Decision::Inline));
        assert!(matches!(decide(Format::Png, 50, ArtifactPolicy::Promote, limits), Decision::Promote));
        assert!(matches!(
            decide(Format::Png, 50, ArtifactPolicy::Inline, limits),
            Decision::Reject(RejectReason::RequiresArtifactPromotion)
        ));
    }
}
