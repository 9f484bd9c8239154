//! Email-log benchmark (`bench/log.sh` runs it on SQLite and PostgreSQL): loads one tenant's
//! log of N entries (plus other tenants' noise) straight into a fresh database, starts mailgate
//! on it, and measures ListEmailLogs and GetEmailStats over gRPC: p50, p99 and max of many
//! calls, with a trivial RPC (ListProviderPresets) measured in the same run as the reference.
//! Prints the query plans and writes JSON.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::Parser;
use mailgate::{
    app::App,
    config::{Config, Secret},
    domain::{EmailAddress, LogFilter, Mailbox, MessageContent, MessageStatus},
    proto::v1::{
        email_log_service_client::EmailLogServiceClient,
        smtp_config_service_client::SmtpConfigServiceClient, *,
    },
    storage::{SqlStore, Store},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sqlx::any::AnyPoolOptions;
use tonic::{metadata::MetadataValue, transport::Channel, Request};

/// Loads a large log and measures its queries.
#[derive(Debug, Parser)]
struct Args {
    /// An empty database: `sqlite://file.db` or `postgres://.../db`.
    #[arg(long)]
    database_url: String,
    /// Entries of the measured tenant.
    #[arg(long, default_value_t = 1_000_000)]
    entries: usize,
    /// Entries of 20 other tenants, together.
    #[arg(long, default_value_t = 200_000)]
    noise: usize,
    /// Calls per measured query.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const TENANT: &str = "big";
const DAYS: i64 = 60;
const RECIPIENTS: usize = 100_000;
const TYPES: [&str; 5] = [
    "notification",
    "welcome",
    "device_authentication",
    "invitation",
    "training",
];
const SOURCES: [&str; 3] = ["billing", "auth", "campaigns"];
const PROFILES: [&str; 3] = [
    "0197a6c1-0000-7000-8000-0000000000a1",
    "0197a6c1-0000-7000-8000-0000000000a2",
    "0197a6c1-0000-7000-8000-0000000000a3",
];

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn recipient(i: usize) -> String {
    format!("user{i}@example.com")
}

/// One row of `messages`, as the loader writes it.
struct Row {
    id: String,
    tenant: String,
    status: MessageStatus,
    source: &'static str,
    email_type: &'static str,
    profile: &'static str,
    to: String,
    content: String,
    created: i64,
}

fn make_row(rng: &mut StdRng, tenant: &str, created: i64) -> anyhow::Result<Row> {
    let to = recipient(rng.random_range(0..RECIPIENTS));
    let status = match rng.random_range(0..100) {
        0..90 => MessageStatus::Sent,
        90..95 => MessageStatus::Failed,
        95..98 => MessageStatus::Deferred,
        _ => MessageStatus::Cancelled,
    };
    let secs = u64::try_from(created / 1_000_000)?;
    let nanos = u32::try_from((created % 1_000_000) * 1000)?;
    let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, nanos));
    let mailbox = |email: &str| -> anyhow::Result<Mailbox> {
        Ok(Mailbox {
            email: EmailAddress::parse("x", email).map_err(|e| anyhow::anyhow!("{e:?}"))?,
            name: String::new(),
        })
    };
    let content = MessageContent {
        from: mailbox("noreply@big.example")?,
        reply_to: None,
        error_to: None,
        to: vec![mailbox(&to)?],
        cc: vec![],
        bcc: vec![],
        subject: format!("Your code is {}", rng.random_range(100_000..999_999)),
        text: Some("Hello,\n\nhere is the notification you asked for. ".repeat(6)),
        html: None,
        headers: vec![],
        attachments: vec![],
    };
    Ok(Row {
        id: id.to_string(),
        tenant: tenant.to_owned(),
        status,
        source: SOURCES[rng.random_range(0..SOURCES.len())],
        email_type: TYPES[rng.random_range(0..TYPES.len())],
        profile: PROFILES[rng.random_range(0..PROFILES.len())],
        to,
        content: serde_json::to_string(&content)?,
        created,
    })
}

