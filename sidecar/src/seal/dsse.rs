//! DSSE v1: the envelope's JSON form and the pre-authentication encoding (PAE).
//!
//! Pure data and byte functions; no keys and no I/O.

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::SealError;

/// A DSSE envelope: a payload, its type, and signatures over both.
///
/// Serialises exactly as the DSSE JSON envelope
/// (`payloadType`, `payload` in standard base64, `signatures: [{keyid, sig}]`).
/// Parsing follows DSSE's rules: `payload`, `payloadType`, `signatures` and each
/// `sig` are required, a missing `keyid` reads as empty, unknown fields are
/// ignored, and base64 may use either the standard or the URL-safe alphabet,
/// with or without padding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// What the payload is (e.g. [`super::INTENT_PAYLOAD_TYPE`]); authenticated.
    pub payload_type: String,
    /// The signed bytes, exactly as they were signed.
    #[serde(serialize_with = "to_base64", deserialize_with = "from_base64")]
    pub payload: Vec<u8>,
    /// Signatures over [`pae`]`(payload_type, payload)`.
    pub signatures: Vec<Signature>,
}

/// One signature of an [`Envelope`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Which key made it (see the module docs); an unauthenticated hint.
    #[serde(default)]
    pub keyid: String,
    /// The raw signature bytes (64 for Ed25519).
    #[serde(serialize_with = "to_base64", deserialize_with = "from_base64")]
    pub sig: Vec<u8>,
}

impl Envelope {
    /// The envelope as DSSE JSON (compact, one line).
    pub fn to_json(&self) -> Result<Vec<u8>, SealError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Parses DSSE JSON. This checks the shape only; verify with
    /// [`super::Verifier::verify`].
    pub fn from_json(json: &[u8]) -> Result<Self, SealError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// The bytes the signatures cover: [`pae`]`(payload_type, payload)`.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }
}

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, where `LEN` is the length
/// in bytes as decimal ASCII without leading zeros, `SP` one space, and `type` the
/// UTF-8 bytes of `payload_type`.
///
/// Signing this rather than the payload alone binds the payload type, so a
/// signature over an intent cannot pass as a checkpoint, and the lengths make the
/// split between type and body unambiguous.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = payload.len().to_string();
    let mut out = Vec::with_capacity(
        "DSSEv1".len() + 4 + type_len.len() + payload_type.len() + body_len.len() + payload.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Standard alphabet, padding optional on input.
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// URL-safe alphabet, padding optional on input.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 in either DSSE-allowed alphabet, padded or not.
///
/// A string mixing both alphabets' special characters is refused.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD_LENIENT
        .decode(text)
        .or_else(|standard_error| URL_SAFE_LENIENT.decode(text).map_err(|_| standard_error))
}

fn to_base64<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&STANDARD.encode(bytes))
}

fn from_base64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    decode_base64(&text).map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_dsse_protocol_example() {
        // protocol.md, "Test Vectors": type http://example.com/HelloWorld, body "hello world".
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn pae_counts_bytes_and_keeps_empty_fields() {
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        // "ä" is two UTF-8 bytes: LEN is the byte length, not the char count.
        assert_eq!(pae("ä", b"x"), "DSSEv1 2 ä 1 x".as_bytes());
        let body = vec![0u8; 1234];
        let out = pae("t", &body);
        assert!(out.starts_with(b"DSSEv1 1 t 1234 "));
        assert_eq!(out.len(), "DSSEv1 1 t 1234 ".len() + 1234);
    }

    #[test]
    fn envelope_json_uses_dsse_field_names_and_standard_base64() {
        let envelope = Envelope {
            payload_type: "http://example.com/HelloWorld".to_owned(),
            payload: b"hello world".to_vec(),
            signatures: vec![Signature {
                keyid: "k1".to_owned(),
                sig: vec![0xfb, 0xff, 0xbf],
            }],
        };
        let json = envelope.to_json().unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"payloadType":"http://example.com/HelloWorld","payload":"aGVsbG8gd29ybGQ=","signatures":[{"keyid":"k1","sig":"+/+/"}]}"#
        );
        assert_eq!(Envelope::from_json(&json).unwrap(), envelope);
    }

    #[test]
    fn envelope_parsing_follows_dsse_rules() {
        // URL-safe alphabet, no padding, no keyid, an unknown field: all accepted.
        let parsed = Envelope::from_json(
            br#"{"payload":"-_-_Pj8","payloadType":"t","signatures":[{"sig":"-_8"}],"extra":1}"#,
        )
        .unwrap();
        assert_eq!(parsed.payload, vec![0xfb, 0xff, 0xbf, 0x3e, 0x3f]);
        assert_eq!(parsed.signatures[0].keyid, "");
        assert_eq!(parsed.signatures[0].sig, vec![0xfb, 0xff]);

        for bad in [
            // required fields missing
            &br#"{"payloadType":"t","signatures":[]}"#[..],
            br#"{"payload":"","signatures":[]}"#,
            br#"{"payload":"","payloadType":"t"}"#,
            br#"{"payload":"","payloadType":"t","signatures":[{"keyid":"k"}]}"#,
            // not base64, or both alphabets mixed
            br#"{"payload":"!!","payloadType":"t","signatures":[]}"#,
            br#"{"payload":"+-+-","payloadType":"t","signatures":[]}"#,
        ] {
            assert!(
                Envelope::from_json(bad).is_err(),
                "accepted {}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
