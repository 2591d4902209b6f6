//! `keywarden-plugin-sdk`: write a keywarden rotation plugin in Rust as a trait impl plus `main`.
//!
//! ```no_run
//! use keywarden_plugin_sdk::{serve, ErrReply, Hello, KindInfo, OkReply, Plugin, Request, Secret};
//!
//! struct Echo;
//!
//! impl Plugin for Echo {
//!     fn hello(&self) -> Hello {
//!         Hello {
//!             keywarden_plugin: 1,
//!             name: "echo".into(),
//!             version: "0.1.0".into(),
//!             kinds: [("echo".to_string(), KindInfo { ops: vec!["create".into()], overlap: None })]
//!                 .into(),
//!         }
//!     }
//!
//!     async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
//!         match request.op.as_str() {
//!             "create" => Ok(OkReply::credential(
//!                 request.proposed.unwrap_or_else(|| Secret::new("x")),
//!                 Default::default(),
//!             )),
//!             _ => Err(ErrReply::unsupported()),
//!         }
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     serve(Echo)
//! }
//! ```
//!
//! [`serve`] writes the hello line, answers requests concurrently (each in its own task),
//! replies `unsupported op` to anything the plugin does not handle, and exits 0 on `shutdown`
//! (after answering what is in flight) or when stdin closes. A closed stdin means the daemon
//! died: calls in flight are abandoned at once, because nobody will record their results and
//! the restarted daemon repeats them (idempotently); finishing them, or letting an SDK retry
//! them, could create a credential nobody knows about.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod broker;
pub mod protocol;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

pub use protocol::{
    Credential, ErrReply, Hello, KindInfo, MAX_LINE_BYTES, Meta, OkReply, Op, PLUGIN_FLAG,
    PROTOCOL_VERSION, Reply, Request, Secret,
};

/// A rotation plugin.
pub trait Plugin: Send + Sync + 'static {
    /// The first line: name, version and the kinds served.
    fn hello(&self) -> Hello;

    /// Answers one request. Called concurrently; never with `shutdown`.
    fn handle(&self, request: Request) -> impl Future<Output = Result<OkReply, ErrReply>> + Send;
}

