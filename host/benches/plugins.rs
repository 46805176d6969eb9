//! Plugin pipeline benchmark: instantiate + call of each default component
//! and the pipeline cost per output, printed as a table.
//!
//! Run with: cargo bench -p crownest --bench plugins
//! (builds the plugins workspace first if needed; `CROWNEST_BENCH_ITERS`
//! sets the iterations, default 2000).

fn main() -> anyhow::Result<()> {
    let plugins_dir = crownest::plugins::bench::build_plugins().map_err(anyhow::Error::msg)?;
    let cache = tempfile::tempdir()?;
    let iterations = std::env::var("CROWNEST_BENCH_ITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let report = crownest::plugins::bench::bench_plugins(&plugins_dir, cache.path(), iterations)?;
    print!("{report}");
    Ok(())
}
