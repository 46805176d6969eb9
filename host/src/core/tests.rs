//! Unit tests of the core against the fake runtime and its in-process agent
//! (`runtime::fake`): sandbox lifecycle, the reaper with an injected clock,
//! commands, and the Code Run pipeline. No runc, rootfs or network.

use std::sync::Arc;
use std::time::Duration;

use super::code::{ArtifactPolicy, RunCode, RunOutput};
use super::*;
use crate::auth::{self, Principal};
use crate::config::{Config, Limits};
use crate::model::{CollectItem, CommandStatus, EndReason, SandboxStatus};
use crate::plugins::RejectReason;
use crate::runtime::fake::FakeRuntime;
use crate::store::{AuditFilter, SqliteStore, StoreHandle};
use crate::templates::{Template, TemplateSet, TemplateSource};

/// A host over an in-memory store and the fake runtime.
pub(crate) struct TestHost {
    pub host: Arc<Host>,
    pub runtime: Arc<FakeRuntime>,
    pub store: StoreHandle,
    pub clock: Clock,
    _dir: tempfile::TempDir,
}

/// A template whose Code Runs use plugins that do not exist, to see the
/// pipeline fail closed.
const BROKEN_PLUGINS: &str = r#"
name = "broken"
description = "python with plugins that are not there"
[rootfs]
suite = "bookworm"
variant = "minbase"
packages = ["python3"]
[runtime]
kind = "oci"
[resources]
vcpus = 1
memoryMiB = 256
pids = 64
diskMiB = 64
[network]
mode = "none"
[user]
uid = 1000
gid = 1000
name = "user"
[languages.python]
adapter = "/nonexistent/adapter.wasm"
formatter = "/nonexistent/formatter.wasm"
policy = "/nonexistent/policy.wasm"
"#;

pub(crate) fn test_host_with(limits: Limits) -> TestHost {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StoreHandle::new(SqliteStore::open_in_memory().expect("store"));
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        cache_dir: dir.path().join("cache"),
        templates_dir: None,
        runtime_binary: "runc".into(),
        agent_binary: "crownest-agent".into(),
        preview_domain: None,
        runsc_binary: "runsc".into(),
        destroy_on_shutdown: false,
        egress: crate::egress::Settings::default(),
        limits,
    };
    std::fs::create_dir_all(&config.data_dir).expect("data dir");
    let mut templates: Vec<Template> = TemplateSet::load(None)
        .expect("templates")
        .iter()
        .cloned()
        .collect();
    templates.push(
        Template::parse(BROKEN_PLUGINS, TemplateSource::Builtin("broken.toml"), None)
            .expect("broken template"),
    );
    let templates = TemplateSet::from_templates(templates);
    let runtime = Arc::new(FakeRuntime::new(&dir.path().join("sandboxes")));
    let clock = Clock::system();
    let blobs = crate::blobs::BlobStore::open(dir.path().join("blobs")).expect("blobs");
    let host = Host::new(
        config,
        store.clone(),
        clock.clone(),
        templates,
        crate::runtime::Runtimes::new(vec![runtime.clone()]),
        blobs,
    );
    // Mark every template's rootfs as built: the fake runtime needs none,
    // but the check after a build looks for the languages' interpreters.
    for template in host.templates().iter() {
        let rootfs = host.rootfs().path_for(template);
        std::fs::create_dir_all(rootfs.join("usr/bin")).expect("rootfs dir");
        for program in ["python3", "node"] {
            std::fs::write(rootfs.join("usr/bin").join(program), "").expect("interpreter");
        }
    }
    TestHost {
        host,
        runtime,
        store,
        clock,
        _dir: dir,
    }
}

pub(crate) fn test_host() -> TestHost {
    test_host_with(Limits::default())
}

