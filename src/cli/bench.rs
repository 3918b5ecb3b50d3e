//! `chatctl bench`: a load generator over the public API of one or more
//! routers.
//!
//! ```text
//!  closed loop (every workload but watch):
//!
//!   worker 0 ─┐                 connection 0 ─▶ router A
//!   worker 1 ─┼─ worker i uses ─ connection 1 ─▶ router B     (--connections,
//!     ...     │  connection      connection 2 ─▶ router A      spread over
//!   worker N ─┘  i % M           ...                           --routers)
//!   (--in-flight: each worker has one request outstanding at a time)
//!
//!   each worker ──▶ its own Stats (a latency histogram and error counts per
//!                   operation) ──merged at the end──▶ Report ──▶ text or --json
//!   shared counters ──▶ progress task ──▶ one line on stderr
//!
//!  watch: --watchers streams on one chat; a sender sends into that chat at
//!  --rate messages/s, each body starting with the time the send started;
//!  every watcher measures send start → event received.
//! ```
//!
//! A run: connect (a router that does not answer is an error), prefill the
//! chats (read workloads only), warm up (requests sent, not measured), then
//! the measured window (`--duration` or `--count`), then the summary. Failed
//! requests are counted by gRPC code (a read that answers with less than the
//! prefilled chat holds as `ShortAnswer`) and never stop the run. Workers
//! carry their read token from response to request, as a client does (not
//! for `noop`, nor for `send-batch`: a frontend batching many users' sends
//! has a token per user).
//!
//! The loop is closed: each worker sends its next request when the last one
//! returns, so latencies are what requests took at the rate the cluster
//! kept up; when it stalls, the requests an open stream of arrivals would
//! have queued meanwhile are never sent, and their waiting is in no
//! percentile.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::security::AuthChannel;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::api::pb::chat_store_client::ChatStoreClient;
use crate::api::pb::{self, ChangeKind, Consistency};
use crate::router::service::WATCH_STREAMS_MAX;
use crate::router::validate::BODY_BYTES_MAX;

/// Measured seconds when neither `--duration` nor `--count` is given.
const DURATION_SECS_DEFAULT: f64 = 10.0;
/// Most outstanding requests one run may keep.
const IN_FLIGHT_MAX: usize = 10_000;
/// Most HTTP/2 connections one run may open.
const CONNECTIONS_MAX: usize = 256;
/// Most messages a prefill may put in one chat.
const PREFILL_MAX: u64 = 1_000;
/// Requests a prefill keeps outstanding.
const PREFILL_IN_FLIGHT: usize = 64;
/// Attempts per prefill send (it keeps its client_msg_id, so a retry is
/// never stored twice).
const PREFILL_SEND_ATTEMPTS: u32 = 3;
/// Messages in one page of the history workload.
const HISTORY_PAGE: u32 = 50;
/// Chats one GetDifference asks about: a client catching up on a few chats.
const DIFFERENCE_CURSORS: u64 = 10;
/// How far behind a chat's last known pts a difference cursor starts.
const DIFFERENCE_BEHIND_PTS: u64 = 10;
/// Changes one GetDifference may return per chat.
const DIFFERENCE_LIMIT: u32 = 100;
/// The error a read counts when it answered with less than the prefilled
/// chat holds, and a batched send the reply left out.
pub const SHORT_ANSWER: &str = "ShortAnswer";
/// Watch streams of the watch workload when --watchers is not given.
const WATCHERS_DEFAULT: usize = 1000;
/// Watch streams per HTTP/2 connection: many clients each hold a few.
const WATCHERS_PER_CONNECTION: usize = 100;
/// Fastest schedule of an open loop, requests per second.
const OPEN_RATE_MAX: f64 = 1_000_000.0;
/// Fastest send rate of the watch workload, messages per second.
const WATCH_RATE_MAX: f64 = 10_000.0;
/// How long watchers may take, after the last send, to receive every event.
const DELIVERY_GRACE: Duration = Duration::from_secs(5);
/// Longest a unary request may take before it counts as DeadlineExceeded;
/// above the router's own write deadline, so its retries can finish.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for a router to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the progress line is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(250);
/// Histogram range in microseconds: 1 µs to 60 s, three significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Clock ticks per second in /proc/PID/stat: USER_HZ, 100 on every Linux
/// architecture chatstore builds for (proc(5)).
const USER_HZ: u64 = 100;

/// What `chatctl bench` sends.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Unary Send into a random chat, each with a unique client_msg_id.
    Send,
    /// SendBatch of --batch sends into random chats; reported per message
    /// (each acknowledged when its batch returns).
    SendBatch,
    /// GetHistory limit 1, SESSION, of a random prefilled chat.
    Read,
    /// GetHistory pages of 50 messages, SESSION, of a random prefilled chat.
    History,
    /// GetDifference over 10 prefilled chats, each cursor a little behind.
    Difference,
    /// Sends and reads in the shares of --mix (default: half Send, half
    /// SESSION history pages); each worker keeps its read token as a
    /// client would, so its reads see its writes.
    Mixed,
    /// Fan-out: --watchers Watch streams on one chat, a sender at --rate.
    Watch,
    /// The router's gRPC health Check: the ceiling of tonic on this machine.
    Noop,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Send => "send",
            Workload::SendBatch => "send-batch",
            Workload::Read => "read",
            Workload::History => "history",
            Workload::Difference => "difference",
            Workload::Mixed => "mixed",
            Workload::Watch => "watch",
            Workload::Noop => "noop",
        }
    }

    /// The requests of a closed-loop workload, with the mixed workload's
    /// shares; None for watch, which has its own driver.
    fn mix(self, shares: [u32; MIXED_OPS.len()]) -> Option<Mix> {
        match self {
            Workload::Send => Some(Mix::Only(Op::Send)),
            Workload::SendBatch => Some(Mix::Only(Op::SendBatch)),
            Workload::Read => Some(Mix::Only(Op::Read)),
            Workload::History => Some(Mix::Only(Op::History)),
            Workload::Difference => Some(Mix::Only(Op::Difference)),
            Workload::Mixed => Some(Mix::Shares(shares)),
            Workload::Noop => Some(Mix::Only(Op::Check)),
            Workload::Watch => None,
        }
    }

    /// Whether the chats must hold messages before the run.
    fn reads_messages(self) -> bool {
        matches!(
            self,
            Workload::Read | Workload::History | Workload::Difference | Workload::Mixed
        )
    }
}

/// One kind of request, reported as its own row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Check,
    Send,
    SendBatch,
    Read,
    History,
    Difference,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Check => "check",
            Op::Send => "send",
            Op::SendBatch => "batched send",
            Op::Read => "read",
            Op::History => "history",
            Op::Difference => "difference",
        }
    }
}

/// What the mixed workload may send, in the order `--mix` names and the
/// report lists them.
const MIXED_OPS: [Op; 4] = [Op::Send, Op::Read, Op::History, Op::Difference];
/// The mixed workload without `--mix`: half sends, half history pages.
const MIX_DEFAULT: &str = "send=1,history=1";
/// Largest share `--mix` takes for one operation.
const MIX_SHARE_MAX: u32 = 1_000_000;

#[derive(Clone, Copy)]
enum Mix {
    Only(Op),
    /// Shares of the operations of [`MIXED_OPS`], in that order.
    Shares([u32; MIXED_OPS.len()]),
}

impl Mix {
    /// Every operation the mix sends, in the order they are reported.
    fn ops(self) -> Vec<Op> {
        match self {
            Mix::Only(op) => vec![op],
            Mix::Shares(shares) => MIXED_OPS
                .into_iter()
                .zip(shares)
                .filter(|(_, share)| *share > 0)
                .map(|(op, _)| op)
                .collect(),
        }
    }

    fn next(self) -> Op {
        match self {
            Mix::Only(op) => op,
            Mix::Shares(shares) => {
                let total: u32 = shares.iter().sum();
                let mut at = rand::random_range(0..total);
                for (op, share) in MIXED_OPS.into_iter().zip(shares) {
                    if at < share {
                        return op;
                    }
                    at -= share;
                }
                unreachable!("a draw below the sum of the shares falls in one of them")
            }
        }
    }
}

