//! Tests of the agent client against a fake, misbehaving agent. The real
//! `crownest-agent` binary is tested in `tests/e2e/parts.rs`.

use std::future::poll_fn;

use crownest_proto::ExecRequest;
use tokio::io::AsyncWriteExt;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::*;

fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        id: format!("cmd_test{}", rand::random::<u32>()),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: "/".into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        user: None,
        timeout_ms: None,
        stdin: false,
    }
}

/// A fake agent that handshakes, then answers every stream with `reply`.
async fn fake_agent(reply: Vec<u8>) -> AgentClient {
    let (host, mut agent) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        crownest_proto::handshake::agent_handshake(&mut agent, 5, "fake")
            .await
            .expect("handshake");
        let mut connection = yamux::Connection::new(
            agent.compat(),
            crownest_proto::mux::config(),
            yamux::Mode::Server,
        );
        while let Some(Ok(stream)) = poll_fn(|cx| connection.poll_next_inbound(cx)).await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut stream = stream.compat();
                let _ = stream.write_all(&reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    AgentClient::connect(host).await.expect("connect")
}

#[tokio::test]
async fn oversized_frame_from_agent_is_a_protocol_error() {
    let client = fake_agent(u32::MAX.to_le_bytes().to_vec()).await;
    let mut session = client.exec(request(&["true"])).await.expect("exec");
    assert!(matches!(
        session.next_event().await,
        Some(Err(AgentError::Protocol(_)))
    ));
    assert!(session.next_event().await.is_none());
}

#[tokio::test]
async fn undecodable_event_from_agent_is_a_protocol_error() {
    let client = fake_agent(vec![3, 0, 0, 0, 0xff, 0xff, 0xff]).await;
    assert_eq!(client.boot_id(), 5);
    let mut session = client.exec(request(&["true"])).await.expect("exec");
    assert!(matches!(
        session.next_event().await,
        Some(Err(AgentError::Protocol(_)))
    ));
    assert!(matches!(client.ping().await, Err(AgentError::Protocol(_))));
}

#[tokio::test]
async fn client_notices_a_closed_connection() {
    let (host, mut agent) = tokio::io::duplex(1 << 16);
    let agent_task = tokio::spawn(async move {
        crownest_proto::handshake::agent_handshake(&mut agent, 5, "fake")
            .await
            .expect("handshake");
        drop(agent);
    });
    let client = AgentClient::connect(host).await.expect("connect");
    agent_task.await.expect("join");
    assert!(client.ping().await.is_err());
    assert!(client.is_closed());
}
