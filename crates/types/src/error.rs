//! The one error type a client can see. Each carries a code that maps to exactly
//! one gRPC status (in `sovra-proto`) and a message that says what to fix.

use std::fmt;

/// What kind of failure, chosen so a client knows whether to fix its request,
/// create something first, retry, or call an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
    /// No valid API key.
    Unauthenticated,
    /// A valid key without the scope the call needs.
    PermissionDenied,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// When to try again (a rate limit): sent as the `retry-after-ms` header.
    pub retry_after_ms: Option<u64>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// Prefixes the message with where in the request the problem is, e.g. `points[3]`.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn at(mut self, field: &str) -> Self {
        self.message = format!("{field}: {}", self.message);
        self
    }
}

/// How much of a client's value an error message repeats.
pub const QUOTE_CHARS: usize = 64;

/// A client's value as error messages show it: debug-quoted, cut after
/// [`QUOTE_CHARS`] characters with an ellipsis and the full length, so an error
/// about a huge value stays small enough for any client's metadata limit.
/// Every message that repeats user input goes through this.
pub fn quote(s: &str) -> Quoted<'_> {
    Quoted(s)
}

pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTE_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}... ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_cut_with_the_full_length() {
        assert_eq!(quote("eu").to_string(), "\"eu\"");
        let long = "é".repeat(20_000);
        let q = quote(&long).to_string();
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("... (40000 bytes)"), "{q}");
        assert_eq!(quote(&"a".repeat(QUOTE_CHARS)).to_string().len(), QUOTE_CHARS + 2);
    }
}
