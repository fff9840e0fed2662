//! Ed25519 keys: the sidecar's signing key ([`Sealer`]), the public key that checks
//! its signatures ([`Verifier`]), and their PEM files.
//!
//! Key files on disk:
//! * `PATH`: the private key, PKCS#8 v1 PEM, mode 0600. It is created with
//!   `O_CREAT|O_EXCL` (never overwrites) and refused on load if group or others may
//!   read or write it. A partial file left by a failed write is removed.
//! * `PATH.pub`: the public key, SubjectPublicKeyInfo PEM, mode 0644. It is derived
//!   from the private key and rewritten whenever a key is generated. Should writing
//!   it fail after the private key was written, the private key stays (it is valid)
//!   and the public key can be derived with `openssl pkey -in PATH -pubout`.
//!
//! Secret material (the seed, the PEM text, the signing key) is zeroized when
//! dropped, as far as the libraries allow.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::der::zeroize::{Zeroize, Zeroizing};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::{Envelope, SealError, Signature, digest, pae};

/// Key files larger than this are not PEM Ed25519 keys (those are ~120 bytes).
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// Holds the sidecar's Ed25519 signing key and seals payloads into envelopes.
pub struct Sealer {
    key: SigningKey,
    verifier: Verifier,
}

/// Holds an Ed25519 public key and checks envelopes sealed by its [`Sealer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    key: VerifyingKey,
    keyid: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keyid", &self.verifier.keyid)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A new key from the operating system's random number generator.
    pub fn generate() -> Result<Self, SealError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| SealError::Rng(e.to_string()))?;
        Ok(Self::from_seed(&seed))
    }

    /// The key whose RFC 8032 secret (the 32-byte seed) is `seed`.
    ///
    /// For test vectors and for importing keys; Airlock's own keys come from
    /// [`Sealer::generate`] or a key file.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let verifier = Verifier::from_verifying_key(key.verifying_key());
        Self { key, verifier }
    }

    /// Reads the private key file at `path` (PKCS#8 PEM, `BEGIN PRIVATE KEY`).
    ///
    /// Refuses a missing file (suggesting `airlock keygen`), a file that group or
    /// others may read or write (suggesting `chmod 600`), something other than a
    /// regular file, and anything that is not an unencrypted Ed25519 PKCS#8 key.
    /// Symbolic links are followed (Kubernetes mounts secrets through them); the
    /// permission check applies to the file they lead to.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let pem = read_private_pem(path)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| SealError::Pem {
            origin: format!("signing key {}", path.display()),
            expected: "an unencrypted Ed25519 PKCS#8 PEM private key",
            reason: private_pem_hint(&pem).unwrap_or_else(|| e.to_string()),
        })?;
        Ok(Self::from_signing_key(key))
    }

    /// Loads the key at `path`, or, if there is no file there, generates one as
    /// [`keygen`] does, except that the public key is mode 0600 too (this is the
    /// state directory's key, and every file there is private). The flag is `true`
    /// when the key was created.
    ///
    /// This is the zero-configuration default. Any other problem (permissions, bad
    /// PEM) is an error, never a reason to replace the key. The directory must
    /// exist. If another process creates the key at the same moment, its key is
    /// loaded and used.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), SealError> {
        match Self::load(path) {
            Ok(sealer) => Ok((sealer, false)),
            // The default key lives in the state directory, where every file is 0600.
            Err(SealError::KeyMissing { .. }) => match create(path, 0o600) {
                Ok(sealer) => Ok((sealer, true)),
                Err(SealError::KeyExists { .. }) => Ok((Self::load(path)?, false)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The key id (see the module docs of [`crate::seal`]).
    pub fn keyid(&self) -> &str {
        &self.verifier.keyid
    }

    /// The matching public key.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Signs `payload` as `payload_type`: one signature over
    /// [`pae`]`(payload_type, payload)`, labelled with this key's id.
    pub fn seal(&self, payload_type: &str, payload: impl Into<Vec<u8>>) -> Envelope {
        let payload = payload.into();
        let sig = self.sign_raw(&pae(payload_type, &payload));
        Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            signatures: vec![Signature {
                keyid: self.verifier.keyid.clone(),
                sig: sig.to_vec(),
            }],
        }
    }

    /// A plain Ed25519 signature over `message`, without DSSE's PAE.
    ///
    /// Airlock itself only signs through [`Sealer::seal`]; this exists for test
    /// vectors and interoperability checks.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.key.sign(message).to_bytes()
    }

    /// The private key as PKCS#8 v1 PEM (the layout `openssl genpkey` writes).
    fn private_pem(&self) -> Result<Zeroizing<String>, SealError> {
        let mut keypair = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        let pem = keypair.to_pkcs8_pem(LineEnding::LF);
        // `KeypairBytes` only zeroizes itself when `ed25519/zeroize` is enabled.
        keypair.secret_key.zeroize();
        pem.map_err(|e| SealError::Pem {
            origin: "new signing key".to_owned(),
            expected: "encodable as PKCS#8 PEM",
            reason: e.to_string(),
        })
    }
}

