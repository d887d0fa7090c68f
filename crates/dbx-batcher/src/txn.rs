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
//! the COPY statement together, and [`FlushTx::execute_and_commit`] sends the last
//! statement with `COMMIT`. The server runs the same statements in the same order as
//! before; only the client waits less.
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

use deadpool_postgres::{ClientWrapper, Object};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row, Statement};

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
        assert_eq!(one::<i32>(&c, "SELECT pg_backend_pid()").await, pid);
        let xa: i64 = one(&c, "SELECT txid_current()").await;
        let xb: i64 = one(&c, "SELECT txid_current()").await;
        assert_ne!(
            xa, xb,
            "the pooled connection is still inside a transaction"
        );
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
