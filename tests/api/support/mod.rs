//! The test harness: real PostgreSQL and Redis servers on free ports, the real binary
//! as replica processes, and real HTTP providers (the mock-provider subcommand, or a
//! scripted in-process server for exact answers).
//!
//! Every test gets its own PostgreSQL cluster (copied from a template made once per
//! machine), its own Redis and its own provider, so tests share nothing and can stop,
//! pause or kill any of them. Child processes die with the test (PR_SET_PDEATHSIG).

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod cluster;
pub mod env;
pub mod pgbouncer;
pub mod postgres;
pub mod provider;
pub mod proxy;
pub mod redis;
pub mod replica;
pub mod sentinel;
pub mod settings;
pub mod tls;

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use env::TestEnv;
pub use provider::{MockProvider, ScriptedProvider};
pub use replica::Replica;
pub use settings::{ReplicaSettings, ms, secs};

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_message-dispatcher")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The port in the last JSON log line of `log` whose message is `message` (a process
/// started on port 0 logs the port the kernel gave it), if there is one yet.
pub fn logged_port(log: &Path, message: &str) -> Option<u16> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["message"] == message)
        .and_then(|entry| entry["port"].as_u64())
        .and_then(|port| u16::try_from(port).ok())
        .filter(|&port| port != 0)
}

/// [`logged_port`], waiting for the line (60 s at most: a process that has not bound
/// its port by then is broken, and the panic shows its log).
pub fn wait_logged_port(log: &Path, message: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(port) = logged_port(log, message) {
            return port;
        }
        assert!(
            Instant::now() < deadline,
            "no \"{message}\" line with a port within 60 s; the log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes `command`'s process die when the test's thread exits, even on a crash.
pub fn die_with_test(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "md-test-{label}-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many ports a test server's start tries. A port `free_port` found free can be
/// taken before the server binds it, by another test's outgoing connection (those take
/// their local ports from the same ephemeral range); the server then exits at once.
pub const START_ATTEMPTS: usize = 5;

/// Polls until `ready` says the server answers (true), or until the server's process
/// `child` has exited (false); after `timeout`, panics with `what` and the server's
/// `log`.
pub async fn ready_or_exited<Fut>(
    what: &str,
    timeout: Duration,
    child: &mut Option<Child>,
    mut ready: impl FnMut() -> Fut,
    log: impl Fn() -> String,
) -> bool
where
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let exited = child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_some());
        if exited {
            return false;
        }
        if ready().await {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A shared HTTP client for talking to replicas and providers.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Sends a signal to a process.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid we spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}
