//! How fresh a read must be, after DynamoDB's `ConsistentRead` and
//! Spanner's bounded-staleness reads.

use std::time::Duration;

/// A point read's consistency. Strong (the default) sees every write
/// acknowledged before the call, on any replica. Bounded accepts an answer
/// that was current at most `max_staleness` ago, which the near cache may
/// serve without asking Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    #[default]
    Strong,
    Bounded(Duration),
}

impl Consistency {
    /// From a request's `max_staleness` (seconds and nanos of a
    /// `google.protobuf.Duration`): unset or zero is strong; negative,
    /// malformed or above `max` is refused.
    pub fn parse(max_staleness: Option<(i64, i32)>, max: Duration) -> Result<Self, String> {
        let Some((seconds, nanos)) = max_staleness else {
            return Ok(Self::Strong);
        };
        let out_of_range = || {
            format!(
                "must be between 0 (a strong read) and {} ms",
                max.as_millis()
            )
        };
        if seconds < 0 || nanos < 0 {
            return Err(out_of_range());
        }
        if nanos >= 1_000_000_000 {
            return Err("nanos must be below one second".to_owned());
        }
        let staleness = Duration::new(seconds as u64, nanos as u32);
        if staleness > max {
            return Err(out_of_range());
        }
        Ok(if staleness.is_zero() {
            Self::Strong
        } else {
            Self::Bounded(staleness)
        })
    }

    /// The staleness accepted: zero for a strong read.
    pub fn max_staleness(self) -> Duration {
        match self {
            Self::Strong => Duration::ZERO,
            Self::Bounded(bound) => bound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn unset_or_zero_is_strong_and_a_bound_up_to_the_maximum_is_bounded() {
        assert_eq!(Consistency::parse(None, MAX), Ok(Consistency::Strong));
        assert_eq!(
            Consistency::parse(Some((0, 0)), MAX),
            Ok(Consistency::Strong)
        );
        assert_eq!(
            Consistency::parse(Some((0, 250_000_000)), MAX),
            Ok(Consistency::Bounded(Duration::from_millis(250)))
        );
        assert_eq!(
            Consistency::parse(Some((5, 0)), MAX),
            Ok(Consistency::Bounded(MAX))
        );
        assert_eq!(Consistency::Strong.max_staleness(), Duration::ZERO);
    }

    #[test]
    fn negative_malformed_or_above_the_maximum_is_refused() {
        for (seconds, nanos) in [
            (-1, 0),
            (0, -1),
            (5, 1),
            (6, 0),
            (0, 1_000_000_000),
            (i64::MAX, 0),
        ] {
            assert!(
                Consistency::parse(Some((seconds, nanos)), MAX).is_err(),
                "{seconds} s {nanos} ns"
            );
        }
    }
}
