//! One test's world: PostgreSQL, Redis, a provider, and replicas wired to them.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;

use super::postgres::Postgres;
use super::proxy::Proxy;
use super::redis::Redis;
use super::settings::ReplicaSettings;
use super::{MockProvider, Replica, ScriptedProvider, TempDir, http, wait_for};

pub struct TestEnv {
    pub dir: TempDir,
    pub pg: Postgres,
    pub redis: Redis,
    /// Where replicas send messages.
    pub provider_url: String,
    pub mock: Option<MockProvider>,
    pub scripted: Option<ScriptedProvider>,
}

impl TestEnv {
    /// PostgreSQL, Redis and the real mock provider (with `mock_args`).
    pub async fn with_mock(mock_args: &[&str]) -> Self {
        rustls_provider();
        let (pg, redis, mock) = tokio::join!(
            Postgres::start(),
            Redis::start(),
            MockProvider::start(mock_args)
        );
        Self {
            dir: TempDir::new("env"),
            provider_url: mock.send_url(),
            pg,
            redis,
            mock: Some(mock),
            scripted: None,
        }
    }

    pub async fn start() -> Self {
        Self::with_mock(&[]).await
    }

    /// PostgreSQL, Redis and the scripted provider.
    pub async fn with_scripted() -> Self {
        rustls_provider();
        let (pg, redis, scripted) =
            tokio::join!(Postgres::start(), Redis::start(), ScriptedProvider::start());
        Self {
            dir: TempDir::new("env"),
            provider_url: scripted.send_url(),
            pg,
            redis,
            mock: None,
            scripted: Some(scripted),
        }
    }

    pub fn mock(&self) -> &MockProvider {
        self.mock
            .as_ref()
            .expect("this test uses the mock provider")
    }

    pub fn scripted(&self) -> &ScriptedProvider {
        self.scripted
            .as_ref()
            .expect("this test uses the scripted provider")
    }

    /// The fast settings wired to this test's servers: for a one-shot command or an
    /// in-process [`Config`](message_dispatcher::config::Config), which need every
    /// variable spelled out.
    pub fn settings(&self) -> ReplicaSettings {
        ReplicaSettings::fast().connected_to(self)
    }

    /// Starts a replica and waits until it is ready.
    pub async fn replica(&self, name: &str, settings: &ReplicaSettings) -> Replica {
        let replica = self.spawn_replica(name, settings);
        replica.wait_ready().await;
        replica
    }

    /// Starts a replica without waiting; connections `settings` leave unset go to this
    /// test's servers.
    pub fn spawn_replica(&self, name: &str, settings: &ReplicaSettings) -> Replica {
        let env = settings.clone().connected_to(self).to_env();
        Replica::spawn(name, self.dir.path(), env)
    }

    /// A proxy in front of this test's PostgreSQL, and the `DATABASE_URL` through it.
    pub async fn postgres_proxy(&self) -> (Proxy, String) {
        let proxy = Proxy::start(([127, 0, 0, 1], self.pg.port).into()).await;
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            proxy.port,
            super::postgres::DATABASE
        );
        (proxy, url)
    }

    /// A proxy in front of this test's Redis, and the `REDIS_URL` through it.
    pub async fn redis_proxy(&self) -> (Proxy, String) {
        let proxy = Proxy::start(([127, 0, 0, 1], self.redis.port).into()).await;
        let url = format!("redis://127.0.0.1:{}", proxy.port);
        (proxy, url)
    }

    pub async fn db(&self) -> Client {
        self.pg.client().await
    }

    /// Creates messages through the API of `replica`; returns their ids in order.
    pub async fn create_messages(&self, replica: &Replica, contents: &[&str]) -> Vec<i64> {
        let body: Vec<Value> = contents
            .iter()
            .enumerate()
            .map(|(i, content)| json!({"phone_number": format!("+9055500{:05}", i), "content": content}))
            .collect();
        let response = http()
            .post(replica.url("/api/messages"))
            .json(&body)
            .send()
            .await
            .expect("POST /api/messages");
        assert_eq!(response.status(), 201, "creating messages");
        let created: Vec<Value> = response.json().await.unwrap();
        created.iter().map(|m| m["id"].as_i64().unwrap()).collect()
    }

    /// Creates one message with an API token.
    pub async fn create_messages_with_token(&self, replica: &Replica, token: &str) {
        let response = http()
            .post(replica.url("/api/messages"))
            .bearer_auth(token)
            .json(&json!({"phone_number": "+905550000001", "content": "secret test"}))
            .send()
            .await
            .expect("POST /api/messages");
        assert_eq!(response.status(), 201);
    }

    /// Inserts `count` messages straight into the table; returns their ids in order.
    pub async fn insert_messages(&self, count: usize) -> Vec<i64> {
        let db = self.db().await;
        let rows = db
            .query(
                "INSERT INTO messages (phone_number, content)
                 SELECT '+9055500' || lpad(s::text, 5, '0'), 'message ' || s
                 FROM generate_series(1, $1::int) s ORDER BY s RETURNING id",
                &[&(count as i32)],
            )
            .await
            .expect("insert messages");
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort();
        ids
    }

    /// What the mock provider received, each delivery with the id of the message
    /// its key belongs to.
    pub async fn deliveries(&self) -> Vec<super::provider::Delivery> {
        let ids: std::collections::HashMap<String, i64> = self
            .db()
            .await
            .query(
                "SELECT coalesce(delivery_key::text, id::text), id FROM messages",
                &[],
            )
            .await
            .expect("delivery keys")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let mut deliveries = self.mock().deliveries().await;
        for delivery in &mut deliveries {
            delivery.id = ids.get(&delivery.key).copied().unwrap_or(-1);
        }
        deliveries
    }

    /// The delivery keys (the `Idempotency-Key` the provider sees) of `ids`, in order.
    pub async fn delivery_keys(&self, ids: &[i64]) -> Vec<String> {
        let db = self.db().await;
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            let row = db
                .query_one(
                    "SELECT coalesce(delivery_key::text, id::text) FROM messages WHERE id = $1",
                    &[id],
                )
                .await
                .expect("a message's delivery key");
            keys.push(row.get(0));
        }
        keys
    }

    /// The delivery key of message `id`.
    pub async fn delivery_key(&self, id: i64) -> String {
        self.delivery_keys(&[id]).await.remove(0)
    }

    /// Status counts from the table.
    pub async fn count(&self, status: &str) -> i64 {
        self.db()
            .await
            .query_one(
                "SELECT count(*) FROM messages WHERE status = $1",
                &[&status],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until no message is pending or sending.
    /// Messages `pending` or `sending`, in one statement: counted in two, a row moving
    /// from `sending` back to `pending` (a rescue, a retry) between them would be missed.
    pub async fn open_count(&self) -> i64 {
        self.db()
            .await
            .query_one(
                "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn wait_drained(&self, timeout: Duration) {
        wait_for("the queue to drain", timeout, || async {
            (self.open_count().await == 0).then_some(())
        })
        .await;
    }
}

fn rustls_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
