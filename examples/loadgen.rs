//! Load generator for the benchmark harness (`bench/run.sh`): drives a running mailgate over
//! gRPC and measures acceptance latency, the accept rate and the end-to-end delivered rate.
//!
//! It creates and activates its own profile pointing at an SMTP sink, sends N messages
//! (unary SendEmail with C concurrent callers, SendBatch in batches of 1,000, or unary at a
//! fixed offered rate), waits until all N are SENT (see `wait_delivered`), and writes JSON.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use mailgate::proto::v1::{
    email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient,
    smtp_config_service_client::SmtpConfigServiceClient, *,
};
use tonic::{metadata::MetadataValue, transport::Channel, Request};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    Unary,
    Batch,
}

/// Drives mailgate and measures it.
#[derive(Debug, Parser)]
struct Args {
    /// mailgate's gRPC address, host:port.
    #[arg(long)]
    addr: String,
    /// Tenant to send as.
    #[arg(long, default_value = "bench")]
    tenant: String,
    /// SMTP sink host.
    #[arg(long, default_value = "127.0.0.1")]
    smtp_host: String,
    /// SMTP sink port.
    #[arg(long)]
    smtp_port: u16,
    /// Messages to send.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Concurrent callers (unary) or batches in flight (batch).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 1500)]
    size: usize,
    /// unary or batch.
    #[arg(long, value_enum, default_value = "unary")]
    mode: Mode,
    /// Offered rate for unary calls, per second (open loop); unset: as fast as possible.
    #[arg(long)]
    rate: Option<u64>,
    /// Where to write the JSON result.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn request<T>(tenant: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    if let Ok(v) = MetadataValue::try_from(tenant) {
        r.metadata_mut().insert("x-tenant-id", v);
    }
    r.metadata_mut()
        .insert("x-source", MetadataValue::from_static("loadgen"));
    r
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn setup_profile(channel: &Channel, args: &Args) -> anyhow::Result<String> {
    let mut config = SmtpConfigServiceClient::new(channel.clone());
    let name = format!(
        "bench-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_nanos()
    );
    let created = config
        .create_smtp_profile(request(
            &args.tenant,
            CreateSmtpProfileRequest {
                profile: Some(SmtpProfile {
                    name,
                    host: args.smtp_host.clone(),
                    port: u32::from(args.smtp_port),
                    security: SmtpSecurity::None.into(),
                    from_email: "bench@mailgate.test".into(),
                    from_name: "mailgate bench".into(),
                    max_connections: u32::try_from(args.concurrency).unwrap_or(32),
                    ..Default::default()
                }),
                verify: true,
            },
        ))
        .await?
        .into_inner();
    let Some(profile) = created.profile else {
        bail!("profile verification failed: {:?}", created.verification);
    };
    config
        .activate_smtp_profile(request(
            &args.tenant,
            ActivateSmtpProfileRequest {
                id: profile.id.clone(),
            },
        ))
        .await?;
    Ok(profile.id)
}

/// A text body for an email of about `size` bytes on the wire (headers take about 400): lines
/// of 75 characters, as the reference clients send. A longer line would need
/// quoted-printable, which costs mailgate an encoding pass and the wire 3 % more bytes
/// that the references do not pay.
fn body(size: usize) -> String {
    const LINE: &str =
        "The quick brown fox jumps over the lazy dog, and again and again and again.";
    let lines = size.saturating_sub(400) / (LINE.len() + 1) + 1;
    let mut body = String::with_capacity(lines * (LINE.len() + 1));
    for _ in 0..lines {
        body.push_str(LINE);
        body.push('\n');
    }
    body
}

fn email(profile_id: &str, i: usize, body: &str) -> SendEmailRequest {
    SendEmailRequest {
        to: vec![Mailbox {
            email: format!("user{i}@example.com"),
            name: String::new(),
        }],
        subject: format!("Benchmark message {i}"),
        text_body: body.to_owned(),
        profile_id: profile_id.to_owned(),
        email_type: "bench".into(),
        ..Default::default()
    }
}

/// What a sending function returns: each request's planned start (seconds into the run)
/// and latency (ms), the error count, and the id of the email accepted last.
type Sent = (Vec<(f64, f64)>, usize, Option<String>);

/// The later of two (time accepted, email id) pairs.
fn later(a: Option<(Instant, String)>, b: Option<(Instant, String)>) -> Option<(Instant, String)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Sends N unary requests with C callers (closed loop) or at a fixed rate (open loop).
async fn unary(channel: &Channel, args: &Args, profile_id: &str, body: &str) -> Sent {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let mut client = SendServiceClient::new(channel.clone());
        let (next, tenant, profile_id, body) = (
            next.clone(),
            args.tenant.clone(),
            profile_id.to_owned(),
            body.to_owned(),
        );
        let (n, rate) = (args.messages, args.rate);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut last = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                // Open loop: each request has a planned start; latency counts from it, so a
                // slow server cannot hide its queueing (no coordinated omission).
                let planned = match rate {
                    Some(r) => {
                        let at = start + Duration::from_secs_f64(i as f64 / r as f64);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                match client
                    .send_email(request(&tenant, email(&profile_id, i, &body)))
                    .await
                {
                    Ok(r) => {
                        latencies.push((
                            (planned - start).as_secs_f64(),
                            planned.elapsed().as_secs_f64() * 1000.0,
                        ));
                        last = Some((Instant::now(), r.into_inner().message_id));
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors, last)
        });
    }
    let mut all = Vec::with_capacity(args.messages);
    let (mut errors, mut last) = (0, None);
    while let Some(Ok((latencies, e, l))) = tasks.join_next().await {
        all.extend(latencies);
        errors += e;
        last = later(last, l);
    }
    (all, errors, last.map(|(_, id)| id))
}

