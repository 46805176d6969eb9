//! Plugin host tests against the real components, built from source by
//! `bench::build_plugins` (default plugins, misbehaving fixtures, the
//! redact example).

use super::*;
use std::sync::OnceLock;

fn plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| bench::build_plugins().unwrap_or_else(|e| panic!("{e}")))
}

/// One compile cache for every test run (entries are keyed by the
/// component's digest and the engine's configuration, so a stale one is
/// never used): the Python and JavaScript components take seconds each to
/// compile.
fn cache_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = bench::repo_root().join("plugins/target/test-compile-cache");
        std::fs::create_dir_all(&dir).expect("cache dir");
        dir
    })
}

/// A component built by `scripts/build-plugin-examples` (Python and
/// JavaScript plugins; `scripts/test` runs it before the tests).
fn example(name: &str) -> PathBuf {
    let path = path(name);
    assert!(
        path.is_file(),
        "{} is missing: build it with scripts/build-plugin-examples",
        path.display()
    );
    path
}

fn host() -> PluginHost {
    PluginHost::new(cache_dir()).expect("plugin host")
}

fn path(name: &str) -> PathBuf {
    PluginHost::resolve(name, plugins_dir())
}

fn formatter() -> Formatter {
    host()
        .load_formatter(&path("default-formatter"))
        .expect("default-formatter")
}

fn policy() -> Policy {
    host()
        .load_policy(&path("default-policy"))
        .expect("default-policy")
}

fn text(mime: &str, text: &str) -> MimeItem {
    MimeItem {
        mime: mime.into(),
        data: MimeData::Text(text.into()),
    }
}

fn rich(bundle: Vec<MimeItem>) -> RichOutput {
    RichOutput {
        kind: OutputKind::DisplayData,
        bundle,
        execution_count: None,
    }
}

fn format_one(bundle: Vec<MimeItem>) -> Output {
    formatter()
        .format(rich(bundle), &FormatLimits::default())
        .expect("format")
}

fn json_of(output: &Output) -> serde_json::Value {
    serde_json::from_str(output.text.as_deref().expect("text")).expect("json")
}

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

/// The good plugins still work (run after each misbehaving one).
fn assert_host_still_works() {
    let output = format_one(vec![text("text/plain", "still alive")]);
    assert_eq!(output.text.as_deref(), Some("still alive"));
}

#[test]
fn ipython_adapter_folds_streams_outputs_and_a_coloured_error() {
    let adapter = host().load_adapter(&path("ipython-adapter")).expect("load");
    let events = vec![
        RawEvent::Stream {
            name: StreamName::Stdout,
            text: "a\n".into(),
        },
        RawEvent::Stream {
            name: StreamName::Stderr,
            text: "warn\n".into(),
        },
        RawEvent::DisplayData {
            bundle: vec![text("text/plain", "shown")],
            execution_count: None,
        },
        RawEvent::ExecuteResult {
            bundle: vec![text("text/plain", "42")],
            execution_count: Some(3),
        },
        RawEvent::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "\u{1b}[0;31m---------\u{1b}[0m".into(),
                "\u{1b}[0;32mCell In[3], line 1\u{1b}[0m\n----> 1 1/0".into(),
            ],
        },
    ];
    let adapted = adapter.adapt(&events).expect("adapt");
    assert_eq!(adapted.stdout, vec!["a\n"]);
    assert_eq!(adapted.stderr, vec!["warn\n"]);
    assert_eq!(adapted.outputs.len(), 2);
    assert_eq!(adapted.outputs[1].kind, OutputKind::ExecuteResult);
    assert_eq!(adapted.execution_count, Some(3));
    let error = adapted.error.expect("error");
    assert_eq!(error.name, "ZeroDivisionError");
    assert_eq!(
        error.traceback,
        vec!["---------", "Cell In[3], line 1", "----> 1 1/0"]
    );
}

#[test]
fn node_adapter_drops_the_stack_header_and_node_internal_frames() {
    let adapter = host().load_adapter(&path("node-adapter")).expect("load");
    let events = vec![RawEvent::Error {
        ename: "TypeError".into(),
        evalue: "x is not a function".into(),
        traceback: vec![
            "TypeError: x is not a function".into(),
            "    at cell-1:1:1".into(),
            "    at Script.runInContext (node:vm:149:12)".into(),
            "    at run (/opt/crownest/node_runner.js:190:20)".into(),
            "    at process.processTicksAndRejections (node:internal/process/task_queues:95:5)"
                .into(),
        ],
    }];
    let error = adapter.adapt(&events).expect("adapt").error.expect("error");
    assert_eq!(error.message, "x is not a function");
    assert_eq!(error.traceback, vec!["    at cell-1:1:1"]);
}

