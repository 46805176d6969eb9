"""A CrowNest promotion policy in Python: one output + the run's artifact
policy -> inline, promote or reject."""

import wit_world
from wit_world.imports.types import (
    ArtifactPolicy,
    Decision_Inline,
    Decision_Promote,
    Decision_Reject,
    Format,
    RejectReason,
)

import helpers

REASONS = {
    "output-too-large": RejectReason.OUTPUT_TOO_LARGE,
    "unsupported-format": RejectReason.UNSUPPORTED_FORMAT,
    "requires-artifact-promotion": RejectReason.REQUIRES_ARTIFACT_PROMOTION,
}


class WitWorld(wit_world.WitWorld):
    def decide(self, output, policy, limits, config: str):
        verdict = helpers.decide(
            output.size,
            output.format == Format.UNKNOWN,
            policy == ArtifactPolicy.PROMOTE,
            limits.max_inline_bytes,
            limits.max_artifact_bytes,
        )
        if verdict == "inline":
            return Decision_Inline()
        if verdict == "promote":
            return Decision_Promote()
        return Decision_Reject(REASONS[verdict])
