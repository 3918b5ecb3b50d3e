//! Debug data commands over the public API: send, history, tail.

use std::time::Duration;

use anyhow::Context;

use crate::security::AuthChannel;

use crate::api::pb::chat_store_client::ChatStoreClient;
use crate::api::pb::{self, ChangeKind};

async fn router(addr: &str) -> anyhow::Result<ChatStoreClient<AuthChannel>> {
    let access = super::access();
    let endpoint = crate::security::endpoint(addr)
        .context("router address")?
        .connect_timeout(Duration::from_secs(3))
        // Each call's answer (a Watch: its start), so a router that hangs
        // does not hang the command.
        .timeout(Duration::from_secs(30));
    let channel =
        crate::security::connect(endpoint, access.tls.as_ref(), crate::security::ROUTER_NAME)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the router at {addr}; is it running? (check --router and --ca)"
                )
            })?;
    Ok(ChatStoreClient::with_interceptor(
        channel,
        access.token.clone(),
    ))
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
                serde_json::json!({"pts": ch.pts, "kind": kind.as_str_name(), "seq": ch.seq, "user": ch.user_id, "body": ch.message.as_ref().map(|m| body_text(&m.body)), "reason": ch.reason})
            );
        } else {
            let body = match &ch.message {
                Some(m) => body_text(&m.body),
                None if !ch.reason.is_empty() => format!("reason: {}", ch.reason),
                None => String::new(),
            };
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

/// A chat's state from the router, with its shard and replicas from the
/// nodes (`placement`, or why they could not be asked).
pub async fn chat_info(
    addr: &str,
    chat: u64,
    placement: anyhow::Result<serde_json::Value>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut c = router(addr).await?;
    let r = c
        .get_chat(pb::GetChatRequest {
            chat_id: chat,
            consistency: pb::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        let cursors: Vec<_> = r
            .read_cursors
            .iter()
            .map(|c| serde_json::json!({"reader": c.reader_id, "seq": c.seq}))
            .collect();
        let placement = match &placement {
            Ok(p) => p.clone(),
            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
        };
        println!(
            "{}",
            serde_json::json!({"chat": chat, "last_seq": r.last_seq, "pts": r.pts, "closed": r.closed, "close_reason": r.close_reason, "read_cursors": cursors, "placement": placement})
        );
    } else {
        println!("chat      {chat}");
        match &placement {
            Ok(p) => {
                println!(
                    "shard     {} (slot {}, preferred region {})",
                    p["shard"],
                    p["slot"],
                    p["preferred_region"].as_str().unwrap_or("")
                );
                println!("leader    node {}", p["leader"]);
                println!("voters    {}", p["voters"]);
            }
            Err(e) => println!("shard     unknown: {e:#}"),
        }
        println!("last seq  {}", r.last_seq);
        println!("pts       {}", r.pts);
        if r.closed {
            println!("closed    yes: {}", r.close_reason);
        } else {
            println!("closed    no");
        }
        println!("readers   {}", r.read_cursors.len());
    }
    Ok(0)
}

/// Chat ids from one argument or a file (one per line, `#` comments).
pub fn chat_ids(chat: Option<u64>, file: Option<&std::path::Path>) -> anyhow::Result<Vec<u64>> {
    match (chat, file) {
        (Some(c), None) => Ok(vec![c]),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let mut ids = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let id: u64 = line.parse().with_context(|| {
                    format!("{}:{}: {line:?} is not a chat id", path.display(), n + 1)
                })?;
                if id == 0 {
                    anyhow::bail!("{}:{}: chat id 0 does not exist", path.display(), n + 1);
                }
                ids.push(id);
            }
            if ids.is_empty() {
                anyhow::bail!("{} names no chats", path.display());
            }
            Ok(ids)
        }
        _ => anyhow::bail!("name one chat, or --file with chat ids (not both)"),
    }
}

/// Closes (`reason` set) or reopens chats, with a progress bar and a
/// summary; exit code 1 if any chat failed.
pub async fn moderate(
    addr: &str,
    chats: &[u64],
    reason: Option<String>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let (verb, done) = if reason.is_some() {
        ("close", "closed")
    } else {
        ("reopen", "reopened")
    };
    if dry_run {
        println!("dry run: would {verb} {} chat(s): {chats:?}", chats.len());
        return Ok(0);
    }
    let mut c = router(addr).await?;
    let bar = indicatif::ProgressBar::new(chats.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{verb} chats"));
    let mut failed = Vec::new();
    for chat in chats {
        let r = match &reason {
            Some(reason) => c
                .close_chat(pb::CloseChatRequest {
                    chat_id: *chat,
                    reason: reason.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            None => c
                .reopen_chat(pb::ReopenChatRequest {
                    chat_id: *chat,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        if let Err(s) = r {
            failed.push((*chat, format!("{:?}: {}", s.code(), s.message())));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let ok = chats.len() - failed.len();
    if json {
        let f: Vec<_> = failed
            .iter()
            .map(|(c, e)| serde_json::json!({"chat": c, "error": e}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"action": verb, "ok": ok, "failed": f})
        );
    } else {
        println!("{done} {ok} of {} chat(s)", chats.len());
        for (chat, e) in &failed {
            println!("  chat {chat}: {e}");
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}
