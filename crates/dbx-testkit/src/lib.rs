//! # dbx-testkit
//!
//! Dev-only helpers: a private PostgreSQL cluster per test process, a fresh
//! database per test.