type Batches = std::sync::Mutex<std::vec::IntoIter<(usize, usize)>>;

/// The next batch to send (the lock is released before the call).
fn next_batch(batches: &Batches) -> Option<(usize, usize)> {
    batches.lock().ok().and_then(|mut b| b.next())
}

/// Sends N emails in batches of 1,000 with C batches in flight.
async fn batch(channel: &Channel, args: &Args, profile_id: &str, body: &str) -> Sent {
    let start = Instant::now();
    let batches: Vec<(usize, usize)> = (0..args.messages)
        .step_by(1000)
        .map(|from| (from, (from + 1000).min(args.messages)))
        .collect();
    let batches = Arc::new(std::sync::Mutex::new(batches.into_iter()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.clamp(1, 4) {
        let mut client = SendServiceClient::new(channel.clone());
        let (batches, tenant, profile_id, body) = (
            batches.clone(),
            args.tenant.clone(),
            profile_id.to_owned(),
            body.to_owned(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut last = None;
            while let Some((from, to)) = next_batch(&batches) {
                let mut base = email(&profile_id, from, &body);
                base.to.clear();
                let recipients = (from..to)
                    .map(|i| BatchRecipient {
                        to: Some(Mailbox {
                            email: format!("user{i}@example.com"),
                            name: String::new(),
                        }),
                        ..Default::default()
                    })
                    .collect();
                let started = Instant::now();
                match client
                    .send_batch(request(
                        &tenant,
                        SendBatchRequest {
                            message: Some(base),
                            recipients,
                        },
                    ))
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        errors += (to - from).saturating_sub(r.accepted_count as usize);
                        latencies.push((
                            (started - start).as_secs_f64(),
                            started.elapsed().as_secs_f64() * 1000.0,
                        ));
                        let accepted = r.results.iter().rev().find(|r| r.code == 0);
                        if let Some(a) = accepted {
                            last = later(last, Some((Instant::now(), a.message_id.clone())));
                        }
                    }
                    Err(_) => errors += to - from,
                }
            }
            (latencies, errors, last)
        });
    }
    let mut all = Vec::new();
    let (mut errors, mut last) = (0, None);
    while let Some(Ok((latencies, e, l))) = tasks.join_next().await {
        all.extend(latencies);
        errors += e;
        last = later(last, l);
    }
    (all, errors, last.map(|(_, id)| id))
}

/// At a fixed rate, where the slow requests (over [`SLOW_MS`]) were planned: the
/// [`SLOW_WINDOWS`] 100 ms windows with the most of them, in order. A stall of the server,
/// the database or the machine shows as one window or a few in a row; a p99 made of
/// requests spread over the whole run is a slower path, not a stall.
fn slow_windows(timeline: &[(f64, f64)]) -> serde_json::Value {
    let mut windows: std::collections::BTreeMap<u64, (usize, f64)> = Default::default();
    for &(at, ms) in timeline.iter().filter(|(_, ms)| *ms > SLOW_MS) {
        let w = windows.entry((at * 10.0) as u64).or_default();
        w.0 += 1;
        w.1 = w.1.max(ms);
    }
    let mut worst: Vec<_> = windows.into_iter().collect();
    worst.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    worst.truncate(SLOW_WINDOWS);
    worst.sort_by_key(|(w, _)| *w);
    serde_json::Value::Array(
        worst
            .into_iter()
            .map(|(w, (n, max))| {
                serde_json::json!({"at_s": w as f64 / 10.0, "requests": n, "max_ms": max})
            })
            .collect(),
    )
}

/// A request slower than this counts in `slow_windows`: the fixed-rate target's p99.
const SLOW_MS: f64 = 10.0;
/// How many windows `slow_windows` lists.
const SLOW_WINDOWS: usize = 10;

