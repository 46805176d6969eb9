//! Network egress by policy. A sandbox has no network device; the agent's
//! proxy (HTTP on 127.0.0.1:3128, SOCKS5 on 127.0.0.1:1080 inside it)
//! hands each connection to the host over an offered agent stream, and the
//! host decides ([`policy`]), resolves, dials, meters and throttles
//! ([`relay`]). Nothing here knows HTTP bodies, SQL or a runtime.

pub mod policy;
pub mod relay;

pub use policy::{Ceiling, Host, Mode, Policy, Refusal, Rule};
pub use relay::{EgressEvent, SandboxEgress, Settings};
