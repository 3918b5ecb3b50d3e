//! The public API against real multi-process clusters (nodes and routers
//! started from the built binary): every RPC and its error codes, two
//! devices in two regions, read-your-writes across routers and a leader
//! kill, and Watch across a router restart and a leader kill.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chatstore::api::pb::{self, chat_store_client::ChatStoreClient, Consistency};
use chatstore::router::token::{ShardPosition, TokenKeys};
use common::procs::{router_client, start_cluster, start_cluster_with, ProcessCluster};
use common::{Client, TestDir};
use tonic::transport::Channel;
use tonic::Code;

type Api = ChatStoreClient<Channel>;

async fn up(dir: &TestDir, regions: &[&str]) -> (ProcessCluster, Vec<Api>, Client) {
    let (mut cluster, nodes) = start_cluster(&dir.path, 8).await;
    let mut apis = Vec::new();
    for r in regions {
        let addr = cluster.start_router(r);
        apis.push(router_client(&addr).await);
    }
    (cluster, apis, nodes)
}

async fn send(api: &mut Api, chat: u64, sender: u64, cmid: u64, body: &str) -> pb::SendResponse {
    api.send(pb::SendRequest {
        chat_id: chat,
        sender_id: sender,
        client_msg_id: cmid,
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .expect("send")
    .into_inner()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "errors say what was wrong");
            s.code()
        }
    }
}

