//! End-to-end tests: the real `crownest` binary on 127.0.0.1, real runc
//! sandboxes, real HTTP. One test binary with modules (one link, one
//! shared server for the tests that don't restart it).

mod abuse;
mod artifacts;
mod auth;
mod bad_input;
mod cli;
mod code;
mod commands;
mod escape;
mod files;
mod ledger;
mod parts;
mod previews;
mod restart;
mod sandboxes;
