//! A replica: the real binary running `serve` as a child process.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{binary, die_with_test, http, logged_port, signal, wait_for, wait_logged_port};

/// The log line in which `serve` names the port it bound.
const STARTING: &str = "replica starting";

pub struct Replica {
    pub name: String,
    /// The HTTP port: the first start binds port 0 and logs the port it got, so no
    /// other process can take it between a pick and the bind; restarts reuse it.
    port: std::sync::OnceLock<u16>,
    child: Option<Child>,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    /// The open-files limit (soft and hard) to start the process with, if not the
    /// test's own.
    open_files: Option<u64>,
}

impl Replica {
    /// Starts `serve` with exactly `env` (plus PATH), logging to `log_dir`.
    pub fn spawn(name: &str, log_dir: &std::path::Path, env: Vec<(String, String)>) -> Self {
        Self::spawn_limited(name, log_dir, env, None)
    }

    /// [`Replica::spawn`] in a process that may open at most `open_files` files
    /// (sockets included), soft and hard limit alike, as in a tight container.
    pub fn spawn_with_open_files(
        name: &str,
        log_dir: &std::path::Path,
        env: Vec<(String, String)>,
        open_files: u64,
    ) -> Self {
        Self::spawn_limited(name, log_dir, env, Some(open_files))
    }

    fn spawn_limited(
        name: &str,
        log_dir: &std::path::Path,
        env: Vec<(String, String)>,
        open_files: Option<u64>,
    ) -> Self {
        let mut replica = Self {
            name: name.to_string(),
            port: std::sync::OnceLock::new(),
            child: None,
            log_path: log_dir.join(format!("{name}.log")),
            env,
            open_files,
        };
        replica.start_process();
        replica
    }

    fn start_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "SERVER_PORT",
                self.port.get().copied().unwrap_or(0).to_string(),
            )
            .env("REPLICA_ID", &self.name)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_test(&mut command);
        if let Some(open_files) = self.open_files {
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: open_files,
                        rlim_max: open_files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(command.spawn().expect("start replica"));
    }

    /// Starts the same replica again (same name, port and settings).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        if self.port.get().is_none() {
            if let Some(port) = logged_port(&self.log_path, STARTING) {
                let _ = self.port.set(port);
            }
        }
        self.start_process();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("replica is running").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The port this replica serves on (waits for its first start to bind it).
    pub fn port(&self) -> u16 {
        *self
            .port
            .get_or_init(|| wait_logged_port(&self.log_path, STARTING))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    /// Waits until `/health/ready` answers 200.
    pub async fn wait_ready(&self) {
        let url = self.url("/health/ready");
        let name = self.name.clone();
        wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move {
                    let response = http().get(url).send().await.ok()?;
                    (response.status() == 200).then_some(())
                }
            },
        )
        .await;
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = http().get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = http().post(self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        http()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// One sample of `/metrics`, e.g. `dispatcher_batches_total{lane="default",outcome="complete"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// True when this replica says it leads.
    pub async fn is_leader(&self) -> bool {
        let Ok(response) = http()
            .get(self.url("/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            return false;
        };
        let body: Value = response.json().await.unwrap_or(Value::Null);
        body["leader"] == Value::Bool(true)
    }

    pub fn signal(&self, sig: libc::c_int) {
        signal(self.pid(), sig);
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM and wait (up to `timeout`) for a clean exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("replica is running");
        signal(child.id(), libc::SIGTERM);
        wait_for(&format!("{} to exit", self.name), timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("replica is running");
        wait_for(&format!("{} to exit", self.name), timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- last log lines of {} ----", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The value of `series` (name plus labels exactly as rendered) in a metrics text.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Spawns a one-shot subcommand (`migrate`, `seed`, …) with `env` and returns its
/// exit status and combined output.
pub fn run_command(args: &[&str], env: &[(String, String)]) -> (ExitStatus, String) {
    let output = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run binary");
    let mut text = String::from_utf8_lossy(&output.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}
