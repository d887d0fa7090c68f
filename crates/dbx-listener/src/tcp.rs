//! The TCP and TLS servers: accept, take the connection's slots ([`crate::slots`]),
//! and run a [`Handler`] per connection.
//!
//! A socket that finds a slot limit reached is refused right in the accept loop,
//! without spawning a task for it and, on the TLS port, without a TLS handshake: a TLS
//! socket is simply closed; a plain one gets a best-effort `error too_many_connections`
//! written without waiting (a fresh socket's send buffer takes it whole), and is then
//! closed by one of at most [`LINGERING_REFUSALS`] short tasks that drain its input for
//! up to a second (so that the peer reads the error rather than a reset), or at once
//! when they are all busy. The TLS handshake of an admitted socket and its `hello`
//! share one `handshake_timeout`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::events::{ConnectionRefused, TlsHandshakeFailed};
use crate::metrics as m;
use dbx_core::ConfigError;
use dbx_core::{InternalEvent, RejectCode, Shutdown};
use dbx_proto::ServerMessage;

use crate::connection::{Handler, Shared};
use crate::slots::{Admitted, Refusal, Slots};

/// Refused plain-TCP sockets drained at once before they are closed; more are closed
/// straight away.
pub const LINGERING_REFUSALS: usize = 64;

/// Accepts connections on `listener` until `shutdown`; connection tasks go to `tracker`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Shared,
    slots: Slots,
    tracker: TaskTracker,
    mut shutdown: Shutdown,
) {
    let transport: &'static str = if tls.is_some() { "tls" } else { "tcp" };
    let lingering = Arc::new(Semaphore::new(LINGERING_REFUSALS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, transport, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match slots.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                refuse(stream, peer, tls.is_some(), why, &lingering, &tracker);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        m::connections_accepted(transport).increment(1);
        let shared = shared.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let gauge = m::connections_open(transport);
            gauge.increment(1.0);
            run_one(stream, peer, tls, shared, transport, shutdown, admitted).await;
            gauge.decrement(1.0);
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
    admitted: Admitted,
) {
    // One deadline for the TLS handshake and the hello together.
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout();
    let Some(acceptor) = tls else {
        return Handler::new(stream, shared, peer, transport, shutdown)
            .run(deadline, admitted)
            .await;
    };
    // The TLS path lives in a box of its own: a task's future is as large as its largest
    // path, and the handshake and TLS stream state would otherwise be paid by every
    // plaintext connection too.
    Box::pin(async move {
        let mut shutdown = shutdown;
        let accepted = tokio::select! {
            r = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => r,
            _ = shutdown.recv() => return,
        };
        let reason = match accepted {
            Ok(Ok(s)) => {
                return Handler::new(s, shared, peer, transport, shutdown)
                    .run(deadline, admitted)
                    .await
            }
            Ok(Err(_)) => "tls",
            Err(_) => "handshake_timeout",
        };
        TlsHandshakeFailed { peer, reason }.emit();
    })
    .await
}

/// The `error` frame answering a refusal, encoded once per reason.
fn refusal_frame(why: Refusal) -> &'static [u8] {
    static FRAMES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    let frames = FRAMES.get_or_init(|| {
        [
            Refusal::MaxConnections,
            Refusal::MaxPendingHandshakes,
            Refusal::MaxPendingPerIp,
        ]
        .map(|r| {
            let mut b = BytesMut::new();
            dbx_proto::encode_server(
                &ServerMessage::Error {
                    code: RejectCode::TooManyConnections,
                    msg: r.message().into(),
                },
                &mut b,
            );
            b.to_vec()
        })
    });
    match why {
        Refusal::MaxConnections => &frames[0],
        Refusal::MaxPendingHandshakes => &frames[1],
        Refusal::MaxPendingPerIp => &frames[2],
    }
}

/// Refuses a socket from the accept loop without waiting on it (see the module docs).
fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    why: Refusal,
    lingering: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    ConnectionRefused { peer, why }.emit();
    if tls {
        return;
    }
    let _ = stream.try_write(refusal_frame(why));
    let Ok(slot) = lingering.clone().try_acquire_owned() else {
        return;
    };
    tracker.spawn(async move {
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
            let mut sink = [0u8; 1024];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        drop(slot);
    });
}

/// Builds a TLS acceptor from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, ConfigError> {
    let read = |name: &str, p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| ConfigError::new(name, format!("cannot read {}: {e}", p.display())))
    };
    let cert_pem = read("tls_cert", cert)?;
    let key_pem = read("tls_key", key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ConfigError::new(
                "tls_cert",
                format!("{}: not a PEM certificate chain: {e}", cert.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            "tls_cert",
            format!("{}: no certificate found", cert.display()),
        ));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| ConfigError::new("tls_key", format!("{}: {e}", key.display())))?
        .ok_or_else(|| {
            ConfigError::new(
                "tls_key",
                format!("{}: no private key found", key.display()),
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("tls_cert", format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            ConfigError::new(
                "tls_key",
                format!("does not match listener.tls_cert or is unusable: {e}"),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ListenerConfig;

    /// A connection's task lives as long as the connection, so 10 000 gateways hold
    /// its future 10 000 times: at 7 KiB (a lingering read's 4 KiB array and the
    /// aircraft lookup inlined) it was a third of their memory at rest. An array or a
    /// rare path awaited inline makes it grow without a sound; this bounds it.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let shared = Shared::for_test(ListenerConfig::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let admitted = Slots::new(4, 4, 4).admit(peer.ip()).unwrap();
        let (_trigger, shutdown) = dbx_core::ShutdownTrigger::new();
        let task = run_one(stream, peer, None, shared, "tcp", shutdown, admitted);
        let size = std::mem::size_of_val(&task);
        // 3.3 KiB in debug and release builds alike (6.6 KiB before).
        assert!(size <= 4 * 1024, "a connection's task is {size} bytes");
    }
}
