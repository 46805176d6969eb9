//! Egress policy: which hosts and ports a sandbox may reach, decided by the
//! host for every connection the agent's proxy asks for.
//!
//! A rule is a host (`pypi.org`), a wildcard (`*.pythonhosted.org`: any
//! subdomain, not the name itself), an address or CIDR (`203.0.113.0/24`,
//! `2001:db8::/32`) or `*` (any host), with an optional port (`:443`), port
//! range (`:8000-8999`) or `:*`; without one a rule means ports 80 and 443.
//! Deny wins over allow. Addresses that are not public (loopback, private,
//! link-local, CGNAT, multicast, unspecified, reserved) are reached only when
//! the operator allows their range (`--egress-allow-private`) *and* an
//! allow rule names what the client asked for: a name rule for a name, an
//! address rule for an address (`open` or `*` is not enough, and a name
//! that resolves to an allowed private address is not let through by the
//! address rule: DNS rebinding); cloud metadata addresses never are.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Most rules one list may hold.
pub const MAX_RULES: usize = 256;
/// Longest rule text.
pub const MAX_RULE_LEN: usize = 300;

/// The three network modes of a template or sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Loopback only: no proxy, nothing leaves the sandbox.
    #[default]
    None,
    /// Only what the allow list names (minus the deny list).
    Allow,
    /// Any public host on any port (minus the deny list).
    Open,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Allow => "allow",
            Mode::Open => "open",
        }
    }

    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "none" => Some(Mode::None),
            "allow" => Some(Mode::Allow),
            "open" => Some(Mode::Open),
            _ => None,
        }
    }
}

/// Which ports a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// 80 and 443 (a rule written without a port).
    Web,
    Range(u16, u16),
    Any,
}

impl Ports {
    fn contains(self, port: u16) -> bool {
        match self {
            Ports::Web => port == 80 || port == 443,
            Ports::Range(lo, hi) => (lo..=hi).contains(&port),
            Ports::Any => true,
        }
    }

    fn covers(self, other: Ports) -> bool {
        match (self, other) {
            (Ports::Any, _) => true,
            (_, Ports::Any) => false,
            (Ports::Web, Ports::Web) => true,
            (Ports::Web, Ports::Range(lo, hi)) => {
                (lo == 80 && hi == 80) || (lo == 443 && hi == 443)
            }
            (Ports::Range(lo, hi), Ports::Web) => {
                (lo..=hi).contains(&80) && (lo..=hi).contains(&443)
            }
            (Ports::Range(lo, hi), Ports::Range(a, b)) => lo <= a && b <= hi,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A lower-case host name, no trailing dot.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix`.
    Subdomains(String),
    Net(IpNet),
    Anything,
}

/// One allow or deny entry, as written and as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    target: Target,
    ports: Ports,
    /// Whether this rule may let a non-public address through: an
    /// operator's rule naming a target (not `*`), or a sandbox's rule that
    /// such an operator rule covers. A sandbox never gains a private
    /// address its template's explicit rules do not name.
    private_ok: bool,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A destination the sandbox asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// A host as a client sent it (`pypi.org`, `203.0.113.5`, `[::1]`,
    /// `::1`): lower-cased, trailing dot dropped; `None` if it is neither a
    /// valid name nor an address.
    pub fn parse(text: &str) -> Option<Host> {
        let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
        if let Ok(ip) = bare.unwrap_or(text).parse::<IpAddr>() {
            return Some(Host::Ip(canonical(ip)));
        }
        let name = normalize_name(text)?;
        Some(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d`, so one rule set covers both spellings.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `::ffff:a.b.c.d/N` (N >= 96) is the IPv4 network `a.b.c.d/(N-96)`.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(mapped) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(mapped.trunc());
    }
    net
}

fn normalize_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(name)
}

