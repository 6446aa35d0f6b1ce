//! The client's one error type, exported to Kotlin as `ClientException`.

/// What went wrong, in words a user or an app can act on.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum ClientError {
    /// The store key does not open this store. Nothing was changed.
    #[error("the store key does not open this store (nothing was changed): {0}")]
    WrongStoreKey(String),
    /// The store key is not 32 bytes.
    #[error("the store key must be 32 bytes, not {0}")]
    InvalidStoreKey(u32),
    /// The local store cannot be read or written.
    #[error("local store: {0}")]
    Store(String),
    /// A stored record failed its integrity check (tampered or corrupted).
    #[error("a stored record failed its integrity check: {0}")]
    Corrupt(String),
    /// No account in this store yet.
    #[error("this store holds no account yet: register first")]
    NotRegistered,
    /// This store already holds an account.
    #[error("this store already holds the account {0}")]
    AlreadyRegistered(String),
    /// The server refused a request.
    #[error("the server answered {status}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
    /// The server cannot be reached.
    #[error("cannot reach the server: {0}")]
    Network(String),
    /// A contact's identity key is not the one trusted before. Compare safety
    /// numbers, then call `trust_identity` to accept it.
    #[error("the identity key of {0} changed; compare safety numbers and trust it before messaging")]
    UntrustedIdentity(String),
    /// libsignal refused.
    #[error("signal protocol: {0}")]
    Protocol(String),
    /// Not connected to the relay (a call needs the connection): call `connect()`.
    #[error("not connected to the relay: call connect() first")]
    NotConnected,
    /// A call's media could not be set up or carried.
    #[error("call: {0}")]
    Call(String),
    /// Bad input from the caller.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which argument.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

impl From<rusqlite::Error> for ClientError {
    fn from(error: rusqlite::Error) -> Self {
        ClientError::Store(error.to_string())
    }
}

impl From<libsignal_protocol::SignalProtocolError> for ClientError {
    fn from(error: libsignal_protocol::SignalProtocolError) -> Self {
        match error {
            libsignal_protocol::SignalProtocolError::UntrustedIdentity(address) => {
                ClientError::UntrustedIdentity(address.name().to_owned())
            }
            // Our store failed under libsignal (see `signal::storage_error`):
            // a local failure, not a bad message.
            libsignal_protocol::SignalProtocolError::InvalidState(crate::signal::STORE_FAILURE, detail) => {
                ClientError::Store(detail)
            }
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(error: reqwest::Error) -> Self {
        ClientError::Network(error.to_string())
    }
}

/// The client's results.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> ClientError {
    ClientError::Invalid { field: field.to_owned(), reason: reason.into() }
}

/// A libsignal key or signature error as [`ClientError::Protocol`].
pub(crate) fn protocol(error: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(error.to_string())
}