#[test]
fn formatter_turns_a_matplotlib_line_plot_into_a_line_chart() {
    let figure = serde_json::json!({
        "title": "",
        "axes": [{
            "title": "Growth", "xlabel": "Time (s)", "ylabel": "Size",
            "xscale": "linear", "yscale": "log", "xticklabels": ["0", "1", "2"],
            "lines": [{"label": "size", "xs": [0.0, 1.0, 2.0], "ys": [1.0, 2.0, 4.0]}],
            "scatters": [], "bars": [], "pies": [], "boxes": []
        }]
    });
    let output = format_one(vec![
        text("text/plain", "<Figure size 640x480>"),
        MimeItem {
            mime: "image/png".into(),
            data: MimeData::Bytes(PNG.to_vec()),
        },
        text(FIGURE_MIME, &figure.to_string()),
    ]);
    assert_eq!(output.format, Format::Chart);
    let chart = json_of(&output);
    assert_eq!(chart["type"], "line");
    assert_eq!(chart["title"], "Growth");
    assert_eq!(chart["x_label"], "Time (s)");
    assert_eq!(chart["x_unit"], "s");
    assert_eq!(chart["y_unit"], serde_json::Value::Null);
    assert_eq!(chart["y_scale"], "log");
    assert_eq!(chart["elements"][0]["label"], "size");
    assert_eq!(
        chart["elements"][0]["points"],
        serde_json::json!([[0.0, 1.0], [1.0, 2.0], [2.0, 4.0]])
    );
}

#[test]
fn formatter_turns_several_axes_into_a_superchart_of_bar_and_pie() {
    let figure = serde_json::json!({
        "title": "Sales",
        "axes": [
            {"title": "by region", "xlabel": "", "ylabel": "EUR", "xticklabels": ["north", "south"],
             "lines": [], "scatters": [], "pies": [], "boxes": [],
             "bars": [{"label": "2025", "heights": [3.0, 5.0], "xs": [0.0, 1.0]}]},
            {"title": "share", "lines": [], "scatters": [], "bars": [], "boxes": [],
             "pies": [{"labels": ["a", "b"], "angles": [90.0, 270.0], "fractions": [0.25, 0.75], "radius": 1.0}]}
        ]
    });
    let chart = json_of(&format_one(vec![text(FIGURE_MIME, &figure.to_string())]));
    assert_eq!(chart["type"], "superchart");
    assert_eq!(chart["title"], "Sales");
    let bar = &chart["elements"][0];
    assert_eq!(bar["type"], "bar");
    assert_eq!(
        bar["elements"][1],
        serde_json::json!({"label": "south", "group": "2025", "value": 5.0})
    );
    let pie = &chart["elements"][1];
    assert_eq!(pie["type"], "pie");
    assert_eq!(
        pie["elements"][0],
        serde_json::json!({"label": "a", "angle": 90.0, "radius": 1.0})
    );
}

#[test]
fn formatter_turns_a_dataframe_into_data() {
    let frame = serde_json::json!({
        "columns": ["a", "b"], "index": ["0", "1"], "rows": [[1, "x"], [2]],
        "dtypes": ["int64", "object"], "totalRows": 2, "truncated": false
    });
    let output = format_one(vec![
        text("text/plain", "   a  b\n0  1  x"),
        text("text/html", "<table></table>"),
        text(DATAFRAME_MIME, &frame.to_string()),
    ]);
    assert_eq!(output.format, Format::Data);
    let data = json_of(&output);
    assert_eq!(data["columns"], serde_json::json!(["a", "b"]));
    assert_eq!(data["rows"], serde_json::json!([[1, "x"], [2, null]]));
}

#[test]
fn formatter_keeps_png_bytes_and_decodes_base64_png() {
    let output = format_one(vec![
        text("text/plain", "<Figure>"),
        MimeItem {
            mime: "image/png".into(),
            data: MimeData::Bytes(PNG.to_vec()),
        },
    ]);
    assert_eq!(
        (output.format, output.mime.as_str()),
        (Format::Png, "image/png")
    );
    assert_eq!(output.bytes.as_deref(), Some(PNG));
    assert_eq!(output.size, PNG.len() as u64);

    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(PNG);
    let output = format_one(vec![text("image/png", &encoded)]);
    assert_eq!(output.bytes.as_deref(), Some(PNG));
}

#[test]
fn formatter_prefers_html_over_plain_text() {
    let output = format_one(vec![text("text/plain", "x"), text("text/html", "<b>x</b>")]);
    assert_eq!(output.format, Format::Html);
    assert_eq!(output.text.as_deref(), Some("<b>x</b>"));
}

