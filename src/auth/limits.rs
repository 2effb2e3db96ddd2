//! Per-user limits: concurrent SSE connections and a request rate (token bucket).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::AuthError;

/// Caps concurrent connections per user; a [`ConnectionGuard`] gives the slot back on drop.
pub struct ConnectionLimiter {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

#[derive(Debug)]
pub struct ConnectionGuard {
    user: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl ConnectionLimiter {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    pub fn acquire(&self, user: &str) -> Result<ConnectionGuard, AuthError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user.to_string()).or_insert(0);
        if *n >= self.max {
            return Err(AuthError::TooManyStreams { max: self.max });
        }
        *n += 1;
        Ok(ConnectionGuard {
            user: user.to_string(),
            open: self.open.clone(),
        })
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// A token bucket per user: `per_minute` requests a minute, bursts up to the same number.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::default(),
        }
    }

    pub fn check(&self, user: &str) -> Result<(), AuthError> {
        let now = Instant::now();
        let capacity = self.per_minute as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs() < 120);
        }
        let (tokens, at) = buckets.entry(user.to_string()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * capacity / 60.0).min(capacity);
        *at = now;
        if *tokens < 1.0 {
            let wait = ((1.0 - *tokens) * 60.0 / capacity).ceil() as u64;
            return Err(AuthError::RateLimited {
                retry_after_secs: wait,
            });
        }
        *tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_come_back() {
        let l = ConnectionLimiter::new(2);
        let a = l.acquire("u").unwrap();
        let _b = l.acquire("u").unwrap();
        assert!(matches!(
            l.acquire("u").unwrap_err(),
            AuthError::TooManyStreams { max: 2 }
        ));
        assert!(l.acquire("other").is_ok());
        drop(a);
        assert!(l.acquire("u").is_ok());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_refuses() {
        let r = RateLimiter::new(3);
        for _ in 0..3 {
            r.check("u").unwrap();
        }
        let refused = r.check("u").unwrap_err();
        assert!(matches!(
            refused,
            AuthError::RateLimited { retry_after_secs } if (1..=60).contains(&retry_after_secs)
        ));
        assert!(r.check("v").is_ok());
    }
}
