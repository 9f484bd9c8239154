//! Access control over the real server: every RPC of every service called as no key, a bad
//! key, another tenant's key, a member where an admin is needed, a service key without tenant
//! metadata, and the right key; tenant isolation of object ids; members reading only their
//! own emails; sharing only by operators; request limits; TLS and mutual TLS.

use mailgate::{
    auth::{new_key, ApiKeyConfig, Role},
    config::Config,
    proto::v1::{
        campaign_service_client::CampaignServiceClient,
        email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient,
        smtp_config_service_client::SmtpConfigServiceClient,
        template_service_client::TemplateServiceClient, *,
    },
};
use tonic::{
    metadata::MetadataValue, transport::Channel, Code, IntoRequest, Request, Response, Status,
};

use crate::{
    external::TestPki,
    helpers::{plain_profile, simple_email, TestApp},
    smtp_server::{Behavior, TestSmtpServer},
};

/// The keys of the test: name, role, bound tenant.
const KEYS: [(&str, Role, &str); 6] = [
    ("acme-admin", Role::Admin, "acme"),
    ("acme-member", Role::Member, "acme"),
    ("acme-other-member", Role::Member, "acme"),
    ("globex-admin", Role::Admin, "globex"),
    ("billing", Role::Service, ""),
    ("reseller", Role::Operator, ""),
];

struct Keys {
    tokens: Vec<(String, String)>,
    entries: Vec<ApiKeyConfig>,
}

impl Keys {
    fn new() -> Self {
        let mut tokens = Vec::new();
        let mut entries = Vec::new();
        for (name, role, tenant) in KEYS {
            let key = new_key(name, role, tenant);
            tokens.push((name.to_owned(), key.token));
            entries.push(key.entry);
        }
        Self { tokens, entries }
    }

    fn token(&self, name: &str) -> &str {
        &self.tokens.iter().find(|(n, _)| n == name).unwrap().1
    }
}

async fn app_with_keys(keys: &Keys, adjust: impl FnOnce(&mut Config)) -> TestApp {
    let entries = keys.entries.clone();
    TestApp::spawn_with(move |c| {
        c.auth.keys = entries;
        adjust(c);
    })
    .await
}

/// Who calls: the `authorization` value and the `x-tenant-id` value, each optional.
#[derive(Clone, Debug)]
struct As {
    authorization: Option<String>,
    tenant: Option<&'static str>,
}

