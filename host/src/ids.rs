//! Public identifiers: a type prefix and 20 random base-32 characters
//! (`sbx_…`, `cmd_…`, `key_…`). Random rather than sequential so that ids
//! leak neither volume nor order across tenants.

use rand::Rng;

/// Lower-case Crockford-like alphabet: no `i`, `l`, `o`, `u`.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const RANDOM_LEN: usize = 20;

/// The kinds of resource that have public ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sandbox,
    Command,
    Key,
    Org,
    Project,
    Request,
    Audit,
    Artifact,
    CodeContext,
    Preview,
    WorkspaceRun,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Sandbox => "sbx",
            Kind::Command => "cmd",
            Kind::Key => "key",
            Kind::Org => "org",
            Kind::Project => "prj",
            Kind::Request => "req",
            Kind::Audit => "evt",
            Kind::Artifact => "art",
            Kind::CodeContext => "cctx",
            Kind::Preview => "prv",
            Kind::WorkspaceRun => "wsr",
        }
    }
}

/// A fresh random id of the given kind.
pub fn new(kind: Kind) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(kind.prefix().len() + 1 + RANDOM_LEN);
    id.push_str(kind.prefix());
    id.push('_');
    for _ in 0..RANDOM_LEN {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

/// Whether `id` is shaped like an id of `kind`. Used to answer `not_found`
/// early for ids that cannot exist, without a store round trip.
pub fn is_valid(kind: Kind, id: &str) -> bool {
    let Some(rest) = id
        .strip_prefix(kind.prefix())
        .and_then(|r| r.strip_prefix('_'))
    else {
        return false;
    };
    rest.len() == RANDOM_LEN && rest.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_carry_their_prefix_and_validate() {
        let id = new(Kind::Sandbox);
        assert!(id.starts_with("sbx_"));
        assert!(is_valid(Kind::Sandbox, &id));
        assert!(!is_valid(Kind::Command, &id));
    }

    #[test]
    fn malformed_ids_do_not_validate() {
        for bad in [
            "",
            "sbx_",
            "sbx_../../etc",
            "sbx_ABCDEFGHJKMNPQRSTVWX",
            "sbxabc",
        ] {
            assert!(!is_valid(Kind::Sandbox, bad), "{bad}");
        }
    }
}
