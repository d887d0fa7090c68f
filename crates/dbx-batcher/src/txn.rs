//! The batcher's transactions, owned by hand so that `BEGIN` and `COMMIT` travel with the
//! statements beside them.
//!
//! tokio-postgres pipelines requests that are polled together: they leave in order on
//! the connection and the server answers them in order, so two statements cost one
//! round trip instead of two. `deadpool_postgres::Transaction` sends `BEGIN` and `COMMIT`
//! on their own and waits for each. A flush had seven round trips, `BEGIN`, the session
//! upsert, the COPY statement's parse, its start, its data, the statistics `UPDATE` and
//! `COMMIT`, and on a busy machine every wait is a chance to be descheduled: the stage
//! histograms showed each of them in the ack tail (benches/RESULTS.md, "Where an ack's
//! time goes"). [`FlushTx::begin_query`] sends `BEGIN`, the first query and the parse of
//! the COPY statement together, [`FlushTx::execute_and_commit`] sends the last
//! statement with `COMMIT`, and [`FlushTx::copy_execute_commit`] sends both behind the
//! COPY's data. The server runs the same statements in the same order as before; only
//! the client waits less.
//!
//! Why the order holds: each request is queued on the connection when its future is
//! first polled (tokio-postgres encodes and sends before its first await), and
//! `futures::join!` polls its futures in the order written. Every pipelined request is
//! given a [`Statement`] or a query text, never a text to prepare on the way, which
//! would add a wait in front of the send (the test
//! `pipelined_statements_run_inside_the_transaction` pins this down against a server).
//!
//! A pipelined `COMMIT` behind a failed statement ends the transaction as a rollback
//! (the server answers `ROLLBACK`); the statement's error is what the caller gets. A
//! transaction that did not commit is rolled back by [`FlushTx::rollback`] before its
//! connection goes back to the pool; one dropped without either (a cancelled future)
//! takes its connection out of the pool and closes it, so a connection never comes
//! back inside a transaction.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use deadpool_postgres::{ClientWrapper, Object};
use futures::SinkExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row, Statement};

/// When the statements of [`FlushTx::copy_execute_commit`] were answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answered {
    /// The COPY.
    pub(crate) copy: Instant,
    /// The statement after it.
    pub(crate) execute: Instant,
}

/// A transaction on a pooled connection (see the module doc).
pub(crate) struct FlushTx {
    client: Option<Object>,
    /// A transaction may be open on the connection: set from the `BEGIN` on, cleared
    /// when a `COMMIT` or `ROLLBACK` was answered.
    open: AtomicBool,
}

impl FlushTx {
    /// A transaction to begin on `client`: nothing is sent until the first statement.
    pub(crate) fn new(client: Object) -> Self {
        FlushTx {
            client: Some(client),
            open: AtomicBool::new(false),
        }
    }

    fn client(&self) -> &ClientWrapper {
        self.client
            .as_ref()
            .expect("the client is only taken on drop")
    }

    /// `BEGIN` alone.
    pub(crate) async fn begin(&self) -> Result<(), Error> {
        self.open.store(true, Ordering::Relaxed);
        self.client().batch_execute("BEGIN").await
    }

    /// `BEGIN`, then `stmt` with `params`, then (when given) the parse of `prepare`, in
    /// one round trip: the rows of `stmt` and the prepared statement. Errors are reported
    /// in the order the statements ran.
    pub(crate) async fn begin_query(
        &self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
        prepare: Option<&str>,
    ) -> Result<(Vec<Row>, Option<Statement>), Error> {
        self.open.store(true, Ordering::Relaxed);
        let c = self.client();
        let prepared = async {
            match prepare {
                Some(sql) => c.prepare(sql).await.map(Some),
                None => Ok(None),
            }
        };
        let (begun, rows, prepared) =
            futures::join!(c.batch_execute("BEGIN"), c.query(stmt, params), prepared);
        begun?;
        Ok((rows?, prepared?))
    }

    /// `stmt` with `params`, then `COMMIT`, in one round trip: the rows `stmt` affected.
    pub(crate) async fn execute_and_commit(
        &self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let c = self.client();
        let (affected, committed) =
            futures::join!(c.execute(stmt, params), c.batch_execute("COMMIT"));
        if committed.is_ok() {
            // Answered: the transaction is over, committed or (behind a failed
            // statement) rolled back.
            self.open.store(false, Ordering::Relaxed);
        }
        let affected = affected?;
        committed?;
        Ok(affected)
    }

