//! One host session: a yamux server over an already handshaken transport,
//! dispatching each inbound logical stream by its [`Open`] frame.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crownest_proto::frame::{read_message, write_message};
use crownest_proto::{Open, Pong};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::{Shared, archive, execs, files, stats, tunnel, watch};
use crownest_proto::code::ContextReply;

/// Serves logical streams until the session ends (clean close: `Ok`).
/// Streams already handed out keep running as tasks; execs outlive the
/// session (a later one attaches to them again).
pub async fn serve<T>(io: T, shared: Arc<Shared>) -> Result<(), yamux::ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = yamux::Connection::new(
        io.compat(),
        crownest_proto::mux::config(),
        yamux::Mode::Server,
    );
    loop {
        match poll_fn(|cx| connection.poll_next_inbound(cx)).await {
            Some(Ok(stream)) => {
                tokio::spawn(handle_stream(stream, shared.clone()));
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

async fn handle_stream(stream: yamux::Stream, shared: Arc<Shared>) {
    let (mut reader, mut writer) = tokio::io::split(stream.compat());
    let open = match read_message::<Open, _>(&mut reader).await {
        Ok(Some(open)) => open,
        Ok(None) => return,
        Err(e) => {
            eprintln!("crownest-agent: bad open frame, dropping stream: {e}");
            return;
        }
    };
    match open {
        Open::Ping => {
            let pong = Pong {
                boot_id: shared.boot_id,
                running: shared.running.load(Ordering::Relaxed),
            };
            if write_message(&mut writer, &pong).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        }
        Open::Exec(request) => execs::open(request, reader, writer, shared).await,
        Open::ExecAttach(request) => execs::attach(request, reader, writer, shared).await,
        Open::ExecList => execs::list(writer, &shared).await,
        file @ (Open::FileStat { .. }
        | Open::FileList { .. }
        | Open::FileRead { .. }
        | Open::FileWrite(_)
        | Open::FileMove { .. }
        | Open::FileMkdir { .. }
        | Open::FileRemove { .. }) => {
            files::serve(file, files::Workspace::default(), reader, writer).await;
        }
        Open::CodeContextCreate(request) => {
            let reply = shared.contexts.create(request).await;
            reply_once(&mut writer, &reply).await;
        }
        Open::CodeContextDelete { context_id } => {
            let reply: ContextReply = shared.contexts.delete(&context_id);
            reply_once(&mut writer, &reply).await;
        }
        Open::CodeContextList => {
            let reply = ContextReply::Contexts(shared.contexts.held());
            reply_once(&mut writer, &reply).await;
        }
        Open::CodeContextRestart { context_id } => {
            let reply = shared.contexts.restart(&context_id).await;
            reply_once(&mut writer, &reply).await;
        }
        Open::Stats => {
            let stats = stats::collect(shared.vm).await;
            if write_message(&mut writer, &stats).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        }
        Open::FileWatch { path, recursive } => {
            watch::serve(
                &shared,
                files::Workspace::default(),
                &path,
                recursive,
                reader,
                writer,
            )
            .await;
        }
        Open::CodeRun(request) => shared.contexts.run(request, writer).await,
        Open::TcpConnect { port } => tunnel::serve(port, reader, writer).await,
        Open::ArchiveExtract(request) => archive::serve(request, reader, writer).await,
        Open::EgressListen => shared.egress.offer(reader, writer).await,
    }
}

async fn reply_once<W: AsyncWrite + Unpin>(writer: &mut W, reply: &ContextReply) {
    if write_message(writer, reply).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}
