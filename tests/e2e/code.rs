//! Code Contexts and Code Runs (seed 000): interpreter state, errors as
//! results, streaming, limits, timeouts and interpreter deaths.

use crownest_e2e::{SseParser, code_run as run, error_code, joined, shared};
use futures::StreamExt;
use serde_json::{Value, json};

on_each_runtime! {
async fn seed_000_context_keeps_state_and_the_default_context_is_reused(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let (status, context) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/contexts"),
            json!({ "language": "python" }),
        )
        .await;
    assert_eq!(status, 201, "{context}");
    let context_id = context["id"].as_str().expect("id").to_string();
    assert!(context_id.starts_with("cctx_"));
    assert_eq!(context["language"], "python");

    run(
        &client,
        &sandbox,
        json!({ "language": "python", "contextId": context_id, "code": "value = 42" }),
    )
    .await;
    let result = run(
        &client,
        &sandbox,
        json!({ "language": "python", "contextId": context_id, "code": "print(value)" }),
    )
    .await;
    assert_eq!(joined(&result["stdout"]), "42\n");
    assert_eq!(result["contextId"], context_id.as_str());
    assert!(result["error"].is_null());

    // Without contextId: a default context is created, then reused.
    let first = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "x = 1" }),
    )
    .await;
    let second = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "x + 1" }),
    )
    .await;
    assert_eq!(first["contextId"], second["contextId"]);
    assert_ne!(
        first["contextId"],
        context_id.as_str(),
        "the default is its own context"
    );
    assert_eq!(second["executionCount"], 2);
    // IPython's In/Out history works, and keeps no database in /workspace.
    let history = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "print(In[1], _ + 1)" }),
    )
    .await;
    assert_eq!(joined(&history["stdout"]), "x = 1 3\n", "{history}");
    let listing = client.run(&sandbox, "ls -A /workspace").await;
    assert!(
        !listing["stdout"]
            .as_str()
            .expect("stdout")
            .contains(".ipython"),
        "{listing}"
    );

    let (_, list) = client
        .get(&format!("/v1/sandboxes/{sandbox}/code/contexts"))
        .await;
    assert_eq!(list["data"].as_array().expect("data").len(), 2);
    let (status, _) = client
        .delete(&format!(
            "/v1/sandboxes/{sandbox}/code/contexts/{context_id}"
        ))
        .await;
    assert_eq!(status, 200);
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "contextId": context_id, "code": "1" }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn an_exception_is_a_result_with_name_and_traceback(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let result = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "1/0" }),
    )
    .await;
    assert_eq!(result["error"]["name"], "ZeroDivisionError");
    assert_eq!(result["error"]["message"], "division by zero");
    assert!(
        result["error"]["traceback"]
            .as_str()
            .expect("traceback")
            .contains("ZeroDivisionError")
    );
    client.kill(&sandbox).await;
}
}

#[tokio::test]
async fn javascript_keeps_let_state_and_typescript_with_annotations_runs() {
    let client = shared().client();
    let sandbox = client.sandbox("node").await;
    let (status, js) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/contexts"),
            json!({ "language": "javascript" }),
        )
        .await;
    assert_eq!(status, 201, "{js}");
    let js = js["id"].as_str().expect("id").to_string();
    run(
        &client,
        &sandbox,
        json!({ "language": "javascript", "contextId": js, "code": "let counter = 41" }),
    )
    .await;
    let result = run(&client, &sandbox, json!({ "language": "javascript", "contextId": js, "code": "counter += 1; console.log('counter', counter)" })).await;
    assert_eq!(joined(&result["stdout"]), "counter 42\n");
    let awaited = run(&client, &sandbox, json!({ "language": "javascript", "contextId": js, "code": "const later = await Promise.resolve(counter * 2)\nlater" })).await;
    assert!(awaited["error"].is_null(), "{awaited}");

    let ts = run(
        &client,
        &sandbox,
        json!({ "language": "typescript", "code": "const n: number = 40\nfunction add(a: number, b: number): number { return a + b }\nconsole.log(add(n, 2))" }),
    )
    .await;
    assert!(ts["error"].is_null(), "{ts}");
    assert_eq!(joined(&ts["stdout"]), "42\n");

    // A JavaScript context cannot run TypeScript, and node has no python.
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "typescript", "contextId": js, "code": "1" }),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "context_language_mismatch")
    );
    let (status, body) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
            json!({ "language": "python", "code": "1" }),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "unsupported_code_language")
    );
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn languages_and_limits_are_validated() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let runs = format!("/v1/sandboxes/{sandbox}/code/runs");
    let (status, body) = client
        .post(&runs, json!({ "language": "cobol", "code": "1" }))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "unsupported_code_language")
    );
    let (status, body) = client.post(&runs, json!({ "code": "1" })).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_request"),
        "language is required"
    );
    let (status, body) = client
        .post(
            &runs,
            json!({ "language": "python", "code": "#".repeat(1024 * 1024 + 1) }),
        )
        .await;
    assert_eq!((status, error_code(&body)), (413, "code_source_too_large"));
    let (status, context) = client
        .post(
            &format!("/v1/sandboxes/{sandbox}/code/contexts"),
            json!({ "language": "python" }),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = client
        .post(
            &runs,
            json!({ "language": "javascript", "contextId": context["id"], "code": "1" }),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "unsupported_code_language"),
        "{body}"
    );
    client.kill(&sandbox).await;
}

