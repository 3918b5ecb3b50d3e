//! State machine properties, on real sled trees: the same commands give
//! byte-identical state on independent replicas whatever the apply batching
//! and whether self-destructing bodies are sealed (compared in the clear);
//! seqs are gapless per chat; a retried send returns the original seq. The
//! commands start under apply rules 0 and may raise them at any point.
//! Differences read the same whether new messages have change records
//! (rules 2) or not (rules 3), whatever collection has dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chatstore::api::pb::replicated::{
    command, command_result, self_destruct, CloseChatCmd, Command, CommandBatch, DeleteCmd,
    EditCmd, ExpireCmd, GcChangesCmd, MarkReadCmd, RaiseApplyRulesCmd, ReopenChatCmd, SelfDestruct,
    SendCmd, ShardSettings,
};
use chatstore::shard::apply::{default_settings, Applier, Overlay, APPLY_RULES};
use chatstore::shard::memtable::{Memtable, View};
use chatstore::shard::reads::StateReader;
use chatstore::shard::sealing;
use chatstore::shard::types::log_id;
use chatstore::storage::{keys, KeyRing};
use proptest::prelude::*;
use prost::Message;

fn apply_all(
    tree: &sled::Tree,
    batches: &[CommandBatch],
    split: usize,
) -> Vec<command_result::Outcome> {
    apply_all_with(tree, batches, split, None)
}

fn apply_all_with(
    tree: &sled::Tree,
    batches: &[CommandBatch],
    split: usize,
    keys: Option<&KeyRing>,
) -> Vec<command_result::Outcome> {
    let mut outcomes = Vec::new();
    // Effects wait in a memtable as on a replica, flushed every other call.
    let mem = Arc::new(Memtable::unshared());
    let view = View::new(tree.clone(), mem.clone());
    for (n, group) in batches.chunks(split.max(1)).enumerate() {
        let mut overlay = match keys {
            Some(k) => Overlay::sealed(&view, k),
            None => Overlay::new(&view),
        };
        let mut applier = Applier::new(&mut overlay, stored_settings(&view));
        for b in group {
            for r in applier.apply_batch(b).expect("apply") {
                outcomes.push(r.outcome.expect("every command has an outcome"));
            }
        }
        let (writes, _) = overlay.into_writes().expect("writes");
        mem.extend(writes, log_id(1, 1));
        if n % 2 == 1 {
            mem.flush_into(tree, keys).expect("flush");
        }
    }
    mem.flush_into(tree, keys).expect("flush");
    outcomes
}

/// The settings a replica keeps in its tree, as the state machine reads
/// them: a raise of the apply rules holds for later apply calls, and a tree
/// without them (no bootstrap) is under rules 0.
fn stored_settings(tree: &View) -> ShardSettings {
    match tree.get(keys::SM_META_SETTINGS).unwrap() {
        Some(v) => ShardSettings::decode(v.as_ref()).unwrap(),
        None => default_settings(),
    }
}

