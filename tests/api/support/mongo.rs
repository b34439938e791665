//! A MongoDB database per test (`dgtest_<random>` on `MONGODB_URL`),
//! dropped with its guard after the test (`KEEP_TEST_DB=1` keeps it).

use std::time::Duration;

use datagate::config::Settings;

use super::frame::Teardown;

pub fn mongodb_url() -> String {
    std::env::var("MONGODB_URL").expect(
        "set MONGODB_URL to a MongoDB-compatible server the tests may use (`make test` does)",
    )
}

/// Points `settings` at a fresh MongoDB database of its own, which lives as
/// long as the returned guard.
#[must_use = "the MongoDB database is dropped with the guard"]
pub fn use_test_mongo(settings: &mut Settings) -> TestMongo {
    let database = TestMongo {
        url: mongodb_url(),
        name: format!(
            "dgtest_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        ),
    };
    settings.mongodb.url = database.url.clone().into();
    settings.mongodb.database = database.name.clone();
    settings.mongodb.outbox_interval = Duration::from_millis(200);
    database
}

/// A test's MongoDB database; dropped with the guard.
pub struct TestMongo {
    url: String,
    name: String,
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DB").is_some() {
            eprintln!("kept test MongoDB database {}", self.name);
            return;
        }
        let (url, name) = (self.url.clone(), self.name.clone());
        Teardown::task(move || async move {
            if let Ok(client) = mongodb::Client::with_uri_str(url).await {
                let _ = client.database(&name).drop().await;
            }
        })
        .register();
    }
}
