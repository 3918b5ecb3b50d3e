//! Leader-side chores, run every [`TICK`] over the shards this node leads.
//! All of them are proposals, so every replica applies the same effect at
//! the same log index, and a new leader picks up where an old one stopped
//! (the state they work from is replicated):
//! - a new shard's first leader proposes its bootstrap command (incarnation
//!   and replicated settings);
//! - self-destruct: when the TTL index holds due messages, propose
//!   `Expire { up_to_ms: now, max_items }` (DESIGN section 6);
//! - dedup records older than the replicated dedup window are dropped by a
//!   pass of `GcDedup` steps over all of them, once per window;
//! - a shard under older apply rules than every member's node knows moves
//!   to the newest of them (`RaiseApplyRules`; see `shard::apply`);
//! - each chat's changes older than the replicated change retention are
//!   dropped, oldest first, by a pass of `GcChanges` steps four times per
//!   retention window (a device whose cursor is older is told to reset);
//! - a quiet shard (see `node::quiesce`) is woken only for the chores that
//!   fall due without writes: expiry and collection passes;
//! - a node whose clock is off from its peers' by more than
//!   `CLOCK_OFFSET_MS_MAX` (two ticks in a row) hands every shard it leads
//!   to a caught-up, live voter with a good clock, runs none of the chores
//!   that read the clock, and starts no election (see `node::clock`); no
//!   leadership is handed to a node whose clock is off;
//! - leadership returns to the shard's preferred region: a leader outside it
//!   that has led for a while hands over to a caught-up voter there (damped:
//!   a hold time before the first try and between tries, so it does not
//!   flap while a node restarts).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;

use tokio::sync::{watch, Semaphore};

use crate::api::pb::replicated::{
    command, BootstrapCmd, Command, ExpireCmd, GcChangesCmd, GcDedupCmd, RaiseApplyRulesCmd,
    ShardSettings,
};
use crate::node::clock::{ClockReport, CLOCK_OFFSET_MS_MAX};
use crate::node::Registry;
use crate::shard::Shard;
use crate::storage::keys;
use crate::types::{now_ms, ShardId};

/// How often chores run. Bounds how late a self-destructing message is
/// deleted after its expiry (reads hide it on time regardless).
pub const TICK: Duration = Duration::from_millis(500);
/// Most messages one Expire command deletes; more go in the next tick.
pub const EXPIRE_BATCH_MAX: u32 = 1_000;
/// Most records one GcDedup or GcChanges step examines.
pub const GC_BATCH_MAX: u32 = 1_000;
/// Expiry running this late adds one [`EXPIRE_BATCH_MAX`] to each step.
const EXPIRE_LATE_UNIT_MS: u64 = 1_000;
/// A collection pass running for this share of its interval adds one
/// [`GC_BATCH_MAX`] to each step.
const PASS_LATE_UNITS: u64 = 16;

/// How many items a step of work that runs `late_ms` late takes: one
/// `batch` more for each `unit_ms` of lateness, up to what apply takes in one
/// command ([`crate::shard::apply::EXPIRE_ITEMS_MAX`]). A shard whose
/// writes outpace steps of one batch per tick (about 2,000 records a
/// second) gets steps up to ten times larger rather than falling further
/// behind for ever; one that keeps up pays small steps.
fn step_items(batch: u32, late_ms: u64, unit_ms: u64) -> u32 {
    let batches = 1 + late_ms / unit_ms.max(1);
    (batch as u64)
        .saturating_mul(batches)
        .min(crate::shard::apply::EXPIRE_ITEMS_MAX as u64) as u32
}

/// Led shards whose tick may wait on peers at the same time.
const CHORES_AT_ONCE: usize = 16;

/// Ticks in a row that must find this node's clock off before it acts.
const OFF_TICKS_TO_ACT: u32 = 2;

/// A preferred voter must be this close to the leader's log to receive
/// leadership.
pub const TRANSFER_LAG_MAX: u64 = 100;