impl TestHost {
    /// A new host process on the same store, data dir and runtime, as after
    /// a crash of this one (nothing of the old one is shut down).
    pub fn restarted(&self) -> Arc<Host> {
        Host::new(
            self.host.config().clone(),
            self.store.clone(),
            self.clock.clone(),
            (*self.host.templates()).clone(),
            crate::runtime::Runtimes::new(vec![self.runtime.clone()]),
            crate::blobs::BlobStore::open(self.host.config().data_dir.join("blobs2"))
                .expect("blobs"),
        )
    }

    /// A principal of org `org` with `scopes` (`all` for every scope).
    pub fn principal(&self, org: &str, scopes: &str) -> Principal {
        let minted = auth::mint_key(
            self.store.blocking(),
            org,
            None,
            None,
            auth::parse_scopes(scopes).expect("scopes"),
            0,
        )
        .expect("mint");
        auth::authenticate(self.store.blocking(), &minted.secret)
            .expect("authenticate")
            .expect("known key")
    }

    pub async fn sandbox(&self, principal: &Principal, template: &str) -> crate::store::SandboxRow {
        self.host
            .create_sandbox(
                principal,
                CreateSandbox {
                    template: template.into(),
                    ..CreateSandbox::default()
                },
            )
            .await
            .expect("create")
    }

    pub async fn run(
        &self,
        principal: &Principal,
        sandbox: &str,
        command: &str,
    ) -> crate::store::CommandRow {
        self.host
            .run_command(
                principal,
                sandbox,
                RunCommand {
                    command: command.into(),
                    ..RunCommand::default()
                },
                None,
            )
            .await
            .expect("run")
    }

    fn audit_actions(&self, org_id: &str) -> Vec<(String, String)> {
        let filter = AuditFilter {
            org_id: org_id.to_string(),
            limit: 100,
            ..AuditFilter::default()
        };
        self.store
            .blocking()
            .list_audit(&filter)
            .expect("audit")
            .into_iter()
            .map(|r| {
                (
                    r.action.name().to_string(),
                    format!("{:?}", r.details.reason),
                )
            })
            .collect()
    }
}

#[tokio::test]
async fn a_created_sandbox_runs_and_a_kill_leaves_a_tombstone() {
    let t = test_host();
    let p = t.principal("acme", "all");

    let row = t.sandbox(&p, "python").await;

    assert_eq!(row.status, SandboxStatus::Running);
    assert!(t.runtime.sandbox(&row.id).is_some());
    let pong = t
        .host
        .live_sandbox(&row.id)
        .expect("live")
        .agent
        .ping()
        .await;
    assert!(pong.is_ok());
    let killed = t.host.kill_sandbox(&p, &row.id).await.expect("kill");
    assert_eq!(killed.status, SandboxStatus::Destroyed);
    assert_eq!(killed.end_reason, Some(EndReason::Killed));
    assert!(t.runtime.sandbox(&row.id).is_none());
    assert!(matches!(
        t.host.kill_sandbox(&p, &row.id).await,
        Err(CoreError::SandboxDestroyed(_))
    ));
}

#[tokio::test]
async fn a_failed_start_leaves_only_a_failed_tombstone() {
    let t = test_host();
    let p = t.principal("acme", "all");
    t.runtime
        .fail_next_start
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let err = t
        .host
        .create_sandbox(
            &p,
            CreateSandbox {
                template: "python".into(),
                ..CreateSandbox::default()
            },
        )
        .await
        .expect_err("start fails");

    assert!(matches!(err, CoreError::Runtime(_)), "{err}");
    let listed = t
        .host
        .list_sandboxes(&p, Default::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, SandboxStatus::Destroyed);
    assert_eq!(listed[0].end_reason, Some(EndReason::Failed));
}

