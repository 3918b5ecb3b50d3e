//! Debug data commands over the public API: send, history, tail.

use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

use crate::api::pb::chat_store_client::ChatStoreClient;
use crate::api::pb::{self, ChangeKind};

async fn router(addr: &str) -> anyhow::Result<ChatStoreClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad router address {addr:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the router at {addr}; is it running? (check --router)")
        })?;
    Ok(ChatStoreClient::new(channel))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn body_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn send(
    addr: &str,
    chat: u64,
    sender: u64,
    client_msg_id: u64,
    body: String,
    json: bool,
) -> anyhow::Result<i32> {
    let mut c = router(addr).await?;
    let r = c
        .send(pb::SendRequest {
            chat_id: chat,
            sender_id: sender,
            client_msg_id,
            body: body.into_bytes().into(),
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"chat": chat, "seq": r.seq, "pts": r.pts, "created_at_ms": r.created_at_ms, "duplicate": r.duplicate, "client_msg_id": client_msg_id})
        );
    } else {
        println!(
            "sent: chat {chat} seq {} pts {}{}",
            r.seq,
            r.pts,
            if r.duplicate {
                " (duplicate of an earlier send)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

pub async fn history(
    addr: &str,
    chat: u64,
    limit: u32,
    before: u64,
    json: bool,
) -> anyhow::Result<i32> {
    let mut c = router(addr).await?;
    let r = c
        .get_history(pb::GetHistoryRequest {
            chat_id: chat,
            before_seq: before,
            limit,
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        let msgs: Vec<_> = r
            .messages
            .iter()
            .map(|m| serde_json::json!({"seq": m.seq, "sender": m.sender_id, "body": body_text(&m.body), "created_at_ms": m.created_at_ms, "edited_at_ms": m.edited_at_ms, "deleted": m.deleted}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"chat": chat, "served_by_node": r.served_by_node, "messages": msgs})
        );
    } else {
        println!("{:>8} {:>10}  BODY", "SEQ", "SENDER");
        for m in &r.messages {
            let body = if m.deleted {
                "(deleted)".to_string()
            } else {
                body_text(&m.body)
            };
            let edited = if m.edited_at_ms > 0 { " (edited)" } else { "" };
            println!("{:>8} {:>10}  {body}{edited}", m.seq, m.sender_id);
        }
    }
    Ok(0)
}

pub async fn tail(addr: &str, chat: u64, from_pts: u64, json: bool) -> anyhow::Result<i32> {
    let mut c = router(addr).await?;
    let mut stream = c
        .watch(pb::WatchRequest {
            cursors: vec![pb::Cursor {
                chat_id: chat,
                pts: from_pts,
            }],
        })
        .await
        .map_err(status_err)?
        .into_inner();
    loop {
        let event = tokio::select! {
            e = stream.message() => e.map_err(status_err)?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let Some(event) = event else {
            eprintln!("watch stream ended");
            return Ok(2);
        };
        if event.reset_required {
            println!("pts {}: cursor too old; re-read the history", event.pts);
            continue;
        }
        let Some(ch) = event.change else { continue };
        let kind = ChangeKind::try_from(ch.kind).unwrap_or(ChangeKind::Unspecified);
        if json {
            println!(
                "{}",
                serde_json::json!({"pts": ch.pts, "kind": kind.as_str_name(), "seq": ch.seq, "user": ch.user_id, "body": ch.message.as_ref().map(|m| body_text(&m.body))})
            );
        } else {
            let body = ch
                .message
                .as_ref()
                .map(|m| body_text(&m.body))
                .unwrap_or_default();
            println!(
                "pts {:>6}  {:<15} seq {:>6}  user {:>6}  {body}",
                ch.pts,
                kind.as_str_name(),
                ch.seq,
                ch.user_id
            );
        }
    }
}