/// Waits until `expected` messages created since `since` are SENT. Returns when the last of
/// them was seen SENT, and how many times the server was asked.
///
/// Counting the run's emails by status (GetEmailStats) reads every one of them: 35 ms of the
/// database's time at 20,000, and a SendBatch pass used to make about 8 such counts after its
/// last call, a few percent of the two cores taken from the server being measured, with the
/// pass's end known only to within one count. So it first asks only after the email accepted
/// last (`last`, a lookup by key), every [`LAST_EMAIL_POLL`], and counts once that one is
/// SENT: the engine takes emails in the order they were accepted, so by then the rest are
/// normally SENT too. The end is when that count was asked for, if it finds them all; if
/// not (or without `last`), it goes on counting at intervals that follow the remaining work
/// (see [`poll_interval`]).
async fn wait_delivered(
    channel: &Channel,
    tenant: &str,
    since: SystemTime,
    expected: usize,
    last: Option<String>,
) -> anyhow::Result<(Instant, u64)> {
    let mut log = EmailLogServiceClient::new(channel.clone());
    let start = prost_types::Timestamp::from(since - Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut polls = 0;
    if let Some(id) = last {
        loop {
            polls += 1;
            let entry = log
                .get_email_log(request(tenant, GetEmailLogRequest { id: id.clone() }))
                .await?
                .into_inner()
                .entry
                .context("GetEmailLog without an entry")?;
            match EmailStatus::try_from(entry.status) {
                Ok(EmailStatus::Sent) => break,
                Ok(EmailStatus::Failed | EmailStatus::Cancelled) => {
                    bail!("email {id} ended {:?}; see GetEmailLog", entry.status)
                }
                _ if Instant::now() > deadline => bail!("email {id} not SENT after 30 minutes"),
                _ => tokio::time::sleep(LAST_EMAIL_POLL).await,
            }
        }
    }
    loop {
        let asked = Instant::now();
        polls += 1;
        let stats = log
            .get_email_stats(request(
                tenant,
                GetEmailStatsRequest {
                    start_time: Some(start),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        let count = |key: &str| {
            stats
                .by_status
                .iter()
                .find(|c| c.key == key)
                .map_or(0, |c| c.count)
        };
        let (sent, failed) = (count("SENT"), count("FAILED"));
        if sent as usize >= expected {
            return Ok((asked, polls));
        }
        if failed > 0 {
            bail!("{failed} messages FAILED; see ListEmailLogs");
        }
        if Instant::now() > deadline {
            bail!("only {sent} of {expected} SENT after 30 minutes");
        }
        tokio::time::sleep(poll_interval(
            sent as usize,
            expected,
            since.elapsed().unwrap_or_default(),
        ))
        .await;
    }
}

/// How often the email accepted last is looked at while the run's emails are delivered.
const LAST_EMAIL_POLL: Duration = Duration::from_millis(5);

/// The wait before the next poll: a quarter of the time the remaining `expected - sent`
/// messages should take at the rate seen since the run began, within [2 ms, 250 ms].
fn poll_interval(sent: usize, expected: usize, elapsed: Duration) -> Duration {
    let (min, max) = (Duration::from_millis(2), Duration::from_millis(250));
    if sent == 0 {
        return Duration::from_millis(50);
    }
    let remaining = expected.saturating_sub(sent) as f64;
    let rate = sent as f64 / elapsed.as_secs_f64().max(1e-3);
    Duration::from_secs_f64(remaining / rate / 4.0).clamp(min, max)
}

/// One thread: the load generator shares the machine's cores with the server, its database
/// and the SMTP sink, and should take as little of them as it can. On the 2-core benchmark
/// machine, Tokio's default (a worker per core) used about 45 % more CPU per request than
/// one thread, in wake-ups between its workers, and the server delivered about 5 % less
/// (docs/benchmarks.md). At about 17 us of CPU per request, one thread has room for far
/// more requests than the server takes.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = Channel::from_shared(format!("http://{}", args.addr))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let profile_id = setup_profile(&channel, &args).await?;
    let body = body(args.size);
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let (timeline, errors, last) = match args.mode {
        Mode::Unary => unary(&channel, &args, &profile_id, &body).await,
        Mode::Batch => batch(&channel, &args, &profile_id, &body).await,
    };
    let mut latencies: Vec<f64> = timeline.iter().map(|(_, ms)| *ms).collect();
    let accept_seconds = clock.elapsed().as_secs_f64();
    let (delivered, polls) = wait_delivered(
        &channel,
        &args.tenant,
        started_at,
        args.messages - errors,
        last,
    )
    .await?;
    let delivered_seconds = delivered.duration_since(clock).as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let result = serde_json::json!({
        "mode": match args.mode { Mode::Unary => "unary", Mode::Batch => "batch" },
        "messages": args.messages,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "accept_seconds": accept_seconds,
        "accept_rate": args.messages as f64 / accept_seconds,
        "latency_ms": {
            "p50": percentile(&latencies, 50.0),
            "p99": percentile(&latencies, 99.0),
            "p999": percentile(&latencies, 99.9),
            "max": latencies.last().copied().unwrap_or(0.0),
        },
        "delivered_seconds": delivered_seconds,
        "delivered_rate": args.messages as f64 / delivered_seconds,
        "errors": errors,
        "delivery_polls": polls,
        "slow_windows": args.rate.map(|_| slow_windows(&timeline)),
    });
    let text = serde_json::to_string_pretty(&result)?;
    match &args.json {
        Some(path) => std::fs::write(path, &text)?,
        None => println!("{text}"),
    }
    Ok(())
}
