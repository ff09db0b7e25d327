//! A real PgBouncer (Debian's `pgbouncer`) in front of a test's PostgreSQL, in the pool
//! mode a test names. PgBouncer refuses to run as root, so it runs as the `postgres`
//! user, like the server.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::postgres::{DATABASE, as_server_user, chown_to_server_user};
use super::{TempDir, die_with_test, free_port, signal, wait_for};

pub struct PgBouncer {
    dir: TempDir,
    pub port: u16,
    child: Child,
}

impl PgBouncer {
    /// Starts PgBouncer on a free port in front of PostgreSQL on `pg_port`, with
    /// `pool_mode` (`session`, `transaction` or `statement`).
    pub async fn start(pg_port: u16, pool_mode: &str) -> Self {
        let dir = TempDir::new("pgbouncer");
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {DATABASE} = host=127.0.0.1 port={pg_port} dbname={DATABASE} user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = 60\n\
                 max_client_conn = 400\n\
                 logfile = {log}\n",
                log = dir.path().join("pgbouncer.log").display()
            ),
        )
        .expect("write pgbouncer.ini");
        chown_to_server_user(dir.path());
        let child = as_server_user(die_with_test(
            Command::new("pgbouncer")
                .arg(&ini)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        ))
        .spawn()
        .expect("start pgbouncer (apt-get install pgbouncer)");
        wait_for(
            "PgBouncer to accept connections",
            Duration::from_secs(20),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Self { dir, port, child }
    }

    /// The database through PgBouncer.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}