impl Verifier {
    fn from_verifying_key(key: VerifyingKey) -> Self {
        let keyid = match key.to_public_key_der() {
            Ok(der) => digest(der.as_bytes()),
            // Encoding 32 bytes into a fixed 44-byte structure cannot fail; should
            // it ever, build the same bytes by hand rather than panic.
            Err(_) => digest(&spki_der(key.as_bytes())),
        };
        Self { key, keyid }
    }

    /// The public key from its 32 raw bytes (RFC 8032 encoding).
    ///
    /// Refuses bytes that are not a curve point and small-order ("weak") keys,
    /// which could never verify under strict verification.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, SealError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|e| SealError::Pem {
            origin: "public key bytes".to_owned(),
            expected: "an Ed25519 public key",
            reason: e.to_string(),
        })?;
        Self::checked(key, "public key bytes".to_owned())
    }

    /// The public key from SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, SealError> {
        Self::from_pem_at(pem, "public key PEM".to_owned())
    }

    /// Reads the public key file at `path` (e.g. the `.pub` next to a key).
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let read_error = |error| SealError::Read {
            what: "public key",
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(read_error)?;
        let mut pem = String::new();
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_string(&mut pem)
            .map_err(read_error)?;
        Self::from_pem_at(&pem, format!("public key {}", path.display()))
    }

    fn from_pem_at(pem: &str, origin: String) -> Result<Self, SealError> {
        let key = VerifyingKey::from_public_key_pem(pem).map_err(|e| SealError::Pem {
            reason: if pem.contains("PRIVATE KEY-----") {
                "this is a private key; give the public key (the .pub file)".to_owned()
            } else {
                e.to_string()
            },
            origin: origin.clone(),
            expected: "an Ed25519 SubjectPublicKeyInfo PEM public key",
        })?;
        Self::checked(key, origin)
    }

    fn checked(key: VerifyingKey, origin: String) -> Result<Self, SealError> {
        if key.is_weak() {
            return Err(SealError::Pem {
                origin,
                expected: "a usable Ed25519 public key",
                reason: "the key is a small-order point, which no strict verifier accepts"
                    .to_owned(),
            });
        }
        Ok(Self::from_verifying_key(key))
    }

    /// The key id (see the module docs of [`crate::seal`]).
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// The 32 raw public key bytes.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key as SubjectPublicKeyInfo PEM, as written to `PATH.pub`.
    pub fn to_pem(&self) -> String {
        match self.key.to_public_key_pem(LineEnding::LF) {
            Ok(pem) => pem,
            Err(_) => spki_pem(self.key.as_bytes()),
        }
    }

    /// Checks `envelope` and returns its payload.
    ///
    /// At least one signature must carry this key's id and verify strictly over
    /// [`pae`]`(payloadType, payload)`; signatures with other key ids are ignored.
    /// The payload type is not checked here: callers that expect one kind of
    /// payload use [`Verifier::verify_as`].
    pub fn verify<'e>(&self, envelope: &'e Envelope) -> Result<&'e [u8], SealError> {
        let mut candidates = envelope
            .signatures
            .iter()
            .filter(|s| s.keyid == self.keyid)
            .peekable();
        if candidates.peek().is_none() {
            let found: Vec<&str> = envelope
                .signatures
                .iter()
                .map(|s| s.keyid.as_str())
                .collect();
            return Err(SealError::NoSignatureForKey {
                keyid: self.keyid.clone(),
                found: if found.is_empty() {
                    "no signatures".to_owned()
                } else {
                    found.join(", ")
                },
            });
        }
        let message = envelope.pae();
        if candidates.any(|s| strict_verify(&self.key, &message, &s.sig)) {
            Ok(&envelope.payload)
        } else {
            Err(SealError::BadSignature {
                keyid: self.keyid.clone(),
                payload_type: envelope.payload_type.clone(),
            })
        }
    }

    /// Like [`Verifier::verify`], and also requires the envelope's payload type to
    /// be `payload_type` (e.g. [`super::INTENT_PAYLOAD_TYPE`]).
    pub fn verify_as<'e>(
        &self,
        envelope: &'e Envelope,
        payload_type: &str,
    ) -> Result<&'e [u8], SealError> {
        if envelope.payload_type != payload_type {
            return Err(SealError::PayloadType {
                expected: payload_type.to_owned(),
                found: envelope.payload_type.clone(),
            });
        }
        self.verify(envelope)
    }
}

