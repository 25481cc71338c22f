//! End-to-end tests: the real `rds-csi` binary, its real unix socket, the generated CSI client.

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod concurrency;
mod controller;
mod observability;
mod rules;
mod socket;
