//! A real redis-server per test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{START_ATTEMPTS, TempDir, die_with_test, free_port, ready_or_exited, signal, wait_for};

pub struct Redis {
    dir: TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Extra server arguments (e.g. `--replicaof`).
    args: Vec<String>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with extra arguments, e.g. `["--replicaof", "127.0.0.1 6379"]`.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_on(free_port(), args).await
    }

    /// [`Redis::start_with`], trying `port` first: as the PostgreSQL harness does, a
    /// port taken between `free_port` and the bind (the server then exits at once) is
    /// replaced by another, a few times over.
    pub async fn start_on(port: u16, args: &[&str]) -> Self {
        let mut redis = Self {
            dir: TempDir::new("redis"),
            port,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        for attempt in 1.. {
            redis.spawn();
            if redis.ready_or_exited().await {
                break;
            }
            assert!(
                attempt < START_ATTEMPTS,
                "redis-server exited at start on {START_ATTEMPTS} ports; its log:\n{}",
                redis.log()
            );
            redis.port = free_port();
        }
        redis
    }

    /// Waits (20 s at most) until this server answers PING (true), or until its
    /// process has exited (false). The answer counts only once its own log says it
    /// listens, so another test's server on the same port is never taken for it.
    async fn ready_or_exited(&mut self) -> bool {
        let port = self.port;
        let log = self.dir.path().join("redis.log");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        ready_or_exited(
            &format!("Redis on port {port} to answer PING"),
            Duration::from_secs(20),
            &mut self.child,
            || {
                let ready = read_log().contains("Ready to accept connections") && ping(port);
                async move { ready }
            },
            read_log,
        )
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL: the server is gone at once, with whatever it had not replicated.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .unwrap();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(log)
            .stderr(Stdio::null());
        die_with_test(&mut command);
        self.child = Some(
            command
                .spawn()
                .expect("start redis-server (apt-get install redis-server)"),
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM; nothing persisted, so every key is lost).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            wait_for("Redis to stop", Duration::from_secs(20), || {
                let exited = child.try_wait().ok().flatten().is_some();
                async move { exited.then_some(()) }
            })
            .await;
        }
    }

    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "Redis is still running");
        self.spawn();
        assert!(
            self.ready_or_exited().await,
            "redis-server exited at restart; its log:\n{}",
            self.log()
        );
    }

    /// Runs a command with redis-cli and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A port taken between `free_port` and the bind no longer fails the test that drew it.
#[tokio::test]
async fn a_taken_port_moves_the_server_to_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let redis = Redis::start_on(port, &[]).await;
    assert_ne!(redis.port, port);
    assert!(ping(redis.port));
}
