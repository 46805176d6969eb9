//! `crownest code run`: runs a snippet in a Code Context, streaming its
//! stdout/stderr live, then prints its rich outputs and its error;
//! `crownest code context create|ls|get|rm|restart` manage the contexts.

use std::io::Write;
use std::path::PathBuf;

use clap::{ArgGroup, Subcommand};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use super::sse::Parser;
use super::{Api, ClientError, Output, print_json, segment, text};

#[derive(Subcommand)]
pub enum CodeCommand {
    /// Run code (`--code TEXT` or a FILE) and exit 1 if it raised.
    #[command(group(ArgGroup::new("source").required(true).args(["code", "file"])))]
    Run {
        /// The sandbox (`sbx_…`).
        sandbox: String,
        /// `python`, `javascript` or `typescript`.
        #[arg(long)]
        language: String,
        /// The code to run.
        #[arg(long)]
        code: Option<String>,
        /// A file holding the code to run.
        file: Option<PathBuf>,
        /// A Code Context (`cctx_…`); the sandbox's default one when absent.
        #[arg(long)]
        context: Option<String>,
    },
    /// Create, list, show, restart and remove Code Contexts.
    Context {
        #[command(subcommand)]
        command: ContextCommand,
    },
}

#[derive(Subcommand)]
pub enum ContextCommand {
    /// Start a new interpreter (a context) and print it.
    Create {
        /// The sandbox (`sbx_…`).
        sandbox: String,
        /// `python`, `javascript` or `typescript`.
        #[arg(long)]
        language: String,
        /// Working directory (default /workspace).
        #[arg(long)]
        cwd: Option<String>,
        /// An environment variable of the interpreter (repeatable).
        #[arg(long = "env", value_name = "K=V", value_parser = super::exec::parse_env)]
        env: Vec<(String, String)>,
    },
    /// List a sandbox's contexts.
    #[command(visible_alias = "list")]
    Ls { sandbox: String },
    /// Show one context.
    Get { sandbox: String, context: String },
    /// Replace a context's interpreter with a fresh one (same id, state
    /// forgotten; a run in progress is killed).
    Restart { sandbox: String, context: String },
    /// Stop a context's interpreter and remove it.
    #[command(visible_alias = "delete")]
    Rm { sandbox: String, context: String },
}

pub async fn run(api: &Api, output: Output, command: CodeCommand) -> Result<i32, ClientError> {
    let (sandbox, language, code, file, context) = match command {
        CodeCommand::Run {
            sandbox,
            language,
            code,
            file,
            context,
        } => (sandbox, language, code, file, context),
        CodeCommand::Context { command } => return contexts(api, output, command).await,
    };
    let code = match (code, file) {
        (Some(code), _) => code,
        (None, Some(file)) => tokio::fs::read_to_string(&file)
            .await
            .map_err(ClientError::io(format!("reading {}", file.display())))?,
        (None, None) => return Err(ClientError::Invalid(String::from("no code to run"))),
    };
    let mut body = json!({ "language": language, "code": code });
    if let Some(context) = context {
        body["contextId"] = json!(context);
    }
    let path = format!("/v1/sandboxes/{}/code/runs", segment(&sandbox));
    let request = api.request(Method::POST, &path).json(&body);
    if output.json {
        // The blocking form answers with the same result `complete` carries.
        let result = api.json(request).await?;
        print_json(&result);
        return Ok(if result["error"].is_null() { 0 } else { 1 });
    }
    let response = api
        .send(request.header(reqwest::header::ACCEPT, "text/event-stream"))
        .await?;
    let mut stream = response.bytes_stream();
    let mut parser = Parser::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| ClientError::Http {
            url: path.clone(),
            source,
        })?;
        for event in parser.push(&chunk) {
            match event.name.as_str() {
                "stdout" => write_out(&event.data["text"], false)?,
                "stderr" => write_out(&event.data["text"], true)?,
                // A run error has `name`; an API failure is the error
                // envelope. The run error is printed with the result.
                "error" if event.data.get("error").is_some() => {
                    return Err(ClientError::from_event(&event.data));
                }
                "complete" => return Ok(print_result(&event.data)),
                _ => {}
            }
        }
    }
    Err(ClientError::Invalid(String::from(
        "the run's stream ended before its result",
    )))
}