/// `--mix`: "op=share,..." over the operations of [`MIXED_OPS`], each at
/// most once; the shares are relative (send=3,read=1 is three sends to a
/// read).
fn parse_mix(text: &str) -> anyhow::Result<[u32; MIXED_OPS.len()]> {
    let mut shares = [0u32; MIXED_OPS.len()];
    let mut named = [false; MIXED_OPS.len()];
    for part in text.split(',') {
        let (name, share) = part.split_once('=').with_context(|| {
            format!("--mix: {part:?} is not op=share (ops: send, read, history, difference)")
        })?;
        let i = MIXED_OPS
            .iter()
            .position(|op| op.name() == name.trim())
            .with_context(|| {
                format!("--mix: unknown operation {name:?} (ops: send, read, history, difference)")
            })?;
        if named[i] {
            anyhow::bail!("--mix names {name:?} twice");
        }
        named[i] = true;
        shares[i] = share
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MIX_SHARE_MAX)
            .with_context(|| {
                format!(
                    "--mix: the share of {name} must be a whole number from 0 to {MIX_SHARE_MAX}"
                )
            })?;
    }
    if shares.iter().all(|s| *s == 0) {
        anyhow::bail!("--mix gives every operation a share of 0");
    }
    Ok(shares)
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Routers to load (host:port, comma-separated); default: the global --router.
    #[arg(long, value_delimiter = ',')]
    pub routers: Vec<String>,
    #[arg(long, value_enum, default_value_t = Workload::Send)]
    pub workload: Workload,
    /// Chats the load is spread over: ids --first-chat, --first-chat + 1, ...
    #[arg(long, default_value_t = 1000)]
    pub chats: u64,
    /// Sends per SendBatch call (workload send-batch).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// The lowest chat id used (the watch workload's one chat).
    #[arg(long, default_value_t = 1)]
    pub first_chat: u64,
    /// Requests outstanding at once (for watch: sends outstanding at once).
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// With --workload mixed: the share of each operation, as op=share
    /// pairs over send, read, history and difference (default
    /// send=1,history=1).
    #[arg(long)]
    pub mix: Option<String>,
    /// Distinct senders: each send (each message of a batch too) comes from
    /// one of ids 1..=N, drawn at random. 0: one sender per in-flight
    /// request, which sends as it. For send, send-batch and mixed (watch
    /// sends as sender 1).
    #[arg(long, default_value_t = 0)]
    pub senders: u64,
    /// Measured seconds (default 10 when --count is not given).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Measured requests (for watch: measured sends) instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// HTTP/2 connections, spread over the routers (rounded up to as many
    /// per router); one connection carries all its requests over one TCP
    /// stream, so use several.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Messages each chat holds before a read workload starts (topped up;
    /// 0 skips the prefill).
    #[arg(long, default_value_t = 50)]
    pub prefill: u64,
    /// Watch streams. For watch: on its one chat (default 1000). For send
    /// and mixed: beside the load (default none), stream i on chat
    /// --first-chat + i mod --chats, each new message timed from its send
    /// starting (in an open loop: from when it was due) to the event
    /// reaching a watcher (row `deliver`).
    #[arg(long)]
    pub watchers: Option<usize>,
    /// Messages per second sent into the watched chat (watch workload).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Also report the CPU use of this process (the cluster, when it runs
    /// on this machine) over the measured window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// An open loop: start this many requests a second on a fixed schedule,
    /// whatever the answers, with at most --in-flight outstanding (one that
    /// finds none free goes late); latencies count from when each request
    /// was due, so a stall shows in them. Not for watch.
    #[arg(long)]
    pub open_rate: Option<f64>,
}

impl BenchArgs {
    /// The suite's arguments for one case.
    pub fn for_case(
        routers: Vec<String>,
        workload: Workload,
        in_flight: usize,
        measured_secs: f64,
        warmup_secs: f64,
        server_pid: Option<u32>,
    ) -> BenchArgs {
        BenchArgs {
            routers,
            workload,
            chats: 1000,
            batch: 100,
            first_chat: 1,
            in_flight,
            size: 1024,
            senders: 0,
            mix: None,
            duration: Some(measured_secs),
            count: None,
            warmup: warmup_secs,
            connections: 4,
            prefill: 50,
            watchers: None,
            rate: 10.0,
            server_pid,
            open_rate: None,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.routers.is_empty() {
            anyhow::bail!("name at least one router");
        }
        if self.chats == 0 || self.first_chat == 0 {
            anyhow::bail!("--chats and --first-chat must be at least 1 (chat 0 does not exist)");
        }
        if self.first_chat.checked_add(self.chats).is_none() {
            anyhow::bail!("--first-chat + --chats overflows a chat id");
        }
        if !(1..=crate::router::validate::SEND_BATCH_MAX).contains(&self.batch) {
            anyhow::bail!(
                "--batch must be 1 to {}",
                crate::router::validate::SEND_BATCH_MAX
            );
        }
        if !(1..=IN_FLIGHT_MAX).contains(&self.in_flight) {
            anyhow::bail!("--in-flight must be 1 to {IN_FLIGHT_MAX}");
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            anyhow::bail!("--connections must be 1 to {CONNECTIONS_MAX}");
        }
        if self.size > BODY_BYTES_MAX {
            anyhow::bail!(
                "--size {} is above the body limit {BODY_BYTES_MAX}",
                self.size
            );
        }
        if self.prefill > PREFILL_MAX {
            anyhow::bail!("--prefill must be at most {PREFILL_MAX} messages per chat");
        }
        if let Some(d) = self.duration {
            if !(d > 0.0 && d.is_finite()) {
                anyhow::bail!("--duration must be a positive number of seconds");
            }
        }
        if self.count == Some(0) {
            anyhow::bail!("--count must be at least 1");
        }
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            anyhow::bail!("--warmup must be zero or more seconds");
        }
        if self.senders > 0
            && !matches!(
                self.workload,
                Workload::Send | Workload::SendBatch | Workload::Mixed
            )
        {
            anyhow::bail!("--senders is for the send, send-batch and mixed workloads");
        }
        if self.mix.is_some() && self.workload != Workload::Mixed {
            anyhow::bail!("--mix is for the mixed workload");
        }
        self.mix_shares()?;
        if self.watchers.is_some() {
            if !matches!(
                self.workload,
                Workload::Watch | Workload::Send | Workload::Mixed
            ) {
                anyhow::bail!("--watchers is for the watch, send and mixed workloads");
            }
            if !self.sends() {
                anyhow::bail!("--watchers needs sends to watch: give send a share in --mix");
            }
            if self.workload != Workload::Watch && self.size < 8 {
                anyhow::bail!(
                    "--watchers needs --size of at least 8: a body carries its send time"
                );
            }
            if !(1..=WATCH_STREAMS_MAX).contains(&self.watchers()) {
                anyhow::bail!("--watchers must be 1 to {WATCH_STREAMS_MAX}");
            }
        }
        if self.workload == Workload::Watch {
            if self.open_rate.is_some() {
                anyhow::bail!("--open-rate is for the request workloads; watch sends at --rate");
            }
            if !(self.rate > 0.0 && self.rate <= WATCH_RATE_MAX) {
                anyhow::bail!("--rate must be above 0 and at most {WATCH_RATE_MAX}");
            }
        }
        if let Some(rate) = self.open_rate {
            if !(rate > 0.0 && rate <= OPEN_RATE_MAX) {
                anyhow::bail!("--open-rate must be above 0 and at most {OPEN_RATE_MAX}");
            }
        }
        Ok(())
    }

    /// Watch streams to open: `--watchers`, or 1000 for the watch workload
    /// and none for the others.
    fn watchers(&self) -> usize {
        match (self.watchers, self.workload) {
            (Some(n), _) => n,
            (None, Workload::Watch) => WATCHERS_DEFAULT,
            (None, _) => 0,
        }
    }

    fn random_chat(&self) -> u64 {
        self.first_chat + rand::random_range(0..self.chats)
    }

    /// The mixed workload's shares (`--mix`, or half sends and half
    /// history pages).
    fn mix_shares(&self) -> anyhow::Result<[u32; MIXED_OPS.len()]> {
        parse_mix(self.mix.as_deref().unwrap_or(MIX_DEFAULT))
    }

    /// Whether the measured requests send messages.
    fn sends(&self) -> bool {
        match self.workload {
            Workload::Send | Workload::SendBatch | Workload::Watch => true,
            Workload::Mixed => self
                .mix_shares()
                .is_ok_and(|shares| Mix::Shares(shares).ops().contains(&Op::Send)),
            Workload::Read | Workload::History | Workload::Difference | Workload::Noop => false,
        }
    }

    /// How many distinct senders the sends come from.
    fn sender_count(&self) -> u64 {
        match self.senders {
            0 => self.in_flight as u64,
            n => n,
        }
    }
}

/// The result of one run.
#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub workload: &'static str,
    pub routers: Vec<String>,
    pub in_flight: usize,
    pub connections: usize,
    pub chats: u64,
    /// Distinct sender ids the sends came from; none for a workload that
    /// sends nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub senders: Option<u64>,
    pub size_bytes: usize,
    pub warmup_secs: f64,
    pub measured_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchSetup>,
    /// CPU time of `chatctl` over the measured window, percent of one core.
    pub client_cpu_percent: Option<f64>,
    /// CPU time of --server-pid over the measured window, percent of one core.
    pub server_cpu_percent: Option<f64>,
    /// Requests started a second on a fixed schedule (`--open-rate`); none
    /// for a closed loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_rate: Option<f64>,
    /// For `bench-raft`: Raft groups of three replicas in this process
    /// (no routers, no chats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_groups: Option<u32>,
    pub ops: Vec<OpReport>,
}

#[derive(Serialize, Debug, Clone)]
pub struct WatchSetup {
    /// Watch streams asked for.
    pub watchers: usize,
    /// The fan-out's send rate; none for watchers beside a load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    /// The fan-out's one chat; none for watchers beside a load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<u64>,
    /// Chats watched (from --first-chat).
    pub chats: u64,
}

