//! Reference servers: what a team would write by hand instead of calling
//! datagate, measured in the same run so that every point read and the
//! ListUsersWithOrders page read as a ratio to them.
//!
//! Each is a plain tonic server (no middleware, no cache logic, no
//! telemetry) answering with the same response message as the service, with
//! the service's pool sizes (read from the same settings, so an override
//! applies to both):
//!
//! - [`Kind::RedisGet`]: `GetUser` is one Redis `GET` of the key the
//!   service caches the user under, decoded from the service's stored form;
//! - [`Kind::PrimaryKeySelect`]: `GetUser` is one primary-key `SELECT` of
//!   the same columns into the same row type;
//! - [`Kind::JsonAgg`]: `ListUsersWithOrders` is one hand-written statement
//!   returning the whole page as nested `json_agg` (users → recent orders →
//!   items → products), the shape Hasura or PostGraphile generate.
//!
//! `datagate-bench --serve-reference KIND --listen ADDR` runs one in its own
//! process (so that h2load and callgrind can measure it like the service);
//! it prints `listening on ADDR` once it accepts calls.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use datagate::{model::users::User, proto::v1 as pb};
use deadpool_redis::redis;
use prost_types::Timestamp;
use serde::Deserialize;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tonic::{
    Request, Response, Status,
    body::Body,
    server::{Grpc, NamedService, UnaryService},
};
use tonic_prost::ProstCodec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// GetUser as one Redis GET.
    RedisGet,
    /// GetUser as one primary-key SELECT.
    PrimaryKeySelect,
    /// ListUsersWithOrders as one nested json_agg statement.
    JsonAgg,
}

/// Where a reference server reads from.
pub struct Sources<'a> {
    pub database_url: Option<&'a str>,
    pub redis_url: Option<&'a str>,
    /// The service's `redis.key_prefix`, to read the keys it fills.
    pub redis_key_prefix: &'a str,
}

/// What the handlers share: one pool, as sized for the service.
#[derive(Clone)]
struct Backend {
    redis: Option<deadpool_redis::Pool>,
    db: Option<PgPool>,
    /// `<key_prefix>:v1:user:`.
    user_key: Arc<str>,
}

/// Serves `kind` on `listener` until the process ends.
pub async fn serve(
    kind: Kind,
    sources: Sources<'_>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    // The service's pool sizes: its defaults, with the same environment
    // overrides (`DATAGATE__DATABASE__MAX_CONNECTIONS`, ...).
    let database_url = sources.database_url.unwrap_or("postgres://unused");
    let settings =
        datagate::config::Settings::load_with_overrides(None, &[("database.url", database_url)])?;
    let mut backend = Backend {
        redis: None,
        db: None,
        user_key: format!("{}:v1:user:", sources.redis_key_prefix).into(),
    };
    match kind {
        Kind::RedisGet => {
            let url = sources.redis_url.context("--redis-url is required")?;
            let mut config = deadpool_redis::Config::from_url(url);
            config.pool = Some(deadpool_redis::PoolConfig::new(settings.redis.pool_size));
            let pool = config.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
            // Connect before accepting calls, as the service has by then.
            drop(pool.get().await?);
            backend.redis = Some(pool);
        }
        Kind::PrimaryKeySelect | Kind::JsonAgg => {
            anyhow::ensure!(sources.database_url.is_some(), "--database-url is required");
            let db = &settings.database;
            let pool = PgPoolOptions::new()
                .min_connections(db.min_connections)
                .max_connections(db.max_connections)
                .acquire_timeout(db.acquire_timeout)
                .connect(database_url)
                .await?;
            backend.db = Some(pool);
        }
    }
    let addr = listener.local_addr()?;
    let incoming = datagate::startup::connections::incoming(
        listener,
        datagate::startup::connections::Limits::default(),
    );
    let mut server = tonic::transport::Server::builder();
    println!("listening on {addr}");
    match kind {
        Kind::RedisGet | Kind::PrimaryKeySelect => {
            server
                .add_service(Reference {
                    method: GetUser(kind),
                    backend,
                })
                .serve_with_incoming(incoming)
                .await?;
        }
        Kind::JsonAgg => {
            server
                .add_service(Reference {
                    method: ListUsersWithOrders,
                    backend,
                })
                .serve_with_incoming(incoming)
                .await?;
        }
    }
    Ok(())
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One unary method: tonic decodes the request, calls `F` once, encodes the
/// response, as its generated servers do.
struct Unary<F>(Option<F>);

impl<Req, Resp: Send + 'static, F> UnaryService<Req> for Unary<F>
where
    F: FnOnce(Req) -> BoxFuture<Result<Resp, Status>>,
{
    type Response = Resp;
    type Future = BoxFuture<Result<Response<Resp>, Status>>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let Some(handler) = self.0.take() else {
            return Box::pin(async { Err(Status::internal("a handler runs once per call")) });
        };
        let response = handler(request.into_inner());
        Box::pin(async move { response.await.map(Response::new) })
    }
}

