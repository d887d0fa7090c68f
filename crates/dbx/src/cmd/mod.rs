//! One module per subcommand group.
pub mod demo;
pub mod loadgen;
pub mod partitions;
pub mod serve;
pub mod setup;
pub mod spool;
pub mod tenants;
