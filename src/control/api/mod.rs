//! The admin/command HTTP API. Runs on the control thread.

pub mod auth;