    /// The COPY of `copy` with `data`, then `stmt` with `params`, then `COMMIT`. The
    /// COPY's start is one round trip (tokio-postgres returns its sink only once the
    /// server is in COPY mode); the data, `stmt` and `COMMIT` then leave together and
    /// are answered in one more, instead of one for the data and one for the rest.
    /// Returns when the COPY and `stmt` were answered. Errors are reported in the order
    /// the statements ran; behind a failed COPY, `stmt` fails and `COMMIT` rolls back.
    ///
    /// Why the order holds beyond `join!`'s: while a COPY's data is being sent, the
    /// connection task sends nothing else; requests queued meanwhile leave after the
    /// COPY's end.
    pub(crate) async fn copy_execute_commit(
        &self,
        copy: &Statement,
        data: impl IntoIterator<Item = Bytes>,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Answered, Error> {
        let c = self.client();
        let sink = c.copy_in::<_, Bytes>(copy).await?;
        futures::pin_mut!(sink);
        for piece in data {
            sink.feed(piece).await?;
        }
        let copied = async { (sink.finish().await, Instant::now()) };
        let executed = async { (c.execute(stmt, params).await, Instant::now()) };
        let ((copied, copy), (executed, execute), committed) =
            futures::join!(copied, executed, c.batch_execute("COMMIT"));
        if committed.is_ok() {
            self.open.store(false, Ordering::Relaxed);
        }
        copied?;
        executed?;
        committed?;
        Ok(Answered { copy, execute })
    }

    /// `COMMIT` alone.
    pub(crate) async fn commit(&self) -> Result<(), Error> {
        self.client().batch_execute("COMMIT").await?;
        self.open.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the transaction if one may be open, so the connection goes back to the pool
    /// outside one; when the `ROLLBACK` fails the connection is closed instead.
    pub(crate) async fn rollback(self) {
        if self.open.load(Ordering::Relaxed)
            && self.client().batch_execute("ROLLBACK").await.is_ok()
        {
            self.open.store(false, Ordering::Relaxed);
        }
    }

    /// Returns `result`, the outcome of the work done in the transaction, after rolling
    /// the transaction back when it is an error.
    pub(crate) async fn finish<T, E>(self, result: Result<T, E>) -> Result<T, E> {
        if result.is_err() {
            self.rollback().await;
        }
        result
    }
}

impl Deref for FlushTx {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.client()
    }
}

impl Drop for FlushTx {
    fn drop(&mut self) {
        if self.open.load(Ordering::Relaxed) {
            if let Some(client) = self.client.take() {
                // Out of the pool: dropping the wrapper ends its connection task, the
                // server sees the connection close and rolls the transaction back.
                drop(Object::take(client));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_testkit::TestDb;
    use tokio_postgres::types::FromSqlOwned;

    /// A database with table `t` made by `ddl`, and a pool of one connection (so a
    /// connection that came back to the pool is the one the next `get` hands out).
    async fn one_connection(ddl: &str) -> (TestDb, deadpool_postgres::Pool) {
        let db = TestDb::new().await;
        let pool = dbx_testkit::pool(&db.url(), 1);
        pool.get().await.unwrap().batch_execute(ddl).await.unwrap();
        (db, pool)
    }

    async fn one<T: FromSqlOwned>(c: &ClientWrapper, sql: &str) -> T {
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    #[tokio::test]
    async fn pipelined_statements_run_inside_the_transaction() {
        let (_db, pool) = one_connection("CREATE TABLE t (v int)").await;
        // The statement sent with BEGIN runs in the transaction: the transaction id it
        // sees is the one a later statement sees (outside one, each statement would get
        // its own).
        let tx = FlushTx::new(pool.get().await.unwrap());
        let xid = tx.prepare("SELECT txid_current()").await.unwrap();
        let (rows, copy) = tx
            .begin_query(&xid, &[], Some("COPY t (v) FROM STDIN"))
            .await
            .unwrap();
        let first: i64 = rows[0].get(0);
        let again: i64 = tx.query_one(&xid, &[]).await.unwrap().get(0);
        assert_eq!(
            first, again,
            "the pipelined query ran outside the transaction"
        );
        assert!(
            copy.is_some(),
            "the statement prepared with BEGIN is returned"
        );

        // The statement sent with COMMIT is committed by it.
        let insert = tx.prepare("INSERT INTO t VALUES (1), (2)").await.unwrap();
        assert_eq!(tx.execute_and_commit(&insert, &[]).await.unwrap(), 2);
        assert!(!tx.open.load(Ordering::Relaxed));
        drop(tx);
        let c = pool.get().await.unwrap();
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t").await, 2);
    }

    #[tokio::test]
    async fn a_failed_statement_sent_with_commit_rolls_everything_back() {
        let (_db, pool) = one_connection("CREATE TABLE t (v int CHECK (v > 0))").await;
        let tx = FlushTx::new(pool.get().await.unwrap());
        let pid: i32 = one(&tx, "SELECT pg_backend_pid()").await;
        let insert = tx.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
        tx.begin_query(&insert, &[&1i32], None).await.unwrap();
        let err = tx
            .execute_and_commit(&insert, &[&-1i32])
            .await
            .expect_err("the CHECK refuses -1");
        assert!(
            err.as_db_error().is_some(),
            "the statement's own error: {err}"
        );
        tx.rollback().await;
        // Nothing of the transaction is stored, and the connection came back to the pool
        // outside a transaction (the same backend: it was not closed).
        let c = pool.get().await.unwrap();
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t").await, 0);
        assert_same_backend_outside_a_transaction(&c, pid).await;
    }

    /// `c` is backend `pid` (it was not closed) and outside a transaction.
    async fn assert_same_backend_outside_a_transaction(c: &ClientWrapper, pid: i32) {
        assert_eq!(one::<i32>(c, "SELECT pg_backend_pid()").await, pid);
        let xa: i64 = one(c, "SELECT txid_current()").await;
        let xb: i64 = one(c, "SELECT txid_current()").await;
        assert_ne!(
            xa, xb,
            "the pooled connection is still inside a transaction"
        );
    }

    /// `COPY t (v)` of `values`, as text.
    fn copy_rows(values: &[i32]) -> Vec<Bytes> {
        let text: String = values.iter().map(|v| format!("{v}\n")).collect();
        vec![Bytes::from(text)]
    }

    #[tokio::test]
    async fn a_copy_sent_with_its_update_and_commit_is_committed_whole() {
        let (_db, pool) = one_connection(
            "CREATE TABLE t (v int); CREATE TABLE s (n int); INSERT INTO s VALUES (0)",
        )
        .await;
        let tx = FlushTx::new(pool.get().await.unwrap());
        let copy = tx.prepare("COPY t (v) FROM STDIN").await.unwrap();
        let bump = tx.prepare("UPDATE s SET n = n + $1").await.unwrap();
        tx.begin().await.unwrap();
        let answered = tx
            .copy_execute_commit(&copy, copy_rows(&[1, 2, 3]), &bump, &[&3i32])
            .await
            .unwrap();
        assert!(answered.copy <= answered.execute, "answers come in order");
        assert!(!tx.open.load(Ordering::Relaxed));
        drop(tx);
        let c = pool.get().await.unwrap();
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t").await, 3);
        assert_eq!(one::<i32>(&c, "SELECT n FROM s").await, 3);
    }

    #[tokio::test]
    async fn a_failed_copy_rolls_back_the_update_and_commit_sent_behind_it() {
        let (_db, pool) = one_connection(
            "CREATE TABLE t (v int CHECK (v > 0)); CREATE TABLE s (n int); \
             INSERT INTO s VALUES (0)",
        )
        .await;
        let tx = FlushTx::new(pool.get().await.unwrap());
        let pid: i32 = one(&tx, "SELECT pg_backend_pid()").await;
        let copy = tx.prepare("COPY t (v) FROM STDIN").await.unwrap();
        let bump = tx.prepare("UPDATE s SET n = n + $1").await.unwrap();
        tx.begin().await.unwrap();
        let err = tx
            .copy_execute_commit(&copy, copy_rows(&[1, -1]), &bump, &[&1i32])
            .await
            .expect_err("the CHECK refuses -1");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "the COPY's own error comes first: {err}"
        );
        tx.rollback().await;
        let c = pool.get().await.unwrap();
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t").await, 0);
        assert_eq!(
            one::<i32>(&c, "SELECT n FROM s").await,
            0,
            "the UPDATE behind it stuck"
        );
        assert_same_backend_outside_a_transaction(&c, pid).await;
    }

    /// The round trip saved: the `UPDATE` and `COMMIT` leave before the COPY is
    /// answered. A proxy in front of the server holds the server's answers from the
    /// COPY's end (`CopyDone`) until the client sends a simple query (the `COMMIT`), or
    /// for 5 s; a client that waited for the COPY's answer first would only send it
    /// after those 5 s.
    #[tokio::test]
    async fn the_update_and_commit_leave_before_the_copy_is_answered() {
        let db = TestDb::new().await;
        let direct: tokio_postgres::Config = db.url().parse().unwrap();
        let upstream = match (&direct.get_hosts()[0], direct.get_ports()) {
            (tokio_postgres::config::Host::Tcp(h), ports) => format!("{h}:{}", ports[0]),
            (other, _) => panic!("the test server is not on TCP: {other:?}"),
        };
        let (proxy, held) = answer_holding_proxy(upstream).await;
        let mut via = tokio_postgres::Config::new();
        via.host("127.0.0.1")
            .port(proxy.port())
            .user(direct.get_user().unwrap())
            .password(direct.get_password().unwrap_or_default())
            .dbname(direct.get_dbname().unwrap())
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        let manager = deadpool_postgres::Manager::new(via, tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .unwrap();
        let c = pool.get().await.unwrap();
        c.batch_execute("CREATE TABLE t (v int); CREATE TABLE s (n int); INSERT INTO s VALUES (0)")
            .await
            .unwrap();
        let tx = FlushTx::new(c);
        let copy = tx.prepare("COPY t (v) FROM STDIN").await.unwrap();
        let bump = tx.prepare("UPDATE s SET n = n + $1").await.unwrap();
        tx.begin().await.unwrap();
        tx.copy_execute_commit(&copy, copy_rows(&[1, 2]), &bump, &[&1i32])
            .await
            .unwrap();
        assert!(
            held.await.unwrap(),
            "the client waited for the COPY's answer before sending COMMIT"
        );
    }

    /// A proxy for one connection to `upstream` (see the test above): its address, and
    /// whether a simple query followed the first `CopyDone` while the answers were held.
    async fn answer_holding_proxy(
        upstream: String,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<bool>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::watch;
        const PASS: u8 = 0;
        const HOLD: u8 = 1;
        const RELEASED: u8 = 2;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (verdict, held) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            let (state, mut seen) = watch::channel(PASS);
            tokio::spawn(async move {
                let mut messages = FrontendMessages::default();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = from_client.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    // Decided before the bytes go on, so the answer cannot come first.
                    messages.feed(&buf[..n], |kind| {
                        state.send_if_modified(|s| {
                            let next = match (kind, *s) {
                                (b'c', PASS) => HOLD,
                                (b'Q', HOLD) => RELEASED,
                                _ => return false,
                            };
                            *s = next;
                            true
                        });
                    });
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let mut verdict = Some(verdict);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = from_server.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                // The first answer after the COPY's end waits for COMMIT (at once when
                // it already came).
                let copy_ended = *seen.borrow() != PASS;
                if let Some(v) = verdict.take_if(|_| copy_ended) {
                    let released = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        seen.wait_for(|s| *s == RELEASED),
                    )
                    .await
                    .is_ok();
                    let _ = v.send(released);
                }
                if to_client.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        (addr, held)
    }

    /// The kinds of the frontend messages in a byte stream: a startup message (length,
    /// no kind), then kind byte and length each.
    #[derive(Default)]
    struct FrontendMessages {
        started: bool,
        header: Vec<u8>,
        skip: usize,
    }

    impl FrontendMessages {
        fn feed(&mut self, mut data: &[u8], mut kind: impl FnMut(u8)) {
            while !data.is_empty() {
                if self.skip > 0 {
                    let n = self.skip.min(data.len());
                    data = &data[n..];
                    self.skip -= n;
                    continue;
                }
                let need = if self.started { 5 } else { 4 };
                let n = (need - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.header.len() < need {
                    continue;
                }
                let len = &self.header[need - 4..];
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if self.started {
                    kind(self.header[0]);
                }
                self.started = true;
                self.skip = len - 4;
                self.header.clear();
            }
        }
    }

    #[tokio::test]
    async fn a_transaction_dropped_open_closes_its_connection() {
        let (_db, pool) = one_connection("CREATE TABLE t (v int)").await;
        let tx = FlushTx::new(pool.get().await.unwrap());
        let pid: i32 = one(&tx, "SELECT pg_backend_pid()").await;
        let insert = tx.prepare("INSERT INTO t VALUES (1)").await.unwrap();
        tx.begin_query(&insert, &[], None).await.unwrap();
        drop(tx); // as when the attempt's future is dropped half-way
        let c = pool.get().await.unwrap();
        let other: i32 = one(&c, "SELECT pg_backend_pid()").await;
        assert_ne!(
            other, pid,
            "a connection inside a transaction went back to the pool"
        );
        assert_eq!(one::<i64>(&c, "SELECT count(*) FROM t").await, 0);
    }
}
