//! Seal: signs what Airlock vouches for, and checks such signatures.
//!
//! Two kinds of payload are sealed, each under its own DSSE payload type so that a
//! signature over one can never be passed off as the other:
//!
//! * an **intent** ([`INTENT_PAYLOAD_TYPE`]): the exact bytes the agent wrote, so
//!   verifying needs no canonicalisation;
//! * a **checkpoint** ([`CHECKPOINT_PAYLOAD_TYPE`]): a run's head in the run log.
//!
//! # Format
//!
//! An [`Envelope`] is a [DSSE] v1 envelope:
//! `{"payloadType": T, "payload": base64(B), "signatures": [{"keyid": K, "sig": base64(S)}]}`
//! where `S` is an Ed25519 ([RFC 8032]) signature over [`pae`]`(T, B)` =
//! `"DSSEv1" SP LEN(T) SP T SP LEN(B) SP B` (lengths in bytes, as decimal ASCII).
//! Airlock writes standard base64 with padding and reads standard or URL-safe, padded
//! or not, as DSSE requires.
//!
//! # Keys and key ids
//!
//! The private key is a PKCS#8 v1 PEM file (`-----BEGIN PRIVATE KEY-----`, the form
//! `openssl genpkey -algorithm ed25519` writes); the public key is a
//! SubjectPublicKeyInfo PEM file (`-----BEGIN PUBLIC KEY-----`) next to it, named
//! with a `.pub` suffix. Both are read and written by OpenSSL and most libraries.
//!
//! The **key id** is `"sha256:"` followed by the lowercase hex SHA-256 of the
//! public key's DER SubjectPublicKeyInfo — the bytes inside the `.pub` PEM armour.
//! An independent verifier computes it from the PEM alone:
//!
//! ```text
//! openssl pkey -pubin -in airlock.key.pub -outform DER | sha256sum
//! ```
//!
//! (or `grep -v -- ----- airlock.key.pub | base64 -d | sha256sum`). Hashing the
//! SubjectPublicKeyInfo rather than the 32 raw key bytes binds the algorithm
//! identifier too. The key id only picks which signature to check; it is never
//! trusted on its own.
//!
//! # Verification
//!
//! Signatures are checked with `verify_strict`: besides the RFC 8032 equation, it
//! rejects non-canonical encodings of `S` and `R`, and small-order `R` or public
//! keys, so a valid signature cannot be altered into another valid one
//! (malleability). [`verify_raw`] is that exact check, exposed for test vectors.
//!
//! [DSSE]: https://github.com/secure-systems-lab/dsse
//! [RFC 8032]: https://www.rfc-editor.org/rfc/rfc8032

mod dsse;
mod keys;

pub use dsse::{Envelope, Signature, pae};
pub use keys::{Sealer, Verifier, keygen, public_key_path, verify_raw};

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// DSSE payload type of a sealed intent: the exact bytes the agent wrote.
pub const INTENT_PAYLOAD_TYPE: &str = "application/vnd.airlock.intent.v1+json";

/// DSSE payload type of a sealed run-log checkpoint.
pub const CHECKPOINT_PAYLOAD_TYPE: &str = "application/vnd.airlock.checkpoint.v1+json";

/// `"sha256:"` followed by the lowercase hex SHA-256 of `bytes`.
///
/// Used for intent digests and key ids.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Why sealing, verifying or handling a key failed.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The signing key file does not exist.
    #[error(
        "signing key {} does not exist; create one with `airlock keygen --out {}`",
        path.display(), path.display()
    )]
    KeyMissing {
        /// The key file that was looked for.
        path: PathBuf,
    },
    /// The signing key file is readable or writable by group or others.
    #[error(
        "signing key {} has mode {mode:04o}, open to group or others; \
         the key must be private to its owner: run `chmod 600 {}`",
        path.display(), path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `keygen` refused to overwrite an existing key file.
    #[error(
        "signing key {} already exists; refusing to overwrite it \
         (move it away first if you really mean to replace it)",
        path.display()
    )]
    KeyExists {
        /// The existing key file.
        path: PathBuf,
    },
    /// A key file could not be read.
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        /// "signing key" or "public key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A key file could not be written.
    #[error("cannot write {what} {}: {error}", path.display())]
    Write {
        /// "signing key" or "public key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A key is not a well-formed Ed25519 PEM key of the expected kind.
    #[error("{origin} is not {expected}: {reason}")]
    Pem {
        /// Where the PEM came from (e.g. `signing key /etc/airlock/key`).
        origin: String,
        /// What was expected there.
        expected: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The operating system's random number generator failed.
    #[error("cannot draw a key seed from the OS random number generator: {0}")]
    Rng(String),
    /// No signature in the envelope carries the verifier's key id.
    #[error("envelope has no signature with keyid {keyid} (it has: {found})")]
    NoSignatureForKey {
        /// The verifier's key id.
        keyid: String,
        /// The key ids present, comma-separated.
        found: String,
    },
    /// A signature with the verifier's key id did not verify.
    #[error(
        "envelope signature by keyid {keyid} does not verify over payloadType {payload_type:?} \
         and its payload (altered, truncated or made with another key)"
    )]
    BadSignature {
        /// The verifier's key id.
        keyid: String,
        /// The envelope's payload type.
        payload_type: String,
    },
    /// The envelope's payload type is not the one the caller expects.
    #[error("envelope payloadType is {found:?}, expected {expected:?}")]
    PayloadType {
        /// What the caller expects.
        expected: String,
        /// What the envelope says.
        found: String,
    },
    /// An envelope's JSON could not be parsed or written.
    #[error("envelope JSON: {0}")]
    Json(serde_json::Error),
}

impl From<serde_json::Error> for SealError {
    fn from(error: serde_json::Error) -> Self {
        Self::Json(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_prefixed_lowercase_sha256() {
        assert_eq!(
            digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