impl As {
    fn key(keys: &Keys, name: &str, tenant: Option<&'static str>) -> Self {
        Self {
            authorization: Some(format!("Bearer {}", keys.token(name))),
            tenant,
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = message.into_request();
        if let Some(a) = &self.authorization {
            request.metadata_mut().insert(
                "authorization",
                MetadataValue::try_from(a.as_str()).unwrap(),
            );
        }
        if let Some(t) = self.tenant {
            request
                .metadata_mut()
                .insert("x-tenant-id", MetadataValue::from_static(t));
        }
        request
    }
}

fn code<T>(result: Result<Response<T>, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every RPC of the public API, with the code the right key gets for the request sent, and
/// whether it needs an admin (members are refused).
const RPCS: [(&str, Code, bool); 32] = [
    ("SendService/SendEmail", Code::Ok, false),
    ("SendService/SendBatch", Code::InvalidArgument, false),
    ("SendService/CancelEmail", Code::NotFound, false),
    ("SendService/RetryEmail", Code::NotFound, false),
    ("SendService/RequeueEmails", Code::Ok, true),
    ("EmailLogService/ListEmailLogs", Code::Ok, false),
    ("EmailLogService/GetEmailLog", Code::NotFound, false),
    ("EmailLogService/WatchEmailLogs", Code::Ok, false),
    ("EmailLogService/GetEmailStats", Code::InvalidArgument, true),
    (
        "TemplateService/CreateEmailTemplate",
        Code::InvalidArgument,
        true,
    ),
    ("TemplateService/GetEmailTemplate", Code::NotFound, false),
    ("TemplateService/ListEmailTemplates", Code::Ok, false),
    (
        "TemplateService/UpdateEmailTemplate",
        Code::InvalidArgument,
        true,
    ),
    ("TemplateService/DeleteEmailTemplate", Code::NotFound, true),
    (
        "TemplateService/RenderTemplate",
        Code::InvalidArgument,
        false,
    ),
    (
        "CampaignService/CreateCampaign",
        Code::InvalidArgument,
        true,
    ),
    ("CampaignService/GetCampaign", Code::NotFound, false),
    ("CampaignService/ListCampaigns", Code::Ok, false),
    (
        "CampaignService/UpdateCampaign",
        Code::InvalidArgument,
        true,
    ),
    ("CampaignService/DeleteCampaign", Code::NotFound, true),
    (
        "SmtpConfigService/CreateSmtpProfile",
        Code::InvalidArgument,
        true,
    ),
    ("SmtpConfigService/GetSmtpProfile", Code::NotFound, true),
    ("SmtpConfigService/ListSmtpProfiles", Code::Ok, true),
    (
        "SmtpConfigService/UpdateSmtpProfile",
        Code::InvalidArgument,
        true,
    ),
    ("SmtpConfigService/DeleteSmtpProfile", Code::NotFound, true),
    (
        "SmtpConfigService/ActivateSmtpProfile",
        Code::NotFound,
        true,
    ),
    (
        "SmtpConfigService/DeactivateSmtpProfile",
        Code::NotFound,
        true,
    ),
    (
        "SmtpConfigService/VerifySmtpProfile",
        Code::InvalidArgument,
        true,
    ),
    (
        "SmtpConfigService/SendTestEmail",
        Code::InvalidArgument,
        true,
    ),
    ("SmtpConfigService/ListProviderPresets", Code::Ok, false),
    ("SmtpConfigService/GetTenantSettings", Code::Ok, true),
    (
        "SmtpConfigService/UpdateTenantSettings",
        Code::InvalidArgument,
        true,
    ),
];

/// Calls `rpc` as `who` with a small request; returns the answer's code.
async fn call(channel: &Channel, rpc: &str, who: &As) -> Code {
    let ch = || channel.clone();
    let missing = || "0197a6c1-0000-7000-8000-000000000000".to_owned();
    match rpc {
        "SendService/SendEmail" => code(
            SendServiceClient::new(ch())
                .send_email(who.request(simple_email("bob@example.com")))
                .await,
        ),
        "SendService/SendBatch" => code(
            SendServiceClient::new(ch())
                .send_batch(who.request(SendBatchRequest::default()))
                .await,
        ),
        "SendService/CancelEmail" => code(
            SendServiceClient::new(ch())
                .cancel_email(who.request(CancelEmailRequest {
                    message_id: missing(),
                }))
                .await,
        ),
        "SendService/RetryEmail" => code(
            SendServiceClient::new(ch())
                .retry_email(who.request(RetryEmailRequest {
                    message_id: missing(),
                }))
                .await,
        ),
        "SendService/RequeueEmails" => code(
            SendServiceClient::new(ch())
                .requeue_emails(who.request(RequeueEmailsRequest::default()))
                .await,
        ),
        "EmailLogService/ListEmailLogs" => code(
            EmailLogServiceClient::new(ch())
                .list_email_logs(who.request(ListEmailLogsRequest::default()))
                .await,
        ),
        "EmailLogService/GetEmailLog" => code(
            EmailLogServiceClient::new(ch())
                .get_email_log(who.request(GetEmailLogRequest { id: missing() }))
                .await,
        ),
        "EmailLogService/WatchEmailLogs" => code(
            EmailLogServiceClient::new(ch())
                .watch_email_logs(who.request(WatchEmailLogsRequest::default()))
                .await,
        ),
        "EmailLogService/GetEmailStats" => code(
            EmailLogServiceClient::new(ch())
                .get_email_stats(who.request(GetEmailStatsRequest::default()))
                .await,
        ),
        "TemplateService/CreateEmailTemplate" => code(
            TemplateServiceClient::new(ch())
                .create_email_template(who.request(CreateEmailTemplateRequest::default()))
                .await,
        ),
        "TemplateService/GetEmailTemplate" => code(
            TemplateServiceClient::new(ch())
                .get_email_template(who.request(GetEmailTemplateRequest { id: missing() }))
                .await,
        ),
        "TemplateService/ListEmailTemplates" => code(
            TemplateServiceClient::new(ch())
                .list_email_templates(who.request(ListEmailTemplatesRequest::default()))
                .await,
        ),
        "TemplateService/UpdateEmailTemplate" => code(
            TemplateServiceClient::new(ch())
                .update_email_template(who.request(UpdateEmailTemplateRequest::default()))
                .await,
        ),
        "TemplateService/DeleteEmailTemplate" => code(
            TemplateServiceClient::new(ch())
                .delete_email_template(who.request(DeleteEmailTemplateRequest { id: missing() }))
                .await,
        ),
        "TemplateService/RenderTemplate" => code(
            TemplateServiceClient::new(ch())
                .render_template(who.request(RenderTemplateRequest::default()))
                .await,
        ),
        "CampaignService/CreateCampaign" => code(
            CampaignServiceClient::new(ch())
                .create_campaign(who.request(CreateCampaignRequest::default()))
                .await,
        ),
        "CampaignService/GetCampaign" => code(
            CampaignServiceClient::new(ch())
                .get_campaign(who.request(GetCampaignRequest { id: missing() }))
                .await,
        ),
        "CampaignService/ListCampaigns" => code(
            CampaignServiceClient::new(ch())
                .list_campaigns(who.request(ListCampaignsRequest::default()))
                .await,
        ),
        "CampaignService/UpdateCampaign" => code(
            CampaignServiceClient::new(ch())
                .update_campaign(who.request(UpdateCampaignRequest::default()))
                .await,
        ),
        "CampaignService/DeleteCampaign" => code(
            CampaignServiceClient::new(ch())
                .delete_campaign(who.request(DeleteCampaignRequest { id: missing() }))
                .await,
        ),
        "SmtpConfigService/CreateSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .create_smtp_profile(who.request(CreateSmtpProfileRequest::default()))
                .await,
        ),
        "SmtpConfigService/GetSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .get_smtp_profile(who.request(GetSmtpProfileRequest { id: missing() }))
                .await,
        ),
        "SmtpConfigService/ListSmtpProfiles" => code(
            SmtpConfigServiceClient::new(ch())
                .list_smtp_profiles(who.request(ListSmtpProfilesRequest::default()))
                .await,
        ),
        "SmtpConfigService/UpdateSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .update_smtp_profile(who.request(UpdateSmtpProfileRequest::default()))
                .await,
        ),
        "SmtpConfigService/DeleteSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .delete_smtp_profile(who.request(DeleteSmtpProfileRequest {
                    id: missing(),
                    ..Default::default()
                }))
                .await,
        ),
        "SmtpConfigService/ActivateSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .activate_smtp_profile(who.request(ActivateSmtpProfileRequest { id: missing() }))
                .await,
        ),
        "SmtpConfigService/DeactivateSmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .deactivate_smtp_profile(
                    who.request(DeactivateSmtpProfileRequest { id: missing() }),
                )
                .await,
        ),
        "SmtpConfigService/VerifySmtpProfile" => code(
            SmtpConfigServiceClient::new(ch())
                .verify_smtp_profile(who.request(VerifySmtpProfileRequest::default()))
                .await,
        ),
        "SmtpConfigService/SendTestEmail" => code(
            SmtpConfigServiceClient::new(ch())
                .send_test_email(who.request(SendTestEmailRequest::default()))
                .await,
        ),
        "SmtpConfigService/ListProviderPresets" => code(
            SmtpConfigServiceClient::new(ch())
                .list_provider_presets(who.request(ListProviderPresetsRequest::default()))
                .await,
        ),
        "SmtpConfigService/GetTenantSettings" => code(
            SmtpConfigServiceClient::new(ch())
                .get_tenant_settings(who.request(GetTenantSettingsRequest::default()))
                .await,
        ),
        "SmtpConfigService/UpdateTenantSettings" => code(
            SmtpConfigServiceClient::new(ch())
                .update_tenant_settings(who.request(UpdateTenantSettingsRequest::default()))
                .await,
        ),
        other => panic!("no call for {other}"),
    }
}

