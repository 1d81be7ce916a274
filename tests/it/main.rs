//! Integration tests: one binary, one module per topic, all against a real
//! PostgreSQL cluster that the harness starts in a temp directory.

mod harness;

mod archive;
mod aws;
mod bench_report;
mod by_hand;
mod closed_output;
mod completeness;
mod config;
mod control;
mod faults;
mod formats;
mod inputs;
mod interop;
mod json_errors;
mod key_hierarchy;
mod keyring_file;
mod keyring_file_kms;
mod lanes;
mod layouts;
mod libpq;
mod lifecycle;
mod online;
mod progress_log;
mod replica;
mod report;
mod retire_scope;
mod rotation;
mod rotation_states;
mod search_hash;
mod secrecy;
mod server_faults;
mod server_settings;
mod shapes;
mod store_lost_key;
mod store_uses;
mod store_uses_aws;
mod tls;
mod wal_throttle;