/// Runs `plugin` on stdin/stdout until `shutdown` or end of input. Returns the exit code.
pub fn serve<P: Plugin>(plugin: P) -> ExitCode {
    if !std::env::args().any(|a| a == PLUGIN_FLAG) {
        eprintln!(
            "this is a keywarden plugin: keywarden starts it with {PLUGIN_FLAG} and speaks JSON \
             lines to it. Pin it in the config with `keywarden plugin pin PATH`."
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_io(
        Arc::new(plugin),
        tokio::io::stdin(),
        tokio::io::stdout(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plugin I/O failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The serve loop over any reader and writer (tests use in-memory pipes).
pub async fn serve_io<P, R, W>(plugin: Arc<P>, input: R, mut output: W) -> std::io::Result<()>
where
    P: Plugin,
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let hello = serde_json::to_string(&plugin.hello()).expect("hello serializes");
    output.write_all(&protocol::line(&hello)).await?;
    output.flush().await?;

    let (tx, mut rx) = mpsc::channel::<Zeroizing<String>>(64);
    let writer = tokio::spawn(async move {
        while let Some(json) = rx.recv().await {
            output.write_all(&protocol::line(&json)).await?;
            output.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });

    let mut input = BufReader::new(input);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let mut line = Zeroizing::new(Vec::new());
        let n = (&mut input)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            // The daemon is gone: abandon what is in flight (see the crate docs).
            tasks.abort_all();
            break;
        }
        if line.len() > MAX_LINE_BYTES && !line.ends_with(b"\n") {
            eprintln!("request line longer than {MAX_LINE_BYTES} bytes; ignored");
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            input.read_until(b'\n', &mut rest).await?;
            continue;
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let id = serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
                match id {
                    Some(id) => {
                        let reply =
                            Reply::new(id, Err(ErrReply::fatal(format!("bad request: {e}"))));
                        let _ = tx.send(encode(&reply)).await;
                    }
                    None => eprintln!("unparseable request line ignored: {e}"),
                }
                continue;
            }
        };
        if request.op() == Some(Op::Shutdown) {
            break;
        }
        let plugin = plugin.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let id = request.id;
            let result = if request.op().is_none() {
                Err(ErrReply::unsupported())
            } else {
                plugin.handle(request).await
            };
            let _ = tx.send(encode(&Reply::new(id, result))).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    drop(tx);
    writer.await.expect("writer task")?;
    Ok(())
}

fn encode(reply: &Reply) -> Zeroizing<String> {
    Zeroizing::new(serde_json::to_string(reply).expect("replies serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Upper;

    impl Plugin for Upper {
        fn hello(&self) -> Hello {
            Hello {
                keywarden_plugin: PROTOCOL_VERSION,
                name: "upper".into(),
                version: "1".into(),
                kinds: [(
                    "upper".to_string(),
                    KindInfo {
                        ops: vec!["create".into()],
                        overlap: None,
                    },
                )]
                .into(),
            }
        }

        async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
            match request.op() {
                Some(Op::Create) => {
                    // Answer out of order: the later request finishes first.
                    if request.id == 1 {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    // A call that would outlive the daemon.
                    if request.id == 99 {
                        std::future::pending::<()>().await;
                    }
                    let p = request.proposed.unwrap_or_default();
                    Ok(OkReply::credential(
                        Secret::new(p.expose().to_uppercase()),
                        Meta::new(),
                    ))
                }
                _ => Err(ErrReply::unsupported()),
            }
        }
    }

    #[tokio::test]
    async fn serves_over_an_in_memory_pipe() {
        let (mut daemon_side, plugin_side) = tokio::io::duplex(1 << 16);
        let (read_half, write_half) = tokio::io::split(plugin_side);
        let server = tokio::spawn(serve_io(Arc::new(Upper), read_half, write_half));
        daemon_side
            .write_all(
                b"{\"id\":1,\"op\":\"create\",\"proposed\":\"abc\"}\n\
                  {\"id\":2,\"op\":\"create\",\"proposed\":\"xyz\"}\n\
                  {\"id\":3,\"op\":\"teleport\"}\n\
                  not json\n\
                  {\"id\":4,\"op\":\"shutdown\"}\n",
            )
            .await
            .unwrap();
        server.await.unwrap().unwrap();
        let mut out = String::new();
        daemon_side.read_to_string(&mut out).await.unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["keywarden_plugin"], 1);
        let by_id = |id: u64| lines.iter().find(|l| l["id"] == id).unwrap().clone();
        assert_eq!(by_id(1)["ok"]["value"], "ABC");
        assert_eq!(by_id(2)["ok"]["value"], "XYZ");
        assert_eq!(by_id(3)["err"]["message"], "unsupported op");
        // Replies come in completion order: 2 (and 3) before 1.
        let order: Vec<u64> = lines[1..]
            .iter()
            .map(|l| l["id"].as_u64().unwrap())
            .collect();
        assert!(order.iter().position(|&i| i == 2) < order.iter().position(|&i| i == 1));
        assert_eq!(lines.len(), 4, "no reply to shutdown or garbage: {out}");
    }

    #[tokio::test]
    async fn a_closed_stdin_abandons_calls_in_flight() {
        let (mut daemon_side, plugin_side) = tokio::io::duplex(1 << 16);
        let (read_half, write_half) = tokio::io::split(plugin_side);
        let server = tokio::spawn(serve_io(Arc::new(Upper), read_half, write_half));
        daemon_side
            .write_all(b"{\"id\":99,\"op\":\"create\",\"proposed\":\"abc\"}\n")
            .await
            .unwrap();
        daemon_side.shutdown().await.unwrap(); // the daemon died
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the plugin exits without finishing the call")
            .unwrap()
            .unwrap();
        let mut out = String::new();
        daemon_side.read_to_string(&mut out).await.unwrap();
        assert_eq!(out.lines().count(), 1, "only the hello: {out}");
    }
}
