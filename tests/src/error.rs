//! One error type for the tooling: every failure ends up as a message for a person, so an error
//! is a sentence that says what went wrong and, where possible, what to do about it.

use std::fmt;

/// A failure with a message meant for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// Creates an error from a complete message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description of what was being done to a lower-level error.
pub trait Context<T> {
    /// Prefixes the error with `what()`: "`what`: `error`".
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// Builds an [`Error`] from `format!` arguments.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::error::Error::new(format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_prefixes_the_cause() {
        let r: std::result::Result<(), &str> = Err("No such file or directory");
        let e = r.context(|| "reading tests/scenarios/a.toml".to_string());
        assert_eq!(
            e.unwrap_err().message(),
            "reading tests/scenarios/a.toml: No such file or directory"
        );
    }
}
