//! Several real processes on one PostgreSQL database share the work without delivering any
//! message twice. (PostgreSQL only: SQLite is one process.)

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mailgate::proto::v1::{
    email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient,
    smtp_config_service_client::SmtpConfigServiceClient, *,
};
use tonic::transport::Channel;

use crate::{
    helpers::{as_tenant, on_postgres, plain_profile, simple_email, TestDatabase},
    smtp_server::{Behavior, TestSmtpServer},
};

struct Replica {
    child: Child,
    addr: String,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(db: &TestDatabase, smtp_port: u16, data: &std::path::Path) -> Replica {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailgate"));
    for (key, _) in
        std::env::vars().filter(|(k, _)| k.starts_with("MAILGATE_") || k.starts_with("OTEL_"))
    {
        command.env_remove(key);
    }
    let mut child = command
        .arg("serve")
        .env("MAILGATE_LISTEN_ADDR", &addr)
        .env("MAILGATE_DATA_DIR", data)
        .env("MAILGATE_DATABASE_URL", &db.url)
        .env("MAILGATE_LOG__FORMAT", "json")
        .env("MAILGATE_SMTP__ALLOWED_NETWORKS", "[\"127.0.0.0/8\"]")
        .env("MAILGATE_SMTP__ALLOWED_PORTS", format!("[{smtp_port}]"))
        // Both replicas share one encryption key, as replicas must.
        .env(
            "MAILGATE_ENCRYPTION__KEY",
            "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=",
        )
        .env("MAILGATE_DELIVERY__CONCURRENCY", "16")
        .env("MAILGATE_DELIVERY__POLL_INTERVAL", "50ms")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut startup = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "replica exited: {startup}"
        );
        startup.push_str(&line);
        if line.contains("mailgate listening") {
            break;
        }
    }
    let log = std::thread::spawn(move || {
        let mut rest = startup;
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    Replica {
        child,
        addr,
        log: Some(log),
    }
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_never_deliver_twice() {
    if !on_postgres() {
        eprintln!("SKIPPED: needs MAILGATE_TEST_DATABASE=postgres");
        return;
    }
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let db = TestDatabase::new().await;
    let a = start_replica(&db, smtp.port, &db.dir.path().join("a"));
    let b = start_replica(&db, smtp.port, &db.dir.path().join("b"));
    let (ca, cb) = (channel(&a.addr).await, channel(&b.addr).await);

    let mut config = SmtpConfigServiceClient::new(ca.clone());
    let created = config
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(plain_profile("main", smtp.port)),
                verify: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let id = created.profile.unwrap().id;
    config
        .activate_smtp_profile(as_tenant(
            "acme",
            ActivateSmtpProfileRequest { id: id.clone() },
        ))
        .await
        .unwrap();

    // Each replica's live tail reports the deliveries it made itself: together they must
    // report every email, which also ends the wait without polling.
    let mut watches = Vec::new();
    for ch in [ca.clone(), cb.clone()] {
        let filter = EmailLogFilter {
            statuses: vec![EmailStatus::Sent.into()],
            ..Default::default()
        };
        watches.push(
            EmailLogServiceClient::new(ch)
                .watch_email_logs(as_tenant(
                    "acme",
                    WatchEmailLogsRequest {
                        filter: Some(filter),
                    },
                ))
                .await
                .unwrap()
                .into_inner(),
        );
    }

    // 400 emails, accepted half by each replica, concurrently.
    const N: usize = 400;
    let mut sends = tokio::task::JoinSet::new();
    for (i, ch) in [ca.clone(), cb.clone()].into_iter().enumerate() {
        let id = id.clone();
        sends.spawn(async move {
            let mut client = SendServiceClient::new(ch);
            for j in 0..N / 2 {
                let mut req = simple_email(&format!("user{i}-{j}@example.com"));
                req.profile_id = id.clone();
                client.send_email(as_tenant("acme", req)).await.unwrap();
            }
        });
    }
    while sends.join_next().await.is_some() {}

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (replica, mut watch) in watches.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(item)) = watch.message().await {
                let _ = tx.send((replica, item.entry.unwrap().id));
            }
        });
    }
    let mut delivered_by = HashMap::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while delivered_by.len() < N {
            let (replica, id) = rx.recv().await.unwrap();
            assert!(
                delivered_by.insert(id, replica).is_none(),
                "one email SENT twice"
            );
        }
    })
    .await
    .expect("all emails SENT in time");
    let by_a = delivered_by.values().filter(|r| **r == 0).count();
    assert!(
        by_a > 0 && by_a < N,
        "both replicas delivered ({by_a} by the first)"
    );

    // Exactly once each on the wire, and both replicas delivered.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in smtp.received() {
        let id = m
            .data
            .lines()
            .find_map(|l| l.strip_prefix("X-Mailgate-Id: "))
            .unwrap()
            .trim()
            .to_owned();
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), N);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");

    for mut r in [a, b] {
        Command::new("kill")
            .args(["-TERM", &r.child.id().to_string()])
            .status()
            .unwrap();
        let log = r.log.take().unwrap();
        let status = tokio::task::spawn_blocking(move || {
            let s = r.child.wait().unwrap();
            drop(r);
            s
        })
        .await
        .unwrap();
        assert!(status.success());
        let log = log.join().unwrap();
        assert!(log.contains("mailgate stopped"), "{log}");
    }
}