/// One operation's row of the summary.
#[derive(Serialize, Debug, Clone)]
pub struct OpReport {
    pub op: &'static str,
    /// Successful operations in the measured window.
    pub count: u64,
    pub ops_per_sec: f64,
    /// Latency of the successful operations.
    pub latency_ms: Percentiles,
    /// Failed operations by gRPC code (or `Undelivered` for watch events
    /// that never arrived, [`SHORT_ANSWER`] for reads that came back with
    /// less than the chat holds and batched sends a reply left out).
    pub errors: BTreeMap<String, u64>,
    /// Operations timed by one request (a batch's messages share its
    /// latency): percentiles rest on `count` / this many samples.
    pub per_request: u64,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Latencies and errors of one operation as one task saw them.
pub(super) struct OpStats {
    latency_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl OpStats {
    pub(super) fn new() -> OpStats {
        OpStats {
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
            errors: BTreeMap::new(),
        }
    }

    pub(super) fn record(&mut self, latency: Duration, result: Result<(), Code>) {
        match result {
            Ok(()) => self
                .latency_us
                .saturating_record(latency.as_micros().max(1) as u64),
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    /// A read that answered with less than it had to: a failure.
    fn record_short(&mut self) {
        *self.errors.entry(SHORT_ANSWER.to_string()).or_default() += 1;
    }

    pub(super) fn merge(&mut self, other: OpStats) {
        self.latency_us
            .add(other.latency_us)
            .expect("histograms with the same bounds add");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }

    pub(super) fn report(&self, op: &'static str, window: Duration) -> OpReport {
        let h = &self.latency_us;
        let ms = |us: u64| us as f64 / 1000.0;
        let secs = window.as_secs_f64();
        OpReport {
            op,
            count: h.len(),
            ops_per_sec: if secs > 0.0 {
                h.len() as f64 / secs
            } else {
                0.0
            },
            latency_ms: Percentiles {
                p50: ms(h.value_at_quantile(0.5)),
                p90: ms(h.value_at_quantile(0.9)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
            },
            errors: self.errors.clone(),
            per_request: 1,
        }
    }
}

/// Per-operation stats, in the order operations were first seen.
#[derive(Default)]
struct Stats {
    ops: Vec<(&'static str, OpStats)>,
}

impl Stats {
    fn op(&mut self, name: &'static str) -> &mut OpStats {
        let i = match self.ops.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.ops.push((name, OpStats::new()));
                self.ops.len() - 1
            }
        };
        &mut self.ops[i].1
    }

    fn merge(&mut self, other: Stats) {
        for (name, s) in other.ops {
            self.op(name).merge(s);
        }
    }

    fn reports(&self, window: Duration) -> Vec<OpReport> {
        self.ops.iter().map(|(n, s)| s.report(n, window)).collect()
    }
}

/// Counters the progress line reads while tasks run.
#[derive(Default)]
struct Progress {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Progress {
    fn count(&self, result: Result<(), Code>) {
        match result {
            Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// When the measured window starts and what ends it.
struct Window {
    measure_from: Instant,
    end: End,
}

enum End {
    At(Instant),
    /// After this many measured requests; `issued` hands out the tickets.
    After {
        count: u64,
        issued: AtomicU64,
    },
}

impl Window {
    fn new(args: &BenchArgs) -> Window {
        let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
        let end = match args.count {
            Some(count) => End::After {
                count,
                issued: AtomicU64::new(0),
            },
            None => End::At(
                measure_from
                    + Duration::from_secs_f64(args.duration.unwrap_or(DURATION_SECS_DEFAULT)),
            ),
        };
        Window { measure_from, end }
    }

    /// Whether a request starting `now` may go, and whether it is measured.
    fn admit(&self, now: Instant) -> Option<bool> {
        if now < self.measure_from {
            return Some(false);
        }
        match &self.end {
            End::At(end) => (now < *end).then_some(true),
            End::After { count, issued } => {
                (issued.fetch_add(1, Ordering::Relaxed) < *count).then_some(true)
            }
        }
    }

    fn describe(&self, now: Instant) -> String {
        if now < self.measure_from {
            return format!(
                "warming up, {:.1} s to go",
                (self.measure_from - now).as_secs_f64()
            );
        }
        let elapsed = (now - self.measure_from).as_secs_f64();
        match &self.end {
            End::At(end) => format!(
                "{elapsed:.1}/{:.1} s",
                (*end - self.measure_from).as_secs_f64()
            ),
            End::After { count, issued } => format!(
                "{}/{count} requests",
                issued.load(Ordering::Relaxed).min(*count)
            ),
        }
    }
}

/// A process's CPU time (user + system) so far, from /proc/PID/stat.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15, the 12th and 13th after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// Whether process `pid` runs (exists and has not exited: a zombie has).
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which ends at the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Samples the CPU time of this process and of an optional server process.
#[derive(Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    client: Option<Duration>,
    server: Option<Duration>,
}

impl CpuSample {
    pub fn take(server_pid: Option<u32>) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            client: cpu_time("self"),
            server: server_pid.and_then(|p| cpu_time(&p.to_string())),
        }
    }

    /// (client, server) CPU use since `earlier`, in percent of one core.
    pub fn percent_since(&self, earlier: &CpuSample) -> (Option<f64>, Option<f64>) {
        let wall = (self.at - earlier.at).as_secs_f64();
        let pct = |now: Option<Duration>, then: Option<Duration>| match (now, then) {
            (Some(n), Some(t)) if wall > 0.0 => {
                Some(n.saturating_sub(t).as_secs_f64() / wall * 100.0)
            }
            _ => None,
        };
        (
            pct(self.client, earlier.client),
            pct(self.server, earlier.server),
        )
    }
}

fn progress_line(quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(PROGRESS_TICK);
    bar
}

fn progress_bar(quiet: bool, len: u64, message: &str) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Opens `count` connections, spread over `routers` in turn, with the
/// process's TLS (`--ca`) and caller token (`--token-file`), as a frontend
/// would connect. A router that does not answer is an error: a benchmark
/// against nothing measures nothing.
pub(super) async fn connect(routers: &[String], count: usize) -> anyhow::Result<Vec<AuthChannel>> {
    let access = super::access();
    let mut channels = Vec::with_capacity(count);
    for i in 0..count {
        let addr = &routers[i % routers.len()];
        let endpoint =
            crate::api::http2::endpoint(crate::security::endpoint(addr).context("router address")?)
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
        let tls = access.tls.as_ref();
        let channel = crate::security::connect(endpoint, tls, crate::security::ROUTER_NAME)
            .await
            .with_context(|| {
            format!(
                "cannot reach the router at {addr}; is it running? (check --router/--routers and --ca)"
            )
        })?;
        channels.push(AuthChannel::new(channel, access.token.clone()));
    }
    Ok(channels)
}

fn with_timeout<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(REQUEST_TIMEOUT);
    r
}

/// A body of `size` bytes, starting with `stamp` when it has room.
fn body(size: usize, stamp: Option<u64>) -> Bytes {
    let mut b = vec![b'x'; size];
    if let Some(stamp) = stamp {
        b[..8].copy_from_slice(&stamp.to_le_bytes());
    }
    Bytes::from(b)
}

fn client_msg_id() -> u64 {
    // Zero means "no id" to the router; any other random value is unique
    // in practice.
    rand::random::<u64>().max(1)
}

/// The highest pts seen per chat, so difference cursors start just behind it.
struct ChatPts {
    first_chat: u64,
    pts: Vec<AtomicU64>,
}

impl ChatPts {
    fn new(first_chat: u64, chats: u64) -> ChatPts {
        ChatPts {
            first_chat,
            pts: (0..chats).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn raise(&self, chat: u64, pts: u64) {
        self.pts[(chat - self.first_chat) as usize].fetch_max(pts, Ordering::Relaxed);
    }

    fn get(&self, chat: u64) -> u64 {
        self.pts[(chat - self.first_chat) as usize].load(Ordering::Relaxed)
    }
}

/// One closed-loop worker: one request outstanding at a time.
struct Worker {
    args: Arc<BenchArgs>,
    sender_id: u64,
    api: ChatStoreClient<AuthChannel>,
    health: HealthClient<AuthChannel>,
    body: Bytes,
    /// Carried from response to request when the workload keeps a session.
    token: Bytes,
    keep_token: bool,
    chat_pts: Arc<ChatPts>,
    /// Watchers beside the load: each send's body carries when it was due,
    /// and its seq is noted for them.
    watched: Option<Arc<WatchShared>>,
}

/// The sends of a batch of `batch` that failed, each counted on its own:
/// with its code (one neither stored nor given a code failed all the
/// same), or `None` for one the reply left out.
fn batch_failures(outcomes: &[pb::SendOutcome], batch: usize) -> Vec<Option<Code>> {
    let mut failed: Vec<Option<Code>> = outcomes
        .iter()
        .take(batch)
        .filter(|o| o.sent.is_none())
        .map(|o| match Code::from_i32(o.error_code) {
            Code::Ok => Some(Code::Unknown),
            code => Some(code),
        })
        .collect();
    failed.extend(std::iter::repeat_n(
        None,
        batch.saturating_sub(outcomes.len()),
    ));
    failed
}

/// What a call that got an answer got.
enum Answer {
    /// For a batch, the sends in it that failed: with their code, or
    /// `None` for one the reply left out.
    Whole(Vec<Option<Code>>),
    /// A read that came back with less than the prefilled chat holds (a
    /// failure, not a fast success).
    Short,
}

impl Answer {
    fn whole_if(whole: bool) -> Answer {
        match whole {
            true => Answer::Whole(Vec::new()),
            false => Answer::Short,
        }
    }
}

impl Worker {
    fn keep(&mut self, token: Bytes) {
        if self.keep_token {
            self.token = token;
        }
    }

    /// The sender of the next send: this worker's own, or one drawn from
    /// `--senders`.
    fn sender(&self) -> u64 {
        match self.args.senders {
            0 => self.sender_id,
            n => 1 + rand::random_range(0..n),
        }
    }

    /// One call and what it got.
    /// `due` is when the request was due, `measured` whether it counts.
    async fn call(&mut self, op: Op, (due, measured): (Instant, bool)) -> Result<Answer, Status> {
        match op {
            Op::Check => {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                self.health
                    .check(with_timeout(req))
                    .await
                    .map(|_| Answer::Whole(Vec::new()))
            }
            Op::Send => {
                let chat = self.args.random_chat();
                let body = match &self.watched {
                    Some(w) => body(self.args.size, Some(w.stamp(due))),
                    None => self.body.clone(),
                };
                let r = self
                    .api
                    .send(with_timeout(pb::SendRequest {
                        chat_id: chat,
                        sender_id: self.sender(),
                        client_msg_id: client_msg_id(),
                        body,
                        self_destruct: None,
                        min_token: self.token.clone(),
                    }))
                    .await?
                    .into_inner();
                if let Some(w) = &self.watched {
                    w.sent(chat, r.seq, measured);
                }
                self.keep(r.read_token);
                Ok(Answer::Whole(Vec::new()))
            }
            Op::SendBatch => {
                let sends = (0..self.args.batch)
                    .map(|_| pb::SendRequest {
                        chat_id: self.args.random_chat(),
                        sender_id: self.sender(),
                        client_msg_id: client_msg_id(),
                        body: self.body.clone(),
                        self_destruct: None,
                        min_token: Default::default(),
                    })
                    .collect();
                let r = self
                    .api
                    .send_batch(with_timeout(pb::SendBatchRequest { sends }))
                    .await?
                    .into_inner();
                Ok(Answer::Whole(batch_failures(&r.outcomes, self.args.batch)))
            }
            Op::Read | Op::History => {
                let limit = if op == Op::Read { 1 } else { HISTORY_PAGE };
                let r = self
                    .api
                    .get_history(with_timeout(pb::GetHistoryRequest {
                        chat_id: self.args.random_chat(),
                        before_seq: 0,
                        limit,
                        consistency: Consistency::Session as i32,
                        min_token: self.token.clone(),
                    }))
                    .await?
                    .into_inner();
                let expected = u64::from(limit).min(self.args.prefill);
                self.keep(r.read_token);
                Ok(Answer::whole_if(r.messages.len() as u64 >= expected))
            }
            Op::Difference => {
                let cursors_count = DIFFERENCE_CURSORS.min(self.args.chats);
                let start = rand::random_range(0..self.args.chats);
                // (chat, how many changes its cursor is behind).
                let asked: Vec<(u64, u64)> = (0..cursors_count)
                    .map(|i| {
                        let chat = self.args.first_chat + (start + i) % self.args.chats;
                        let pts = self.chat_pts.get(chat);
                        (chat, pts.min(DIFFERENCE_BEHIND_PTS))
                    })
                    .collect();
                let cursors = asked
                    .iter()
                    .map(|(chat, behind)| pb::Cursor {
                        chat_id: *chat,
                        pts: self.chat_pts.get(*chat) - behind,
                    })
                    .collect();
                let r = self
                    .api
                    .get_difference(with_timeout(pb::GetDifferenceRequest {
                        cursors,
                        limit: DIFFERENCE_LIMIT,
                        consistency: Consistency::Session as i32,
                        min_token: self.token.clone(),
                    }))
                    .await?
                    .into_inner();
                // Each chat's cursor was behind by up to DIFFERENCE_BEHIND_PTS
                // (fewer for a chat with fewer changes), and nothing writes
                // meanwhile: every change between must come back.
                let short = r.chats.len() != asked.len()
                    || r.chats.iter().zip(&asked).any(|(d, (chat, behind))| {
                        d.chat_id != *chat
                            || d.reset_required
                            || (d.changes.len() as u64) < (*behind).min(u64::from(DIFFERENCE_LIMIT))
                    });
                self.keep(r.read_token);
                Ok(Answer::whole_if(!short))
            }
        }
    }

    /// One request of `op`, timed from `due` (when it was due to start)
    /// and recorded in `stats` if `measured`; when it finished.
    async fn one(
        &mut self,
        op: Op,
        (due, measured): (Instant, bool),
        stats: &mut Stats,
        progress: &Progress,
    ) -> Instant {
        let result = self.call(op, (due, measured)).await.map_err(|s| s.code());
        let done = Instant::now();
        if !measured {
            return done;
        }
        let result = match result {
            Ok(Answer::Short) => {
                stats.op(op.name()).record_short();
                progress.failed.fetch_add(1, Ordering::Relaxed);
                return done;
            }
            Ok(Answer::Whole(failed)) => Ok(failed),
            Err(code) => Err(code),
        };
        // A batch is as many messages, each acknowledged when it returns (or
        // failed on its own, or with the whole call).
        let messages = if op == Op::SendBatch {
            self.args.batch
        } else {
            1
        };
        let failed = result.as_ref().map_or(Vec::new(), |f| f.clone());
        for i in 0..messages {
            let one = match (&result, failed.get(i)) {
                (Err(code), _) => Err(*code),
                (Ok(_), Some(Some(code))) => Err(*code),
                (Ok(_), Some(None)) => {
                    stats.op(op.name()).record_short();
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                (Ok(_), None) => Ok(()),
            };
            stats.op(op.name()).record(done - due, one);
            progress.count(one);
        }
        done
    }

    /// Sends requests, each when the last one returned, until the window
    /// closes; returns what it measured and when its last measured request
    /// finished.
    async fn run(
        mut self,
        mix: Mix,
        window: Arc<Window>,
        progress: Arc<Progress>,
    ) -> (Stats, Option<Instant>) {
        let mut stats = Stats::default();
        let mut last_done = None;
        loop {
            let start = Instant::now();
            let Some(measured) = window.admit(start) else {
                break;
            };
            let done = self
                .one(mix.next(), (start, measured), &mut stats, &progress)
                .await;
            if measured {
                last_done = Some(done);
            }
        }
        (stats, last_done)
    }
}

/// An open loop: requests start every 1 / `rate` s whatever the answers, on
/// the first of `workers` free; one that finds none free waits for one, and
/// its latency counts from when it was due. What was measured, merged, and
/// when the last measured request finished.
async fn open_loop(
    workers: Vec<Worker>,
    rate: f64,
    mix: Mix,
    window: Arc<Window>,
    progress: Arc<Progress>,
) -> (Stats, Option<Instant>) {
    let count = workers.len();
    let (idle_tx, mut idle) = tokio::sync::mpsc::unbounded_channel();
    for w in workers {
        let _ = idle_tx.send((w, Stats::default(), None::<Instant>));
    }
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        let due = ticks.tick().await.into_std();
        let Some(measured) = window.admit(due) else {
            break;
        };
        let Some((mut worker, mut stats, mut last)) = idle.recv().await else {
            break;
        };
        let (idle_tx, progress) = (idle_tx.clone(), progress.clone());
        let op = mix.next();
        tokio::spawn(async move {
            let done = worker.one(op, (due, measured), &mut stats, &progress).await;
            if measured {
                last = Some(done);
            }
            let _ = idle_tx.send((worker, stats, last));
        });
    }
    let mut stats = Stats::default();
    let mut last_done = None;
    for _ in 0..count {
        let Some((_, s, last)) = idle.recv().await else {
            break;
        };
        stats.merge(s);
        last_done = last_done.max(last);
    }
    (stats, last_done)
}

/// Runs one benchmark and returns its report. `quiet` hides progress.
pub async fn run(args: BenchArgs, quiet: bool) -> anyhow::Result<Report> {
    args.check()?;
    let args = Arc::new(args);
    // As many connections to each router.
    let per_router = args.connections.div_ceil(args.routers.len()).max(1);
    let channels = connect(&args.routers, per_router * args.routers.len()).await?;
    let chat_pts = Arc::new(ChatPts::new(args.first_chat, args.chats));
    if args.workload.reads_messages() && args.prefill > 0 {
        prefill(&args, &channels, &chat_pts, quiet).await?;
    }
    match args.workload.mix(args.mix_shares()?) {
        Some(mix) => closed_loop(args, mix, channels, chat_pts, quiet).await,
        None => watch(args, channels, quiet).await,
    }
}

async fn closed_loop(
    args: Arc<BenchArgs>,
    mix: Mix,
    channels: Vec<AuthChannel>,
    chat_pts: Arc<ChatPts>,
    quiet: bool,
) -> anyhow::Result<Report> {
    if matches!(mix, Mix::Only(Op::Check)) {
        // Health checks carry no token, and a router closes a connection
        // on which no call has passed its token check within a minute: one
        // read each, as any client makes, keeps a long no-op run's
        // connections open. Its answer does not matter.
        for channel in &channels {
            let _ = ChatStoreClient::new(channel.clone())
                .get_chat(with_timeout(pb::GetChatRequest {
                    chat_id: args.first_chat,
                    consistency: Consistency::Stale as i32,
                    min_token: Bytes::new(),
                }))
                .await;
        }
    }
    // Watchers open before the load starts, so they see all of it.
    let watched_chats = (args.first_chat, args.chats.min(args.watchers() as u64));
    let opened = match args.watchers() {
        0 => None,
        _ => {
            let api = ChatStoreClient::new(channels[0].clone());
            Some(open_watchers(&args, &api, watched_chats, quiet).await?)
        }
    };
    let window = Arc::new(Window::new(&args));
    let progress = Arc::new(Progress::default());
    let watching = opened.map(|o| Watching::start(o, window.clone(), watched_chats));
    let watch_connections = watching.as_ref().map_or(0, |w| w.connections);
    let watch = watching.as_ref().map(|_| WatchSetup {
        watchers: args.watchers(),
        rate_per_sec: None,
        chat: None,
        chats: watched_chats.1,
    });
    let body = body(args.size, None);
    let mut pool = Vec::with_capacity(args.in_flight);
    for i in 0..args.in_flight {
        let channel = channels[i % channels.len()].clone();
        pool.push(Worker {
            args: args.clone(),
            sender_id: i as u64 + 1,
            api: ChatStoreClient::new(channel.clone()),
            health: HealthClient::new(channel),
            body: body.clone(),
            token: Bytes::new(),
            // A client passes back the newest token it got (a batching
            // frontend sends for many users, each with their own).
            keep_token: !matches!(mix, Mix::Only(Op::Check) | Mix::Only(Op::SendBatch)),
            chat_pts: chat_pts.clone(),
            watched: watching.as_ref().map(|w| w.shared.clone()),
        });
    }
    let mut workers = JoinSet::new();
    match args.open_rate {
        Some(rate) => {
            workers.spawn(open_loop(pool, rate, mix, window.clone(), progress.clone()));
        }
        None => {
            for worker in pool {
                workers.spawn(worker.run(mix, window.clone(), progress.clone()));
            }
        }
    }
    let line = progress_line(quiet);
    let name = args.workload.name();
    let drawing = Arc::new(AtomicBool::new(true));
    let drawer = tokio::spawn(draw_progress(
        line.clone(),
        name,
        window.clone(),
        progress.clone(),
        drawing.clone(),
    ));
    tokio::time::sleep_until(window.measure_from.into()).await;
    let cpu_start = CpuSample::take(args.server_pid);
    // A timed run's CPU is sampled when its window ends, the same span its
    // rates are per second of, not after the last answer came in.
    let cpu_at_end = match window.end {
        End::At(end) => {
            let pid = args.server_pid;
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(end.into()).await;
                CpuSample::take(pid)
            }))
        }
        End::After { .. } => None,
    };
    let mut stats = Stats::default();
    // Rows in a fixed order, and a row even for an operation that never ran.
    for op in mix.ops() {
        stats.op(op.name());
    }
    let mut window_end = window.measure_from;
    while let Some(joined) = workers.join_next().await {
        let (s, last_done) = joined.context("a bench worker panicked")?;
        stats.merge(s);
        if let Some(t) = last_done {
            window_end = window_end.max(t);
        }
    }
    // A timed run counts the requests that started in its window, over the
    // window: one slow last request does not stretch it (nor halve the
    // rates). A counted run ends when its last request does.
    if let End::At(end) = window.end {
        window_end = end;
    }
    let cpu_end = match cpu_at_end {
        Some(sampled) => sampled.await.context("the CPU sampler panicked")?,
        None => CpuSample::take(args.server_pid),
    };
    if let Some(watching) = watching {
        watching.finish(&mut stats).await?;
    }
    drawing.store(false, Ordering::Relaxed);
    let _ = drawer.await;
    line.finish_and_clear();
    let (client_cpu, server_cpu) = cpu_end.percent_since(&cpu_start);
    let measured = window_end - window.measure_from;
    Ok(Report {
        workload: name,
        routers: args.routers.clone(),
        in_flight: args.in_flight,
        connections: channels.len() + watch_connections,
        chats: args.chats,
        senders: args.sends().then(|| args.sender_count()),
        size_bytes: args.size,
        warmup_secs: args.warmup,
        measured_secs: measured.as_secs_f64(),
        watch,
        open_rate: args.open_rate,
        raft_groups: None,
        client_cpu_percent: client_cpu,
        server_cpu_percent: server_cpu,
        ops: stats
            .reports(measured)
            .into_iter()
            .map(|mut r| {
                if r.op == Op::SendBatch.name() {
                    r.per_request = args.batch as u64;
                }
                r
            })
            .collect(),
    })
}

async fn draw_progress(
    line: indicatif::ProgressBar,
    name: &'static str,
    window: Arc<Window>,
    progress: Arc<Progress>,
    drawing: Arc<AtomicBool>,
) {
    if line.is_hidden() {
        return;
    }
    while drawing.load(Ordering::Relaxed) {
        let now = Instant::now();
        let ok = progress.ok.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        let secs = now
            .saturating_duration_since(window.measure_from)
            .as_secs_f64();
        let rate = if secs > 0.0 { ok as f64 / secs } else { 0.0 };
        line.set_message(format!(
            "{name}: {}  {ok} ok  {rate:.0}/s  {failed} errors",
            window.describe(now)
        ));
        tokio::time::sleep(PROGRESS_TICK).await;
    }
}

/// Tops every chat up to `--prefill` messages, so reads find something.
/// Records each chat's pts for the difference workload.
async fn prefill(
    args: &Arc<BenchArgs>,
    channels: &[AuthChannel],
    chat_pts: &Arc<ChatPts>,
    quiet: bool,
) -> anyhow::Result<()> {
    // How many messages each chat holds already.
    let bar = progress_bar(quiet, args.chats, "prefill: counting messages");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for i in 0..PREFILL_IN_FLIGHT.min(args.chats as usize) {
        let mut api = ChatStoreClient::new(channels[i % channels.len()].clone());
        let (args, next, bar, chat_pts) =
            (args.clone(), next.clone(), bar.clone(), chat_pts.clone());
        tasks.spawn(async move {
            let mut missing = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= args.chats {
                    return Ok::<_, anyhow::Error>(missing);
                }
                let chat = args.first_chat + n;
                let info = api
                    .get_chat(with_timeout(pb::GetChatRequest {
                        chat_id: chat,
                        consistency: Consistency::Linearizable as i32,
                        min_token: Bytes::new(),
                    }))
                    .await
                    .map_err(|s| anyhow::anyhow!("chat {chat}: {:?}: {}", s.code(), s.message()))
                    .context("prefill: read a chat's last seq")?
                    .into_inner();
                chat_pts.raise(chat, info.pts);
                missing.push((chat, args.prefill.saturating_sub(info.last_seq)));
                bar.inc(1);
            }
        });
    }
    let mut missing = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        missing.extend(joined.context("a prefill task panicked")??);
    }
    bar.finish_and_clear();

