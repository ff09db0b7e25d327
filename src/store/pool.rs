//! The connection pool: every store module checks its connections out of this.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{StoreError, tls};
use crate::config::{DatabaseConfig, DbSslMode};

/// How long a health probe or a pool checkout may wait before the database counts as
/// unavailable.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection whose sent data stays unacknowledged this long is closed by the kernel.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// A handle on the database. Cheap to clone; connections are made lazily, so a
/// `Store` can be built while PostgreSQL is still down.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// How to open a connection outside the pool (the leader's fence session).
    connect: Arc<(tokio_postgres::Config, MakeRustlsConnect)>,
    /// The lane whose fence row, claims and control row this handle acts on
    /// ([`Store::for_lane`]); `default` unless narrowed (docs/design.md#lanes).
    pub(super) lane: Arc<str>,
}

/// The lane every message goes to unless it names or is routed to another; its fence
/// and control rows are the ones that existed before lanes (id 1).
pub use crate::config::DEFAULT_LANE;

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
        Ok(Self {
            pool,
            connect,
            lane: Arc::from(DEFAULT_LANE),
        })
    }

    /// The same pool, acting on `lane`'s fence row, claims and control row.
    pub fn for_lane(&self, lane: &str) -> Self {
        Self {
            lane: Arc::from(lane),
            ..self.clone()
        }
    }

    /// The lane this handle acts on.
    pub fn lane_name(&self) -> &str {
        &self.lane
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
