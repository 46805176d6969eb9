//! The `bindgen!` output for the three worlds of `wit/` (0.1.0) and of
//! `wit/0.2.0/`. The shared `types` interface is generated once (with the
//! 0.1.0 adapter world) and reused by every other world of both versions,
//! so one Rust type serves all six (the two versions' types are the
//! same); each version has its own `host` interface.

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

/// `crownest:plugin@0.2.0`: each export also takes the template's config.
pub mod v2 {
    pub mod adapter {
        wasmtime::component::bindgen!({
            world: "result-adapter",
            path: "../wit/0.2.0",
            with: {
                "crownest:plugin/types": super::super::adapter::crownest::plugin::types,
            },
        });
    }

    pub mod formatter {
        wasmtime::component::bindgen!({
            world: "output-formatter",
            path: "../wit/0.2.0",
            with: {
                "crownest:plugin/types": super::super::adapter::crownest::plugin::types,
                "crownest:plugin/host": super::adapter::crownest::plugin::host,
            },
        });
    }

    pub mod policy {
        wasmtime::component::bindgen!({
            world: "promotion-policy",
            path: "../wit/0.2.0",
            with: {
                "crownest:plugin/types": super::super::adapter::crownest::plugin::types,
                "crownest:plugin/host": super::adapter::crownest::plugin::host,
            },
        });
    }

    pub use adapter::crownest::plugin::host;
}
