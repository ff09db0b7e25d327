//! A real PostgreSQL server per test, started from a template cluster.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{START_ATTEMPTS, TempDir, die_with_test, free_port, ready_or_exited, signal, wait_for};

pub const DATABASE: &str = "dispatcher";

pub struct Postgres {
    dir: TempDir,
    pub port: u16,
    child: Option<Child>,
    /// `name=value` settings given after the test defaults (which they override).
    settings: Vec<String>,
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// The uid/gid to run PostgreSQL as: `postgres` when we are root (it refuses root).
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage or null.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "running as root needs a `postgres` user");
    // SAFETY: non-null entry from getpwnam.
    unsafe { Some(((*entry).pw_uid, (*entry).pw_gid)) }
}

pub fn as_server_user(command: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    command
}

pub fn chown_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success());
    }
}

/// An initdb'd cluster, made once per machine and copied for each test.
fn template() -> PathBuf {
    let root = std::env::temp_dir().join("md-test-pg-template");
    let ready = root.join("ready");
    if ready.exists() {
        return root.join("data");
    }
    std::fs::create_dir_all(&root).unwrap();
    let lock_path = root.join("lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    // SAFETY: flock on a file we own; released when `lock` is dropped.
    unsafe {
        libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX);
    }
    if !ready.exists() {
        let data = root.join("data");
        let _ = std::fs::remove_dir_all(&data);
        chown_to_server_user(&root);
        let output = as_server_user(Command::new(bin_dir().join("initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]))
        .output()
        .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&ready, b"").unwrap();
    }
    drop(lock);
    root.join("data")
}

impl Postgres {
    /// A fresh cluster with an empty `dispatcher` database.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// [`Postgres::start`], trying `port` first and other free ports after it.
    pub async fn start_on(port: u16) -> Self {
        Self::start_with_on(port, &[]).await
    }

    /// A server with `settings` (`name=value`) over the test defaults, such as
    /// `synchronous_commit=on` for a primary whose commits wait for its standby.
    pub async fn start_with(settings: &[&str]) -> Self {
        Self::start_with_on(free_port(), settings).await
    }

    async fn start_with_on(port: u16, settings: &[&str]) -> Self {
        let dir = TempDir::new("pg");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(dir.path().join("data"))
            .status()
            .expect("copy template");
        assert!(status.success());
        chown_to_server_user(dir.path());
        let mut pg = Self {
            dir,
            port,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        pg.start_until_bound().await;
        pg.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .expect("create database");
        pg
    }

    /// A streaming-replication standby of `primary`, made with `pg_basebackup -R` and
    /// named `application_name` (what `synchronous_standby_names` lists), started hot.
    pub async fn standby_of(primary: &Postgres, application_name: &str) -> Self {
        let dir = TempDir::new("pg-standby");
        chown_to_server_user(dir.path());
        let data = dir.path().join("data");
        let output = as_server_user(Command::new(bin_dir().join("pg_basebackup")).args([
            "-d",
            &format!(
                "host=127.0.0.1 port={} user=postgres application_name={application_name}",
                primary.port
            ),
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            // An immediate checkpoint: the default spreads it over minutes.
            "--checkpoint=fast",
            "--no-sync",
        ]))
        .output()
        .expect("run pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut pg = Self {
            dir,
            port: free_port(),
            child: None,
            settings: Vec::new(),
        };
        pg.start_until_bound().await;
        pg
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub async fn promote(&self) {
        let output = as_server_user(Command::new(bin_dir().join("pg_ctl")).args([
            "promote",
            "-w",
            "-D",
            self.data_dir().to_str().unwrap(),
        ]))
        .output()
        .expect("run pg_ctl promote");
        assert!(
            output.status.success(),
            "pg_ctl promote failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        wait_for(
            "the promoted server to accept writes",
            Duration::from_secs(30),
            || async {
                let client = self.admin().await;
                let row = client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .ok()?;
                (!row.get::<_, bool>(0)).then_some(())
            },
        )
        .await;
    }

    /// SIGKILL: the server is gone at once, as when its machine dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Spawns the server, moving to another port if its own was taken.
    async fn start_until_bound(&mut self) {
        let pg = self;
        for attempt in 1.. {
            pg.spawn();
            if pg.ready_or_exited().await {
                break;
            }
            assert!(
                attempt < START_ATTEMPTS,
                "PostgreSQL exited at start on {START_ATTEMPTS} ports; its log:\n{}",
                pg.log()
            );
            pg.port = free_port();
        }
    }

    /// Turns TLS on with `certificate` (connections may still come without it) and
    /// restarts the server.
    pub async fn enable_ssl(&mut self, certificate: &super::tls::SelfSigned) {
        let data = self.data_dir();
        std::fs::copy(&certificate.cert, data.join("server.crt")).unwrap();
        std::fs::copy(&certificate.key, data.join("server.key")).unwrap();
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
        chown_to_server_user(&data);
        self.restart().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let data = self.data_dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        let mut command = Command::new(bin_dir().join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=200",
            ])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(log);
        as_server_user(&mut command);
        die_with_test(&mut command);
        self.child = Some(command.spawn().expect("start postgres"));
    }

    async fn wait_ready(&mut self) {
        if !self.ready_or_exited().await {
            panic!("PostgreSQL exited at start; its log:\n{}", self.log());
        }
    }

    /// Waits (30 s at most) until this server, and not another one on the same port,
    /// accepts connections (true), or until its process has exited (false).
    async fn ready_or_exited(&mut self) -> bool {
        let (port, data) = (self.port, self.data_dir());
        let log = self.dir.path().join("postgres.log");
        ready_or_exited(
            &format!("PostgreSQL on port {port} to accept connections"),
            Duration::from_secs(30),
            &mut self.child,
            || serves(port, data.clone()),
            || std::fs::read_to_string(&log).unwrap_or_default(),
        )
        .await
    }

    /// A connection to the `postgres` database.
    pub async fn admin(&self) -> Client {
        connect(self.port, "postgres").await
    }

    /// A connection to the test database.
    pub async fn client(&self) -> Client {
        connect(self.port, DATABASE).await
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGINT);
            wait_for("PostgreSQL to stop", Duration::from_secs(30), || {
                let exited = child.try_wait().ok().flatten().is_some();
                async move { exited.then_some(()) }
            })
            .await;
        }
    }

    /// Starts the stopped server again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn();
        self.wait_ready().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGQUIT);
            let _ = child.wait();
        }
    }
}

fn conninfo(port: u16, database: &str) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname={database} connect_timeout=5")
}

async fn connect(port: u16, database: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&conninfo(port, database), NoTls)
        .await
        .expect("connect to test PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Whether the server on `port` is the one with the data directory `data`. Bounded:
/// whatever holds the port may accept and never answer.
async fn serves(port: u16, data: PathBuf) -> bool {
    let probe = async {
        let (client, connection) = tokio_postgres::connect(&conninfo(port, "postgres"), NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .ok()?;
        Some(PathBuf::from(row.get::<_, String>(0)))
    };
    let serving = tokio::time::timeout(Duration::from_secs(1), probe).await;
    serving.ok().flatten().is_some_and(|dir| dir == data)
}

/// A port taken between `free_port` and the server's bind (see [`START_ATTEMPTS`])
/// no longer fails the test that drew it: the server comes up on another port.
#[tokio::test]
async fn a_taken_port_moves_the_server_to_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let pg = Postgres::start_on(port).await;
    assert_ne!(pg.port, port);
    pg.client().await.simple_query("SELECT 1").await.unwrap();
}