/// What the chores need to know about the cluster.
pub struct Context {
    /// This node's region.
    pub region: String,
    /// Each shard's preferred leader region.
    pub preferred: BTreeMap<ShardId, String>,
    /// How long a node must have led a shard before handing it back, and
    /// the least time between two hand-back attempts.
    pub return_after: Duration,
    /// Idle time after which a led shard quiesces (zero: never).
    pub quiesce_after: Duration,
    /// The longest election timeout: a peer that has not answered a ping
    /// for this long is handed no leadership, and a leader whose clock is
    /// off tries to hand a shard over again this often.
    pub election_timeout: Duration,
    /// The replicated settings a new shard's bootstrap records (with the
    /// newest apply rules its members know).
    pub bootstrap_settings: ShardSettings,
}

pub async fn run(registry: Registry, ctx: Context, mut shutdown: watch::Receiver<bool>) {
    let ctx = Arc::new(ctx);
    let chore_slots = Arc::new(Semaphore::new(CHORES_AT_ONCE));
    // The tick of each led shard still running, aborted when the node stops.
    let mut running: BTreeMap<ShardId, tokio::task::JoinHandle<Option<Instant>>> = BTreeMap::new();
    // Since when this node leads each shard, and when it last tried to hand
    // one over.
    let mut leading_since: BTreeMap<ShardId, Instant> = BTreeMap::new();
    let mut last_transfer: BTreeMap<ShardId, Instant> = BTreeMap::new();
    // Ticks in a row that found this node's clock off; one tick is not
    // enough to act on.
    let mut off_ticks: u32 = 0;
    // This node's clocks at the last tick, and until when a step of the
    // wall clock keeps the chores that read it paused.
    let mut last_tick: Option<(Instant, u64)> = None;
    let mut stepped_until: Option<Instant> = None;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(TICK) => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        if stopping {
            // Gone before the node shuts its shards down.
            for (_, job) in std::mem::take(&mut running) {
                job.abort();
                let _ = job.await;
            }
            return;
        }
        let (tick, wall) = (Instant::now(), now_ms());
        if let Some((last, last_wall)) = last_tick {
            let wall_moved = wall as i64 - last_wall as i64;
            let time_passed = tick.duration_since(last).as_millis() as i64;
            if wall_moved.abs_diff(time_passed) > CLOCK_OFFSET_MS_MAX {
                tracing::warn!(
                    moved_ms = wall_moved,
                    elapsed_ms = time_passed,
                    "this node's wall clock stepped; chores that read it wait for the peers to check it"
                );
                stepped_until = Some(tick + CLOCK_STEP_SETTLE);
            }
        }
        last_tick = Some((tick, wall));
        let clocks = registry.clock_report();
        metrics::gauge!(crate::metrics::CLOCK_OFFSET_MS).set(clocks.own_offset_ms as f64);
        let was_off = off_ticks >= OFF_TICKS_TO_ACT;
        off_ticks = if clocks.own_is_off() {
            off_ticks.saturating_add(1)
        } else {
            0
        };
        let clock_off = off_ticks >= OFF_TICKS_TO_ACT;
        // Handing leadership over waits for two ticks of evidence; expiring
        // messages and collecting dedup records by a clock that may be wrong
        // cannot be undone, so they stop at the first sign.
        let chores_paused =
            clock_off || clocks.own_is_off() || stepped_until.is_some_and(|until| tick < until);
        registry.set_clock_suspect(chores_paused);
        if clock_off && !was_off {
            tracing::error!(offset_ms = clocks.own_offset_ms, bound_ms = CLOCK_OFFSET_MS_MAX, "this node's clock is off from its peers' by more than the bound; it gives up leadership until the clock is fixed");
        } else if was_off && !clock_off {
            tracing::info!(
                offset_ms = clocks.own_offset_ms,
                "this node's clock is back within the bound"
            );
        }
        let shards = registry.all();
        let mut led = Vec::new();
        for shard in shards {
            // A replica that stopped applying still holds its last writes.
            shard.flush_state_if_due();
            // A node whose clock is off starts no election; it still votes.
            shard.raft.runtime_config().elect(!clock_off);
            if shard.is_leader() {
                led.push(shard);
            } else {
                shard.refuse_writes(false);
            }
        }
        let led_ids: BTreeSet<ShardId> = led.iter().map(|s| s.id).collect();
        leading_since.retain(|id, _| led_ids.contains(id));
        // Each led shard's tick runs as a task of its own (up to
        // CHORES_AT_ONCE at a time): one whose chores wait on a slow peer, or
        // on an apply held up by a snapshot copy, skips its own next ticks
        // until it is done, and holds up no other shard's.
        let done: Vec<ShardId> = running
            .iter()
            .filter(|(_, job)| job.is_finished())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let job = running.remove(&id).expect("listed above");
            if let Ok(Some(at)) = job.await {
                last_transfer.insert(id, at);
            }
        }
        for shard in led {
            if running.contains_key(&shard.id) {
                continue;
            }
            let since = *leading_since.entry(shard.id).or_insert_with(Instant::now);
            let last_try = last_transfer.get(&shard.id).copied();
            let (registry, ctx, clocks, slots) = (
                registry.clone(),
                ctx.clone(),
                clocks.clone(),
                chore_slots.clone(),
            );
            let clock = ClockState {
                off: clock_off,
                chores_paused,
            };
            let id = shard.id;
            running.insert(
                id,
                tokio::spawn(async move {
                    let _slot = slots.acquire_owned().await.ok()?;
                    lead(&registry, &shard, &ctx, &clocks, clock, since, last_try).await
                }),
            );
        }
    }
}

