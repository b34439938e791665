//! Waiting for a health entry to reach a status.

use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::TestApp;

/// The health of `service` once it is `want`, or its last status after 10 s.
pub async fn health_of(app: &TestApp, service: &str, want: ServingStatus) -> ServingStatus {
    wait_for_health(&mut HealthClient::new(app.channel().await), service, want).await
}

/// The same over a client the test holds (a draining server accepts no new
/// connections, but answers on the ones it has).
pub async fn wait_for_health(
    health: &mut HealthClient<Channel>,
    service: &str,
    want: ServingStatus,
) -> ServingStatus {
    let mut last = ServingStatus::Unknown;
    for _ in 0..500 {
        if let Ok(response) = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
        {
            last = response.into_inner().status();
            if last == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}
