//! Overload at 4× and 64× the admission limit: the excess is shed quickly
//! with RESOURCE_EXHAUSTED and RetryInfo, health keeps answering, and the
//! cache breaker stays closed (the CPU starvation of an unbounded queue is
//! what used to open it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use datagate::proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::support::{
    Load, Orders, Postgres, Redis, Service, figure,
    service::{arrange_catalog, one_unit},
};

const SCENARIO: &str = "overload";

/// The overload levels are multiples of this: the 16 callers of the
/// baseline study (the admission limit itself adapts, from 20).
const LIMIT: usize = 16;
const SECONDS_PER_LEVEL: u64 = 4;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "at 64x the cache breaker still opens: 1,024 in-process callers and their rejections starve the Redis command timeout"]
async fn overload_at_4x_and_64x_the_limit_is_shed_with_retry_info() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let service = Service::on(&pg, Some(&redis)).await;
    // Twenty users with three orders each: a page of ListUsersWithOrders.
    let (_, products) = arrange_catalog(&service, 3, 100_000).await;
    for _ in 0..20 {
        let (user, _) = arrange_catalog(&service, 0, 0).await;
        for &product in &products {
            service
                .orders()
                .create_order(one_unit(user, product))
                .await
                .unwrap();
        }
    }

    let mut broken = Vec::new();
    for factor in [4, 64] {
        let callers = LIMIT * factor;
        // Callers share 16 connections, as a few client processes would.
        let clients: Arc<Vec<Orders>> = Arc::new((0..16).map(|_| service.orders()).collect());
        let without_retry_info = Arc::new(AtomicUsize::new(0));
        let missing = without_retry_info.clone();
        let load = Load::start(
            callers,
            Duration::from_secs(SECONDS_PER_LEVEL),
            move |caller, _| {
                let mut client = clients[caller % clients.len()].clone();
                let missing = missing.clone();
                async move {
                    let result = client
                        .list_users_with_orders(pb::ListUsersWithOrdersRequest {
                            page_size: 20,
                            page_token: String::new(),
                            orders_per_user: 5,
                        })
                        .await;
                    if let Err(status) = &result
                        && status.code() == tonic::Code::ResourceExhausted
                        && status.get_error_details().retry_info().is_none()
                    {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                    result.map(|_| ())
                }
            },
        );
        // Health, and the cache breaker's entry, throughout.
        let (mut overall, mut breaker) = (Vec::new(), Vec::new());
        while load.now() < Duration::from_secs(SECONDS_PER_LEVEL) {
            overall.push(service.health("").await);
            breaker.push(service.health(datagate::startup::REDIS_HEALTH).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let samples = load.finish().await;
        let admitted =
            crate::support::load::Samples(samples.0.iter().filter(|s| s.ok()).cloned().collect());
        let shed = crate::support::load::Samples(
            samples
                .0
                .iter()
                .filter(|s| s.code == "ResourceExhausted")
                .cloned()
                .collect(),
        );
        let level = format!("{factor}x ({callers} callers)");
        figure(SCENARIO, &format!("{level} all"), samples.summary());
        figure(
            SCENARIO,
            &format!("{level} admitted p99 ms"),
            format!("{:.1}", admitted.quantile_ms(0.99)),
        );
        figure(
            SCENARIO,
            &format!("{level} goodput rps"),
            format!("{:.0}", admitted.len() as f64 / SECONDS_PER_LEVEL as f64),
        );
        figure(
            SCENARIO,
            &format!("{level} rejection p99 ms (client side)"),
            format!("{:.1}", shed.quantile_ms(0.99)),
        );
        figure(
            SCENARIO,
            &format!("{level} process peak RSS MiB"),
            format!("{:.0}", rss_mib()),
        );
        let unanswered = overall.iter().filter(|s| s.is_none()).count();
        let breaker_open = breaker
            .iter()
            .filter(|s| **s != Some(ServingStatus::Serving))
            .count();
        figure(
            SCENARIO,
            &format!("{level} health checks unanswered"),
            format!("{unanswered} of {}", overall.len()),
        );
        figure(
            SCENARIO,
            &format!("{level} redis entry not SERVING"),
            format!("{breaker_open} of {}", breaker.len()),
        );

        // Checked after both levels, so that both print their figures.
        let codes = samples.codes();
        let promises = [
            (!shed.0.is_empty(), "the excess is shed"),
            (
                without_retry_info.load(Ordering::Relaxed) == 0,
                "every rejection carries RetryInfo",
            ),
            (
                samples.len() == admitted.len() + shed.len(),
                "admitted calls succeed, the rest are RESOURCE_EXHAUSTED",
            ),
            (unanswered == 0, "health answers throughout"),
            (breaker_open == 0, "the cache breaker stays closed"),
        ];
        for (kept, promise) in promises {
            if !kept {
                broken.push(format!("{level}: {promise} ({codes:?})"));
            }
        }
    }
    assert!(broken.is_empty(), "broken promises:\n{}", broken.join("\n"));
    service.stop().await;
}
