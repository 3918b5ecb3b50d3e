//! Self-destructing messages on a multi-process cluster: both policies, the
//! sender's own read not starting the timer, and expiry that survives a
//! leader kill and a full cluster restart. No read path ever returns a
//! message at or past its expire_at.

mod common;

use std::time::{Duration, Instant};

use chatstore::api::pb::{self, chat_store_client::ChatStoreClient, self_destruct_policy::Policy};
use chatstore::types::now_ms;
use common::procs::{router_client, start_cluster, start_cluster_with, ProcessCluster};
use common::{Client, TestDir};
use tonic::transport::Channel;

type Api = ChatStoreClient<Channel>;

async fn up(dir: &TestDir) -> (ProcessCluster, Api, Client) {
    let (mut cluster, nodes) = start_cluster(&dir.path, 4).await;
    let addr = cluster.start_router("eu");
    let api = router_client(&addr).await;
    (cluster, api, nodes)
}

async fn send(
    api: &mut Api,
    chat: u64,
    sender: u64,
    cmid: u64,
    policy: Option<Policy>,
) -> pb::SendResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api
            .send(pb::SendRequest {
                chat_id: chat,
                sender_id: sender,
                client_msg_id: cmid,
                body: format!("secret-{cmid}").into_bytes().into(),
                self_destruct: policy.map(|p| pb::SelfDestructPolicy { policy: Some(p) }),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => return r.into_inner(),
            Err(s) if Instant::now() < deadline => {
                eprintln!("send: {s}; retrying with the same id");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => panic!("send: {s}"),
        }
    }
}

