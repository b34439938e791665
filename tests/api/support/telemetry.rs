//! The subscriber every test process runs with: the statement layer (which
//! statement counting and N+1 detection rely on, as in production), the
//! capture tests read a call's log lines from (`observe`), and, with
//! `TEST_LOG=1`, readable logs.

use std::{sync::OnceLock, time::Duration};

pub fn init() {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let logs = std::env::var_os("TEST_LOG").is_some().then(|| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::new(
                    "info,datagate=debug,sqlx=warn",
                ))
        });
        let _ = tracing_subscriber::registry()
            .with(datagate::statements::StatementLayer::filtered(
                Duration::from_millis(200),
            ))
            .with(super::observe::capture_layer())
            .with(logs)
            .try_init();
    });
}
