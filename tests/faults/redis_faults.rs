//! Redis paused (SIGSTOP), resumed, killed (SIGKILL) and started again under
//! a read load: the cache fails open, so not one read fails.

use std::time::Duration;

use datagate::proto::v1 as pb;

use crate::support::{Load, Postgres, Redis, Service, figure, service::arrange_catalog};

const SCENARIO: &str = "redis_faults";
const CALLERS: usize = 8;
const PHASE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_and_killed_under_load_fails_no_read() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let mut redis = Redis::start().await;
    let service = Service::on(&pg, Some(&redis)).await;
    let (user, products) = arrange_catalog(&service, 8, 10).await;
    let (users, catalog) = (service.users(), service.catalog());
    let load = Load::start(CALLERS, Duration::from_secs(60), move |caller, n| {
        let (mut users, mut catalog) = (users.clone(), catalog.clone());
        let product = products[(caller + n as usize) % products.len()];
        async move {
            if n % 2 == 0 {
                users
                    .get_user(pb::GetUserRequest {
                        id: user,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            } else {
                catalog
                    .get_product(pb::GetProductRequest {
                        id: product,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            }
        }
    });
    let mut marks = vec![("warm", Duration::ZERO)];
    tokio::time::sleep(PHASE).await;
    marks.push(("SIGSTOP", load.now()));
    redis.signal("STOP");
    tokio::time::sleep(PHASE + PHASE / 2).await;
    marks.push(("SIGCONT", load.now()));
    redis.signal("CONT");
    tokio::time::sleep(PHASE).await;
    marks.push(("SIGKILL", load.now()));
    redis.kill().await;
    tokio::time::sleep(PHASE + PHASE / 2).await;
    marks.push(("restarted", load.now()));
    redis.start_again().await;
    tokio::time::sleep(PHASE).await;
    let end = load.now();
    let samples = load.finish().await;

    for (i, (name, from)) in marks.iter().enumerate() {
        let to = marks
            .get(i + 1)
            .map_or(end + Duration::from_secs(60), |m| m.1);
        figure(SCENARIO, name, samples.started_between(*from, to).summary());
    }
    figure(SCENARIO, "all reads", samples.summary());
    assert!(samples.len() > 100, "the load ran: {}", samples.summary());
    assert_eq!(samples.failed(), 0, "no read fails: {}", samples.summary());
    service.stop().await;
}
