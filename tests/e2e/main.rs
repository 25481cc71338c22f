//! End-to-end tests: the real `rds-csi` binary, its real unix socket, the generated CSI client.

#[path = "../support/mod.rs"]
mod support;

#[path = "../support/fake_apiserver.rs"]
mod fake_apiserver;

#[path = "../support/fake_rds.rs"]
mod fake_rds;

#[path = "../support/fake_snmp.rs"]
mod fake_snmp;

mod bad_input;
mod concurrency;
mod controller;
mod ha;
mod kubernetes;
mod kubernetes_hardening;
mod node;
mod node_cancel;
mod node_snapshots;
mod observability;
mod rds;
mod rds_snapshots;
mod reconcilers;
mod rules;
mod snapshots;
mod socket;
mod storage_metrics;
mod switch;