impl Rule {
    /// Parses one rule; the error says what is allowed.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let shown = text.escape_debug().to_string();
        if text.len() > MAX_RULE_LEN {
            return Err(format!("a rule is at most {MAX_RULE_LEN} characters"));
        }
        let bad = |why: &str| {
            format!(
                "`{shown}` {why}; a rule is a host (`pypi.org`), `*.domain`, an address or CIDR \
                 (`203.0.113.0/24`, `[2001:db8::1]`), or `*`, optionally with `:PORT`, \
                 `:LOW-HIGH` or `:*` (default ports 80 and 443)"
            )
        };
        let (host, port) = split_port(text).ok_or_else(|| bad("has a malformed port"))?;
        let ports = match port {
            None => Ports::Web,
            Some("*") => Ports::Any,
            Some(p) => match p.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port_number(lo), port_number(hi));
                    match (lo, hi) {
                        (Some(lo), Some(hi)) if lo <= hi => Ports::Range(lo, hi),
                        _ => return Err(bad("has a malformed port range")),
                    }
                }
                None => {
                    let p = port_number(p).ok_or_else(|| bad("has a port outside 1-65535"))?;
                    Ports::Range(p, p)
                }
            },
        };
        let target = if host == "*" {
            Target::Anything
        } else if let Some(suffix) = host.strip_prefix("*.") {
            Target::Subdomains(normalize_name(suffix).ok_or_else(|| bad("is not a valid name"))?)
        } else if let Ok(net) = host.parse::<IpNet>() {
            Target::Net(canonical_net(net.trunc()))
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Target::Net(IpNet::from(canonical(ip)))
        } else if host.contains('*') {
            return Err(bad("has a `*` other than a leading `*.`"));
        } else {
            Target::Name(normalize_name(host).ok_or_else(|| bad("is not a valid host"))?)
        };
        let private_ok = !matches!(target, Target::Anything);
        Ok(Rule {
            text: text.to_owned(),
            target,
            ports,
            private_ok,
        })
    }

    /// Parses a list of rules, naming the entry that fails.
    pub fn parse_list(key: &str, items: &[String]) -> Result<Vec<Rule>, String> {
        if items.len() > MAX_RULES {
            return Err(format!(
                "{key} has {} rules; at most {MAX_RULES}",
                items.len()
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Rule::parse(item).map_err(|e| format!("{key}[{i}]: {e}")))
            .collect()
    }

    fn matches_name(&self, name: &str, port: u16) -> bool {
        self.ports.contains(port)
            && match &self.target {
                Target::Name(n) => n == name,
                Target::Subdomains(s) => {
                    name.len() > s.len() + 1 && name.ends_with(&format!(".{s}"))
                }
                Target::Anything => true,
                Target::Net(_) => false,
            }
    }

    fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.ports.contains(port)
            && match &self.target {
                Target::Net(net) => net.contains(&ip),
                Target::Anything => true,
                _ => false,
            }
    }

    /// Whether everything `other` lets through, this lets through too.
    fn covers(&self, other: &Rule) -> bool {
        let target = match (&self.target, &other.target) {
            (Target::Anything, _) => true,
            (_, Target::Anything) => false,
            (Target::Name(a), Target::Name(b)) => a == b,
            (Target::Subdomains(s), Target::Name(n)) => {
                n.len() > s.len() + 1 && n.ends_with(&format!(".{s}"))
            }
            (Target::Subdomains(s), Target::Subdomains(t)) => {
                t == s || t.ends_with(&format!(".{s}"))
            }
            (Target::Net(a), Target::Net(b)) => a.contains(b),
            _ => false,
        };
        target && self.ports.covers(other.ports)
    }

    /// This rule as a sandbox's, within `ceiling`'s explicit rules.
    fn within(&self, ceiling: &[Rule]) -> Rule {
        let private_ok = self.private_ok && ceiling.iter().any(|t| t.private_ok && t.covers(self));
        Rule {
            private_ok,
            ..self.clone()
        }
    }

    /// Whether this is a name rule (a host or `*.domain`).
    fn is_name(&self) -> bool {
        matches!(self.target, Target::Name(_) | Target::Subdomains(_))
    }
}

fn port_number(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p > 0)
}

