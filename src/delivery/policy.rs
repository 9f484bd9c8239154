//! What an attempt's result means for the message: classification of SMTP outcomes in one
//! place, and the retry schedule as a pure function.

use std::time::Duration;

use rand::Rng;

use super::smtp::{FailureKind, SmtpFailure};

/// What to do with a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again later.
    Retry,
    /// Give up: a permanent failure.
    Fail,
}

/// Classifies a failure: 4xx, timeouts, network, TLS and authentication failures are retried;
/// 5xx replies (and refused destinations, which no retry can fix) fail.
pub fn classify(failure: &SmtpFailure) -> Verdict {
    match failure.kind {
        FailureKind::Permanent if failure.stage.is_before_transaction() => Verdict::Retry,
        FailureKind::Permanent | FailureKind::Refused => Verdict::Fail,
        FailureKind::Network
        | FailureKind::Timeout
        | FailureKind::Tls
        | FailureKind::Auth
        | FailureKind::Transient
        | FailureKind::Protocol => Verdict::Retry,
    }
}

/// Whether the system default service may take over: only when the server itself failed
/// (connection, TLS, authentication, or a refusal before the mail transaction began), never
/// after the server judged the message or its recipients.
pub fn allows_fallback(failure: &SmtpFailure) -> bool {
    failure.stage.is_before_transaction()
}

/// The delay before retry number `retry` (1-based): the schedule's step (the last step
/// repeats), with +-20 % jitter so retries of many messages spread out.
pub fn retry_delay(schedule: &[Duration], retry: u32, jitter: f64) -> Duration {
    let index = usize::try_from(retry.saturating_sub(1)).unwrap_or(usize::MAX);
    let base = schedule
        .get(index)
        .or_else(|| schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(60));
    base.mul_f64(1.0 + jitter.clamp(-0.2, 0.2))
}

/// A random jitter in [-0.2, 0.2].
pub fn random_jitter() -> f64 {
    rand::rng().random_range(-0.2..=0.2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::smtp::Stage;

    fn failure(stage: Stage, kind: FailureKind) -> SmtpFailure {
        SmtpFailure {
            stage,
            kind,
            code: None,
            enhanced_code: String::new(),
            text: String::new(),
        }
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(&failure(Stage::Data, FailureKind::Permanent)),
            Verdict::Fail
        );
        assert_eq!(
            classify(&failure(Stage::RcptTo, FailureKind::Transient)),
            Verdict::Retry
        );
        assert_eq!(
            classify(&failure(Stage::Connect, FailureKind::Network)),
            Verdict::Retry
        );
        assert_eq!(
            classify(&failure(Stage::Data, FailureKind::Timeout)),
            Verdict::Retry
        );
        assert_eq!(
            classify(&failure(Stage::Greeting, FailureKind::Permanent)),
            Verdict::Retry
        );
        assert_eq!(
            classify(&failure(Stage::Dns, FailureKind::Refused)),
            Verdict::Fail
        );
        assert!(allows_fallback(&failure(Stage::Auth, FailureKind::Auth)));
        assert!(allows_fallback(&failure(Stage::Tls, FailureKind::Tls)));
        assert!(!allows_fallback(&failure(
            Stage::RcptTo,
            FailureKind::Permanent
        )));
        assert!(!allows_fallback(&failure(
            Stage::Data,
            FailureKind::Network
        )));
    }

    #[test]
    fn schedule_steps_repeat_last_and_jitter_is_bounded() {
        let s = [Duration::from_secs(30), Duration::from_secs(300)];
        assert_eq!(retry_delay(&s, 1, 0.0), Duration::from_secs(30));
        assert_eq!(retry_delay(&s, 2, 0.0), Duration::from_secs(300));
        assert_eq!(retry_delay(&s, 9, 0.0), Duration::from_secs(300));
        assert_eq!(retry_delay(&s, 1, 0.2), Duration::from_secs(36));
        assert_eq!(retry_delay(&s, 1, -0.9), Duration::from_secs(24));
        for _ in 0..100 {
            let j = random_jitter();
            assert!((-0.2..=0.2).contains(&j));
        }
    }
}
