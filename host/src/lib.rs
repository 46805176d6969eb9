//! CrowNest host: the `crownest` binary's library. The API server, the
//! operator CLI, the store, the runtime drivers and the agent client.
//!
//! See `ARCHITECTURE.md` at the repository root for the map and invariants.

pub mod agent;
pub mod api;
pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod contained;
pub mod core;
pub mod egress;
pub mod evidence;
pub mod ids;
pub mod model;
pub mod plugins;
pub mod rootfs;
pub mod runtime;
pub mod store;
pub mod templates;
