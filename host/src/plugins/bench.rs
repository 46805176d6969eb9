//! Building the plugins workspace from the tests, and the plugin
//! benchmark (`host/benches/plugins.rs` prints its table; the end-to-end
//! bench may call [`bench_plugins`] too).

use super::{
    ArtifactPolicy, FormatLimits, MimeData, MimeItem, OutputKind, PipelineLimits, PluginError,
    PluginHost, PolicyLimits, RawEvent, RichOutput, StreamName, pipeline,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The repository root (this crate is `host/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cargo build --release --target wasm32-wasip2 --manifest-path
/// plugins/Cargo.toml` (default plugins, fixtures, the redact example) and
/// returns the directory of the `.wasm` files. Cargo makes it a no-op when
/// nothing changed.
pub fn build_plugins() -> Result<PathBuf, String> {
    let root = repo_root();
    let target_dir = root.join("plugins/target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("wasm32-wasip2/release"))
}

/// The Python and JavaScript example plugins (built by
/// `scripts/build-plugin-examples`): compile, cached load, and call.
fn bench_polyglot(
    host: &PluginHost,
    plugins_dir: &Path,
    iterations: usize,
    rows: &mut Vec<BenchRow>,
) -> Result<(), PluginError> {
    let table = PluginHost::resolve("table-formatter", plugins_dir);
    let image = PluginHost::resolve("image-policy", plugins_dir);
    if !table.is_file() || !image.is_file() {
        return Err(PluginError::Setup(String::from(
            "the Python and JavaScript example plugins are not built: run scripts/build-plugin-examples",
        )));
    }
    let iterations = iterations.min(500);
    let timed_load = |what: &str, load: &dyn Fn() -> Result<(), PluginError>| {
        let start = Instant::now();
        load().map(|()| BenchRow {
            what: what.to_owned(),
            p50: start.elapsed(),
            p90: start.elapsed(),
            iterations: 1,
        })
    };
    let compile = |path: &Path| {
        if host.is_compiled(path) {
            "from the cache"
        } else {
            "compile + cache"
        }
    };
    let what = format!("load table-formatter, Python ({})", compile(&table));
    rows.push(timed_load(&what, &|| {
        host.load_formatter(&table).map(|_| ())
    })?);
    let what = format!("load image-policy, JavaScript ({})", compile(&image));
    rows.push(timed_load(&what, &|| host.load_policy(&image).map(|_| ()))?);
    rows.push(measure(
        "load table-formatter (cached .cwasm)",
        20.min(iterations),
        || {
            let _ = host.load_formatter(&table);
        },
    ));
    let formatter = host.load_formatter(&table)?;
    let policy = host.load_policy(&image)?;
    let frame = rich(vec![
        text_item("text/plain", "   a  b"),
        text_item(
            super::DATAFRAME_MIME,
            r#"{"columns":["a","b"],"index":["0","1"],"rows":[[1,"x"],[2,"y"]],"dtypes":["int64","object"],"totalRows":2,"truncated":false}"#,
        ),
    ]);
    let limits = FormatLimits::default();
    // The first call after load, then the steady state.
    rows.push(measure("table-formatter (Python) first call", 1, || {
        let _ = formatter.format(frame.clone(), &limits);
    }));
    rows.push(measure(
        "table-formatter (Python) format DataFrame -> markdown",
        iterations,
        || {
            let _ = formatter.format(frame.clone(), &limits);
        },
    ));
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(100 * 1024, 7);
    let big = super::Output {
        kind: OutputKind::DisplayData,
        format: super::Format::Png,
        mime: "image/png".into(),
        text: None,
        size: png.len() as u64,
        bytes: Some(png),
        truncated: false,
        execution_count: None,
    };
    let policy_limits = PolicyLimits::default();
    rows.push(measure(
        "image-policy (JavaScript) decide",
        iterations,
        || {
            let _ = policy.decide(&big, ArtifactPolicy::Promote, &policy_limits);
        },
    ));
    Ok(())
}

/// One measured operation.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    pub p50: Duration,
    pub p90: Duration,
    pub iterations: usize,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub pooling: bool,
    pub rows: Vec<BenchRow>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allocator = if self.pooling { "pooling" } else { "on-demand" };
        writeln!(
            f,
            "plugin benchmark ({allocator} allocator, fresh Store + InstancePre per call)"
        )?;
        writeln!(
            f,
            "{:<58} {:>12} {:>12} {:>6}",
            "operation", "p50", "p90", "n"
        )?;
        for row in &self.rows {
            writeln!(
                f,
                "{:<58} {:>9.1} us {:>9.1} us {:>6}",
                row.what,
                row.p50.as_secs_f64() * 1e6,
                row.p90.as_secs_f64() * 1e6,
                row.iterations
            )?;
        }
        Ok(())
    }
}

fn measure(what: impl Into<String>, iterations: usize, mut op: impl FnMut()) -> BenchRow {
    for _ in 0..iterations.min(20) {
        op();
    }
    let mut times: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed()
        })
        .collect();
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    BenchRow {
        what: what.into(),
        p50: at(0.5),
        p90: at(0.9),
        iterations,
    }
}

