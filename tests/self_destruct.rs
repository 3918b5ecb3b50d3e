//! Self-destructing messages on a multi-process cluster: both policies, the
//! sender's own read not starting the timer, and expiry that survives a
//! leader kill and a full cluster restart. No read path ever returns a
//! message at or past its expire_at.

mod common;

use std::time::{Duration, Instant};

use chatstore::api::pb::{self, chat_store_client::ChatStoreClient, self_destruct_policy::Policy};
use chatstore::types::now_ms;
use common::procs::{router_client, start_cluster, ProcessCluster};
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

/// Waits until `seq` of `chat` is gone from every listed replica, checking
/// on the way that no replica shows it at or past its expire_at.
async fn wait_gone(nodes: &Client, live: &[u64], chat: u64, seq: u64, within: Duration) {
    let started = Instant::now();
    loop {
        let mut present = false;
        for node in live {
            let Ok(h) = nodes.history_on(*node, chat).await else {
                present = true;
                continue;
            };
            if let Some(m) = h.iter().find(|m| m.seq == seq) {
                present = true;
                assert!(
                    m.expire_at_ms == 0 || now_ms() < m.expire_at_ms,
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

    eprintln!("delete 2 s after sending");
    let keep = send(&mut api, chat, 1, 1, None).await;
    let s = send(&mut api, chat, 1, 2, Some(Policy::AfterSendSecs(2))).await;
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
    assert_eq!(m.messages[0].expire_at_ms, s.created_at_ms + 2000);
    wait_gone(&nodes, &[1, 2, 3], chat, s.seq, Duration::from_secs(10)).await;
    // Reads hide it from 500 ms before expiry; the replicated Expire
    // follows within a chore tick and reaches devices as a change.
    let started = Instant::now();
    let expired = loop {
        let diff = api
            .get_difference(pb::GetDifferenceRequest {
                cursors: vec![pb::Cursor {
                    chat_id: chat,
                    pts: s.pts,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let found: Vec<pb::Change> = diff.chats[0]
            .changes
            .iter()
            .filter(|c| c.kind == pb::ChangeKind::ExpireMessage as i32)
            .cloned()
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no EXPIRE change within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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

    eprintln!("delete 2 s after being read by someone else");
    let r = send(&mut api, chat, 1, 3, Some(Policy::AfterReadSecs(2))).await;
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
    let at = m.messages[0].expire_at_ms;
    assert!(
        at >= before + 2000 && at <= now_ms() + 2000,
        "timer starts at the other reader's read"
    );
    wait_gone(&nodes, &[1, 2, 3], chat, r.seq, Duration::from_secs(10)).await;
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
}
