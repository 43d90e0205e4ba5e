//! One module per forwarding mode, and the routing they share.
pub mod dsr;
pub mod nat;
pub mod route;
