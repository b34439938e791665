//! The acknowledged-write ledger: CreateOrder with request ids from several
//! callers while the service is killed (-9) and restarted, PostgreSQL is
//! restarted immediately and Redis is killed. Afterwards every acknowledged
//! order exists exactly once, replaying its request id returns it, and the
//! stock arithmetic is exact.
//!
//! `DATAGATE_FAULTS_LEDGER_SECONDS` sets the load's length (default 60, the
//! minute of the fault study).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use datagate::proto::v1 as pb;
use sqlx::Row as _;

use crate::support::{Load, Postgres, Redis, Service, figure, knob, service::arrange_catalog};

const SCENARIO: &str = "ledger";
const CALLERS: usize = 4;
const PRODUCTS: usize = 5;
const STOCK: i32 = 1_000_000;

/// One order request, derived from (caller, n) so that a replay can rebuild it.
fn request(user: i64, products: &[i64], caller: usize, n: u64) -> pb::CreateOrderRequest {
    let first = (caller + n as usize) % products.len();
    let lines = 1 + (n as usize % 2);
    pb::CreateOrderRequest {
        user_id: user,
        items: (0..lines)
            .map(|i| pb::OrderLine {
                product_id: products[(first + i) % products.len()],
                quantity: 1 + ((n + i as u64) % 5) as i32,
            })
            .collect(),
        request_id: format!("ledger-{caller}-{n}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_orders_survive_kills_and_restarts_exactly_once() {
    let _serial = crate::support::serial().await;
    let seconds = knob("DATAGATE_FAULTS_LEDGER_SECONDS", 60);
    let total = Duration::from_secs(seconds);
    let pg = Postgres::start().await;
    let mut redis = Redis::start().await;
    let mut service = Service::binary_on(&pg, &redis, &[]).await;
    let (user, products) = arrange_catalog(&service, PRODUCTS, STOCK).await;

    // request id -> acknowledged order (id, lines).
    let acked: Arc<Mutex<HashMap<String, pb::Order>>> = Arc::default();
    let orders = service.orders();
    let (ledger, ids) = (acked.clone(), products.clone());
    let load = Load::start(CALLERS, total, move |caller, n| {
        let mut orders = orders.clone();
        let ledger = ledger.clone();
        let mut call = tonic::Request::new(request(user, &ids, caller, n));
        call.set_timeout(Duration::from_secs(5));
        async move {
            let key = call.get_ref().request_id.clone();
            let order = orders.create_order(call).await?.into_inner();
            ledger.lock().unwrap().insert(key, order);
            Ok(())
        }
    });

    // The faults, spread over the load.
    let at = |fraction: f64| total.mul_f64(fraction);
    tokio::time::sleep(at(0.2)).await;
    service.kill9().await;
    service.restart().await;
    let after_kill = load.now();
    tokio::time::sleep(at(0.45).saturating_sub(load.now())).await;
    pg.stop_immediate().await;
    pg.start_again().await;
    let after_pg = load.now();
    tokio::time::sleep(at(0.7).saturating_sub(load.now())).await;
    redis.kill().await;
    tokio::time::sleep(at(0.85).saturating_sub(load.now())).await;
    redis.start_again().await;
    tokio::time::sleep(total.saturating_sub(load.now())).await;
    let samples = load.finish().await;
    service.wait_serving().await;

    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let db = pg.pool().await;
    // Every order in the database, with its items.
    let rows = sqlx::query("SELECT order_id, product_id, quantity FROM order_items")
        .fetch_all(&db)
        .await
        .unwrap();
    let mut committed: BTreeMap<i64, Vec<(i64, i32)>> = BTreeMap::new();
    for row in rows {
        committed
            .entry(row.get("order_id"))
            .or_default()
            .push((row.get("product_id"), row.get("quantity")));
    }
    let orders_in_db: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    let keys_with_response: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE response IS NOT NULL")
            .fetch_one(&db)
            .await
            .unwrap();

    figure(SCENARIO, "seconds of load", seconds);
    figure(SCENARIO, "calls", samples.summary());
    figure(SCENARIO, "acknowledged orders", acked.len());
    figure(SCENARIO, "orders in the database", orders_in_db);
    figure(
        SCENARIO,
        "unacknowledged calls that committed",
        orders_in_db - acked.len() as i64,
    );
    figure(
        SCENARIO,
        "service restarted (s into the load)",
        format!("{:.1}", after_kill.as_secs_f64()),
    );
    figure(
        SCENARIO,
        "PostgreSQL back (s into the load)",
        format!("{:.1}", after_pg.as_secs_f64()),
    );

    // Exactly once: every order belongs to one request id (each create
    // stores its key's response in its own transaction), and every
    // acknowledged order is there with the lines it was acknowledged with.
    assert!(
        acked.len() > 20,
        "orders were acknowledged: {}",
        samples.summary()
    );
    assert_eq!(
        orders_in_db, keys_with_response,
        "one order per request id, none without one"
    );
    assert_eq!(
        committed.len() as i64,
        orders_in_db,
        "every order has items"
    );
    for (key, order) in &acked {
        let mut lines: Vec<(i64, i32)> = order
            .items
            .iter()
            .map(|i| (i.product_id, i.quantity))
            .collect();
        lines.sort();
        let mut stored = committed
            .get(&order.id)
            .unwrap_or_else(|| panic!("acknowledged order {} ({key}) is missing", order.id))
            .clone();
        stored.sort();
        assert_eq!(
            stored, lines,
            "order {} ({key}) has the acknowledged lines",
            order.id
        );
    }

    // Stock arithmetic: initial − ordered by committed orders = final.
    for &product in &products {
        let ordered: i64 = committed
            .values()
            .flatten()
            .filter(|(p, _)| *p == product)
            .map(|(_, q)| i64::from(*q))
            .sum();
        let stock: i32 = sqlx::query_scalar("SELECT quantity FROM inventory WHERE product_id = $1")
            .bind(product)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(
            i64::from(STOCK) - ordered,
            i64::from(stock),
            "product {product}: initial stock minus committed quantities is the final stock"
        );
    }

    // Replays return the acknowledged order (and create nothing).
    let mut replayed = 0;
    let mut orders = service.orders();
    for (key, order) in &acked {
        let (caller, n) = key
            .strip_prefix("ledger-")
            .and_then(|r| r.split_once('-'))
            .map(|(c, n)| (c.parse().unwrap(), n.parse().unwrap()))
            .unwrap();
        let again = orders
            .create_order(request(user, &products, caller, n))
            .await
            .unwrap_or_else(|s| panic!("replay of {key}: {s:?}"))
            .into_inner();
        assert_eq!(again.id, order.id, "replaying {key} returns its order");
        replayed += 1;
    }
    let after_replays: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    figure(SCENARIO, "replays returning their order", replayed);
    assert_eq!(after_replays, orders_in_db, "replays create no order");
}
