//! End-to-end tests: the real `crownest` binary on 127.0.0.1, real runc
//! sandboxes, real HTTP. One test binary with modules (one link, one
//! shared server for the tests that don't restart it).

/// Runs a test once per runtime: `name::oci` on the `python` template
/// (runc) and `name::gvisor` on `python-gvisor` (runsc); the body gets the
/// template's name as `$template`.
macro_rules! on_each_runtime {
    ($(#[$attr:meta])* async fn $name:ident($template:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn on_runtime($template: &'static str) $body

            #[tokio::test]
            async fn oci() {
                on_runtime("python").await
            }

            #[tokio::test]
            async fn gvisor() {
                on_runtime("python-gvisor").await
            }
        }
    };
}

mod abuse;
mod artifacts;
mod auth;
mod bad_input;
mod cli;
mod cli_parity;
mod clients;
mod code;
mod commands;
mod egress;
mod escape;
mod files;
mod gvisor;
mod ledger;
mod microvm;
mod parts;
mod plugin_cli;
mod previews;
mod restart;
mod sandboxes;
mod templates;
mod workspace_runs;
