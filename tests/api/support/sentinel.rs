//! Redis with Sentinel: a primary, a replica and three sentinels on free ports, as
//! production runs it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::redis::Redis;
use super::{TempDir, die_with_test, free_port, wait_for};

pub const SERVICE: &str = "mymaster";

pub struct Sentinels {
    pub primary: Redis,
    pub replica: Redis,
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: TempDir,
}

impl Sentinels {
    pub async fn start() -> Self {
        let primary = Redis::start().await;
        let replica_of = format!("127.0.0.1 {}", primary.port);
        let replica = Redis::start_with(&["--replicaof", &replica_of]).await;
        let dir = TempDir::new("sentinel");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let children = ports
            .iter()
            .map(|port| {
                let conf = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {SERVICE} 1000\n\
                         sentinel failover-timeout {SERVICE} 5000\n\
                         sentinel parallel-syncs {SERVICE} 1\n",
                        dir = dir.path().display(),
                        primary = primary.port,
                    ),
                )
                .unwrap();
                let log =
                    std::fs::File::create(dir.path().join(format!("sentinel-{port}.log"))).unwrap();
                // Debian's redis-sentinel package; the same binary as redis-server.
                let mut command = if which("redis-sentinel") {
                    let mut c = Command::new("redis-sentinel");
                    c.arg(&conf);
                    c
                } else {
                    let mut c = Command::new("redis-server");
                    c.arg(&conf).arg("--sentinel");
                    c
                };
                command.stdout(log).stderr(Stdio::null());
                die_with_test(&mut command);
                command.spawn().expect("start redis-sentinel")
            })
            .collect();
        let sentinels = Self {
            primary,
            replica,
            ports,
            children,
            _dir: dir,
        };
        let replica_port = sentinels.replica.port.to_string();
        wait_for(
            "the sentinels to see the primary and its replica",
            Duration::from_secs(60),
            || {
                let replica_port = replica_port.clone();
                let s = &sentinels;
                async move {
                    s.ports
                        .iter()
                        .all(|port| {
                            sentinel_cli(*port, &["SENTINEL", "replicas", SERVICE])
                                .contains(&replica_port)
                        })
                        .then_some(())
                }
            },
        )
        .await;
        sentinels
    }

    /// `REDIS_SENTINELS` for the replicas.
    pub fn addresses(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary as the first sentinel knows it.
    pub fn primary_port(&self) -> Option<u16> {
        let out = sentinel_cli(
            self.ports[0],
            &["SENTINEL", "get-master-addr-by-name", SERVICE],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
