//! The accept loop: serves the routes on the replica's own listener until told to stop,
//! then lets open connections finish their requests.
//!
//! warp's built-in loop logs every connection that ends in an error at ERROR level, and
//! nearly all of them are the client's doing: a probe, load balancer or client that
//! hangs up or times out mid-request. Operators alert on ERROR, so this loop serves the
//! same routes with hyper-util (as warp does inside) and logs those at debug. Failing
//! to accept at all (out of file descriptors, say) is the server's problem and is
//! logged as a warning.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{State, routes};

/// Pause after a failed accept, so a persistent error (EMFILE) does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves the API until `stop` is cancelled, then waits for open connections to
/// finish the requests they are serving.
pub async fn serve(listener: TcpListener, state: State, stop: CancellationToken) {
    let routes = routes(state);
    let graceful = GracefulShutdown::new();
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
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(
            async move {
                if let Err(err) = connection.await {
                    tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
                }
            }
            .in_current_span(),
        );
    }
    drop(listener);
    graceful.shutdown().await;
}
