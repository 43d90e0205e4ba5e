//! One module per forwarding mode, and the routing they share.
pub mod dsr;
pub mod route;