#[test]
fn formatter_truncates_long_text_and_says_so() {
    let long = "x".repeat(100);
    let output = formatter()
        .format(
            rich(vec![text("text/plain", &long)]),
            &FormatLimits { max_text_bytes: 10 },
        )
        .expect("format");
    assert!(output.truncated);
    let body = output.text.expect("text");
    assert!(body.starts_with("xxxxxxxxxx\n[output truncated: showing the first 10 of 100 bytes]"));
    assert_eq!(output.size, body.len() as u64);
}

#[test]
fn unknown_mime_is_rejected_as_unsupported_format() {
    let output = format_one(vec![text("application/x-mystery", "???")]);
    assert_eq!(output.format, Format::Unknown);
    let decision = policy()
        .decide(&output, ArtifactPolicy::Promote, &PolicyLimits::default())
        .expect("decide");
    assert_eq!(decision, Decision::Reject(RejectReason::UnsupportedFormat));
}

#[test]
fn default_policy_follows_the_code_run_rules() {
    let policy = policy();
    let limits = PolicyLimits {
        max_inline_bytes: 100,
        max_artifact_bytes: 1000,
    };
    let output = |format: Format, size: usize| Output {
        kind: OutputKind::DisplayData,
        format,
        mime: "x/y".into(),
        text: if format.is_binary() {
            None
        } else {
            Some("a".repeat(size))
        },
        bytes: if format.is_binary() {
            Some(vec![0; size])
        } else {
            None
        },
        size: size as u64,
        truncated: false,
        execution_count: None,
    };
    use ArtifactPolicy::{Inline, Promote};
    use Decision::Reject;
    use RejectReason::*;
    let cases = [
        (Format::Text, 10, Inline, Decision::Inline),
        (Format::Markdown, 10, Promote, Decision::Inline),
        (Format::Latex, 10, Inline, Decision::Inline),
        (Format::Text, 500, Inline, Reject(OutputTooLarge)),
        (Format::Text, 500, Promote, Reject(OutputTooLarge)),
        (Format::Png, 10, Inline, Reject(RequiresArtifactPromotion)),
        (Format::Png, 10, Promote, Decision::Promote),
        (Format::Png, 5000, Promote, Reject(OutputTooLarge)),
        (Format::Html, 10, Inline, Reject(RequiresArtifactPromotion)),
        (Format::Svg, 10, Promote, Decision::Promote),
        (Format::Chart, 10, Inline, Decision::Inline),
        (
            Format::Chart,
            500,
            Inline,
            Reject(RequiresArtifactPromotion),
        ),
        (Format::Chart, 10, Promote, Decision::Promote),
        (Format::Data, 500, Promote, Decision::Promote),
        (Format::Json, 10, Inline, Decision::Inline),
        (Format::Unknown, 1, Promote, Reject(UnsupportedFormat)),
    ];
    for (format, size, choice, expected) in cases {
        let decision = policy
            .decide(&output(format, size), choice, &limits)
            .expect("decide");
        assert_eq!(
            decision, expected,
            "{format:?} of {size} bytes under {choice:?}"
        );
    }
}

