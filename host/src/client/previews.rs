//! `crownest previews create|ls|rm`.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Api, ClientError, Output, print_json, print_table, segment, text};

#[derive(Subcommand)]
pub enum PreviewsCommand {
    /// Expose PORT of a sandbox as an authenticated URL; prints the URL and
    /// the browser URL (with the token, shown this once).
    Create { sandbox: String, port: u16 },
    /// List a sandbox's previews (closed ones included).
    #[command(visible_alias = "list")]
    Ls { sandbox: String },
    /// Show one preview.
    Get { sandbox: String, preview: String },
    /// Close a preview; its URL stops working at once.
    Rm { sandbox: String, preview: String },
}

pub async fn run(api: &Api, output: Output, command: PreviewsCommand) -> Result<i32, ClientError> {
    match command {
        PreviewsCommand::Create { sandbox, port } => {
            let preview = api
                .json(
                    api.request(
                        Method::POST,
                        &format!("/v1/sandboxes/{}/previews", segment(&sandbox)),
                    )
                    .json(&json!({ "port": port })),
                )
                .await?;
            if output.json {
                print_json(&preview);
            } else {
                show(&preview);
                println!("browser:  {}", text(&preview["browserUrl"]));
            }
        }
        PreviewsCommand::Get { sandbox, preview } => {
            let path = format!(
                "/v1/sandboxes/{}/previews/{}",
                segment(&sandbox),
                segment(&preview)
            );
            let preview = api.json(api.request(Method::GET, &path)).await?;
            if output.json {
                print_json(&preview);
            } else {
                show(&preview);
            }
        }
        PreviewsCommand::Ls { sandbox } => {
            let previews = api
                .list_all(&format!("/v1/sandboxes/{}/previews", segment(&sandbox)))
                .await?;
            if output.json {
                print_json(&json!({ "data": previews }));
            } else {
                let rows: Vec<Vec<String>> = previews
                    .iter()
                    .map(|p| {
                        vec![
                            text(&p["id"]),
                            text(&p["port"]),
                            text(&p["status"]),
                            text(&p["createdAt"]),
                            text(&p["url"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "PORT", "STATUS", "CREATED", "URL"], &rows);
            }
        }
        PreviewsCommand::Rm { sandbox, preview } => {
            let closed = api
                .json(api.request(
                    Method::DELETE,
                    &format!(
                        "/v1/sandboxes/{}/previews/{}",
                        segment(&sandbox),
                        segment(&preview)
                    ),
                ))
                .await?;
            if output.json {
                print_json(&closed);
            } else {
                show(&closed);
            }
        }
    }
    Ok(0)
}

fn show(preview: &Value) {
    println!("id:       {}", text(&preview["id"]));
    println!("port:     {}", text(&preview["port"]));
    println!("status:   {}", text(&preview["status"]));
    println!("url:      {}", text(&preview["url"]));
}
