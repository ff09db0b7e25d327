//! A TCP proxy between one replica and one dependency (Redis or PostgreSQL) that a
//! test can pause, cut and resume, in the spirit of toxiproxy.
//!
//! - **pause**: connections stay open but no byte moves in either direction, as when
//!   a network path stalls or the peer is frozen; the kernel still accepts what fits in
//!   its buffers, so the replica sees a silent peer, not an error.
//! - **cut**: every open connection is closed and new ones are closed at once, as
//!   when a route disappears or a firewall resets connections.
//! - **drop replies**: what the replica sends goes through; what comes back is
//!   forwarded, except the reads that contain a given marker (for PostgreSQL, the
//!   `UPDATE n` command tag), which are thrown away, as when a reply is lost on the
//!   way: the statement commits and its client never learns it.
//! - **resume**: bytes flow again (held ones first); new connections go through.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Open,
    Paused,
    Cut,
    /// Replies containing these bytes are dropped.
    DropReplies(&'static [u8]),
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(watch::Sender::new(Mode::Open));
        let accept = tokio::spawn(accept_loop(listener, upstream, mode.clone()));
        Self { port, mode, accept }
    }

    pub fn pause(&self) {
        self.mode.send_replace(Mode::Paused);
    }

    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Drops every read from the dependency that contains `marker`.
    pub fn drop_replies(&self, marker: &'static [u8]) {
        self.mode.send_replace(Mode::DropReplies(marker));
    }

    pub fn resume(&self) {
        self.mode.send_replace(Mode::Open);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, mode: Arc<watch::Sender<Mode>>) {
    while let Ok((client, _)) = listener.accept().await {
        if *mode.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let mode = mode.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Either direction ending (EOF, error or a cut) ends both.
            tokio::select! {
                () = pump(client_read, server_write, mode.clone(), false) => {}
                () = pump(server_read, client_write, mode, true) => {}
            }
        });
    }
}

/// Copies bytes one way while the mode allows; returns on EOF, error or a cut.
/// `replies`: this is the way back from the dependency (dropped in `DropReplies`).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    replies: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !flowing(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read just before a pause are held until the path opens again.
        if !flowing(&mut mode).await {
            return;
        }
        if let Mode::DropReplies(marker) = *mode.borrow()
            && replies
            && buffer[..n].windows(marker.len()).any(|w| w == marker)
        {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while paused; false once cut.
async fn flowing(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Open | Mode::DropReplies(_) => return true,
            Mode::Cut => return false,
            Mode::Paused => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
