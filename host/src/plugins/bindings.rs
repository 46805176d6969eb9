//! The `bindgen!` output for the three worlds of `wit/`. The shared
//! `types` and `host` interfaces are generated once (with the adapter world)
//! and reused by the others, so one Rust type serves all three.

pub mod adapter {
    wasmtime::component::bindgen!({
        world: "result-adapter",
        path: "../wit",
    });
}

pub mod formatter {
    wasmtime::component::bindgen!({
        world: "output-formatter",
        path: "../wit",
        with: {
            "crownest:plugin/types": super::adapter::crownest::plugin::types,
            "crownest:plugin/host": super::adapter::crownest::plugin::host,
        },
    });
}

pub mod policy {
    wasmtime::component::bindgen!({
        world: "promotion-policy",
        path: "../wit",
        with: {
            "crownest:plugin/types": super::adapter::crownest::plugin::types,
            "crownest:plugin/host": super::adapter::crownest::plugin::host,
        },
    });
}

pub use adapter::crownest::plugin::host;
pub use adapter::crownest::plugin::types;