/// Answers `request` with `handler`, framed as gRPC.
fn unary<Req, Resp>(
    request: http::Request<Body>,
    handler: impl FnOnce(Req) -> BoxFuture<Result<Resp, Status>> + Send + 'static,
) -> ReferenceFuture
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc.unary(Unary(Some(handler)), request).await)
    })
}

fn unimplemented() -> ReferenceFuture {
    Box::pin(async { Ok(Status::unimplemented("not a reference method").into_http()) })
}

/// A reference server: one method of one service; every other path is
/// UNIMPLEMENTED.
#[derive(Clone)]
struct Reference<M> {
    method: M,
    backend: Backend,
}

/// The one method a [`Reference`] answers.
trait Method: Clone + Send + 'static {
    /// The gRPC service's full name.
    const SERVICE: &'static str;
    /// The method's request path, `/<service>/<method>`.
    const PATH: &'static str;

    fn answer(&self, backend: Backend, request: http::Request<Body>) -> ReferenceFuture;
}

type ReferenceFuture = BoxFuture<Result<http::Response<Body>, Infallible>>;

impl<M: Method> NamedService for Reference<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M: Method> tower::Service<http::Request<Body>> for Reference<M> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ReferenceFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != M::PATH {
            return unimplemented();
        }
        self.method.answer(self.backend.clone(), request)
    }
}

/// `datagate.v1.UserService/GetUser`, from Redis or PostgreSQL.
#[derive(Clone)]
struct GetUser(Kind);

impl Method for GetUser {
    const SERVICE: &'static str = "datagate.v1.UserService";
    const PATH: &'static str = "/datagate.v1.UserService/GetUser";

    fn answer(&self, backend: Backend, request: http::Request<Body>) -> ReferenceFuture {
        match self.0 {
            Kind::RedisGet => unary(request, move |r: pb::GetUserRequest| {
                Box::pin(async move { backend.get_user_from_redis(r.id).await })
            }),
            _ => unary(request, move |r: pb::GetUserRequest| {
                Box::pin(async move { backend.get_user_from_postgres(r.id).await })
            }),
        }
    }
}

/// `datagate.v1.OrderService/ListUsersWithOrders`, as one statement.
#[derive(Clone)]
struct ListUsersWithOrders;

impl Method for ListUsersWithOrders {
    const SERVICE: &'static str = "datagate.v1.OrderService";
    const PATH: &'static str = "/datagate.v1.OrderService/ListUsersWithOrders";

