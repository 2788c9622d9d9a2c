//! The registry client's errors: [`RegistryError`] (callers branch on it; the CLI maps it
//! to exit codes), [`ClientSetupError`], and reading the hub's error answers (both body
//! formats of PROTOCOL §6.7). Messages carry
//! the request line and the hub's words, never a key or a token.

use std::path::PathBuf;

use serde_json::Value;

use crate::identity::ConnectionStringError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("not authorised: {0}")]
    Unauthorized(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("precondition failed (etag changed): {0}")]
    PreconditionFailed(String),
    #[error("throttled by the hub: {0}")]
    Throttled(String),
    #[error("hub unavailable: {0}")]
    Transient(String),
    #[error("rejected by the hub: {0}")]
    Invalid(String),
}

impl RegistryError {
    /// The same error, its message saying the client gave up after `attempts` (> 1).
    pub(super) fn after_attempts(self, attempts: u32) -> Self {
        if attempts <= 1 {
            return self;
        }
        let note = |m: String| format!("{m} (gave up after {attempts} attempts)");
        match self {
            RegistryError::Throttled(m) => RegistryError::Throttled(note(m)),
            RegistryError::Transient(m) => RegistryError::Transient(note(m)),
            other => other,
        }
    }

    /// Worth retrying later with backoff.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RegistryError::Throttled(_) | RegistryError::Transient(_)
        )
    }
}

/// Why [`super::RegistryClient::from_connection_string`] could not build a client. The first two
/// are configuration problems (the credential or the CA file the user gave).
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("service connection string: {0}")]
    ConnectionString(#[from] ConnectionStringError),
    #[error("CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    /// The HTTP client itself could not be built.
    #[error(transparent)]
    Client(RegistryError),
}

/// The hub's message from either error body format (PROTOCOL §6.7), else the raw text.
pub fn error_message(body: &str, code_name: Option<&str>) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let outer = parsed
        .as_ref()
        .and_then(|v| v.get("Message"))
        .and_then(Value::as_str);
    let detail = match outer {
        Some(m) => match serde_json::from_str::<Value>(m) {
            Ok(inner) => {
                let code = inner
                    .get("errorCode")
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                let text = inner.get("message").and_then(Value::as_str).unwrap_or(m);
                format!("{text} (error {code})")
            }
            Err(_) => m.to_string(),
        },
        None => {
            let t = body.trim();
            if t.is_empty() {
                "no error details from the hub".to_string()
            } else {
                t.chars().take(300).collect()
            }
        }
    };
    match code_name {
        Some(name) if !detail.contains(name) => format!("{name}: {detail}"),
        _ => detail,
    }
}

/// A reqwest error with its causes, without the URL: ours never holds secrets, but the
/// message stays short.
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "");
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_reads_the_newer_nested_format() {
        let body = r#"{"Message":"{\"errorCode\":504101,\"trackingId\":\"x\",\"message\":\"Timed out waiting for the response from device.\",\"info\":{},\"timestampUtc\":\"t\"}","ExceptionMessage":""}"#;
        assert_eq!(
            error_message(body, None),
            "Timed out waiting for the response from device. (error 504101)"
        );
    }

    #[test]
    fn error_message_reads_the_older_format_and_names_the_code() {
        let body = r#"{"Message":"ErrorCode:DeviceAlreadyExists;Conflict","ExceptionMessage":"Tracking ID:abc"}"#;
        assert_eq!(
            error_message(body, Some("DeviceAlreadyExists")),
            "ErrorCode:DeviceAlreadyExists;Conflict"
        );
    }

    #[test]
    fn error_message_survives_a_malformed_body() {
        assert_eq!(
            error_message("<html>oops", Some("ServerError")),
            "ServerError: <html>oops"
        );
        assert_eq!(error_message("", None), "no error details from the hub");
    }
}
