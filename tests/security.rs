//! A cluster with TLS everywhere and caller tokens, from `chatctl certs
//! init`: callers without a token, with a wrong one, or with a service token
//! on an admin call are refused and change nothing; a client with a
//! certificate from another CA cannot append entries or vote, nor can one of
//! ours that is not the node it claims to be; plaintext to a TLS listener is
//! refused; a config without TLS and tokens does not start unless it says
//! `insecure = true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chatstore::api::codec::{to_postcard, RAFT_WIRE_VERSION};
use chatstore::api::pb;
use chatstore::api::pb::chat_store_client::ChatStoreClient;
use chatstore::api::pb::raft::raft_transport_client::RaftTransportClient;
use chatstore::api::pb::raft::RaftRequest;
use chatstore::shard::types::{TypeConfig, Vote};
use common::procs::ProcessCluster;
use common::{ConfigOptions, TestDir};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("run");
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ {bin} {}\n{}{}-> exit {}", args.join(" "), r.1, r.2, r.0);
    r
}

/// chatctl as an operator: the cluster CA, the admin certificate, and the
/// token file given.
fn chatctl(certs: &Path, token: &str, args: &[&str]) -> (i32, String, String) {
    chatctl_as(certs, "admin", token, args)
}

/// chatctl with the certificate `<who>.pem` and the token file given.
fn chatctl_as(certs: &Path, who: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let ca = certs.join("ca.pem");
    let cert = certs.join(format!("{who}.pem"));
    let key = certs.join(format!("{who}.key"));
    let token = certs.join(token);
    let mut all: Vec<&str> = vec![
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_chatctl"), &all)
}

fn pem(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).expect("read PEM")
}

fn first_token(path: PathBuf) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .trim()
        .to_string()
}

