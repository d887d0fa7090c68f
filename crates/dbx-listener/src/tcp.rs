//! The TCP and TLS servers: accept, enforce the connection limit with a semaphore,
//! and run a [`Handler`] per connection. At the limit a new connection is not left
//! hanging: it gets `error too_many_connections` and is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use dbx_core::metrics as m;
use dbx_core::{RejectCode, Shutdown};

use crate::connection::{Connection, Handler, Shared};

/// Accepts connections on `listener` until `shutdown`; connection tasks go to `tracker`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Shared,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    mut shutdown: Shutdown,
) {
    let transport: &'static str = if tls.is_some() { "tls" } else { "tcp" };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, transport, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!(m::CONNECTIONS_REFUSED_TOTAL).increment(1);
                tracing::warn!(%peer, transport, "connection limit reached; refusing");
                let shared = shared.clone();
                let tls = tls.clone();
                tracker
                    .spawn(async move { refuse(stream, tls, shared.config.max_frame_bytes).await });
                continue;
            }
        };
        metrics::counter!(m::CONNECTIONS_TOTAL, "transport" => transport).increment(1);
        let shared = shared.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let gauge = metrics::gauge!(m::CONNECTIONS_OPEN, "transport" => transport);
            gauge.increment(1.0);
            run_one(stream, peer, tls, shared, transport, shutdown).await;
            gauge.decrement(1.0);
            drop(permit);
        });
    }
}

async fn run_one(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Shared,
    transport: &'static str,
    shutdown: Shutdown,
) {
    match tls {
        None => {
            Handler::new(stream, shared, peer, transport, shutdown)
                .run()
                .await
        }
        Some(acceptor) => {
            let timeout = shared.config.handshake_timeout();
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    Handler::new(s, shared, peer, transport, shutdown)
                        .run()
                        .await
                }
                Ok(Err(e)) => {
                    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "tls").increment(1);
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "handshake_timeout")
                        .increment(1);
                    tracing::info!(%peer, "TLS handshake timed out");
                }
            }
        }
    }
}

async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, max_frame: usize) {
    let msg = "the server is at its connection limit; retry with backoff";
    match tls {
        None => {
            Connection::new(stream, max_frame)
                .close_with_error(RejectCode::TooManyConnections, msg)
                .await
        }
        Some(acceptor) => {
            let accepted =
                tokio::time::timeout(std::time::Duration::from_secs(2), acceptor.accept(stream))
                    .await;
            if let Ok(Ok(s)) = accepted {
                Connection::new(s, max_frame)
                    .close_with_error(RejectCode::TooManyConnections, msg)
                    .await
            }
        }
    }
}

/// Builds a TLS acceptor from PEM files.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "listener.tls_cert {}: not a PEM certificate chain: {e}",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "listener.tls_cert {}: no certificate found",
            cert.display()
        ));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("listener.tls_key {}: {e}", key.display()))?
        .ok_or_else(|| format!("listener.tls_key {}: no private key found", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("listener.tls_cert/tls_key do not match or are unusable: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