#[tokio::test]
async fn another_orgs_sandbox_is_not_found() {
    let t = test_host();
    let a = t.principal("a", "all");
    let b = t.principal("b", "all");
    let row = t.sandbox(&a, "python").await;
    assert!(matches!(
        t.host.get_sandbox(&b, &row.id).await,
        Err(CoreError::NotFound { .. })
    ));
    assert!(matches!(
        t.host.kill_sandbox(&b, &row.id).await,
        Err(CoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn the_reaper_destroys_an_expired_sandbox_by_the_injected_clock() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let row = t
        .host
        .create_sandbox(
            &p,
            CreateSandbox {
                template: "python".into(),
                ttl_ms: Some(5_000),
                ..CreateSandbox::default()
            },
        )
        .await
        .expect("create");

    t.host.reap_once().await.expect("reap");
    assert_eq!(
        t.host.get_sandbox(&p, &row.id).await.expect("get").status,
        SandboxStatus::Running
    );
    t.clock.advance(5_001);
    t.host.reap_once().await.expect("reap");

    let after = t.host.get_sandbox(&p, &row.id).await.expect("get");
    assert_eq!(after.status, SandboxStatus::Destroyed);
    assert_eq!(after.end_reason, Some(EndReason::Expired));
    assert!(t.runtime.sandbox(&row.id).is_none());
    let audit = t.audit_actions(&p.org_id);
    assert!(
        audit
            .iter()
            .any(|(a, reason)| a == "sandbox.destroy" && reason.contains("Expired")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn the_reaper_destroys_a_sandbox_whose_agent_went_away() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let row = t.sandbox(&p, "python").await;
    t.runtime.crash(&row.id);
    let live = t.host.live_sandbox(&row.id).expect("live");
    for _ in 0..100 {
        if live.agent.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.host.reap_once().await.expect("reap");
    let after = t.host.get_sandbox(&p, &row.id).await.expect("get");
    assert_eq!(after.end_reason, Some(EndReason::Failed));
}

#[tokio::test]
async fn create_validates_ttl_and_metadata_before_anything_starts() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let limits = Limits::default();
    for ttl in [0, limits.max_ttl_ms + 1] {
        let err = CreateSandbox {
            template: "python".into(),
            ttl_ms: Some(ttl),
            ..CreateSandbox::default()
        }
        .validate(&limits)
        .expect_err("bad ttl");
        assert!(matches!(err, CoreError::Invalid { field: "ttlMs", .. }));
    }
    let mut metadata = crate::model::Metadata::new();
    metadata.insert("k".into(), "x".repeat(limits.max_metadata_bytes).into());
    let err = t
        .host
        .create_sandbox(
            &p,
            CreateSandbox {
                template: "python".into(),
                metadata,
                ..CreateSandbox::default()
            },
        )
        .await
        .expect_err("big metadata");
    assert!(matches!(
        err,
        CoreError::Invalid {
            field: "metadata",
            ..
        }
    ));
    assert_eq!(
        t.runtime.starts.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_command_runs_to_completion_and_a_nonzero_exit_is_a_result() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;

    let ok = t.run(&p, &sandbox.id, "echo hello; echo oops >&2").await;
    assert_eq!(ok.status, CommandStatus::Completed);
    assert_eq!(ok.exit_code, Some(0));
    assert_eq!(ok.stdout, b"hello\n");
    assert_eq!(ok.stderr, b"oops\n");
    let failed = t.run(&p, &sandbox.id, "exit 3").await;
    assert_eq!(failed.status, CommandStatus::Completed);
    assert_eq!(failed.exit_code, Some(3));

    let stored = t
        .host
        .get_command(&p, &sandbox.id, &ok.id)
        .await
        .expect("get");
    assert_eq!(stored.stdout, b"hello\n");
}

#[tokio::test]
async fn a_command_that_outlives_its_timeout_is_timed_out() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let row = t
        .host
        .run_command(
            &p,
            &sandbox.id,
            RunCommand {
                command: "sleep 30".into(),
                timeout_ms: Some(100),
                ..RunCommand::default()
            },
            None,
        )
        .await
        .expect("run");
    assert_eq!(row.status, CommandStatus::TimedOut);
    assert!(row.error.is_some());
}

#[tokio::test]
async fn a_background_command_can_be_canceled_and_its_log_ends_with_the_exit() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let started = t
        .host
        .run_command(
            &p,
            &sandbox.id,
            RunCommand {
                command: "echo first; sleep 30".into(),
                background: true,
                ..RunCommand::default()
            },
            None,
        )
        .await
        .expect("run");
    assert_eq!(started.status, CommandStatus::Running);
    let mut log = t
        .host
        .command_log(&p, &sandbox.id, &started.id, 0)
        .await
        .expect("log");
    let first = log.recv().await.expect("event").expect("ok");
    assert!(matches!(
        &first.body,
        crate::store::LogBody::Output { data, .. } if data == b"first\n"
    ));

    let canceled = t
        .host
        .cancel_command(&p, &sandbox.id, &started.id)
        .await
        .expect("cancel");

    assert_eq!(canceled.status, CommandStatus::Canceled);
    assert!(canceled.cancel_requested_at.is_some());
    let mut last = None;
    while let Some(event) = log.recv().await {
        last = Some(event.expect("ok"));
    }
    match last.map(|e| e.body) {
        Some(crate::store::LogBody::Exit(exit)) => assert_eq!(exit.status, CommandStatus::Canceled),
        other => panic!("the log did not end with the exit: {other:?}"),
    }
    assert!(matches!(
        t.host.cancel_command(&p, &sandbox.id, &started.id).await,
        Err(CoreError::CommandNotRunning(_))
    ));
}

#[tokio::test]
async fn a_finished_commands_log_replays_from_the_store_and_resumes_after_a_seq() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let row = t
        .run(
            &p,
            &sandbox.id,
            "for i in 1 2 3; do echo $i; sleep 0.02; done",
        )
        .await;
    let collect = |mut log: CommandLog| async move {
        let mut events = Vec::new();
        while let Some(event) = log.recv().await {
            events.push(event.expect("ok"));
        }
        events
    };
    let all = collect(
        t.host
            .command_log(&p, &sandbox.id, &row.id, 0)
            .await
            .expect("log"),
    )
    .await;
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    let resumed = collect(
        t.host
            .command_log(&p, &sandbox.id, &row.id, 1)
            .await
            .expect("log"),
    )
    .await;
    assert_eq!(resumed.first().map(|e| e.seq), Some(2));
    assert_eq!(resumed.len(), all.len() - 1);
}

#[tokio::test]
async fn a_bad_command_body_is_invalid_even_for_a_destroyed_sandbox() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    t.host.kill_sandbox(&p, &sandbox.id).await.expect("kill");

    let err = t
        .host
        .run_command(
            &p,
            &sandbox.id,
            RunCommand {
                command: String::new(),
                ..RunCommand::default()
            },
            None,
        )
        .await
        .expect_err("invalid");

    assert!(
        matches!(
            err,
            CoreError::Invalid {
                field: "command",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn collect_needs_the_artifacts_create_scope() {
    let t = test_host();
    let p = t.principal("acme", "commands:run,sandboxes:create");
    let sandbox = t.sandbox(&p, "python").await;
    let err = t
        .host
        .run_command(
            &p,
            &sandbox.id,
            RunCommand {
                command: "echo x > out.txt".into(),
                collect: vec![CollectItem {
                    path: "out.txt".into(),
                    name: None,
                }],
                ..RunCommand::default()
            },
            None,
        )
        .await
        .expect_err("no scope");
    assert!(matches!(err, CoreError::MissingScope("artifacts:create")));
}

async fn run_code(
    t: &TestHost,
    p: &Principal,
    sandbox: &str,
    code: &str,
) -> super::code::RunCodeResult {
    let request = RunCode {
        language: crownest_proto::code::Language::Python,
        code: code.into(),
        context_id: None,
        artifact_policy: ArtifactPolicy::Inline,
        timeout_ms: Some(5_000),
    }
    .validate()
    .expect("valid");
    let target = t
        .host
        .context_for_run(p, sandbox, &request)
        .await
        .expect("context");
    t.host
        .run_code(p, &target, request, None)
        .await
        .expect("run")
}

#[tokio::test]
async fn a_code_run_keeps_state_in_its_default_context_and_reports_errors_as_results() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;

    let first = run_code(&t, &p, &sandbox.id, "set x 42\nprint set").await;
    let second = run_code(&t, &p, &sandbox.id, "get x").await;
    let failed = run_code(&t, &p, &sandbox.id, "raise ValueError bad value").await;

    assert_eq!(first.context_id, second.context_id);
    assert_eq!(second.stdout, ["42\n"]);
    let error = failed.error.expect("error");
    assert_eq!(
        (error.name.as_str(), error.message.as_str()),
        ("ValueError", "bad value")
    );
}

#[tokio::test]
async fn a_plugin_fault_drops_rich_outputs_with_a_note_and_keeps_the_run() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "broken").await;

    let result = run_code(&t, &p, &sandbox.id, "print still here\nresult 42").await;

    assert_eq!(result.stdout, ["still here\n"]);
    assert!(result.outputs.is_empty(), "{:?}", result.outputs);
    assert!(
        result
            .notes
            .iter()
            .any(|n| n.contains("output pipeline is unavailable")),
        "{:?}",
        result.notes
    );
}

#[tokio::test]
async fn an_oversized_output_is_rejected_before_it_is_parsed() {
    let t = test_host_with(Limits {
        max_run_event_bytes: 64 * 1024,
        ..Limits::default()
    });
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "broken").await;

    let result = run_code(&t, &p, &sandbox.id, "big 200000\nprint after").await;

    assert_eq!(result.stdout, ["after\n"]);
    assert_eq!(
        result.outputs,
        [RunOutput::Rejected {
            format: crate::plugins::Format::Unknown,
            reason: RejectReason::OutputTooLarge,
        }]
    );
}

#[tokio::test]
async fn a_code_run_that_outlives_its_timeout_reports_a_timeout_error() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let request = RunCode {
        language: crownest_proto::code::Language::Python,
        code: "sleep 10000".into(),
        context_id: None,
        artifact_policy: ArtifactPolicy::Inline,
        timeout_ms: Some(50),
    }
    .validate()
    .expect("valid");
    let target = t
        .host
        .context_for_run(&p, &sandbox.id, &request)
        .await
        .expect("context");
    let result = t
        .host
        .run_code(&p, &target, request, None)
        .await
        .expect("run");
    assert_eq!(
        result.error.map(|e| e.name),
        Some(String::from("TimeoutError"))
    );
}

#[test]
fn run_code_validation_bounds_source_and_timeout() {
    let base = || RunCode {
        language: crownest_proto::code::Language::Python,
        code: String::from("1"),
        context_id: None,
        artifact_policy: ArtifactPolicy::Inline,
        timeout_ms: None,
    };
    assert_eq!(
        base().validate().expect("valid").timeout_ms,
        super::code::DEFAULT_RUN_TIMEOUT_MS
    );
    let big = RunCode {
        code: "#".repeat(super::code::MAX_CODE_BYTES + 1),
        ..base()
    };
    assert!(matches!(
        big.validate(),
        Err(CoreError::CodeTooLarge { .. })
    ));
    let zero = RunCode {
        timeout_ms: Some(0),
        ..base()
    };
    assert!(matches!(
        zero.validate(),
        Err(CoreError::Invalid {
            field: "timeoutMs",
            ..
        })
    ));
}

/// Regression: the 513th concurrent agent stream used to make yamux tear
/// the connection down, and the reaper then destroyed the sandbox.
#[tokio::test]
async fn streams_past_the_budget_are_busy_and_the_sandbox_survives() {
    let t = test_host_with(Limits {
        max_agent_streams: 3,
        agent_stream_wait_ms: 100,
        ..Limits::default()
    });
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    for _ in 0..3 {
        t.host
            .run_command(
                &p,
                &sandbox.id,
                RunCommand {
                    command: "sleep 30".into(),
                    background: true,
                    ..RunCommand::default()
                },
                None,
            )
            .await
            .expect("background");
    }

    let busy = t
        .host
        .run_command(
            &p,
            &sandbox.id,
            RunCommand {
                command: "true".into(),
                ..RunCommand::default()
            },
            None,
        )
        .await;

    assert!(
        matches!(busy, Err(CoreError::SandboxBusy { .. })),
        "{busy:?}"
    );
    let live = t.host.live_sandbox(&sandbox.id).expect("still live");
    assert!(!live.agent.is_closed());
    t.host.reap_once().await.expect("reap");
    assert_eq!(
        t.host
            .get_sandbox(&p, &sandbox.id)
            .await
            .expect("get")
            .status,
        SandboxStatus::Running
    );
}

#[tokio::test]
async fn a_restarted_host_takes_over_live_sandboxes_with_their_contexts() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let kept = t.sandbox(&p, "python").await;
    let crashed = t.sandbox(&p, "python").await;
    let context = t
        .host
        .create_context(
            &p,
            &kept.id,
            crownest_proto::code::Language::Python,
            None,
            Vec::new(),
        )
        .await
        .expect("context");
    t.runtime.crash(&crashed.id);
    t.host.crash_for_test();

    let host = t.restarted();
    let report = host.reconcile().await.expect("reconcile");
    assert_eq!(report.adopted, vec![kept.id.clone()]);
    assert_eq!(report.destroyed.len(), 1, "{report:?}");
    assert!(
        t.runtime.sandbox(&kept.id).is_some(),
        "the container was kept"
    );

    let row = host.get_sandbox(&p, &kept.id).await.expect("get");
    assert_eq!(row.status, SandboxStatus::Running);
    let contexts = host.list_contexts(&p, &kept.id).await.expect("contexts");
    assert_eq!(
        contexts.iter().map(|c| &c.id).collect::<Vec<_>>(),
        [&context.id]
    );
    let echoed = host
        .run_command(
            &p,
            &kept.id,
            RunCommand {
                command: "echo still here".into(),
                ..RunCommand::default()
            },
            None,
        )
        .await
        .expect("run");
    assert_eq!(echoed.stdout, b"still here\n");

    let gone = host.get_sandbox(&p, &crashed.id).await.expect("get");
    assert_eq!(gone.status, SandboxStatus::Destroyed);
    assert_eq!(gone.end_reason, Some(EndReason::HostRestart));
}

