//! One module per forwarding mode.
pub mod dsr;