/// Writes the rows with multi-row statements, 40,000 rows a transaction.
async fn load(
    url: &str,
    rows: &mut dyn Iterator<Item = anyhow::Result<Row>>,
) -> anyhow::Result<usize> {
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    // SQLite keeps each email's content in `message_contents` (its migration 0011).
    let sqlite = url.starts_with("sqlite:");
    // Content ids go on after those of an earlier load.
    let first_id: i64 = if sqlite {
        sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM message_contents")
            .fetch_one(&pool)
            .await?
    } else {
        0
    };
    let first_id = usize::try_from(first_id)?;
    let mut total = 0;
    let mut chunk = Vec::with_capacity(250);
    let mut tx = pool.begin().await?;
    for row in rows {
        chunk.push(row?);
        if chunk.len() == 250 {
            write_chunk(&mut tx, &chunk, sqlite.then_some(first_id + total)).await?;
            total += chunk.len();
            chunk.clear();
            if total % 40_000 == 0 {
                tx.commit().await?;
                tx = pool.begin().await?;
                eprint!("\r  loaded {total} rows");
            }
        }
    }
    if !chunk.is_empty() {
        write_chunk(&mut tx, &chunk, sqlite.then_some(first_id + total)).await?;
        total += chunk.len();
    }
    tx.commit().await?;
    eprintln!("\r  loaded {total} rows");
    Ok(total)
}

