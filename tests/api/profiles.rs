//! SMTP profiles: create, read, list, validation, secrecy, verification and activation.

use mailgate::proto::v1::*;
use tonic::Code;

use crate::{
    helpers::{as_tenant, plain_profile, TestApp},
    smtp_server::{Behavior, TestSmtpServer},
};

const CANARY: &str = "canary-pw-7f3a9c";

#[tokio::test]
async fn create_get_list_and_never_return_the_password() {
    let app = TestApp::spawn().await;
    let mut client = app.config_client();
    let mut profile = plain_profile("primary", 2525);
    profile.host = "smtp.example.com".into();
    profile.security = SmtpSecurity::Starttls.into();
    profile.username = "mailer@acme.test".into();
    profile.password = CANARY.into();
    profile.auth_mechanism = AuthMechanism::Login.into();
    let created = client
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(profile.clone()),
                verify: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let p = created.profile.unwrap();
    assert!(p.has_password);
    assert!(p.password.is_empty());
    assert_eq!(p.status(), ProfileStatus::Inactive);
    assert_eq!(
        p.verification.as_ref().unwrap().state(),
        VerificationState::Unverified
    );
    assert_eq!(p.created_by, "test-suite");
    assert_eq!(p.version, 1);
    assert!(!format!("{p:?}").contains(CANARY));

    let got = client
        .get_smtp_profile(as_tenant(
            "acme",
            GetSmtpProfileRequest { id: p.id.clone() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{got:?}").contains(CANARY));
    assert_eq!(got.profile.unwrap().host, "smtp.example.com");

    let dup = client
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(profile.clone()),
                verify: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    for name in ["b", "c", "d"] {
        let mut more = plain_profile(name, 2525);
        more.host = "smtp.example.com".into();
        client
            .create_smtp_profile(as_tenant(
                "acme",
                CreateSmtpProfileRequest {
                    profile: Some(more),
                    verify: false,
                },
            ))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_smtp_profiles(as_tenant(
                "acme",
                ListSmtpProfilesRequest {
                    page_size: 3,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        names.extend(page.profiles.into_iter().map(|p| p.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["b", "c", "d", "primary"]);

    // Other tenants see nothing, and a foreign id looks like a missing one.
    let foreign = client
        .get_smtp_profile(as_tenant(
            "globex",
            GetSmtpProfileRequest { id: p.id.clone() },
        ))
        .await
        .unwrap_err();
    let missing = client
        .get_smtp_profile(as_tenant(
            "globex",
            GetSmtpProfileRequest {
                id: "missing".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (foreign.code(), foreign.message()),
        (missing.code(), missing.message())
    );
    let listed = client
        .list_smtp_profiles(as_tenant("globex", ListSmtpProfilesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.profiles.is_empty());
    let activate = client
        .activate_smtp_profile(as_tenant("globex", ActivateSmtpProfileRequest { id: p.id }))
        .await
        .unwrap_err();
    assert_eq!(activate.code(), Code::NotFound);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn validation_names_each_field() {
    let app = TestApp::spawn().await;
    let profile = SmtpProfile {
        name: String::new(),
        host: "smtp://mail.example.com".into(),
        port: 70000,
        from_email: "not an address".into(),
        from_name: "x".repeat(256),
        username: "u".repeat(256),
        password: "p".repeat(256),
        verify_certificate: Some(false),
        ..Default::default()
    };
    let err = app
        .config_client()
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(profile),
                verify: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = err
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for f in [
        "profile.name",
        "profile.host",
        "profile.port",
        "profile.from_email",
        "profile.from_name",
        "profile.username",
        "profile.password",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn activation_requires_a_successful_verification() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut client = app.config_client();
    let p = client
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(plain_profile("p", smtp.port)),
                verify: false,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    let err = client
        .activate_smtp_profile(as_tenant(
            "acme",
            ActivateSmtpProfileRequest { id: p.id.clone() },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let report = client
        .verify_smtp_profile(as_tenant(
            "acme",
            VerifySmtpProfileRequest {
                target: Some(verify_smtp_profile_request::Target::ProfileId(p.id.clone())),
                recipient: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(report.succeeded, "{report:#?}");
    let stages: Vec<_> = report.stages.iter().map(|s| s.stage()).collect();
    assert_eq!(
        stages,
        [
            VerificationStage::Dns,
            VerificationStage::Connect,
            VerificationStage::Greeting,
            VerificationStage::MailFrom,
            VerificationStage::RcptTo
        ]
    );
    assert!(smtp.received().is_empty(), "verification sends no email");
    let active = client
        .activate_smtp_profile(as_tenant(
            "acme",
            ActivateSmtpProfileRequest { id: p.id.clone() },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(active.status(), ProfileStatus::Active);
    assert_eq!(
        active.verification.unwrap().state(),
        VerificationState::Verified
    );
    let inactive = client
        .deactivate_smtp_profile(as_tenant("acme", DeactivateSmtpProfileRequest { id: p.id }))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(inactive.status(), ProfileStatus::Inactive);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn verification_explains_failures_and_create_with_verify_saves_nothing() {
    // A port nobody listens on: bind one, then close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let app = TestApp::spawn().await;
    let mut client = app.config_client();
    let created = client
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(plain_profile("down", port)),
                verify: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        created.profile.is_none(),
        "not saved when verification fails"
    );
    let report = created.verification.unwrap();
    assert!(!report.succeeded);
    let failed = report
        .stages
        .iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap();
    assert_eq!(failed.stage(), VerificationStage::Connect);
    assert!(
        failed.hint.contains("connection refused"),
        "{}",
        failed.hint
    );
    assert!(report
        .stages
        .iter()
        .any(|s| s.status() == StageStatus::Skipped));
    let listed = client
        .list_smtp_profiles(as_tenant("acme", ListSmtpProfilesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.profiles.is_empty());

    let smtp = TestSmtpServer::start(Behavior {
        reject_rcpt: vec!["noreply@acme.test".into()],
        ..Behavior::default()
    })
    .await;
    let report = client
        .verify_smtp_profile(as_tenant(
            "acme",
            VerifySmtpProfileRequest {
                target: Some(verify_smtp_profile_request::Target::Settings(
                    plain_profile("x", smtp.port),
                )),
                recipient: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    let failed = report
        .stages
        .iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap();
    assert_eq!(failed.stage(), VerificationStage::RcptTo);
    assert_eq!(failed.reply_code, 550);
    assert!(failed.hint.contains("recipient"), "{}", failed.hint);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn ssrf_guard_refuses_private_destinations_uniformly() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    // No allow-listed network: loopback is refused, with the same answer as any private target.
    let app = TestApp::spawn_with(|c| c.smtp.allowed_networks.clear()).await;
    let mut client = app.config_client();
    let mut details = Vec::new();
    for host in ["127.0.0.1", "10.0.0.1", "169.254.169.254"] {
        let mut settings = plain_profile("x", smtp.port);
        settings.host = host.into();
        let report = client
            .verify_smtp_profile(as_tenant(
                "acme",
                VerifySmtpProfileRequest {
                    target: Some(verify_smtp_profile_request::Target::Settings(settings)),
                    recipient: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .report
            .unwrap();
        let failed = report
            .stages
            .iter()
            .find(|s| s.status() == StageStatus::Failed)
            .unwrap();
        assert_eq!(failed.stage(), VerificationStage::Dns);
        details.push((failed.detail.clone(), failed.hint.clone()));
    }
    assert!(details.windows(2).all(|w| w[0] == w[1]), "{details:?}");
    assert!(!details[0].0.contains("127.0.0.1"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn provider_presets_are_listed() {
    let app = TestApp::spawn().await;
    let presets = app
        .config_client()
        .list_provider_presets(as_tenant("acme", ListProviderPresetsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .presets;
    let m365 = presets
        .iter()
        .find(|p| p.provider() == Provider::Microsoft365)
        .unwrap();
    assert_eq!((m365.host.as_str(), m365.port), ("smtp.office365.com", 587));
    let gmail = presets
        .iter()
        .find(|p| p.provider() == Provider::Gmail)
        .unwrap();
    assert!(gmail.hint.contains("app password"));
    assert_eq!(presets.len(), 10);
    app.stop().await.unwrap();
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test]
async fn update_with_field_mask_resets_verification_on_connection_changes() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let id = app
        .active_profile("acme", plain_profile("p", smtp.port))
        .await;
    let mut client = app.config_client();

    // A sender-only change keeps the profile active and verified.
    let input = SmtpProfile {
        id: id.clone(),
        from_name: "Acme Support".into(),
        host: "ignored.example".into(),
        ..Default::default()
    };
    let p = client
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(input),
                update_mask: mask(&["from_name"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        (p.from_name.as_str(), p.host.as_str()),
        ("Acme Support", "127.0.0.1")
    );
    assert_eq!(p.status(), ProfileStatus::Active);
    assert_eq!(p.version, 3, "create (verified), activate, update");

    // A connection change without verify takes it out of service until verified again.
    let input = SmtpProfile {
        id: id.clone(),
        port: 2525,
        ..Default::default()
    };
    let p = client
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(input.clone()),
                update_mask: mask(&["port"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(p.port, 2525);
    assert_eq!(p.status(), ProfileStatus::Inactive);
    assert_eq!(
        p.verification.unwrap().state(),
        VerificationState::Unverified
    );

    // With verify, a failing change is not saved.
    let bad = SmtpProfile {
        id: id.clone(),
        port: 1,
        ..Default::default()
    };
    let answer = client
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(bad),
                update_mask: mask(&["port"]),
                verify: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.profile.is_none() && !answer.verification.unwrap().succeeded);

    // Optimistic concurrency and bad masks.
    let stale = client
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(input.clone()),
                update_mask: mask(&["port"]),
                expected_version: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let unknown = client
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(input.clone()),
                update_mask: mask(&["status"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    let foreign = client
        .update_smtp_profile(as_tenant(
            "globex",
            UpdateSmtpProfileRequest {
                profile: Some(input),
                update_mask: mask(&["port"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);

    client
        .delete_smtp_profile(as_tenant(
            "acme",
            DeleteSmtpProfileRequest {
                id: id.clone(),
                force: false,
            },
        ))
        .await
        .unwrap();
    let gone = client
        .get_smtp_profile(as_tenant("acme", GetSmtpProfileRequest { id: id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = client
        .delete_smtp_profile(as_tenant(
            "acme",
            DeleteSmtpProfileRequest { id, force: false },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn tenant_settings_route_to_the_default_profile() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut client = app.config_client();
    let empty = client
        .get_tenant_settings(as_tenant("acme", GetTenantSettingsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert!(empty.default_profile_id.is_empty());

    let bad = client
        .update_tenant_settings(as_tenant(
            "acme",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    gateway_url: "gateway.example.com".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["gateway_url"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let id = app
        .active_profile("acme", plain_profile("default", smtp.port))
        .await;
    let saved = client
        .update_tenant_settings(as_tenant(
            "acme",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    gateway_url: "https://gw.acme.test".into(),
                    default_profile_id: id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["gateway_url", "default_profile_id"]),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(saved.gateway_url, "https://gw.acme.test");
    // Another tenant cannot make acme's profile its default.
    let foreign = client
        .update_tenant_settings(as_tenant(
            "globex",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    default_profile_id: id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["default_profile_id"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);

    let (msg, status) = app
        .send_and_settle("acme", crate::helpers::simple_email("bob@example.com"))
        .await;
    assert_eq!(status, mailgate::domain::MessageStatus::Sent);
    let entry = app.log_entry("acme", &msg).await;
    assert_eq!(entry.profile_reason(), ProfileReason::TenantDefault);
    assert_eq!(entry.profile_id, id);
    assert_eq!(smtp.received().len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn send_test_email_reports_and_logs() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut client = app.config_client();
    let answer = client
        .send_test_email(as_tenant(
            "acme",
            SendTestEmailRequest {
                target: Some(send_test_email_request::Target::Settings(plain_profile(
                    "t", smtp.port,
                ))),
                to: "ops@acme.test".into(),
                subject: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let report = answer.report.unwrap();
    assert!(report.succeeded, "{report:#?}");
    assert_eq!(
        report.stages.last().unwrap().stage(),
        VerificationStage::Data
    );
    let received = smtp.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].data.contains("Subject: mailgate test email"));
    let entry = app.log_entry("acme", &answer.message_id).await;
    assert_eq!(entry.email_type, "test");
    assert_eq!(entry.status(), EmailStatus::Sent);

    smtp.set_behavior(Behavior {
        data_reply: "554 5.7.1 rejected".into(),
        ..Behavior::default()
    });
    let answer = client
        .send_test_email(as_tenant(
            "acme",
            SendTestEmailRequest {
                target: Some(send_test_email_request::Target::Settings(plain_profile(
                    "t", smtp.port,
                ))),
                to: "ops@acme.test".into(),
                subject: "check".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let report = answer.report.unwrap();
    let failed = report
        .stages
        .iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap();
    assert_eq!(
        (failed.stage(), failed.reply_code),
        (VerificationStage::Data, 554)
    );
    assert_eq!(
        app.log_entry("acme", &answer.message_id).await.status(),
        EmailStatus::Failed
    );
    let bad = client
        .send_test_email(as_tenant(
            "acme",
            SendTestEmailRequest {
                target: Some(send_test_email_request::Target::ProfileId("nope".into())),
                to: "ops@acme.test".into(),
                subject: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::NotFound);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn rekey_moves_every_secret_to_the_new_key() {
    use base64::Engine as _;
    let key = |b: u8| {
        mailgate::config::Secret::new(base64::engine::general_purpose::STANDARD.encode([b; 32]))
    };
    let db = crate::helpers::TestDatabase::new().await;
    let mut config = crate::helpers::test_config(&db);
    config.encryption.key = key(1);
    config.encryption.key_id = "old".into();
    let app = TestApp::spawn_on(&db, config.clone()).await;
    let mut profile = plain_profile("p", 2525);
    profile.host = "smtp.example.com".into();
    profile.security = SmtpSecurity::Starttls.into();
    profile.username = "u@acme.test".into();
    profile.password = CANARY.into();
    app.config_client()
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(profile),
                verify: false,
            },
        ))
        .await
        .unwrap();
    app.stop().await.unwrap();

    config.encryption.key = key(2);
    config.encryption.key_id = "new".into();
    // Without the old key the secret cannot be opened: rekey refuses rather than losing it.
    assert!(mailgate::app::rekey(&config).await.is_err());
    config.encryption.previous_keys = vec![mailgate::config::PreviousKey {
        id: "old".into(),
        key: key(1),
    }];
    assert_eq!(mailgate::app::rekey(&config).await.unwrap(), 1);
    assert_eq!(
        mailgate::app::rekey(&config).await.unwrap(),
        0,
        "idempotent"
    );

    let store = mailgate::storage::SqlStore::connect(&db.url, 1)
        .await
        .unwrap();
    let secrets = store.all_profile_secrets().await.unwrap();
    assert_eq!(secrets.len(), 1);
    let (tenant, id, sealed) = &secrets[0];
    assert!(sealed.starts_with("v1:new:") && !sealed.contains(CANARY));
    config.encryption.previous_keys.clear();
    let only_new = mailgate::app::secrets(&config).unwrap();
    assert_eq!(
        only_new
            .open(sealed, &mailgate::delivery::secret_context(tenant, id))
            .unwrap(),
        CANARY
    );
}

#[tokio::test]
async fn verification_reports_missing_starttls_and_refused_sender() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let verify = |settings: SmtpProfile| {
        let mut client = app.config_client();
        async move {
            client
                .verify_smtp_profile(as_tenant(
                    "acme",
                    VerifySmtpProfileRequest {
                        target: Some(verify_smtp_profile_request::Target::Settings(settings)),
                        recipient: String::new(),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .report
                .unwrap()
        }
    };
    // The test server offers no STARTTLS: a STARTTLS profile must fail, never fall back to plain.
    let mut starttls = plain_profile("x", smtp.port);
    starttls.security = SmtpSecurity::Starttls.into();
    let report = verify(starttls).await;
    let failed = report
        .stages
        .iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap();
    assert_eq!(failed.stage(), VerificationStage::Tls);
    assert!(
        failed.hint.contains("does not offer STARTTLS"),
        "{}",
        failed.hint
    );
    assert!(
        report.capabilities.iter().any(|c| c == "8BITMIME"),
        "{:?}",
        report.capabilities
    );

    smtp.set_behavior(Behavior {
        reject_mail_from: true,
        ..Behavior::default()
    });
    let report = verify(plain_profile("x", smtp.port)).await;
    let failed = report
        .stages
        .iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap();
    assert_eq!(
        (failed.stage(), failed.reply_code),
        (VerificationStage::MailFrom, 553)
    );
    assert!(
        failed.hint.contains("refused the sender"),
        "{}",
        failed.hint
    );
    assert!(failed.detail.contains("not owned by user"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn shared_profiles_are_usable_but_not_readable_by_grantees() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut profile = plain_profile("shared", smtp.port);
    profile.shared_with = vec!["globex".into()];
    let id = app.active_profile("acme", profile).await;
    let mut config = app.config_client();

    // Not readable or changeable by the grantee: exactly like a missing profile.
    let read = config
        .get_smtp_profile(as_tenant(
            "globex",
            GetSmtpProfileRequest { id: id.clone() },
        ))
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::NotFound);
    let listed = config
        .list_smtp_profiles(as_tenant("globex", ListSmtpProfilesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.profiles.is_empty());
    let verify = config
        .verify_smtp_profile(as_tenant(
            "globex",
            VerifySmtpProfileRequest {
                target: Some(verify_smtp_profile_request::Target::ProfileId(id.clone())),
                recipient: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(verify.code(), Code::NotFound);
    let delete = config
        .delete_smtp_profile(as_tenant(
            "globex",
            DeleteSmtpProfileRequest {
                id: id.clone(),
                force: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::NotFound);

    // Usable: send through it, and bind it as the tenant default.
    let mut req = crate::helpers::simple_email("bob@example.com");
    req.profile_id = id.clone();
    let (msg, status) = app.send_and_settle("globex", req).await;
    assert_eq!(status, mailgate::domain::MessageStatus::Sent);
    assert_eq!(app.log_entry("globex", &msg).await.profile_id, id);
    config
        .update_tenant_settings(as_tenant(
            "globex",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    default_profile_id: id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["default_profile_id"]),
            },
        ))
        .await
        .unwrap();

    // A tenant it is not shared with cannot use it.
    let mut req = crate::helpers::simple_email("bob@example.com");
    req.profile_id = id.clone();
    let denied = app
        .send_client()
        .send_email(as_tenant("initech", req))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::NotFound);

    let bad = SmtpProfile {
        id: id.clone(),
        shared_with: vec!["not a tenant".into()],
        ..Default::default()
    };
    let err = config
        .update_smtp_profile(as_tenant(
            "acme",
            UpdateSmtpProfileRequest {
                profile: Some(bad),
                update_mask: mask(&["shared_with"]),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    app.stop().await.unwrap();
}