    // The sends, interleaved over chats so every shard fills at once.
    let rounds = missing.iter().map(|(_, m)| *m).max().unwrap_or(0);
    let sends: Vec<u64> = (0..rounds)
        .flat_map(|round| {
            missing
                .iter()
                .filter(move |(_, m)| *m > round)
                .map(|(chat, _)| *chat)
        })
        .collect();
    if sends.is_empty() {
        return settle(args, channels, chat_pts).await;
    }
    if quiet || !std::io::stderr().is_terminal() {
        eprintln!(
            "prefill: sending {} messages to bring {} chats to {} each",
            sends.len(),
            args.chats,
            args.prefill
        );
    }
    let bar = progress_bar(quiet, sends.len() as u64, "prefill: sending");
    let sends = Arc::new(sends);
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let body = body(args.size, None);
    let mut tasks = JoinSet::new();
    for i in 0..PREFILL_IN_FLIGHT {
        let mut api = ChatStoreClient::new(channels[i % channels.len()].clone());
        let (sends, next, failed, bar, body, chat_pts) = (
            sends.clone(),
            next.clone(),
            failed.clone(),
            bar.clone(),
            body.clone(),
            chat_pts.clone(),
        );
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&chat) = sends.get(n) else { return };
                let id = client_msg_id();
                let mut sent = false;
                for _ in 0..PREFILL_SEND_ATTEMPTS {
                    let r = api
                        .send(with_timeout(pb::SendRequest {
                            chat_id: chat,
                            sender_id: 1,
                            client_msg_id: id,
                            body: body.clone(),
                            self_destruct: None,
                            min_token: Bytes::new(),
                        }))
                        .await;
                    if let Ok(r) = r {
                        chat_pts.raise(chat, r.into_inner().pts);
                        sent = true;
                        break;
                    }
                }
                if !sent {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                bar.inc(1);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a prefill task panicked")?;
    }
    bar.finish_and_clear();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        anyhow::bail!(
            "prefill: {failed} of {} sends failed after {PREFILL_SEND_ATTEMPTS} attempts; some \
             chats would hold fewer messages than the reads expect",
            sends.len()
        );
    }
    settle(args, channels, chat_pts).await
}

