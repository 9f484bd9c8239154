//! SmtpConfigService: profiles, verification and presets.

use tonic::{Request, Response, Status};

use super::{
    caller,
    convert::{duration, profile_to_proto, settings_from_proto},
    page_size, profile_mask, tenant_settings, test_email, ApiContext,
};
use crate::{
    delivery::{
        now_micros, secret_context,
        smtp::{SmtpTarget, Stage},
        verify::{StageStatus, VerifyReport},
    },
    domain::{
        check_max_len, EmailAddress, FieldError, ProfileSettings, ProfileStatus, SmtpProfile,
        Verification, VerificationState,
    },
    error::ApiError,
    proto::v1::{self as pb, smtp_config_service_server::SmtpConfigService},
};

/// The SmtpConfigService implementation.
#[derive(Debug, Clone)]
pub struct SmtpConfigApi {
    ctx: ApiContext,
}

impl SmtpConfigApi {
    /// A service over the shared context.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }

    /// Verifies settings; `secret` is the plain-text password, if any.
    async fn run_verification(
        &self,
        settings: &ProfileSettings,
        secret: Option<String>,
        recipient: &str,
    ) -> Result<VerifyReport, ApiError> {
        let target = self
            .ctx
            .engine
            .target_from_settings(settings, secret)
            .map_err(ApiError::FailedPrecondition)?;
        Ok(self.verify_target(&target, settings, recipient).await)
    }

    /// Verifies a target with the profile's envelope sender (error_to, else from_email) and
    /// `recipient` (default: from_email) as the probes.
    async fn verify_target(
        &self,
        target: &SmtpTarget,
        settings: &ProfileSettings,
        recipient: &str,
    ) -> VerifyReport {
        let from = if settings.error_to.is_empty() {
            &settings.from_email
        } else {
            &settings.error_to
        };
        let rcpt = if recipient.is_empty() {
            &settings.from_email
        } else {
            recipient
        };
        self.ctx.engine.verify(target, from, rcpt).await
    }
}

fn stage_to_proto(stage: Stage) -> pb::VerificationStage {
    match stage {
        Stage::Dns => pb::VerificationStage::Dns,
        Stage::Connect => pb::VerificationStage::Connect,
        Stage::Greeting => pb::VerificationStage::Greeting,
        Stage::Tls => pb::VerificationStage::Tls,
        Stage::Auth => pb::VerificationStage::Auth,
        Stage::MailFrom => pb::VerificationStage::MailFrom,
        Stage::RcptTo => pb::VerificationStage::RcptTo,
        Stage::Data => pb::VerificationStage::Data,
    }
}

pub(crate) fn report_to_proto(r: &VerifyReport) -> pb::VerificationReport {
    let us = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    pb::VerificationReport {
        succeeded: r.succeeded,
        stages: r
            .stages
            .iter()
            .map(|s| pb::StageResult {
                stage: stage_to_proto(s.stage).into(),
                status: match s.status {
                    StageStatus::Passed => pb::StageStatus::Passed,
                    StageStatus::Failed => pb::StageStatus::Failed,
                    StageStatus::Skipped => pb::StageStatus::Skipped,
                }
                .into(),
                duration: Some(duration(us(s.duration))),
                reply_code: s.reply_code.map(u32::from).unwrap_or(0),
                detail: s.detail.clone(),
                hint: s.hint.clone(),
            })
            .collect(),
        duration: Some(duration(us(r.duration))),
        capabilities: r.capabilities.clone(),
    }
}

fn verification_of(report: &VerifyReport) -> Verification {
    let failed = report
        .stages
        .iter()
        .find(|s| s.status == StageStatus::Failed);
    Verification {
        state: if report.succeeded {
            VerificationState::Verified
        } else {
            VerificationState::Failed
        },
        verified_at: Some(now_micros()),
        last_error: failed
            .map(|s| format!("{:?}: {} ({})", s.stage, s.detail, s.hint))
            .unwrap_or_default(),
    }
}