/// The EXPIRE changes of `chat` after `pts`, once there is one (polled for
/// at most `within`). Reads hide an expired message by the clock alone, so
/// only this change shows that a leader proposed the expiry (and that the
/// record is gone from disk, not only from reads).
async fn wait_expired(api: &mut Api, chat: u64, pts: u64, within: Duration) -> Vec<pb::Change> {
    let started = Instant::now();
    loop {
        // A read that fails (a leader just killed) is asked again.
        if let Ok(diff) = api
            .get_difference(pb::GetDifferenceRequest {
                cursors: vec![pb::Cursor { chat_id: chat, pts }],
                ..Default::default()
            })
            .await
        {
            let found: Vec<pb::Change> = diff.into_inner().chats[0]
                .changes
                .iter()
                .filter(|c| c.kind == pb::ChangeKind::ExpireMessage as i32)
                .cloned()
                .collect();
            if !found.is_empty() {
                return found;
            }
        }
        assert!(
            started.elapsed() < within,
            "no EXPIRE change in chat {chat} after pts {pts} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `seq` of `chat` is gone from every listed replica, checking
/// on the way that no replica shows it at or past its expire_at.
async fn wait_gone(nodes: &Client, live: &[u64], chat: u64, seq: u64, within: Duration) {
    let started = Instant::now();
    loop {
        let mut present = false;
        for node in live {
            // Taken before asking: a reply that was slow to arrive still
            // showed the message only if the node read it early enough.
            let asked = now_ms();
            let Ok(h) = nodes.history_on(*node, chat).await else {
                present = true;
                continue;
            };
            if let Some(m) = h.iter().find(|m| m.seq == seq) {
                present = true;
                assert!(
                    m.expire_at_ms == 0 || asked < m.expire_at_ms,
                    "node {node} returned message {chat}/{seq} after its expire_at {}",
                    m.expire_at_ms
                );
            }
        }
        if !present {
            return;
        }
        assert!(
            started.elapsed() < within,
            "message {chat}/{seq} outlived its TTL by more than {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_after_send_and_after_read() {
    let dir = TestDir::new("ttl-policies");
    let (_cluster, mut api, nodes) = up(&dir).await;
    let chat = 5;

    // Reads hide a message from 500 ms before its expiry: a TTL of a few
    // seconds leaves a loaded machine time to send and then read it.
    const TTL_SECS: u32 = 8;
    eprintln!("delete {TTL_SECS} s after sending");
    let keep = send(&mut api, chat, 1, 1, None).await;
    let s = send(&mut api, chat, 1, 2, Some(Policy::AfterSendSecs(TTL_SECS))).await;
    let m = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: chat,
            seqs: vec![s.seq],
            min_token: s.read_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.messages[0].expire_at_ms,
        s.created_at_ms + u64::from(TTL_SECS) * 1000
    );
    wait_gone(&nodes, &[1, 2, 3], chat, s.seq, Duration::from_secs(20)).await;
    // Reads hide it from 500 ms before expiry; the replicated Expire
    // follows within a chore tick and reaches devices as a change.
    let expired = wait_expired(&mut api, chat, s.pts, Duration::from_secs(10)).await;
    assert_eq!(
        expired.len(),
        1,
        "devices learn of the expiry as one change"
    );
    assert_eq!(expired[0].seq, s.seq);
    let h = api
        .get_history(pb::GetHistoryRequest {
            chat_id: chat,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![keep.seq],
        "the normal message stays"
    );

    eprintln!("delete {TTL_SECS} s after being read by someone else");
    let r = send(&mut api, chat, 1, 3, Some(Policy::AfterReadSecs(TTL_SECS))).await;
    api.mark_read(pb::MarkReadRequest {
        chat_id: chat,
        reader_id: 1,
        up_to_seq: r.seq,
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: chat,
            seqs: vec![r.seq],
            consistency: pb::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.messages.len(),
        1,
        "the sender's own read does not start the timer"
    );
    assert_eq!(m.messages[0].expire_at_ms, 0);
    assert_eq!(
        m.messages[0].self_destruct.and_then(|s| s.policy),
        Some(Policy::AfterReadSecs(TTL_SECS)),
        "a message carries its policy before its timer runs"
    );
    let before = now_ms();
    api.mark_read(pb::MarkReadRequest {
        chat_id: chat,
        reader_id: 2,
        up_to_seq: r.seq,
        ..Default::default()
    })
    .await
    .unwrap();
    let m = api
        .get_messages(pb::GetMessagesRequest {
            chat_id: chat,
            seqs: vec![r.seq],
            consistency: pb::Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ttl_ms = u64::from(TTL_SECS) * 1000;
    let at = m
        .messages
        .first()
        .expect("the message is there until its timer runs out")
        .expire_at_ms;
    assert!(
        at >= before + ttl_ms && at <= now_ms() + ttl_ms,
        "timer starts at the other reader's read"
    );
    wait_gone(&nodes, &[1, 2, 3], chat, r.seq, Duration::from_secs(20)).await;
    let expired = wait_expired(&mut api, chat, r.pts, Duration::from_secs(15)).await;
    assert!(expired.iter().any(|c| c.seq == r.seq), "{expired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_survives_a_leader_kill_and_a_full_restart() {
    let dir = TestDir::new("ttl-faults");
    let (mut cluster, mut api, nodes) = up(&dir).await;
    let chat = 9;
    let shard = nodes.shard_of(chat).0;

    eprintln!("expiry across a leader kill");
    let s = send(&mut api, chat, 1, 1, Some(Policy::AfterSendSecs(3))).await;
    let leader = nodes.leader_of(shard).await.expect("a leader");
    cluster.kill_node(leader);
    let live: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    wait_gone(&nodes, &live, chat, s.seq, Duration::from_secs(20)).await;
    cluster.start_node(leader);
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    wait_gone(&nodes, &[1, 2, 3], chat, s.seq, Duration::from_secs(5)).await;
    // Expired by a leader, not only hidden by the clock.
    let expired = wait_expired(&mut api, chat, s.pts, Duration::from_secs(30)).await;
    assert!(expired.iter().any(|c| c.seq == s.seq), "{expired:?}");

    eprintln!("expiry across a full cluster restart (SIGKILL of every node)");
    let s = send(&mut api, chat, 1, 2, Some(Policy::AfterSendSecs(3))).await;
    for id in 1..=3 {
        cluster.kill_node(id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_all_nodes();
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    wait_gone(&nodes, &[1, 2, 3], chat, s.seq, Duration::from_secs(20)).await;
    let expired = wait_expired(&mut api, chat, s.pts, Duration::from_secs(30)).await;
    assert!(expired.iter().any(|c| c.seq == s.seq), "{expired:?}");
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
}

/// Every file under every node's data folder.
fn files_under(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out
}

/// Which of `needles` (each at least 8 bytes) occur in any file under
/// `root`, with the file. One pass per file over 8-byte windows, so a debug
/// build scans tens of megabytes quickly.
fn scan(root: &std::path::Path, needles: &[Vec<u8>]) -> Vec<(usize, std::path::PathBuf)> {
    use std::collections::HashMap;
    let mut by_prefix: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
    for (i, n) in needles.iter().enumerate() {
        assert!(n.len() >= 8, "needles are at least 8 bytes");
        by_prefix
            .entry(n[..8].try_into().unwrap())
            .or_default()
            .push(i);
    }
    let mut found = Vec::new();
    for file in files_under(root) {
        // A file may vanish while we list (snapshots, keys): that is fine.
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let mut seen = std::collections::BTreeSet::new();
        for (pos, w) in bytes.windows(8).enumerate() {
            let Some(ids) = by_prefix.get(<&[u8; 8]>::try_from(w).unwrap()) else {
                continue;
            };
            for &i in ids {
                if bytes[pos..].starts_with(&needles[i]) && seen.insert(i) {
                    found.push((i, file.clone()));
                }
            }
        }
    }
    found
}

/// The 32-byte keys in every key file (epoch keys and snapshot keys) under
/// `root`.
fn key_material(root: &std::path::Path) -> Vec<Vec<u8>> {
    files_under(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| b.len() == 40)
        .map(|b| b[8..].to_vec())
        .collect()
}

/// Self-destructed bodies become unrecoverable from disk: sealed at rest
/// everywhere (Raft log, state, snapshot files), then their keys destroyed
/// within the documented bound (about 2.5 seal epochs after expiry). The
/// scan that proves it is shown to see: a normal message's marker is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn self_destructed_bodies_are_erased_from_disk() {
    const EPOCH_SECS: u64 = 2;
    let dir = TestDir::new("ttl-erasure");
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &common::ConfigOptions {
            shards: 2,
            seal_epoch_secs: Some(EPOCH_SECS),
            ..Default::default()
        },
    )
    .await;
    let addr = cluster.start_router("eu");
    let mut api = router_client(&addr).await;
    let data = dir.path.join("data");

    // Every key that exists while the messages live is recorded: any of
    // them may have sealed a copy of a body.
    let keys_seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let (stop_sampling, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let keys_seen = keys_seen.clone();
        let data = data.clone();
        tokio::spawn(async move {
            loop {
                let found = {
                    let data = data.clone();
                    tokio::task::spawn_blocking(move || key_material(&data))
                        .await
                        .unwrap()
                };
                keys_seen.lock().unwrap().extend(found);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => return,
                }
            }
        })
    };
    let secret = format!("EPHEMERAL-{:016x}", rand::random::<u64>()).into_bytes();
    let plain = format!("PERMANENT-{:016x}", rand::random::<u64>()).into_bytes();
    let chat = 11;
    let body_of = |marker: &[u8], n: u64| {
        let mut b = marker.to_vec();
        b.extend_from_slice(format!(" message {n}").as_bytes());
        b
    };
    let send_body = |api: &mut Api, body: Vec<u8>, cmid: u64, policy: Option<Policy>| {
        let mut api = api.clone();
        async move {
            api.send(pb::SendRequest {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: cmid,
                body: body.into(),
                self_destruct: policy.map(|p| pb::SelfDestructPolicy { policy: Some(p) }),
                ..Default::default()
            })
            .await
            .expect("send")
            .into_inner()
        }
    };

    eprintln!("send: a normal message, self-destructing ones of both policies, an edit");
    send_body(&mut api, body_of(&plain, 0), 1, None).await;
    let mut last = None;
    for n in 1..=10 {
        last = Some(
            send_body(
                &mut api,
                body_of(&secret, n),
                100 + n,
                Some(Policy::AfterSendSecs(4)),
            )
            .await,
        );
    }
    let mut after_read = Vec::new();
    for n in 11..=15 {
        after_read.push(
            send_body(
                &mut api,
                body_of(&secret, n),
                100 + n,
                Some(Policy::AfterReadSecs(3)),
            )
            .await,
        );
    }
    let edited = after_read[0].seq;
    api.edit(pb::EditRequest {
        chat_id: chat,
        seq: edited,
        editor_id: 1,
        body: body_of(&secret, 99).into(),
        ..Default::default()
    })
    .await
    .expect("edit");

    eprintln!("snapshot every replica while the messages live, so snapshot files hold them too");
    let shard = nodes.shard_of(chat).0;
    for node in 1..=3 {
        nodes
            .node(node)
            .trigger_snapshot(chatstore::api::pb::node::ShardRequest { shard_id: shard })
            .await
            .expect("trigger snapshot");
    }
    let started = Instant::now();
    loop {
        let snapshot_keys = files_under(&data)
            .iter()
            .filter(|p| {
                p.to_string_lossy().contains("snapshots")
                    && p.extension().is_some_and(|e| e == "key")
            })
            .count();
        if snapshot_keys >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "snapshots with sealed bodies were not written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = scan(&data, &[secret.clone(), plain.clone()]);
    assert!(
        found.iter().all(|(i, _)| *i != 0),
        "a self-destructing body is on disk in the clear: {found:?}"
    );
    assert!(
        found.iter().any(|(i, _)| *i == 1),
        "the scan does not see a normal message's body, so it proves nothing"
    );

    eprintln!("let them expire: the after-read ones are read by another user");
    api.mark_read(pb::MarkReadRequest {
        chat_id: chat,
        reader_id: 2,
        up_to_seq: after_read.last().unwrap().seq,
        ..Default::default()
    })
    .await
    .expect("mark read");
    let last = last.unwrap();
    for seq in (last.seq - 9..=last.seq).chain(after_read.iter().map(|r| r.seq)) {
        wait_gone(&nodes, &[1, 2, 3], chat, seq, Duration::from_secs(20)).await;
    }
    let expired_at = Instant::now();
    stop_sampling.send(true).unwrap();
    sampler.await.unwrap();
    let keys_while_live: Vec<Vec<u8>> = keys_seen.lock().unwrap().iter().cloned().collect();
    eprintln!(
        "{} keys existed while the messages lived",
        keys_while_live.len()
    );
    assert!(
        keys_while_live.len() >= 3,
        "every node sealed with at least one key"
    );

    eprintln!("wait for every key that sealed them to be destroyed on every node");
    let bound = Duration::from_secs(EPOCH_SECS * 5 / 2 + 2);
    let mut needles = keys_while_live.clone();
    needles.push(secret.clone());
    let deadline = bound * 4 + Duration::from_secs(20);
    loop {
        let found = scan(&data, &needles);
        if found.is_empty() {
            break;
        }
        assert!(
            expired_at.elapsed() < deadline,
            "{} of the keys or bodies are still on disk {:?} after expiry (bound {bound:?}): {found:?}",
            found.len(),
            expired_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "erased {:?} after the last expiry (documented bound {bound:?})",
        expired_at.elapsed()
    );
    let found = scan(&data, std::slice::from_ref(&plain));
    assert!(
        !found.is_empty(),
        "the normal message's body must still be on disk"
    );

    eprintln!("the chat still reads correctly on every replica");
    for node in 1..=3 {
        let h = nodes.history_on(node, chat).await.expect("history");
        assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1]);
    }
}

/// One MarkRead over more delete-after-read messages than one step of the
/// shard takes: the router repeats it until the cursor reaches `up_to_seq`,
/// and every message others sent gets its timer, the reader's own none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mark_read_over_many_messages_starts_every_timer() {
    let dir = TestDir::new("sd-many");
    let (_cluster, mut api, nodes) = up(&dir).await;
    // Only apply rules 2 start the timers in bounded steps.
    nodes
        .wait_apply_rules(
            &[1, 2, 3],
            chatstore::shard::apply::APPLY_RULES,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let chat = 77;
    let count = chatstore::shard::apply::MARK_READ_SCAN_MAX as u64 + 100;
    let mut cmid = 0;
    while cmid < count {
        let sends: Vec<pb::SendRequest> = (cmid + 1..=(cmid + 100).min(count))
            .map(|id| pb::SendRequest {
                chat_id: chat,
                // Every tenth message is the reader's own.
                sender_id: if id % 10 == 0 { 2 } else { 1 },
                client_msg_id: id,
                body: b"read me once".to_vec().into(),
                self_destruct: Some(pb::SelfDestructPolicy {
                    policy: Some(Policy::AfterReadSecs(3_600)),
                }),
                ..Default::default()
            })
            .collect();
        let n = sends.len() as u64;
        let r = api
            .send_batch(pb::SendBatchRequest { sends })
            .await
            .expect("send batch")
            .into_inner();
        assert!(r.outcomes.iter().all(|o| o.sent.is_some()), "{r:?}");
        cmid += n;
    }
    let read = api
        .mark_read(pb::MarkReadRequest {
            chat_id: chat,
            reader_id: 2,
            up_to_seq: count,
            ..Default::default()
        })
        .await
        .expect("mark read")
        .into_inner();
    // The sends made pts 1..=count; each step of the MarkRead adds one READ
    // change, and more than the scan bound of pending messages takes two.
    assert!(
        read.pts >= count + 2,
        "the router repeated the MarkRead: pts {} after {count} sends",
        read.pts
    );
    let mut before = 0;
    let mut seen = 0;
    for _ in 0..10 {
        let page = api
            .get_history(pb::GetHistoryRequest {
                chat_id: chat,
                before_seq: before,
                limit: 1000,
                min_token: read.read_token.clone(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        let Some(last) = page.messages.last() else {
            break;
        };
        before = last.seq;
        for m in &page.messages {
            seen += 1;
            let own = m.sender_id == 2;
            assert_eq!(
                m.expire_at_ms == 0,
                own,
                "message {} from {}: expire_at {}",
                m.seq,
                m.sender_id,
                m.expire_at_ms
            );
        }
    }
    assert_eq!(seen, count);
}
