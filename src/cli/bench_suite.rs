//! `chatctl bench-suite`: the fixed set of benchmarks behind `make bench`,
//! run against a cluster that is already up, written as a markdown section.
//!
//! ```text
//!  wait until every router answers and every shard has a leader
//!    → idle CPU of --server-pid (optional)
//!    → each case of SUITE in turn (bench::run) → one line on stderr
//!    → markdown: machine, commit, date, command, one table
//!    → stdout, or spliced between the markers of --write FILE
//! ```
//!
//! The section sits between two marker comments, so a re-run replaces it
//! and leaves the rest of the file (its introduction) alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::bench::{self, BenchArgs, CpuSample, Report, Workload};
use super::raft_floor::RaftFloorArgs;

/// The first line of the generated section.
pub const SECTION_START: &str =
    "<!-- bench-results:start (written by `make bench`; edits between the markers are lost) -->";
/// The last line of the generated section.
pub const SECTION_END: &str = "<!-- bench-results:end -->";
/// Raft groups of the floor case: the dev cluster's shard count.
const FLOOR_GROUPS: u32 = 64;
/// Time between readiness checks.
const READY_POLL: Duration = Duration::from_millis(500);
/// How long one readiness check may wait on a router.
const READY_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// One benchmark of the suite.
struct Case {
    workload: Workload,
    in_flight: usize,
    /// An open loop at this many requests a second (at most `in_flight`
    /// outstanding), or a closed loop.
    open_rate: Option<f64>,
    /// Watch streams beside the load (the watch case takes `--watchers`).
    watchers: Option<usize>,
}

