//! `chatctl` against a real multi-process cluster: data commands, closing
//! and reopening chats (one and many from a file), status and verify, and a
//! clear error with a non-zero exit code when a node is unreachable.

mod common;

use std::process::Command;
use std::time::Duration;

use common::procs::{router_client, start_cluster};
use common::TestDir;

fn chatctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatctl"))
        .args(args)
        .output()
        .expect("run chatctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chatctl_data_moderation_status_and_errors() {
    let dir = TestDir::new("cli");
    let (mut cluster, nodes) = start_cluster(&dir.path, 4).await;
    let (router, metrics) = cluster.start_router_with_metrics("eu");
    router_client(&router).await;
    let endpoints = cluster.endpoints();
    let r = |extra: &[&str]| {
        let mut a = vec!["--router", router.as_str()];
        a.extend_from_slice(extra);
        chatctl(&a)
    };

    let (code, out, err) = r(&["send", "--chat", "3", "--sender", "1", "hello there"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent: chat 3 seq 1"), "{out}");
    let (code, out, _) = r(&["history", "--chat", "3"]);
    assert_eq!(code, 0);
    assert!(out.contains("hello there"), "{out}");
    let (code, out, _) = r(&[
        "--json",
        "send",
        "--chat",
        "3",
        "--sender",
        "1",
        "--client-msg-id",
        "77",
        "x",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("--json prints JSON");
    assert_eq!(v["seq"], 2);

    // Close many chats from a file; a dry run changes nothing.
    for chat in [10u64, 11, 12] {
        r(&["send", "--chat", &chat.to_string(), "--sender", "5", "spam"]);
    }
    let file = dir.path.join("abusive.txt");
    std::fs::write(&file, "# abusive channels\n10\n11\n12\n").unwrap();
    let f = file.to_str().unwrap();
    let (code, out, _) = r(&[
        "chat",
        "close",
        "--file",
        f,
        "--reason",
        "spam wave",
        "--dry-run",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("would close 3"), "{out}");
    let (_, out, _) = r(&["chat", "info", "10"]);
    assert!(out.contains("closed    no"), "{out}");
    let (code, out, err) = r(&["chat", "close", "--file", f, "--reason", "spam wave"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("closed 3 of 3"), "{out}");
    let (_, out, _) = r(&["chat", "info", "11"]);
    assert!(out.contains("closed    yes: spam wave"), "{out}");
    let (code, _, err) = r(&["send", "--chat", "12", "--sender", "5", "more spam"]);
    assert_eq!(code, 2, "a closed chat refuses sends");
    assert!(
        err.contains("FailedPrecondition") && err.contains("spam wave"),
        "{err}"
    );
    let (code, out, _) = r(&["chat", "reopen", "12"]);
    assert_eq!(code, 0);
    assert!(out.contains("reopened 1 of 1"), "{out}");
    let (code, _, _) = r(&["send", "--chat", "12", "--sender", "5", "ok now"]);
    assert_eq!(code, 0);
    std::fs::write(&file, "10\nnot-a-chat\n").unwrap();
    let (code, _, err) = r(&["chat", "close", "--file", f, "--reason", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a chat id"), "{err}");

    // Status and verify over the node API.
    let (code, out, err) = chatctl(&["--endpoints", &endpoints, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("shards: 4 of 4") && out.contains("eu"),
        "{out}"
    );
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(30))
        .await
        .unwrap();
    let (code, out, err) = chatctl(&["--endpoints", &endpoints, "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");

    // The router's Prometheus endpoint counts what it served.
    let body = common::http_get(&metrics, "/metrics").await;
    assert!(body.contains("chatstore_router_requests_total"), "{body}");

    // A node that is down: clear error, non-zero exit.
    cluster.kill_node(3);
    let (code, out, err) = chatctl(&["--endpoints", &endpoints, "status"]);
    assert_eq!(code, 2);
    assert!(out.contains("DOWN"), "{out}");
    assert!(
        err.contains("node 3") && err.contains("is it running?"),
        "{err}"
    );
    let (code, _, err) = chatctl(&["--endpoints", &endpoints, "verify"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach node"), "{err}");
    let (code, _, err) = chatctl(&["--router", "127.0.0.1:1", "history", "--chat", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach the router"), "{err}");
}