on_each_runtime! {
async fn a_timeout_interrupts_the_run_and_the_context_keeps_its_state(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "kept = 'still here'" }),
    )
    .await;
    let result = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "while True: pass", "timeoutMs": 1000 }),
    )
    .await;
    assert_eq!(result["error"]["name"], "KeyboardInterrupt", "{result}");
    assert_eq!(result["interpreterRestarted"], false);
    let after = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "print(kept)" }),
    )
    .await;
    assert_eq!(joined(&after["stdout"]), "still here\n");
    assert_eq!(after["stateLost"], false);
    client.kill(&sandbox).await;
}
}

on_each_runtime! {
async fn a_dead_interpreter_is_reported_and_replaced_with_the_loss_explicit(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "kept = 1" }),
    )
    .await;
    let died = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "import os; os._exit(3)" }),
    )
    .await;
    assert_eq!(died["interpreterRestarted"], true, "{died}");
    assert_eq!(died["error"]["name"], "InterpreterDied");
    let next = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "'kept' in globals()" }),
    )
    .await;
    assert_eq!(next["stateLost"], true, "{next}");
    assert_eq!(
        next["contextId"], died["contextId"],
        "the same context, with a fresh interpreter"
    );
    client.kill(&sandbox).await;
}
}

async fn stream_run(
    client: &crownest_e2e::Client,
    sandbox: &str,
    body: Value,
    key: Option<&str>,
) -> Vec<crownest_e2e::SseEvent> {
    let mut request = client
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{sandbox}/code/runs"),
        )
        .header("accept", "text/event-stream")
        .json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/event-stream")
    );
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        events.extend(parser.push(&chunk.expect("chunk")));
        if events.iter().any(|e| e.event == "complete") {
            break;
        }
    }
    events
}

on_each_runtime! {
async fn a_streamed_run_sends_stdout_before_complete_and_complete_equals_the_blocking_result(template) {
    let client = shared().client();
    let sandbox = client.sandbox(template).await;
    let code = "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.2)\n1/0";
    let events = stream_run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": code }),
        None,
    )
    .await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    let first_stdout = names
        .iter()
        .position(|n| *n == "stdout")
        .expect("stdout events");
    let complete = names
        .iter()
        .position(|n| *n == "complete")
        .expect("complete");
    assert!(first_stdout < complete);
    assert!(names.contains(&"error"), "{names:?}");
    assert!(
        events.iter().all(|e| e.id.is_none()),
        "code run streams carry no event ids"
    );
    let streamed = &events[complete].data;
    let blocking = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": code }),
    )
    .await;
    for field in ["contextId", "stdout", "stderr", "outputs"] {
        assert_eq!(streamed[field], blocking[field], "{field}");
    }
    for field in ["name", "message"] {
        assert_eq!(
            streamed["error"][field], blocking["error"][field],
            "error {field}"
        );
    }
    assert_eq!(joined(&streamed["stdout"]), "tick 0\ntick 1\ntick 2\n");

    // Replaying a completed idempotency key emits one complete event.
    let body = json!({ "language": "python", "code": "print('once')" });
    let key = format!("stream-once-{template}");
    let first = stream_run(&client, &sandbox, body.clone(), Some(&key)).await;
    let replay = stream_run(&client, &sandbox, body, Some(&key)).await;
    assert_eq!(replay.len(), 1, "{replay:?}");
    assert_eq!(replay[0].event, "complete");
    assert_eq!(replay[0].data, first.last().expect("complete").data);
    client.kill(&sandbox).await;
}
}

/// The built-in python template, as an operator copies it to edit.
fn python_template() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/python.toml"),
    )
    .expect("python template")
}

/// A server whose operator template dir holds `(name, TOML)` files as
/// `<name>.toml`; the dir lives as long as the returned handle.
fn server_with_templates(templates: &[(&str, &str)]) -> (crownest_e2e::Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("templates dir");
    for (name, text) in templates {
        std::fs::write(dir.path().join(format!("{name}.toml")), text).expect("write template");
    }
    let server = crownest_e2e::Server::start_with_env(&[(
        "CROWNEST_TEMPLATES_DIR",
        dir.path().to_str().expect("utf8 path"),
    )]);
    (server, dir)
}