/// A matplotlib line plot's description, `points` points.
pub fn sample_figure(points: usize) -> String {
    let xs: Vec<f64> = (0..points).map(|i| i as f64 / 10.0).collect();
    let ys: Vec<f64> = xs.iter().map(|x| x.sin()).collect();
    serde_json::json!({
        "title": "",
        "axes": [{
            "title": "sin", "xlabel": "Time (s)", "ylabel": "Amplitude",
            "xscale": "linear", "yscale": "linear", "xticklabels": [],
            "lines": [{"label": "sin(x)", "xs": xs, "ys": ys}],
            "scatters": [], "bars": [], "pies": [], "boxes": []
        }]
    })
    .to_string()
}

fn rich(bundle: Vec<MimeItem>) -> RichOutput {
    RichOutput {
        kind: OutputKind::DisplayData,
        bundle,
        execution_count: None,
    }
}

fn text_item(mime: &str, text: &str) -> MimeItem {
    MimeItem {
        mime: mime.into(),
        data: MimeData::Text(text.into()),
    }
}

/// Measures loading, each default component's instantiate + call, and the
/// whole pipeline per output.
pub fn bench_plugins(
    plugins_dir: &Path,
    cache_dir: &Path,
    iterations: usize,
) -> Result<BenchReport, PluginError> {
    let host = PluginHost::new(cache_dir)?;
    let path = |name: &str| PluginHost::resolve(name, plugins_dir);
    let mut rows = Vec::new();

    let formatter_path = path("default-formatter");
    let start = Instant::now();
    let formatter = host.load_formatter(&formatter_path)?;
    rows.push(BenchRow {
        what: format!(
            "load default-formatter ({})",
            if formatter.info().from_cache {
                "from the cache"
            } else {
                "compile + cache"
            }
        ),
        p50: start.elapsed(),
        p90: start.elapsed(),
        iterations: 1,
    });
    rows.push(measure(
        "load default-formatter (cached .cwasm)",
        20.min(iterations),
        || {
            let _ = host.load_formatter(&formatter_path);
        },
    ));
    let adapter = host.load_adapter(&path("ipython-adapter"))?;
    let node = host.load_adapter(&path("node-adapter"))?;
    let policy = host.load_policy(&path("default-policy"))?;

    let events = vec![
        RawEvent::Stream {
            name: StreamName::Stdout,
            text: "hello\n".into(),
        },
        RawEvent::ExecuteResult {
            bundle: vec![text_item("text/plain", "42")],
            execution_count: Some(1),
        },
    ];
    rows.push(measure(
        "ipython-adapter adapt (2 events)",
        iterations,
        || {
            let _ = adapter.adapt(&events);
        },
    ));
    rows.push(measure("node-adapter adapt (2 events)", iterations, || {
        let _ = node.adapt(&events);
    }));

    let limits = FormatLimits::default();
    let plain = rich(vec![text_item("text/plain", "42")]);
    rows.push(measure(
        "default-formatter format text/plain",
        iterations,
        || {
            let _ = formatter.format(plain.clone(), &limits);
        },
    ));
    let figure = rich(vec![
        text_item("text/plain", "<Figure>"),
        text_item(super::FIGURE_MIME, &sample_figure(100)),
    ]);
    rows.push(measure(
        "default-formatter format figure -> chart (100 points)",
        iterations,
        || {
            let _ = formatter.format(figure.clone(), &limits);
        },
    ));
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(20 * 1024, 7);
    let image = rich(vec![MimeItem {
        mime: "image/png".into(),
        data: MimeData::Bytes(png),
    }]);
    rows.push(measure(
        "default-formatter format image/png (20 KiB)",
        iterations,
        || {
            let _ = formatter.format(image.clone(), &limits);
        },
    ));

    let formatted = formatter.format(plain.clone(), &limits)?;
    let policy_limits = PolicyLimits::default();
    rows.push(measure("default-policy decide", iterations, || {
        let _ = policy.decide(&formatted, ArtifactPolicy::Inline, &policy_limits);
    }));

    let outputs = 10;
    let mut run_events = vec![RawEvent::Stream {
        name: StreamName::Stdout,
        text: "hi\n".into(),
    }];
    run_events.extend((0..outputs).map(|i| RawEvent::DisplayData {
        bundle: vec![text_item("text/plain", &format!("value {i}"))],
        execution_count: None,
    }));
    let pipeline_limits = PipelineLimits::default();
    let run = measure(
        format!("pipeline, one run of {outputs} text outputs"),
        iterations,
        || {
            let _ = pipeline(
                &adapter,
                &formatter,
                &policy,
                &run_events,
                ArtifactPolicy::Inline,
                &pipeline_limits,
            );
        },
    );
    let single = [RawEvent::DisplayData {
        bundle: vec![text_item("text/plain", "value")],
        execution_count: None,
    }];
    let per_output = measure(
        "pipeline per output (adapter + formatter + policy, 1 output)",
        iterations,
        || {
            let _ = pipeline(
                &adapter,
                &formatter,
                &policy,
                &single,
                ArtifactPolicy::Inline,
                &pipeline_limits,
            );
        },
    );
    rows.push(BenchRow {
        what: "pipeline per output, amortised over a 10-output run".into(),
        p50: run.p50 / outputs,
        p90: run.p90 / outputs,
        iterations: run.iterations,
    });
    rows.push(run);
    rows.push(per_output);
    bench_polyglot(&host, plugins_dir, iterations, &mut rows)?;
    Ok(BenchReport {
        pooling: host.pooling(),
        rows,
    })
}
