//! The `dbx` binary: CLI, configuration, wiring and shutdown order. No business logic.
fn main() {}