fn output_of<'a>(result: &'a Value, format: &str) -> &'a Value {
    result["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["format"] == format)
        .unwrap_or_else(|| panic!("no {format} output in {result}"))
}

#[tokio::test]
async fn rich_outputs_go_through_the_wasm_pipeline() {
    let client = shared().client();
    let sandbox = client.sandbox("python").await;
    let plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [2, 4, 8], label='growth')\nplt.title('Growth')\nplt.xlabel('step')\nplt.ylabel('value')";

    // Inline policy: the PNG needs promotion, the chart is inlined in E2B's shape.
    let inline = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": plot }),
    )
    .await;
    let png = output_of(&inline, "png");
    assert_eq!(png["type"], "rejected", "{inline}");
    assert_eq!(png["reason"], "requires_artifact_promotion");
    let chart = output_of(&inline, "chart");
    assert_eq!(chart["type"], "inline", "{chart}");
    assert_eq!(chart["content"]["type"], "line");
    assert_eq!(chart["content"]["title"], "Growth");
    assert_eq!(chart["content"]["x_label"], "step");
    assert_eq!(chart["content"]["y_label"], "value");
    assert_eq!(chart["content"]["elements"][0]["label"], "growth");
    assert_eq!(
        chart["content"]["elements"][0]["points"][2],
        json!([3.0, 8.0])
    );

    // Promote policy: the PNG becomes an Artifact that downloads as a PNG.
    let promoted = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": plot, "artifactPolicy": "promote" }),
    )
    .await;
    let png = output_of(&promoted, "png");
    assert_eq!(png["type"], "artifact", "{promoted}");
    let artifact = png["artifactId"].as_str().expect("artifact id");
    let bytes = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/artifacts/{artifact}/content"),
        )
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    // A DataFrame is data; _repr_html_ is html; an unknown MIME type is refused.
    let frame = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})" }),
    )
    .await;
    let data = output_of(&frame, "data");
    assert_eq!(data["type"], "inline", "{frame}");
    let html = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "class Page:\n    def _repr_html_(self):\n        return '<b>hi</b>'\nPage()", "artifactPolicy": "promote" }),
    )
    .await;
    assert_eq!(output_of(&html, "html")["type"], "artifact", "{html}");
    let odd = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "from IPython.display import display\ndisplay({'application/x-crownest-test': 'x'}, raw=True)" }),
    )
    .await;
    let rejected = odd["outputs"].as_array().expect("outputs");
    assert_eq!(rejected.len(), 1, "{odd}");
    assert_eq!(rejected[0]["type"], "rejected");
    assert_eq!(rejected[0]["reason"], "unsupported_format");
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_template_pointing_at_the_example_plugin_changes_outputs() {
    // The operator copies the python template and swaps in the example
    // redact-formatter (examples/redact-formatter, built with the plugins).
    let python = python_template();
    assert!(python.contains("formatter = \"default-formatter\""));
    let redacting = python.replace(
        "formatter = \"default-formatter\"",
        "formatter = \"redact-formatter\"",
    );
    let (server, _templates) = server_with_templates(&[("python", &redacting)]);
    let client = server.client(&server.key("redact-org", None, "all"));
    let sandbox = client.sandbox("python").await;
    let code = "'token=' + 'cn_live_' + 'A' * 40";
    let result = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": code }),
    )
    .await;
    let text = output_of(&result, "text")["content"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(text.contains("[REDACTED]"), "{result}");
    assert!(!text.contains("cn_live_AAAA"), "{result}");
    // The default template shows the same value unredacted.
    let default_client = shared().client();
    let default_sandbox = default_client.sandbox("python").await;
    let plain = run(
        &default_client,
        &default_sandbox,
        json!({ "language": "python", "code": code }),
    )
    .await;
    assert!(
        output_of(&plain, "text")["content"]
            .as_str()
            .expect("text")
            .contains("cn_live_AAAA")
    );
    default_client.kill(&default_sandbox).await;
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_std_rust_plugin_runs_in_a_code_run_and_what_wasi_denies_fails_only_that_output() {
    // The operator swaps in plugins/fixtures/std-probe: a formatter built
    // with std (it imports WASI) that tries, on request, what WASI denies.
    let probing = python_template().replace(
        "formatter = \"default-formatter\"",
        "formatter = \"std-probe\"",
    );
    let (server, _templates) = server_with_templates(&[("python", &probing)]);
    let client = server.client(&server.key("std-org", None, "all"));

    let (_, listed) = client.get("/v1/templates").await;
    let python = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["name"] == "python")
        .expect("python");
    let imports = python["languages"][0]["formatter"]["wasiImports"]
        .as_array()
        .expect("the std plugin's WASI imports are listed")
        .clone();
    assert!(
        imports.iter().any(|i| i
            .as_str()
            .is_some_and(|i| i.starts_with("wasi:filesystem/"))),
        "{imports:?}"
    );

    let sandbox = client.sandbox("python").await;
    let ran = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "'std'" }),
    )
    .await;
    let text = output_of(&ran, "text")["content"].as_str().expect("text");
    assert!(text.starts_with("std-probe: year>2020:true"), "{ran}");

    for (probe, error) in [
        ("fs", "cannot read /etc/passwd"),
        ("env", "cannot read HOME"),
        ("socket", "access-denied"),
    ] {
        let code = format!("print('before'); '{probe}'");
        let result = run(
            &client,
            &sandbox,
            json!({ "language": "python", "code": code }),
        )
        .await;
        // Only the output falls back (to plain text); the run is whole.
        assert_eq!(result["stdout"], json!(["before", "\n"]), "{result}");
        let text = output_of(&result, "text")["content"]
            .as_str()
            .expect("text");
        assert_eq!(text, format!("'{probe}'"), "{result}");
        let notes = result["notes"].to_string();
        assert!(
            notes.contains("std-probe") && notes.contains(error),
            "{probe}: {result}"
        );
    }
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn python_and_javascript_plugins_shape_a_code_run() {
    // The operator points the python template at the Python table
    // formatter and the JavaScript image policy (examples/, built by
    // scripts/build-plugin-examples).
    let python = python_template();
    let swapped = python
        .replace(
            "formatter = \"default-formatter\"",
            "formatter = \"table-formatter\"",
        )
        .replace("policy = \"default-policy\"", "policy = \"image-policy\"");
    assert_ne!(swapped, python);
    let (server, _templates) = server_with_templates(&[("python", &swapped)]);
    let client = server.client(&server.key("polyglot-org", None, "all"));
    let sandbox = client.sandbox("python").await;

    let table = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})" }),
    )
    .await;
    let markdown = output_of(&table, "markdown");
    assert_eq!(markdown["type"], "inline", "{table}");
    assert_eq!(
        markdown["content"], "|  | a | b |\n|---|---|---|\n| 0 | 1 | x |\n| 1 | 2 | y |\n",
        "{table}"
    );

    // A figure of more than 64 KiB is promoted; a small one stays inline.
    let plot = |dpi: u32| {
        format!(
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nimport numpy as np\n\
             fig = plt.figure(figsize=(8, 6), dpi={dpi})\nx = np.linspace(0, 20, 400)\n\
             for k in range(12): plt.plot(x, np.sin(x * (k + 1)) * np.cos(x / (k + 2)))\nplt.show()"
        )
    };
    let big = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": plot(200), "artifactPolicy": "promote" }),
    )
    .await;
    let png = output_of(&big, "png");
    assert_eq!(png["type"], "artifact", "{big}");
    let small = run(
        &client,
        &sandbox,
        json!({ "language": "python", "code": plot(20), "artifactPolicy": "promote" }),
    )
    .await;
    let png = output_of(&small, "png");
    assert_eq!(png["type"], "inline", "{small}");
    assert_eq!(small["notes"], json!([]), "{small}");
    client.kill(&sandbox).await;
}