#[test]
fn looping_formatter_times_out_and_the_host_keeps_working() {
    let looping = host()
        .load_formatter(&path("loop-formatter"))
        .expect("load");
    let start = std::time::Instant::now();
    let error = looping.format(
        rich(vec![text("text/plain", "x")]),
        &FormatLimits::default(),
    );
    assert!(
        matches!(error, Err(PluginError::Timeout { .. })),
        "{error:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    assert_host_still_works();
}

#[test]
fn memory_hog_hits_the_memory_limit_and_the_host_keeps_working() {
    // A generous deadline: this test is about memory, not time.
    let slow = CallLimits {
        deadline: Duration::from_secs(5),
        memory_bytes: 64 << 20,
    };
    let host = host().with_limits(HostLimits {
        formatter: slow,
        ..HostLimits::default()
    });
    let hog = host.load_formatter(&path("hog-formatter")).expect("load");
    let error = hog.format(
        rich(vec![text("text/plain", "x")]),
        &FormatLimits::default(),
    );
    assert!(
        matches!(error, Err(PluginError::MemoryLimit { limit_bytes, .. }) if limit_bytes == 64 << 20),
        "{error:?}"
    );
    assert_host_still_works();
}

#[test]
fn panicking_formatter_is_a_trap_and_the_host_keeps_working() {
    let panicking = host()
        .load_formatter(&path("panic-formatter"))
        .expect("load");
    let error = panicking.format(
        rich(vec![text("text/plain", "x")]),
        &FormatLimits::default(),
    );
    assert!(matches!(error, Err(PluginError::Trap { .. })), "{error:?}");
    assert_host_still_works();
}

#[test]
fn component_for_the_wrong_world_is_refused_at_load_naming_the_world() {
    let error = host()
        .load_formatter(&path("wrong-world"))
        .expect_err("must refuse");
    let message = error.to_string();
    eprintln!("{message}");
    assert!(matches!(error, PluginError::Load { .. }), "{error:?}");
    assert!(
        message.contains("crownest:plugin/output-formatter@0.1.0"),
        "{message}"
    );
    assert!(message.contains("promotion-policy"), "{message}");
    assert_host_still_works();
}

fn std_probe() -> Formatter {
    host()
        .load_formatter(&path("std-probe"))
        .expect("a std Rust component loads")
}

/// What the std probe makes of `what` (see its source).
fn probe(what: &str) -> Result<Output, PluginError> {
    std_probe().format(
        rich(vec![text("text/plain", what)]),
        &FormatLimits::default(),
    )
}

fn probe_error(what: &str) -> String {
    let error = probe(what).expect_err("WASI must refuse it");
    assert!(matches!(error, PluginError::Returned { .. }), "{error:?}");
    assert_host_still_works();
    error.to_string()
}

#[test]
fn a_std_rust_component_loads_and_lists_the_wasi_it_imports() {
    let probe = std_probe();
    let imports = &probe.info().wasi_imports;
    for wanted in [
        "wasi:cli/environment",
        "wasi:filesystem/preopens",
        "wasi:sockets/tcp",
    ] {
        assert!(
            imports.iter().any(|i| i.starts_with(wanted)),
            "{wanted} in {imports:?}"
        );
    }
    let output = probe_ok("just text");
    assert_eq!(output, "std-probe: just text");
    // The no_std default plugins import no WASI at all.
    assert!(formatter().info().wasi_imports.is_empty());
}

fn probe_ok(what: &str) -> String {
    probe(what).expect("format").text.expect("text")
}

#[test]
fn wasi_grants_clocks_random_and_collections() {
    assert_eq!(
        probe_ok("std"),
        "std-probe: year>2020:true counts:{' ': 1, 'd': 1, 'e': 1, 'h': 1, 'l': 3, 'o': 2, 'r': 1, 'w': 1} monotonic:true"
    );
}

#[test]
fn a_plugin_reading_a_file_gets_an_error_for_that_call_only() {
    let message = probe_error("fs");
    assert!(message.contains("cannot read /etc/passwd"), "{message}");
    let message = probe_error("ls");
    assert!(message.contains("cannot list /"), "{message}");
}

#[test]
fn a_plugin_sees_no_environment_and_no_arguments() {
    let message = probe_error("env");
    assert!(message.contains("cannot read HOME"), "{message}");
    assert!(message.contains("(0 variables, 0 arguments)"), "{message}");
}

#[test]
fn a_plugin_opening_a_socket_is_denied() {
    let message = probe_error("socket");
    assert!(message.contains("access-denied"), "{message}");
}

#[test]
fn a_plugin_asleep_is_cut_at_its_deadline() {
    let host = host().with_limits(HostLimits {
        formatter: CallLimits {
            deadline: Duration::from_millis(200),
            memory_bytes: 64 << 20,
        },
        ..HostLimits::default()
    });
    let probe = host.load_formatter(&path("std-probe")).expect("load");
    let started = std::time::Instant::now();
    let error = probe
        .format(
            rich(vec![text("text/plain", "sleep")]),
            &FormatLimits::default(),
        )
        .expect_err("a 30 s sleep cannot finish");
    assert!(matches!(error, PluginError::Timeout { .. }), "{error:?}");
    // Cut at the deadline, not after the 30 s asked for.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_host_still_works();
}

#[test]
fn what_wasi_allocates_on_the_host_is_bounded() {
    // Each handle is host memory outside the plugin's linear-memory cap.
    let error = probe("handles").expect_err("100,000 handles are too many");
    assert!(matches!(error, PluginError::Trap { .. }), "{error:?}");
    let error = probe("random").expect_err("64 MiB of random bytes is too much");
    assert!(matches!(error, PluginError::Trap { .. }), "{error:?}");
    assert_host_still_works();
}

#[test]
fn a_plugin_printing_keeps_working() {
    assert_eq!(probe_ok("print"), "std-probe: print");
}

#[test]
fn garbage_file_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"not wasm").expect("write");
    let error = host().load_policy(&bogus).expect_err("must refuse");
    assert!(matches!(error, PluginError::Load { .. }), "{error:?}");
}

#[test]
fn second_load_reuses_the_precompiled_cache() {
    let cache = tempfile::tempdir().expect("tempdir");
    let host = PluginHost::new(cache.path()).expect("host");
    let first = host
        .load_policy(&path("default-policy"))
        .expect("first load");
    assert!(!first.info().from_cache);
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("plugins"))
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let second = host
        .load_policy(&path("default-policy"))
        .expect("second load");
    assert!(second.info().from_cache);
    let output = format_one(vec![text("text/plain", "x")]);
    assert_eq!(
        second.decide(&output, ArtifactPolicy::Inline, &PolicyLimits::default()),
        Ok(Decision::Inline)
    );
}

