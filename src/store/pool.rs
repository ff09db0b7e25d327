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
    /// How to open a connection outside the pool (the leader's fence session), and
    /// the settings it starts with.
    connect: Arc<(tokio_postgres::Config, MakeRustlsConnect, String)>,
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
    /// Run on every new connection ([`session_settings`]).
    session_settings: String,
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
        let session_settings = self.session_settings.clone();
        let open = async move {
            let (client, connection) = pg_config.connect(tls).await?;
            let io = tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(error = %err, "PostgreSQL connection ended");
                }
            });
            client.batch_execute(&session_settings).await?;
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

/// What every session sets first, as statements rather than the `options` startup
/// parameter, which PgBouncer refuses: NOTICEs (such as "already exists, skipping") are
/// not worth a log line, and a session idle inside a transaction ends (see
/// `DatabaseConfig::idle_in_transaction_timeout`).
fn session_settings(config: &DatabaseConfig) -> String {
    format!(
        "SET client_min_messages = warning; SET idle_in_transaction_session_timeout = {}",
        config.idle_in_transaction_timeout.as_millis().max(1000)
    )
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
        let settings = session_settings(config);
        let connect = Arc::new((pg.clone(), connector.clone(), settings.clone()));
        let manager = Manager::from_connect(
            pg,
            ConnectOnHome {
                session_settings: settings,
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
        let (config, connector, settings) = &*self.connect;
        let (client, connection) = config.connect(connector.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "dedicated PostgreSQL connection ended");
            }
        });
        client.batch_execute(settings).await?;
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

    /// Refuses a connection pooler in transaction or statement mode (PgBouncer's
    /// `pool_mode = transaction`): the leader holds session-level advisory locks on its
    /// fence session, and a pooler that hands the server session to another client
    /// after each transaction breaks them (docs/operations.md#connection-poolers).
    ///
    /// Two connections open at once each have a server session of their own, for good,
    /// unless a pooler shares them out per transaction: then the second connection is
    /// usually handed the session the first one has just given back (PgBouncer reuses
    /// the most recent), or one connection's session changes between statements. Simple
    /// queries only, which any pooler passes whatever its prepared-statement support.
    pub async fn refuse_transaction_pooling(&self) -> Result<(), StoreError> {
        async fn backend(client: &tokio_postgres::Client) -> Result<String, StoreError> {
            let rows = client.simple_query("SELECT pg_backend_pid()").await?;
            Ok(rows
                .iter()
                .find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(String::from),
                    _ => None,
                })
                .unwrap_or_default())
        }
        // One pooled connection and one of its own: a pool of one connection
        // (`DB_POOL_SIZE=1`) cannot lend two at once.
        let first = self.client().await?;
        let second = self.dedicated_connection().await?;
        let (mut seen_first, mut seen_second) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            seen_first.push(backend(&first).await?);
            seen_second.push(backend(&second).await?);
        }
        let shared = seen_first.iter().any(|pid| seen_second.contains(pid));
        let moved = [&seen_first, &seen_second]
            .iter()
            .any(|seen| seen.iter().any(|pid| *pid != seen[0]));
        if shared || moved {
            return Err(StoreError::TransactionPooling(
                "DATABASE_URL leads through a connection pooler that shares server sessions \
                 per transaction (PgBouncer pool_mode = transaction or statement): the \
                 leader's session-level advisory locks cannot work there. Point \
                 DATABASE_URL at PostgreSQL itself, or use the pooler's session mode \
                 (pool_mode = session)"
                    .into(),
            ));
        }
        Ok(())
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