#[tokio::test]
async fn every_rpc_answers_each_kind_of_caller_with_the_right_code() {
    let keys = Keys::new();
    let app = app_with_keys(&keys, |_| {}).await;
    let cases: Vec<(&str, As, Option<Code>)> = vec![
        (
            "no key",
            As {
                authorization: None,
                tenant: Some("acme"),
            },
            Some(Code::Unauthenticated),
        ),
        (
            "a bad key",
            As {
                authorization: Some("Bearer mgk_not-a-key-anyone-was-given".into()),
                tenant: Some("acme"),
            },
            Some(Code::Unauthenticated),
        ),
        (
            "not a bearer token",
            As {
                authorization: Some(format!("Basic {}", keys.token("acme-admin"))),
                tenant: Some("acme"),
            },
            Some(Code::Unauthenticated),
        ),
        (
            "a key of another tenant",
            As::key(&keys, "globex-admin", Some("acme")),
            Some(Code::PermissionDenied),
        ),
        (
            "a service key without tenant metadata",
            As::key(&keys, "billing", None),
            Some(Code::InvalidArgument),
        ),
        // None: the RPC's own answer for the right caller (or PERMISSION_DENIED for a member
        // where an admin is needed).
        ("a member", As::key(&keys, "acme-member", None), None),
        (
            "the tenant's admin",
            As::key(&keys, "acme-admin", None),
            None,
        ),
        (
            "the tenant's admin naming its tenant",
            As::key(&keys, "acme-admin", Some("acme")),
            None,
        ),
        (
            "a service key for the tenant",
            As::key(&keys, "billing", Some("acme")),
            None,
        ),
        (
            "an operator key for the tenant",
            As::key(&keys, "reseller", Some("acme")),
            None,
        ),
    ];
    let mut wrong = Vec::new();
    for (rpc, right, admin_only) in RPCS {
        for (label, who, expected) in &cases {
            let expected = match expected {
                Some(code) => *code,
                None if *label == "a member" && admin_only => Code::PermissionDenied,
                None => right,
            };
            let got = call(&app.channel, rpc, who).await;
            if got != expected {
                wrong.push(format!("{rpc} as {label}: {got:?}, expected {expected:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Health and reflection stay public (probes, grpcurl list).
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no key");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn another_tenants_object_id_is_not_found_exactly_like_a_missing_one() {
    let keys = Keys::new();
    let app = app_with_keys(&keys, |_| {}).await;
    let acme = As::key(&keys, "acme-admin", None);
    let globex = As::key(&keys, "globex-admin", None);
    let mut templates = TemplateServiceClient::new(app.channel.clone());
    let created = templates
        .create_email_template(acme.request(CreateEmailTemplateRequest {
            template: Some(EmailTemplate {
                name: "welcome".into(),
                subject: "Hi".into(),
                text_body: "Hello".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    let theirs = templates
        .get_email_template(globex.request(GetEmailTemplateRequest {
            id: created.id.clone(),
        }))
        .await
        .unwrap_err();
    let missing = templates
        .get_email_template(globex.request(GetEmailTemplateRequest {
            id: "0197a6c1-0000-7000-8000-000000000000".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(theirs.message(), missing.message());
    // A service key acting for globex gets the same answer.
    let service = As::key(&keys, "billing", Some("globex"));
    let by_service = templates
        .get_email_template(service.request(GetEmailTemplateRequest { id: created.id }))
        .await
        .unwrap_err();
    assert_eq!(by_service.code(), Code::NotFound);
    assert_eq!(by_service.message(), missing.message());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn members_read_and_manage_only_the_emails_they_sent() {
    let keys = Keys::new();
    let app = app_with_keys(&keys, |c| c.delivery.enabled = false).await;
    let member = As::key(&keys, "acme-member", None);
    let other_member = As::key(&keys, "acme-other-member", None);
    let admin = As::key(&keys, "acme-admin", None);
    let mut send = SendServiceClient::new(app.channel.clone());
    let mut log = EmailLogServiceClient::new(app.channel.clone());
    let mut later = simple_email("bob@example.com");
    later.send_at = Some(prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    });
    let mine = send
        .send_email(member.request(later.clone()))
        .await
        .unwrap()
        .into_inner()
        .message_id;
    let theirs = send
        .send_email(other_member.request(later))
        .await
        .unwrap()
        .into_inner()
        .message_id;
    let listed = log
        .list_email_logs(member.request(ListEmailLogsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, mine);
    assert_eq!(
        listed[0].source, "acme-member",
        "the key's name is the source"
    );
    let asked_for_other = log
        .list_email_logs(member.request(ListEmailLogsRequest {
            filter: Some(EmailLogFilter {
                source: "acme-other-member".into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(asked_for_other.code(), Code::PermissionDenied);
    let hidden = log
        .get_email_log(member.request(GetEmailLogRequest { id: theirs.clone() }))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let cancel = send
        .cancel_email(member.request(CancelEmailRequest {
            message_id: theirs.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        cancel.code(),
        Code::NotFound,
        "cannot cancel another's email"
    );
    send.cancel_email(member.request(CancelEmailRequest {
        message_id: mine.clone(),
    }))
    .await
    .expect("cancels its own");
    let all = log
        .list_email_logs(admin.request(ListEmailLogsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(all.len(), 2, "the admin reads the whole tenant's log");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn only_operators_share_profiles_and_shared_profiles_are_usable_not_readable() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let keys = Keys::new();
    let app = app_with_keys(&keys, |_| {}).await;
    let admin = As::key(&keys, "acme-admin", None);
    let operator = As::key(&keys, "reseller", Some("acme"));
    let globex = As::key(&keys, "globex-admin", None);
    let mut config = SmtpConfigServiceClient::new(app.channel.clone());
    let mut shared = plain_profile("shared", smtp.port);
    shared.shared_with = vec!["globex".into()];
    let refused = config
        .create_smtp_profile(admin.request(CreateSmtpProfileRequest {
            profile: Some(shared.clone()),
            verify: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("shared_with"), "{refused:?}");
    let created = config
        .create_smtp_profile(operator.request(CreateSmtpProfileRequest {
            profile: Some(shared),
            verify: true,
        }))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    config
        .activate_smtp_profile(operator.request(ActivateSmtpProfileRequest {
            id: created.id.clone(),
        }))
        .await
        .unwrap();
    let read = config
        .get_smtp_profile(globex.request(GetSmtpProfileRequest {
            id: created.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::NotFound, "shared is not readable");
    let mut email = simple_email("bob@example.com");
    email.profile_id = created.id;
    SendServiceClient::new(app.channel.clone())
        .send_email(globex.request(email))
        .await
        .expect("shared is usable");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn request_limits_name_the_limit_and_the_send_rate_says_when_to_retry() {
    let keys = Keys::new();
    let app = app_with_keys(&keys, |c| {
        c.delivery.enabled = false;
        c.limits.max_recipients = 2;
        c.limits.max_request_bytes = 64 * 1024;
        c.limits.send_calls_per_second = 1;
        c.limits.send_burst = 3;
    })
    .await;
    let admin = As::key(&keys, "acme-admin", None);
    let mut send = SendServiceClient::new(app.channel.clone());
    let mut many = simple_email("a@example.com");
    many.cc = vec![
        Mailbox {
            email: "b@example.com".into(),
            name: String::new(),
        },
        Mailbox {
            email: "c@example.com".into(),
            name: String::new(),
        },
    ];
    let err = send.send_email(admin.request(many)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 2 recipients"), "{err:?}");
    let mut big = simple_email("a@example.com");
    big.text_body = "x".repeat(100 * 1024);
    let err = send.send_email(admin.request(big)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("65536 bytes"), "{err:?}");
    // The two refused calls counted against the burst of three (the rate is of calls): a
    // call or two more and the bucket is empty.
    let mut exhausted = None;
    for _ in 0..5 {
        match send
            .send_email(admin.request(simple_email("a@example.com")))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                exhausted = Some(status);
                break;
            }
        }
    }
    let status = exhausted.expect("the rate limit refused a call");
    assert_eq!(status.code(), Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let retry = status
        .get_details_retry_info()
        .expect("retry info")
        .retry_delay
        .expect("delay");
    assert!(retry <= std::time::Duration::from_secs(1), "{retry:?}");
    // Another tenant has its own budget.
    SendServiceClient::new(app.channel.clone())
        .send_email(As::key(&keys, "globex-admin", None).request(simple_email("a@example.com")))
        .await
        .expect("globex is not limited by acme's calls");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_listener() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pki = TestPki::new();
    let client = pki.client_identity();
    let keys = Keys::new();
    let dir = pki.dir.path().to_owned();
    let app = app_with_keys(&keys, |c| {
        c.tls.cert_file = Some(dir.join("cert.pem"));
        c.tls.key_file = Some(dir.join("key.pem"));
        c.tls.client_ca_file = Some(dir.join("ca.pem"));
    })
    .await;
    let addr = app.addr;
    let endpoint = |tls: ClientTlsConfig| {
        Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let ca = Certificate::from_pem(&pki.ca_pem);
    let with_cert = endpoint(
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(Identity::from_pem(&client.0, &client.1)),
    )
    .connect()
    .await
    .unwrap();
    let admin = As::key(&keys, "acme-admin", None);
    SmtpConfigServiceClient::new(with_cert)
        .list_provider_presets(admin.request(ListProviderPresetsRequest::default()))
        .await
        .expect("TLS with a client certificate works");
    let without_cert = match endpoint(ClientTlsConfig::new().ca_certificate(ca))
        .connect()
        .await
    {
        Err(_) => Code::Unavailable,
        Ok(channel) => code(
            SmtpConfigServiceClient::new(channel)
                .list_provider_presets(admin.request(ListProviderPresetsRequest::default()))
                .await,
        ),
    };
    assert_ne!(
        without_cert,
        Code::Ok,
        "mutual TLS refuses a client without a certificate"
    );
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let answer = SmtpConfigServiceClient::new(channel)
            .list_provider_presets(admin.request(ListProviderPresetsRequest::default()))
            .await;
        assert!(answer.is_err(), "plaintext is refused on a TLS listener");
    }
    app.stop().await.unwrap();
}