/// `host[:port]`, `[v6]:port`, or a bare v6 address / CIDR.
fn split_port(text: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match text.matches(':').count() {
        0 => Some((text, None)),
        1 => {
            let (host, port) = text.split_once(':')?;
            Some((host, Some(port)))
        }
        _ => Some((text, None)), // an IPv6 address or CIDR without a port
    }
}

/// What a template or a sandbox allows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub mode: Mode,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

/// The operator's server-wide settings.
#[derive(Debug, Clone, Default)]
pub struct Ceiling {
    /// Non-public ranges the operator lets sandboxes reach.
    pub allow_private: Vec<IpNet>,
}

/// Why a connection is refused: a stable code and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

impl Refusal {
    fn new(code: &'static str, reason: String) -> Refusal {
        Refusal { code, reason }
    }
}

/// The request as the sandbox's client wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub host: &'a Host,
    pub port: u16,
}

impl Policy {
    /// No egress at all.
    pub fn none() -> Policy {
        Policy::default()
    }

    pub fn parse(mode: &str, allow: &[String], deny: &[String]) -> Result<Policy, String> {
        let mode = Mode::parse(mode).ok_or_else(|| {
            format!(
                "`{}` is not a network mode; use \"none\", \"allow\" or \"open\"",
                mode.escape_debug()
            )
        })?;
        let allow = Rule::parse_list("allow", allow)?;
        let deny = Rule::parse_list("deny", deny)?;
        if mode == Mode::None && !allow.is_empty() {
            return Err(String::from(
                "mode \"none\" allows nothing: drop the allow list or use mode \"allow\"",
            ));
        }
        Ok(Policy { mode, allow, deny })
    }

    pub fn allow_texts(&self) -> Vec<String> {
        self.allow.iter().map(|r| r.text.clone()).collect()
    }

    pub fn deny_texts(&self) -> Vec<String> {
        self.deny.iter().map(|r| r.text.clone()).collect()
    }

    /// Whether the sandbox gets a proxy at all.
    pub fn is_enabled(&self) -> bool {
        self.mode != Mode::None
    }

    /// A sandbox's policy within this (the template's) ceiling: its allow
    /// rules must each be covered by one of ours (anything, under `open`),
    /// its mode no wider, and our deny rules always stay. Returns the rule
    /// that is too wide otherwise.
    pub fn narrow(
        &self,
        mode: Option<Mode>,
        allow: Option<Vec<Rule>>,
        deny: Vec<Rule>,
    ) -> Result<Policy, String> {
        let mode = mode.unwrap_or(if allow.is_some() {
            Mode::Allow
        } else {
            self.mode
        });
        let wider = |m: Mode| match (self.mode, m) {
            (_, Mode::None) => false,
            (Mode::None, _) => true,
            (Mode::Allow, Mode::Open) => true,
            _ => false,
        };
        if wider(mode) {
            return Err(format!(
                "mode \"{}\" is wider than the template's \"{}\"",
                mode.as_str(),
                self.mode.as_str()
            ));
        }
        let allow = match mode {
            Mode::None => Vec::new(),
            _ => allow.unwrap_or_else(|| self.allow.clone()),
        };
        let outside = allow
            .iter()
            .find(|r| !self.allow.iter().any(|t| t.covers(r)));
        if self.mode == Mode::Allow
            && let Some(rule) = outside
        {
            return Err(format!(
                "`{rule}` is not within the template's allow list ({})",
                self.allow_texts().join(", ")
            ));
        }
        let allow = allow.iter().map(|r| r.within(&self.allow)).collect();
        let mut all_deny = self.deny.clone();
        all_deny.extend(deny.into_iter().filter(|r| !self.deny.contains(r)));
        if all_deny.len() > MAX_RULES {
            return Err(format!("deny has more than {MAX_RULES} rules"));
        }
        Ok(Policy {
            mode,
            allow,
            deny: all_deny,
        })
    }