    fn answer(&self, backend: Backend, request: http::Request<Body>) -> ReferenceFuture {
        unary(request, move |r: pb::ListUsersWithOrdersRequest| {
            Box::pin(async move { backend.list_users_with_orders(r).await })
        })
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// The same page sizes as the service: 0 means the default.
const USERS_PAGE_DEFAULT: i64 = 20;
const USERS_PAGE_MAX: i64 = 100;
const ORDERS_PER_USER_DEFAULT: i64 = 5;
const ORDERS_PER_USER_MAX: i64 = 20;

/// The page as one statement: each level a correlated subquery aggregated
/// with `json_agg`, in the service's orders (users by creation, orders
/// newest first, items in insertion order). Times are epoch microseconds.
const USERS_WITH_ORDERS_SQL: &str = "\
SELECT coalesce(json_agg(json_build_object(
  'id', u.id, 'email', u.email, 'username', u.username, 'display_name', u.display_name,
  'status', u.status, 'has_password', u.password_hash IS NOT NULL,
  'created_us', (extract(epoch FROM u.created_at) * 1000000)::bigint,
  'updated_us', (extract(epoch FROM u.updated_at) * 1000000)::bigint,
  'version', u.version,
  'orders', (
    SELECT coalesce(json_agg(json_build_object(
      'id', o.id, 'order_number', o.order_number, 'status', o.status,
      'total_cents', (o.total * 100)::bigint,
      'created_us', (extract(epoch FROM o.created_at) * 1000000)::bigint,
      'updated_us', (extract(epoch FROM o.updated_at) * 1000000)::bigint,
      'version', o.version,
      'items', (
        SELECT coalesce(json_agg(json_build_object(
          'product_id', i.product_id, 'quantity', i.quantity,
          'unit_price_cents', (i.unit_price * 100)::bigint,
          'subtotal_cents', (i.subtotal * 100)::bigint,
          'sku', p.sku, 'title', p.title, 'category', p.category,
          'price_cents', (p.price * 100)::bigint
        ) ORDER BY i.id), '[]')
        FROM order_items i JOIN products p ON p.id = i.product_id
        WHERE i.order_id = o.id)
    ) ORDER BY o.created_at DESC, o.id DESC), '[]')
    FROM (SELECT * FROM orders WHERE user_id = u.id
          ORDER BY created_at DESC, id DESC LIMIT $2) o)
) ORDER BY u.created_at, u.id), '[]')
FROM (SELECT * FROM users WHERE deleted_at IS NULL ORDER BY created_at, id LIMIT $1) u";

#[derive(Deserialize)]
struct JsonUser {
    id: i64,
    email: String,
    username: String,
    display_name: String,
    status: String,
    has_password: bool,
    created_us: i64,
    updated_us: i64,
    version: i64,
    orders: Vec<JsonOrder>,
}

#[derive(Deserialize)]
struct JsonOrder {
    id: i64,
    order_number: String,
    status: String,
    total_cents: i64,
    created_us: i64,
    updated_us: i64,
    version: i64,
    items: Vec<JsonItem>,
}

#[derive(Deserialize)]
struct JsonItem {
    product_id: i64,
    quantity: i32,
    unit_price_cents: i64,
    subtotal_cents: i64,
    sku: String,
    title: String,
    category: String,
    price_cents: i64,
}

fn timestamp(micros: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    })
}

fn user_status(s: &str) -> pb::UserStatus {
    match s {
        "active" => pb::UserStatus::Active,
        "inactive" => pb::UserStatus::Inactive,
        "suspended" => pb::UserStatus::Suspended,
        _ => pb::UserStatus::Unspecified,
    }
}

fn order_status(s: &str) -> pb::OrderStatus {
    match s {
        "pending" => pb::OrderStatus::Pending,
        "processing" => pb::OrderStatus::Processing,
        "completed" => pb::OrderStatus::Completed,
        "cancelled" => pb::OrderStatus::Cancelled,
        _ => pb::OrderStatus::Unspecified,
    }
}

/// A size from a request: 0 → `default`, else within 1..=`max`.
fn page_size(raw: i32, default: i64, max: i64, field: &str) -> Result<i64, Status> {
    match i64::from(raw) {
        0 => Ok(default),
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(Status::invalid_argument(format!(
            "{field} must be between 0 and {max}"
        ))),
    }
}