fn run_events() -> Vec<RawEvent> {
    vec![
        RawEvent::Stream {
            name: StreamName::Stdout,
            text: "out\n".into(),
        },
        RawEvent::DisplayData {
            bundle: vec![
                text("text/plain", "<Figure>"),
                MimeItem {
                    mime: "image/png".into(),
                    data: MimeData::Bytes(PNG.to_vec()),
                },
            ],
            execution_count: None,
        },
        RawEvent::ExecuteResult {
            bundle: vec![text("text/plain", "42")],
            execution_count: Some(1),
        },
    ]
}

fn defaults(host: &PluginHost) -> (Adapter, Formatter, Policy) {
    (
        host.load_adapter(&path("ipython-adapter"))
            .expect("adapter"),
        host.load_formatter(&path("default-formatter"))
            .expect("formatter"),
        host.load_policy(&path("default-policy")).expect("policy"),
    )
}

#[test]
fn pipeline_inlines_text_and_promotes_png_under_promote() {
    let (adapter, formatter, policy) = defaults(&host());
    let result = pipeline(
        &adapter,
        &formatter,
        &policy,
        &run_events(),
        ArtifactPolicy::Promote,
        &PipelineLimits::default(),
    );
    assert_eq!(result.stdout, vec!["out\n"]);
    assert!(result.notes.is_empty(), "{:?}", result.notes);
    let decisions: Vec<_> = result
        .outputs
        .iter()
        .map(|o| (o.output.format, o.decision))
        .collect();
    assert_eq!(
        decisions,
        vec![
            (Format::Png, Decision::Promote),
            (Format::Text, Decision::Inline)
        ]
    );
}

#[test]
fn pipeline_rejects_png_under_inline_as_requiring_promotion() {
    let (adapter, formatter, policy) = defaults(&host());
    let result = pipeline(
        &adapter,
        &formatter,
        &policy,
        &run_events(),
        ArtifactPolicy::Inline,
        &PipelineLimits::default(),
    );
    assert_eq!(
        result.outputs[0].decision,
        Decision::Reject(RejectReason::RequiresArtifactPromotion)
    );
}

#[test]
fn pipeline_falls_back_to_plain_text_when_the_formatter_times_out() {
    let host = host();
    let (adapter, _, policy) = defaults(&host);
    let looping = host.load_formatter(&path("loop-formatter")).expect("load");
    let result = pipeline(
        &adapter,
        &looping,
        &policy,
        &run_events(),
        ArtifactPolicy::Promote,
        &PipelineLimits::default(),
    );
    assert_eq!(result.outputs.len(), 2);
    assert_eq!(result.outputs[0].output.format, Format::Text);
    assert_eq!(result.outputs[0].output.text.as_deref(), Some("<Figure>"));
    assert_eq!(result.notes.len(), 2);
    assert!(
        result.notes[0].contains("timeout") && result.notes[0].contains("loop-formatter"),
        "{:?}",
        result.notes
    );
}

#[test]
fn pipeline_rejects_outputs_when_the_policy_fails() {
    let tiny = CallLimits {
        deadline: Duration::from_millis(100),
        memory_bytes: 4096,
    };
    let strict = host().with_limits(HostLimits {
        policy: tiny,
        ..HostLimits::default()
    });
    let (adapter, formatter, policy) = defaults(&strict);
    let result = pipeline(
        &adapter,
        &formatter,
        &policy,
        &run_events(),
        ArtifactPolicy::Promote,
        &PipelineLimits::default(),
    );
    assert!(
        result
            .outputs
            .iter()
            .all(|o| o.decision == Decision::Reject(RejectReason::PolicyFailed))
    );
    assert!(
        result
            .notes
            .iter()
            .all(|n| n.contains("memory_limit") && n.contains("default-policy")),
        "{:?}",
        result.notes
    );
}

#[test]
fn pipeline_keeps_raw_stream_text_when_the_adapter_fails() {
    let tiny = CallLimits {
        deadline: Duration::from_millis(100),
        memory_bytes: 4096,
    };
    let strict = host().with_limits(HostLimits {
        adapter: tiny,
        ..HostLimits::default()
    });
    let (adapter, formatter, policy) = defaults(&strict);
    let result = pipeline(
        &adapter,
        &formatter,
        &policy,
        &run_events(),
        ArtifactPolicy::Promote,
        &PipelineLimits::default(),
    );
    assert_eq!(result.stdout, vec!["out\n"]);
    assert!(result.outputs.is_empty());
    assert_eq!(result.notes.len(), 1);
    assert!(
        result.notes[0].contains("result adapter failed (memory_limit)"),
        "{:?}",
        result.notes
    );
}

