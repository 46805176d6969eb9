//! Evidence Bundles: the signed record of a Workspace Run, verifiable
//! offline. This module is the bundle's format (shared by the server that
//! signs it and `crownest evidence verify`): its JSON shape, the canonical
//! JSON the signature covers (RFC 8785 style: keys sorted by UTF-16 code
//! units, no whitespace, JSON string escapes, integers as integers), the
//! digest of the event log, and ed25519 signing and checking.
//!
//! **Architecture Invariant:** what is signed is exactly the canonical
//! JSON of the `bundle` object as served; a verifier canonicalizes what it
//! received, so unknown fields a later version adds are covered too.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::{Metadata, RunEventBody, RunReason, RunStatus};

/// The bundle format version.
pub const VERSION: i64 = 1;
pub const ALGORITHM: &str = "ed25519";

/// What a run's bundle attests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    pub version: i64,
    pub run_id: String,
    pub status: RunStatus,
    pub reason: Option<RunReason>,
    pub exit_code: Option<i64>,
    pub command: String,
    /// The names of the environment variables the command got (their
    /// values may be secrets).
    pub env_names: Vec<String>,
    pub template: TemplateIdentity,
    pub archive: ArchiveIdentity,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: String,
    pub metadata: Metadata,
    pub artifacts: Vec<BundleArtifact>,
    pub artifact_errors: Vec<BundleArtifactError>,
    pub terminal_event: Value,
    pub events: EventsDigest,
    pub host: HostIdentity,
    pub usage: Usage,
    pub sandbox_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateIdentity {
    pub name: String,
    pub recipe_hash: String,
    pub runtime: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveIdentity {
    pub sha256: String,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleArtifact {
    pub path: String,
    pub name: String,
    pub artifact_id: String,
    pub sha256: String,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleArtifactError {
    pub path: String,
    pub name: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsDigest {
    pub count: i64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostIdentity {
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub pricing_version: String,
    pub compute_unit_seconds: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureBlock {
    pub algorithm: String,
    pub key_id: String,
    /// Base64 of the 64-byte signature.
    pub value: String,
}

/// One published verification key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicKey {
    pub key_id: String,
    pub algorithm: String,
    /// Base64 of the 32 bytes.
    pub public_key: String,
}

/// An event as clients see it: `{seq, type, at, data}`.
pub fn event_value(seq: i64, at: &str, body: &RunEventBody) -> Value {
    let mut value = serde_json::to_value(body).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert(String::from("seq"), Value::from(seq));
        map.insert(String::from("at"), Value::from(at));
    }
    value
}

/// Folds events (in `seq` order) into the log digest: SHA-256 over each
/// event's canonical JSON followed by `\n`.
#[derive(Default)]
pub struct EventHasher {
    hasher: Sha256,
    count: i64,
}

impl EventHasher {
    pub fn push(&mut self, event: &Value) {
        self.hasher.update(canonical(event).as_bytes());
        self.hasher.update(b"\n");
        self.count += 1;
    }

    pub fn finish(self) -> EventsDigest {
        EventsDigest {
            count: self.count,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// The canonical JSON text of a value.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
    }
}

/// JSON string escaping as RFC 8785 has it: `"` and `\`, the short forms
/// of \b \t \n \f \r, `\u00xx` (lower case) for other controls, and
/// everything else as it is.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers as they are; a float (only client metadata can hold one) as
/// an integer when it is integral and below 1e21, else in exponent form.
fn number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if f == 0.0 {
        return String::from("0");
    }
    if f.fract() == 0.0 && f.abs() < 1e21 {
        return format!("{f:.0}");
    }
    let text = format!("{f}");
    if f.abs() >= 1e21 || f.abs() < 1e-6 {
        let e = format!("{f:e}");
        return match e.split_once('e') {
            Some((m, x)) if !x.starts_with('-') => format!("{m}e+{x}"),
            _ => e,
        };
    }
    text
}

/// The key id of a public key: the first 16 hex characters of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))[..16].to_string()
}

/// The signing key of a 32-byte seed.
pub fn signing_key(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(seed)
}

pub fn public_key(key: &SigningKey) -> PublicKey {
    let verifying = key.verifying_key();
    PublicKey {
        key_id: key_id(&verifying),
        algorithm: String::from(ALGORITHM),
        public_key: STANDARD.encode(verifying.as_bytes()),
    }
}

/// The served document: `{bundle, signature}`, as JSON bytes.
pub fn sign(bundle: &Bundle, key: &SigningKey) -> Vec<u8> {
    let value = serde_json::to_value(bundle).unwrap_or(Value::Null);
    let signature = key.sign(canonical(&value).as_bytes());
    let document = serde_json::json!({
        "bundle": value,
        "signature": SignatureBlock {
            algorithm: String::from(ALGORITHM),
            key_id: key_id(&key.verifying_key()),
            value: STANDARD.encode(signature.to_bytes()),
        },
    });
    serde_json::to_vec_pretty(&document).unwrap_or_default()
}

/// Why a bundle did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not an evidence bundle: {0}")]
    Malformed(String),
    #[error("the bundle is signed with key `{found}`, not with any key given ({known})")]
    UnknownKey { found: String, known: String },
    #[error("the signature does not match the bundle: it was changed after signing")]
    BadSignature,
}

/// Checks a served document's signature against the keys given; returns
/// the bundle (as JSON) and the key id that signed it.
pub fn verify(document: &[u8], keys: &[PublicKey]) -> Result<(Value, String), VerifyError> {
    let malformed = |m: &str| VerifyError::Malformed(m.to_string());
    let value: Value =
        serde_json::from_slice(document).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let bundle = value
        .get("bundle")
        .filter(|b| b.is_object())
        .ok_or_else(|| malformed("no `bundle` object"))?;
    let signature: SignatureBlock = value
        .get("signature")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| malformed("no `signature` with algorithm, keyId and value"))?;
    if signature.algorithm != ALGORITHM {
        return Err(VerifyError::Malformed(format!(
            "signature algorithm `{}` is not {ALGORITHM}",
            signature.algorithm
        )));
    }
    let key = keys
        .iter()
        .find(|k| k.key_id == signature.key_id)
        .ok_or_else(|| VerifyError::UnknownKey {
            found: signature.key_id.clone(),
            known: keys
                .iter()
                .map(|k| k.key_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let key = decode_public_key(&key.public_key).map_err(VerifyError::Malformed)?;
    let bytes: [u8; 64] = STANDARD
        .decode(&signature.value)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("the signature value is not 64 base64 bytes"))?;
    key.verify(canonical(bundle).as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| VerifyError::BadSignature)?;
    Ok((bundle.clone(), signature.key_id))
}

/// A public key from base64 of its 32 bytes.
pub fn decode_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| String::from("a public key is base64 of 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

/// A [`PublicKey`] entry for a key given as base64.
pub fn public_key_from_base64(text: &str) -> Result<PublicKey, String> {
    let key = decode_public_key(text)?;
    Ok(PublicKey {
        key_id: key_id(&key),
        algorithm: String::from(ALGORITHM),
        public_key: STANDARD.encode(key.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_by_utf16_and_has_no_whitespace() {
        let value = json!({"b": [1, {"z": null, "a": true}], "a": "x\ny\u{1}\"", "\u{e000}": 1, "\u{1f600}": 2});
        // U+1F600 is a surrogate pair (D83D …), which sorts before U+E000.
        assert_eq!(
            canonical(&value),
            "{\"a\":\"x\\ny\\u0001\\\"\",\"b\":[1,{\"a\":true,\"z\":null}],\"\u{1f600}\":2,\"\u{e000}\":1}"
        );
        assert_eq!(canonical(&json!(1.0)), "1");
        assert_eq!(canonical(&json!(1.5)), "1.5");
        assert_eq!(canonical(&json!(1e21)), "1e+21");
        assert_eq!(canonical(&json!("/é")), "\"/é\"");
    }

    fn bundle() -> Bundle {
        Bundle {
            version: VERSION,
            run_id: String::from("wsr_1"),
            status: RunStatus::Succeeded,
            reason: None,
            exit_code: Some(0),
            command: String::from("true"),
            env_names: vec![String::from("CI")],
            template: TemplateIdentity {
                name: String::from("python-node"),
                recipe_hash: String::from("h"),
                runtime: String::from("oci"),
            },
            archive: ArchiveIdentity {
                sha256: "a".repeat(64),
                size_bytes: 10,
            },
            created_at: String::from("t0"),
            started_at: Some(String::from("t1")),
            ended_at: String::from("t2"),
            metadata: Metadata::new(),
            artifacts: vec![BundleArtifact {
                path: String::from("out.txt"),
                name: String::from("out.txt"),
                artifact_id: String::from("art_1"),
                sha256: "b".repeat(64),
                size_bytes: 3,
            }],
            artifact_errors: Vec::new(),
            terminal_event: json!({"seq": 5}),
            events: EventsDigest {
                count: 5,
                sha256: "c".repeat(64),
            },
            host: HostIdentity {
                version: String::from("0.1.0"),
            },
            usage: Usage {
                pricing_version: String::from("2026-01"),
                compute_unit_seconds: 2,
            },
            sandbox_id: None,
        }
    }

    #[test]
    fn a_signed_bundle_verifies_and_any_change_breaks_it() {
        let key = signing_key(&[7u8; 32]);
        let public = public_key(&key);
        let document = sign(&bundle(), &key);
        let (value, key_id) = verify(&document, std::slice::from_ref(&public)).expect("verifies");
        assert_eq!(key_id, public.key_id);
        assert_eq!(value["runId"], "wsr_1");

        // Whitespace and key order do not matter; content does.
        let mut parsed: Value = serde_json::from_slice(&document).expect("json");
        let compact = serde_json::to_vec(&parsed).expect("json");
        assert!(verify(&compact, std::slice::from_ref(&public)).is_ok());
        parsed["bundle"]["artifacts"][0]["sha256"] = json!("d".repeat(64));
        let tampered = serde_json::to_vec(&parsed).expect("json");
        assert_eq!(
            verify(&tampered, std::slice::from_ref(&public)),
            Err(VerifyError::BadSignature)
        );

        let other = public_key(&signing_key(&[8u8; 32]));
        assert!(matches!(
            verify(&document, &[other]),
            Err(VerifyError::UnknownKey { .. })
        ));
        assert!(matches!(
            verify(b"{}", &[public]),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn the_event_digest_covers_order_and_content() {
        let events = [
            event_value(
                1,
                "t",
                &RunEventBody::Stdout {
                    data: String::from("a"),
                },
            ),
            event_value(
                2,
                "t",
                &RunEventBody::Stdout {
                    data: String::from("b"),
                },
            ),
        ];
        let digest = |order: &[usize]| {
            let mut h = EventHasher::default();
            for i in order {
                h.push(&events[*i]);
            }
            h.finish()
        };
        assert_eq!(digest(&[0, 1]).count, 2);
        assert_ne!(digest(&[0, 1]).sha256, digest(&[1, 0]).sha256);
        assert_eq!(
            canonical(&events[0]),
            "{\"at\":\"t\",\"data\":{\"data\":\"a\"},\"seq\":1,\"type\":\"stdout\"}"
        );
    }
}
