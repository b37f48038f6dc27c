//! The autoscaler's decisions, pure: the default policy (the seed's AutoScaler) and when a
//! proposed replica count becomes the service's target. `now` is passed in.

use std::time::Duration;

use runyard_model::Timestamp;
use runyard_model::service::Service;

/// What the policy sees: the seed's `metrics` plus the replica count it is asked about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Load {
    /// Ready replicas of the current generation.
    pub replicas: u32,
    /// Replicas starting (placed, not ready yet).
    pub pending_works: u32,
    /// Requests queued at the proxy plus those in flight.
    pub pending_requests: u64,
}

/// The seed's default policy: one more replica when the pending requests per replica (ready or
/// starting) reach `per_replica` (the batch size), one less below a quarter of it, a first one
/// as soon as a request waits with none.
pub fn default_policy(load: Load, per_replica: u32) -> u32 {
    let works = load.replicas + load.pending_works;
    if works == 0 {
        return u32::from(load.pending_requests > 0);
    }
    let per_work = load.pending_requests as f64 / f64::from(works);
    let per_replica = f64::from(per_replica.max(1));
    if per_work >= per_replica {
        works + 1
    } else if per_work < per_replica / 4.0 {
        works.saturating_sub(1)
    } else {
        works
    }
}

/// When the autoscaler last moved a service each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastMoves {
    pub out: Option<Timestamp>,
    pub r#in: Option<Timestamp>,
}

/// The new target, when `proposed` (clamped to the service's bounds) should replace the current
/// one now: scale-out at most once per `scale_out_interval`, scale-in at most once per
/// `scale_in_interval` (both counted from the last move either way), except the first replica of
/// a service at zero with requests waiting, which starts at once.
pub fn decide(
    service: &Service,
    proposed: u32,
    load: Load,
    last: LastMoves,
    now: Timestamp,
) -> Option<u32> {
    let r = service.spec.serving.replicas;
    let a = &service.spec.serving.autoscale;
    let to = proposed.clamp(r.min, r.max);
    let from = service.target;
    let since = |t: Option<Timestamp>, d: Duration| t.is_none_or(|t| now.saturating_since(t) >= d);
    let latest = last.out.max(last.r#in);
    if to > from {
        let cold = from == 0 && load.pending_requests > 0;
        (cold || since(latest, a.scale_out_interval)).then_some(to)
    } else if to < from {
        since(latest, a.scale_in_interval).then_some(to)
    } else {
        None
    }
}

/// Why the target moved, in words for `service status`.
pub fn why(load: Load, from: u32, to: u32, policy: &str) -> String {
    format!(
        "{policy} policy: {} pending request(s) over {} ready and {} starting replica(s): {from} → {to}",
        load.pending_requests, load.replicas, load.pending_works
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use runyard_model::service::ServiceSpec;

    fn load(replicas: u32, pending_works: u32, pending_requests: u64) -> Load {
        Load {
            replicas,
            pending_works,
            pending_requests,
        }
    }

    #[test]
    fn default_policy_is_the_seeds() {
        assert_eq!(default_policy(load(0, 0, 0), 8), 0);
        assert_eq!(default_policy(load(0, 0, 1), 8), 1);
        assert_eq!(default_policy(load(1, 0, 8), 8), 2);
        assert_eq!(default_policy(load(1, 1, 16), 8), 3);
        assert_eq!(default_policy(load(2, 0, 8), 8), 2);
        assert_eq!(default_policy(load(2, 0, 3), 8), 1);
        assert_eq!(default_policy(load(2, 0, 4), 8), 2);
        assert_eq!(default_policy(load(1, 0, 0), 8), 0);
    }

    fn service(min: u32, max: u32, target: u32) -> Service {
        let spec = ServiceSpec::from_value(serde_json::json!({
            "name": "s", "repo": "https://example.com/r.git", "script": "serve.py",
            "replicas": {"min": min, "max": max},
            "autoscale": {"scale_out_interval": "10s", "scale_in_interval": "30s"}
        }))
        .unwrap();
        let mut s = Service::new(spec, None, Timestamp::from_millis(0));
        s.target = target;
        s
    }

    #[test]
    fn bounds_and_intervals() {
        let t = |s: u64| Timestamp::from_millis(s * 1000);
        let s = service(1, 3, 2);
        let busy = load(2, 0, 100);
        // Clamped to max; the first move needs no wait.
        assert_eq!(decide(&s, 9, busy, LastMoves::default(), t(100)), Some(3));
        // Too soon after the last move.
        let last = LastMoves {
            out: Some(t(95)),
            r#in: None,
        };
        assert_eq!(decide(&s, 3, busy, last, t(100)), None);
        assert_eq!(decide(&s, 3, busy, last, t(105)), Some(3));
        // Scale-in waits its own, longer interval, and stops at min.
        assert_eq!(decide(&s, 0, load(2, 0, 0), last, t(110)), None);
        assert_eq!(decide(&s, 0, load(2, 0, 0), last, t(125)), Some(1));
        // Unchanged: nothing.
        assert_eq!(decide(&s, 2, busy, LastMoves::default(), t(0)), None);
    }

    #[test]
    fn a_cold_service_starts_at_once() {
        let t = |s: u64| Timestamp::from_millis(s * 1000);
        let s = service(0, 2, 0);
        let last = LastMoves {
            out: None,
            r#in: Some(t(99)),
        };
        assert_eq!(decide(&s, 1, load(0, 0, 1), last, t(100)), Some(1));
        // Without a waiting request, the interval holds.
        assert_eq!(decide(&s, 1, load(0, 0, 0), last, t(100)), None);
    }
}