/// What a tick knows of this node's clock.
#[derive(Clone, Copy)]
struct ClockState {
    /// Off from the peers' for two ticks in a row: leadership goes.
    off: bool,
    /// Off, or maybe off (one tick, or a step of the wall clock not yet
    /// checked by the peers): no chore that reads the clock runs.
    chores_paused: bool,
}

/// How long after a step of this node's wall clock the chores that read it
/// wait: long enough for a round of pings to measure it against the peers'.
const CLOCK_STEP_SETTLE: Duration = Duration::from_secs(5);

/// One led shard's tick: its chores, then a leadership hand-over if one is
/// due, else a try at going quiet. Returns when it tried a hand-over.
async fn lead(
    registry: &Registry,
    shard: &Shard,
    ctx: &Context,
    clocks: &ClockReport,
    clock: ClockState,
    since: Instant,
    last_try: Option<Instant>,
) -> Option<Instant> {
    let clock_off = clock.off;
    let result = if shard.is_quiet() {
        quiet_chores(registry, shard, ctx, clock.chores_paused).await
    } else {
        chores(registry, shard, ctx, clock.chores_paused).await
    };
    if let Err(e) = result {
        tracing::debug!(shard = %shard.id, error = %e, "leader chores");
    }
    // A leader whose clock is off takes no client writes while a live voter
    // with a good clock could take over: without writes one that lags
    // catches up. With none, the shard keeps taking writes.
    shard.refuse_writes(clock_off && !good_live_voters(registry, shard, clocks).is_empty());
    // A hand-over that has not happened within an election timeout was
    // missed by every voter (the leader stops its heartbeats, and the
    // followers of a quiet shard have no timers to elect with): ask again,
    // which wakes whichever voters hear it. Never go quiet meanwhile.
    if let Some(pending) = shard.transfer_pending() {
        if pending.at.elapsed() < ctx.election_timeout {
            return None;
        }
        tracing::warn!(shard = %shard.id, to = pending.to, "leadership hand-over did not happen; asking again");
        if let Err(e) = shard.transfer_leader(pending.to).await {
            tracing::warn!(shard = %shard.id, error = %e, "transfer leadership");
        }
        return Some(Instant::now());
    }
    let tried_within = |d: Duration| last_try.is_some_and(|t| t.elapsed() < d);
    let target = if clock_off {
        // Entries stamped by this clock would be off: hand over at once,
        // and try again soon if leadership comes back.
        match tried_within(ctx.election_timeout) {
            true => None,
            false => {
                let target = handover_target(registry, shard, ctx, clocks);
                if let Some(to) = target {
                    tracing::warn!(shard = %shard.id, to, offset_ms = clocks.own_offset_ms, "this node's clock is off from its peers'; handing leadership over");
                }
                target
            }
        }
    } else if since.elapsed() >= ctx.return_after && !tried_within(ctx.return_after) {
        let target = preferred_target(registry, shard, ctx, clocks);
        if let Some(to) = target {
            tracing::info!(shard = %shard.id, to, "returning leadership to the preferred region");
        }
        target
    } else {
        None
    };
    if let Some(target) = target {
        let at = Instant::now();
        shard.wake_leader().await;
        if let Err(e) = shard.transfer_leader(target).await {
            tracing::warn!(shard = %shard.id, error = %e, "transfer leadership");
        }
        return Some(at);
    }
    crate::node::quiesce::maybe_quiesce(shard, registry.peers(), ctx.quiesce_after, |peer| {
        registry.answered_lately(peer)
    })
    .await;
    None
}

