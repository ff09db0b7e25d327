//! The migration runner: numbered files from `sql/`, embedded in the binary.
//!
//! One transaction per file, recorded in `schema_migrations` with its SHA-256, under a
//! session advisory lock so replicas that start together apply each file once. A file
//! that was applied and has since changed is refused: the schema would no longer match
//! the file, and guessing is worse than stopping.

use tokio_postgres::Client;

use super::{Store, StoreError};

/// One embedded migration file.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Add a file to `sql/` and a line here.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_messages.sql",
        sql: include_str!("../../sql/0001_messages.sql"),
    },
    Migration {
        version: 2,
        name: "0002_control.sql",
        sql: include_str!("../../sql/0002_control.sql"),
    },
    Migration {
        version: 3,
        name: "0003_batch_open.sql",
        sql: include_str!("../../sql/0003_batch_open.sql"),
    },
    Migration {
        version: 4,
        name: "0004_fenced_sends.sql",
        sql: include_str!("../../sql/0004_fenced_sends.sql"),
    },
    Migration {
        version: 5,
        name: "0005_leader_session.sql",
        sql: include_str!("../../sql/0005_leader_session.sql"),
    },
    Migration {
        version: 6,
        name: "0006_message_lifecycle.sql",
        sql: include_str!("../../sql/0006_message_lifecycle.sql"),
    },
    Migration {
        version: 7,
        name: "0007_message_activity.sql",
        sql: include_str!("../../sql/0007_message_activity.sql"),
    },
    Migration {
        version: 8,
        name: "0008_status_index_without_sending.sql",
        sql: include_str!("../../sql/0008_status_index_without_sending.sql"),
    },
    Migration {
        version: 9,
        name: "0009_format_rules_as_domains.sql",
        sql: include_str!("../../sql/0009_format_rules_as_domains.sql"),
    },
    Migration {
        version: 10,
        name: "0010_batch_epoch.sql",
        sql: include_str!("../../sql/0010_batch_epoch.sql"),
    },
    Migration {
        version: 11,
        name: "0011_delivery_key.sql",
        sql: include_str!("../../sql/0011_delivery_key.sql"),
    },
    Migration {
        version: 12,
        name: "0012_e164_phone_numbers.sql",
        sql: include_str!("../../sql/0012_e164_phone_numbers.sql"),
    },
    Migration {
        version: 13,
        name: "0013_dispatch_pause_and_override_provenance.sql",
        sql: include_str!("../../sql/0013_dispatch_pause_and_override_provenance.sql"),
    },
    Migration {
        version: 14,
        name: "0014_lanes.sql",
        sql: include_str!("../../sql/0014_lanes.sql"),
    },
    Migration {
        version: 15,
        name: "0015_providers.sql",
        sql: include_str!("../../sql/0015_providers.sql"),
    },
    Migration {
        version: 16,
        name: "0016_retention.sql",
        sql: include_str!("../../sql/0016_retention.sql"),
    },
    Migration {
        version: 17,
        name: "0017_opt_outs.sql",
        sql: include_str!("../../sql/0017_opt_outs.sql"),
    },
    Migration {
        version: 18,
        name: "0018_message_category.sql",
        sql: include_str!("../../sql/0018_message_category.sql"),
    },
    Migration {
        version: 19,
        name: "0019_enqueue_function.sql",
        sql: include_str!("../../sql/0019_enqueue_function.sql"),
    },
    Migration {
        version: 20,
        name: "0020_status_webhooks.sql",
        sql: include_str!("../../sql/0020_status_webhooks.sql"),
    },
    Migration {
        version: 21,
        name: "0021_spend.sql",
        sql: include_str!("../../sql/0021_spend.sql"),
    },
    Migration {
        version: 22,
        name: "0022_one_undelivered_event.sql",
        sql: include_str!("../../sql/0022_one_undelivered_event.sql"),
    },
];

/// Advisory lock key shared by every replica ("msgdisp" in ASCII).
const MIGRATION_LOCK: i64 = 0x006d_7367_6469_7370;

const CREATE_TABLE: &str = "
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<&'static str>,
    pub already_applied: usize,
}

pub fn checksum(sql: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sql.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

impl Store {
    /// Applies every pending migration. Safe to run from many replicas at once.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let mut client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let result = apply_pending(&mut client).await;
        // Unlock even on failure; if the connection is gone the lock went with it.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        result
    }

    /// True when every embedded migration has been applied (readiness needs this).
    pub async fn schema_is_current(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0
                        ELSE (SELECT coalesce(max(version), 0) FROM schema_migrations) END",
                &[],
            )
            .await?;
        Ok(row.get::<_, i32>(0) >= latest_version())
    }
}

async fn apply_pending(client: &mut Client) -> Result<MigrationReport, StoreError> {
    client.batch_execute(CREATE_TABLE).await?;
    let applied: Vec<(i32, String, String)> = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();

    let mut report = MigrationReport::default();
    for migration in MIGRATIONS {
        let sum = checksum(migration.sql);
        if let Some((_, name, stored)) = applied.iter().find(|(v, ..)| *v == migration.version) {
            if *stored != sum {
                return Err(StoreError::MigrationChanged(format!(
                    "{} was applied as {name} with checksum {stored}, but the embedded file now has {sum}; \
                     restore the original file and add a new migration instead",
                    migration.name
                )));
            }
            report.already_applied += 1;
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql)
            .await
            .map_err(|err| StoreError::Migration(format!("{} failed: {err}", migration.name)))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &sum],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = migration.name, "applied migration");
        report.applied.push(migration.name);
    }
    if let Some((version, name, _)) = applied.iter().find(|(v, ..)| *v > latest_version()) {
        tracing::warn!(
            version,
            name,
            "database has a migration this binary does not know; is an older version running?"
        );
    }
    Ok(report)
}
