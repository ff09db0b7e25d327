//! PostgreSQL: the connection pool, migrations, the queue and the control tables.
//!
//! PostgreSQL is the source of truth. Redis only elects; everything that must not be
//! lost or doubled (claims, results, the fence, the desired state) lives here.

pub mod activity;
pub mod control;
pub mod fence;
pub mod migrations;
pub mod queue;
pub mod receipts;
mod tls;

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, DbSslMode};

/// How long a health probe or a pool checkout may wait before the database counts as
/// unavailable.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection whose sent data stays unacknowledged this long is closed by the kernel.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

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

/// A handle on the database. Cheap to clone; connections are made lazily, so a
/// `Store` can be built while PostgreSQL is still down.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// How to open a connection outside the pool (the leader's fence session).
    connect: Arc<(tokio_postgres::Config, MakeRustlsConnect)>,
}

/// Opens the pool's connections on the runtime the store was made on (the main one),
/// whichever runtime asks for one. The dispatcher runs on a runtime of its own and
/// checks connections out too; a connection opened there would have its socket and
/// its I/O task on that runtime, so it would break when the dispatcher stops at
/// shutdown (while the API and the registry still use the pool), and API queries on it
/// would wait behind the sends.
struct ConnectOnHome {
    tls: MakeRustlsConnect,
    /// `None` when the store was made outside a runtime: then where it is asked.
    home: Option<tokio::runtime::Handle>,
}

impl deadpool_postgres::Connect for ConnectOnHome {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let tls = self.tls.clone();
        let pg_config = pg_config.clone();
        let open = async move {
            let (client, connection) = pg_config.connect(tls).await?;
            let io = tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(error = %err, "PostgreSQL connection ended");
                }
            });
            Ok((client, io))
        };
        let home = self.home.clone();
        Box::pin(async move {
            let Some(home) = home else {
                return open.await;
            };
            match home.spawn(open).await {
                Ok(opened) => opened,
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                // The main runtime is shutting down: no connection; the pool's create
                // timeout answers the caller.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

impl Store {
    pub fn new(config: &DatabaseConfig) -> anyhow::Result<Self> {
        let mut pg = match &config.url {
            Some(url) => tokio_postgres::Config::from_str(url.expose())?,
            None => {
                let mut pg = tokio_postgres::Config::new();
                pg.host(&config.host)
                    .port(config.port)
                    .dbname(&config.name)
                    .user(&config.user)
                    .password(config.password.expose());
                pg
            }
        };
        pg.application_name("message-dispatcher")
            // NOTICEs (such as "already exists, skipping") are not worth a log line.
            .options(format!(
                "-c client_min_messages=warning -c idle_in_transaction_session_timeout={}",
                config.idle_in_transaction_timeout.as_millis().max(1000)
            ))
            .connect_timeout(Duration::from_secs(3))
            // A dead peer or a black-holed path ends the connection (and with it a
            // query waiting on it) within seconds, not at the kernel's defaults of
            // minutes: idle connections are probed, unacknowledged writes time out.
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        match config.ssl_mode {
            DbSslMode::Disable if config.url.is_some() => {} // the URL's own sslmode applies
            DbSslMode::Disable => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            }
            DbSslMode::Prefer => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            }
            DbSslMode::Require | DbSslMode::VerifyFull => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            }
        }
        let connector = tls::connector(config.ssl_mode)?;
        let connect = Arc::new((pg.clone(), connector.clone()));
        let manager = Manager::from_connect(
            pg,
            ConnectOnHome {
                tls: connector,
                home: tokio::runtime::Handle::try_current().ok(),
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CHECKOUT_TIMEOUT))
            .create_timeout(Some(CHECKOUT_TIMEOUT + Duration::from_secs(1)))
            .recycle_timeout(Some(CHECKOUT_TIMEOUT))
            .build()?;
        Ok(Self { pool, connect })
    }

    /// A connection of its own, outside the pool: the fence session must not wait
    /// behind result writes for a pooled connection. Ends when the client is dropped.
    pub async fn dedicated_connection(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (config, connector) = &*self.connect;
        let (client, connection) = config.connect(connector.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "dedicated PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A pooled connection, or `Unavailable` within a few seconds.
    pub async fn client(&self) -> Result<Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Runs one statement on a pooled connection, prepared once per connection: the
    /// dispatch path runs the same few statements for every message.
    pub async fn execute_prepared(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    /// Answers whether PostgreSQL is reachable right now (one round trip, bounded).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let check = async {
            self.client().await?.simple_query("SELECT 1").await?;
            Ok(())
        };
        tokio::time::timeout(CHECKOUT_TIMEOUT * 2, check)
            .await
            .map_err(|_| StoreError::Unavailable("health check timed out".into()))?
    }
}