/// A quiet leader's chores: only the ones that fall due while nothing is
/// written, self-destructing messages and collection passes (writes, which
/// wake the shard; it goes quiet again after them). Without them a quiet
/// shard would keep what its retention settings promise to drop.
async fn quiet_chores(
    registry: &Registry,
    shard: &Shard,
    ctx: &Context,
    clock_off: bool,
) -> Result<(), String> {
    if clock_off {
        return Ok(());
    }
    let now = now_ms();
    let reader = &shard.reader;
    let settings = reader.settings().map_err(|e| e.to_string())?;
    let expiry = reader.earliest_expiry().map_err(|e| e.to_string())?;
    let (dedup, changes) = collection_due(shard, &settings, now)?;
    if expiry.is_some_and(|due| due <= now) || dedup.is_some() || changes.is_some() {
        chores(registry, shard, ctx, clock_off).await
    } else {
        Ok(())
    }
}

/// The chores of a shard this node leads. With `clock_off`, none that
/// reads the clock: expiry and collection would act on a wrong time.
async fn chores(
    registry: &Registry,
    shard: &Shard,
    ctx: &Context,
    clock_off: bool,
) -> Result<(), String> {
    let members: Vec<u64> = {
        let m = shard
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        m.membership().nodes().map(|(id, _)| *id).collect()
    };
    // The newest apply rules every member's node knows.
    let rules = registry.rules_known_by(members);
    if !shard.reader.has_key(keys::SM_META_INCARNATION) {
        propose(
            shard,
            command::Kind::Bootstrap(BootstrapCmd {
                incarnation: rand::random::<u64>() | 1,
                settings: Some(ShardSettings {
                    apply_rules: rules,
                    ..ctx.bootstrap_settings
                }),
            }),
        )
        .await?;
    }
    let settings = shard.reader.settings().map_err(|e| e.to_string())?;
    if settings.apply_rules < rules {
        tracing::info!(shard = %shard.id, from = settings.apply_rules, to = rules, "every member knows newer apply rules; moving the shard to them");
        propose(
            shard,
            command::Kind::RaiseApplyRules(RaiseApplyRulesCmd { apply_rules: rules }),
        )
        .await?;
    }
    if clock_off {
        return Ok(());
    }
    let now = now_ms();
    if let Some(due) = shard.reader.earliest_expiry().map_err(|e| e.to_string())? {
        if due <= now {
            propose(
                shard,
                command::Kind::Expire(ExpireCmd {
                    up_to_ms: now,
                    max_items: step_items(EXPIRE_BATCH_MAX, now - due, EXPIRE_LATE_UNIT_MS),
                }),
            )
            .await?;
        }
    }
    let (dedup, changes) = collection_due(shard, &settings, now)?;
    if let Some(max_items) = dedup {
        propose(
            shard,
            command::Kind::GcDedup(GcDedupCmd {
                before_ms: now.saturating_sub(settings.dedup_window_ms),
                max_items,
            }),
        )
        .await?;
    }
    if let Some(max_items) = changes {
        propose(
            shard,
            command::Kind::GcChanges(GcChangesCmd {
                before_ms: now.saturating_sub(settings.change_retention_ms),
                max_items,
            }),
        )
        .await?;
    }
    Ok(())
}

/// Whether a step of the dedup and of the change collection pass is due
/// (change collection exists from apply rules 1), and if so how many
/// records it examines.
fn collection_due(
    shard: &Shard,
    settings: &ShardSettings,
    now: u64,
) -> Result<(Option<u32>, Option<u32>), String> {
    let reader = &shard.reader;
    let step = |due_for: Option<u64>, interval_ms: u64| {
        due_for.map(|late| step_items(GC_BATCH_MAX, late, interval_ms / PASS_LATE_UNITS))
    };
    let window = settings.dedup_window_ms;
    let dedup = reader
        .dedup_gc_due(window, now)
        .map_err(|e| e.to_string())?;
    let changes = match settings.apply_rules >= 1 {
        true => {
            let retention = settings.change_retention_ms;
            let due = reader
                .change_gc_due(retention, now)
                .map_err(|e| e.to_string())?;
            step(due, retention / 4)
        }
        false => None,
    };
    Ok((step(dedup, window), changes))
}

