//! The accept loop: serves the routes on the replica's own listener until told to stop,
//! then lets open connections finish their requests.
//!
//! warp's built-in loop logs every connection that ends in an error at ERROR level, and
//! nearly all of them are the client's doing: a probe, load balancer or client that
//! hangs up or times out mid-request. Operators alert on ERROR, so this loop serves the
//! same routes with hyper-util (as warp does inside) and logs those at debug. Failing
//! to accept at all (out of file descriptors, say) is the server's problem and is
//! logged as a warning.
//!
//! No client can hold the server: a request's headers must arrive within
//! [`HEADER_READ_TIMEOUT`] (which also closes a keep-alive connection idle that long),
//! and at most [`connection_cap`] connections are open. When a new one arrives at the
//! cap, the oldest connection with no request in progress (a slowloris' half-sent
//! headers, an idle keep-alive) is closed to make room, so health checks and the API
//! keep answering however many connections an attacker opens; only when every open
//! connection is serving a request is the new one turned away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{State, routes};

/// Pause after a failed accept, so a persistent error (EMFILE) does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a request's headers may take to arrive, counted from when the server
/// starts reading them: on a new connection, and between requests on a kept-alive one.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most connections served at once, whatever the file descriptor limit allows.
const MAX_CONNECTIONS: usize = 1024;

/// How long open connections get to finish their requests at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection cap: [`MAX_CONNECTIONS`], and at most half the process's open-file
/// limit, so PostgreSQL, Redis and the provider always have descriptors left.
pub fn connection_cap() -> usize {
    let limit = open_files_limit();
    MAX_CONNECTIONS.min(usize::try_from(limit / 2).unwrap_or(usize::MAX).max(16))
}

/// Raises the open-files soft limit to the hard one (as Go's runtime does): a
/// container's soft limit is often 1,024 while its hard limit is far higher. Returns
/// the soft limit in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// An open connection, as the accept loop sees it.
struct Open {
    accepted: Instant,
    /// Requests it is serving right now.
    serving: Arc<AtomicUsize>,
    /// Asks the connection to close (gracefully: a request in progress finishes).
    close: CancellationToken,
}

/// The open connections, by a number of their own.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Open>>,
    next: AtomicU64,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for one more connection under `cap`: closes the oldest one that
    /// serves no request. `false` when every connection is busy.
    fn make_room(&self, cap: usize) -> bool {
        let mut open = self.lock();
        if open.len() < cap {
            return true;
        }
        let idle = open
            .iter()
            .filter(|(_, c)| c.serving.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, c)| c.accepted)
            .map(|(id, _)| *id);
        match idle.and_then(|id| open.remove(&id)) {
            Some(oldest) => {
                oldest.close.cancel();
                true
            }
            None => false,
        }
    }

    fn add(&self, serving: Arc<AtomicUsize>, close: CancellationToken) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Open {
                accepted: Instant::now(),
                serving,
                close,
            },
        );
        id
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// A service that counts the requests in progress on its connection.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    serving: Arc<AtomicUsize>,
}

/// Counts a request out when its future ends, finished or dropped.
struct Serving(Arc<AtomicUsize>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Service<hyper::Request<Incoming>> for Counted<S>
where
    S: Service<hyper::Request<Incoming>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.serving.fetch_add(1, Ordering::AcqRel);
        let serving = Serving(self.serving.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let _serving = serving;
            answer.await
        })
    }
}

/// Serves the API until `stop` is cancelled, then waits (at most [`DRAIN_TIMEOUT`])
/// for open connections to finish the requests they are serving.
pub async fn serve(listener: TcpListener, state: State, stop: CancellationToken) {
    let routes = routes(state);
    let cap = connection_cap();
    let connections = Arc::new(Connections::default());
    let tasks = TaskTracker::new();
    let mut turned_away: u64 = 0;
    tracing::debug!(cap, "serving HTTP");
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "could not accept an HTTP connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        if !connections.make_room(cap) {
            turned_away += 1;
            if turned_away.is_power_of_two() {
                tracing::warn!(
                    cap,
                    turned_away,
                    "every HTTP connection is serving a request; turning new ones away"
                );
            }
            continue;
        }
        let serving = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        let id = connections.add(serving.clone(), close.clone());
        let service = Counted {
            inner: TowerToHyperService::new(warp::service(routes.clone())),
            serving: serving.clone(),
        };
        let stop = stop.clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let connections = connections.clone();
        tasks.spawn(
            async move {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let mut connection = std::pin::pin!(connection);
                let mut closing = false;
                let ended = loop {
                    tokio::select! {
                        ended = connection.as_mut() => break ended,
                        // Closed to make room. Serving no request (only this task polls
                        // the connection, so none can begin meanwhile), it is dropped at
                        // once, its socket with it; one that began a request since it
                        // was chosen finishes it first.
                        () = close.cancelled(), if !closing => {
                            if serving.load(Ordering::Acquire) == 0 {
                                break Ok(());
                            }
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                        // Shutdown: a request in progress finishes first.
                        () = stop.cancelled() => {
                            connection.as_mut().graceful_shutdown();
                            break tokio::time::timeout(DRAIN_TIMEOUT, connection.as_mut())
                                .await
                                .unwrap_or(Ok(()));
                        }
                    }
                };
                connections.remove(id);
                if let Err(err) = ended {
                    tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
                }
            }
            .in_current_span(),
        );
    }
    drop(listener);
    tasks.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_made_by_closing_the_oldest_idle_connection() {
        let connections = Connections::default();
        let busy = Arc::new(AtomicUsize::new(1));
        let (first, second, third) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        connections.add(busy.clone(), first.clone());
        connections.add(Arc::default(), second.clone());
        connections.add(Arc::default(), third.clone());
        assert!(connections.make_room(4), "under the cap");
        assert!(connections.make_room(3));
        assert!(
            !first.is_cancelled() && second.is_cancelled() && !third.is_cancelled(),
            "the oldest idle one goes, never a busy one"
        );
        assert!(connections.make_room(2) && third.is_cancelled());
        assert!(!connections.make_room(1), "only busy connections left");
        assert!(!first.is_cancelled());
    }
}
