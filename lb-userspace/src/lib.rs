//! The `lb` binary's library: API types, the data-plane wrapper, Maglev, daemon and CLI.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod dataplane;
pub mod flow_table;
pub mod maglev;
pub mod mapped;
pub mod neighbour;
pub mod pins;
pub mod schedule;