impl Backend {
    async fn get_user_from_redis(&self, id: i64) -> Result<pb::User, Status> {
        let pool = self.redis.as_ref().ok_or_else(|| internal("no Redis"))?;
        let mut conn = pool.get().await.map_err(internal)?;
        let stored: Option<Vec<u8>> = redis::cmd("GET")
            .arg(format!("{}{id}", self.user_key))
            .query_async(&mut conn)
            .await
            .map_err(internal)?;
        // The service's stored form: `V` + postcard of the user.
        let user: User = stored
            .as_deref()
            .and_then(|bytes| bytes.strip_prefix(b"V"))
            .and_then(|bytes| postcard::from_bytes(bytes).ok())
            .ok_or_else(|| Status::not_found(format!("user {id} is not cached")))?;
        Ok(user.into())
    }

    async fn get_user_from_postgres(&self, id: i64) -> Result<pb::User, Status> {
        let db = self.db.as_ref().ok_or_else(|| internal("no PostgreSQL"))?;
        let user: Option<User> = sqlx::query_as(
            "SELECT id, email, username, display_name, status, password_hash IS NOT NULL AS has_password, \
             created_at, updated_at, version FROM users WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(db)
        .await
        .map_err(internal)?;
        user.map(Into::into)
            .ok_or_else(|| Status::not_found(format!("no user {id}")))
    }

    async fn list_users_with_orders(
        &self,
        r: pb::ListUsersWithOrdersRequest,
    ) -> Result<pb::ListUsersWithOrdersResponse, Status> {
        let db = self.db.as_ref().ok_or_else(|| internal("no PostgreSQL"))?;
        let size = page_size(r.page_size, USERS_PAGE_DEFAULT, USERS_PAGE_MAX, "page_size")?;
        let per_user = page_size(
            r.orders_per_user,
            ORDERS_PER_USER_DEFAULT,
            ORDERS_PER_USER_MAX,
            "orders_per_user",
        )?;
        let (sqlx::types::Json(users),): (sqlx::types::Json<Vec<JsonUser>>,) =
            sqlx::query_as(USERS_WITH_ORDERS_SQL)
                .bind(size)
                .bind(per_user)
                .fetch_one(db)
                .await
                .map_err(internal)?;
        // A full page has a next one (an unsigned cursor: the reference
        // pages no further).
        let next_page_token = match users.last() {
            Some(last) if users.len() as i64 == size => format!("{}:{}", last.created_us, last.id),
            _ => String::new(),
        };
        let users = users
            .into_iter()
            .map(|u| pb::UserWithOrders {
                recent_orders: u
                    .orders
                    .into_iter()
                    .map(|o| pb::Order {
                        id: o.id,
                        order_number: o.order_number,
                        user_id: u.id,
                        status: order_status(&o.status).into(),
                        total_cents: o.total_cents,
                        items: o
                            .items
                            .into_iter()
                            .map(|i| pb::OrderItem {
                                product_id: i.product_id,
                                quantity: i.quantity,
                                unit_price_cents: i.unit_price_cents,
                                subtotal_cents: i.subtotal_cents,
                                product: Some(pb::ProductSummary {
                                    id: i.product_id,
                                    sku: i.sku,
                                    title: i.title,
                                    category: i.category,
                                    price_cents: i.price_cents,
                                }),
                            })
                            .collect(),
                        create_time: timestamp(o.created_us),
                        update_time: timestamp(o.updated_us),
                        version: o.version,
                    })
                    .collect(),
                user: Some(pb::User {
                    id: u.id,
                    email: u.email,
                    username: u.username,
                    display_name: u.display_name,
                    status: user_status(&u.status).into(),
                    has_password: u.has_password,
                    create_time: timestamp(u.created_us),
                    update_time: timestamp(u.updated_us),
                    version: u.version,
                }),
            })
            .collect();
        Ok(pb::ListUsersWithOrdersResponse {
            users,
            next_page_token,
        })
    }
}
