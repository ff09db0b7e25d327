//! A real PostgreSQL server per test, started from a template cluster.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{TempDir, die_with_test, free_port, signal, wait_for};

pub const DATABASE: &str = "dispatcher";

pub struct Postgres {
    dir: TempDir,
    pub port: u16,
    child: Option<Child>,
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

fn as_server_user(command: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    command
}

fn chown_to_server_user(path: &Path) {
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
            port: free_port(),
            child: None,
        };
        pg.spawn();
        pg.wait_ready().await;
        pg.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .expect("create database");
        pg
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
            .stdout(Stdio::null())
            .stderr(log);
        as_server_user(&mut command);
        die_with_test(&mut command);
        self.child = Some(command.spawn().expect("start postgres"));
    }

    async fn wait_ready(&self) {
        let port = self.port;
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || async move {
                tokio_postgres::connect(&conninfo(port, "postgres"), NoTls)
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
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