    /// A stored sandbox policy within this (the template's, as it is now):
    /// its rules the template no longer covers are dropped, its mode is no
    /// wider, the template's deny rules are added. Used when a restarted
    /// host takes a sandbox over, so an operator's tightening applies.
    pub fn renarrow(&self, stored: &Policy) -> Policy {
        let mode = match (self.mode, stored.mode) {
            (Mode::None, _) | (_, Mode::None) => return Policy::none(),
            (Mode::Allow, _) | (_, Mode::Allow) => Mode::Allow,
            (Mode::Open, Mode::Open) => Mode::Open,
        };
        let allow = if stored.mode == Mode::Open {
            // Only an open template lets a sandbox stay open; otherwise
            // the template's own list is the narrowest that is still true.
            self.allow.clone()
        } else {
            stored
                .allow
                .iter()
                .filter(|r| self.mode == Mode::Open || self.allow.iter().any(|t| t.covers(r)))
                .map(|r| r.within(&self.allow))
                .collect()
        };
        let mut deny = self.deny.clone();
        deny.extend(
            stored
                .deny
                .iter()
                .filter(|r| !self.deny.contains(r))
                .cloned(),
        );
        deny.truncate(MAX_RULES);
        Policy { mode, allow, deny }
    }

    /// The decision before resolving: a name or address denied, or not
    /// allowed by any rule, is refused without a DNS lookup.
    pub fn check_asked(&self, asked: Asked<'_>) -> Result<(), Refusal> {
        let Asked { host, port } = asked;
        if self.mode == Mode::None {
            return Err(Refusal::new(
                "network_disabled",
                String::from("this sandbox has no network access"),
            ));
        }
        if let Host::Name(name) = host {
            if let Some(rule) = self.deny.iter().find(|r| r.matches_name(name, port)) {
                return Err(Refusal::new(
                    "egress_denied",
                    format!("{host}:{port} is denied by `{rule}`"),
                ));
            }
            // Only a name some rule allows is resolved: one that is not
            // (say, one carrying data to a resolver someone watches) never
            // reaches the host's DNS.
            let by_name = self.allow.iter().any(|r| r.matches_name(name, port));
            if self.mode == Mode::Allow && !by_name {
                return Err(Refusal::new(
                    "egress_not_allowed",
                    format!("{host}:{port} is not on the allow list"),
                ));
            }
        }
        Ok(())
    }

