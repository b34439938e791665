//! Overload at 4× and 64× the admission limit: the excess is shed quickly
//! with RESOURCE_EXHAUSTED and RetryInfo, admitted calls succeed, health
//! keeps answering, and the cache breaker stays closed (the CPU starvation
//! of an unbounded queue is what used to open it).
//!
//! The service runs as the binary, so that its memory and its own
//! (server-side) latency histogram are its alone; the callers follow the
//! contract and wait what a rejection's `RetryInfo` asks (with jitter)
//! before calling again. A baseline level of 16 callers in the same run is
//! what the overload figures are compared with.
//!
//! `DATAGATE_FAULTS_OVERLOAD_SCALE` multiplies each level's length and
//! warm-up (default 1: 4, 5 and 9 s); on a shared machine longer levels
//! average out the noise between them.

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
    Load, Orders, Pacing, Postgres, Redis, Service, figure, knob,
    load::Samples,
    service::{arrange_catalog, one_unit},
};

const SCENARIO: &str = "overload";

/// The overload levels are multiples of this: the 16 callers of the
/// baseline study (the admission limit itself adapts, from 20).
const BASELINE: usize = 16;
const METHOD: &str = "method=\"ListUsersWithOrders\"";

/// The sum of the `name` series on `/metrics` whose labels include every
/// one of `labels` (each `key="value"`).
fn series(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The upper bound of the latency bucket (seconds) that holds the
/// q-quantile of the `code` calls made between `before` and `after`.
fn server_quantile(before: &str, after: &str, code: &str, q: f64) -> f64 {
    let code = format!("code=\"{code}\"");
    let count = |m: &str, le: &str| {
        series(
            m,
            "rpc_latency_seconds_bucket",
            &[METHOD, &code, &format!("le=\"{le}\"")],
        )
    };
    let total = count(after, "+Inf") - count(before, "+Inf");
    let bounds = after
        .lines()
        .filter(|l| {
            l.starts_with("rpc_latency_seconds_bucket{") && l.contains(METHOD) && l.contains(&code)
        })
        .filter_map(|l| {
            l.split("le=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .filter(|le| le != "+Inf")
        .collect::<Vec<_>>();
    bounds
        .iter()
        .find(|le| count(after, le) - count(before, le) >= q * total)
        .and_then(|le| le.parse().ok())
        .unwrap_or(f64::INFINITY)
}

/// What one level measured.
struct Level {
    /// Every call's code, warm-up included.
    promised: std::collections::BTreeMap<String, usize>,
    /// How long the figures' calls were started over.
    measured_for: Duration,
    samples: Samples,
    admitted: Samples,
    shed: Samples,
    without_retry_info: usize,
    health: Vec<Option<ServingStatus>>,
    breaker: Vec<Option<ServingStatus>>,
    /// The mean of `admission_in_flight` sampled after the warm-up.
    in_flight: f64,
    /// `admission_limit` and `admission_retry_after_seconds` at the end.
    limit_and_pushback: (f64, f64),
    /// The bucket bound of the admitted calls' p99, server side, in ms.
    admitted_p99_server_ms: f64,
    /// Rejections the service itself timed, and how many of them took at
    /// most 10 ms (its `rpc_latency_seconds` histogram).
    rejections_server_side: (f64, f64),
}

/// `callers` callers for `length`; the figures are of what started after
/// `warm_up` (the pushback takes a few seconds to find its level), the
/// promises of the whole level.
async fn run_level(
    service: &Service,
    callers: usize,
    length: Duration,
    warm_up: Duration,
) -> Level {
    // Callers share 16 connections, as a few client processes would.
    let clients: Arc<Vec<Orders>> = Arc::new((0..16).map(|_| service.orders()).collect());
    let without_retry_info = Arc::new(AtomicUsize::new(0));
    let missing = without_retry_info.clone();
    let load = Load::start_with(
        callers,
        length,
        Pacing::HonourRetryInfo,
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
    let (mut health, mut breaker) = (Vec::new(), Vec::new());
    let mut before = None;
    // The calls running, sampled with the health checks after the warm-up.
    let mut in_flight = Vec::new();
    while load.now() < length {
        if before.is_none() && load.now() >= warm_up {
            before = Some(service.metrics().await);
        }
        health.push(service.health("").await);
        breaker.push(service.health(datagate::startup::REDIS_HEALTH).await);
        if before.is_some() {
            in_flight.push(series(&service.metrics().await, "admission_in_flight", &[]));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = load.finish().await;
    let after = service.metrics().await;
    let before = before.unwrap_or_default();
    let rejected = |metrics: &str, le: Option<&str>| match le {
        None => series(
            metrics,
            "rpc_latency_seconds_count",
            &[METHOD, "code=\"RESOURCE_EXHAUSTED\""],
        ),
        Some(le) => series(
            metrics,
            "rpc_latency_seconds_bucket",
            &[METHOD, "code=\"RESOURCE_EXHAUSTED\"", le],
        ),
    };
    let rejections_server_side = (
        rejected(&after, None) - rejected(&before, None),
        rejected(&after, Some("le=\"0.01\"")) - rejected(&before, Some("le=\"0.01\"")),
    );
    let admitted_p99_server_ms = server_quantile(&before, &after, "OK", 0.99) * 1e3;
    let gauge = |name: &str| series(&after, name, &[]);
    let limit_and_pushback = (
        gauge("admission_limit"),
        gauge("admission_retry_after_seconds"),
    );
    let promised = all.codes();
    let samples = all.started_between(warm_up, length);
    let keep = |code: &str| {
        Samples(
            samples
                .0
                .iter()
                .filter(|s| s.code == code)
                .cloned()
                .collect(),
        )
    };
    Level {
        promised,
        measured_for: length - warm_up,
        admitted: keep("Ok"),
        shed: keep("ResourceExhausted"),
        samples,
        without_retry_info: without_retry_info.load(Ordering::Relaxed),
        health,
        breaker,
        rejections_server_side,
        admitted_p99_server_ms,
        limit_and_pushback,
        in_flight: in_flight.iter().sum::<f64>() / in_flight.len().max(1) as f64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_4x_and_64x_the_limit_is_shed_with_retry_info() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let mut service = Service::binary_on(&pg, &redis, &[]).await;
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
    let (mut baseline_p99, mut best_goodput) = (0.0_f64, 0.0_f64);
    let scale = knob("DATAGATE_FAULTS_OVERLOAD_SCALE", 1);
    for (factor, length, warm_up) in [(1, 4, 1), (4, 5, 2), (64, 9, 5)] {
        let callers = BASELINE * factor;
        let (length, warm_up) = (
            Duration::from_secs(length * scale),
            Duration::from_secs(warm_up * scale),
        );
        let cpu = (service.cpu_time(), crate::support::cpu_time_of("self"));
        let level = run_level(&service, callers, length, warm_up).await;
        let cpu = (
            service.cpu_time() - cpu.0,
            crate::support::cpu_time_of("self") - cpu.1,
        );
        let name = format!("{factor}x ({callers} callers)");
        let goodput = level.admitted.len() as f64 / level.measured_for.as_secs_f64();
        let admitted_p99 = level.admitted.quantile_ms(0.99);
        if factor == 1 {
            baseline_p99 = admitted_p99;
        }
        best_goodput = best_goodput.max(goodput);
        figure(SCENARIO, &format!("{name} all"), level.samples.summary());
        figure(
            SCENARIO,
            &format!("{name} admitted p99 ms"),
            format!(
                "{admitted_p99:.1} ({:.2} x the baseline's)",
                admitted_p99 / baseline_p99
            ),
        );
        figure(
            SCENARIO,
            &format!("{name} admitted p99 ms (server side, bucket bound)"),
            format!("{}", level.admitted_p99_server_ms),
        );
        figure(
            SCENARIO,
            &format!("{name} admission limit, RetryInfo s at the end; mean in flight"),
            format!("{:?}; {:.1}", level.limit_and_pushback, level.in_flight),
        );
        figure(
            SCENARIO,
            &format!("{name} goodput rps"),
            format!(
                "{goodput:.0} ({:.2} x the best so far)",
                goodput / best_goodput
            ),
        );
        let (rejections, within_10ms) = level.rejections_server_side;
        figure(
            SCENARIO,
            &format!("{name} rejections within 10 ms (server side)"),
            format!("{within_10ms} of {rejections}"),
        );
        figure(
            SCENARIO,
            &format!("{name} rejection p99 ms (client side)"),
            format!("{:.1}", level.shed.quantile_ms(0.99)),
        );
        figure(
            SCENARIO,
            &format!("{name} CPU cores used, service / callers"),
            format!(
                "{:.2} / {:.2}",
                cpu.0.as_secs_f64() / length.as_secs_f64(),
                cpu.1.as_secs_f64() / length.as_secs_f64()
            ),
        );
        figure(
            SCENARIO,
            &format!("{name} service peak RSS MiB"),
            format!("{:.0}", service.peak_rss_mib()),
        );
        let unanswered = level.health.iter().filter(|s| s.is_none()).count();
        let breaker_open = level
            .breaker
            .iter()
            .filter(|s| **s != Some(ServingStatus::Serving))
            .count();
        figure(
            SCENARIO,
            &format!("{name} health checks unanswered"),
            format!("{unanswered} of {}", level.health.len()),
        );
        figure(
            SCENARIO,
            &format!("{name} redis entry not SERVING"),
            format!("{breaker_open} of {}", level.breaker.len()),
        );

        // Checked after every level, so that each prints its figures.
        let codes = &level.promised;
        let count = |code: &str| codes.get(code).copied().unwrap_or(0);
        let shed_as_expected = if factor == 1 {
            count("ResourceExhausted") == 0
        } else {
            count("ResourceExhausted") > 0
        };
        let promises = [
            (
                shed_as_expected,
                "nothing is shed under the limit, the excess is shed over it",
            ),
            (
                level.without_retry_info == 0,
                "every rejection carries RetryInfo",
            ),
            (
                codes.values().sum::<usize>() == count("Ok") + count("ResourceExhausted"),
                "admitted calls succeed, the rest are RESOURCE_EXHAUSTED",
            ),
            (unanswered == 0, "health answers throughout"),
            (breaker_open == 0, "the cache breaker stays closed"),
        ];
        for (kept, promise) in promises {
            if !kept {
                broken.push(format!("{name}: {promise} ({codes:?})"));
            }
        }
    }
    assert!(broken.is_empty(), "broken promises:\n{}", broken.join("\n"));
}