/// Longest a chore waits for its proposal. A leader cut off from its
/// followers commits nothing until it hears of a newer term; meanwhile that
/// shard's later ticks are skipped (other shards' run on). A chore given up
/// on may still commit later; every chore is safe to propose again.
const CHORE_PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Proposes one command on the shard this node leads.
async fn propose(shard: &Shard, kind: command::Kind) -> Result<(), String> {
    let proposal = shard.propose(vec![Command { kind: Some(kind) }]);
    match tokio::time::timeout(CHORE_PROPOSAL_TIMEOUT, proposal).await {
        Ok(result) => result.map(drop).map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "not committed within {CHORE_PROPOSAL_TIMEOUT:?}; tried again next tick"
        )),
    }
}

/// A caught-up voter in the shard's preferred region whose clock is not
/// off, if this leader is not in that region.
fn preferred_target(
    registry: &Registry,
    shard: &Shard,
    ctx: &Context,
    clocks: &ClockReport,
) -> Option<u64> {
    let preferred = ctx.preferred.get(&shard.id)?;
    if *preferred == ctx.region {
        return None;
    }
    caught_up_voters(registry, shard, clocks)
        .into_iter()
        .find(|(_, region)| region == preferred)
        .map(|(id, _)| id)
}

/// A caught-up voter whose clock is not off, in the shard's preferred region
/// if there is one there.
fn handover_target(
    registry: &Registry,
    shard: &Shard,
    ctx: &Context,
    clocks: &ClockReport,
) -> Option<u64> {
    let voters = caught_up_voters(registry, shard, clocks);
    let preferred = ctx.preferred.get(&shard.id);
    voters
        .iter()
        .find(|(_, region)| Some(region) == preferred)
        .or(voters.first())
        .map(|(id, _)| *id)
}

/// The shard's voters other than this leader that answered a ping within
/// an election timeout and whose clocks are not off.
fn good_live_voters(registry: &Registry, shard: &Shard, clocks: &ClockReport) -> Vec<u64> {
    let metrics = shard.raft.metrics();
    let m = metrics.borrow_watched();
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != m.id && !clocks.off_peers.contains(id))
        .filter(|id| registry.answered_lately(*id))
        .collect()
}

/// The shard's [`good_live_voters`] within [`TRANSFER_LAG_MAX`] of its log,
/// with their regions: those leadership may be handed to.
pub(crate) fn caught_up_voters(
    registry: &Registry,
    shard: &Shard,
    clocks: &ClockReport,
) -> Vec<(u64, String)> {
    let good = good_live_voters(registry, shard, clocks);
    let m = shard.raft.metrics().borrow_watched().clone();
    let last = m.last_log_index.unwrap_or(0);
    let Some(matched) = m.replication.as_ref() else {
        return Vec::new();
    };
    let membership = m.membership_config.membership();
    good.into_iter()
        .filter(|id| {
            let at = matched
                .get(id)
                .cloned()
                .flatten()
                .map(|l| l.index)
                .unwrap_or(0);
            at + TRANSFER_LAG_MAX >= last
        })
        .filter_map(|id| Some((id, membership.get_node(&id)?.region.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::step_items;

    #[test]
    fn steps_grow_with_lateness_up_to_what_apply_takes() {
        assert_eq!(step_items(1_000, 0, 1_000), 1_000);
        assert_eq!(step_items(1_000, 999, 1_000), 1_000);
        assert_eq!(step_items(1_000, 1_000, 1_000), 2_000);
        assert_eq!(step_items(1_000, 4_500, 1_000), 5_000);
        assert_eq!(step_items(1_000, u64::MAX, 1_000), 10_000);
        // A zero unit (a zero retention setting) counts milliseconds.
        assert_eq!(step_items(1_000, 5, 0), 6_000);
    }
}
