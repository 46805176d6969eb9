//! `crownest commands ls|get|logs|cancel|signal`: a sandbox's command
//! records, their logs (replayed, or followed live) and their control.

use std::time::Duration;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::exec::{exit_code, follow, log_so_far};
use super::{Api, ClientError, Output, print_json, print_table, segment, text};

/// How long a running command's log must be quiet before `logs` (without
/// `--follow`) counts what it printed as all there is so far.
const QUIET: Duration = Duration::from_millis(500);

#[derive(Subcommand)]
pub enum CommandsCommand {
    /// List a sandbox's commands, newest first.
    #[command(visible_alias = "list")]
    Ls {
        /// The sandbox (`sbx_…`).
        sandbox: String,
        /// Only commands with this status (`running`, `completed`,
        /// `failed`, `timed_out`, `canceled`).
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one command's record (status, exit code, output tails).
    Get { sandbox: String, command: String },
    /// Print a command's output; `--follow` streams it until the command
    /// ends and exits with its exit code.
    Logs {
        sandbox: String,
        command: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Cancel a running command (its process group gets SIGTERM, then SIGKILL).
    Cancel { sandbox: String, command: String },
    /// Send a signal (`TERM`, `SIGINT`, `9`, …) to a running command.
    Signal {
        sandbox: String,
        command: String,
        signal: String,
    },
}

pub async fn run(api: &Api, output: Output, command: CommandsCommand) -> Result<i32, ClientError> {
    let base = |sandbox: &str| format!("/v1/sandboxes/{}/commands", segment(sandbox));
    let one = |sandbox: &str, id: &str| format!("{}/{}", base(sandbox), segment(id));
    match command {
        CommandsCommand::Ls { sandbox, status } => {
            let mut commands = api.list_all(&base(&sandbox)).await?;
            if let Some(status) = &status {
                commands.retain(|c| c["status"].as_str() == Some(status.as_str()));
            }
            if output.json {
                print_json(&json!({ "data": commands }));
            } else {
                let rows: Vec<Vec<String>> = commands
                    .iter()
                    .map(|c| {
                        vec![
                            text(&c["id"]),
                            text(&c["status"]),
                            text(&c["exitCode"]),
                            text(&c["createdAt"]),
                            text(&c["command"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "STATUS", "EXIT", "CREATED", "COMMAND"], &rows);
            }
            Ok(0)
        }
        CommandsCommand::Get { sandbox, command } => {
            let record = api
                .json(api.request(Method::GET, &one(&sandbox, &command)))
                .await?;
            show(output, &record);
            Ok(0)
        }
        CommandsCommand::Logs {
            sandbox,
            command,
            follow: live,
        } => {
            let path = format!("{}/logs", one(&sandbox, &command));
            if live {
                let exit = follow(api, &path, !output.json).await?;
                if output.json {
                    print_json(&exit);
                }
                return Ok(exit_code(&exit));
            }
            if output.json {
                // The record holds the output (its tails past the limit).
                let record = api
                    .json(api.request(Method::GET, &one(&sandbox, &command)))
                    .await?;
                print_json(&json!({
                    "stdout": record["stdout"],
                    "stderr": record["stderr"],
                    "status": record["status"],
                }));
                return Ok(0);
            }
            log_so_far(api, &path, QUIET).await?;
            Ok(0)
        }
        CommandsCommand::Cancel { sandbox, command } => {
            let path = format!("{}/cancel", one(&sandbox, &command));
            let record = api.json(api.request(Method::POST, &path)).await?;
            show(output, &record);
            Ok(0)
        }
        CommandsCommand::Signal {
            sandbox,
            command,
            signal,
        } => {
            let path = format!("{}/signal", one(&sandbox, &command));
            let body = match signal.parse::<i64>() {
                Ok(number) => json!({ "signal": number }),
                Err(_) => json!({ "signal": signal }),
            };
            let record = api
                .json(api.request(Method::POST, &path).json(&body))
                .await?;
            show(output, &record);
            Ok(0)
        }
    }
}

/// One command record: its key fields, one per line.
fn show(output: Output, record: &Value) {
    if output.json {
        print_json(record);
        return;
    }
    println!("id:        {}", text(&record["id"]));
    println!("command:   {}", text(&record["command"]));
    println!("status:    {}", text(&record["status"]));
    println!("exit code: {}", text(&record["exitCode"]));
    if !record["signal"].is_null() {
        println!("signal:    {}", text(&record["signal"]));
    }
    if !record["error"].is_null() {
        println!("error:     {}", text(&record["error"]));
    }
    println!("created:   {}", text(&record["createdAt"]));
    println!("ended:     {}", text(&record["endedAt"]));
}