#[test]
fn redact_formatter_example_redacts_secrets() {
    let redact = host()
        .load_formatter(&path("redact-formatter"))
        .expect("load");
    let secret = "key cn_live_abcdef0123456789 aws AKIAABCDEFGHIJKLMNOP password=hunter2 ok";
    let output = redact
        .format(
            rich(vec![text("text/plain", secret)]),
            &FormatLimits::default(),
        )
        .expect("format");
    assert_eq!(
        output.text.as_deref(),
        Some("key [REDACTED] aws [REDACTED] password=[REDACTED] ok")
    );
    assert_eq!(
        output.size,
        output.text.as_ref().map_or(0, |t| t.len() as u64)
    );
}

#[test]
fn check_output_refuses_missing_content_and_wrong_sizes() {
    let mut output = Output {
        kind: OutputKind::DisplayData,
        format: Format::Text,
        mime: "text/plain".into(),
        text: Some("abc".into()),
        bytes: None,
        size: 3,
        truncated: false,
        execution_count: None,
    };
    assert_eq!(check_output(&output), Ok(()));
    output.size = 4;
    assert!(check_output(&output).is_err());
    output.text = None;
    assert!(check_output(&output).is_err());
    output.format = Format::Chart;
    output.text = Some("{not json".into());
    output.size = 9;
    assert!(check_output(&output).is_err());
}

#[test]
fn resolve_takes_absolute_paths_as_is_and_finds_cargo_names() {
    let dir = plugins_dir();
    assert_eq!(
        PluginHost::resolve("/x/y.wasm", dir),
        PathBuf::from("/x/y.wasm")
    );
    assert_eq!(
        PluginHost::resolve("default-policy", dir),
        dir.join("default_policy.wasm")
    );
}

