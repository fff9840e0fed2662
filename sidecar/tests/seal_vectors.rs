//! Known-answer and interoperability tests for `airlock::seal`.
//!
//! * Wycheproof Ed25519: [`verify_raw`] (the routine behind `Verifier::verify`)
//!   accepts exactly the `valid` cases. `acceptable` cases, of which this file has
//!   none, must be rejected: Airlock verifies strictly, so anything Wycheproof
//!   merely tolerates is refused.
//! * RFC 8032 §7.1: signing with the published seed gives the published signature.
//! * Strictness: a small-order key forgery that lax verifiers accept (Wycheproof's
//!   file alone cannot tell strict from lax verification).
//! * DSSE: envelopes from the DSSE project's own test vectors.
//! * OpenSSL (skipped, with a message, when `openssl` is not installed): our key
//!   files are read by OpenSSL, OpenSSL's keys and signatures work with ours, and
//!   OpenSSL verifies our envelopes' signatures.

// Test helpers panic on a broken fixture or tool, which is the failure we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use airlock::seal::{
    CHECKPOINT_PAYLOAD_TYPE, Envelope, INTENT_PAYLOAD_TYPE, Sealer, Signature, Verifier, digest,
    keygen, pae, public_key_path, verify_raw,
};
use serde_json::Value;