/// Validates name, settings and password of a profile message under `prefix`.
fn validated(
    p: &pb::SmtpProfile,
    prefix: &str,
    allow_insecure_tls: bool,
) -> Result<ProfileSettings, ApiError> {
    let mut errors = Vec::new();
    if p.verify_certificate == Some(false) && !allow_insecure_tls {
        errors.push(FieldError::new(
            format!("{prefix}.verify_certificate"),
            "the operator does not allow turning certificate verification off; add the server's CA to trusted_ca_pem instead",
        ));
    }
    let name = p.name.trim();
    if name.is_empty() {
        errors.push(FieldError::new(format!("{prefix}.name"), "is required"));
    }
    if let Err(e) = check_max_len(&format!("{prefix}.name"), name, 255) {
        errors.push(e);
    }
    if let Err(e) = check_max_len(&format!("{prefix}.password"), &p.password, 255) {
        errors.push(e);
    }
    let (settings, unreadable) = settings_from_proto(p, prefix);
    errors.extend(unreadable);
    if let Err(more) = settings.validate(prefix, !p.password.is_empty()) {
        errors.extend(more);
    }
    if errors.is_empty() {
        Ok(settings)
    } else {
        Err(ApiError::InvalidArgument(errors))
    }
}

/// Sharing profiles across tenants is the operator's (or a reseller's) decision.
fn check_may_share(caller: &crate::auth::Caller) -> Result<(), Status> {
    if caller.may_share_profiles() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "profile.shared_with: only an operator key may share profiles with other tenants; \
             this key has the {} role",
            caller.role.as_str()
        )))
    }
}