#[tokio::test]
async fn a_template_whose_runtime_is_unavailable_is_refused_with_the_reason() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let missing = t.host.config().data_dir.join("no-such-runsc");
    let gvisor = Arc::new(crate::runtime::GvisorRuntime::new(
        missing,
        t.host.config().data_dir.join("runsc"),
    ));
    let mut runtimes = crate::runtime::Runtimes::new(vec![t.runtime.clone(), gvisor]);
    runtimes
        .check(t.host.templates().iter().map(|t| t.runtime))
        .await;
    let host = Host::new(
        t.host.config().clone(),
        t.store.clone(),
        t.clock.clone(),
        (*t.host.templates()).clone(),
        runtimes,
        crate::blobs::BlobStore::open(t.host.config().data_dir.join("blobs2")).expect("blobs"),
    );
    let refused = host
        .create_sandbox(
            &p,
            CreateSandbox {
                template: "python-gvisor".into(),
                ..CreateSandbox::default()
            },
        )
        .await;
    match refused {
        Err(CoreError::RuntimeUnavailable {
            template,
            runtime,
            reason,
        }) => {
            assert_eq!((template.as_str(), runtime), ("python-gvisor", "gvisor"));
            assert!(reason.contains("apt-get install runsc"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing was recorded, and the oci templates still work.
    let listed = host
        .list_sandboxes(&p, Default::default(), None, 10)
        .await
        .expect("list");
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        host.runtimes()
            .unavailable(crate::runtime::Isolation::Oci)
            .is_none()
    );
}

mod workspace_runs {
    use super::*;
    use crate::core::workspace_runs::CreateRun;
    use crate::model::{RunEventBody, RunReason, RunStatus};
    use futures::stream;

    async fn uploaded_run(t: &TestHost, p: &Principal, command: &str) -> String {
        let archive = b"not really a tar: the fake agent only counts bytes".to_vec();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&archive))
        };
        let run = t
            .host
            .create_run(
                p,
                CreateRun {
                    command: command.into(),
                    archive_size: archive.len() as i64,
                    archive_sha256: sha,
                    ..CreateRun::default()
                },
            )
            .await
            .expect("create");
        // A wrong upload keeps the run waiting; the right one is kept.
        let wrong = stream::iter([Ok(bytes::Bytes::from_static(b"short"))]);
        assert!(matches!(
            t.host.upload_archive(p, &run.id, wrong).await,
            Err(CoreError::ArchiveSizeMismatch { .. })
        ));
        let body = stream::iter([Ok(bytes::Bytes::from(archive))]);
        let uploaded = t
            .host
            .upload_archive(p, &run.id, body)
            .await
            .expect("upload");
        assert!(uploaded.archive_uploaded);
        run.id
    }

    async fn wait_evidence(host: &Host, p: &Principal, id: &str) -> crate::store::WorkspaceRunRow {
        for _ in 0..400 {
            let run = host.get_run(p, id).await.expect("get");
            if run.evidence_ready {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("run {id} never got its evidence");
    }

    #[tokio::test]
    async fn a_run_goes_through_its_phases_and_ends_signed_with_its_sandbox_gone() {
        let t = test_host();
        let p = t.principal("acme", "all");
        let id = uploaded_run(&t, &p, "echo hello").await;
        let started = t.host.start_run(&p, &id).await.expect("start");
        assert_eq!(started.status, RunStatus::Queued);
        assert!(matches!(
            t.host.start_run(&p, &id).await,
            Err(CoreError::RunAlreadyStarted(_))
        ));
        let run = wait_evidence(&t.host, &p, &id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.exit_code, Some(0));
        let page = t
            .host
            .run_event_page(&p, &id, 0, 1000)
            .await
            .expect("events");
        assert!(page.terminal);
        let kinds: Vec<&str> = page.events.iter().map(|e| e.body.kind()).collect();
        assert_eq!(kinds.first(), Some(&"status"));
        assert_eq!(kinds.last(), Some(&"terminal"));
        assert!(
            page.events
                .iter()
                .any(|e| matches!(&e.body, RunEventBody::Stdout { data } if data == "hello\n"))
        );
        let seqs: Vec<i64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());

        let sandbox = run.sandbox_id.expect("sandbox");
        let row = t.host.get_sandbox(&p, &sandbox).await.expect("sandbox");
        assert_eq!(row.status, SandboxStatus::Destroyed);
        let document = t.host.run_evidence(&p, &id).await.expect("evidence");
        let keys = t.host.evidence_keys().await.expect("keys");
        let (bundle, _) = crate::evidence::verify(&document, &keys).expect("verifies");
        assert_eq!(bundle["status"], "succeeded");
        assert_eq!(bundle["events"]["count"], page.events.len());
    }

    /// Starts a run of `command` and waits until its log has stdout.
    async fn running_with_output(t: &TestHost, p: &Principal, command: &str) -> String {
        let id = uploaded_run(t, p, command).await;
        t.host.start_run(p, &id).await.expect("start");
        for _ in 0..400 {
            let page = t
                .host
                .run_event_page(p, &id, 0, 1000)
                .await
                .expect("events");
            if page
                .events
                .iter()
                .any(|e| matches!(e.body, RunEventBody::Stdout { .. }))
            {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("run {id} never printed");
    }

    #[tokio::test]
    async fn a_run_whose_sandbox_died_with_the_host_ends_as_host_restart_with_evidence() {
        let t = test_host();
        let p = t.principal("acme", "all");
        let id = running_with_output(&t, &p, "echo before; sleep 30").await;
        let sandbox = t
            .host
            .get_run(&p, &id)
            .await
            .expect("get")
            .sandbox_id
            .expect("sandbox");
        t.runtime.crash(&sandbox);
        t.host.crash_for_test();
        let host = t.restarted();
        host.reconcile().await.expect("reconcile");
        let runs = host.reconcile_runs().await.expect("runs");
        assert_eq!((runs.resumed, runs.ended), (0, 1));
        let run = wait_evidence(&host, &p, &id).await;
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.reason, Some(RunReason::HostRestart));
        let again = host.reconcile_runs().await.expect("again");
        assert_eq!((again.resumed, again.ended), (0, 0));
    }
}

#[tokio::test]
async fn a_timeout_moves_the_expiry_within_the_ttl_bounds_and_the_reaper_follows_it() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let limits = t.host.config().limits.clone();
    for bad in [0, limits.min_ttl_ms - 1, limits.max_ttl_ms + 1] {
        let err = t
            .host
            .set_sandbox_timeout(&p, &sandbox.id, bad)
            .await
            .expect_err("out of bounds");
        assert!(
            matches!(err, CoreError::Invalid { field: "ttlMs", .. }),
            "{err}"
        );
    }
    let now = t.host.clock().now_ms();
    let moved = t
        .host
        .set_sandbox_timeout(&p, &sandbox.id, limits.max_ttl_ms)
        .await
        .expect("extend");
    // The clock is real: the expiry is max TTL from a moment during the call.
    let after = t.host.clock().now_ms();
    assert!(
        (now + limits.max_ttl_ms..=after + limits.max_ttl_ms).contains(&moved.expires_at),
        "{} not within [{now}, {after}] + {}",
        moved.expires_at,
        limits.max_ttl_ms
    );
    let stranger = t.principal("other", "all");
    let err = t
        .host
        .set_sandbox_timeout(&stranger, &sandbox.id, 60_000)
        .await
        .expect_err("another org");
    assert!(matches!(err, CoreError::NotFound { .. }), "{err}");

    t.host
        .set_sandbox_timeout(&p, &sandbox.id, limits.min_ttl_ms)
        .await
        .expect("shorten");
    t.host.clock().advance(limits.min_ttl_ms);
    t.host.reap_once().await.expect("reap");
    let row = t.host.get_sandbox(&p, &sandbox.id).await.expect("get");
    assert_eq!(row.end_reason, Some(EndReason::Expired));
    let err = t
        .host
        .set_sandbox_timeout(&p, &sandbox.id, 60_000)
        .await
        .expect_err("destroyed");
    assert!(matches!(err, CoreError::SandboxDestroyed(_)), "{err}");
}

#[tokio::test]
async fn restarting_a_context_keeps_it_and_an_unknown_one_is_not_found() {
    let t = test_host();
    let p = t.principal("acme", "all");
    let sandbox = t.sandbox(&p, "python").await;
    let context = t
        .host
        .create_context(
            &p,
            &sandbox.id,
            crownest_proto::code::Language::Python,
            None,
            Vec::new(),
        )
        .await
        .expect("context");
    let restarted = t
        .host
        .restart_context(&p, &sandbox.id, &context.id)
        .await
        .expect("restart");
    assert_eq!(restarted.id, context.id);
    let listed = t.host.list_contexts(&p, &sandbox.id).await.expect("list");
    assert_eq!(listed.len(), 1);
    let err = t
        .host
        .restart_context(&p, &sandbox.id, "cctx_missing")
        .await
        .expect_err("unknown");
    assert!(matches!(err, CoreError::NotFound { .. }), "{err}");
}
