//! A real redis-server per test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{TempDir, die_with_test, free_port, signal, wait_for};

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
        let mut redis = Self {
            dir: TempDir::new("redis"),
            port: free_port(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        redis.spawn();
        redis.wait_ready().await;
        redis
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

    async fn wait_ready(&self) {
        let port = self.port;
        wait_for(
            "Redis to answer PING",
            Duration::from_secs(20),
            || async move { ping(port).then_some(()) },
        )
        .await;
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
        self.wait_ready().await;
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