fn dump(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// The tree's pairs with sealed bodies opened.
fn dump_in_clear(tree: &sled::Tree, keys: &KeyRing) -> Vec<(Vec<u8>, Vec<u8>)> {
    dump(tree)
        .into_iter()
        .map(|(k, v)| {
            if k.first() == Some(&b'm') {
                if let Some(plain) = sealing::plain_message_bytes(keys, &v, None).unwrap() {
                    return (k, plain);
                }
            }
            (k, v)
        })
        .collect()
}

fn arb_command() -> impl Strategy<Value = Command> {
    let chat = 1u64..4;
    let user = 1u64..4;
    let seq = 0u64..8;
    prop_oneof![
        4 => (chat.clone(), user.clone(), 1u64..6, proptest::collection::vec(any::<u8>(), 0..16), 0u8..4, 1u32..5).prop_map(
            |(chat_id, sender_id, client_msg_id, body, sd, secs)| Command {
                kind: Some(command::Kind::Send(SendCmd {
                    chat_id,
                    sender_id,
                    client_msg_id,
                    body: body.into(),
                    sealed_body: None,
                    self_destruct: match sd {
                        1 => Some(SelfDestruct { policy: Some(self_destruct::Policy::AfterSendSecs(secs)) }),
                        2 => Some(SelfDestruct { policy: Some(self_destruct::Policy::AfterReadSecs(secs)) }),
                        _ => None,
                    },
                })),
            }
        ),
        1 => (chat.clone(), seq.clone(), user.clone(), 0u64..4, 0u8..3).prop_map(|(chat_id, seq, editor_id, edit_id, body)| Command {
            kind: Some(command::Kind::Edit(EditCmd { chat_id, seq, editor_id, body: vec![b'e', body].into(), sealed_body: None, edit_id })),
        }),
        1 => (chat.clone(), seq.clone(), user.clone()).prop_map(|(chat_id, seq, requester_id)| Command {
            kind: Some(command::Kind::Delete(DeleteCmd { chat_id, seq, requester_id })),
        }),
        1 => (chat.clone(), user.clone(), seq).prop_map(|(chat_id, reader_id, up_to_seq)| Command {
            kind: Some(command::Kind::MarkRead(MarkReadCmd { chat_id, reader_id, up_to_seq })),
        }),
        1 => (0u64..20_000, 1u32..5).prop_map(|(up_to_ms, max_items)| Command {
            kind: Some(command::Kind::Expire(ExpireCmd { up_to_ms: 1_000_000 + up_to_ms, max_items })),
        }),
        1 => chat.clone().prop_map(|chat_id| Command {
            kind: Some(command::Kind::CloseChat(CloseChatCmd { chat_id, reason: "spam".into() })),
        }),
        1 => chat.prop_map(|chat_id| Command {
            kind: Some(command::Kind::ReopenChat(ReopenChatCmd { chat_id })),
        }),
        1 => (0u64..20_000, 1u32..5).prop_map(|(before, max_items)| Command {
            kind: Some(command::Kind::GcChanges(GcChangesCmd { before_ms: 1_000_000 + before, max_items })),
        }),
        1 => (0u32..=APPLY_RULES).prop_map(|apply_rules| Command {
            kind: Some(command::Kind::RaiseApplyRules(RaiseApplyRulesCmd { apply_rules })),
        }),
    ]
}

fn arb_batches() -> impl Strategy<Value = Vec<CommandBatch>> {
    proptest::collection::vec(
        (0u64..3000, proptest::collection::vec(arb_command(), 1..6)),
        1..25,
    )
    .prop_map(|items| {
        let mut now = 1_000_000;
        items
            .into_iter()
            .map(|(step, commands)| {
                now += step;
                CommandBatch {
                    format_version: 1,
                    now_ms: now,
                    commands,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replicas_end_byte_identical(batches in arb_batches(), split_a in 1usize..5, split_b in 1usize..5) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let a = db.open_tree("a").unwrap();
        let b = db.open_tree("b").unwrap();
        let key_dir = tempfile::tempdir().unwrap();
        let keys = KeyRing::open(key_dir.path(), Duration::from_secs(60)).unwrap();
        let out_a = apply_all_with(&a, &batches, split_a, Some(&keys));
        let out_b = apply_all(&b, &batches, split_b);
        prop_assert_eq!(out_a, out_b);
        prop_assert_eq!(dump_in_clear(&a, &keys), dump(&b));
    }

    #[test]
    fn seqs_are_gapless_and_sends_deduplicated(batches in arb_batches()) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("s").unwrap();
        let mut next_seq: BTreeMap<u64, u64> = BTreeMap::new();
        let mut first: BTreeMap<(u64, u64, u64), u64> = BTreeMap::new();
        let mut closed: BTreeMap<u64, bool> = BTreeMap::new();
        for batch in &batches {
            let outcomes = apply_all(&tree, std::slice::from_ref(batch), 1);
            for (cmd, outcome) in batch.commands.iter().zip(outcomes) {
                match (&cmd.kind, outcome) {
                    (Some(command::Kind::Send(s)), command_result::Outcome::Send(r)) => {
                        let key = (s.chat_id, s.sender_id, s.client_msg_id);
                        if let Some(seq) = first.get(&key) {
                            prop_assert!(r.duplicate);
                            prop_assert_eq!(r.seq, *seq);
                        } else {
                            prop_assert!(!r.duplicate);
                            let expect = next_seq.get(&s.chat_id).copied().unwrap_or(1);
                            prop_assert_eq!(r.seq, expect, "gapless seq");
                            next_seq.insert(s.chat_id, expect + 1);
                            first.insert(key, r.seq);
                        }
                    }
                    (Some(command::Kind::Send(s)), command_result::Outcome::Error(_)) => {
                        prop_assert!(closed.get(&s.chat_id).copied().unwrap_or(false), "only closed chats refuse valid sends");
                    }
                    (Some(command::Kind::CloseChat(c)), _) => { closed.insert(c.chat_id, true); }
                    (Some(command::Kind::ReopenChat(c)), _) => { closed.insert(c.chat_id, false); }
                    _ => {}
                }
            }
        }
    }
}

/// Stores `settings` under `apply_rules`, as a bootstrap would.
fn start_under_rules(tree: &sled::Tree, apply_rules: u32) {
    let settings = ShardSettings {
        apply_rules,
        ..default_settings()
    };
    tree.insert(keys::SM_META_SETTINGS, settings.encode_to_vec())
        .unwrap();
}

/// `batches` without the commands `drop` names.
fn without(batches: &[CommandBatch], drop: impl Fn(&command::Kind) -> bool) -> Vec<CommandBatch> {
    batches
        .iter()
        .map(|b| CommandBatch {
            commands: b
                .commands
                .iter()
                .filter(|c| !c.kind.as_ref().is_some_and(&drop))
                .cloned()
                .collect(),
            ..b.clone()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A shard moved from rules 2 to rules 3 at any batch, with change
    /// collection running, answers every difference (every chat, cursor and
    /// page size) as a shard under rules 2 that never collected does, or
    /// tells the device to reset; and only collection makes it reset.
    #[test]
    fn differences_read_the_same_whether_new_messages_have_change_records(
        batches in arb_batches(),
        raise_at in 0usize..20,
    ) {
        let is_raise = |k: &command::Kind| matches!(k, command::Kind::RaiseApplyRules(_));
        let is_gc = |k: &command::Kind| matches!(k, command::Kind::GcChanges(_));
        let mut moved = without(&batches, is_raise);
        if raise_at < moved.len() {
            moved[raise_at].commands.insert(0, Command {
                kind: Some(command::Kind::RaiseApplyRules(RaiseApplyRulesCmd { apply_rules: 3 })),
            });
        }
        let truth = without(&batches, |k| is_raise(k) || is_gc(k));
        let uncollected = without(&moved, is_gc);
        let db = sled::Config::new().temporary(true).open().unwrap();
        let key_dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(KeyRing::open(key_dir.path(), Duration::from_secs(60)).unwrap());
        let (a, b, c) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap(), db.open_tree("c").unwrap());
        for t in [&a, &b, &c] {
            start_under_rules(t, 2);
        }
        apply_all(&a, &truth, 2);
        apply_all(&b, &moved, 3);
        apply_all(&c, &uncollected, 1);
        // The change records collection dropped from each chat, by pts.
        let dropped = |chat: u64| -> Vec<u64> {
            c.scan_prefix(keys::chat_prefix(keys::TAG_CHANGE, chat))
                .map(|kv| kv.unwrap().0)
                .filter(|k| !b.contains_key(k).unwrap())
                .map(|k| keys::part(&k, 1).unwrap())
                .collect()
        };
        let expected = StateReader::new(a, ring.clone(), Default::default());
        let read = StateReader::new(b.clone(), ring, Default::default());
        for chat in 1..4 {
            let last_pts = expected.chat_record(chat).unwrap().last_pts;
            prop_assert_eq!(read.chat_record(chat).unwrap().last_pts, last_pts);
            let dropped = dropped(chat);
            for pts in 0..=last_pts + 1 {
                for (limit, bytes_max) in [(1, 0), (2, 0), (5, 0), (1000, 0), (1000, 40)] {
                    let want = expected.difference(chat, pts, limit, bytes_max).unwrap();
                    let got = read.difference(chat, pts, limit, bytes_max).unwrap();
                    prop_assert!(!want.reset_required);
                    if got.reset_required {
                        prop_assert!(
                            dropped.iter().any(|&d| d > pts),
                            "reset with nothing after pts {} of chat {} collected ({:?})", pts, chat, dropped
                        );
                        prop_assert!(got.changes.is_empty());
                        prop_assert_eq!(got.pts, last_pts);
                    } else {
                        prop_assert_eq!(&got, &want, "chat {} pts {} limit {} bytes {}", chat, pts, limit, bytes_max);
                    }
                }
            }
        }
    }
}
