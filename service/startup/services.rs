//! The domain services and every gRPC service over them, built once.
//!
//! [`Services::build`] is the one place that knows which domain service
//! needs which pool, and the one place that sets the message limits
//! ([`limited!`]: the generated servers have no common trait to set them
//! through). Health and reflection are added here too, so [`Routes`] is the
//! whole API the server serves.

use anyhow::Context as _;
use tonic::{server::NamedService, service::Routes};
use tonic_health::pb::health_server::{Health, HealthServer};

use super::{Pools, background::Tasks};
use crate::{
    api::{
        admin::{AdminApi, AdminServiceServer},
        analytics::{AnalyticsApi, AnalyticsServiceServer},
        catalog::{CatalogApi, CatalogServiceServer},
        orders::{OrderApi, OrderServiceServer},
        users::{UserApi, UserServiceServer},
    },
    auth::Role,
    config::Settings,
    domain::{
        analytics::Analytics, catalog::Catalog, diagnostics::Diagnostics, idempotency::KeySweeper,
        market_analyses::MarketAnalyses, orders::Orders, partitions::Partitions,
        passwords::PasswordHasher, price_history::PriceHistory, profiles::Profiles,
        search::ProductSearch, teams::Teams, users::Users, write::Writes,
    },
    model::paging::PageTokens,
    proto,
    search_log::{SearchLog, SearchLogWriter},
};

/// The gRPC services, by the name their health entries have (besides the
/// overall "" entry).
pub(super) const SERVICES: &[&str] = &[
    <UserServiceServer<UserApi> as NamedService>::NAME,
    <CatalogServiceServer<CatalogApi> as NamedService>::NAME,
    <OrderServiceServer<OrderApi> as NamedService>::NAME,
    <AdminServiceServer<AdminApi> as NamedService>::NAME,
    <AnalyticsServiceServer<AnalyticsApi> as NamedService>::NAME,
];

/// The authorization matrix: the role every RPC requires, one line per
/// method (a writer may also read, an admin may do everything; see
/// [`Role`]). A method missing here is refused to every caller, and
/// `tests/api/authz.rs` fails: it checks this table against the descriptor
/// set and every role against every method. Health and reflection are open.
///
/// `VerifyPassword` reads, but it is a password oracle: writers only, so a
/// read-only token cannot guess passwords with it.
pub const RPC_ROLES: &[(&str, Role)] = &[
    ("/datagate.v1.UserService/CreateUser", Role::Writer),
    ("/datagate.v1.UserService/GetUser", Role::Reader),
    ("/datagate.v1.UserService/BatchGetUsers", Role::Reader),
    ("/datagate.v1.UserService/ListUsers", Role::Reader),
    ("/datagate.v1.UserService/UpdateUser", Role::Writer),
    ("/datagate.v1.UserService/DeleteUser", Role::Writer),
    ("/datagate.v1.UserService/VerifyPassword", Role::Writer),
    ("/datagate.v1.UserService/CreateTeam", Role::Writer),
    ("/datagate.v1.UserService/AddTeamMember", Role::Writer),
    ("/datagate.v1.UserService/RemoveTeamMember", Role::Writer),
    ("/datagate.v1.UserService/ListUserTeams", Role::Reader),
    ("/datagate.v1.UserService/GetUserProfile", Role::Reader),
    ("/datagate.v1.UserService/UpdateUserProfile", Role::Writer),
    ("/datagate.v1.CatalogService/CreateProduct", Role::Writer),
    ("/datagate.v1.CatalogService/GetProduct", Role::Reader),
    ("/datagate.v1.CatalogService/BatchGetProducts", Role::Reader),
    ("/datagate.v1.CatalogService/UpdateProduct", Role::Writer),
    ("/datagate.v1.CatalogService/AdjustInventory", Role::Writer),
    ("/datagate.v1.CatalogService/SearchProducts", Role::Reader),
    ("/datagate.v1.CatalogService/GetPriceHistory", Role::Reader),
    ("/datagate.v1.OrderService/CreateOrder", Role::Writer),
    ("/datagate.v1.OrderService/GetOrder", Role::Reader),
    ("/datagate.v1.OrderService/ListOrders", Role::Reader),
    ("/datagate.v1.OrderService/UpdateOrderStatus", Role::Writer),
    (
        "/datagate.v1.OrderService/ListUsersWithOrders",
        Role::Reader,
    ),
    // Market analyses are the caller's own: reads see only theirs (admins
    // see all), see `domain::market_analyses`.
    (
        "/datagate.v1.AnalyticsService/GetSearchInsights",
        Role::Reader,
    ),
    (
        "/datagate.v1.AnalyticsService/GetCategoryMetrics",
        Role::Reader,
    ),
    (
        "/datagate.v1.AnalyticsService/GetRevenueTrend",
        Role::Reader,
    ),
    (
        "/datagate.v1.AnalyticsService/StartMarketAnalysis",
        Role::Writer,
    ),
    (
        "/datagate.v1.AnalyticsService/GetMarketAnalysis",
        Role::Reader,
    ),
    (
        "/datagate.v1.AnalyticsService/ListMarketAnalyses",
        Role::Reader,
    ),
    ("/datagate.v1.AdminService/ListPartitions", Role::Admin),
    ("/datagate.v1.AdminService/EnsurePartitions", Role::Admin),
    ("/datagate.v1.AdminService/RetirePartitions", Role::Admin),
    ("/datagate.v1.AdminService/RefreshAnalytics", Role::Admin),
    ("/datagate.v1.AdminService/ListSlowStatements", Role::Admin),
    (
        "/datagate.v1.AdminService/ListActiveStatements",
        Role::Admin,
    ),
    ("/datagate.v1.AdminService/CancelStatement", Role::Admin),
    ("/datagate.v1.AdminService/GetIndexHealth", Role::Admin),
    ("/datagate.v1.AdminService/AdviseIndexes", Role::Admin),
    ("/datagate.v1.AdminService/CreateIndex", Role::Admin),
    ("/datagate.v1.AdminService/GetTableSizes", Role::Admin),
    ("/datagate.v1.AdminService/GetDatabaseHealth", Role::Admin),
];