/// `contents_after`: on SQLite, the rows loaded before this chunk; the chunk's contents go
/// into `message_contents` with the next ids, which the rows keep in `content_id`.
async fn write_chunk(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    chunk: &[Row],
    contents_after: Option<usize>,
) -> anyhow::Result<()> {
    if let Some(before) = contents_after {
        let values = (1..=chunk.len())
            .map(|r| format!("(${}, ${})", r * 2 - 1, r * 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("INSERT INTO message_contents (id, content) VALUES {values}");
        let mut query = sqlx::query(&sql);
        for (i, row) in chunk.iter().enumerate() {
            query = query
                .bind(i64::try_from(before + i + 1)?)
                .bind(row.content.clone());
        }
        query.execute(&mut **tx).await?;
    }
    const COLUMNS: usize = 13;
    let values = (0..chunk.len())
        .map(|r| {
            let p: Vec<String> = (1..=COLUMNS)
                .map(|c| format!("${}", r * COLUMNS + c))
                .collect();
            // Constant columns after the first five and the eighth.
            format!(
                "({}, 'Your code', 'noreply@big.example', {}, 'REQUEST', {}, 1)",
                p[..5].join(", "),
                p[5..6].join(", "),
                p[6..].join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let content = if contents_after.is_some() {
        "content_id"
    } else {
        "content"
    };
    let sql = format!(
        "INSERT INTO messages (id, tenant_id, status, source, email_type, subject, sender, \
         profile_id, profile_reason, {content}, message_id_header, request_hash, created_at, \
         updated_at, sent_at, due_at, attempt_count) VALUES {values}"
    );
    let mut query = sqlx::query(&sql);
    for (i, row) in chunk.iter().enumerate() {
        let due = match row.status {
            MessageStatus::Deferred => Some(row.created + 3_600_000_000),
            _ => None,
        };
        let sent = (row.status == MessageStatus::Sent).then_some(row.created + 200_000);
        query = query
            .bind(row.id.clone())
            .bind(row.tenant.clone())
            .bind(row.status.as_str())
            .bind(row.source)
            .bind(row.email_type)
            .bind(row.profile);
        query = match contents_after {
            Some(before) => query.bind(i64::try_from(before + i + 1)?),
            None => query.bind(row.content.clone()),
        };
        query = query
            .bind(format!("<{}@big.example>", row.id))
            .bind(row.id.clone())
            .bind(row.created)
            .bind(row.created + 200_000)
            .bind(sent)
            .bind(due);
    }
    query.execute(&mut **tx).await?;
    let rec = (0..chunk.len())
        .map(|r| format!("(${}, ${}, ${})", r * 3 + 1, r * 3 + 2, r * 3 + 3))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("INSERT INTO message_recipients (tenant_id, email, message_id) VALUES {rec}");
    let mut query = sqlx::query(&sql);
    for row in chunk {
        query = query
            .bind(row.tenant.clone())
            .bind(row.to.clone())
            .bind(row.id.clone());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 divided by the reference RPC's p99 in the same run.
    p99_vs_reference: f64,
}

fn figures(mut samples: Vec<Duration>, reference_p99: f64) -> Figures {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    let p99 = at(0.99);
    Figures {
        p50_ms: at(0.50),
        p99_ms: p99,
        max_ms: at(1.0),
        p99_vs_reference: if reference_p99 > 0.0 {
            p99 / reference_p99
        } else {
            0.0
        },
    }
}

fn request<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("x-tenant-id", MetadataValue::from_static(TENANT));
    r
}

fn ts(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros / 1_000_000,
        nanos: 0,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let now = now_micros();
    let start = now - DAYS * 86_400_000_000;
    let store = SqlStore::connect(&args.database_url, 4)
        .await
        .context("opening the database")?;
    let backend = format!("{:?}", store.backend());
    eprintln!(
        "loading {} + {} entries ({backend})",
        args.entries, args.noise
    );
    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let (n, noise) = (args.entries, args.noise);
    let step = (now - start) / i64::try_from(n.max(1))?;
    let mut rows = (0..n).map(|i| {
        let created = start + step * i64::try_from(i).unwrap_or(0);
        make_row(&mut rng, TENANT, created)
    });
    load(&args.database_url, &mut rows).await?;
    let mut rng = StdRng::seed_from_u64(8);
    let step = (now - start) / i64::try_from(noise.max(1))?;
    let mut rows = (0..noise).map(|i| {
        let created = start + step * i64::try_from(i).unwrap_or(0);
        make_row(&mut rng, &format!("noise-{}", i % 20), created)
    });
    load(&args.database_url, &mut rows).await?;
    let load_s = t.elapsed().as_secs_f64();
    eprintln!("loaded in {load_s:.1} s");
    // Two housekeeping passes: the first starts watching the ended hours, the second rolls
    // them up for GetEmailStats.
    let t = Instant::now();
    store.roll_up_log(now_micros(), 100_000).await?;
    let rolled = store.roll_up_log(now_micros(), 100_000).await?;
    let rollup_s = t.elapsed().as_secs_f64();
    eprintln!("rolled up {rolled} hours in {rollup_s:.1} s");
    // Statistics for the planner, as autovacuum would gather them in a running service.
    let analyze = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    sqlx::query("ANALYZE").execute(&analyze).await?;
    analyze.close().await;

    // mailgate on the loaded database, delivery off (the log is what is measured).
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen_addr: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_owned(),
        database_url: Secret::new(args.database_url.clone()),
        ..Config::default()
    };
    config.delivery.enabled = false;
    let app = App::build(config).await?;
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut log = EmailLogServiceClient::new(channel.clone());
    let mut presets = SmtpConfigServiceClient::new(channel);

    let samples = args.samples;
    let mut timed = Vec::new();
    // Warm up: caches and prepared statements, as in a running service.
    for _ in 0..20 {
        presets
            .list_provider_presets(request(ListProviderPresetsRequest {}))
            .await?;
        log.list_email_logs(request(ListEmailLogsRequest::default()))
            .await?;
    }
    let mut reference = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        presets
            .list_provider_presets(request(ListProviderPresetsRequest {}))
            .await?;
        reference.push(t.elapsed());
    }
    let reference_p99 = figures(reference.clone(), 0.0).p99_ms;
    timed.push(("reference: ListProviderPresets", reference));

    // The first page, and the first page of SENT: the status index leaves SENT out
    // (migration 0014 on PostgreSQL, 0012 on SQLite), so that reads the tenant's newest
    // entries and skips the others.
    let sent_filter = EmailLogFilter {
        statuses: vec![EmailStatus::Sent.into()],
        ..Default::default()
    };
    for (name, filter) in [
        ("ListEmailLogs first page (50)", None),
        ("ListEmailLogs SENT, first page", Some(sent_filter)),
    ] {
        let mut first = Vec::new();
        for _ in 0..samples {
            let t = Instant::now();
            let page = log
                .list_email_logs(request(ListEmailLogsRequest {
                    filter: filter.clone(),
                    page_size: 50,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            first.push(t.elapsed());
            anyhow::ensure!(page.entries.len() == 50, "{name}: page not full");
        }
        timed.push((name, first));
    }

    // A status + time filter, 20 pages deep (1,000 entries in).
    let filter = EmailLogFilter {
        statuses: vec![EmailStatus::Failed.into()],
        start_time: Some(ts(now - 30 * 86_400_000_000)),
        end_time: Some(ts(now)),
        ..Default::default()
    };
    let mut token = String::new();
    for _ in 0..20 {
        token = log
            .list_email_logs(request(ListEmailLogsRequest {
                filter: Some(filter.clone()),
                page_size: 50,
                page_token: token.clone(),
            }))
            .await?
            .into_inner()
            .next_page_token;
    }
    let mut deep = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let page = log
            .list_email_logs(request(ListEmailLogsRequest {
                filter: Some(filter.clone()),
                page_size: 50,
                page_token: token.clone(),
            }))
            .await?
            .into_inner();
        deep.push(t.elapsed());
        anyhow::ensure!(page.entries.len() == 50, "deep page not full");
    }
    timed.push(("ListEmailLogs FAILED, last 30 days, page 21", deep));

    let mut rng = StdRng::seed_from_u64(9);
    let mut by_recipient = Vec::new();
    for _ in 0..samples {
        let who = recipient(rng.random_range(0..RECIPIENTS));
        let t = Instant::now();
        log.list_email_logs(request(ListEmailLogsRequest {
            filter: Some(EmailLogFilter {
                recipient: who,
                ..Default::default()
            }),
            page_size: 50,
            ..Default::default()
        }))
        .await?;
        by_recipient.push(t.elapsed());
    }
    timed.push(("ListEmailLogs by recipient", by_recipient));

    let mut stats = Vec::new();
    let stats_samples = (samples / 4).max(10);
    for _ in 0..stats_samples {
        let t = Instant::now();
        let s = log
            .get_email_stats(request(GetEmailStatsRequest {
                start_time: Some(ts(now - 30 * 86_400_000_000)),
                end_time: Some(ts(now)),
                bucket_width: StatsBucketWidth::Day.into(),
            }))
            .await?
            .into_inner();
        stats.push(t.elapsed());
        anyhow::ensure!(s.total > 0, "no stats");
    }
    timed.push(("GetEmailStats 30 days, day buckets", stats));

    let mut results = BTreeMap::new();
    println!(
        "\n{backend}: {} entries (+{} noise), {samples} calls each",
        n, noise
    );
    println!(
        "{:<46} {:>9} {:>9} {:>9} {:>12}",
        "query", "p50 ms", "p99 ms", "max ms", "p99 / ref"
    );
    for (name, samples) in timed {
        let f = figures(samples, reference_p99);
        println!(
            "{name:<46} {:>9.2} {:>9.2} {:>9.2} {:>11.1}x",
            f.p50_ms, f.p99_ms, f.max_ms, f.p99_vs_reference
        );
        results.insert(name.to_owned(), f);
    }

    // The plans of the same statements.
    let thirty = now - 30 * 86_400_000_000;
    let failed = LogFilter {
        statuses: vec![MessageStatus::Failed],
        start: Some(thirty),
        end: Some(now),
        ..LogFilter::default()
    };
    let sent = LogFilter {
        statuses: vec![MessageStatus::Sent],
        ..LogFilter::default()
    };
    let recipient_filter = LogFilter {
        recipient: Some(recipient(42)),
        ..LogFilter::default()
    };
    // The cursor of page 21, as the measured call used it.
    let deep_cursor = store
        .list_messages(TENANT, &failed, None, 1000)
        .await?
        .last()
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let mut plans = BTreeMap::new();
    for (name, plan) in [
        (
            "first page",
            store
                .explain_list(TENANT, &LogFilter::default(), None, 51)
                .await?,
        ),
        (
            "SENT, first page",
            store.explain_list(TENANT, &sent, None, 51).await?,
        ),
        (
            "status + time, below a cursor",
            store
                .explain_list(TENANT, &failed, Some(&deep_cursor), 51)
                .await?,
        ),
        (
            "recipient",
            store
                .explain_list(TENANT, &recipient_filter, None, 51)
                .await?,
        ),
        (
            "stats, 30 days, day buckets",
            store
                .explain_stats(TENANT, thirty, now, Some(86_400_000_000))
                .await?,
        ),
    ] {
        println!("\nplan: {name}");
        for line in &plan {
            println!("  {line}");
        }
        plans.insert(name.to_owned(), plan);
    }

    let _ = stop.send(());
    server.await??;
    if let Some(out) = args.out {
        let json = serde_json::json!({
            "backend": backend,
            "entries": n,
            "noise": noise,
            "samples": samples,
            "load_seconds": load_s,
            "rollup_seconds": rollup_s,
            "results": results,
            "plans": plans,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