#[tonic::async_trait]
impl SmtpConfigService for SmtpConfigApi {
    async fn create_smtp_profile(
        &self,
        request: Request<pb::CreateSmtpProfileRequest>,
    ) -> Result<Response<pb::CreateSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let p = req
            .profile
            .ok_or_else(|| ApiError::invalid("profile", "is required"))?;
        let settings = validated(&p, "profile", self.ctx.allow_insecure_tls)?;
        if !settings.shared_with.is_empty() {
            check_may_share(&caller)?;
        }
        let mut verification = Verification::default();
        let mut report = None;
        if req.verify {
            let secret = (!p.password.is_empty()).then(|| p.password.clone());
            let result = self.run_verification(&settings, secret, "").await?;
            verification = verification_of(&result);
            let proto_report = report_to_proto(&result);
            if !result.succeeded {
                return Ok(Response::new(pb::CreateSmtpProfileResponse {
                    profile: None,
                    verification: Some(proto_report),
                }));
            }
            report = Some(proto_report);
        }
        let now = now_micros();
        let id = uuid::Uuid::now_v7().to_string();
        let secret_ciphertext = (!p.password.is_empty()).then(|| {
            self.ctx
                .secrets
                .seal(&p.password, &secret_context(&caller.tenant_id, &id))
        });
        let profile = SmtpProfile {
            id,
            tenant_id: caller.tenant_id.clone(),
            name: p.name.trim().to_owned(),
            settings,
            secret_ciphertext,
            status: ProfileStatus::Inactive,
            verification,
            created_by: caller.source.clone(),
            created_at: now,
            updated_at: now,
            version: 1,
        };
        self.ctx
            .store
            .create_profile(&profile)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CreateSmtpProfileResponse {
            profile: Some(profile_to_proto(&profile)),
            verification: report,
        }))
    }

    async fn get_smtp_profile(
        &self,
        request: Request<pb::GetSmtpProfileRequest>,
    ) -> Result<Response<pb::GetSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let profile = self
            .ctx
            .store
            .get_profile(&caller.tenant_id, &request.get_ref().id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetSmtpProfileResponse {
            profile: Some(profile_to_proto(&profile)),
        }))
    }

    async fn list_smtp_profiles(
        &self,
        request: Request<pb::ListSmtpProfilesRequest>,
    ) -> Result<Response<pb::ListSmtpProfilesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let limit = page_size(req.page_size);
        let after = super::email_log::decode_token(&req.page_token)?;
        let mut profiles = self
            .ctx
            .store
            .list_profiles(&caller.tenant_id, after.as_deref(), limit + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if profiles.len() > limit as usize {
            profiles.truncate(limit as usize);
            profiles
                .last()
                .map(|p| super::email_log::encode_token(&p.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSmtpProfilesResponse {
            profiles: profiles.iter().map(profile_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn activate_smtp_profile(
        &self,
        request: Request<pb::ActivateSmtpProfileRequest>,
    ) -> Result<Response<pb::ActivateSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let store = &self.ctx.store;
        let profile = store
            .get_profile(&caller.tenant_id, &request.get_ref().id)
            .await
            .map_err(ApiError::from)?;
        if let Err(errors) = profile
            .settings
            .validate("profile", profile.secret_ciphertext.is_some())
        {
            return Err(ApiError::FailedPrecondition(format!(
                "the profile is incomplete: {}",
                errors
                    .iter()
                    .map(|e| format!("{} {}", e.field, e.description))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
            .into());
        }
        if profile.verification.state != VerificationState::Verified {
            return Err(ApiError::FailedPrecondition(
                "the profile must pass verification (VerifySmtpProfile) before it can be activated"
                    .into(),
            )
            .into());
        }
        let profile = store
            .set_profile_state(
                &caller.tenant_id,
                &profile.id,
                ProfileStatus::Active,
                &profile.verification,
                now_micros(),
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ActivateSmtpProfileResponse {
            profile: Some(profile_to_proto(&profile)),
        }))
    }

    async fn deactivate_smtp_profile(
        &self,
        request: Request<pb::DeactivateSmtpProfileRequest>,
    ) -> Result<Response<pb::DeactivateSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let store = &self.ctx.store;
        let profile = store
            .get_profile(&caller.tenant_id, &request.get_ref().id)
            .await
            .map_err(ApiError::from)?;
        let profile = store
            .set_profile_state(
                &caller.tenant_id,
                &profile.id,
                ProfileStatus::Inactive,
                &profile.verification,
                now_micros(),
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeactivateSmtpProfileResponse {
            profile: Some(profile_to_proto(&profile)),
        }))
    }

    async fn verify_smtp_profile(
        &self,
        request: Request<pb::VerifySmtpProfileRequest>,
    ) -> Result<Response<pb::VerifySmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        if !req.recipient.is_empty() {
            EmailAddress::parse("recipient", &req.recipient).map_err(ApiError::from)?;
        }
        let report = match req.target {
            None => return Err(ApiError::invalid("target", "set profile_id or settings").into()),
            Some(pb::verify_smtp_profile_request::Target::ProfileId(id)) => {
                let store = &self.ctx.store;
                let profile = store
                    .get_profile(&caller.tenant_id, &id)
                    .await
                    .map_err(ApiError::from)?;
                let target = self
                    .ctx
                    .engine
                    .target_for(&profile)
                    .map_err(ApiError::FailedPrecondition)?;
                let report = self
                    .verify_target(&target, &profile.settings, &req.recipient)
                    .await;
                store
                    .set_profile_state(
                        &caller.tenant_id,
                        &profile.id,
                        profile.status,
                        &verification_of(&report),
                        now_micros(),
                    )
                    .await
                    .map_err(ApiError::from)?;
                report
            }
            Some(pb::verify_smtp_profile_request::Target::Settings(p)) => {
                let settings = validated(&p, "settings", self.ctx.allow_insecure_tls)?;
                let secret = (!p.password.is_empty()).then(|| p.password.clone());
                self.run_verification(&settings, secret, &req.recipient)
                    .await?
            }
        };
        Ok(Response::new(pb::VerifySmtpProfileResponse {
            report: Some(report_to_proto(&report)),
        }))
    }

    async fn update_smtp_profile(
        &self,
        request: Request<pb::UpdateSmtpProfileRequest>,
    ) -> Result<Response<pb::UpdateSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let input = req
            .profile
            .ok_or_else(|| ApiError::invalid("profile", "is required"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let store = &self.ctx.store;
        let current = store
            .get_profile(&caller.tenant_id, &input.id)
            .await
            .map_err(ApiError::from)?;
        let update = profile_mask::apply(&current, &input, &paths).map_err(ApiError::from)?;
        if update.settings.shared_with != current.settings.shared_with {
            check_may_share(&caller)?;
        }
        if update.name.is_empty() {
            return Err(ApiError::invalid("profile.name", "is required").into());
        }
        check_max_len("profile.name", &update.name, 255).map_err(ApiError::from)?;
        if let Some(pw) = &update.password {
            check_max_len("profile.password", pw, 255).map_err(ApiError::from)?;
        }
        if paths.iter().any(|p| p == "verify_certificate")
            && !update.settings.verify_certificate
            && !self.ctx.allow_insecure_tls
        {
            return Err(ApiError::invalid(
                "profile.verify_certificate",
                "the operator does not allow turning certificate verification off",
            )
            .into());
        }
        let context = secret_context(&caller.tenant_id, &current.id);
        let plain_secret = match &update.password {
            Some(pw) if pw.is_empty() => None,
            Some(pw) => Some(pw.clone()),
            None => match &current.secret_ciphertext {
                None => None,
                Some(sealed) => Some(
                    self.ctx
                        .secrets
                        .open(sealed, &context)
                        .map_err(|e| ApiError::Internal(e.into()))?,
                ),
            },
        };
        update
            .settings
            .validate("profile", plain_secret.is_some())
            .map_err(ApiError::from)?;
        let mut next = current.clone();
        next.name = update.name.clone();
        next.settings = update.settings.clone();
        if let Some(pw) = &update.password {
            next.secret_ciphertext = (!pw.is_empty()).then(|| self.ctx.secrets.seal(pw, &context));
        }
        next.updated_at = now_micros();
        let mut report = None;
        if req.verify {
            let result = self
                .run_verification(&next.settings, plain_secret.clone(), "")
                .await?;
            let proto_report = report_to_proto(&result);
            if !result.succeeded {
                return Ok(Response::new(pb::UpdateSmtpProfileResponse {
                    profile: None,
                    verification: Some(proto_report),
                }));
            }
            next.verification = verification_of(&result);
            report = Some(proto_report);
        } else if update.connection_changed {
            // New connection settings are unproven: back to unverified, and out of service
            // until verified and activated again.
            next.verification = Verification::default();
            next.status = ProfileStatus::Inactive;
        }
        let expected = (req.expected_version != 0).then_some(req.expected_version);
        let saved = store
            .update_profile(&next, expected)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::UpdateSmtpProfileResponse {
            profile: Some(profile_to_proto(&saved)),
            verification: report,
        }))
    }

    async fn delete_smtp_profile(
        &self,
        request: Request<pb::DeleteSmtpProfileRequest>,
    ) -> Result<Response<pb::DeleteSmtpProfileResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let store = &self.ctx.store;
        // Ownership first: a grantee or another tenant gets NOT_FOUND.
        store
            .get_profile(&caller.tenant_id, &req.id)
            .await
            .map_err(ApiError::from)?;
        let references = store
            .profile_references(&req.id)
            .await
            .map_err(ApiError::from)?;
        if references > 0 {
            if !req.force {
                return Err(ApiError::FailedPrecondition(format!(
                    "the profile is bound to {references} template(s) or campaign(s); unbind them or delete with force (they then fall back to normal routing)"
                ))
                .into());
            }
            store
                .clear_profile_references(&req.id)
                .await
                .map_err(ApiError::from)?;
        }
        store
            .delete_profile(&caller.tenant_id, &req.id)
            .await
            .map_err(ApiError::from)?;
        let mut settings = store
            .get_tenant_settings(&caller.tenant_id)
            .await
            .map_err(ApiError::from)?;
        if settings.default_profile_id.as_deref() == Some(req.id.as_str()) {
            settings.default_profile_id = None;
            store
                .put_tenant_settings(&caller.tenant_id, &settings, now_micros())
                .await
                .map_err(ApiError::from)?;
        }
        Ok(Response::new(pb::DeleteSmtpProfileResponse {}))
    }

    async fn send_test_email(
        &self,
        request: Request<pb::SendTestEmailRequest>,
    ) -> Result<Response<pb::SendTestEmailResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let to = EmailAddress::parse("to", &req.to).map_err(ApiError::from)?;
        let (settings, target, profile_id) = match req.target {
            None => return Err(ApiError::invalid("target", "set profile_id or settings").into()),
            Some(pb::send_test_email_request::Target::ProfileId(id)) => {
                let profile = self
                    .ctx
                    .store
                    .get_profile(&caller.tenant_id, &id)
                    .await
                    .map_err(ApiError::from)?;
                let target = self
                    .ctx
                    .engine
                    .target_for(&profile)
                    .map_err(ApiError::FailedPrecondition)?;
                (profile.settings, target, Some(profile.id))
            }
            Some(pb::send_test_email_request::Target::Settings(p)) => {
                let settings = validated(&p, "settings", self.ctx.allow_insecure_tls)?;
                let secret = (!p.password.is_empty()).then(|| p.password.clone());
                let target = self
                    .ctx
                    .engine
                    .target_from_settings(&settings, secret)
                    .map_err(ApiError::FailedPrecondition)?;
                (settings, target, None)
            }
        };
        let message =
            test_email::message(&caller, &settings, profile_id.clone(), to, &req.subject)?;
        let store = &self.ctx.store;
        let now = now_micros();
        store
            .insert_message(&message, now)
            .await
            .map_err(ApiError::from)?;
        let claimed = store
            .lease_message(&caller.tenant_id, &message.id, now, now + 300_000_000)
            .await
            .map_err(ApiError::from)?;
        let report = self
            .ctx
            .engine
            .send_test(claimed, &target, profile_id)
            .await;
        Ok(Response::new(pb::SendTestEmailResponse {
            report: Some(report_to_proto(&report)),
            message_id: message.id,
        }))
    }

    async fn get_tenant_settings(
        &self,
        request: Request<pb::GetTenantSettingsRequest>,
    ) -> Result<Response<pb::GetTenantSettingsResponse>, Status> {
        let caller = caller(&request)?;
        let settings = self
            .ctx
            .store
            .get_tenant_settings(&caller.tenant_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetTenantSettingsResponse {
            settings: Some(tenant_settings::to_proto(&settings)),
        }))
    }

    async fn update_tenant_settings(
        &self,
        request: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Result<Response<pb::UpdateTenantSettingsResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let store = &self.ctx.store;
        let current = store
            .get_tenant_settings(&caller.tenant_id)
            .await
            .map_err(ApiError::from)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut next = tenant_settings::apply(&current, req.settings.unwrap_or_default(), &paths)?;
        if let Some(id) = &next.default_profile_id {
            // The default must be a profile the tenant may use: its own or one shared with it.
            store
                .get_usable_profile(&caller.tenant_id, id)
                .await
                .map_err(|_| ApiError::invalid("settings.default_profile_id", "no such profile"))?;
        }
        let now = now_micros();
        next.updated_at = Some(now);
        store
            .put_tenant_settings(&caller.tenant_id, &next, now)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::UpdateTenantSettingsResponse {
            settings: Some(tenant_settings::to_proto(&next)),
        }))
    }

    async fn list_provider_presets(
        &self,
        _request: Request<pb::ListProviderPresetsRequest>,
    ) -> Result<Response<pb::ListProviderPresetsResponse>, Status> {
        Ok(Response::new(pb::ListProviderPresetsResponse {
            presets: super::presets::all(),
        }))
    }
}
