//! Retrying calls to the control plane: which gRPC errors are worth retrying, and an
//! exponential backoff with jitter.
use std::time::Duration;

use tonic::Code;

/// A gRPC error a client cannot fix by retrying: its request is wrong, it is not allowed, or
/// the server does not speak this API. Everything else (the server restarting, the network,
/// overload, a message too large) is retried with backoff.
pub fn classify(s: &tonic::Status) -> Retry {
    match s.code() {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::Unimplemented
        | Code::FailedPrecondition => Retry::Fatal,
        _ => Retry::Retryable,
    }
}

/// Whether an error is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    Retryable,
    Fatal,
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self {
            base,
            max,
            attempt: 0,
            seed,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait: uniformly random in [cap/2, cap], cap = base·2^attempt up to max.
    pub fn next_wait(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift: no dependency for a little jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = cap / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[7] >= Duration::from_secs(1) && waits[7] <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn only_errors_retrying_cannot_fix_are_fatal() {
        for c in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert_eq!(classify(&tonic::Status::new(c, "")), Retry::Fatal);
        }
        for c in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Cancelled,
        ] {
            assert_eq!(classify(&tonic::Status::new(c, "")), Retry::Retryable);
        }
    }
}