/// Terms and leaders of every shard, from node statuses.
fn shard_state(certs: &Path, endpoints: &str) -> Vec<(u64, u64, u64)> {
    let (code, out, err) = chatctl(
        certs,
        "admin.tokens",
        &["--endpoints", endpoints, "--json", "shards"],
    );
    assert!(code == 0 || code == 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("shards --json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["shard"].as_u64().unwrap(),
                s["term"].as_u64().unwrap(),
                s["leader"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Runs `chatctl status` with the files in `certs` until it exits with
/// `code`, for at most `within`.
async fn wait_status(
    certs: &Path,
    token: &str,
    endpoints: &str,
    code: i32,
    within: Duration,
    what: &str,
) {
    let started = Instant::now();
    loop {
        let (got, out, err) = chatctl(certs, token, &["--endpoints", endpoints, "status"]);
        if got == code {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: chatctl status exited {got}: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_mutual_auth_and_tokens_keep_out_whoever_does_not_belong() {
    let dir = TestDir::new("security");
    let mut cluster = ProcessCluster::new(
        &dir.path,
        &ConfigOptions {
            shards: 3,
            ..Default::default()
        },
    );
    let config = cluster.config_path.to_str().unwrap().to_string();
    let certs_init = |out: &Path| {
        run(
            env!("CARGO_BIN_EXE_chatctl"),
            &[
                "certs",
                "init",
                "--config",
                &config,
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    let certs = dir.path.join("certs");
    let (code, out, err) = certs_init(&certs);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tls]") && out.contains("[auth]"), "{out}");
    // Running it again would replace the cluster's keys: refused.
    let (code, _, err) = certs_init(&certs);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");

    // Without TLS and tokens, and without `insecure = true`, nodes refuse.
    let text = std::fs::read_to_string(&cluster.config_path).unwrap();
    assert!(text.contains("insecure = true"));
    let plain = dir.path.join("plain.toml");
    std::fs::write(&plain, text.replace("insecure = true", "insecure = false")).unwrap();
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_chatstore"),
        &["node", "--config", plain.to_str().unwrap(), "--id", "1"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("insecure = true") && err.contains("certs init"),
        "{err}"
    );

    // The secured config: relative paths start at the config's folder.
    let secured = text.replace(
        "insecure = true",
        "insecure = false\nread_token_secret = \"a-test-secret-0123456789abcdef-0123456789\"",
    )
        + "\n[tls]\nca = \"certs/ca.pem\"\nnode_cert = \"certs/node-{id}.pem\"\n\
           node_key = \"certs/node-{id}.key\"\nrouter_cert = \"certs/router.pem\"\n\
           router_key = \"certs/router.key\"\n\
           [auth]\nservice_tokens = \"certs/service.tokens\"\nadmin_tokens = \"certs/admin.tokens\"\n";
    // A node whose key file is missing fails before it makes or stamps its
    // data folder.
    let broken = dir.path.join("broken-tls.toml");
    std::fs::write(
        &broken,
        secured.replace("certs/node-{id}.key", "certs/missing-{id}.key"),
    )
    .unwrap();
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_chatstore"),
        &["node", "--config", broken.to_str().unwrap(), "--id", "1"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("TLS files of node 1"), "{err}");
    let data = cluster.config.data_dir(chatstore::types::NodeId(1));
    assert!(!data.exists(), "{} was made", data.display());
    std::fs::write(&cluster.config_path, secured).unwrap();
    cluster.start_all_nodes();
    let router = cluster.start_router("eu");
    let addr = |id: u64| {
        cluster
            .config
            .node(chatstore::types::NodeId(id))
            .unwrap()
            .raft_addr
            .clone()
    };
    let endpoints = format!("{},{},{}", addr(1), addr(2), addr(3));

    // Every shard led, seen over mutual TLS with the admin token.
    wait_status(
        &certs,
        "admin.tokens",
        &endpoints,
        0,
        Duration::from_secs(60),
        "the TLS cluster did not become healthy",
    )
    .await;

    // The public API over TLS.
    let ca = Certificate::from_pem(pem(certs.join("ca.pem")));
    let channel = Endpoint::from_shared(format!("https://{router}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .domain_name("router.chatstore"),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    let mut api = None;
    for _ in 0..100 {
        if let Ok(ch) = channel.connect().await {
            api = Some(ChatStoreClient::new(ch));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut api = api.expect("TLS connection to the router");
    let service = first_token(certs.join("service.tokens"));
    let admin = first_token(certs.join("admin.tokens"));
    let send = |n: u64| pb::SendRequest {
        chat_id: 7,
        sender_id: 1,
        client_msg_id: n,
        body: b"hello".to_vec().into(),
        ..Default::default()
    };
    let e = api.send(with_token(send(1), None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = api
        .send(with_token(
            send(2),
            Some("not-a-token-of-this-cluster-at-all"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let get_chat = |token: &str| {
        with_token(
            pb::GetChatRequest {
                chat_id: 7,
                consistency: pb::Consistency::Linearizable as i32,
                ..Default::default()
            },
            Some(token),
        )
    };
    let before = api.get_chat(get_chat(&service)).await.unwrap().into_inner();
    assert_eq!(before.last_seq, 0, "refused sends stored nothing");
    let sent = api.send(with_token(send(3), Some(&service))).await;
    assert!(sent.is_ok(), "{sent:?}");
    // Moderation is an admin call.
    let close = pb::CloseChatRequest {
        chat_id: 7,
        reason: "test".into(),
        ..Default::default()
    };
    let e = api
        .close_chat(with_token(close.clone(), Some(&service)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let after = api.get_chat(get_chat(&service)).await.unwrap().into_inner();
    assert!(!after.closed, "a refused close changed nothing");
    assert_eq!(after.last_seq, 1);
    assert!(api
        .close_chat(with_token(close, Some(&admin)))
        .await
        .is_ok());

    // The load generator connects as a frontend does: TLS and a service
    // token. Without the token every call is refused.
    // Chats 100-104 unless `extra` names others.
    let bench = |token: &str, workload: &str, extra: &[&str]| {
        let chats: &[&str] = match extra.contains(&"--chats") {
            true => &[],
            false => &["--chats", "5", "--first-chat", "100"],
        };
        let mut args = vec![
            "bench",
            "--routers",
            &router,
            "--workload",
            workload,
            "--in-flight",
            "4",
            "--warmup",
            "0",
            "--count",
            "40",
            "--json",
        ];
        args.extend_from_slice(chats);
        args.extend_from_slice(extra);
        chatctl(&certs, token, &args)
    };
    // History pages come back whole (a short one counts as an error), from
    // chats the prefill tops up; an open loop starts 200 requests a second.
    let open_loop: &[&str] = &["--open-rate", "200"];
    for (workload, extra) in [("send", &[][..]), ("history", &[]), ("send", open_loop)] {
        let (code, out, err) = bench("service.tokens", workload, extra);
        assert_eq!(code, 0, "{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).expect("bench --json");
        assert_eq!(report["ops"][0]["count"], 40, "{out}");
        assert_eq!(report["ops"][0]["errors"], serde_json::json!({}), "{out}");
    }
    // --senders: every message of one chat from ids 1..=2 (from each of the
    // four workers' own ids 1..=4 without it).
    let one_chat = ["--first-chat", "300", "--chats", "1", "--senders", "2"];
    let (code, out, err) = bench("service.tokens", "send", &one_chat);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("bench --json");
    assert_eq!(report["senders"], 2, "{out}");
    let page = api
        .get_history(with_token(
            pb::GetHistoryRequest {
                chat_id: 300,
                limit: 100,
                consistency: pb::Consistency::Linearizable as i32,
                ..Default::default()
            },
            Some(&service),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut senders: Vec<u64> = page.messages.iter().map(|m| m.sender_id).collect();
    senders.sort_unstable();
    senders.dedup();
    assert_eq!(senders, [1, 2], "40 sends from senders 1 and 2 at random");
    // --watchers beside a load: two streams on each of chats 100-104, and
    // every send of the run (about half its 40 requests) reaches both
    // watchers of its chat.
    let watched = ["--mix", "send=1,history=1", "--watchers", "10"];
    let (code, out, err) = bench("service.tokens", "mixed", &watched);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("bench --json");
    assert_eq!(report["watch"]["chats"], 5, "{out}");
    let ops = report["ops"].as_array().expect("ops");
    let row = |name: &str| {
        ops.iter()
            .find(|o| o["op"] == name)
            .unwrap_or_else(|| panic!("no {name} row: {out}"))
    };
    let sends = row("send")["count"].as_u64().expect("send count");
    assert!(sends > 0, "{out}");
    assert_eq!(row("deliver")["count"].as_u64(), Some(2 * sends), "{out}");
    assert_eq!(row("deliver")["errors"], serde_json::json!({}), "{out}");
    let no_token = certs.join("no.tokens");
    std::fs::write(&no_token, "not-a-token-of-this-cluster-at-all\n").unwrap();
    let (_, out, _) = bench("no.tokens", "send", &[]);
    assert!(out.contains("Unauthenticated"), "{out}");

    // Admin calls with a service token: PERMISSION_DENIED, nothing moves.
    let state = shard_state(&certs, &endpoints);
    let (shard, _, leader) = state[0];
    let other = if leader == 1 { 2 } else { 1 };
    let (shard_arg, other_arg) = (shard.to_string(), other.to_string());
    let transfer = [
        "--endpoints",
        &endpoints,
        "transfer-leader",
        &shard_arg,
        &other_arg,
    ];
    let (code, _, err) = chatctl(&certs, "service.tokens", &transfer);
    assert_eq!(code, 2);
    assert!(err.contains("admin token"), "{err}");
    // An admin token from a router's host (routers hold the file) with the
    // router's certificate: refused too, an operator needs both.
    let (code, _, err) = chatctl_as(&certs, "router", "admin.tokens", &transfer);
    assert_eq!(code, 2);
    assert!(err.contains("operator's certificate"), "{err}");
    let (code, out, _) = chatctl(
        &certs,
        "service.tokens",
        &["--endpoints", &endpoints, "compact"],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("compacted 0 of 9") && out.contains("admin token"),
        "{out}"
    );

    // Raft from outside: a certificate of another CA (even one naming node
    // 1), and one of ours that is not node 1 (the router's).
    let forged = dir.path.join("forged");
    let (code, _, err) = certs_init(&forged);
    assert_eq!(code, 0, "{err}");
    let vote = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 1), None);
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1_000, 1),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let request = |payload: Vec<u8>| RaftRequest {
        format_version: RAFT_WIRE_VERSION,
        shard_id: shard,
        from_node: 1,
        payload: payload.into(),
    };
    let clients = [
        (
            "another CA's node-1 certificate",
            Identity::from_pem(
                pem(forged.join("node-1.pem")),
                pem(forged.join("node-1.key")),
            ),
        ),
        (
            "our router's certificate",
            Identity::from_pem(pem(certs.join("router.pem")), pem(certs.join("router.key"))),
        ),
    ];
    for target in [2u64, 3] {
        for (who, identity) in &clients {
            let tls = ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(identity.clone())
                .domain_name(format!("node-{target}.chatstore"));
            let endpoint = Endpoint::from_shared(format!("https://{}", addr(target)))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(5));
            let refused = match endpoint.connect().await {
                Err(_) => true,
                Ok(ch) => {
                    let mut raft = RaftTransportClient::new(ch);
                    let v = raft.vote(request(to_postcard(&vote))).await;
                    let a = raft.append_entries(request(to_postcard(&append))).await;
                    eprintln!("{who} -> node {target}: vote {v:?}, append {a:?}");
                    let denied = |r: &Result<_, tonic::Status>| match r {
                        Err(s) if who.contains("router") => {
                            s.code() == tonic::Code::PermissionDenied
                        }
                        Err(_) => true,
                        Ok(_) => false,
                    };
                    denied(&v) && denied(&a)
                }
            };
            assert!(refused, "{who} was let in by node {target}");
        }
    }
    // Plaintext to TLS listeners.
    for target in [router.clone(), addr(2)] {
        let ch = Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        if let Ok(ch) = ch {
            let mut c = ChatStoreClient::new(ch);
            let r = c.get_chat(get_chat(&admin)).await;
            assert!(r.is_err(), "plaintext call to {target} answered: {r:?}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // An election of its own (a starved node on a loaded machine) may move
    // a term on; the forged term 1,000 must not have taken anywhere.
    let now = shard_state(&certs, &endpoints);
    assert_eq!(now.len(), state.len(), "{now:?}");
    for (shard, term, _) in &now {
        assert!(*term < 1_000, "shard {shard} took the forged term: {now:?}");
    }

    // Token rotation without a restart: a new service token is taken up
    // from the file, and the one it replaced is refused, also by a Watch
    // opened with it, which ends.
    let mut watch = api
        .watch(with_token(
            pb::WatchRequest {
                cursors: vec![pb::Cursor { chat_id: 7, pts: 0 }],
            },
            Some(&service),
        ))
        .await
        .expect("a watch with the service token")
        .into_inner();
    let rotated = "rotated-service-token-0123456789abcdef";
    std::fs::write(
        certs.join("service.tokens"),
        format!("# rotated\n{rotated}\n"),
    )
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch of a revoked token ends");
    let e = ended.expect_err("with an error");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let started = std::time::Instant::now();
    while api.get_chat(get_chat(rotated)).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the router did not take the rotated token up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = api.get_chat(get_chat(&service)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // Certificate rotation without a restart, to a new CA (the other one
    // above). First every process trusts both CAs, then the router and the
    // nodes take certificates of the new one.
    let old_ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let new_ca = std::fs::read_to_string(forged.join("ca.pem")).unwrap();
    std::fs::write(certs.join("ca.pem"), format!("{old_ca}{new_ca}")).unwrap();
    let take_new = |name: &str| {
        for ext in ["pem", "key"] {
            let file = format!("{name}.{ext}");
            std::fs::copy(forged.join(&file), certs.join(&file)).unwrap();
        }
    };
    take_new("router");
    // A client that trusts only the new CA gets through on a new connection.
    let trusting_new_ca = |addr: &str| {
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(new_ca.as_bytes()))
                    .domain_name("router.chatstore"),
            )
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
    };
    let new_ca_only = trusting_new_ca(&router);
    let started = std::time::Instant::now();
    loop {
        if let Ok(ch) = new_ca_only.connect().await {
            let r = ChatStoreClient::new(ch).get_chat(get_chat(rotated)).await;
            assert!(r.is_ok(), "{r:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the router did not take its new certificate up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in 1..=3 {
        take_new(&format!("node-{id}"));
    }
    // chatctl with only the new CA and a new admin certificate: every node
    // presents its new certificate and takes the new CA's client ones.
    std::fs::copy(
        certs.join("admin.tokens"),
        forged.join("cluster-admin.tokens"),
    )
    .unwrap();
    wait_status(
        &forged,
        "cluster-admin.tokens",
        &endpoints,
        0,
        Duration::from_secs(30),
        "the nodes did not take their new certificates up",
    )
    .await;
    // Writes still go through on the connections made before.
    let open_chat = |n: u64| pb::SendRequest {
        chat_id: 8,
        ..send(n)
    };
    let r = api.send(with_token(open_chat(4), Some(rotated))).await;
    assert!(r.is_ok(), "{r:?}");

    // Only the new CA from here on. A new router makes new connections to
    // the nodes, and writes go through it.
    std::fs::write(certs.join("ca.pem"), &new_ca).unwrap();
    let second = cluster.start_router("us");
    let second_api = trusting_new_ca(&second);
    let started = std::time::Instant::now();
    let mut n = 5;
    loop {
        if let Ok(ch) = second_api.connect().await {
            let r = ChatStoreClient::new(ch)
                .send(with_token(open_chat(n), Some(rotated)))
                .await;
            if r.is_ok() {
                break;
            }
            n += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no write through a router started after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The old CA's admin certificate is refused once the nodes read the
    // new CA file.
    wait_status(
        &certs,
        "admin.tokens",
        &endpoints,
        2,
        Duration::from_secs(30),
        "the nodes still take the old CA's admin certificate",
    )
    .await;
    // A restarted node makes new connections to its peers with its new
    // certificate, and catches up.
    cluster.kill_node(1);
    cluster.start_node(1);
    wait_status(
        &forged,
        "cluster-admin.tokens",
        &endpoints,
        0,
        Duration::from_secs(60),
        "node 1 did not rejoin with its new certificate",
    )
    .await;
}

/// Raw bytes as a gRPC message, for sending what no generated client would.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let out = buf.copy_to_bytes(buf.remaining()).to_vec();
        Ok(Some(out))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn raw_call(addr: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_frames_are_refused_and_every_process_keeps_serving() {
    let dir = TestDir::new("hostile");
    let (mut cluster, nodes) = common::procs::start_cluster(&dir.path, 2).await;
    let router = cluster.start_router("eu");
    let mut api = common::procs::router_client(&router).await;
    let node = cluster.config.nodes[0].raft_addr.clone();
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let mut envelope = RaftRequest {
        format_version: RAFT_WIRE_VERSION,
        shard_id: 0,
        from_node: 2,
        payload: garbage.clone().into(),
    };
    let cases: Vec<(&str, &'static str, Vec<u8>)> = vec![
        ("router", "/chatstore.v1.ChatStore/Send", garbage.clone()),
        (
            "router",
            "/chatstore.v1.ChatStore/GetHistory",
            vec![0xff; 64],
        ),
        ("router", "/chatstore.v1.ChatStore/Send", vec![7u8; 2 << 20]),
        (
            "router",
            "/chatstore.v1.ChatStore/NoSuchCall",
            garbage.clone(),
        ),
        ("node", "/chatstore.v1.node.NodeApi/Write", garbage.clone()),
        ("node", "/chatstore.v1.node.NodeApi/Read", vec![0x0a; 300]),
        (
            "node",
            "/chatstore.v1.raft.RaftTransport/AppendEntries",
            envelope.encode_to_vec(),
        ),
        ("node", "/chatstore.v1.raft.RaftTransport/Vote", {
            envelope.format_version = 99;
            envelope.encode_to_vec()
        }),
        (
            "node",
            "/chatstore.v1.node.Admin/ChangeVoters",
            garbage.clone(),
        ),
    ];
    use prost::Message as _;
    for (who, path, body) in cases {
        let len = body.len();
        let target = if who == "router" { &router } else { &node };
        let r = raw_call(target, path, body).await;
        eprintln!("{who} {path} ({len} bytes): {r:?}");
        let status = r.expect_err("hostile input must be refused");
        assert!(
            !matches!(status.code(), tonic::Code::Ok | tonic::Code::Unavailable),
            "{path}: {status:?}"
        );
    }
    // Everyone still serves.
    let sent = api
        .send(pb::SendRequest {
            chat_id: 3,
            sender_id: 1,
            client_msg_id: 1,
            body: b"still here".to_vec().into(),
            ..Default::default()
        })
        .await;
    assert!(sent.is_ok(), "{sent:?}");
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(30))
        .await
        .expect("every node still serves");
}
