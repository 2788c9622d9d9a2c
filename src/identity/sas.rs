//! SAS tokens (PROTOCOL §2.2–2.4): signing with the Python device SDK's `sr` encoding,
//! and parsing and verification as the emulator needs it. Never prints a signature.

use super::*;

const SAS_PREFIX: &str = "SharedAccessSignature ";

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is
/// percent-encoded (UTF-8 bytes, upper-case hex).
const QUOTE_SAFE_NOTHING: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

/// Encodes a resource URI for `sr` the way the Python device SDK does
/// (`quote(uri, safe="")`): `a.b/devices/d` → `a.b%2Fdevices%2Fd`.
pub fn encode_resource_uri(uri: &str) -> String {
    utf8_percent_encode(uri, QUOTE_SAFE_NOTHING).to_string()
}

/// The bytes a SAS signature covers: `sr_as_transmitted + "\n" + expiry` (PROTOCOL.md
/// §2.2). What aziot-keyd is asked to sign, too (PROTOCOL §13.4).
pub fn string_to_sign(sr_as_transmitted: &str, expiry: u64) -> String {
    format!("{sr_as_transmitted}\n{expiry}")
}

/// The base64 HMAC-SHA256 signature over [`string_to_sign`]. `sr_as_transmitted` is the
/// already-encoded `sr` text.
pub fn sign(key: &SharedKey, sr_as_transmitted: &str, expiry: u64) -> String {
    let mut mac = key.mac();
    mac.update(string_to_sign(sr_as_transmitted, expiry).as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Builds `SharedAccessSignature sr=<encoded uri>&sig=<encoded sig>&se=<expiry>[&skn=<policy>]`
/// with the Python device SDK's field order and encoding.
pub fn token(key: &SharedKey, resource_uri: &str, expiry: u64, policy: Option<&str>) -> String {
    let sig = sign(key, &encode_resource_uri(resource_uri), expiry);
    let mut t = token_with_signature(resource_uri, expiry, &sig);
    if let Some(policy) = policy {
        t.push_str("&skn=");
        t.push_str(&utf8_percent_encode(policy, QUOTE_SAFE_NOTHING).to_string());
    }
    t
}

/// A token for `resource_uri` from a signature made elsewhere (aziot-keyd) over
/// [`string_to_sign`] of the encoded URI and `expiry`; same layout as [`token`], no `skn`.
pub fn token_with_signature(resource_uri: &str, expiry: u64, signature: &str) -> String {
    format!(
        "{SAS_PREFIX}sr={}&sig={}&se={expiry}",
        encode_resource_uri(resource_uri),
        utf8_percent_encode(signature, QUOTE_SAFE_NOTHING)
    )
}

/// Why a SAS token was refused. Messages never contain the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token text does not follow PROTOCOL.md §2.4; the reason names the field.
    #[error("malformed SAS token: {0}")]
    Malformed(String),
    #[error("SAS token signature does not match")]
    BadSignature,
    #[error("SAS token expired {expired_for_secs} s ago")]
    Expired { expired_for_secs: u64 },
}

/// A parsed `SharedAccessSignature ...` token (emulator side). `Debug` redacts the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as transmitted: the HMAC is computed over this text.
    pub sr_raw: String,
    /// `sr` percent-decoded: what the token grants access to.
    pub resource: String,
    /// `sig` percent-decoded: standard base64.
    pub signature: String,
    /// `se`: seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn`, percent-decoded, for policy tokens.
    pub key_name: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr_raw", &self.sr_raw)
            .field("resource", &self.resource)
            .field("signature", &REDACTED)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish()
    }
}

fn malformed(reason: impl Into<String>) -> SasError {
    SasError::Malformed(reason.into())
}

/// Plain percent-decoding (`+` stays `+`), requiring UTF-8.
fn percent_decode_field(field: &str, raw: &str) -> Result<String, SasError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| malformed(format!("{field} is not UTF-8 after percent-decoding")))
}

impl SasToken {
    /// Parses a token: `SharedAccessSignature ` prefix, then `&`-separated fields in any
    /// order, each split on its first `=`. `sr`, `sig`, `se` are required, `skn` is
    /// optional, anything else (or a repeated field) is refused. `se` must be canonical
    /// decimal (no sign, no leading zeros) so that re-rendering it gives the signed text.
    pub fn parse(text: &str) -> Result<SasToken, SasError> {
        let rest = text
            .strip_prefix(SAS_PREFIX)
            .ok_or_else(|| malformed("missing `SharedAccessSignature ` prefix"))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for (index, field) in rest.split('&').enumerate() {
            let position = index + 1;
            if field.is_empty() {
                return Err(malformed(format!("empty field (field {position})")));
            }
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| malformed(format!("field {position} is not `name=value`")))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => {
                    return Err(malformed(if echoable_key_name(other, value) {
                        format!("unknown field `{other}`")
                    } else {
                        format!("unknown field (field {position})")
                    }))
                }
            };
            if slot.is_some() {
                return Err(malformed(format!("duplicate field `{name}`")));
            }
            *slot = Some(value);
        }

        let sr_raw = sr.ok_or_else(|| malformed("missing sr"))?;
        let sig_raw = sig.ok_or_else(|| malformed("missing sig"))?;
        let se_raw = se.ok_or_else(|| malformed("missing se"))?;
        if sr_raw.is_empty() {
            return Err(malformed("sr is empty"));
        }
        let resource = percent_decode_field("sr", sr_raw)?;
        let signature = percent_decode_field("sig", sig_raw)?;
        if signature.is_empty() {
            return Err(malformed("sig is empty"));
        }
        if BASE64.decode(&signature).is_err() {
            return Err(malformed("sig is not valid base64"));
        }
        let canonical = !se_raw.is_empty()
            && se_raw.bytes().all(|b| b.is_ascii_digit())
            && (se_raw == "0" || !se_raw.starts_with('0'));
        if !canonical {
            return Err(malformed("se is not a canonical decimal number"));
        }
        let expiry = se_raw
            .parse::<u64>()
            .map_err(|_| malformed("se is out of range"))?;
        let key_name = match skn {
            None => None,
            Some("") => return Err(malformed("skn is empty")),
            Some(raw) => Some(percent_decode_field("skn", raw)?),
        };
        Ok(SasToken {
            sr_raw: sr_raw.to_owned(),
            resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// Checks the signature (HMAC over the raw `sr` + `"\n"` + `se`, compared in constant
    /// time), then the expiry: a token is valid up to and including second `se`.
    pub fn verify(&self, key: &SharedKey, now_unix: u64) -> Result<(), SasError> {
        let presented = BASE64
            .decode(&self.signature)
            .map_err(|_| SasError::BadSignature)?;
        let mut mac = key.mac();
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.expiry.to_string().as_bytes());
        mac.verify_slice(&presented)
            .map_err(|_| SasError::BadSignature)?;
        if self.expiry < now_unix {
            return Err(SasError::Expired {
                expired_for_secs: now_unix - self.expiry,
            });
        }
        Ok(())
    }

    /// Whether the token's decoded resource is an ASCII-case-insensitive, path-segment
    /// prefix of `resource`: `a/b` covers `a/b` and `a/b/c`, not `a/bc`.
    pub fn covers(&self, resource: &str) -> bool {
        let granted = self.resource.as_bytes();
        let wanted = resource.as_bytes();
        if granted.is_empty() || wanted.len() < granted.len() {
            return false;
        }
        let (head, tail) = wanted.split_at(granted.len());
        head.eq_ignore_ascii_case(granted)
            && (tail.is_empty() || tail[0] == b'/' || granted.ends_with(b"/"))
    }
}