#[test]
fn runner_lines_decode_base64_images_and_keep_json_as_text() {
    use base64::Engine as _;
    let event = serde_json::json!({
        "type": "display_data",
        "data": {
            "image/png": base64::engine::general_purpose::STANDARD.encode(PNG),
            FIGURE_MIME: {"axes": []},
        },
        "metadata": {}
    });
    let line = serde_json::to_vec(&event).expect("json");
    let Ok(RunnerEvent::Raw(RawEvent::DisplayData { bundle, .. })) =
        RunnerEvent::decode(&line, 1 << 20)
    else {
        panic!("not display data");
    };
    assert!(bundle.contains(&MimeItem {
        mime: "image/png".into(),
        data: MimeData::Bytes(PNG.to_vec())
    }));
    assert!(bundle.contains(&text(FIGURE_MIME, r#"{"axes":[]}"#)));
}

#[test]
fn an_oversized_runner_line_is_refused_before_it_is_parsed() {
    let line = vec![b'x'; 1000];
    assert_eq!(
        RunnerEvent::decode(&line, 999),
        Err(DecodeError::TooLarge {
            size: 1000,
            max: 999
        })
    );
    assert!(matches!(
        RunnerEvent::decode(b"{\"type\":\"stream\"}", 999),
        Err(DecodeError::Malformed(_))
    ));
    assert_eq!(
        RunnerEvent::decode(b"{\"type\":\"done\",\"execution_count\":3}", 999),
        Ok(RunnerEvent::Done {
            execution_count: Some(3)
        })
    );
    assert_eq!(
        RunnerEvent::decode(b"{\"type\":\"ready\"}", 999),
        Ok(RunnerEvent::Other)
    );
}

#[test]
fn loaded_plugins_can_move_to_the_blocking_pool() {
    fn send_sync_static<T: Send + Sync + Clone + 'static>() {}
    send_sync_static::<PluginHost>();
    send_sync_static::<Adapter>();
    send_sync_static::<Formatter>();
    send_sync_static::<Policy>();
}

#[test]
fn a_looping_plugin_does_not_hold_up_calls_on_other_threads() {
    let looping = host()
        .load_formatter(&path("loop-formatter"))
        .expect("load");
    let spinner = std::thread::spawn(move || {
        looping.format(
            rich(vec![text("text/plain", "x")]),
            &FormatLimits::default(),
        )
    });
    let good = formatter();
    let start = std::time::Instant::now();
    for _ in 0..20 {
        let output = good.format(
            rich(vec![text("text/plain", "ok")]),
            &FormatLimits::default(),
        );
        assert_eq!(output.map(|o| o.text), Ok(Some("ok".to_owned())));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    let spun = spinner.join().expect("spinner thread");
    assert!(matches!(spun, Err(PluginError::Timeout { .. })), "{spun:?}");
}

fn dataframe_bundle() -> Vec<MimeItem> {
    vec![
        text("text/plain", "   a  b\n0  1  x"),
        text(
            DATAFRAME_MIME,
            r#"{"columns":["a","b"],"index":["0","1"],"rows":[[1,"x"],[2,"y|z"]],"dtypes":["int64","object"],"totalRows":2,"truncated":false}"#,
        ),
    ]
}

#[test]
fn the_python_table_formatter_renders_a_dataframe_as_markdown() {
    let formatter = host()
        .load_formatter(&example("table-formatter"))
        .expect("a componentize-py component loads");
    assert!(
        formatter
            .info()
            .wasi_imports
            .iter()
            .any(|i| i.starts_with("wasi:cli/stdout")),
        "{:?}",
        formatter.info().wasi_imports
    );
    let output = formatter
        .format(rich(dataframe_bundle()), &FormatLimits::default())
        .expect("format");
    assert_eq!(output.format, Format::Markdown);
    assert_eq!(
        output.text.as_deref(),
        Some("|  | a | b |\n|---|---|---|\n| 0 | 1 | x |\n| 1 | 2 | y\\|z |\n")
    );
    // Any other output keeps its best plain representation.
    let plain = formatter
        .format(
            rich(vec![text("text/plain", "42")]),
            &FormatLimits::default(),
        )
        .expect("format");
    assert_eq!(plain.text.as_deref(), Some("42"));
    assert_eq!(plain.format, Format::Text);
}

fn png_of(len: usize) -> Output {
    let mut bytes = PNG.to_vec();
    bytes.resize(len, 0);
    Output {
        kind: OutputKind::DisplayData,
        format: Format::Png,
        mime: "image/png".into(),
        text: None,
        size: bytes.len() as u64,
        bytes: Some(bytes),
        truncated: false,
        execution_count: None,
    }
}

#[test]
fn the_javascript_image_policy_promotes_big_images_and_inlines_the_rest() {
    let policy = host()
        .load_policy(&example("image-policy"))
        .expect("a componentize-js component loads");
    let limits = PolicyLimits::default();
    let big = png_of(100 * 1024);
    let small = png_of(1000);
    assert_eq!(
        policy
            .decide(&big, ArtifactPolicy::Promote, &limits)
            .expect("decide"),
        Decision::Promote
    );
    assert_eq!(
        policy
            .decide(&big, ArtifactPolicy::Inline, &limits)
            .expect("decide"),
        Decision::Reject(RejectReason::RequiresArtifactPromotion)
    );
    for choice in [ArtifactPolicy::Inline, ArtifactPolicy::Promote] {
        assert_eq!(
            policy.decide(&small, choice, &limits).expect("decide"),
            Decision::Inline
        );
    }
    let text = format_one(vec![text("text/plain", "hello")]);
    assert_eq!(
        policy
            .decide(&text, ArtifactPolicy::Inline, &limits)
            .expect("decide"),
        Decision::Inline
    );
}

/// What the Python probe makes of `what` (see plugins/fixtures/py-probe).
fn py_probe(what: &str) -> Result<Output, PluginError> {
    host()
        .load_formatter(&example("py-probe"))
        .expect("load")
        .format(
            rich(vec![text("text/plain", what)]),
            &FormatLimits::default(),
        )
}

#[test]
fn a_python_plugin_that_loops_forever_times_out() {
    let error = py_probe("loop").expect_err("it never returns");
    assert!(matches!(error, PluginError::Timeout { .. }), "{error:?}");
    assert_host_still_works();
}

#[test]
fn a_python_plugin_that_allocates_without_bound_fails_that_call() {
    // Time enough that the memory cap, not the deadline, ends it on a slow
    // machine (zeroing 64 MiB in Python takes longer than 100 ms there).
    let error = host()
        .with_limits(HostLimits {
            formatter: CallLimits {
                deadline: Duration::from_secs(10),
                memory_bytes: 64 << 20,
            },
            ..HostLimits::default()
        })
        .load_formatter(&example("py-probe"))
        .expect("load")
        .format(
            rich(vec![text("text/plain", "alloc")]),
            &FormatLimits::default(),
        )
        .expect_err("the memory cap holds");
    assert!(
        matches!(error, PluginError::MemoryLimit { .. })
            || error.to_string().contains("MemoryError"),
        "{error:?}"
    );
    assert_host_still_works();
}

#[test]
fn a_python_plugin_reaching_for_files_env_or_sockets_fails_that_call() {
    for (what, says) in [
        ("fs", "FileNotFoundError"),
        ("env", "KeyError: 'HOME'"),
        // componentize-py's CPython has no socket module; the WASI-level
        // refusal is the std probe's test.
        ("socket", "socket"),
    ] {
        let error = py_probe(what).expect_err(what);
        assert!(matches!(error, PluginError::Returned { .. }), "{error:?}");
        assert!(error.to_string().contains(says), "{what}: {error}");
    }
    assert_eq!(
        py_probe("print").expect("printing works").text.as_deref(),
        Some("py-probe: print")
    );
    assert_host_still_works();
}

#[test]
fn only_the_supported_crownest_plugin_versions_are_accepted() {
    let imports = |v: &str| {
        vec![
            format!("crownest:plugin/host@{v}"),
            "wasi:io/poll@0.2.0".into(),
        ]
    };
    assert_eq!(unsupported_version(&imports("0.1.0")), None);
    // 0.1.x is served by 0.1.0.
    assert_eq!(unsupported_version(&imports("0.1.3")), None);
    assert_eq!(
        unsupported_version(&imports("9.9.9")).as_deref(),
        Some("9.9.9")
    );
    assert_eq!(unsupported_version(&imports("0.2.0")), None);
    assert_eq!(
        unsupported_version(&imports("0.3.0")).as_deref(),
        Some("0.3.0")
    );
    assert_eq!(unsupported_version(&["wasi:cli/stdout@0.2.9".into()]), None);
}

#[test]
fn a_0_1_0_and_a_0_2_0_component_work_side_by_side() {
    let host = host();
    let old = host
        .load_formatter(&path("default-formatter"))
        .expect("0.1.0");
    let new = host
        .load_formatter(&path("config-formatter"))
        .expect("0.2.0")
        .with_config("[cfg] ");
    assert_eq!(old.info().version, "0.1.0");
    assert_eq!(new.info().version, "0.2.0");
    let bundle = || rich(vec![text("text/plain", "42")]);
    let limits = FormatLimits::default();
    assert_eq!(
        old.format(bundle(), &limits)
            .expect("format")
            .text
            .as_deref(),
        Some("42")
    );
    assert_eq!(
        new.format(bundle(), &limits)
            .expect("format")
            .text
            .as_deref(),
        Some("[cfg] 42")
    );
    // One component, two configs (two templates).
    let other = new.clone().with_config("other: ");
    assert_eq!(
        other
            .format(bundle(), &limits)
            .expect("format")
            .text
            .as_deref(),
        Some("other: 42")
    );
    assert_eq!(
        new.format(bundle(), &limits)
            .expect("format")
            .text
            .as_deref(),
        Some("[cfg] 42")
    );
    // Both versions of a world side by side in one pipeline.
    let result = pipeline(
        &host
            .load_adapter(&path("ipython-adapter"))
            .expect("adapter"),
        &new,
        &policy(),
        &[RawEvent::ExecuteResult {
            bundle: vec![text("text/plain", "7")],
            execution_count: Some(1),
        }],
        ArtifactPolicy::Inline,
        &PipelineLimits::default(),
    );
    assert_eq!(result.notes, Vec::<String>::new());
    assert_eq!(result.outputs[0].output.text.as_deref(), Some("[cfg] 7"));
}

#[test]
fn a_component_for_an_unknown_version_is_refused_naming_the_supported_ones() {
    let error = host()
        .load_formatter(&path("future-formatter"))
        .expect_err("9.9.9 is not linked");
    assert!(matches!(error, PluginError::Load { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("crownest:plugin@9.9.9"), "{message}");
    assert!(
        message.contains("crownest:plugin@0.1.0, crownest:plugin@0.2.0"),
        "{message}"
    );
    assert_host_still_works();
}

#[test]
fn a_plugin_file_that_is_a_symlink_out_of_the_plugins_dir_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let plugins = root.path().join("plugins");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&plugins).expect("plugins");
    std::fs::create_dir_all(&outside).expect("outside");
    let real = path("default-formatter");
    std::fs::copy(&real, outside.join("f.wasm")).expect("copy out");
    std::fs::copy(&real, plugins.join("kept.wasm")).expect("copy in");
    std::os::unix::fs::symlink("../outside/f.wasm", plugins.join("out.wasm")).expect("link");
    std::os::unix::fs::symlink("/etc/shadow", plugins.join("shadow.wasm")).expect("link");
    std::os::unix::fs::symlink("kept.wasm", plugins.join("alias.wasm")).expect("link");

    let host = host();
    for name in ["out", "shadow"] {
        let err = host
            .load_formatter(&PluginHost::resolve(name, &plugins))
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        let message = err.to_string();
        assert!(message.contains("leads outside"), "{name}: {message}");
        assert!(message.contains(&format!("{name}.wasm")), "{message}");
        let imports = wasi_imports_of(&PluginHost::resolve(name, &plugins));
        assert!(
            imports.is_err_and(|e| e.contains("leads outside")),
            "{name}"
        );
    }
    // A symlink that stays inside the directory is an ordinary name.
    host.load_formatter(&PluginHost::resolve("alias", &plugins))
        .expect("alias inside");
    host.load_formatter(&PluginHost::resolve("kept", &plugins))
        .expect("kept");
}
