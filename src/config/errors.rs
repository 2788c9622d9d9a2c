//! Configuration problems, each naming the key and where its value came from.
//!
//! Produced by every stage of `config` and shown by `main` (exit 78) and by
//! `edgetwin check-config`. Never carries a secret: messages name keys and paths only.

use std::fmt;

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key, e.g. `hub.sas_ttl`.
    pub key: String,
    /// The file or environment variable that set the value, when known.
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(origin) = &self.origin {
            write!(f, " (in {origin})")?;
        }
        Ok(())
    }
}

/// Every problem found, in the order found; never empty when returned as an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    pub fn new() -> Self {
        ConfigErrors(Vec::new())
    }

    pub fn push(
        &mut self,
        key: impl Into<String>,
        origin: Option<String>,
        message: impl Into<String>,
    ) {
        self.0.push(ConfigError {
            key: key.into(),
            origin,
            message: message.into(),
        });
    }

    pub fn single(
        key: impl Into<String>,
        origin: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        let mut errors = ConfigErrors::new();
        errors.push(key, origin, message);
        errors
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    /// `Ok(value)` when nothing was found wrong.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.len() {
            1 => write!(f, "configuration problem: {}", self.0[0]),
            n => {
                write!(f, "{n} configuration problems:")?;
                for error in &self.0 {
                    write!(f, "\n  {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
