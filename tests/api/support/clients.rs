//! The generated gRPC clients, each with a bearer token on every call.

use std::sync::Arc;

use datagate::proto::v1::{
    admin_service_client::AdminServiceClient, analytics_service_client::AnalyticsServiceClient,
    catalog_service_client::CatalogServiceClient, order_service_client::OrderServiceClient,
    user_service_client::UserServiceClient,
};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

pub type UserClient = UserServiceClient<InterceptedService<Channel, Bearer>>;
pub type CatalogClient = CatalogServiceClient<InterceptedService<Channel, Bearer>>;
pub type OrderClient = OrderServiceClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type AnalyticsClient = AnalyticsServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<Arc<str>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Status::internal("token is not valid metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}
