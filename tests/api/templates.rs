//! Templates and campaigns: management, rendering, and routing and composition through them.

use mailgate::{domain::MessageStatus, proto::v1::*};
use tonic::Code;

use crate::{
    helpers::{as_tenant, mailbox, plain_profile, TestApp},
    smtp_server::{Behavior, TestSmtpServer},
};

fn vars(pairs: &[(&str, &str)]) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    })
}

fn h(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

fn device_auth_template(profile_id: &str) -> EmailTemplate {
    EmailTemplate {
        name: "device-auth".into(),
        subject: "Approve sign-in for {{ user }}".into(),
        text_body: "Open {{ gateway_url }}/approve?code={{ code }}".into(),
        html_body: "<a href=\"{{ gateway_url }}/approve?code={{ code }}\">Approve {{ user }}</a>"
            .into(),
        email_type: "device_authentication".into(),
        profile_id: profile_id.into(),
        headers: vec![h("X-Layer", "template"), h("X-Template", "t")],
        ..Default::default()
    }
}

async fn create_template(app: &TestApp, t: EmailTemplate) -> EmailTemplate {
    TemplateServiceClient::new(app.channel.clone())
        .create_email_template(as_tenant(
            "acme",
            CreateEmailTemplateRequest { template: Some(t) },
        ))
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap()
}

use mailgate::proto::v1::{
    campaign_service_client::CampaignServiceClient, template_service_client::TemplateServiceClient,
};

#[tokio::test]
async fn template_management_and_preview() {
    let app = TestApp::spawn().await;
    let mut client = TemplateServiceClient::new(app.channel.clone());
    let bad = client
        .create_email_template(as_tenant(
            "acme",
            CreateEmailTemplateRequest {
                template: Some(EmailTemplate {
                    name: "x".into(),
                    subject: "{{ broken".into(),
                    text_body: "ok".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("template.subject"),
        "{}",
        bad.message()
    );
    let unknown_profile = client
        .create_email_template(as_tenant(
            "acme",
            CreateEmailTemplateRequest {
                template: Some(device_auth_template("nope")),
            },
        ))
        .await
        .unwrap_err();
    assert!(unknown_profile.message().contains("template.profile_id"));

    let t = create_template(&app, device_auth_template("")).await;
    assert_eq!(t.version, 1);
    let dup = client
        .create_email_template(as_tenant(
            "acme",
            CreateEmailTemplateRequest {
                template: Some(device_auth_template("")),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let listed = client
        .list_email_templates(as_tenant("acme", ListEmailTemplatesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.templates.len(), 1);
    let foreign = client
        .get_email_template(as_tenant(
            "globex",
            GetEmailTemplateRequest { id: t.id.clone() },
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);

    // Preview with the tenant's gateway URL; HTML escaped; a missing variable is an error.
    app.config_client()
        .update_tenant_settings(as_tenant(
            "acme",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    gateway_url: "https://gw.acme.test".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["gateway_url".into()],
                }),
            },
        ))
        .await
        .unwrap();
    let preview = client
        .render_template(as_tenant(
            "acme",
            RenderTemplateRequest {
                source: Some(render_template_request::Source::TemplateId(t.id.clone())),
                variables: vars(&[("user", "<b>Bob</b>"), ("code", "123")]),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.subject, "Approve sign-in for <b>Bob</b>");
    assert_eq!(
        preview.text_body,
        "Open https://gw.acme.test/approve?code=123"
    );
    assert!(
        preview
            .html_body
            .contains("Approve &lt;b&gt;Bob&lt;&#x2f;b&gt;")
            || preview.html_body.contains("Approve &lt;b&gt;Bob&lt;/b&gt;"),
        "{}",
        preview.html_body
    );
    let missing = client
        .render_template(as_tenant(
            "acme",
            RenderTemplateRequest {
                source: Some(render_template_request::Source::TemplateId(t.id.clone())),
                variables: vars(&[("user", "Bob")]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().contains("variables"),
        "{}",
        missing.message()
    );

    let updated = client
        .update_email_template(as_tenant(
            "acme",
            UpdateEmailTemplateRequest {
                template: Some(EmailTemplate {
                    id: t.id.clone(),
                    subject: "New {{ user }}".into(),
                    name: "ignored".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["subject".into()],
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    assert_eq!(
        (
            updated.subject.as_str(),
            updated.name.as_str(),
            updated.version
        ),
        ("New {{ user }}", "device-auth", 2)
    );
    client
        .delete_email_template(as_tenant(
            "acme",
            DeleteEmailTemplateRequest { id: t.id.clone() },
        ))
        .await
        .unwrap();
    let gone = client
        .get_email_template(as_tenant("acme", GetEmailTemplateRequest { id: t.id }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn routing_and_composition_follow_request_campaign_template_profile() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut template_profile = plain_profile("template-profile", smtp.port);
    template_profile.headers = vec![h("X-Layer", "profile"), h("X-Profile", "p")];
    let template_profile = app.active_profile("acme", template_profile).await;
    let campaign_profile = app
        .active_profile("acme", plain_profile("campaign-profile", smtp.port))
        .await;
    let template = create_template(&app, device_auth_template(&template_profile)).await;

    // Template alone: its profile, type, rendered content.
    let send = |campaign_id: String, extra: Vec<Header>| SendEmailRequest {
        to: vec![mailbox("bob@example.com")],
        template_id: template.id.clone(),
        campaign_id,
        variables: vars(&[("user", "Bob"), ("code", "42")]),
        headers: extra,
        ..Default::default()
    };
    let (id, status) = app
        .send_and_settle("acme", send(String::new(), vec![h("X-Request", "r")]))
        .await;
    assert_eq!(status, MessageStatus::Sent);
    let entry = app.log_entry("acme", &id).await;
    assert_eq!(entry.profile_reason(), ProfileReason::Template);
    assert_eq!(entry.profile_id, template_profile);
    assert_eq!(entry.template_id, template.id);
    assert_eq!(entry.email_type, "device_authentication");
    assert_eq!(entry.subject, "Approve sign-in for Bob");
    let wire = smtp.received().pop().unwrap().data;
    let headers = wire.split("\r\n\r\n").next().unwrap().to_owned();
    assert!(
        headers.contains("X-Layer: template"),
        "template beats profile: {headers}"
    );
    assert!(
        headers.contains("X-Profile: p")
            && headers.contains("X-Template: t")
            && headers.contains("X-Request: r")
    );
    assert!(wire.contains("/approve?code=42"));

    // A campaign's profile wins over the template's; the request's header wins over all.
    let campaign = CampaignServiceClient::new(app.channel.clone())
        .create_campaign(as_tenant(
            "acme",
            CreateCampaignRequest {
                campaign: Some(Campaign {
                    name: "spring-training".into(),
                    profile_id: campaign_profile.clone(),
                    email_type: "training".into(),
                    headers: vec![h("X-Layer", "campaign"), h("X-Campaign", "c")],
                    from: Some(Mailbox {
                        email: "training@acme.test".into(),
                        name: "Training".into(),
                    }),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .campaign
        .unwrap();
    let (id, _) = app
        .send_and_settle(
            "acme",
            send(campaign.id.clone(), vec![h("X-Layer", "request")]),
        )
        .await;
    let entry = app.log_entry("acme", &id).await;
    assert_eq!(entry.profile_reason(), ProfileReason::Campaign);
    assert_eq!(entry.profile_id, campaign_profile);
    assert_eq!(entry.campaign_id, campaign.id);
    assert_eq!(
        entry.email_type, "device_authentication",
        "template type beats campaign type"
    );
    let wire = smtp.received().pop().unwrap().data;
    let headers = wire.split("\r\n\r\n").next().unwrap();
    assert!(
        headers.contains("X-Layer: request") && !headers.contains("X-Layer: campaign"),
        "{headers}"
    );
    assert!(headers.contains("X-Campaign: c"));
    assert!(
        headers.contains("From: Training <training@acme.test>"),
        "{headers}"
    );

    // The request's profile wins over both.
    let mut req = send(campaign.id.clone(), vec![]);
    req.profile_id = template_profile.clone();
    let (id, _) = app.send_and_settle("acme", req).await;
    assert_eq!(
        app.log_entry("acme", &id).await.profile_reason(),
        ProfileReason::Request
    );

    // A missing variable is refused before anything is stored.
    let mut incomplete = send(String::new(), vec![]);
    incomplete.variables = vars(&[("user", "Bob")]);
    let err = app
        .send_client()
        .send_email(as_tenant("acme", incomplete))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A bound profile cannot be deleted without force; with force the template falls back.
    let mut config = app.config_client();
    let refused = config
        .delete_smtp_profile(as_tenant(
            "acme",
            DeleteSmtpProfileRequest {
                id: template_profile.clone(),
                force: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    config
        .delete_smtp_profile(as_tenant(
            "acme",
            DeleteSmtpProfileRequest {
                id: template_profile,
                force: true,
            },
        ))
        .await
        .unwrap();
    let t = TemplateServiceClient::new(app.channel.clone())
        .get_email_template(as_tenant(
            "acme",
            GetEmailTemplateRequest {
                id: template.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .template
        .unwrap();
    assert!(t.profile_id.is_empty());
    let (id, _) = app
        .send_and_settle("acme", send(String::new(), vec![]))
        .await;
    assert_eq!(
        app.log_entry("acme", &id).await.profile_reason(),
        ProfileReason::SystemDefault
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn batch_renders_each_recipient_with_its_variables() {
    let app = TestApp::spawn().await;
    let template = create_template(&app, device_auth_template("")).await;
    let recipient = |email: &str, user: &str| BatchRecipient {
        to: Some(mailbox(email)),
        variables: vars(&[("user", user)]),
        ..Default::default()
    };
    let mut events = app.events();
    let answer = app
        .send_client()
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(SendEmailRequest {
                    template_id: template.id.clone(),
                    variables: vars(&[("code", "7")]),
                    ..Default::default()
                }),
                recipients: vec![
                    recipient("ann@example.com", "Ann"),
                    recipient("bo@example.com", "Bo"),
                    BatchRecipient {
                        to: Some(mailbox("x@example.com")),
                        ..Default::default()
                    },
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted_count, 2);
    assert_eq!(
        answer.results[2].code,
        Code::InvalidArgument as i32,
        "no user variable for the third"
    );
    let ids: Vec<String> = answer.results[..2]
        .iter()
        .map(|r| r.message_id.clone())
        .collect();
    crate::helpers::wait_all_settled(&mut events, &ids).await;
    assert_eq!(
        app.log_entry("acme", &ids[0]).await.subject,
        "Approve sign-in for Ann"
    );
    assert_eq!(
        app.log_entry("acme", &ids[1]).await.subject,
        "Approve sign-in for Bo"
    );
    app.stop().await.unwrap();
}

/// One email of a batch that alone holds more content than `limits.max_batch_bytes` (a
/// template that doubles a variable) is refused with advice that can work: SendEmail.
#[tokio::test]
async fn a_batch_of_one_email_over_the_batch_limit_is_sent_to_send_email() {
    let app = TestApp::spawn_with(crate::helpers::batches_of_256_kib).await;
    let template = create_template(
        &app,
        EmailTemplate {
            name: "twice".into(),
            subject: "Twice".into(),
            text_body: "{{ blob }}{{ blob }}".into(),
            email_type: "report".into(),
            ..Default::default()
        },
    )
    .await;
    let blob = "x".repeat(150 * 1024);
    let err = app
        .send_client()
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(SendEmailRequest {
                    template_id: template.id.clone(),
                    variables: vars(&[("blob", blob.as_str())]),
                    ..Default::default()
                }),
                recipients: vec![BatchRecipient {
                    to: Some(mailbox("ann@example.com")),
                    ..Default::default()
                }],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .starts_with("recipients: one email of this batch holds 307")
            && err.message().ends_with("send it with SendEmail"),
        "{}",
        err.message()
    );
    app.stop().await.unwrap();
}