    /// The decision for one resolved address of the request.
    pub fn check_address(
        &self,
        ceiling: &Ceiling,
        asked: Asked<'_>,
        ip: IpAddr,
    ) -> Result<(), Refusal> {
        self.check_asked(asked)?;
        let ip = canonical(ip);
        let Asked { host, port } = asked;
        let shown = |ip: IpAddr| match host {
            Host::Ip(_) => format!("{host}:{port}"),
            Host::Name(_) => format!("{host}:{port} ({ip})"),
        };
        if is_metadata(ip) {
            return Err(Refusal::new(
                "egress_denied",
                format!("{} is a cloud metadata address, never reachable", shown(ip)),
            ));
        }
        if let Some(rule) = self.deny.iter().find(|r| r.matches_ip(ip, port)) {
            return Err(Refusal::new(
                "egress_denied",
                format!("{} is denied by `{rule}`", shown(ip)),
            ));
        }
        let name = match host {
            Host::Name(n) => Some(n.as_str()),
            Host::Ip(_) => None,
        };
        // What the client named is what must be allowed by name for a
        // non-public address: a name by a name rule, an address by an
        // address rule. A name that resolves to 127.0.0.1 is not let
        // through by a rule for 127.0.0.1 (DNS rebinding).
        let matches = |r: &Rule| match name {
            Some(n) => r.matches_name(n, port),
            None => r.matches_ip(ip, port),
        };
        let explicit = self
            .allow
            .iter()
            .any(|r| r.private_ok && (name.is_none() || r.is_name()) && matches(r));
        let allowed = explicit || self.mode == Mode::Open || self.allow.iter().any(matches);
        if !allowed {
            return Err(Refusal::new(
                "egress_not_allowed",
                format!("{} is not on the allow list", shown(ip)),
            ));
        }
        if let Some(kind) = special(ip) {
            if !ceiling.allow_private.iter().any(|net| net.contains(&ip)) {
                return Err(Refusal::new(
                    "egress_private_address",
                    format!(
                        "{} is a {kind} address; the operator has not allowed it (--egress-allow-private)",
                        shown(ip)
                    ),
                ));
            }
            if !explicit {
                return Err(Refusal::new(
                    "egress_private_address",
                    format!(
                        "{} is a {kind} address; it is reached only through an allow rule naming it",
                        shown(ip)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Cloud metadata and platform services: never reachable, whatever is
/// allowed (also inside an IPv6 address that embeds them).
fn is_metadata(ip: IpAddr) -> bool {
    const V4: [Ipv4Addr; 3] = [
        Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, ...
        Ipv4Addr::new(168, 63, 129, 16),   // Azure's platform address
        Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    ];
    match canonical(ip) {
        IpAddr::V4(v4) => V4.contains(&v4),
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || embedded_v4(v6).is_some_and(|v4| V4.contains(&v4))
        }
    }
}

/// The IPv4 address a NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`), 6to4
/// (`2002::/16`), IPv4-compatible (`::a.b.c.d`) or Teredo (`2001::/32`)
/// address carries.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else if s[..6] == [0, 0, 0, 0, 0, 0] && (s[6] != 0 || s[7] > 1) {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: the client's address, bit-inverted, in the last 32 bits.
        Some(v4(!s[6], !s[7]))
    } else {
        None
    }
}

/// What kind of non-public address this is, if it is one.
pub fn special(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (ULA)")
            } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[0] == 0x2001 && s[1] == 0 {
                Some("reserved (Teredo)")
            } else if let Some(v4) = embedded_v4(v6) {
                // NAT64, 6to4, IPv4-compatible: the embedded address decides.
                special_v4(v4)
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if a == 127 {
        Some("loopback")
    } else if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) {
        Some("private (RFC 1918)")
    } else if a == 169 && b == 254 {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if (224..240).contains(&a) {
        Some("multicast")
    } else if a >= 240 {
        Some("reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol")
    } else if a == 198 && (18..20).contains(&b) {
        Some("benchmarking")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str, allow: &[&str], deny: &[&str]) -> Policy {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Policy::parse(mode, &list(allow), &list(deny)).expect("policy")
    }

    fn host(text: &str) -> Host {
        Host::parse(text).expect("host")
    }

    fn rules(texts: &[&str]) -> Vec<Rule> {
        texts
            .iter()
            .map(|s| Rule::parse(s).expect("rule"))
            .collect()
    }

    fn check(
        p: &Policy,
        ceiling: &Ceiling,
        name: &str,
        port: u16,
        ip: &str,
    ) -> Result<(), &'static str> {
        let h = host(name);
        let asked = Asked { host: &h, port };
        p.check_address(ceiling, asked, ip.parse().expect("ip"))
            .map_err(|r| r.code)
    }

    #[test]
    fn rules_parse_with_ports_wildcards_and_cidrs_and_bad_ones_say_what_is_allowed() {
        for good in [
            "pypi.org",
            "*.pythonhosted.org",
            "github.com:443",
            "203.0.113.0/24",
            "203.0.113.5",
            "[2001:db8::1]:443",
            "2001:db8::/32",
            "*",
            "*:*",
            "host:8000-8999",
            "PyPI.org.",
        ] {
            Rule::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "a..b",
            "*foo.com",
            "x:0",
            "x:70000",
            "x:9-1",
            "[::1",
            "a b",
            "ex*mple.com",
        ] {
            let err = Rule::parse(bad).expect_err(bad);
            assert!(err.contains("a rule is"), "{bad}: {err}");
        }
        assert!(Policy::parse("sometimes", &[], &[]).is_err());
        assert!(Policy::parse("none", &["pypi.org".into()], &[]).is_err());
    }

    #[test]
    fn allow_lists_match_names_subdomains_and_ports_and_deny_wins() {
        let c = Ceiling::default();
        let p = policy(
            "allow",
            &[
                "pypi.org",
                "*.pythonhosted.org",
                "github.com:22",
                "203.0.113.0/24:*",
            ],
            &["bad.pythonhosted.org"],
        );
        assert_eq!(check(&p, &c, "pypi.org", 443, "151.101.0.223"), Ok(()));
        assert_eq!(check(&p, &c, "PYPI.ORG.", 80, "151.101.0.223"), Ok(()));
        assert_eq!(
            check(&p, &c, "pypi.org", 8080, "151.101.0.223"),
            Err("egress_not_allowed")
        );
        assert_eq!(
            check(&p, &c, "files.pythonhosted.org", 443, "151.101.0.1"),
            Ok(())
        );
        assert_eq!(
            check(&p, &c, "pythonhosted.org", 443, "151.101.0.1"),
            Err("egress_not_allowed")
        );
        assert_eq!(
            check(&p, &c, "bad.pythonhosted.org", 443, "151.101.0.1"),
            Err("egress_denied")
        );
        assert_eq!(check(&p, &c, "github.com", 22, "140.82.112.3"), Ok(()));
        assert_eq!(
            check(&p, &c, "github.com", 443, "140.82.112.3"),
            Err("egress_not_allowed")
        );
        assert_eq!(check(&p, &c, "203.0.113.9", 5000, "203.0.113.9"), Ok(()));
        // A name is allowed by a name rule only: one not on the list is
        // never resolved, even if it would land in an allowed CIDR.
        assert_eq!(
            check(&p, &c, "other.example", 5000, "203.0.113.9"),
            Err("egress_not_allowed")
        );
        assert_eq!(
            check(&p, &c, "evil.example", 443, "198.51.100.7"),
            Err("egress_not_allowed")
        );
        let open = policy("open", &[], &["*.evil.example", "198.51.100.0/24:*"]);
        assert_eq!(
            check(&open, &c, "anything.example", 9999, "8.8.8.8"),
            Ok(())
        );
        assert_eq!(
            check(&open, &c, "x.evil.example", 443, "8.8.8.8"),
            Err("egress_denied")
        );
        assert_eq!(
            check(&open, &c, "fine.example", 443, "198.51.100.3"),
            Err("egress_denied")
        );
        let none = Policy::none();
        assert_eq!(
            check(&none, &c, "pypi.org", 443, "151.101.0.223"),
            Err("network_disabled")
        );
    }

    #[test]
    fn private_addresses_need_the_operator_and_an_explicit_rule_and_metadata_never() {
        let loopback = Ceiling {
            allow_private: vec!["127.0.0.1/32".parse().expect("net")],
        };
        let none = Ceiling::default();
        let named = policy("allow", &["localhost:*", "rebind.example"], &[]);
        assert_eq!(
            check(&named, &none, "localhost", 8080, "127.0.0.1"),
            Err("egress_private_address")
        );
        assert_eq!(
            check(&named, &loopback, "localhost", 8080, "127.0.0.1"),
            Ok(())
        );
        assert_eq!(
            check(&named, &loopback, "localhost", 8080, "127.0.0.2"),
            Err("egress_private_address")
        );
        // Open mode alone never reaches a private address, even one the
        // operator allowed: a name must be allowed explicitly.
        let open = policy("open", &[], &[]);
        assert_eq!(
            check(&open, &loopback, "rebind.example", 80, "127.0.0.1"),
            Err("egress_private_address")
        );
        assert_eq!(
            check(&open, &loopback, "127.0.0.1", 80, "127.0.0.1"),
            Err("egress_private_address")
        );
        let star = policy("allow", &["*:*"], &[]);
        assert_eq!(
            check(&star, &loopback, "rebind.example", 80, "127.0.0.1"),
            Err("egress_private_address")
        );
        // An address rule lets the address through, not a name that
        // resolves to it.
        let by_address = policy("allow", &["127.0.0.1:8080"], &[]);
        assert_eq!(
            check(&by_address, &loopback, "127.0.0.1", 8080, "127.0.0.1"),
            Ok(())
        );
        assert_eq!(
            check(&by_address, &loopback, "rebind.example", 8080, "127.0.0.1"),
            Err("egress_not_allowed")
        );
        // A name allowed by a `*.domain` rule of an operator is reached on
        // a private address only through that rule; `*` alone never.
        let suffix = policy("allow", &["*.rebind.example:*"], &[]);
        assert_eq!(
            check(&suffix, &loopback, "rebind.example", 80, "127.0.0.1"),
            Err("egress_not_allowed")
        );
        assert_eq!(
            check(&suffix, &loopback, "a.rebind.example", 80, "127.0.0.1"),
            Ok(())
        );
        for (ip, kind) in [
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("fd12::1", "ULA"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("ff02::1", "multicast"),
        ] {
            let found = special(ip.parse().expect("ip")).unwrap_or("public");
            assert!(found.contains(kind), "{ip}: {found}");
        }
        assert_eq!(special("8.8.8.8".parse().expect("ip")), None);
        let everything = Ceiling {
            allow_private: vec![
                "0.0.0.0/0".parse().expect("net"),
                "::/0".parse().expect("net"),
            ],
        };
        let metadata = policy("allow", &["169.254.169.254:*", "[fd00:ec2::254]:*"], &[]);
        assert_eq!(
            check(
                &metadata,
                &everything,
                "169.254.169.254",
                80,
                "169.254.169.254"
            ),
            Err("egress_denied")
        );
        assert_eq!(
            check(&metadata, &everything, "fd00:ec2::254", 80, "fd00:ec2::254"),
            Err("egress_denied")
        );
    }

    #[test]
    fn a_sandbox_never_gains_a_private_address_its_template_does_not_name() {
        let private = Ceiling {
            allow_private: vec!["10.0.0.0/8".parse().expect("net")],
        };
        // An open template, and an allow template whose only rule is `*:*`:
        // a sandbox's rule for 10/8 is within them, but reaches nothing
        // private, because no operator rule names it.
        for template in [policy("open", &[], &[]), policy("allow", &["*:*"], &[])] {
            let sandbox = template
                .narrow(
                    None,
                    Some(rules(&["10.0.0.0/8:*", "*.corp.example:*"])),
                    vec![],
                )
                .expect("within");
            assert_eq!(
                check(&sandbox, &private, "10.1.2.3", 80, "10.1.2.3"),
                Err("egress_private_address")
            );
            assert_eq!(
                check(&sandbox, &private, "pypi.corp.example", 443, "10.1.2.3"),
                Err("egress_private_address")
            );
        }
        // A template that names the mirror lets a sandbox narrowed to it in.
        let template = policy("open", &["pypi.corp.example:443", "10.20.0.0/16:*"], &[]);
        let sandbox = template
            .narrow(
                None,
                Some(rules(&["pypi.corp.example:443", "10.20.1.0/24:8080"])),
                vec![],
            )
            .expect("within");
        assert_eq!(
            check(&sandbox, &private, "pypi.corp.example", 443, "10.20.0.5"),
            Ok(())
        );
        assert_eq!(
            check(&sandbox, &private, "10.20.1.9", 8080, "10.20.1.9"),
            Ok(())
        );
        assert_eq!(
            check(&sandbox, &private, "10.20.2.9", 8080, "10.20.2.9"),
            Err("egress_not_allowed")
        );
    }

    #[test]
    fn a_taken_over_sandbox_is_narrowed_to_the_template_as_it_is_now() {
        let before = policy(
            "allow",
            &["pypi.org", "github.com:443", "10.0.0.0/8:*"],
            &[],
        );
        let stored = before
            .narrow(
                None,
                Some(rules(&["pypi.org", "github.com:443", "10.1.0.0/16:*"])),
                rules(&["x.org"]),
            )
            .expect("within");
        let after = policy("allow", &["pypi.org", "*.internal:*"], &["bad.org"]);
        let taken = after.renarrow(&stored);
        assert_eq!(taken.mode, Mode::Allow);
        assert_eq!(taken.allow_texts(), ["pypi.org"]);
        assert_eq!(taken.deny_texts(), ["bad.org", "x.org"]);
        assert_eq!(Policy::none().renarrow(&stored), Policy::none());
        let open = policy("open", &[], &[]);
        assert_eq!(after.renarrow(&open).allow_texts(), after.allow_texts());
        // A stored rule comes back with the private rights the template
        // gives it now, whatever the store's text suggests.
        let reparsed = Policy::parse("allow", &["10.1.0.0/16:*".into()], &[]).expect("stored");
        let private = Ceiling {
            allow_private: vec!["10.0.0.0/8".parse().expect("net")],
        };
        let star = policy("allow", &["*:*"], &[]);
        assert_eq!(
            check(
                &star.renarrow(&reparsed),
                &private,
                "10.1.2.3",
                80,
                "10.1.2.3"
            ),
            Err("egress_private_address")
        );
        assert_eq!(
            check(
                &before.renarrow(&reparsed),
                &private,
                "10.1.2.3",
                80,
                "10.1.2.3"
            ),
            Ok(())
        );
    }

    #[test]
    fn addresses_hidden_inside_ipv6_forms_are_classified_by_what_they_carry() {
        for (ip, kind) in [
            ("64:ff9b:1::a00:1", "private"),
            ("::10.0.0.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("2002:7f00:1::1", "loopback"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ] {
            let found = special(ip.parse().expect("ip")).unwrap_or("public");
            assert!(found.contains(kind), "{ip}: {found}");
        }
        let everything = Ceiling {
            allow_private: vec![
                "0.0.0.0/0".parse().expect("net"),
                "::/0".parse().expect("net"),
            ],
        };
        let all = policy("allow", &["0.0.0.0/0:*", "[::/0]:*"], &[]);
        for metadata in [
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "168.63.129.16",
            "100.100.100.200",
            "::ffff:169.254.169.254",
        ] {
            assert_eq!(
                check(&all, &everything, metadata, 80, metadata),
                Err("egress_denied"),
                "{metadata}"
            );
        }
        // A deny rule written in IPv4-mapped form covers the IPv4 network.
        let mapped = policy("open", &[], &["[::ffff:10.0.0.0/104]:*"]);
        assert_eq!(
            check(&mapped, &everything, "10.1.2.3", 80, "10.1.2.3"),
            Err("egress_denied")
        );
    }

    #[test]
    fn a_sandbox_may_narrow_the_template_never_widen_it() {
        let template = policy(
            "allow",
            &["pypi.org", "*.pythonhosted.org", "10.0.0.0/8:*"],
            &["bad.pythonhosted.org"],
        );
        let narrowed = template
            .narrow(
                None,
                Some(rules(&[
                    "pypi.org:443",
                    "files.pythonhosted.org",
                    "10.1.0.0/16:8080",
                ])),
                rules(&["x.org"]),
            )
            .expect("narrower");
        assert_eq!(narrowed.mode, Mode::Allow);
        assert_eq!(narrowed.deny_texts(), ["bad.pythonhosted.org", "x.org"]);
        for wide in [
            &["github.com"][..],
            &["pypi.org:8080"],
            &["*.org"],
            &["pythonhosted.org"],
            &["10.0.0.0/7"],
            &["*"],
        ] {
            let err = template
                .narrow(None, Some(rules(wide)), vec![])
                .expect_err(wide[0]);
            assert!(err.contains("not within"), "{err}");
        }
        assert!(template.narrow(Some(Mode::Open), None, vec![]).is_err());
        assert_eq!(
            template
                .narrow(Some(Mode::None), None, vec![])
                .expect("none")
                .mode,
            Mode::None
        );
        let none = Policy::none();
        assert!(
            none.narrow(None, Some(rules(&["pypi.org"])), vec![])
                .is_err()
        );
        let open = policy("open", &[], &[]);
        assert!(open.narrow(None, Some(rules(&["*:*"])), vec![]).is_ok());
    }
}