fn vectors(relative: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(relative);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn hex_field(value: &Value, field: &str) -> Vec<u8> {
    hex::decode(value[field].as_str().unwrap()).unwrap()
}

#[test]
fn wycheproof_ed25519_valid_exactly_when_expected() {
    let file = vectors("wycheproof/testvectors_v1/ed25519_test.json");
    assert_eq!(file["algorithm"], "EDDSA");
    // result -> (cases, cases where we agreed)
    let mut by_result: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_flag: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for group in file["testGroups"].as_array().unwrap() {
        assert_eq!(group["publicKey"]["curve"], "edwards25519");
        let public_key = hex_field(&group["publicKey"], "pk");
        for case in group["tests"].as_array().unwrap() {
            let id = case["tcId"].as_u64().unwrap();
            let result = case["result"].as_str().unwrap();
            let expected = match result {
                "valid" => true,
                // Strict verification: tolerated is not good enough.
                "invalid" | "acceptable" => false,
                other => panic!("tcId {id}: unknown result {other:?}"),
            };
            let got = verify_raw(
                &public_key,
                &hex_field(case, "msg"),
                &hex_field(case, "sig"),
            );
            let entry = by_result.entry(result.to_owned()).or_default();
            entry.0 += 1;
            if got == expected {
                entry.1 += 1;
            } else {
                failures.push(format!(
                    "tcId {id} ({result}, {}): {:?} -> {got}",
                    case["flags"], case["comment"]
                ));
            }
            for flag in case["flags"].as_array().unwrap() {
                *by_flag
                    .entry(flag.as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    let total: usize = by_result.values().map(|(n, _)| n).sum();
    println!("wycheproof ed25519: {total} tests; by result (cases, agreed): {by_result:?}");
    println!("wycheproof ed25519: by flag: {by_flag:?}");
    assert_eq!(total as u64, file["numberOfTests"].as_u64().unwrap());
    assert!(
        failures.is_empty(),
        "disagreements:\n{}",
        failures.join("\n")
    );
    // The file must actually exercise both outcomes and the malleability checks.
    assert!(by_result["valid"].0 > 0 && by_result["invalid"].0 > 0);
    assert!(by_flag.contains_key("SignatureMalleability"));
}

#[test]
fn rfc8032_section_7_1_signatures_are_reproduced_and_verify() {
    let file = vectors("rfc8032/ed25519_rfc8032_section7.1.json");
    let cases = file["vectors"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let seed: [u8; 32] = hex_field(case, "secret_key").try_into().unwrap();
        let public_key = hex_field(case, "public_key");
        let message = hex_field(case, "message");
        let signature = hex_field(case, "signature");

        let sealer = Sealer::from_seed(&seed);
        assert_eq!(
            sealer.verifier().public_key_bytes().as_slice(),
            public_key,
            "{name}: public key"
        );
        let ours = sealer.sign_raw(&message);
        assert_eq!(ours.as_slice(), signature, "{name}: signature");
        assert!(verify_raw(&public_key, &message, &signature), "{name}");

        let mut altered = message.clone();
        altered.push(0);
        assert!(
            !verify_raw(&public_key, &altered, &signature),
            "{name}: altered"
        );
    }
}

/// Wycheproof's file does not tell strict from lax verification (dalek's lax
/// `verify` passes it too), so check the strict rules directly: with the identity
/// point as public key and as `R`, and `S = 0`, the cofactorless equation
/// `[S]B = R + [k]A` holds for *every* message. Lax verifiers accept this forgery.
#[test]
fn small_order_key_forgery_is_rejected() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut forged = [0u8; 64];
    forged[..32].copy_from_slice(&identity);
    for message in [&b""[..], b"anything", b"DSSEv1 0  0 "] {
        assert!(!verify_raw(&identity, message, &forged));
    }
    assert!(Verifier::from_bytes(&identity).is_err());
    // A real key with a small-order R and S = 0 is refused too.
    let sealer = Sealer::from_seed(&[9; 32]);
    assert!(!verify_raw(
        &sealer.verifier().public_key_bytes(),
        b"m",
        &forged
    ));
}

/// The DSSE project's test vectors (secure-systems-lab/dsse, `testvectors/vectors.json`):
/// key "A" is RFC 8032 TEST 1's seed, and Ed25519 is deterministic, so sealing the
/// same payload must give the same signature byte for byte.
#[test]
fn dsse_project_vectors_are_reproduced() {
    let seed: [u8; 32] =
        hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap()
            .try_into()
            .unwrap();
    let sealer = Sealer::from_seed(&seed);

    let single = br#"{"payload": "eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEifQ==",
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [{"sig": "2WAfaHm5jluo0w+0rk8uVkluELJYWjSmU9x7EUzx+AyteDGJ4/nqyJXfmAUVFIAoQafWm7AxBZNw5M9ixNHiCA==", "keyid": "A"}]}"#;
    let url_safe = br#"{"payload": "-_-_Pj8=", "payloadType": "application/vnd.in-toto+json",
        "signatures": [{"sig": "P-_KHICeR7tI6S_YyejJTRtrXhcQyQ2LYPaL8h90KjC9qN8HU_svOQ6TuDOT1HIrsGW886DbWNWcCmX5twLrAw==", "keyid": "A"}]}"#;
    let expected_pae = [
        "445353457631203238206170706c69636174696f6e2f766e642e696e2d746f746f2b6a736f6e203433207b225f74797065223a2268747470733a2f2f696e2d746f746f2e696f2f53746174656d656e742f7631227d",
        "445353457631203238206170706c69636174696f6e2f766e642e696e2d746f746f2b6a736f6e203520fbffbf3e3f",
    ];
    for (json, expected_pae) in [(&single[..], expected_pae[0]), (url_safe, expected_pae[1])] {
        let mut envelope = Envelope::from_json(json).unwrap();
        assert_eq!(hex::encode(envelope.pae()), expected_pae);
        let resealed = sealer.seal(&envelope.payload_type, envelope.payload.clone());
        assert_eq!(resealed.signatures[0].sig, envelope.signatures[0].sig);

        // Their keyid is "A"; ours is the SPKI digest. Relabelled, it verifies.
        assert!(sealer.verifier().verify(&envelope).is_err());
        envelope.signatures[0].keyid = sealer.keyid().to_owned();
        assert_eq!(
            sealer.verifier().verify(&envelope).unwrap(),
            envelope.payload.as_slice()
        );
        // The signature covers the type: the same bytes under another type fail.
        envelope.payload_type = "application/vnd.example.other+json".to_owned();
        assert!(sealer.verifier().verify(&envelope).is_err());
    }
}

#[test]
fn airlock_payload_types_are_distinct_and_bound() {
    assert_ne!(INTENT_PAYLOAD_TYPE, CHECKPOINT_PAYLOAD_TYPE);
    assert_eq!(
        pae(INTENT_PAYLOAD_TYPE, b"{}"),
        b"DSSEv1 38 application/vnd.airlock.intent.v1+json 2 {}"
    );
    assert_eq!(
        pae(CHECKPOINT_PAYLOAD_TYPE, b"{}"),
        b"DSSEv1 42 application/vnd.airlock.checkpoint.v1+json 2 {}"
    );
}

// ---------------------------------------------------------------------------
// OpenSSL interoperability
// ---------------------------------------------------------------------------

/// `Some("openssl")` when the tool runs; otherwise prints why the test is skipped.
fn openssl(test: &str) -> Option<&'static str> {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => Some("openssl"),
        Ok(out) => {
            eprintln!(
                "SKIPPED {test}: `openssl version` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: openssl is not installed ({e})");
            None
        }
    }
}