/// Whether `sig` is a valid Ed25519 signature of `msg` by `public_key` (32 raw
/// bytes), under the same strict rules [`Verifier::verify`] applies.
///
/// Wrong lengths, keys that are not curve points, small-order keys or `R`,
/// non-canonical `S` (≥ the group order) and non-canonical encodings all give
/// `false`.
pub fn verify_raw(public_key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(bytes) = <&[u8; 32]>::try_from(public_key) else {
        return false;
    };
    match VerifyingKey::from_bytes(bytes) {
        Ok(key) => strict_verify(&key, msg, sig),
        Err(_) => false,
    }
}

/// The one verification routine behind [`Verifier::verify`] and [`verify_raw`].
fn strict_verify(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    match ed25519_dalek::Signature::from_slice(sig) {
        Ok(sig) => key.verify_strict(msg, &sig).is_ok(),
        Err(_) => false,
    }
}

/// Generates a key and writes it to `path` (private, mode 0600, never
/// overwriting) and `path.pub` (public, mode 0644). Returns the public key.
pub fn keygen(path: &Path) -> Result<Verifier, SealError> {
    create(path, 0o644).map(|sealer| sealer.verifier.clone())
}

/// Where the public key of the private key file `path` is written: `path.pub`.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates a key pair at `path` and `path.pub`, crash-safely: the public key is
/// written first (replacing any stale one), then the private key is written to a
/// temporary file, flushed, and hard-linked into place, which fails if `path`
/// already exists. A crash at any moment leaves either no private key (the next
/// attempt starts over) or a complete one; never a truncated key file.
fn create(path: &Path, public_mode: u32) -> Result<Sealer, SealError> {
    let sealer = Sealer::generate()?;
    let private_pem = sealer.private_pem()?;
    let write_error = |error| SealError::Write {
        what: "signing key",
        path: path.to_owned(),
        error,
    };
    if path.symlink_metadata().is_ok() {
        return Err(SealError::KeyExists {
            path: path.to_owned(),
        });
    }
    let public_path = public_key_path(path);
    write_public(
        &public_path,
        sealer.verifier.to_pem().as_bytes(),
        public_mode,
    )
    .map_err(|error| SealError::Write {
        what: "public key",
        path: public_path.clone(),
        error,
    })?;

    let tmp =
        crate::state::write_private_temp(path, private_pem.as_bytes()).map_err(write_error)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(SealError::KeyExists {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(write_error(e)),
    }
    sync_parent(path).map_err(write_error)?;
    Ok(sealer)
}

fn write_public(path: &Path, pem: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // A stale file keeps its mode through `open`: set it.
    if file.metadata()?.permissions().mode() & 0o7777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    file.write_all(pem)?;
    file.sync_all()
}

/// Makes the new directory entries durable, so a crash cannot lose a key that
/// has already signed something.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

fn read_private_pem(path: &Path) -> Result<Zeroizing<String>, SealError> {
    let read_error = |error| SealError::Read {
        what: "signing key",
        path: path.to_owned(),
        error,
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => SealError::KeyMissing {
            path: path.to_owned(),
        },
        _ => read_error(e),
    })?;
    // Checked on the open file, so the file read is the file checked.
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(read_error(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SealError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(SealError::Pem {
            origin: format!("signing key {}", path.display()),
            expected: "an unencrypted Ed25519 PKCS#8 PEM private key",
            reason: format!("the file is {} bytes; such a key is about 120", meta.len()),
        });
    }
    // Sized up front so the secret text is never reallocated (and left behind).
    let mut pem = Zeroizing::new(String::with_capacity(MAX_KEY_FILE_BYTES as usize + 1));
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut pem)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidData => SealError::Pem {
                origin: format!("signing key {}", path.display()),
                expected: "an unencrypted Ed25519 PKCS#8 PEM private key",
                reason: "the file is not UTF-8 text (a DER key? convert it with \
                         `openssl pkey -inform DER -in KEY -out KEY.pem`)"
                    .to_owned(),
            },
            _ => read_error(e),
        })?;
    Ok(pem)
}

