//! Integration tests: one binary, one module per topic, all against a real
//! PostgreSQL cluster that the harness starts in a temp directory.

mod harness;

mod archive;
mod aws;
mod completeness;
mod config;
mod control;
mod faults;
mod formats;
mod inputs;
mod interop;
mod lifecycle;
mod online;
mod replica;
mod report;
mod rotation;
mod secrecy;
mod server_faults;
mod server_settings;
mod shapes;
mod tls;
