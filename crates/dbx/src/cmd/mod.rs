//! One module per subcommand group.
pub mod serve;
pub mod setup;