/// A specific hint for PEM files that are keys, but of the wrong kind.
fn private_pem_hint(pem: &str) -> Option<String> {
    let hint = if pem.contains("-----BEGIN PUBLIC KEY-----") {
        "this is a public key; give the private key (the file without .pub)"
    } else if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        "encrypted keys are not supported; decrypt it with `openssl pkey -in KEY -out KEY.plain`"
    } else if pem.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        "this is an OpenSSH key; generate one with `airlock keygen` or `openssl genpkey -algorithm ed25519`"
    } else {
        return None;
    };
    Some(hint.to_owned())
}

/// DER SubjectPublicKeyInfo of an Ed25519 key (RFC 8410 §4): a fixed 12-byte
/// prefix and the 32 key bytes.
fn spki_der(key: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(key);
    der
}

fn spki_pem(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(spki_der(key));
    format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::seal::{CHECKPOINT_PAYLOAD_TYPE, INTENT_PAYLOAD_TYPE};

    const INTENT: &[u8] = br#"{"id":"i-1","run":"r-1","ops":[]}"#;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn sealed_envelope_verifies_and_returns_the_exact_payload() {
        let sealer = Sealer::generate().unwrap();
        let envelope = sealer.seal(INTENT_PAYLOAD_TYPE, INTENT);
        assert_eq!(envelope.payload, INTENT);
        assert_eq!(envelope.signatures.len(), 1);
        assert_eq!(envelope.signatures[0].keyid, sealer.keyid());
        assert_eq!(envelope.signatures[0].sig.len(), 64);
        let verifier = sealer.verifier();
        assert_eq!(verifier.verify(&envelope).unwrap(), INTENT);
        assert_eq!(
            verifier.verify_as(&envelope, INTENT_PAYLOAD_TYPE).unwrap(),
            INTENT
        );
        // Through JSON and back, still valid.
        let parsed = Envelope::from_json(&envelope.to_json().unwrap()).unwrap();
        assert_eq!(verifier.verify(&parsed).unwrap(), INTENT);
    }

    #[test]
    fn any_change_to_a_sealed_envelope_fails_verification() {
        let sealer = Sealer::generate().unwrap();
        let verifier = sealer.verifier();
        let good = sealer.seal(INTENT_PAYLOAD_TYPE, INTENT);

        for i in 0..good.payload.len() {
            let mut e = good.clone();
            e.payload[i] ^= 0x01;
            assert!(
                matches!(verifier.verify(&e), Err(SealError::BadSignature { .. })),
                "flipped payload byte {i} verified"
            );
        }
        let mut e = good.clone();
        e.payload.push(b' ');
        assert!(verifier.verify(&e).is_err(), "appended byte verified");

        // The payload type is signed: relabelling an intent as a checkpoint fails.
        let mut e = good.clone();
        e.payload_type = CHECKPOINT_PAYLOAD_TYPE.to_owned();
        assert!(matches!(
            verifier.verify(&e),
            Err(SealError::BadSignature { .. })
        ));

        for i in 0..64 {
            let mut e = good.clone();
            e.signatures[0].sig[i] ^= 0x80;
            assert!(
                verifier.verify(&e).is_err(),
                "flipped sig byte {i} verified"
            );
        }
        for len in [0, 1, 32, 63] {
            let mut e = good.clone();
            e.signatures[0].sig.truncate(len);
            assert!(
                matches!(verifier.verify(&e), Err(SealError::BadSignature { .. })),
                "signature truncated to {len} bytes verified"
            );
        }
        let mut e = good.clone();
        e.signatures[0].sig.push(0);
        assert!(verifier.verify(&e).is_err(), "65-byte signature verified");
    }

    #[test]
    fn wrong_key_and_wrong_keyid_fail() {
        let sealer = Sealer::generate().unwrap();
        let other = Sealer::generate().unwrap();
        assert_ne!(sealer.keyid(), other.keyid());
        let envelope = sealer.seal(INTENT_PAYLOAD_TYPE, INTENT);

        // Another key: its id is not on the envelope.
        let err = other.verifier().verify(&envelope).unwrap_err();
        assert!(
            matches!(err, SealError::NoSignatureForKey { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(sealer.keyid()), "{err}");

        // Another key's signature relabelled with our keyid: does not verify.
        let mut forged = other.seal(INTENT_PAYLOAD_TYPE, INTENT);
        forged.signatures[0].keyid = sealer.keyid().to_owned();
        assert!(matches!(
            sealer.verifier().verify(&forged),
            Err(SealError::BadSignature { .. })
        ));

        // Our signature under a different or empty keyid is not considered.
        for keyid in ["", "sha256:00"] {
            let mut e = envelope.clone();
            e.signatures[0].keyid = keyid.to_owned();
            assert!(matches!(
                sealer.verifier().verify(&e),
                Err(SealError::NoSignatureForKey { .. })
            ));
        }
        let mut empty = envelope.clone();
        empty.signatures.clear();
        assert!(sealer.verifier().verify(&empty).is_err());

        // A foreign signature next to ours does not get in the way.
        let mut both = other.seal(INTENT_PAYLOAD_TYPE, INTENT);
        both.signatures.extend(envelope.signatures.clone());
        assert_eq!(sealer.verifier().verify(&both).unwrap(), INTENT);
        assert_eq!(other.verifier().verify(&both).unwrap(), INTENT);
    }

    #[test]
    fn verify_as_checks_the_payload_type() {
        let sealer = Sealer::generate().unwrap();
        let checkpoint = sealer.seal(CHECKPOINT_PAYLOAD_TYPE, b"{}".to_vec());
        let err = sealer
            .verifier()
            .verify_as(&checkpoint, INTENT_PAYLOAD_TYPE)
            .unwrap_err();
        assert!(matches!(err, SealError::PayloadType { .. }), "{err:?}");
        assert!(err.to_string().contains(CHECKPOINT_PAYLOAD_TYPE), "{err}");
    }

    #[test]
    fn keyid_is_sha256_of_the_spki_der_inside_the_pub_pem() {
        let sealer = Sealer::from_seed(&[7; 32]);
        let pem = sealer.verifier().to_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(der.len(), 44);
        assert_eq!(&der[12..], sealer.verifier().public_key_bytes());
        assert_eq!(sealer.keyid(), digest(&der));
        assert_eq!(der, spki_der(&sealer.verifier().public_key_bytes()));
        assert_eq!(pem, spki_pem(&sealer.verifier().public_key_bytes()));
        // Same key, however it was obtained, same id.
        let from_pem = Verifier::from_pem(&pem).unwrap();
        let from_bytes = Verifier::from_bytes(&sealer.verifier().public_key_bytes()).unwrap();
        assert_eq!(&from_pem, sealer.verifier());
        assert_eq!(&from_bytes, sealer.verifier());
    }

    #[test]
    fn keygen_writes_private_0600_and_pub_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.key");
        let verifier = keygen(&path).unwrap();

        let private = fs::read_to_string(&path).unwrap();
        assert!(
            private.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "{private}"
        );
        assert_eq!(mode_of(&path), 0o600);
        let public = fs::read_to_string(public_key_path(&path)).unwrap();
        assert!(
            public.starts_with("-----BEGIN PUBLIC KEY-----\n"),
            "{public}"
        );
        assert_eq!(public, verifier.to_pem());
        assert_eq!(Verifier::load(&public_key_path(&path)).unwrap(), verifier);

        let sealer = Sealer::load(&path).unwrap();
        assert_eq!(sealer.verifier(), &verifier);
        let envelope = sealer.seal(INTENT_PAYLOAD_TYPE, INTENT);
        assert_eq!(verifier.verify(&envelope).unwrap(), INTENT);

        let err = keygen(&path).unwrap_err();
        assert!(matches!(err, SealError::KeyExists { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            private,
            "key was changed"
        );
    }

    #[test]
    fn group_or_world_accessible_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        keygen(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Sealer::load(&path).unwrap_err();
            assert!(
                matches!(err, SealError::KeyPermissions { mode: m, .. } if m == mode),
                "mode {mode:o}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
            // load_or_create must not replace a key it refuses.
            assert!(Sealer::load_or_create(&path).is_err());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        Sealer::load(&path).unwrap();
    }

    #[test]
    fn missing_key_says_so_and_suggests_keygen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.key");
        let err = Sealer::load(&path).unwrap_err();
        assert!(matches!(err, SealError::KeyMissing { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("does not exist"), "{message}");
        assert!(
            message.contains(&format!("airlock keygen --out {}", path.display())),
            "{message}"
        );
    }

    #[test]
    fn bad_pem_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        let pub_pem = Sealer::generate().unwrap().verifier().to_pem();
        for (content, expect) in [
            ("not a key\n", "signing key"),
            ("", "signing key"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "signing key",
            ),
            (pub_pem.as_str(), "this is a public key"),
        ] {
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = Sealer::load(&path).unwrap_err();
            assert!(matches!(err, SealError::Pem { .. }), "{content:?}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(expect), "{message}");
        }
        fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(Sealer::load(&path), Err(SealError::Pem { .. })));

        // A directory is not a key file.
        let err = Sealer::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        // And the public side.
        assert!(Verifier::from_pem("nope").is_err());
        let private = fs::read_to_string({
            let p = dir.path().join("good.key");
            keygen(&p).unwrap();
            p
        })
        .unwrap();
        let err = Verifier::from_pem(&private).unwrap_err();
        assert!(err.to_string().contains("this is a private key"), "{err}");
    }

    #[test]
    fn weak_public_keys_are_refused() {
        // The identity point (0, 1): small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(Verifier::from_bytes(&identity).is_err());
    }

    #[test]
    fn load_or_create_creates_once_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("airlock.key");
        // The directory must exist.
        assert!(matches!(
            Sealer::load_or_create(&path),
            Err(SealError::Write { .. })
        ));
        fs::create_dir(path.parent().unwrap()).unwrap();

        let (first, created) = Sealer::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(mode_of(&path), 0o600);
        let (second, created) = Sealer::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.verifier(), second.verifier());
    }

    #[test]
    fn debug_output_does_not_show_the_secret() {
        let seed = [0xab; 32];
        let sealer = Sealer::from_seed(&seed);
        let shown = format!("{sealer:?}");
        assert!(shown.contains(sealer.keyid()), "{shown}");
        assert!(!shown.contains(&hex::encode(seed)), "{shown}");
        assert!(!shown.to_lowercase().contains("ab, ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }
}