/// A generated gRPC server with the largest request and response message
/// set to `$max` bytes.
macro_rules! limited {
    ($server:expr, $max:expr) => {
        $server
            .max_decoding_message_size($max)
            .max_encoding_message_size($max)
    };
}

/// What the server serves, and the domain services background work runs.
pub(super) struct Services {
    /// Every gRPC service, health and reflection included.
    pub routes: Routes,
    /// For partition maintenance and the analytics refresher.
    pub partitions: Partitions,
    pub analytics: Analytics,
    /// For the table-size sampler.
    pub diagnostics: Diagnostics,
    /// Run by the analysis workers.
    pub analyses: MarketAnalyses,
    /// Deletes idempotency keys past their retention.
    pub key_sweeper: KeySweeper,
    /// Written out on shutdown, after the drain: searches served during the
    /// drain are logged too.
    pub search_log: SearchLogWriter,
}

impl Services {
    pub fn build(
        settings: &Settings,
        pools: &Pools,
        health: HealthServer<impl Health>,
        tasks: &Tasks,
    ) -> anyhow::Result<Self> {
        let Pools {
            db,
            reads,
            cache,
            mongo,
        } = pools;
        let max_message = settings.server.max_message_bytes;

        let pages = PageTokens::new(&settings.pagination.token_secret)
            .with_previous(&settings.pagination.previous_token_secrets);
        // One write path for every context: one control pool for cancels.
        let writes = Writes::new(db.clone(), cache.clone());
        let users = Users::new(&writes, pages.clone(), PasswordHasher::for_this_machine());
        let teams = Teams::new(&writes, pages.clone());
        let orders = Orders::new(&writes, pages.clone(), users.clone());
        let profiles = Profiles::new(users.clone(), mongo.clone());
        let (search_log, search_log_writer) = SearchLog::start(db.clone(), &settings.search_log);
        let search = ProductSearch::new(
            db.clone(),
            reads.clone(),
            cache.clone(),
            pages.clone(),
            search_log,
        );
        let prices = PriceHistory::new(db.clone(), cache.clone(), mongo.clone());
        let catalog = Catalog::new(&writes);
        let partitions = Partitions::new(db.clone(), settings.partitions.clone());
        let diagnostics = Diagnostics::new(
            db.clone(),
            reads.clone(),
            cache.clone(),
            settings.diagnostics.clone(),
        );
        let analytics = Analytics::new(db.clone(), reads.clone(), cache.clone())
            .with_tasks(tasks.tracker.clone(), tasks.stopping.clone());
        // Market analyses only read PostgreSQL.
        let analyses = MarketAnalyses::new(
            reads.pool().clone(),
            mongo.clone(),
            settings.analysis.clone(),
            pages,
        );

        let routes = with_reflection(Routes::new(health))?
            .add_service(limited!(
                UserServiceServer::new(UserApi {
                    users,
                    teams,
                    profiles,
                    max_staleness: settings.redis.near_max_staleness,
                }),
                max_message
            ))
            .add_service(limited!(
                CatalogServiceServer::new(CatalogApi {
                    catalog,
                    search,
                    prices,
                    max_staleness: settings.redis.near_max_staleness,
                }),
                max_message
            ))
            .add_service(limited!(
                OrderServiceServer::new(OrderApi { orders }),
                max_message
            ))
            .add_service(limited!(
                AdminServiceServer::new(AdminApi {
                    partitions: partitions.clone(),
                    analytics: analytics.clone(),
                    diagnostics: diagnostics.clone(),
                }),
                max_message
            ))
            .add_service(limited!(
                AnalyticsServiceServer::new(AnalyticsApi {
                    analytics: analytics.clone(),
                    analyses: analyses.clone(),
                }),
                max_message
            ));
        let key_sweeper = KeySweeper::new(writes, settings.idempotency.clone());
        Ok(Self {
            routes,
            partitions,
            analytics,
            diagnostics,
            analyses,
            key_sweeper,
            search_log: search_log_writer,
        })
    }
}

/// `routes` with server reflection v1 and v1alpha. Each version lists every
/// service, the other version included, and describes the google.rpc error
/// details so that tools such as grpcurl can decode them.
fn with_reflection(routes: Routes) -> anyhow::Result<Routes> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection v1")?;
    let v1alpha = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building reflection v1alpha")?;
    Ok(routes.add_service(v1).add_service(v1alpha))
}