/// What `make bench` measures, in this order. Read workloads run after the
/// send cases, whose messages make their prefill shorter.
const SUITE: &[Case] = &[
    Case {
        workload: Workload::Noop,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Noop,
        in_flight: 256,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Send,
        in_flight: 1,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Send,
        in_flight: 16,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Send,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Send,
        in_flight: 256,
        open_rate: None,
        watchers: None,
    },
    // Latency without coordinated omission: a fixed schedule below the
    // closed loop's rate, timed from when each request was due.
    Case {
        workload: Workload::Send,
        in_flight: 1024,
        open_rate: Some(4_000.0),
        watchers: None,
    },
    Case {
        workload: Workload::SendBatch,
        in_flight: 16,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Read,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::History,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::History,
        in_flight: 256,
        open_rate: Some(12_000.0),
        watchers: None,
    },
    Case {
        workload: Workload::Difference,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    Case {
        workload: Workload::Mixed,
        in_flight: 64,
        open_rate: None,
        watchers: None,
    },
    // The same load while devices watch: one stream on each chat.
    Case {
        workload: Workload::Mixed,
        in_flight: 64,
        open_rate: None,
        watchers: Some(1000),
    },
    // For watch, in flight bounds the sender's outstanding sends.
    Case {
        workload: Workload::Watch,
        in_flight: 16,
        open_rate: None,
        watchers: None,
    },
];

#[derive(clap::Args, Clone, Debug)]
pub struct SuiteArgs {
    /// Routers to load (host:port, comma-separated); default: the global --router.
    #[arg(long, value_delimiter = ',')]
    pub routers: Vec<String>,
    /// Measured seconds per case.
    #[arg(long, env = "BENCH_SECS", default_value_t = 15.0)]
    pub secs: f64,
    /// Warmup seconds per case, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Watchers of the watch case.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Messages per second of the watch case.
    #[arg(long, default_value_t = 10.0)]
    pub watch_rate: f64,
    /// Give up when the cluster is not ready (routers answering, every
    /// shard with a leader) after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u64,
    /// The cluster's process, to report its CPU use per case.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds to measure the CPU use of the idle --server-pid first (0: skip).
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Replace the results section of this markdown file instead of printing it.
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// How the suite was started, recorded with the results.
    #[arg(long, default_value = "chatctl bench-suite")]
    pub command: String,
    /// The commit measured, recorded with the results.
    #[arg(long, default_value = "unknown")]
    pub commit: String,
    /// When the suite ran, recorded with the results.
    #[arg(long, default_value = "unknown")]
    pub date: String,
}

/// A case and how it went.
struct Outcome {
    label: String,
    result: anyhow::Result<Report>,
}

/// `chatctl bench-suite`: waits for the cluster, runs every case, then
/// prints or writes the results.
pub async fn command(
    mut args: SuiteArgs,
    endpoints: &[String],
    router: &str,
    json: bool,
) -> anyhow::Result<i32> {
    if args.routers.is_empty() {
        args.routers = vec![router.to_string()];
    }
    if !(args.secs > 0.0 && args.secs.is_finite()) {
        anyhow::bail!("--secs (BENCH_SECS) must be a positive number of seconds");
    }
    eprintln!(
        "bench-suite: waiting for routers {} and a leader on every shard",
        args.routers.join(",")
    );
    wait_ready(
        endpoints,
        &args.routers,
        Duration::from_secs(args.ready_timeout_secs),
    )
    .await?;
    // The cluster this suite was started with must be the one answering:
    // another on the same ports (a `make dev` still running) would be
    // measured in its place.
    if let Some(pid) = args.server_pid {
        anyhow::ensure!(
            bench::is_running(pid),
            "the cluster process {pid} is not running; is another cluster using its ports?"
        );
    }
    let idle_cpu = match args.server_pid {
        Some(pid) if args.idle_secs > 0 => {
            eprintln!(
                "bench-suite: measuring the idle cluster's CPU for {} s",
                args.idle_secs
            );
            let before = CpuSample::take(Some(pid));
            tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
            CpuSample::take(Some(pid)).percent_since(&before).1
        }
        _ => None,
    };
    let mut outcomes = Vec::new();
    // The floor first, while the cluster idles: openraft alone in this
    // process, with as many groups as the dev cluster has shards and one
    // command per entry, as unary sends mostly have.
    let floor = RaftFloorArgs {
        groups: FLOOR_GROUPS,
        in_flight: 256,
        commands_per_entry: 1,
        size: 1024,
        duration: args.secs,
        warmup: args.warmup,
        durable_log: false,
    };
    let label = format!(
        "raft-floor at {} in flight, {} groups",
        floor.in_flight, floor.groups
    );
    eprintln!("bench-suite: {label}");
    let result = super::raft_floor::run(&floor).await;
    print_outcome(&result);
    outcomes.push(Outcome { label, result });
    for case in SUITE {
        let mut bench_args = BenchArgs::for_case(
            args.routers.clone(),
            case.workload,
            case.in_flight,
            args.secs,
            args.warmup,
            args.server_pid,
        );
        bench_args.watchers = match case.workload {
            Workload::Watch => Some(args.watchers),
            _ => case.watchers,
        };
        bench_args.rate = args.watch_rate;
        bench_args.open_rate = case.open_rate;
        let label = match case.open_rate {
            Some(rate) => format!(
                "{} open loop at {rate}/s, at most {} in flight",
                case.workload.name(),
                case.in_flight
            ),
            None => format!("{} at {} in flight", case.workload.name(), case.in_flight),
        } + &case
            .watchers
            .map_or_else(String::new, |n| format!(", {n} watchers"));
        eprintln!("bench-suite: {label}");
        let result = bench::run(bench_args, false).await;
        print_outcome(&result);
        outcomes.push(Outcome { label, result });
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    if json {
        let reports: Vec<_> = outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(r) => serde_json::to_value(r).expect("a report serialises"),
                Err(e) => serde_json::json!({"case": o.label, "error": format!("{e:#}")}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"idle_server_cpu_percent": idle_cpu, "reports": reports})
        );
    } else {
        let section = markdown(&args, idle_cpu, &outcomes);
        match &args.write {
            Some(path) => {
                splice(path, &section)?;
                eprintln!("bench-suite: wrote the results into {}", path.display());
            }
            None => print!("{section}"),
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// One line per operation of a case on stderr.
fn print_outcome(result: &anyhow::Result<Report>) {
    match result {
        Ok(report) => {
            for op in &report.ops {
                eprintln!(
                    "  {:<10} {:>10.0} ops/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                    op.op,
                    op.ops_per_sec,
                    op.latency_ms.p50,
                    op.latency_ms.p99,
                    bench::errors_text(&op.errors)
                );
            }
        }
        Err(e) => eprintln!("  failed: {e:#}"),
    }
}

/// Waits until every router answers a health check and every shard the
/// nodes report has a leader, or `timeout` passes.
async fn wait_ready(
    endpoints: &[String],
    routers: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let problem = match not_ready(endpoints, routers).await {
            None => return Ok(()),
            Some(problem) => problem,
        };
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the cluster is not ready after {} s: {problem}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// What keeps the cluster from being ready, if anything.
async fn not_ready(endpoints: &[String], routers: &[String]) -> Option<String> {
    for router in routers {
        let channel = match bench::connect(std::slice::from_ref(router), 1).await {
            Ok(mut c) => c.remove(0),
            Err(e) => return Some(format!("{e:#}")),
        };
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(READY_CALL_TIMEOUT);
        if let Err(s) = HealthClient::new(channel).check(request).await {
            return Some(format!("router {router}: {:?}: {}", s.code(), s.message()));
        }
    }
    let view = match super::ops::Ops::new(endpoints, true).gather().await {
        Ok(v) => v,
        Err(e) => return Some(format!("{e:#}")),
    };
    if let Some(n) = view.nodes.values().find(|n| !n.up) {
        return Some(format!("node {} at {} is down", n.id, n.addr));
    }
    let shards = view.shard_ids();
    if shards.is_empty() {
        return Some("the nodes report no shards yet".to_string());
    }
    let led: BTreeSet<u64> = shards
        .iter()
        .copied()
        .filter(|s| view.leader_status(*s).is_some())
        .collect();
    let leaderless = shards.difference(&led).count();
    (leaderless > 0).then(|| format!("{leaderless} of {} shards have no leader yet", shards.len()))
}

/// This machine in one phrase: CPUs, CPU model, memory.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "CPU model unknown".to_string());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "memory unknown".to_string(),
            |kb| format!("{:.1} GiB memory", kb / (1024.0 * 1024.0)),
        );
    format!("{cpus} CPUs ({model}), {memory_gib}")
}

fn percent(p: Option<f64>) -> String {
    p.map_or_else(String::new, |p| format!("{p:.0}%"))
}

/// Microseconds of cluster CPU per operation, over all operations of the
/// case (each message of a batch, each Watch delivery). It moves less from
/// run to run than throughput on a shared machine, so commits compare by it.
///
/// The Raft floor's groups run inside `chatctl`: its CPU is theirs.
fn cpu_per_op(report: &bench::Report) -> String {
    let ops: f64 = report.ops.iter().map(|o| o.ops_per_sec).sum();
    let cluster_cpu = match report.raft_groups {
        Some(_) => report.client_cpu_percent,
        None => report.server_cpu_percent,
    };
    match cluster_cpu {
        Some(cpu) if ops > 0.0 => format!("{:.0}", cpu / 100.0 * 1e6 / ops),
        _ => String::new(),
    }
}

/// The results section, markers included.
fn markdown(args: &SuiteArgs, idle_cpu: Option<f64>, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    out.push_str(SECTION_START);
    out.push_str("\n\n## Latest results\n\n");
    out.push_str(&format!("- Command: `{}`\n", args.command));
    out.push_str(&format!("- Commit: `{}`\n", args.commit));
    out.push_str(&format!("- Date: {}\n", args.date));
    out.push_str(&format!("- Machine: {}\n", machine()));
    out.push_str(&format!(
        "- Each case: {} s warmup, then {} s measured; routers {}\n",
        args.warmup,
        args.secs,
        args.routers.join(", ")
    ));
    if let Some(idle) = idle_cpu {
        out.push_str(&format!(
            "- CPU of the idle cluster process: {idle:.1}% of one core (over {} s)\n",
            args.idle_secs
        ));
    }
    out.push_str(
        "\n| workload | in flight | ops/s | p50 ms | p99 ms | p999 ms | errors | cluster CPU | cluster CPU µs/op | chatctl CPU |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for o in outcomes {
        let report = match &o.result {
            Ok(r) => r,
            Err(e) => {
                out.push_str(&format!(
                    "| {} | | | | | | failed: {} | | | |\n",
                    o.label,
                    format!("{e:#}").replace('|', "/")
                ));
                continue;
            }
        };
        let in_flight = match (&report.watch, report.open_rate) {
            (Some(w), open_rate) => match (w.rate_per_sec, open_rate) {
                (Some(rate), _) => format!("{} watchers, {rate} msg/s", w.watchers),
                (None, Some(rate)) => format!(
                    "open loop {rate:.0}/s, ≤ {}, {} watchers",
                    report.in_flight, w.watchers
                ),
                (None, None) => format!("{}, {} watchers", report.in_flight, w.watchers),
            },
            (None, Some(rate)) => format!("open loop {rate:.0}/s, ≤ {}", report.in_flight),
            (None, None) => match report.raft_groups {
                Some(groups) => format!("{}, {groups} groups in chatctl", report.in_flight),
                None => report.in_flight.to_string(),
            },
        };
        for (i, op) in report.ops.iter().enumerate() {
            let name = if op.op == report.workload {
                report.workload.to_string()
            } else {
                format!("{}: {}", report.workload, op.op)
            };
            let (server, per_op, client) = if i == 0 {
                let mut per_op = cpu_per_op(report);
                if report.raft_groups.is_some() && !per_op.is_empty() {
                    per_op.push_str(" (chatctl)");
                }
                if report.ops.len() > 1 && !per_op.is_empty() {
                    // Over the operations of every row of the case.
                    per_op.push_str(" (all rows)");
                }
                (
                    percent(report.server_cpu_percent),
                    per_op,
                    percent(report.client_cpu_percent),
                )
            } else {
                (String::new(), String::new(), String::new())
            };
            let l = &op.latency_ms;
            // A percentile needs samples past it: fewer than 100 timed
            // requests give no p99 and fewer than 1,000 no p999 (it would
            // only be the max); no samples, no latency at all. A request
            // that failed has no latency, so past 0.1% of them failed the
            // percentiles would flatter: none is given.
            let samples = op.count / op.per_request.max(1);
            let failed: u64 = op.errors.values().sum();
            let too_many_failed = failed * 1000 > op.count + failed;
            let at = |value: f64, needed: u64| {
                if samples >= needed && !too_many_failed {
                    format!("{value:.2}")
                } else {
                    "-".to_string()
                }
            };
            out.push_str(&format!(
                "| {name} | {in_flight} | {:.0} | {} | {} | {} | {} | {server} | {per_op} | {client} |\n",
                op.ops_per_sec,
                at(l.p50, 1),
                at(l.p99, 100),
                at(l.p999, 1000),
                bench::errors_text(&op.errors)
            ));
        }
    }
    out.push('\n');
    out.push_str(SECTION_END);
    out.push('\n');
    out
}

/// Replaces the section between the markers of `path` with `section`, or
/// appends it when the file has no markers yet.
fn splice(path: &Path, section: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let new = spliced(&old, section);
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

fn spliced(old: &str, section: &str) -> String {
    let start = old.find(SECTION_START);
    let end = old.find(SECTION_END).map(|i| {
        i + SECTION_END.len() + usize::from(old[i + SECTION_END.len()..].starts_with('\n'))
    });
    match (start, end) {
        (Some(s), Some(e)) if s < e => format!("{}{section}{}", &old[..s], &old[e..]),
        _ => {
            let mut text = old.trim_end().to_string();
            text.push_str("\n\n");
            text.push_str(section);
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(body: &str) -> String {
        format!("{SECTION_START}\n{body}\n{SECTION_END}\n")
    }

    #[test]
    fn a_rerun_replaces_only_the_section() {
        let old = format!("# Benchmarks\n\nintro\n\n{}\nafter\n", section("old"));
        let new = spliced(&old, &section("new"));
        assert_eq!(
            new,
            format!("# Benchmarks\n\nintro\n\n{}\nafter\n", section("new"))
        );
    }

    #[test]
    fn a_file_without_markers_gets_the_section_appended() {
        let new = spliced("# Benchmarks\n\nintro\n", &section("new"));
        assert_eq!(new, format!("# Benchmarks\n\nintro\n\n{}", section("new")));
    }

    #[test]
    fn cpu_per_op_counts_every_operation_of_a_case() {
        let op = |name: &'static str, ops_per_sec: f64| bench::OpReport {
            op: name,
            count: 0,
            ops_per_sec,
            latency_ms: bench::Percentiles {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            },
            errors: Default::default(),
            per_request: 1,
        };
        let mut report = bench::Report {
            workload: "mixed",
            routers: Vec::new(),
            in_flight: 64,
            connections: 4,
            chats: 1000,
            senders: Some(64),
            size_bytes: 1024,
            warmup_secs: 2.0,
            measured_secs: 10.0,
            watch: None,
            client_cpu_percent: None,
            server_cpu_percent: Some(150.0),
            open_rate: None,
            raft_groups: None,
            ops: vec![op("send", 1000.0), op("history", 2000.0)],
        };
        // 1.5 cores over 3,000 operations a second.
        assert_eq!(cpu_per_op(&report), "500");
        report.server_cpu_percent = None;
        assert_eq!(cpu_per_op(&report), "");
    }

    #[test]
    fn the_machine_phrase_names_cpus_and_memory() {
        let m = machine();
        assert!(m.contains("CPUs"), "{m}");
        assert!(m.contains("memory"), "{m}");
    }
}
