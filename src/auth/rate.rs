//! A token bucket per tenant for the SendEmail/SendBatch call rate (per process).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Per-tenant token buckets.
#[derive(Debug)]
pub(super) struct TenantRate {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl TenantRate {
    pub(super) fn new(per_second: u32, burst: u32) -> Self {
        let burst = if burst == 0 { per_second } else { burst };
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call for `tenant`, or says how long until one is available.
    pub(super) fn take(&self, tenant: &str) -> Result<(), Duration> {
        self.take_at(tenant, Instant::now())
    }

    fn take_at(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            // Forget tenants whose bucket has refilled: they lose nothing.
            let full = self.burst;
            let rate = self.per_second;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < full
            });
        }
        let (tokens, at) = buckets
            .entry(tenant.to_owned())
            .or_insert((self.burst, now));
        let refilled =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_tenant() {
        let rate = TenantRate::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rate.take_at("acme", t0).is_ok());
        }
        let wait = rate.take_at("acme", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(rate.take_at("globex", t0).is_ok(), "tenants are apart");
        assert!(rate
            .take_at("acme", t0 + Duration::from_millis(100))
            .is_ok());
        assert!(rate
            .take_at("acme", t0 + Duration::from_millis(110))
            .is_err());
    }
}