#[tokio::test]
async fn a_0_2_0_formatter_gets_the_template_config_beside_0_1_0_plugins() {
    // One 0.2.0 component (plugins/fixtures/config-formatter) in two
    // templates with different configs, beside the 0.1.0 adapter and policy.
    let source = python_template();
    let mut templates = Vec::new();
    for (name, config) in [("python", "[first] "), ("python-second", "[second] ")] {
        let template = source
            .replace("name = \"python\"", &format!("name = \"{name}\""))
            .replace(
                "formatter = \"default-formatter\"",
                &format!("formatter = \"config-formatter\"\nformatter_config = \"{config}\""),
            );
        assert!(template.contains("formatter_config"));
        templates.push((name, template));
    }
    let files: Vec<(&str, &str)> = templates.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let (server, _templates) = server_with_templates(&files);
    let client = server.client(&server.key("config-org", None, "all"));
    for (name, expected) in [("python", "[first] 42"), ("python-second", "[second] 42")] {
        let sandbox = client.sandbox(name).await;
        let result = run(
            &client,
            &sandbox,
            json!({ "language": "python", "code": "6 * 7" }),
        )
        .await;
        assert_eq!(output_of(&result, "text")["content"], expected, "{result}");
        client.kill(&sandbox).await;
    }
}
