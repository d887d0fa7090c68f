//! Keeping the snapshot fresh: `LISTEN dbx_auth_changed` on a connection of its own
//! (the schema's triggers NOTIFY on every change of organizations, keys and aircraft), a
//! full reload every `auth_refresh_secs` as a safety net, and one when the next key
//! expires; with backoff while the database is unreachable.

use std::sync::Arc;
use std::time::Duration;

use dbx_core::sync::lock;
use dbx_core::{InternalEvent, Shutdown};
use futures::StreamExt;
use tokio_postgres::AsyncMessage;

use super::{AuthCache, AuthError, AUTH_CHANNEL};
use crate::events::AuthRefreshFailed;

impl AuthCache {
    /// Keeps the cache fresh until shutdown: LISTEN for changes, full reload on a timer.
    pub async fn run_refresher(
        self: Arc<Self>,
        listen_config: dbx_pg::Connector,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) {
        tokio::spawn(self.clone().run_usage_flusher(shutdown.clone()));
        const FIRST_RETRY: Duration = Duration::from_millis(200);
        let mut backoff = FIRST_RETRY;
        loop {
            let started = tokio::time::Instant::now();
            let session = self.listen_once(&listen_config, refresh_every, shutdown.clone());
            tokio::select! {
                _ = shutdown.recv() => return,
                res = session => {
                    if let Err(e) = res {
                        AuthRefreshFailed { error: &e, retry_in: backoff }.emit();
                    }
                }
            }
            // A session that lasted was healthy: the next outage starts the backoff afresh.
            if started.elapsed() > refresh_every.max(Duration::from_secs(30)) {
                backoff = FIRST_RETRY;
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn listen_once(
        &self,
        config: &dbx_pg::Connector,
        refresh_every: Duration,
        mut shutdown: Shutdown,
    ) -> Result<(), AuthError> {
        let (client, mut connection) = config.connect_raw().await?;
        let (tx, mut notes) = tokio::sync::mpsc::channel::<()>(16);
        let driver = tokio::spawn(async move {
            let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client
            .batch_execute(&format!("LISTEN {AUTH_CHANNEL}"))
            .await?;
        // Anything changed while we were not listening is picked up by this reload.
        self.reload().await?;
        let mut timer = tokio::time::interval(refresh_every.max(Duration::from_secs(1)));
        timer.tick().await;
        loop {
            let expiry = *lock(&self.next_expiry);
            tokio::select! {
                _ = shutdown.recv() => { driver.abort(); return Ok(()); }
                n = notes.recv() => {
                    if n.is_none() { break; }
                    // Coalesce a burst of notifications into one reload.
                    while notes.try_recv().is_ok() {}
                    self.reload().await?;
                }
                _ = timer.tick() => self.reload().await?,
                // A key expires: reload so that it is refused and its connections close.
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)), if expiry.is_some() => {
                    self.reload().await?;
                }
            }
        }
        match driver.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Ok(()),
        }
    }
}