/// The bodies of `chat`'s newest 10 messages, newest first (LINEARIZABLE).
async fn newest_bodies(api: &mut Api, chat: u64) -> Vec<String> {
    let h = api
        .get_history(pb::GetHistoryRequest {
            chat_id: chat,
            limit: 10,
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    h.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// The changes of `chat` after `pts` (SESSION, no token).
/// A SESSION `GetDifference` of `chat` from `pts`, after `min_token`'s
/// writes (none if empty).
async fn difference(
    api: &mut Api,
    chat: u64,
    pts: u64,
    min_token: &bytes::Bytes,
) -> pb::GetDifferenceResponse {
    api.get_difference(pb::GetDifferenceRequest {
        cursors: vec![pb::Cursor { chat_id: chat, pts }],
        min_token: min_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn chat_pts(api: &mut Api, chat: u64) -> u64 {
    api.get_chat(pb::GetChatRequest {
        chat_id: chat,
        ..Default::default()
    })
    .await
    .expect("get chat")
    .into_inner()
    .pts
}

/// Every RPC, and each bad input refused with its code and no change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_and_its_error_codes() {
    let dir = TestDir::new("api-rpcs");
    let (_cluster, mut apis, _) = up(&dir, &["eu"]).await;
    let api = &mut apis[0];
    let chat = 11;

    let a = send(api, chat, 1, 100, "first").await;
    assert_eq!((a.seq, a.pts, a.duplicate), (1, 1, false));
    assert!(!a.read_token.is_empty());
    let again = send(api, chat, 1, 100, "first (retry)").await;
    assert_eq!(
        (again.seq, again.duplicate),
        (1, true),
        "a retried send returns the original seq"
    );
    let b = send(api, chat, 2, 200, "second").await;
    assert_eq!(b.seq, 2);

    let e = api
        .edit(pb::EditRequest {
            chat_id: chat,
            seq: 1,
            editor_id: 1,
            body: b"first, edited"[..].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.pts, 3);
    let d = api
        .delete(pb::DeleteRequest {
            chat_id: chat,
            seq: 2,
            requester_id: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.pts, 4);
    let r = api
        .mark_read(pb::MarkReadRequest {
            chat_id: chat,
            reader_id: 2,
            up_to_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pts, 5);

    let h = api
        .get_history(pb::GetHistoryRequest {
            chat_id: chat,
            limit: 10,
            min_token: r.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.messages.len(), 2);
    assert_eq!(h.messages[0].seq, 2, "newest first");
    assert!(
        h.messages[0].deleted && h.messages[0].body.is_empty(),
        "deleted for everyone"
    );
    assert_eq!(&h.messages[1].body[..], b"first, edited");
    assert!(h.messages[1].edited_at_ms >= h.messages[1].created_at_ms);

    let m = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: chat,
            seqs: vec![1, 99],
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.messages.len(), 1);

    let diff = difference(api, chat, 0, &Default::default()).await;
    let kinds: Vec<i32> = diff.chats[0].changes.iter().map(|c| c.kind).collect();
    use pb::ChangeKind::*;
    assert_eq!(
        kinds,
        [NewMessage, NewMessage, EditMessage, DeleteMessage, Read].map(|k| k as i32)
    );
    assert_eq!(diff.chats[0].pts, 5);

    let c = api
        .get_chat(pb::GetChatRequest {
            chat_id: chat,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.last_seq, c.pts, c.closed), (2, 5, false));
    assert_eq!(
        c.read_cursors,
        vec![pb::ReadCursor {
            reader_id: 2,
            seq: 1
        }]
    );

    // Bad input: each refused with its code, and nothing changes.
    let big = vec![b'x'; 64 * 1024 + 1];
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: 0,
                sender_id: 1,
                client_msg_id: 1,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 0,
                client_msg_id: 1,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: 0,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: 9,
                body: big.into(),
                ..Default::default()
            })
            .await
        ),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: 9,
                self_destruct: Some(pb::SelfDestructPolicy {
                    policy: Some(pb::self_destruct_policy::Policy::AfterSendSecs(0))
                }),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.edit(pb::EditRequest {
                chat_id: chat,
                seq: 1,
                editor_id: 2,
                body: b"hijack"[..].into(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition,
        "edit by someone other than the sender"
    );
    assert_eq!(
        code(
            api.delete(pb::DeleteRequest {
                chat_id: chat,
                seq: 1,
                requester_id: 2,
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            api.edit(pb::EditRequest {
                chat_id: chat,
                seq: 77,
                editor_id: 1,
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                limit: 5000,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                min_token: b"not a token"[..].into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let mut forged = a.read_token.to_vec();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                min_token: forged.into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "a token with a bad MAC"
    );
    // A correctly signed token naming an index far beyond the commit index.
    let keys = TokenKeys::new("test", b"test");
    let mut body = keys.decode(&[]).unwrap();
    let shard = chatstore::cluster::Placement::new(&_cluster.config)
        .shard_of_chat(chatstore::types::ChatId(chat))
        .0;
    body.merge(ShardPosition {
        shard,
        incarnation: 0,
        index: 1 << 40,
        term: 1,
    });
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                min_token: keys.encode(&body).into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "a token beyond the commit index"
    );
    let cursors: Vec<pb::Cursor> = (1..=101)
        .map(|c| pb::Cursor { chat_id: c, pts: 0 })
        .collect();
    assert_eq!(
        code(
            api.get_difference(pb::GetDifferenceRequest {
                cursors: cursors.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(api.watch(pb::WatchRequest { cursors }).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.get_messages(pb::GetMessagesRequest {
                chat_id: chat,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.mark_read(pb::MarkReadRequest {
                chat_id: chat,
                reader_id: 3,
                up_to_seq: 50,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "mark read beyond the last message"
    );
    assert_eq!(
        code(
            api.delete(pb::DeleteRequest {
                chat_id: chat,
                seq: 77,
                requester_id: 1,
                ..Default::default()
            })
            .await
        ),
        Code::NotFound,
        "delete of a message that never was"
    );
    assert_eq!(
        code(
            api.edit(pb::EditRequest {
                chat_id: chat,
                seq: 2,
                editor_id: 2,
                body: b"back from the dead"[..].into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound,
        "edit of a deleted message"
    );
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: 0,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.get_chat(pb::GetChatRequest {
                chat_id: 0,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                consistency: 3,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "an unknown consistency"
    );
    assert_eq!(
        code(
            api.get_difference(pb::GetDifferenceRequest {
                cursors: vec![],
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "no cursors"
    );
    assert_eq!(
        code(
            api.get_difference(pb::GetDifferenceRequest {
                cursors: vec![
                    pb::Cursor {
                        chat_id: chat,
                        pts: 0
                    },
                    pb::Cursor {
                        chat_id: chat,
                        pts: 1
                    },
                ],
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "a chat in two cursors"
    );
    assert_eq!(
        code(
            api.get_messages(pb::GetMessagesRequest {
                chat_id: chat,
                seqs: vec![0],
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "seq 0"
    );
    assert_eq!(
        code(
            api.close_chat(pb::CloseChatRequest {
                chat_id: chat,
                reason: "   ".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "a blank reason"
    );
    // A send with a malformed token is refused before it is written: the
    // same id sent again with no token is a new message, not a duplicate.
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: 12,
                sender_id: 1,
                client_msg_id: 500,
                body: b"x"[..].into(),
                min_token: b"garbage"[..].into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert!(!send(api, 12, 1, 500, "x").await.duplicate);
    assert_eq!(
        code(
            api.mark_read(pb::MarkReadRequest {
                chat_id: chat,
                reader_id: 2,
                up_to_seq: 0,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "mark read up to seq 0"
    );
    assert_eq!(chat_pts(api, chat).await, 5, "bad input changed nothing");

    // Moderation.
    let closed = api
        .close_chat(pb::CloseChatRequest {
            chat_id: chat,
            reason: "spam".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.pts, 6);
    assert_eq!(
        code(
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: 300,
                body: b"x"[..].into(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            api.get_history(pb::GetHistoryRequest {
                chat_id: chat,
                min_token: closed.read_token.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            api.close_chat(pb::CloseChatRequest {
                chat_id: chat,
                reason: "".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let c = api
        .get_chat(pb::GetChatRequest {
            chat_id: chat,
            min_token: closed.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.closed);
    assert_eq!(c.close_reason, "spam");
    // The reason is in the chat's change log, for every device.
    let diff = difference(api, chat, 5, &closed.read_token).await;
    let change = &diff.chats[0].changes[0];
    assert_eq!(
        (change.kind, change.reason.as_str()),
        (pb::ChangeKind::Close as i32, "spam")
    );
    // A closed chat's changes still flow, without their content.
    let all = difference(api, chat, 0, &closed.read_token).await;
    assert_eq!(all.chats[0].changes.len(), 6);
    assert!(
        all.chats[0].changes.iter().all(|c| c.message.is_none()),
        "{:?}",
        all.chats[0].changes
    );
    let reopened = api
        .reopen_chat(pb::ReopenChatRequest {
            chat_id: chat,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reopened.pts, 7);
    let diff = difference(api, chat, 6, &reopened.read_token).await;
    assert_eq!(
        diff.chats[0]
            .changes
            .iter()
            .map(|c| c.kind)
            .collect::<Vec<_>>(),
        [pb::ChangeKind::Reopen as i32]
    );
    assert_eq!(send(api, chat, 1, 301, "back").await.seq, 3);
    // A read token carries every shard its holder wrote to: a send with
    // another shard's token returns both positions.
    let placement = chatstore::cluster::Placement::new(&_cluster.config);
    let shard_of = |c: u64| placement.shard_of_chat(chatstore::types::ChatId(c)).0;
    let other = (20..100u64)
        .find(|c| shard_of(*c) != shard_of(chat))
        .expect("a chat on another shard");
    let first = send(api, chat, 1, 302, "one").await;
    let second = api
        .send(pb::SendRequest {
            chat_id: other,
            sender_id: 1,
            client_msg_id: 1,
            body: b"two"[..].into(),
            min_token: first.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let merged = keys.decode(&second.read_token).unwrap();
    let kept = keys.decode(&first.read_token).unwrap();
    assert_eq!(
        merged.position(shard_of(chat)),
        kept.position(shard_of(chat)),
        "the first shard's position is kept"
    );
    assert!(merged.position(shard_of(other)).is_some());

    // Health.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        _cluster.config.nodes[0].raft_addr
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Two devices of one user behind routers in two regions: one sends, edits
/// and deletes; the other sees each change through Watch and through
/// GetDifference, in pts order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_devices_in_two_regions_see_every_change() {
    let dir = TestDir::new("api-devices");
    let (_cluster, mut apis, _) = up(&dir, &["eu", "us"]).await;
    let (mut phone, mut laptop) = (apis.remove(0), apis.remove(0));
    let chat = 21;
    let mut watch = laptop
        .watch(pb::WatchRequest {
            cursors: vec![pb::Cursor {
                chat_id: chat,
                pts: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let s1 = send(&mut phone, chat, 5, 1, "one").await;
    send(&mut phone, chat, 5, 2, "two").await;
    phone
        .edit(pb::EditRequest {
            chat_id: chat,
            seq: s1.seq,
            editor_id: 5,
            body: b"one!"[..].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = phone
        .delete(pb::DeleteRequest {
            chat_id: chat,
            seq: 2,
            requester_id: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.pts, 4);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("watch delivers within 20 s")
            .expect("watch stream")
            .expect("stream open");
        seen.push(ev.change.expect("a change"));
    }
    let pts: Vec<u64> = seen.iter().map(|c| c.pts).collect();
    assert_eq!(
        pts,
        vec![1, 2, 3, 4],
        "Watch delivers every change once, in pts order"
    );
    assert_eq!(&seen[2].message.as_ref().unwrap().body[..], b"one!");
    assert_eq!(seen[3].kind, pb::ChangeKind::DeleteMessage as i32);

    let diff = laptop
        .get_difference(pb::GetDifferenceRequest {
            cursors: vec![pb::Cursor {
                chat_id: chat,
                pts: 0,
            }],
            min_token: last.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dpts: Vec<u64> = diff.chats[0].changes.iter().map(|c| c.pts).collect();
    assert_eq!(
        dpts, pts,
        "GetDifference gives the same changes in the same order"
    );
    let partial = difference(&mut laptop, chat, 2, &Default::default()).await;
    assert_eq!(
        partial.chats[0]
            .changes
            .iter()
            .map(|c| c.pts)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );

    // SESSION reads stay in the caller's region: the us router's answer
    // comes from node 2, the us replica.
    let h = laptop
        .get_history(pb::GetHistoryRequest {
            chat_id: chat,
            min_token: last.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.served_by_node, 2,
        "served by the replica in the router's region"
    );
}

/// A SESSION read with the token of a just-acknowledged write sees it, on a
/// router in another region, also right after the shard's leader is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_routers_and_a_leader_kill() {
    let dir = TestDir::new("api-ryw");
    let (mut cluster, mut apis, nodes) = up(&dir, &["eu", "us"]).await;
    let (mut writer, mut reader) = (apis.remove(0), apis.remove(0));
    let chat = 31;
    let shard = nodes.shard_of(chat).0;
    let mut token = bytes::Bytes::new();
    let mut killed = None;
    for i in 1..=40u64 {
        if i == 15 {
            let leader = nodes.leader_of(shard).await.expect("shard has a leader");
            eprintln!("killing node {leader}, leader of shard {shard}");
            cluster.kill_node(leader);
            killed = Some(leader);
        }
        if i == 30 {
            cluster.start_node(killed.unwrap());
        }
        let request = || pb::SendRequest {
            chat_id: chat,
            sender_id: 1,
            client_msg_id: i,
            body: format!("m{i}").into_bytes().into(),
            min_token: token.clone(),
            ..Default::default()
        };
        let sent = writer.send(request()).await;
        let sent = match sent {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                // No leader yet: the write is safe to retry with the same
                // id, for a while on a loaded machine.
                let mut retried = None;
                for _ in 0..60 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match writer.send(request()).await {
                        Ok(s) => {
                            retried = Some(s.into_inner());
                            break;
                        }
                        Err(s) if s.code() == Code::Unavailable => {}
                        Err(s) => panic!("send {i} again: {s}"),
                    }
                }
                retried.expect("send after retries")
            }
            Err(s) => panic!("send {i}: {s}"),
        };
        token = sent.read_token.clone();
        let got = reader
            .get_messages(pb::GetMessagesRequest {
                chat_id: chat,
                seqs: vec![sent.seq],
                min_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("session read")
            .into_inner();
        assert_eq!(
            got.messages.len(),
            1,
            "write {i} (seq {}) is visible to its session on the other router",
            sent.seq
        );
        assert_eq!(got.messages[0].client_msg_id, i);
        token = got.read_token;
    }
}

/// A Watch keeps delivering across a leader kill and a router restart (the
/// client resumes from the last pts it got): no event lost, none repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_across_router_restart_and_leader_kill_loses_and_repeats_nothing() {
    let dir = TestDir::new("api-watch");
    let (mut cluster, mut apis, nodes) = up(&dir, &["eu", "us"]).await;
    let mut writer = apis.remove(0);
    let chat = 41;
    let shard = nodes.shard_of(chat).0;
    let total = 60u64;

    let writer_task = tokio::spawn(async move {
        for i in 1..=total {
            let started = Instant::now();
            loop {
                let r = writer
                    .send(pb::SendRequest {
                        chat_id: chat,
                        sender_id: 9,
                        client_msg_id: i,
                        body: b"w"[..].into(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => break,
                    Err(s) if started.elapsed() < Duration::from_secs(60) => {
                        eprintln!("send {i} failed ({}), retrying with the same id", s.code());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => panic!("send {i}: {s}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let mut received: Vec<u64> = Vec::new();
    let mut last_pts = 0;
    let mut router_restarted = false;
    let mut leader_killed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    'outer: while Instant::now() < deadline {
        let mut api = router_client(&cluster.start_router_if_missing("us")).await;
        let mut stream = match api
            .watch(pb::WatchRequest {
                cursors: vec![pb::Cursor {
                    chat_id: chat,
                    pts: last_pts,
                }],
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            if received.len() as u64 >= total {
                break 'outer;
            }
            if !leader_killed && received.len() >= 15 {
                leader_killed = true;
                let leader = nodes
                    .wait_leader_of(shard, Duration::from_secs(20))
                    .await
                    .expect("the watched chat's shard has a leader to kill");
                eprintln!("killing node {leader}, leader of shard {shard}");
                cluster.kill_node(leader);
                cluster.start_node(leader);
            }
            if !router_restarted && received.len() >= 35 {
                router_restarted = true;
                eprintln!("restarting the watching router");
                cluster.kill_router("us");
                continue 'outer;
            }
            match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
                Ok(Ok(Some(ev))) => {
                    let ch = ev.change.expect("a change");
                    assert_eq!(ch.pts, last_pts + 1, "no gap and no repeat in pts");
                    last_pts = ch.pts;
                    if ch.kind == pb::ChangeKind::NewMessage as i32 {
                        received.push(ch.seq);
                    }
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'outer;
                }
            }
        }
    }
    writer_task.await.unwrap();
    assert!(leader_killed && router_restarted);
    assert_eq!(
        received,
        (1..=total).collect::<Vec<_>>(),
        "every message seen once, in order"
    );
}

/// The series of `metric` in a Prometheus text body, by their labels
/// (`by="stream"`), "" for a series without labels.
fn series(body: &str, metric: &str) -> BTreeMap<String, u64> {
    body.lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter_map(|l| {
            let (labels, n) = l.rsplit_once(' ')?;
            let labels = labels.trim_start_matches('{').trim_end_matches('}');
            Some((labels.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

/// Many streams of one router on one chat share its polls: each gets every
/// change once, in pts order, whether it was there from the start, joined
/// late from pts 0, or read nothing until the end (so fell behind what the
/// shared poll keeps and polled for itself); and the router sent far fewer
/// polls than one per stream per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_watching_one_chat_on_a_router_share_its_polls() {
    let dir = TestDir::new("api-watch-shared");
    let (mut cluster, _nodes) = start_cluster(&dir.path, 8).await;
    let (router, metrics) = cluster.start_router_with_metrics("eu");
    let mut api = router_client(&router).await;
    let chat = 77;
    let (streams, total) = (6usize, 120u64);
    let mut watching = Vec::new();
    for _ in 0..streams {
        watching.push(common::watch_chat(&mut api.clone(), chat, 0).await);
    }
    // Read by no one until every send is done, on a connection whose
    // HTTP/2 windows hold little: the router's stream fills, and the chat's
    // shared poll goes past what it keeps.
    let small_windows = tonic::transport::Endpoint::from_shared(format!("http://{router}"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect to the router");
    let slow = common::watch_chat(&mut ChatStoreClient::new(small_windows), chat, 0).await;
    let body = vec![b'w'; 2048];
    let mut late = None;
    for i in 1..=total {
        api.send(pb::SendRequest {
            chat_id: chat,
            sender_id: 5,
            client_msg_id: i,
            body: body.clone().into(),
            ..Default::default()
        })
        .await
        .expect("send");
        if i == total / 2 {
            late = Some(common::watch_chat(&mut api.clone(), chat, 0).await);
        }
    }
    let within = Duration::from_secs(30);
    let read_all = |i: usize, mut stream: tonic::Streaming<pb::WatchEvent>| async move {
        let mut seqs = Vec::new();
        let mut last_pts = 0;
        while (seqs.len() as u64) < total {
            let ev = common::next_event(&mut stream, within).await;
            assert!(!ev.reset_required, "stream {i}: no reset");
            assert_eq!(ev.pts, last_pts + 1, "stream {i}: no gap and no repeat");
            last_pts = ev.pts;
            let change = ev.change.expect("a change");
            assert_eq!(change.message.expect("its message").body.len(), 2048);
            seqs.push(change.seq);
        }
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "stream {i}: every message once"
        );
    };
    let mut readers = tokio::task::JoinSet::new();
    for (i, stream) in watching.into_iter().chain(late).enumerate() {
        readers.spawn(read_all(i, stream));
    }
    while let Some(joined) = readers.join_next().await {
        joined.expect("a stream's reader");
    }
    // Those streams are closed now. The unread one, waiting for room, keeps
    // no shared poll going.
    let feeds_at_end = Instant::now() + Duration::from_secs(20);
    loop {
        let body = common::http_get(&metrics, "/metrics").await;
        let feeds = series(&body, "chatstore_router_watch_feeds");
        if feeds.get("") == Some(&0) {
            break;
        }
        assert!(
            Instant::now() < feeds_at_end,
            "a shared poll outlived every stream that reads: {feeds:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_all(streams + 1, slow).await;
    let body = common::http_get(&metrics, "/metrics").await;
    let polls = series(&body, "chatstore_router_watch_polls_total");
    let fell_behind = series(&body, "chatstore_router_watch_fell_behind_total");
    let (own, shared) = (polls.get("by=\"stream\""), polls.get("by=\"shared\""));
    eprintln!("watch polls: {polls:?}; fell behind: {fell_behind:?}");
    assert!(
        fell_behind.get("").is_some_and(|n| *n > 0),
        "the stream read by no one fell behind what the shared poll keeps: {fell_behind:?}"
    );
    assert!(
        shared.is_some_and(|n| *n > 0),
        "a shared poll ran: {polls:?}"
    );
    // One poll per stream per change would be about 8 × 120.
    assert!(
        own.is_some_and(|n| *n < total),
        "the streams' own polls are far fewer than one per change: {polls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_batch_acknowledges_each_send_on_its_own() {
    let dir = TestDir::new("api-batch");
    let (_cluster, mut apis, _nodes) = up(&dir, &["eu"]).await;
    let api = &mut apis[0];
    let one = |chat: u64, cmid: u64, body: &[u8]| pb::SendRequest {
        chat_id: chat,
        sender_id: 7,
        client_msg_id: cmid,
        body: body.to_vec().into(),
        ..Default::default()
    };
    // 300 sends over 30 chats (so over every shard), with two bad ones in
    // the middle and a repeat of an earlier one.
    let mut sends: Vec<pb::SendRequest> = (0..300u64)
        .map(|i| one(1 + i % 30, 1_000 + i, format!("m{i}").as_bytes()))
        .collect();
    sends[100] = one(0, 5, b"chat zero");
    sends[200] = one(3, 6, &vec![b'x'; 70 * 1024]);
    sends.push(one(1, 1_000, b"m0"));
    let r = api
        .send_batch(pb::SendBatchRequest {
            sends: sends.clone(),
        })
        .await
        .expect("send batch")
        .into_inner();
    assert_eq!(r.outcomes.len(), sends.len());
    assert_eq!(r.outcomes[100].error_code, Code::InvalidArgument as i32);
    assert_eq!(r.outcomes[200].error_code, Code::ResourceExhausted as i32);
    let first = r.outcomes[0].sent.clone().expect("stored");
    let again = r.outcomes[300].sent.clone().expect("repeat answered");
    assert!(
        again.duplicate && again.seq == first.seq,
        "{again:?} {first:?}"
    );
    // Per chat, seqs follow request order, gapless.
    let mut next = std::collections::BTreeMap::new();
    for (i, o) in r.outcomes.iter().enumerate().take(300) {
        if i == 100 || i == 200 {
            continue;
        }
        let sent = o.sent.as_ref().unwrap_or_else(|| panic!("send {i}: {o:?}"));
        let chat = sends[i].chat_id;
        let want = next.entry(chat).or_insert(1u64);
        assert_eq!(sent.seq, *want, "send {i} in chat {chat}");
        *want += 1;
    }
    // Sends that came with one token (here none) get back one token,
    // covering every one of them: a client keeps only its newest.
    let token = r.read_token.clone();
    assert!(!token.is_empty(), "one token for the whole batch");
    for chat in [5u64, 29] {
        let last = r
            .outcomes
            .iter()
            .zip(&sends)
            .filter(|(_, s)| s.chat_id == chat)
            .filter_map(|(o, _)| o.sent.as_ref())
            .map(|s| s.pts)
            .max()
            .unwrap();
        let seen = api
            .get_chat(pb::GetChatRequest {
                chat_id: chat,
                consistency: Consistency::Session as i32,
                min_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(seen.pts >= last, "chat {chat}: {} < {last}", seen.pts);
    }
    // A token already full of positions from reads still gets one back,
    // holding the batch's writes.
    let keys = TokenKeys::new("test", b"test");
    let mut full = keys.decode(&[]).unwrap();
    for s in 0..chatstore::router::token::TOKEN_SHARDS_MAX as u64 {
        full.merge(ShardPosition {
            shard: 1_000 + s,
            incarnation: 0,
            index: 1,
            term: 1,
        });
    }
    let full = bytes::Bytes::from(keys.encode(&full));
    let r = api
        .send_batch(pb::SendBatchRequest {
            sends: [(5u64, 60_001u64), (29, 60_002)]
                .iter()
                .map(|&(chat, cmid)| pb::SendRequest {
                    min_token: full.clone(),
                    ..one(chat, cmid, b"after reads")
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let token = keys.decode(&r.read_token).expect("one token for the batch");
    let placement = chatstore::cluster::Placement::new(&_cluster.config);
    for chat in [5u64, 29] {
        let shard = placement.shard_of_chat(chatstore::types::ChatId(chat)).0;
        assert!(token.position(shard).is_some(), "chat {chat}'s shard");
        assert!(token.written.contains(&shard), "chat {chat}'s shard");
    }
    // What was acknowledged is there, with its body.
    let h = api
        .get_history(pb::GetHistoryRequest {
            chat_id: 2,
            limit: 100,
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.messages.len(), 10);
    assert_eq!(&h.messages.last().unwrap().body[..], b"m1");
    // Limits: an empty batch and one over the maximum are refused whole.
    let e = api
        .send_batch(pb::SendBatchRequest { sends: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api
        .send_batch(pb::SendBatchRequest {
            sends: (0..1001).map(|i| one(1, 50_000 + i, b"x")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// With a 2 s change retention: a retried edit or delete returns the first
/// one's pts and makes no second change; old changes are collected, so a
/// cursor from before them gets `reset_required` from GetDifference and
/// Watch, with the chat's pts to go on from; a cursor at that pts sees
/// the next change as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_change_nothing_and_old_cursors_reset() {
    let dir = TestDir::new("api-retention");
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &common::ConfigOptions {
            shards: 2,
            change_retention_secs: Some(2),
            // Collection runs on leaders of shards that are not quiet.
            quiesce_after_ms: 0,
            ..Default::default()
        },
    )
    .await;
    // A new shard starts under the newest rules its members are known to
    // know: at once if every node answered a ping before its bootstrap,
    // else after a raise once they have.
    nodes
        .wait_apply_rules(
            &[1, 2, 3],
            chatstore::shard::apply::APPLY_RULES,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let addr = cluster.start_router("eu");
    let mut api = router_client(&addr).await;
    let chat = 12;
    send(&mut api, chat, 1, 1, "one").await;
    send(&mut api, chat, 1, 2, "two").await;

    let edit = pb::EditRequest {
        chat_id: chat,
        seq: 1,
        editor_id: 1,
        body: b"one, edited"[..].into(),
        client_edit_id: 5,
        ..Default::default()
    };
    let first = api.edit(edit.clone()).await.expect("edit").into_inner();
    let again = api
        .edit(edit.clone())
        .await
        .expect("edit again")
        .into_inner();
    assert_eq!(again.pts, first.pts, "the same edit makes no second change");
    // Sent again after a later edit, with its id, it still changes nothing.
    let later = pb::EditRequest {
        body: b"one, edited later"[..].into(),
        client_edit_id: 6,
        ..edit.clone()
    };
    api.edit(later).await.expect("a later edit");
    let late_again = api
        .edit(edit)
        .await
        .expect("the first edit again")
        .into_inner();
    assert_eq!(late_again.pts, first.pts);
    let shown = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: chat,
            seqs: vec![1],
            min_token: late_again.read_token,
            ..Default::default()
        })
        .await
        .expect("message 1")
        .into_inner();
    assert_eq!(&shown.messages[0].body[..], b"one, edited later");
    let delete = pb::DeleteRequest {
        chat_id: chat,
        seq: 2,
        requester_id: 1,
        ..Default::default()
    };
    let first = api
        .delete(delete.clone())
        .await
        .expect("delete")
        .into_inner();
    let again = api.delete(delete).await.expect("delete again").into_inner();
    assert_eq!(
        again.pts, first.pts,
        "the same delete makes no second change"
    );
    let last = chat_pts(&mut api, chat).await;
    assert_eq!(last, 5, "two sends, two edits, one delete");

    let difference = |pts: u64| pb::GetDifferenceRequest {
        cursors: vec![pb::Cursor { chat_id: chat, pts }],
        ..Default::default()
    };
    let started = Instant::now();
    let reset = loop {
        let d = api
            .get_difference(difference(0))
            .await
            .expect("difference")
            .into_inner();
        let d = d.chats.into_iter().next().expect("the chat");
        if d.reset_required {
            break d;
        }
        assert_eq!(
            d.changes.first().map(|c| c.pts),
            Some(1),
            "no gap before the reset"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "changes older than 2 s are still kept after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reset.changes.is_empty());
    assert_eq!(reset.pts, last);

    let mut watch = api
        .watch(pb::WatchRequest {
            cursors: vec![pb::Cursor {
                chat_id: chat,
                pts: 0,
            }],
        })
        .await
        .expect("watch")
        .into_inner();
    let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("a watch event in time")
        .expect("watch")
        .expect("an event");
    assert!(event.reset_required);
    assert_eq!(event.pts, last);

    let s = send(&mut api, chat, 1, 3, "three").await;
    let d = api
        .get_difference(difference(last))
        .await
        .expect("difference")
        .into_inner();
    let d = &d.chats[0];
    assert!(!d.reset_required);
    assert_eq!(d.changes.len(), 1);
    assert_eq!(d.changes[0].pts, s.pts);
    let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("a watch event in time")
        .expect("watch")
        .expect("an event");
    let change = event.change.expect("the new message");
    assert_eq!((change.pts, change.seq), (s.pts, s.seq));
}

/// Chats of large messages: history pages and differences are cut by bytes
/// so that a client with gRPC's default 4 MiB limit takes every answer, and
/// paging on from where a page stops reaches every message once; a
/// GetMessages over the limit is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_messages_page_by_bytes() {
    use chatstore::shard::reads::PAGE_BYTES_MAX;
    let dir = TestDir::new("api-large");
    let (_cluster, mut apis, _nodes) = up(&dir, &["eu"]).await;
    let api = &mut apis[0];
    let (big, small) = (41u64, 42u64);
    let body = "x".repeat(60 * 1024);
    let count = 80u64;
    for cmid in 1..=count {
        send(api, big, 7, cmid, &body).await;
    }
    send(api, small, 7, 1, "hello").await;

    // History, newest first, page after page: every seq once.
    let mut seen = Vec::new();
    let mut before = 0;
    for _ in 0..count {
        let page = api
            .get_history(pb::GetHistoryRequest {
                chat_id: big,
                before_seq: before,
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("history page of large messages")
            .into_inner();
        if page.messages.is_empty() {
            break;
        }
        let bytes: usize = page.messages.iter().map(prost::Message::encoded_len).sum();
        assert!(
            page.messages.len() < count as usize && bytes <= PAGE_BYTES_MAX + 64 * 1024,
            "a page of {} messages, {bytes} bytes",
            page.messages.len()
        );
        before = page.messages.last().unwrap().seq;
        seen.extend(page.messages.iter().map(|m| m.seq));
    }
    assert_eq!(seen, (1..=count).rev().collect::<Vec<_>>());

    // Differences: one chat, then the large chat and a small one together.
    let mut news = Vec::new();
    let mut pts = 0;
    for _ in 0..count {
        let d = api
            .get_difference(pb::GetDifferenceRequest {
                cursors: vec![pb::Cursor { chat_id: big, pts }],
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("difference of large messages")
            .into_inner();
        let chat = &d.chats[0];
        news.extend(chat.changes.iter().map(|c| c.seq));
        pts = chat.pts;
        if !chat.more {
            break;
        }
    }
    assert_eq!(news, (1..=count).collect::<Vec<_>>());
    let both = api
        .get_difference(pb::GetDifferenceRequest {
            cursors: vec![
                pb::Cursor {
                    chat_id: big,
                    pts: 0,
                },
                pb::Cursor {
                    chat_id: small,
                    pts: 0,
                },
            ],
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("difference of two chats")
        .into_inner();
    assert!(both.chats[0].more && !both.chats[0].changes.is_empty());
    assert_eq!(both.chats[1].changes.len(), 1, "the small chat's news");

    // A device behind on 100 chats, each with one large message: every
    // reply fits a client's default 4 MiB (the router leaves out whole
    // chats past its byte bound, their cursors as asked), and paging on
    // sees each chat's message once.
    let chats: Vec<u64> = (1_000..1_100).collect();
    for chat in &chats {
        send(api, *chat, 7, 1, &body).await;
    }
    let mut cursors: BTreeMap<u64, u64> = chats.iter().map(|c| (*c, 0)).collect();
    let mut got: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 10, "paging over 100 chats ends");
        let d = api
            .get_difference(pb::GetDifferenceRequest {
                cursors: cursors
                    .iter()
                    .map(|(c, p)| pb::Cursor {
                        chat_id: *c,
                        pts: *p,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("a difference over 100 chats fits the client's limit")
            .into_inner();
        for chat in &d.chats {
            got.entry(chat.chat_id)
                .or_default()
                .extend(chat.changes.iter().map(|c| c.seq));
            cursors.insert(chat.chat_id, chat.pts);
        }
        if !d.chats.iter().any(|c| c.more) {
            break;
        }
    }
    assert!(rounds > 1, "100 × 60 KiB does not fit one reply");
    for chat in &chats {
        assert_eq!(
            got.get(chat),
            Some(&vec![1]),
            "chat {chat}: its message once"
        );
    }

    // By seq: too many bytes at once is refused, fewer are served.
    let r = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: big,
            seqs: (1..=count).collect(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    let some = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: big,
            seqs: (1..=10).collect(),
            ..Default::default()
        })
        .await
        .expect("ten large messages")
        .into_inner();
    assert_eq!(some.messages.len(), 10);
}

/// A Watch whose polls every replica refuses, the same way each time (here:
/// a router whose config names another shard count than the nodes', so
/// each node says the chat is not in the shard asked for), ends with that
/// refusal instead of staying open with no events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_every_replica_refuses_ends_with_the_refusal() {
    let dir = TestDir::new("api-watch-refused");
    let (mut cluster, _nodes) = start_cluster(&dir.path, 8).await;
    // A router configured for 4 shards, against nodes of 8.
    let mut other = cluster.config.clone();
    other.shards = 4;
    let other_path = dir.path.join("other-shards.toml");
    std::fs::write(&other_path, other.to_toml()).expect("write config");
    let ours = std::mem::replace(&mut cluster.config_path, other_path);
    let addr = cluster.start_router("eu");
    cluster.config_path = ours;
    let mut api = router_client(&addr).await;
    // A chat the two shard counts place in different shards.
    let placed = |shards: u32| {
        let mut c = cluster.config.clone();
        c.shards = shards;
        move |chat: u64| {
            chatstore::cluster::Placement::new(&c).shard_of_chat(chatstore::types::ChatId(chat))
        }
    };
    let (eight, four) = (placed(8), placed(4));
    let chat = (1..1000u64)
        .find(|c| eight(*c) != four(*c))
        .expect("a chat placed differently");
    let mut stream = common::watch_chat(&mut api, chat, 0).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the Watch ends within 60 s");
    let status = ended.expect_err("an error, not an event");
    assert_eq!(status.code(), Code::Internal, "{status}");
    assert!(
        status.message().contains(&format!("chat {chat}"))
            && status.message().contains("FailedPrecondition"),
        "{status}"
    );
}

/// Starts the `region` router reaching every node through a proxy of its
/// own, to cut or stall one link; the router's address and the proxies by
/// node id.
async fn router_behind_proxies(
    cluster: &mut ProcessCluster,
    region: &str,
) -> (String, BTreeMap<u64, common::proxy::Proxy>) {
    let mut proxies = BTreeMap::new();
    let mut args = Vec::new();
    for node in &cluster.config.nodes {
        let proxy = common::proxy::Proxy::start(node.raft_addr.clone()).await;
        args.push("--node-addr".to_string());
        args.push(format!("{}={}", node.id, proxy.addr));
        proxies.insert(node.id, proxy);
    }
    cluster.router_args.insert(region.into(), args);
    (cluster.start_router(region), proxies)
}

/// Fails unless `status` is what a caller that gave up gets: its deadline
/// passed, or it hung up.
fn assert_gave_up(status: &tonic::Status) {
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status}"
    );
}

/// A send by sender 1 whose caller gives up after `timeout`.
async fn send_within(
    api: &mut Api,
    chat: u64,
    cmid: u64,
    body: &str,
    timeout: Duration,
) -> Result<tonic::Response<pb::SendResponse>, tonic::Status> {
    let mut request = tonic::Request::new(pb::SendRequest {
        chat_id: chat,
        sender_id: 1,
        client_msg_id: cmid,
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    });
    request.set_timeout(timeout);
    api.send(request).await
}

/// A send whose caller gave up while its shard had no leader is not sent
/// again by the router once a new leader is elected: the client was told
/// its outcome is unknown and may have moved on, and the message stored
/// seconds later would land after what the client wrote since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_caller_gave_up_is_not_sent_again() {
    let dir = TestDir::new("api-abandoned");
    let (mut cluster, nodes) = start_cluster(&dir.path, 2).await;
    let addr = cluster.start_router("eu");
    let mut api = router_client(&addr).await;
    let chat = 1u64;
    send(&mut api, chat, 1, 1, "before").await;
    let shard = nodes.shard_of(chat).0;
    let leader = nodes.leader_of(shard).await.expect("a leader");
    // One follower stops, then the leader dies: no majority is left to
    // elect, however slowly the test runs, until the follower resumes.
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    cluster.pause_node(follower, true);
    cluster.kill_node(leader);
    let gave_up = send_within(&mut api, chat, 2, "abandoned", Duration::from_millis(300))
        .await
        .expect_err("no leader within 300 ms");
    assert_gave_up(&gave_up);
    cluster.pause_node(follower, false);
    // A new leader takes writes; the router's retries of the abandoned call
    // would have reached it within its 10 s write deadline.
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    nodes
        .wait_leaders(&others, Duration::from_secs(60))
        .await
        .expect("a new leader");
    tokio::time::sleep(Duration::from_secs(12)).await;
    send(&mut api, chat, 1, 3, "after").await;
    assert_eq!(newest_bodies(&mut api, chat).await, ["after", "before"]);
}

/// A send whose caller gave up while the router's call to the leader
/// waited for a connection (the path had gone black) does not go once the
/// connection opens: nothing of it had left the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_whose_caller_gave_up_before_it_left_is_not_sent() {
    let dir = TestDir::new("api-abandoned-unsent");
    let (mut cluster, nodes) = start_cluster(&dir.path, 2).await;
    let (addr, proxies) = router_behind_proxies(&mut cluster, "eu").await;
    let mut api = router_client(&addr).await;
    let chat = 1u64;
    send(&mut api, chat, 1, 1, "before").await;
    let leader = nodes
        .leader_of(nodes.shard_of(chat).0)
        .await
        .expect("a leader");
    // The path to the leader goes black: the open connection closes and a
    // new one is taken but passes nothing either way.
    let link = &proxies[&leader].ctl;
    link.stall_up.store(true, Ordering::SeqCst);
    link.stall_down.store(true, Ordering::SeqCst);
    link.set_cut(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    link.set_cut(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gave_up = send_within(&mut api, chat, 2, "abandoned", Duration::from_secs(1))
        .await
        .expect_err("no answer through a black path");
    assert_gave_up(&gave_up);
    // The connection opens well within the router's 5 s for it, and its
    // call to the leader, still within its own time, finds its caller gone.
    link.heal();
    send(&mut api, chat, 1, 3, "after").await;
    assert_eq!(newest_bodies(&mut api, chat).await, ["after", "before"]);
}

/// A send whose caller gave up while the router kept retrying the node
/// call that carries it, together with another caller's send, is left out
/// of the retries: only the send still waited for is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_call_leaves_out_the_sends_whose_callers_gave_up() {
    let dir = TestDir::new("api-abandoned-shared");
    let (mut cluster, nodes) = start_cluster(&dir.path, 2).await;
    let (addr, proxies) = router_behind_proxies(&mut cluster, "eu").await;
    let api = router_client(&addr).await;
    let chat = 1u64;
    send(&mut api.clone(), chat, 1, 1, "before").await;
    let leader = nodes
        .leader_of(nodes.shard_of(chat).0)
        .await
        .expect("a leader");
    // The router can no longer reach the leader; the leader stays leader.
    proxies[&leader].ctl.set_cut(true);
    let send_with = |cmid: u64, body: &'static str, timeout: Duration| {
        let mut api = api.clone();
        tokio::spawn(async move { send_within(&mut api, chat, cmid, body, timeout).await })
    };
    // Two calls, one send each, take the shard's two call slots; their
    // callers give up after 1 s, and the calls end at their next retry.
    let blockers = [send_with(2, "blocker", Duration::from_secs(1)), {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send_with(3, "blocker", Duration::from_secs(1))
    }];
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Both wait in the queue, then leave in one call once a slot frees.
    let abandoned = send_with(4, "abandoned", Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let kept = send_with(5, "kept", Duration::from_secs(30));
    let gave_up = abandoned
        .await
        .unwrap()
        .expect_err("no leader reachable in 3 s");
    assert_gave_up(&gave_up);
    // The router's next try of the shared call reaches the leader.
    proxies[&leader].ctl.heal();
    kept.await
        .unwrap()
        .expect("the send still waited for is stored");
    for b in blockers {
        let _ = b.await.unwrap();
    }
    // The blockers gave up too.
    assert_eq!(
        newest_bodies(&mut api.clone(), chat).await,
        ["kept", "before"]
    );
}