async fn contexts(api: &Api, output: Output, command: ContextCommand) -> Result<i32, ClientError> {
    let base = |sandbox: &str| format!("/v1/sandboxes/{}/code/contexts", segment(sandbox));
    let one = |sandbox: &str, id: &str| format!("{}/{}", base(sandbox), segment(id));
    let context = match command {
        ContextCommand::Create {
            sandbox,
            language,
            cwd,
            env,
        } => {
            let mut body = json!({ "language": language });
            if let Some(cwd) = cwd {
                body["cwd"] = json!(cwd);
            }
            if !env.is_empty() {
                body["env"] = env.into_iter().map(|(k, v)| (k, json!(v))).collect();
            }
            api.json(api.request(Method::POST, &base(&sandbox)).json(&body))
                .await?
        }
        ContextCommand::Ls { sandbox } => {
            let list = api.json(api.request(Method::GET, &base(&sandbox))).await?;
            if output.json {
                print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        vec![
                            text(&c["id"]),
                            text(&c["language"]),
                            if c["isDefault"] == true { "yes" } else { "no" }.to_string(),
                            text(&c["cwd"]),
                            text(&c["implementation"]),
                        ]
                    })
                    .collect();
                super::print_table(&["ID", "LANGUAGE", "DEFAULT", "CWD", "INTERPRETER"], &rows);
            }
            return Ok(0);
        }
        ContextCommand::Get { sandbox, context } => {
            api.json(api.request(Method::GET, &one(&sandbox, &context)))
                .await?
        }
        ContextCommand::Restart { sandbox, context } => {
            let path = format!("{}/restart", one(&sandbox, &context));
            api.json(api.request(Method::POST, &path)).await?
        }
        ContextCommand::Rm { sandbox, context } => {
            api.json(api.request(Method::DELETE, &one(&sandbox, &context)))
                .await?
        }
    };
    if output.json {
        print_json(&context);
    } else {
        println!("id:          {}", text(&context["id"]));
        println!("language:    {}", text(&context["language"]));
        println!("interpreter: {}", text(&context["implementation"]));
        println!("cwd:         {}", text(&context["cwd"]));
        println!("default:     {}", context["isDefault"] == true);
    }
    Ok(0)
}

fn write_out(data: &Value, to_stderr: bool) -> Result<(), ClientError> {
    let data = data.as_str().unwrap_or_default().as_bytes();
    let written = if to_stderr {
        let mut err = std::io::stderr().lock();
        err.write_all(data).and_then(|()| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(data).and_then(|()| out.flush())
    };
    written.map_err(ClientError::io("writing the run's output"))
}

/// Prints the outputs (one line each) and the error; returns the exit code.
fn print_result(result: &Value) -> i32 {
    for output in result["outputs"].as_array().into_iter().flatten() {
        println!("{}", describe(output));
    }
    if result["error"].is_null() {
        return 0;
    }
    let error = &result["error"];
    match error["traceback"].as_str() {
        Some(traceback) if !traceback.is_empty() => eprintln!("{}", traceback.trim_end()),
        _ => eprintln!("{}: {}", text(&error["name"]), text(&error["message"])),
    }
    1
}

/// One output as a line: inline text as is, everything else as a marker.
fn describe(output: &Value) -> String {
    let format = text(&output["format"]);
    match output["type"].as_str() {
        Some("inline") => match output["content"].as_str() {
            Some(content) if !is_binary(&format) => content.trim_end_matches('\n').to_string(),
            _ => format!("[inline {format}]"),
        },
        Some("artifact") => format!("[artifact {format} {}]", text(&output["artifactId"])),
        Some("rejected") => format!("[rejected {format}: {}]", text(&output["reason"])),
        _ => output.to_string(),
    }
}

/// Formats whose inline content is base64 of an image, not for a terminal.
fn is_binary(format: &str) -> bool {
    matches!(format, "png" | "jpeg" | "jpg" | "gif" | "webp" | "pdf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_described_in_one_line_each() {
        assert_eq!(
            describe(&json!({"type": "inline", "format": "chart", "content": {"type": "line"}})),
            "[inline chart]"
        );
        assert_eq!(
            describe(&json!({"type": "inline", "format": "text", "content": "42\n"})),
            "42"
        );
        assert_eq!(
            describe(&json!({"type": "inline", "format": "png", "content": "iVBOR"})),
            "[inline png]"
        );
        assert_eq!(
            describe(&json!({"type": "artifact", "format": "png", "artifactId": "art_1"})),
            "[artifact png art_1]"
        );
        assert_eq!(
            describe(
                &json!({"type": "rejected", "format": "png", "reason": "requires_artifact_promotion"})
            ),
            "[rejected png: requires_artifact_promotion]"
        );
    }
}