/// Runs openssl with `args`, asserting success, and returns its stdout.
fn run(openssl: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(openssl).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Signs `message` with OpenSSL's plain Ed25519 and returns the 64 bytes.
fn openssl_sign(openssl: &str, key: &Path, message: &[u8], dir: &Path) -> Vec<u8> {
    let message_path = dir.join("message.bin");
    let sig_path = dir.join("message.sig");
    fs::write(&message_path, message).unwrap();
    run(
        openssl,
        &[
            "pkeyutl",
            "-sign",
            "-inkey",
            s(key),
            "-rawin",
            "-in",
            s(&message_path),
            "-out",
            s(&sig_path),
        ],
    );
    fs::read(&sig_path).unwrap()
}

#[test]
fn openssl_reads_our_key_files() {
    let Some(openssl) = openssl("openssl_reads_our_key_files") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("airlock.key");
    let verifier = keygen(&key).unwrap();
    let pub_path = public_key_path(&key);

    run(openssl, &["pkey", "-in", s(&key), "-noout"]);
    let derived_pub = run(openssl, &["pkey", "-in", s(&key), "-pubout"]);
    assert_eq!(derived_pub, fs::read(&pub_path).unwrap());

    // OpenSSL re-encodes our private key to exactly the bytes we wrote (PKCS#8 v1).
    let reencoded = run(openssl, &["pkey", "-in", s(&key)]);
    assert_eq!(reencoded, fs::read(&key).unwrap());

    // The documented keyid recipe: SHA-256 of the DER OpenSSL makes of the .pub.
    let der = run(
        openssl,
        &["pkey", "-pubin", "-in", s(&pub_path), "-outform", "DER"],
    );
    assert_eq!(verifier.keyid(), digest(&der));

    // OpenSSL, holding our private key file, signs exactly as we do, and it
    // verifies our envelope's signature with our public key file.
    let sealer = Sealer::load(&key).unwrap();
    let envelope = sealer.seal(INTENT_PAYLOAD_TYPE, br#"{"id":"x"}"#.to_vec());
    let pae_bytes = envelope.pae();
    assert_eq!(
        openssl_sign(openssl, &key, &pae_bytes, dir.path()),
        envelope.signatures[0].sig
    );
    let pae_path = dir.path().join("pae.bin");
    let sig_path = dir.path().join("envelope.sig");
    fs::write(&pae_path, &pae_bytes).unwrap();
    fs::write(&sig_path, &envelope.signatures[0].sig).unwrap();
    let verified = run(
        openssl,
        &[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            s(&pub_path),
            "-rawin",
            "-in",
            s(&pae_path),
            "-sigfile",
            s(&sig_path),
        ],
    );
    assert!(
        String::from_utf8_lossy(&verified).contains("Signature Verified Successfully"),
        "{}",
        String::from_utf8_lossy(&verified)
    );
    // And rejects it over altered bytes (the check can fail).
    let mut altered = pae_bytes.clone();
    altered[pae_bytes.len() - 2] ^= 1;
    fs::write(&pae_path, &altered).unwrap();
    let status = Command::new(openssl)
        .args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            s(&pub_path),
            "-rawin",
            "-in",
            s(&pae_path),
            "-sigfile",
            s(&sig_path),
        ])
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
}

#[test]
fn openssl_keys_and_signatures_work_with_ours() {
    let Some(openssl) = openssl("openssl_keys_and_signatures_work_with_ours") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key: PathBuf = dir.path().join("openssl.key");
    run(
        openssl,
        &["genpkey", "-algorithm", "ed25519", "-out", s(&key)],
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let pub_path = dir.path().join("openssl.key.pub");
    run(
        openssl,
        &["pkey", "-in", s(&key), "-pubout", "-out", s(&pub_path)],
    );

    let sealer = Sealer::load(&key).unwrap();
    let verifier = Verifier::load(&pub_path).unwrap();
    assert_eq!(sealer.verifier(), &verifier);
    assert_eq!(
        fs::read_to_string(&pub_path).unwrap(),
        verifier.to_pem(),
        "our SPKI PEM differs from OpenSSL's"
    );

    let payload = br#"{"id":"intent-1","run":"run-1"}"#;
    let message = pae(INTENT_PAYLOAD_TYPE, payload);
    let sig = openssl_sign(openssl, &key, &message, dir.path());
    assert_eq!(sig.len(), 64);
    let envelope = Envelope {
        payload_type: INTENT_PAYLOAD_TYPE.to_owned(),
        payload: payload.to_vec(),
        signatures: vec![Signature {
            keyid: verifier.keyid().to_owned(),
            sig: sig.clone(),
        }],
    };
    assert_eq!(verifier.verify(&envelope).unwrap(), payload);
    // Deterministic Ed25519: our signature with OpenSSL's key is the same.
    assert_eq!(sealer.sign_raw(&message).as_slice(), sig);

    let mut tampered = envelope.clone();
    tampered.payload[0] = b'[';
    assert!(verifier.verify(&tampered).is_err());
}
