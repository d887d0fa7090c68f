//! One module per subcommand group.
pub mod serve;
pub mod setup;
pub mod loadgen;
pub mod demo;
