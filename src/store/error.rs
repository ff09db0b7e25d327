//! The storage layer's one error type, and how a driver error maps onto it:
//! `Unavailable` (try again later) or a refused statement.

/// Errors of the storage layer. `Unavailable` means "try again later" (the database
/// could not be reached); `Query` is a statement the server refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {}", describe(.0))]
    Query(tokio_postgres::Error),
    #[error("migration refused: {0}")]
    Migration(String),
    /// An applied migration file has changed since: no retry can fix that.
    #[error("migration refused: {0}")]
    MigrationChanged(String),
    /// The connections go through a pooler in transaction mode: no retry can fix that.
    #[error("{0}")]
    TransactionPooling(String),
    /// The database answered something our own statements rule out.
    #[error("unexpected database state: {0}")]
    Invariant(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The server refused the data itself (SQLSTATE class 22 data exception or 23
    /// integrity constraint): the request was bad, not the service.
    pub fn is_bad_data(&self) -> bool {
        match self {
            Self::Query(err) => err
                .code()
                .is_some_and(|code| matches!(&code.code()[..2], "22" | "23")),
            _ => false,
        }
    }
}

/// The server's own message and SQLSTATE rather than the driver's bare "db error".
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        // Unavailable = worth retrying: the connection broke or could not be made,
        // or the server said so itself (shutting down, starting up, out of
        // connections, a serialization conflict). Anything else is a statement the
        // server or the driver refused, which retrying will not fix.
        if err.is_closed() || io_error_in_chain(&err) || err.code().is_some_and(is_transient) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Query(err)
        }
    }
}

/// SQLSTATE classes that mean "try again": 08 connection exception, 53 insufficient
/// resources, 57 operator intervention (admin shutdown, cannot connect now), and 40
/// transaction rollback (serialization failure, deadlock).
fn is_transient(code: &tokio_postgres::error::SqlState) -> bool {
    matches!(&code.code()[..2], "08" | "53" | "57" | "40")
}

fn io_error_in_chain(err: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self::Unavailable(err.to_string())
    }
}