/// Longest wait for the replicas that serve reads to apply the prefill.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Waits until each router's nearest replicas have applied the prefill: a
/// worker's first read carries no token and goes there, so a replica still
/// applying the last sends would answer short, and a short answer counts as
/// an error.
async fn settle(
    args: &Arc<BenchArgs>,
    channels: &[AuthChannel],
    chat_pts: &Arc<ChatPts>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_WAIT;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    // Channel i goes to router i % routers: the first of each router's.
    let per_router = &channels[..args.routers.len().min(channels.len())];
    let asks = per_router.len() as u64 * args.chats;
    for _ in 0..PREFILL_IN_FLIGHT {
        let (args, next, chat_pts) = (args.clone(), next.clone(), chat_pts.clone());
        let channels: Vec<AuthChannel> = per_router.to_vec();
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= asks {
                    return Ok::<_, anyhow::Error>(());
                }
                let router = (n / args.chats) as usize;
                let chat = args.first_chat + n % args.chats;
                let mut api = ChatStoreClient::new(channels[router].clone());
                loop {
                    let info = api
                        .get_chat(with_timeout(pb::GetChatRequest {
                            chat_id: chat,
                            consistency: Consistency::Session as i32,
                            min_token: Bytes::new(),
                        }))
                        .await
                        .map(|r| r.into_inner());
                    if let Ok(info) = &info {
                        if info.last_seq >= args.prefill && info.pts >= chat_pts.get(chat) {
                            break;
                        }
                    }
                    if Instant::now() >= deadline {
                        anyhow::bail!(
                            "prefill: chat {chat} did not read whole through router {} within \
                             {SETTLE_WAIT:?} ({info:?})",
                            args.routers[router % args.routers.len()]
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a prefill task panicked")??;
    }
    Ok(())
}

/// What the senders and the watchers share.
struct WatchShared {
    /// The zero of every timestamp in a message body.
    epoch: Instant,
    window: Arc<Window>,
    /// The lowest chat watched: watcher slots count from it.
    first_chat: u64,
    /// Per watched chat (from `first_chat`), the highest seq of a measured
    /// send, once the sends have stopped: a watcher that has seen its chat's
    /// has seen every measured message of it.
    last_seq: tokio::sync::watch::Sender<Option<Arc<Vec<u64>>>>,
    /// Per watched chat, the seqs the measured sends that succeeded got.
    acked: Vec<std::sync::Mutex<std::collections::HashSet<u64>>>,
    /// The fan-out's measured sends, for its progress line.
    sends: Progress,
    /// Measured events received by all watchers, for the fan-out's
    /// progress line.
    delivered: AtomicU64,
    /// Turns true when the grace for late events is over: every watcher
    /// returns what it measured.
    give_up: tokio::sync::watch::Sender<bool>,
}

impl WatchShared {
    /// Shared state for watchers of `chats` chats from `first_chat`, whose
    /// sends are measured in `window`.
    fn new(window: Arc<Window>, first_chat: u64, chats: u64) -> WatchShared {
        WatchShared {
            epoch: Instant::now(),
            window,
            first_chat,
            last_seq: tokio::sync::watch::channel(None).0,
            acked: (0..chats).map(|_| Default::default()).collect(),
            sends: Progress::default(),
            delivered: AtomicU64::new(0),
            give_up: tokio::sync::watch::channel(false).0,
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        (at - self.epoch).as_nanos() as u64
    }

    fn measured(&self, stamp: u64) -> bool {
        stamp >= self.stamp(self.window.measure_from)
    }

    /// Notes a send into `chat` that got `seq`, if the chat is watched.
    fn sent(&self, chat: u64, seq: u64, measured: bool) {
        let Some(i) = chat.checked_sub(self.first_chat) else {
            return;
        };
        if let (Some(acked), true) = (self.acked.get(i as usize), measured) {
            acked.lock().expect("acked seqs").insert(seq);
        }
    }

    /// Whether `seq` of the chat of watcher slot `slot` came from a measured
    /// send that succeeded.
    fn acked(&self, slot: usize, seq: u64) -> bool {
        self.acked
            .get(slot)
            .is_some_and(|a| a.lock().expect("acked seqs").contains(&seq))
    }

    /// Tells the watchers that the sends have stopped.
    fn sends_done(&self) {
        let last = self
            .acked
            .iter()
            .map(|a| {
                a.lock()
                    .expect("acked seqs")
                    .iter()
                    .max()
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        self.last_seq.send_replace(Some(Arc::new(last)));
    }

    /// Events the watchers should have received: each measured send that
    /// succeeded, once per watcher of its chat.
    fn expected(&self, watchers_of: impl Fn(usize) -> u64) -> u64 {
        self.acked
            .iter()
            .enumerate()
            .map(|(i, a)| a.lock().expect("acked seqs").len() as u64 * watchers_of(i))
            .sum()
    }
}

/// Watch streams of `--watchers`, watcher i on chat
/// `first_chat + i mod chats`, each from its chat's pts now, opened over
/// connections of their own: the streams, the failures to open one, and
/// how many connections they took.
async fn open_watchers(
    args: &BenchArgs,
    api: &ChatStoreClient<AuthChannel>,
    (first_chat, chats): (u64, u64),
    quiet: bool,
) -> anyhow::Result<Opened> {
    let watchers = args.watchers();
    // Watch from each chat's current pts, so no watcher replays old history.
    let pts: Vec<u64> = futures::stream::iter(first_chat..first_chat + chats)
        .map(|chat| {
            let mut api = api.clone();
            async move {
                api.get_chat(with_timeout(pb::GetChatRequest {
                    chat_id: chat,
                    consistency: Consistency::Linearizable as i32,
                    min_token: Bytes::new(),
                }))
                .await
                .map(|r| r.into_inner().pts)
                .map_err(|s| anyhow::anyhow!("read chat {chat}: {:?}: {}", s.code(), s.message()))
            }
        })
        .buffered(PREFILL_IN_FLIGHT)
        .try_collect()
        .await?;
    let connections = args
        .connections
        .max(watchers.div_ceil(WATCHERS_PER_CONNECTION));
    let channels = connect(&args.routers, connections).await?;
    let bar = progress_bar(quiet, watchers as u64, "opening watch streams");
    let mut opening = JoinSet::new();
    for i in 0..watchers {
        let mut client = ChatStoreClient::new(channels[i % channels.len()].clone());
        let bar = bar.clone();
        let slot = i % chats as usize;
        let cursor = pb::Cursor {
            chat_id: first_chat + slot as u64,
            pts: pts[slot],
        };
        opening.spawn(async move {
            let r = client
                .watch(pb::WatchRequest {
                    cursors: vec![cursor],
                })
                .await;
            bar.inc(1);
            r.map(|r| (slot, r.into_inner()))
        });
    }
    let mut streams = Vec::with_capacity(watchers);
    let mut open_errors = Stats::default();
    while let Some(joined) = opening.join_next().await {
        match joined.context("a watch task panicked")? {
            Ok(stream) => streams.push(stream),
            Err(s) => open_errors
                .op("watch_open")
                .record(Duration::ZERO, Err(s.code())),
        }
    }
    bar.finish_and_clear();
    if streams.is_empty() {
        anyhow::bail!("no watch stream opened");
    }
    Ok((streams, open_errors, channels.len()))
}

/// What one watcher saw: its slot, the seq and latency of each event of a
/// measured send, and its stream's failure if it had one.
type Seen = (usize, Vec<(u64, Duration)>, Stats);

/// Watch streams from [`open_watchers`]: the streams with their watcher
/// slots, the failures to open one, and the connections they took.
type Opened = (Vec<(usize, tonic::Streaming<pb::WatchEvent>)>, Stats, usize);

/// Watch streams being read while sends go: what the senders note their
/// sends in, and what the watchers will have seen.
struct Watching {
    shared: Arc<WatchShared>,
    watchers: JoinSet<Seen>,
    /// Streams open on each watched chat.
    watchers_of: Vec<u64>,
    open_errors: Stats,
    connections: usize,
}

impl Watching {
    /// Reads the streams `opened` on `chats` chats from `first_chat`, for
    /// sends measured in `window`.
    fn start(opened: Opened, window: Arc<Window>, (first_chat, chats): (u64, u64)) -> Watching {
        let (streams, open_errors, connections) = opened;
        let shared = Arc::new(WatchShared::new(window, first_chat, chats));
        let mut watchers_of = vec![0u64; chats as usize];
        let mut watchers = JoinSet::new();
        for (slot, stream) in streams {
            watchers_of[slot] += 1;
            watchers.spawn(watcher(stream, slot, shared.clone()));
        }
        Watching {
            shared,
            watchers,
            watchers_of,
            open_errors,
            connections,
        }
    }

    /// Once the sends have stopped: adds the `deliver` row (see
    /// [`collect_deliveries`]) and the streams that did not open to `stats`.
    async fn finish(self, stats: &mut Stats) -> anyhow::Result<()> {
        self.shared.sends_done();
        let expected = self.shared.expected(|slot| self.watchers_of[slot]);
        collect_deliveries(self.watchers, &self.shared, expected, stats).await?;
        stats.merge(self.open_errors);
        Ok(())
    }
}

/// Waits up to [`DELIVERY_GRACE`] for every watcher to see its chat's last
/// measured message, then adds to `stats` each event of a measured send
/// that succeeded (once per watcher), with those that never came as
/// `Undelivered`. Events of sends the client saw fail count as neither.
async fn collect_deliveries(
    mut watchers: JoinSet<Seen>,
    shared: &WatchShared,
    expected: u64,
    stats: &mut Stats,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DELIVERY_GRACE;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, watchers.join_next()).await {
            Ok(Some(joined)) => seen.push(joined.context("a watcher panicked")?),
            Ok(None) => break,
            // Watchers still missing events after the grace period: they
            // stop, and what they measured counts (the rest is undelivered).
            Err(_) => {
                let _ = shared.give_up.send(true);
                while let Some(joined) = watchers.join_next().await {
                    seen.push(joined.context("a watcher panicked")?);
                }
                break;
            }
        }
    }
    let mut deliver = Stats::default();
    deliver.op("deliver");
    let mut delivered = 0u64;
    for (slot, mut events, failed) in seen {
        deliver.merge(failed);
        // Stable: of an event received twice, the first arrival counts.
        events.sort_by_key(|(seq, _)| *seq);
        events.dedup_by_key(|(seq, _)| *seq);
        for (seq, latency) in events {
            if shared.acked(slot, seq) {
                deliver.op("deliver").record(latency, Ok(()));
                delivered += 1;
            }
        }
    }
    let undelivered = expected.saturating_sub(delivered);
    if undelivered > 0 {
        let delivery = deliver.op("deliver");
        *delivery.errors.entry("Undelivered".into()).or_default() += undelivered;
    }
    stats.merge(deliver);
    Ok(())
}

/// Fan-out: many watchers on one chat, one sender at a fixed rate.
async fn watch(
    args: Arc<BenchArgs>,
    channels: Vec<AuthChannel>,
    quiet: bool,
) -> anyhow::Result<Report> {
    let chat = args.first_chat;
    let api = ChatStoreClient::new(channels[0].clone());
    let opened = open_watchers(&args, &api, (chat, 1), quiet).await?;
    let watching = Watching::start(opened, Arc::new(Window::new(&args)), (chat, 1));
    let (shared, watch_connections) = (watching.shared.clone(), watching.connections);

    let line = progress_line(quiet);
    let drawing = Arc::new(AtomicBool::new(true));
    let drawer = tokio::spawn(draw_watch_progress(
        line.clone(),
        shared.clone(),
        drawing.clone(),
    ));

    let cpu_start = tokio::spawn({
        let (at, pid) = (shared.window.measure_from, args.server_pid);
        async move {
            tokio::time::sleep_until(at.into()).await;
            CpuSample::take(pid)
        }
    });
    let (sent, send_window_end) = watch_sender(&args, api, shared.clone()).await;
    // The CPU over the window the rates are per second of.
    let cpu_end = CpuSample::take(args.server_pid);
    let mut stats = sent;
    watching.finish(&mut stats).await?;
    drawing.store(false, Ordering::Relaxed);
    let _ = drawer.await;
    line.finish_and_clear();
    let cpu_start = cpu_start.await.context("the CPU sampler panicked")?;
    let (client_cpu, server_cpu) = cpu_end.percent_since(&cpu_start);

    let measured = send_window_end.saturating_duration_since(shared.window.measure_from);
    Ok(Report {
        workload: Workload::Watch.name(),
        routers: args.routers.clone(),
        in_flight: args.in_flight,
        connections: channels.len() + watch_connections,
        chats: 1,
        senders: Some(1),
        size_bytes: args.size.max(8),
        warmup_secs: args.warmup,
        measured_secs: measured.as_secs_f64(),
        watch: Some(WatchSetup {
            watchers: args.watchers(),
            rate_per_sec: Some(args.rate),
            chat: Some(chat),
            chats: 1,
        }),
        open_rate: None,
        raft_groups: None,
        client_cpu_percent: client_cpu,
        server_cpu_percent: server_cpu,
        ops: stats.reports(measured),
    })
}

/// (measured, latency, the seq or the error) of one watch-workload send.
type SendOutcome = (bool, Duration, Result<u64, Status>);

/// Counts a finished fan-out send.
fn tally(
    stats: &mut Stats,
    joined: Result<SendOutcome, tokio::task::JoinError>,
    shared: &WatchShared,
    chat: u64,
) {
    let Ok((measured, latency, result)) = joined else {
        return;
    };
    if !measured {
        return;
    }
    let code = result.as_ref().map(drop).map_err(|s| s.code());
    stats.op(Op::Send.name()).record(latency, code);
    shared.sends.count(code);
    if let Ok(seq) = result {
        shared.sent(chat, seq, measured);
    }
}

/// Sends into the watched chat at `--rate` until the window closes, with at
/// most `--in-flight` sends outstanding. Returns what the sends measured and
/// the end of the measured window (one period after the last measured send
/// was due).
async fn watch_sender(
    args: &BenchArgs,
    api: ChatStoreClient<AuthChannel>,
    shared: Arc<WatchShared>,
) -> (Stats, Instant) {
    let chat = args.first_chat;
    let size = args.size.max(8);
    let slots = Arc::new(tokio::sync::Semaphore::new(args.in_flight));
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut ticks = tokio::time::interval(period);
    // A send that could not go on time (every slot busy) goes late, and its
    // latencies count from when it was due: none is skipped or flattered.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends: JoinSet<SendOutcome> = JoinSet::new();
    let mut stats = Stats::default();
    let mut window_end = shared.window.measure_from;
    loop {
        let start = ticks.tick().await.into_std();
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the send semaphore is never closed");
        let Some(measured) = shared.window.admit(start) else {
            break;
        };
        if measured {
            // Each send stands for one period: n sends, n periods.
            window_end = start + period;
        }
        let mut api = api.clone();
        let body = body(size, Some(shared.stamp(start)));
        sends.spawn(async move {
            let _permit = permit;
            let r = api
                .send(with_timeout(pb::SendRequest {
                    chat_id: chat,
                    sender_id: 1,
                    client_msg_id: client_msg_id(),
                    body,
                    self_destruct: None,
                    min_token: Bytes::new(),
                }))
                .await;
            (measured, start.elapsed(), r.map(|r| r.into_inner().seq))
        });
        // Count finished sends as we go, so the set stays small.
        while let Some(joined) = sends.try_join_next() {
            tally(&mut stats, joined, &shared, chat);
        }
    }
    while let Some(joined) = sends.join_next().await {
        tally(&mut stats, joined, &shared, chat);
    }
    (stats, window_end)
}

/// One watch stream, on the chat of watcher slot `slot`: notes, for each
/// message sent in the measured window, its seq and the time from its send
/// starting to this event arriving. Stops once it has seen its chat's last
/// measured seq, or when the stream ends.
async fn watcher(
    mut stream: tonic::Streaming<pb::WatchEvent>,
    slot: usize,
    shared: Arc<WatchShared>,
) -> Seen {
    let mut events = Vec::new();
    let mut stats = Stats::default();
    let mut last_seq = shared.last_seq.subscribe();
    let mut give_up = shared.give_up.subscribe();
    let mut seen_seq = 0u64;
    loop {
        let done = match &*last_seq.borrow_and_update() {
            Some(last) => seen_seq >= last.get(slot).copied().unwrap_or(0),
            None => false,
        };
        if done {
            return (slot, events, stats);
        }
        let event = tokio::select! {
            e = stream.message() => e,
            // The sender stopped: look again whether we are done.
            _ = last_seq.changed() => continue,
            _ = give_up.wait_for(|g| *g) => return (slot, events, stats),
        };
        let event = match event {
            Ok(Some(e)) => e,
            Ok(None) => return (slot, events, stats),
            Err(s) => {
                stats.op("deliver").record(Duration::ZERO, Err(s.code()));
                return (slot, events, stats);
            }
        };
        let Some(change) = event.change else { continue };
        if change.kind != ChangeKind::NewMessage as i32 {
            continue;
        }
        let Some(message) = change.message else {
            continue;
        };
        seen_seq = seen_seq.max(message.seq);
        let Some(stamp) = message.body.get(..8) else {
            continue;
        };
        let stamp = u64::from_le_bytes(stamp.try_into().expect("a slice of 8 bytes"));
        let received = shared.stamp(Instant::now());
        // Not sent in the measured window, or not a body this run stamped
        // (one from later than now).
        if !shared.measured(stamp) || stamp > received {
            continue;
        }
        events.push((message.seq, Duration::from_nanos(received - stamp)));
        shared.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

async fn draw_watch_progress(
    line: indicatif::ProgressBar,
    shared: Arc<WatchShared>,
    drawing: Arc<AtomicBool>,
) {
    if line.is_hidden() {
        return;
    }
    while drawing.load(Ordering::Relaxed) {
        let now = Instant::now();
        let sent = shared.sends.ok.load(Ordering::Relaxed);
        let failed = shared.sends.failed.load(Ordering::Relaxed);
        let events = shared.delivered.load(Ordering::Relaxed);
        let secs = now
            .saturating_duration_since(shared.window.measure_from)
            .as_secs_f64();
        let rate = if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        };
        line.set_message(format!(
            "watch: {}  {sent} sent  {failed} failed  {events} events received  {rate:.0} events/s",
            shared.window.describe(now)
        ));
        tokio::time::sleep(PROGRESS_TICK).await;
    }
}

/// `chatctl bench`: runs one benchmark and prints its report.
pub async fn command(mut args: BenchArgs, router: &str, json: bool) -> anyhow::Result<i32> {
    if args.routers.is_empty() {
        args.routers = vec![router.to_string()];
    }
    let report = run(args, json).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(0)
}

/// Errors by code as one short phrase, "0" when there were none.
pub fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".to_string();
    }
    errors
        .iter()
        .map(|(code, n)| format!("{n} {code}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu_text(percent: Option<f64>) -> String {
    percent.map_or_else(|| "-".to_string(), |p| format!("{p:.0}%"))
}

/// The report for a person.
pub(super) fn text(r: &Report) -> String {
    let mut out = match r.raft_groups {
        Some(groups) => format!(
            "{}: {} in flight, {}-byte bodies; {groups} Raft groups of three replicas in this process\n\
             measured {:.1} s after a {:.1} s warmup; CPU (percent of one core): chatctl {}\n",
            r.workload,
            r.in_flight,
            r.size_bytes,
            r.measured_secs,
            r.warmup_secs,
            cpu_text(r.client_cpu_percent)
        ),
        None => format!(
            "{}: {}; {} connections to {}\n\
             measured {:.1} s after a {:.1} s warmup; CPU (percent of one core): chatctl {}, server {}\n",
            r.workload,
            load_text(r),
            r.connections,
            r.routers.join(", "),
            r.measured_secs,
            r.warmup_secs,
            cpu_text(r.client_cpu_percent),
            cpu_text(r.server_cpu_percent)
        ),
    };
    out.push_str(&format!(
        "{:<12} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  ERRORS\n",
        "OP", "COUNT", "OPS/S", "P50 MS", "P90 MS", "P99 MS", "P999 MS", "MAX MS"
    ));
    for op in &r.ops {
        let l = &op.latency_ms;
        out.push_str(&format!(
            "{:<12} {:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}\n",
            op.op,
            op.count,
            op.ops_per_sec,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            errors_text(&op.errors)
        ));
    }
    out
}

/// What a load through the routers was.
fn load_text(r: &Report) -> String {
    match &r.watch {
        Some(WatchSetup {
            watchers,
            rate_per_sec: Some(rate),
            chat: Some(chat),
            ..
        }) => format!(
            "{watchers} watchers on chat {chat}, {rate} messages/s, at most {} sends in flight",
            r.in_flight
        ),
        _ => {
            format!(
                "{}{} in flight, {} chats, {}{}-byte bodies",
                r.open_rate.map_or_else(String::new, |rate| format!(
                    "open loop at {rate}/s, at most "
                )),
                r.in_flight,
                r.chats,
                r.senders
                    .map_or_else(String::new, |n| format!("{n} senders, ")),
                r.size_bytes
            ) + &r.watch.as_ref().map_or_else(String::new, |w| {
                format!(", {} watchers on {} chats", w.watchers, w.chats)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running process is running; one that exited (a zombie until its
    /// parent waits) or never was is not.
    #[test]
    fn running_processes_are_told_from_exited_ones() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = Instant::now();
        while is_running(pid) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_running(pid), "an exited child is not running");
        child.wait().unwrap();
        assert!(!is_running(pid));
    }

    #[test]
    fn cpu_time_reads_this_process() {
        // Any running process has a stat line; the parse must find numbers.
        assert!(cpu_time("self").is_some());
    }

    #[test]
    fn a_count_window_admits_exactly_count_measured_requests() {
        let args = BenchArgs {
            count: Some(5),
            warmup: 0.0,
            ..BenchArgs::for_case(vec!["x".into()], Workload::Send, 1, 1.0, 0.0, None)
        };
        let window = Window::new(&BenchArgs {
            duration: None,
            ..args
        });
        let now = Instant::now();
        let admitted = (0..10).filter_map(|_| window.admit(now)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn warmup_requests_are_not_measured() {
        let args = BenchArgs::for_case(vec!["x".into()], Workload::Send, 1, 1.0, 60.0, None);
        let window = Window::new(&args);
        assert_eq!(window.admit(Instant::now()), Some(false));
        assert_eq!(window.admit(window.measure_from), Some(true));
        let End::At(end) = window.end else {
            panic!("a duration window ends at a time")
        };
        assert_eq!(window.admit(end), None);
    }

    #[test]
    fn a_mix_is_read_from_its_shares_and_bad_ones_are_refused() {
        assert_eq!(parse_mix(MIX_DEFAULT).unwrap(), [1, 0, 1, 0]);
        assert_eq!(
            parse_mix("difference=5, read=2,send=0").unwrap(),
            [0, 2, 0, 5]
        );
        for bad in [
            "",
            "send",
            "send=1,send=2",
            "write=1",
            "send=-1",
            "send=1.5",
            "send=0,read=0",
            "send=1000001",
        ] {
            assert!(parse_mix(bad).is_err(), "{bad:?}");
        }
        let mix = Mix::Shares(parse_mix("send=3,history=1").unwrap());
        assert_eq!(mix.ops(), [Op::Send, Op::History]);
        let draws = 40_000;
        let sends = (0..draws).filter(|_| mix.next() == Op::Send).count();
        // 30,000 expected; the standard deviation is about 87.
        assert!((29_000..=31_000).contains(&sends), "{sends} of {draws}");
        let mut args = BenchArgs::for_case(vec!["r".into()], Workload::Send, 1, 1.0, 0.0, None);
        args.mix = Some("read=1".into());
        assert!(args.check().is_err(), "--mix without the mixed workload");
        args.workload = Workload::Mixed;
        args.check().unwrap();
        assert!(!args.sends(), "a mix of reads sends nothing");
        args.senders = 10;
        assert!(args.check().is_ok());
        args.workload = Workload::Read;
        args.mix = None;
        assert!(
            args.check().is_err(),
            "--senders with a workload that sends nothing"
        );
    }

    #[test]
    fn watchers_go_beside_loads_that_send_and_nowhere_else() {
        let case = |workload| BenchArgs::for_case(vec!["r".into()], workload, 1, 1.0, 0.0, None);
        assert_eq!(case(Workload::Watch).watchers(), WATCHERS_DEFAULT);
        assert_eq!(case(Workload::Mixed).watchers(), 0);
        for workload in [Workload::Send, Workload::Mixed, Workload::Watch] {
            let mut args = case(workload);
            args.watchers = Some(10);
            args.check().unwrap();
            args.watchers = Some(0);
            assert!(args.check().is_err(), "no watchers at all");
            args.watchers = Some(WATCH_STREAMS_MAX + 1);
            assert!(args.check().is_err(), "more than a router serves");
        }
        for workload in [Workload::SendBatch, Workload::Read, Workload::Noop] {
            let mut args = case(workload);
            args.watchers = Some(10);
            assert!(args.check().is_err(), "{workload:?} with --watchers");
        }
        let mut args = case(Workload::Mixed);
        args.watchers = Some(10);
        args.mix = Some("read=1,history=1".into());
        assert!(
            args.check().is_err(),
            "watchers of a load that sends nothing"
        );
        args.mix = None;
        args.size = 7;
        assert!(args.check().is_err(), "a body too small for its send time");
    }

    #[test]
    fn watchers_expect_each_measured_send_once_per_watcher_of_its_chat() {
        let args = BenchArgs::for_case(vec!["r".into()], Workload::Mixed, 1, 1.0, 0.0, None);
        let shared = WatchShared::new(Arc::new(Window::new(&args)), 10, 3);
        shared.sent(10, 4, true);
        shared.sent(10, 7, true);
        shared.sent(10, 9, false);
        shared.sent(12, 2, true);
        // Chats outside the watched ones are not counted.
        shared.sent(9, 1, true);
        shared.sent(13, 1, true);
        let watchers_of = [2u64, 5, 1];
        assert_eq!(shared.expected(|slot| watchers_of[slot]), 2 * 2 + 1);
        // Only acknowledged measured sends count as deliveries.
        assert!(shared.acked(0, 4) && shared.acked(0, 7) && shared.acked(2, 2));
        assert!(!shared.acked(0, 9) && !shared.acked(0, 5) && !shared.acked(1, 4));
        shared.sends_done();
        let last = shared.last_seq.borrow().clone().expect("published");
        assert_eq!(*last, vec![7, 0, 2], "the last measured seq per chat");
    }

    /// Each watcher's event of an acknowledged measured send counts once;
    /// an event of a send the client saw fail counts as neither delivered
    /// nor missing; what no watcher got is `Undelivered`.
    #[tokio::test]
    async fn deliveries_are_matched_to_the_sends_that_were_acknowledged() {
        let args = BenchArgs::for_case(vec!["r".into()], Workload::Mixed, 1, 1.0, 0.0, None);
        let shared = WatchShared::new(Arc::new(Window::new(&args)), 1, 2);
        for seq in [1, 2, 3] {
            shared.sent(1, seq, true);
        }
        shared.sent(2, 1, true);
        let ms = Duration::from_millis;
        let mut watchers = JoinSet::new();
        // Chat 1: seq 2 twice, and seq 4, whose send failed for the client.
        let first = vec![(1, ms(5)), (2, ms(6)), (2, ms(7)), (3, ms(8)), (4, ms(9))];
        watchers.spawn(async move { (0, first, Stats::default()) });
        // Chat 1's other watcher missed seq 3; chat 2's got its one message.
        watchers.spawn(async move { (0, vec![(1, ms(5)), (2, ms(6))], Stats::default()) });
        watchers.spawn(async move { (1, vec![(1, ms(5))], Stats::default()) });
        let expected = shared.expected(|slot| [2, 1][slot]);
        assert_eq!(expected, 7);
        let mut stats = Stats::default();
        collect_deliveries(watchers, &shared, expected, &mut stats)
            .await
            .unwrap();
        let deliver = stats.op("deliver");
        assert_eq!(deliver.latency_us.len(), 6);
        assert_eq!(deliver.errors.get("Undelivered"), Some(&1));
    }

    #[test]
    fn a_batch_reply_fails_the_sends_it_does_not_acknowledge() {
        let sent = pb::SendOutcome {
            sent: Some(Default::default()),
            ..Default::default()
        };
        let refused = pb::SendOutcome {
            error_code: Code::FailedPrecondition as i32,
            ..Default::default()
        };
        let empty = pb::SendOutcome::default();
        assert!(batch_failures(&[sent.clone(), sent.clone()], 2).is_empty());
        assert_eq!(
            batch_failures(&[sent.clone(), refused, empty, sent.clone()], 6),
            [
                Some(Code::FailedPrecondition),
                Some(Code::Unknown),
                None,
                None
            ]
        );
        assert!(batch_failures(&[sent.clone(), sent], 1).is_empty());
    }

    #[test]
    fn stats_merge_latencies_and_errors() {
        let mut a = Stats::default();
        a.op("send").record(Duration::from_millis(2), Ok(()));
        a.op("send").record(Duration::ZERO, Err(Code::Unavailable));
        let mut b = Stats::default();
        b.op("send").record(Duration::from_millis(4), Ok(()));
        b.op("history").record(Duration::from_millis(1), Ok(()));
        a.merge(b);
        let reports = a.reports(Duration::from_secs(1));
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].op, "send");
        assert_eq!(reports[0].count, 2);
        assert_eq!(reports[0].errors.get("Unavailable"), Some(&1));
        assert!((reports[0].latency_ms.max - 4.0).abs() < 0.01);
        assert_eq!(errors_text(&reports[0].errors), "1 Unavailable");
    }

    #[test]
    fn a_stamped_body_carries_its_stamp() {
        let b = body(16, Some(0x0102_0304_0506_0708));
        assert_eq!(b.len(), 16);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
    }
}
